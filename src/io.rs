//! File identity and safe writes, shared by every stage: a file's record (path, bytes,
//! sha256), hashes, atomic writes and the version stamped on everything written.
//!
//! A leaf module (it uses nothing else of the crate but the error type), so artifacts,
//! reports and data sets can all depend on it without depending on each other.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The crate version, stamped on every report and artifact.
pub const MLOPS_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A file a step read or wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// As given on the command line (or as written).
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex sha256 of the content.
    pub sha256: String,
}

impl FileRecord {
    /// Hashes a file on disk, streaming (a data file is never held in memory for this).
    ///
    /// # Errors
    /// [`Error::Io`] (`read`) when the file cannot be opened or read.
    pub fn of(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io("read", path, e))?;
        let mut hasher = Sha256::new();
        let bytes =
            std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("read", path, e))?;
        Ok(FileRecord {
            path: path.display().to_string(),
            bytes,
            sha256: hex(&hasher.finalize()),
        })
    }

    /// Describes bytes already in memory that live (or will live) at `path`.
    pub fn of_bytes(path: &Path, bytes: &[u8]) -> Self {
        FileRecord {
            path: path.display().to_string(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of a digest (how every sha256 in reports and metadata is written).
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to a temp file beside `path`, syncs it, then renames it over `path`.
///
/// # Errors
/// [`Error::Io`]: `write to folder` when `path`'s folder does not exist, `write` when
/// creating, writing, syncing or renaming the temp file fails (the temp file is removed
/// and `path` is left as it was).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            "write to folder",
            &dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "folder does not exist"),
        ));
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "artifact".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("write", path, e));
    }
    Ok(())
}

/// Writes one line to stderr for a long-running library task (the server's log), ignoring
/// failure: a closed stderr is no reason for a server to stop, and `eprintln!` would
/// panic there.
pub fn log_line(text: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// sha256 over several file records, for "the data set" as one fingerprint.
pub fn combined_sha256(files: &[FileRecord]) -> String {
    let joined: String = files.iter().map(|f| f.sha256.as_str()).collect();
    sha256_hex(joined.as_bytes())
}
