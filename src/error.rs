//! The one library error type: each variant carries what a user needs to act on it.
//!
//! Commands add context with `anyhow`; `main.rs` maps these kinds to exit codes and
//! hints, so a variant exists wherever a caller (or a test) needs to tell kinds apart.

use std::path::PathBuf;

/// Result with the library's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === Input data ===
    /// A data file could not be read or did not hold what its name promised.
    #[error("`{path}`: {problem}")]
    Data {
        /// The offending file or folder.
        path: PathBuf,
        /// What was wrong, and what was expected.
        problem: String,
    },

    // === Model spec ===
    /// A model spec that cannot be built; names the layer so the user can find it.
    #[error("model spec: layer {index} ({kind}): {problem}")]
    SpecLayer {
        /// Zero-based index in `layers`.
        index: usize,
        /// The layer's `type`.
        kind: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A model spec that is wrong as a whole (input shape, classes, YAML syntax).
    #[error("model spec: {0}")]
    Spec(String),

    // === Artifacts and checkpoints ===
    /// An artifact or checkpoint file that cannot be used.
    #[error("`{path}`: {problem}")]
    Artifact {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    // === Configuration and devices ===
    /// A setting that cannot work (bad value, missing checkpoint, device not built in).
    #[error("{0}")]
    Config(String),

    // === I/O ===
    /// A file system operation failed.
    #[error("cannot {action} `{path}`")]
    Io {
        /// What we tried (read, write, create folder ...).
        action: &'static str,
        /// The path it was tried on.
        path: PathBuf,
        /// Why the operating system said no.
        #[source]
        source: std::io::Error,
    },

    /// A network operation of the server failed (bind, accept).
    #[error("cannot {action} {addr}")]
    Network {
        /// What we tried (listen on, serve on ...).
        action: &'static str,
        /// The address.
        addr: String,
        /// Why the operating system said no.
        #[source]
        source: std::io::Error,
    },

    // === Numerics ===
    /// A tensor operation failed in candle (reference path and CUDA device).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for a [`Error::Data`] error.
    pub fn data(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            problem: problem.into(),
        }
    }

    /// Shorthand for an [`Error::Artifact`] error.
    pub fn artifact(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Artifact {
            path: path.into(),
            problem: problem.into(),
        }
    }

    /// Wraps an I/O error with the action and path it happened on.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A hint for the user, where one follows from the kind of error alone (most hints
    /// depend on which flag was given, and are added where it is read).
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Network { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
                Some(
                    "another process listens there: pick another `--port` (0 picks a free one)"
                        .into(),
                )
            }
            Error::SpecLayer { .. } | Error::Spec(_) => {
                Some("see `examples/models/cnn.yaml` for a valid spec".into())
            }
            _ => None,
        }
    }
}
