//! Signed requests: HMAC-SHA256 over a timestamp, the request line and the body, with a
//! shared key.
//!
//! A client sends `X-Mlops-Timestamp: <unix seconds>` and `X-Mlops-Signature:
//! sha256=<hex>` where the MAC covers `"<timestamp>.<METHOD> <path>.<body>"` (the
//! timestamped scheme of Stripe's webhooks, plus the request line so a signed request
//! cannot be sent to another model). Timestamps more than [`MAX_SKEW_SECS`] away from
//! the server's clock are refused, which limits replays of a captured request to that
//! window (no nonces are kept); the comparison is constant-time (`hmac`'s
//! `verify_slice`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a request's timestamp may be from the server's clock.
pub const MAX_SKEW_SECS: u64 = 300;
/// Header carrying the unix time the client signed at.
pub const TIMESTAMP_HEADER: &str = "x-mlops-timestamp";
/// Header carrying `sha256=<hex MAC>`.
pub const SIGNATURE_HEADER: &str = "x-mlops-signature";

/// Why a request's signature was refused; the message goes back to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// A header is absent.
    #[error("missing `{0}` header: this server only accepts signed requests")]
    Missing(&'static str),
    /// A header is not in the expected form.
    #[error("malformed `{0}` header")]
    Malformed(&'static str),
    /// The timestamp is too old or in the future.
    #[error("timestamp is {0} s away from the server's clock (at most {MAX_SKEW_SECS} s)")]
    Stale(u64),
    /// The MAC does not match.
    #[error("signature does not match the body")]
    Mismatch,
}

/// The server's key.
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// A signer with `key` (any length; HMAC hashes long keys).
    pub fn new(key: Vec<u8>) -> Self {
        Signer { key }
    }

    fn mac(&self, timestamp: &str, method: &str, path: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        for part in [
            timestamp.as_bytes(),
            b".",
            method.as_bytes(),
            b" ",
            path.as_bytes(),
            b".",
        ] {
            mac.update(part);
        }
        mac.update(body);
        mac
    }

    /// The `X-Mlops-Signature` value for a request signed at `timestamp` (clients, tests).
    pub fn sign(&self, timestamp: &str, method: &str, path: &str, body: &[u8]) -> String {
        let tag = self
            .mac(timestamp, method, path, body)
            .finalize()
            .into_bytes();
        format!("sha256={}", hex(&tag))
    }

    /// Checks the two headers' values against the request at server time `now` (unix
    /// seconds).
    ///
    /// # Errors
    /// - [`SignatureError::Missing`] when a header is absent.
    /// - [`SignatureError::Malformed`] when the timestamp is not unix seconds or the
    ///   signature not `sha256=<hex>`.
    /// - [`SignatureError::Stale`] when the timestamp is more than [`MAX_SKEW_SECS`] from
    ///   `now`.
    /// - [`SignatureError::Mismatch`] when the MAC does not match.
    pub fn verify(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
        now: u64,
    ) -> Result<(), SignatureError> {
        let timestamp = timestamp.ok_or(SignatureError::Missing(TIMESTAMP_HEADER))?;
        let signature = signature.ok_or(SignatureError::Missing(SIGNATURE_HEADER))?;
        let sent: u64 = timestamp
            .trim()
            .parse()
            .map_err(|_| SignatureError::Malformed(TIMESTAMP_HEADER))?;
        let skew = now.abs_diff(sent);
        if skew > MAX_SKEW_SECS {
            return Err(SignatureError::Stale(skew));
        }
        let tag = signature
            .trim()
            .strip_prefix("sha256=")
            .and_then(unhex)
            .ok_or(SignatureError::Malformed(SIGNATURE_HEADER))?;
        self.mac(timestamp.trim(), method, path, body)
            .verify_slice(&tag)
            .map_err(|_| SignatureError::Mismatch)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/v1/models/m:predict";

    #[test]
    fn accepts_its_own_signature_and_refuses_tampering() {
        let signer = Signer::new(b"secret".to_vec());
        let body = br#"{"instances": [[0.0]]}"#;
        let sig = signer.sign("1000", "POST", P, body);
        assert_eq!(
            signer.verify(Some("1000"), Some(&sig), "POST", P, body, 1000),
            Ok(())
        );
        assert_eq!(
            signer.verify(Some("1000"), Some(&sig), "POST", P, body, 1200),
            Ok(())
        );
        assert_eq!(
            signer.verify(Some("1000"), Some(&sig), "POST", P, b"{}", 1000),
            Err(SignatureError::Mismatch)
        );
        // Another model's route: the request line is signed too.
        assert_eq!(
            signer.verify(
                Some("1000"),
                Some(&sig),
                "POST",
                "/v1/models/n:predict",
                body,
                1000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            signer.verify(Some("1001"), Some(&sig), "POST", P, body, 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            Signer::new(b"other".to_vec()).verify(Some("1000"), Some(&sig), "POST", P, body, 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            signer.verify(
                Some("1000"),
                Some(&sig),
                "POST",
                P,
                body,
                1000 + MAX_SKEW_SECS + 1
            ),
            Err(SignatureError::Stale(MAX_SKEW_SECS + 1))
        );
        assert_eq!(
            signer.verify(None, Some(&sig), "POST", P, body, 1000),
            Err(SignatureError::Missing(TIMESTAMP_HEADER))
        );
        assert_eq!(
            signer.verify(Some("1000"), Some("sha256=zz"), "POST", P, body, 1000),
            Err(SignatureError::Malformed(SIGNATURE_HEADER))
        );
    }

    /// The signature is the one a client computes with any HMAC library over
    /// `"<timestamp>.<METHOD> <path>.<body>"` (this value from Python's `hmac` module).
    #[test]
    fn matches_an_independent_hmac() {
        let signer = Signer::new(b"secret".to_vec());
        assert_eq!(
            signer.sign("1000", "POST", P, br#"{"instances": [[0.0]]}"#),
            "sha256=e6c9847134fc6458a17d1a6578354595f4bb774adc6acc424a04131a38e4ed5e"
        );
    }
}
