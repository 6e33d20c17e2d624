//! Reader for the IDX format (MNIST's): a big-endian header, then raw unsigned bytes.
//!
//! Written by hand because the format is a dozen lines and the crates that read it also
//! download data sets, which this tool must never do. Every field is checked against the
//! file's real length, so a truncated or mismatched file names itself in the error.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// One IDX tensor of unsigned bytes: `dims` (outermost first) and the flat values.
#[derive(Debug, Clone)]
pub struct IdxArray {
    /// Dimensions from the header, e.g. `[60000, 28, 28]`.
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub values: Vec<u8>,
}

/// Reads a raw or gzip-compressed IDX file, checking magic, dimensions and length.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::data(path, format!("corrupt gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|problem| Error::data(path, problem))
}

/// Parses IDX bytes; the error string says what was expected and what was found.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "not an IDX file: {} bytes, expected at least a 4-byte header",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "wrong magic number {:02x}{:02x}{:02x}{:02x}: an IDX file starts with 0000 (then 08 for unsigned bytes and the rank)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x} is not supported; only unsigned bytes (0x08) are",
            bytes[2]
        ));
    }
    let rank = bytes[3] as usize;
    if rank == 0 || rank > 4 {
        return Err(format!(
            "IDX rank {rank} is not supported (expected 1 to 4)"
        ));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(format!(
            "truncated header: {} bytes, expected {header}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let at = 4 + 4 * i;
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        })
        .collect();
    if dims.contains(&0) {
        return Err(format!("a dimension is zero: {dims:?}"));
    }
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let body = bytes.len() - header;
    if body != count {
        return Err(format!(
            "{} for dimensions {dims:?}: expected {count} data bytes, found {body}",
            if body < count {
                "truncated"
            } else {
                "trailing bytes"
            }
        ));
    }
    Ok(IdxArray {
        dims,
        values: bytes[header..].to_vec(),
    })
}

/// Encodes values as an (uncompressed) IDX file; used to write fixtures and tests.
pub fn encode_idx(dims: &[usize], values: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(values);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let a = parse_idx(&bytes).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.values, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let mut bytes = encode_idx(&[2], &[1, 2]);
        bytes[0] = 7;
        assert!(parse_idx(&bytes).unwrap_err().contains("magic"));
    }

    #[test]
    fn truncated_body_is_rejected() {
        let bytes = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let err = parse_idx(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(err.contains("expected 6"), "{err}");
    }
}
