//! Signed requests: HMAC-SHA256 over a timestamp, a nonce, the request line and the
//! body, with a shared key.
//!
//! A client sends `X-Mlops-Timestamp: <unix seconds>`, `X-Mlops-Nonce: <16-128 of
//! A-Z a-z 0-9 _ ->` (a fresh random value per request, e.g. a UUID) and
//! `X-Mlops-Signature: sha256=<hex>` where the MAC covers
//! `"<timestamp>.<nonce>.<METHOD> <path>.<body>"` (the timestamped scheme of Stripe's
//! webhooks, plus a nonce and the request line so a signed request cannot be replayed or
//! sent to another model). Timestamps more than [`MAX_SKEW_SECS`] away from the
//! server's clock are refused, and every nonce is remembered for that window
//! ([`NonceStore`], and in Redis when the server has one, so a replay to another replica
//! is caught too): a request seen once is refused the second time. The comparison is
//! constant-time (`hmac`'s `verify_slice`).

use std::collections::HashMap;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a request's timestamp may be from the server's clock.
pub const MAX_SKEW_SECS: u64 = 300;
/// Header carrying the unix time the client signed at.
pub const TIMESTAMP_HEADER: &str = "x-mlops-timestamp";
/// Header carrying the request's one-time value.
pub const NONCE_HEADER: &str = "x-mlops-nonce";
/// Header carrying `sha256=<hex MAC>`.
pub const SIGNATURE_HEADER: &str = "x-mlops-signature";

/// Why a request's signature was refused; the message goes back to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// A header is absent.
    #[error(
        "missing `{0}` header: this server only accepts signed requests (README: signed requests)"
    )]
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
    /// The nonce was seen within the window.
    #[error("replayed request: nonce already used within the last {MAX_SKEW_SECS} s; sign every request with a fresh `X-Mlops-Nonce`")]
    Replay,
    /// The nonce store is full of unexpired nonces.
    #[error("too many signed requests within {MAX_SKEW_SECS} s for this server to remember (at most {MAX_NONCES})")]
    Overloaded,
}

/// The server's key.
pub struct Signer {
    key: Vec<u8>,
}

/// What a signed request carries, as sent in its headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignedHeaders<'a> {
    /// `X-Mlops-Timestamp`.
    pub timestamp: Option<&'a str>,
    /// `X-Mlops-Nonce`.
    pub nonce: Option<&'a str>,
    /// `X-Mlops-Signature`.
    pub signature: Option<&'a str>,
}

impl Signer {
    /// A signer with `key` (any length; HMAC hashes long keys).
    pub fn new(key: Vec<u8>) -> Self {
        Signer { key }
    }

    fn mac(
        &self,
        timestamp: &str,
        nonce: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        for part in [
            timestamp.as_bytes(),
            b".",
            nonce.as_bytes(),
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

    /// The `X-Mlops-Signature` value for a request signed at `timestamp` with `nonce`
    /// (clients, tests).
    pub fn sign(
        &self,
        timestamp: &str,
        nonce: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> String {
        let tag = self
            .mac(timestamp, nonce, method, path, body)
            .finalize()
            .into_bytes();
        format!("sha256={}", hex(&tag))
    }

    /// Checks the headers against the request at server time `now` (unix seconds) and
    /// returns the nonce (to be checked for replays by the caller: [`NonceStore`]).
    ///
    /// # Errors
    /// - [`SignatureError::Missing`] when a header is absent.
    /// - [`SignatureError::Malformed`] when the timestamp is not unix seconds, the nonce
    ///   not 16-128 of `A-Z a-z 0-9 _ -`, or the signature not `sha256=<hex>`.
    /// - [`SignatureError::Stale`] when the timestamp is more than [`MAX_SKEW_SECS`] from
    ///   `now`.
    /// - [`SignatureError::Mismatch`] when the MAC does not match.
    pub fn verify<'a>(
        &self,
        headers: SignedHeaders<'a>,
        method: &str,
        path: &str,
        body: &[u8],
        now: u64,
    ) -> Result<&'a str, SignatureError> {
        let timestamp = headers
            .timestamp
            .ok_or(SignatureError::Missing(TIMESTAMP_HEADER))?;
        let nonce = headers.nonce.ok_or(SignatureError::Missing(NONCE_HEADER))?;
        let signature = headers
            .signature
            .ok_or(SignatureError::Missing(SIGNATURE_HEADER))?;
        let sent: u64 = timestamp
            .trim()
            .parse()
            .map_err(|_| SignatureError::Malformed(TIMESTAMP_HEADER))?;
        let nonce = nonce.trim();
        let nonce_ok = (16..=128).contains(&nonce.len())
            && nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !nonce_ok {
            return Err(SignatureError::Malformed(NONCE_HEADER));
        }
        let skew = now.abs_diff(sent);
        if skew > MAX_SKEW_SECS {
            return Err(SignatureError::Stale(skew));
        }
        let tag = signature
            .trim()
            .strip_prefix("sha256=")
            .and_then(unhex)
            .ok_or(SignatureError::Malformed(SIGNATURE_HEADER))?;
        self.mac(timestamp.trim(), nonce, method, path, body)
            .verify_slice(&tag)
            .map_err(|_| SignatureError::Mismatch)?;
        Ok(nonce)
    }
}

/// Nonces remembered at most (each ~100 bytes): 2^18 signed requests within
/// [`MAX_SKEW_SECS`], ~870 per second sustained; more are refused until old ones expire.
pub const MAX_NONCES: usize = 1 << 18;

/// The nonces of the last [`MAX_SKEW_SECS`] (twice that, to cover a timestamp that is
/// early by the full skew), in this process.
#[derive(Default)]
pub struct NonceStore {
    seen: Mutex<HashMap<String, u64>>,
}

impl NonceStore {
    /// Remembers `nonce` at server time `now`.
    ///
    /// # Errors
    /// [`SignatureError::Replay`] when it was seen within the window;
    /// [`SignatureError::Overloaded`] when [`MAX_NONCES`] unexpired nonces are held.
    pub fn check(&self, nonce: &str, now: u64) -> Result<(), SignatureError> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expires = now + 2 * MAX_SKEW_SECS;
        if let Some(&until) = seen.get(nonce) {
            if until > now {
                return Err(SignatureError::Replay);
            }
        }
        if seen.len() >= MAX_NONCES {
            seen.retain(|_, until| *until > now);
            if seen.len() >= MAX_NONCES {
                return Err(SignatureError::Overloaded);
            }
        }
        seen.insert(nonce.to_string(), expires);
        Ok(())
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
    const N: &str = "0123456789abcdef";

