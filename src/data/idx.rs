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

/// Most bytes one IDX file may hold once decompressed (8 GiB): a documented limit, so a
/// header that claims more is refused before anything is read.
pub const MAX_IDX_BYTES: u64 = 8 << 30;

/// Reads a raw or gzip-compressed IDX file, checking magic, dimensions and length.
///
/// # Errors
/// As [`read_idx_limited`] without a limit.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    read_idx_limited(path, None)
}

/// Reads the header of an IDX file and at most `limit` records (the first dimension),
/// streaming (gzip is inflated as it is read, never more than needed plus one byte) into
/// one buffer of exactly the needed size, so neither a header that lies about its size
/// (a gzip bomb) nor a large file with a small `--limit` costs more memory than the
/// records used. Without a limit the whole body must match the header exactly.
///
/// # Errors
/// - [`Error::Io`] when the file cannot be opened or read.
/// - [`Error::Data`] naming the file: a corrupt gzip stream, not IDX (magic, element type
///   or rank), a zero dimension, larger than [`MAX_IDX_BYTES`], truncated, or with
///   trailing bytes (checked only when every record is read).
pub fn read_idx_limited(path: &Path, limit: Option<usize>) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("read", path, e))?;
    let file_len = file.metadata().map(|m| m.len()).ok();
    let mut buffered = std::io::BufReader::new(file);
    let gzip = {
        use std::io::BufRead;
        let head = buffered
            .fill_buf()
            .map_err(|e| Error::io("read", path, e))?;
        head.starts_with(&[0x1f, 0x8b])
    };
    let mut reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let io = |e: std::io::Error| {
        if gzip {
            Error::data(path, format!("corrupt gzip stream: {e}"))
        } else {
            Error::io("read", path, e)
        }
    };
    let mut magic = [0u8; 4];
    read_up_to(&mut reader, &mut magic)
        .map_err(io)
        .and_then(|n| {
            if n < 4 {
                Err(Error::data(
                    path,
                    format!("not an IDX file: {n} bytes, expected at least a 4-byte header"),
                ))
            } else {
                Ok(())
            }
        })?;
    let rank = check_magic(&magic).map_err(|p| Error::data(path, p))?;
    let mut dims_bytes = vec![0u8; 4 * rank];
    let got = read_up_to(&mut reader, &mut dims_bytes).map_err(io)?;
    if got < dims_bytes.len() {
        return Err(Error::data(
            path,
            format!(
                "truncated header: {} bytes, expected {}",
                4 + got,
                4 + 4 * rank
            ),
        ));
    }
    let dims: Vec<usize> = dims_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    if dims.contains(&0) {
        return Err(Error::data(path, format!("a dimension is zero: {dims:?}")));
    }
    let record: u64 = dims[1..].iter().map(|&d| d as u64).product();
    let claimed = record.saturating_mul(dims[0] as u64);
    if claimed > MAX_IDX_BYTES {
        return Err(Error::data(
            path,
            format!(
                "its header claims dimensions {dims:?} ({claimed} bytes), more than the {} GiB this mlops reads from one file",
                MAX_IDX_BYTES >> 30
            ),
        ));
    }
    let header = 4 + 4 * rank as u64;
    if let (false, Some(len)) = (gzip, file_len) {
        // A raw file's length is known: a mismatch is found before any allocation.
        let body = len - header.min(len);
        if body != claimed {
            return Err(Error::data(path, length_problem(&dims, claimed, body)));
        }
    }
    let records = limit.map_or(dims[0], |n| n.min(dims[0]));
    let wanted = record * records as u64;
    let mut values = Vec::with_capacity(wanted.min(64 << 20) as usize);
    // One byte past what is needed tells "trailing bytes" from an exact fit without
    // inflating the rest of a stream.
    let check_trailing = records == dims[0];
    let take = wanted + u64::from(check_trailing);
    reader
        .by_ref()
        .take(take)
        .read_to_end(&mut values)
        .map_err(io)?;
    let got = values.len() as u64;
    if got < wanted {
        return Err(Error::data(
            path,
            if records < dims[0] {
                format!(
                    "truncated for dimensions {dims:?}: the first {records} records need {wanted} data bytes, found {got}"
                )
            } else {
                length_problem(&dims, claimed, got)
            },
        ));
    }
    if check_trailing && got > wanted {
        return Err(Error::data(
            path,
            format!(
                "trailing bytes for dimensions {dims:?}: expected {claimed} data bytes, found more"
            ),
        ));
    }
    let mut dims = dims;
    dims[0] = records;
    Ok(IdxArray { dims, values })
}

/// Reads until `buf` is full or the stream ends; the count read.
fn read_up_to(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn length_problem(dims: &[usize], expected: u64, found: u64) -> String {
    format!(
        "{} for dimensions {dims:?}: expected {expected} data bytes, found {found}",
        if found < expected {
            "truncated"
        } else {
            "trailing bytes"
        }
    )
}

/// Checks the 4-byte magic; the rank it declares.
fn check_magic(bytes: &[u8; 4]) -> std::result::Result<usize, String> {
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
    Ok(rank)
}

/// Parses IDX bytes (a whole uncompressed file) held in memory.
///
/// # Errors
/// A message saying what was expected and what was found: fewer than 4 bytes, a wrong
/// magic number, element type or rank, a truncated header, a zero dimension, dimensions
/// whose product overflows, or a body of the wrong length.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "not an IDX file: {} bytes, expected at least a 4-byte header",
            bytes.len()
        ));
    }
    let rank = check_magic(&[bytes[0], bytes[1], bytes[2], bytes[3]])?;
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

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Issue 10: a small `.gz` whose header claims 1 image but which inflates much further
    /// was inflated whole before being refused; now reading stops one byte past the claim.
    #[test]
    fn a_gzip_that_inflates_past_its_header_is_refused_early() {
        let mut body = encode_idx(&[1, 28, 28], &[7; 784]);
        body.resize(body.len() + (64 << 20), 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb-idx3-ubyte.gz");
        std::fs::write(&path, gzip(&body)).unwrap();
        let started = std::time::Instant::now();
        let err = read_idx(&path).unwrap_err().to_string();
        assert!(err.contains("trailing bytes"), "{err}");
        // Inflating 64 MiB takes a while; stopping at byte 785 does not.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// `--limit` reads only the records it needs (and the header's claim is checked
    /// against the limit, not inflated whole).
    #[test]
    fn a_limit_reads_only_the_first_records() {
        let values: Vec<u8> = (0..1000u32 * 4).map(|i| (i % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("raw-idx2-ubyte", encode_idx(&[1000, 4], &values)),
            ("gz-idx2-ubyte.gz", gzip(&encode_idx(&[1000, 4], &values))),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let a = read_idx_limited(&path, Some(3)).unwrap();
            assert_eq!(a.dims, vec![3, 4]);
            assert_eq!(a.values, values[..12].to_vec());
        }
    }

    /// A header claiming more than the documented limit is refused before reading on.
    #[test]
    fn a_header_past_the_size_limit_is_refused() {
        let mut header = vec![0, 0, 8, 3];
        for d in [u32::MAX, 1000, 1000] {
            header.extend_from_slice(&d.to_be_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge-idx3-ubyte.gz");
        std::fs::write(&path, gzip(&header)).unwrap();
        let err = read_idx(&path).unwrap_err().to_string();
        assert!(err.contains("GiB this mlops reads"), "{err}");
    }

    #[test]
    fn truncated_body_is_rejected() {
        let bytes = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let err = parse_idx(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(err.contains("expected 6"), "{err}");
    }
}
