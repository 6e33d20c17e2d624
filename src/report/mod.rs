//! The per-step report: what a command read, wrote and measured, as data.
//!
//! Commands build a [`StepReport`]; the CLI prints it as a table for people (stderr),
//! as JSON on stdout with `--json`, and appends it to a [`ReportFile`] with `--report`.
//! `mlops report` draws a report file as an HTML page or Markdown tables
//! ([`crate::render`], which reads the stages' typed reports; this module stays below
//! the stages, which use its tables and gates).

pub mod table;

use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use crate::io::{sha256_hex, FileRecord, MLOPS_VERSION};
use crate::{Error, Result};

/// A threshold a CI script asked for (`--min-accuracy`, ...), and whether it held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// The flag's name, e.g. `min_accuracy`.
    pub name: String,
    /// The threshold given.
    pub threshold: f64,
    /// The measured value it was compared with.
    pub value: f64,
    /// Whether the gate holds.
    pub passed: bool,
}

impl Gate {
    /// A lower bound: passes when `value >= threshold`.
    pub fn at_least(name: &str, threshold: f64, value: f64) -> Self {
        Gate {
            name: name.into(),
            threshold,
            value,
            passed: value >= threshold,
        }
    }

    /// An upper bound: passes when `value <= threshold` (`--max-accuracy-drop`).
    pub fn at_most(name: &str, threshold: f64, value: f64) -> Self {
        Gate {
            name: name.into(),
            threshold,
            value,
            passed: value <= threshold,
        }
    }
}

/// One step's report envelope; `metrics` holds the step's own figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    /// `train`, `eval`, `export`, `inspect`.
    pub step: String,
    /// RFC 3339 UTC start time.
    pub started_at: String,
    /// Wall time of the whole step.
    pub duration_s: f64,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Files read.
    pub inputs: Vec<FileRecord>,
    /// Files written.
    pub outputs: Vec<FileRecord>,
    /// The step's figures (accuracy, loss, images/s, ...).
    pub metrics: serde_json::Value,
    /// Gates asked for, with their outcome.
    pub gates: Vec<Gate>,
    /// Non-fatal problems worth a look.
    pub warnings: Vec<String>,
}

impl StepReport {
    /// Starts a report for `step`; fill it, then call [`StepReport::finish`].
    pub fn start(step: &str, device: &str) -> (Self, std::time::Instant) {
        (
            StepReport {
                step: step.into(),
                started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                duration_s: 0.0,
                device: device.into(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                metrics: serde_json::Value::Null,
                gates: Vec::new(),
                warnings: Vec::new(),
            },
            std::time::Instant::now(),
        )
    }

    /// Records the duration since `started`.
    pub fn finish(&mut self, started: std::time::Instant) {
        self.duration_s = started.elapsed().as_secs_f64();
    }

    /// True when every gate holds.
    pub fn gates_passed(&self) -> bool {
        self.gates.iter().all(|g| g.passed)
    }
}

/// A report file: every step appended to it, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportFile {
    /// Version of the mlops that wrote it last.
    pub mlops_version: String,
    /// Steps in the order they ran.
    pub steps: Vec<StepReport>,
}

impl ReportFile {
    /// An empty report.
    pub fn new() -> Self {
        ReportFile {
            mlops_version: MLOPS_VERSION.into(),
            steps: Vec::new(),
        }
    }

    /// Appends `step` to the report at `path` (creating it), rewriting it atomically.
    ///
    /// # Errors
    /// - [`Error::Io`] when an existing file cannot be read, or the report cannot be
    ///   written ([`ReportFile::save`]).
    /// - [`Error::Data`] naming `path` when an existing file is not an mlops report (it is
    ///   left untouched).
    pub fn append(path: &Path, step: &StepReport) -> Result<()> {
        let mut report = if path.exists() {
            Self::load(path, "choose another `--report` file")?
        } else {
            ReportFile::new()
        };
        report.mlops_version = MLOPS_VERSION.into();
        report.steps.push(step.clone());
        report.save(path)
    }

    /// Reads the report file at `path`; `advice` ends the error of a file that is not one.
    ///
    /// # Errors
    /// - [`Error::Io`] when the file cannot be read.
    /// - [`Error::Data`] naming `path` when it is not an mlops report file.
    pub fn load(path: &Path, advice: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        serde_json::from_str::<ReportFile>(&text)
            .map_err(|e| Error::data(path, format!("not an mlops report ({e}); {advice}")))
    }

    /// Writes the report as pretty JSON (and a final newline), atomically.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written or its folder does not exist
    /// ([`crate::io::write_atomically`]).
    ///
    /// # Panics
    /// Never in practice: a report is strings, numbers, booleans and JSON values with
    /// string keys, which serde_json always serializes (non-finite numbers as `null`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).expect("reports serialize");
        text.push('\n');
        crate::io::write_atomically(path, text.as_bytes())
    }
}

impl Default for ReportFile {
    fn default() -> Self {
        Self::new()
    }
}
