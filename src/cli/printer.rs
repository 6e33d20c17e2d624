//! Output for people and for CI: progress bars and tables on stderr, JSON on stdout.
//!
//! Bars are hidden when stderr is not a terminal, with `--quiet`, or when
//! `MLOPS_NO_PROGRESS` is set; nothing is coloured, so `NO_COLOR` always holds.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use mlops::progress::Progress;
use mlops::report::{ReportFile, StepReport};

/// Writes `text` to stderr, ignoring failure: a closed stderr (`mlops train 2>&1 | head`)
/// is no reason to stop a command, so nothing here may panic as `eprint!` does.
pub(crate) fn to_stderr(text: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(text);
}

/// `eprintln!` that never panics (see [`to_stderr`]).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::printer::to_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Renders reports and progress according to the user's flags and terminal.
pub(crate) struct Printer {
    quiet: bool,
    bars: bool,
}

impl Printer {
    pub(crate) fn new(quiet: bool) -> Self {
        let bars = !quiet
            && std::io::stderr().is_terminal()
            && std::env::var_os("MLOPS_NO_PROGRESS").is_none();
        Printer { quiet, bars }
    }

    /// A progress sink for library calls.
    pub(crate) fn progress(&self) -> BarProgress {
        BarProgress {
            enabled: self.bars,
            quiet: self.quiet,
            bar: Mutex::new(None),
        }
    }

    /// A line for people on stderr (unless quiet).
    pub(crate) fn note(&self, text: &str) {
        if !self.quiet {
            say!("{text}");
        }
    }

    /// Prints the human summary, the JSON (with `--json`) and appends to `--report`.
    pub(crate) fn report(
        &self,
        step: &StepReport,
        human: &str,
        output: &super::ReportArgs,
    ) -> anyhow::Result<()> {
        let (json, report_file) = (output.json, output.report.as_deref());
        if !self.quiet {
            to_stderr(format_args!("{human}"));
            for warning in &step.warnings {
                say!("warning: {warning}");
            }
            for gate in &step.gates {
                say!(
                    "gate {}: {} (value {:.4}, threshold {:.4})",
                    gate.name,
                    if gate.passed { "passed" } else { "FAILED" },
                    gate.value,
                    gate.threshold
                );
            }
        }
        if let Some(path) = report_file {
            ReportFile::append(path, step)?;
        }
        if let Some(path) = &output.html {
            super::report::step_html(step, path, self)?;
        }
        if json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, step)?;
            writeln!(out)?;
        }
        Ok(())
    }
}

/// An indicatif bar behind the library's [`Progress`] trait.
pub(crate) struct BarProgress {
    enabled: bool,
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for BarProgress {
    fn start(&self, label: &str, total: u64) {
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        *self.bar.lock().expect("bar lock") = Some(bar);
    }

    fn update(&self, done: u64, status: &str) {
        if let Some(bar) = self.bar.lock().expect("bar lock").as_ref() {
            bar.set_position(done);
            bar.set_message(status.to_string());
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("bar lock").take() {
            bar.finish_and_clear();
        }
    }

    fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match self.bar.lock().expect("bar lock").as_ref() {
            Some(bar) => bar.println(text),
            None => say!("{text}"),
        }
    }
}

impl Printer {
    /// True with `--quiet`.
    pub(crate) fn is_quiet(&self) -> bool {
        self.quiet
    }
}