    fn headers<'a>(timestamp: &'a str, nonce: &'a str, signature: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            timestamp: Some(timestamp),
            nonce: Some(nonce),
            signature: Some(signature),
        }
    }

    #[test]
    fn accepts_its_own_signature_and_refuses_tampering() {
        let signer = Signer::new(b"secret".to_vec());
        let body = br#"{"instances": [[0.0]]}"#;
        let sig = signer.sign("1000", N, "POST", P, body);
        assert_eq!(
            signer.verify(headers("1000", N, &sig), "POST", P, body, 1000),
            Ok(N)
        );
        assert_eq!(
            signer.verify(headers("1000", N, &sig), "POST", P, body, 1200),
            Ok(N)
        );
        assert_eq!(
            signer.verify(headers("1000", N, &sig), "POST", P, b"{}", 1000),
            Err(SignatureError::Mismatch)
        );
        // Another model's route: the request line is signed too; and the nonce.
        assert_eq!(
            signer.verify(
                headers("1000", N, &sig),
                "POST",
                "/v1/models/n:predict",
                body,
                1000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            signer.verify(
                headers("1000", "fedcba9876543210", &sig),
                "POST",
                P,
                body,
                1000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            signer.verify(headers("1001", N, &sig), "POST", P, body, 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            Signer::new(b"other".to_vec()).verify(headers("1000", N, &sig), "POST", P, body, 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            signer.verify(
                headers("1000", N, &sig),
                "POST",
                P,
                body,
                1000 + MAX_SKEW_SECS + 1
            ),
            Err(SignatureError::Stale(MAX_SKEW_SECS + 1))
        );
        let mut missing = headers("1000", N, &sig);
        missing.timestamp = None;
        assert_eq!(
            signer.verify(missing, "POST", P, body, 1000),
            Err(SignatureError::Missing(TIMESTAMP_HEADER))
        );
        let mut missing = headers("1000", N, &sig);
        missing.nonce = None;
        assert_eq!(
            signer.verify(missing, "POST", P, body, 1000),
            Err(SignatureError::Missing(NONCE_HEADER))
        );
        for nonce in ["short", "has space in it ok", &"x".repeat(129)] {
            assert_eq!(
                signer.verify(headers("1000", nonce, &sig), "POST", P, body, 1000),
                Err(SignatureError::Malformed(NONCE_HEADER)),
                "{nonce}"
            );
        }
        assert_eq!(
            signer.verify(headers("1000", N, "sha256=zz"), "POST", P, body, 1000),
            Err(SignatureError::Malformed(SIGNATURE_HEADER))
        );
    }

    #[test]
    fn nonces_are_refused_the_second_time_within_the_window() {
        let store = NonceStore::default();
        assert_eq!(store.check(N, 1000), Ok(()));
        assert_eq!(store.check(N, 1000), Err(SignatureError::Replay));
        assert_eq!(
            store.check(N, 1000 + 2 * MAX_SKEW_SECS - 1),
            Err(SignatureError::Replay)
        );
        // After the window a timestamp that old is stale anyway; the nonce may come back.
        assert_eq!(store.check(N, 1000 + 2 * MAX_SKEW_SECS), Ok(()));
        assert_eq!(store.check("fedcba9876543210", 1000), Ok(()));
    }

    /// The signature is the one a client computes with any HMAC library over
    /// `"<timestamp>.<nonce>.<METHOD> <path>.<body>"` (this value from Python's `hmac`
    /// module).
    #[test]
    fn matches_an_independent_hmac() {
        let signer = Signer::new(b"secret".to_vec());
        assert_eq!(
            signer.sign("1000", N, "POST", P, br#"{"instances": [[0.0]]}"#),
            "sha256=1d0e6f0cace84b68972c71e993e2714ceea16163e1f4974ee09e23af71fefd97"
        );
    }
}
