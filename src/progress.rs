//! The progress callback the library calls during long work; the CLI draws it.
//!
//! The library never prints: it reports batches and lines through [`Progress`], and the
//! CLI decides whether that becomes an indicatif bar, plain lines, or nothing.

/// Receives progress from long-running library calls.
pub trait Progress: Sync {
    /// A new phase with `total` units of work (batches), e.g. `epoch 1/2`.
    fn start(&self, label: &str, total: u64);
    /// `done` units finished; `status` is a short live summary (loss, accuracy, images/s).
    fn update(&self, done: u64, status: &str);
    /// The phase is over.
    fn finish(&self);
    /// A line for people (an epoch summary), printed above any bar.
    fn line(&self, text: &str);
}

/// Progress that goes nowhere (tests, `--quiet`, library callers).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn update(&self, _: u64, _: &str) {}
    fn finish(&self) {}
    fn line(&self, _: &str) {}
}
