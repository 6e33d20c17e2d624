//! End-to-end latency and throughput measurement of a loaded model (not criterion:
//! this is what `mlops bench` reports for whole artifacts, batch sizes and devices).
//!
//! One sample is one call: host batch in, logits out. [`measure`] warms up, then times
//! calls until the iteration count or duration is reached; [`LatencyStats`] summarizes
//! the samples with nearest-rank percentiles.

pub mod format;
pub mod machine;
mod run;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use run::{compare_baseline, read_baseline, run, BenchInput, BenchPlan};

use crate::Result;

/// How long to warm up and how long to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    /// Warm-up calls (at least this many).
    pub warmup_iters: usize,
    /// Keep warming up until this much time has passed too.
    pub warmup_time: Duration,
    /// Timed calls (at least this many).
    pub iters: usize,
    /// Keep timing until this much time has passed too (per repeat).
    pub duration: Duration,
    /// Timed rounds, each with its own `iters` / `duration` (spread between rounds).
    pub repeats: usize,
}

/// Longest warm-up or timing period accepted, in seconds.
pub const MAX_SECONDS: f64 = 3600.0;

impl BenchConfig {
    /// A config from counts and seconds as a user gives them (`--warmup`,
    /// `--warmup-secs`, `--iters`, `--duration`, `--repeats`).
    ///
    /// # Errors
    /// [`crate::Error::Config`] for zero `iters` or `repeats`, or seconds that are not a
    /// finite number in `[0, MAX_SECONDS]`.
    pub fn from_seconds(
        warmup_iters: usize,
        warmup_secs: f64,
        iters: usize,
        duration_secs: f64,
        repeats: usize,
    ) -> Result<Self> {
        let seconds = |flag: &str, value: f64| {
            if value.is_finite() && (0.0..=MAX_SECONDS).contains(&value) {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(crate::Error::Config(format!(
                    "`{flag}` must be 0 to {MAX_SECONDS} seconds, got {value}"
                )))
            }
        };
        if iters == 0 || repeats == 0 {
            return Err(crate::Error::Config(
                "`--iters` and `--repeats` must be at least 1".into(),
            ));
        }
        Ok(BenchConfig {
            warmup_iters,
            warmup_time: seconds("--warmup-secs", warmup_secs)?,
            iters,
            duration: seconds("--duration", duration_secs)?,
            repeats,
        })
    }
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            warmup_iters: 10,
            warmup_time: Duration::from_millis(200),
            iters: 20,
            duration: Duration::from_secs(1),
            repeats: 1,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Fastest call.
    pub min: f64,
    /// Mean call.
    pub mean: f64,
    /// Standard deviation (population).
    pub std: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest call.
    pub max: f64,
}

impl LatencyStats {
    /// Summarizes samples (microseconds); `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = sorted.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
        // Nearest rank: the smallest sample with at least p% of samples at or below it.
        let rank = |p: f64| sorted[((p / 100.0 * n).ceil() as usize).clamp(1, sorted.len()) - 1];
        Some(LatencyStats {
            min: sorted[0],
            mean,
            std: var.sqrt(),
            p50: rank(50.0),
            p90: rank(90.0),
            p95: rank(95.0),
            p99: rank(99.0),
            max: sorted[sorted.len() - 1],
        })
    }

    /// Coefficient of variation (std / mean): above ~0.1 the run is unstable.
    pub fn cv(&self) -> f64 {
        if self.mean > 0.0 {
            self.std / self.mean
        } else {
            0.0
        }
    }
}

/// Times `call` per `config`; returns the first (cold) call's time and the timed samples
/// of each repeat, all in microseconds. `call` must leave its device idle when it
/// returns (engines synchronize in `predict`), so the clock reads finished work.
///
/// # Errors
/// The first error `call` returns.
pub fn measure(
    config: &BenchConfig,
    mut call: impl FnMut() -> Result<()>,
) -> Result<(f64, Vec<Vec<f64>>)> {
    let cold = Instant::now();
    call()?;
    let cold_us = cold.elapsed().as_secs_f64() * 1e6;
    let warm = Instant::now();
    let mut done = 0;
    while done < config.warmup_iters || warm.elapsed() < config.warmup_time {
        call()?;
        done += 1;
    }
    let mut repeats = Vec::new();
    for _ in 0..config.repeats.max(1) {
        let mut samples = Vec::new();
        let timed = Instant::now();
        while samples.len() < config.iters || timed.elapsed() < config.duration {
            let t = Instant::now();
            call()?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        repeats.push(samples);
    }
    Ok((cold_us, repeats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = LatencyStats::of(&samples).unwrap();
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert!((s.mean - 50.5).abs() < 1e-12);
        let one = LatencyStats::of(&[7.0]).unwrap();
        assert_eq!((one.p50, one.p99, one.std), (7.0, 7.0, 0.0));
        assert!(LatencyStats::of(&[]).is_none());
    }

    #[test]
    fn measure_honours_iteration_count() {
        let config = BenchConfig {
            warmup_iters: 2,
            warmup_time: Duration::ZERO,
            iters: 5,
            duration: Duration::ZERO,
            repeats: 3,
        };
        let mut calls = 0;
        let (_, repeats) = measure(&config, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(repeats.len(), 3);
        assert!(repeats.iter().all(|r| r.len() == 5));
        assert_eq!(calls, 1 + 2 + 3 * 5);
    }
}

/// The commit this binary was built from (`-dirty` when it had local changes).
pub const GIT_COMMIT: &str = env!("MLOPS_GIT_COMMIT");

/// Coefficient of variation above which a row is flagged unstable (as trtexec warns).
pub const UNSTABLE_CV: f64 = 0.10;

/// One artifact x batch size x mode measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// Artifact path as given.
    pub artifact: String,
    /// sha256 of the artifact file.
    pub sha256: String,
    /// `fp32`, `fp16`, `bf16`, `int8`.
    pub precision: String,
    /// What computed it: `fp32` or `int8 (avx512-vnni)` / `int8 (portable)`.
    #[serde(default)]
    pub compute: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `infer` (forward pass) or `train` (forward + backward + Adam update).
    pub mode: String,
    /// Images per call.
    pub batch: usize,
    /// Worker threads.
    pub threads: usize,
    /// Per-call latency.
    pub latency_us: LatencyStats,
    /// `batch * calls / total time`.
    pub throughput_images_per_s: f64,
    /// The first call after loading.
    pub cold_first_us: f64,
    /// Reading, checking and preparing the artifact.
    pub load_ms: f64,
    /// Peak resident memory of the process after this row.
    pub peak_rss_bytes: u64,
    /// CPU time / wall time while timing (2.0 = two cores busy).
    pub cpu_utilization: f64,
    /// Throughput relative to the first artifact's row at the same batch and mode.
    pub speedup_vs_first: f64,
    /// Top-1 accuracy on `--eval-data`, when given.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accuracy: Option<f64>,
    /// First artifact's accuracy minus this one's.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accuracy_drop: Option<f64>,
    /// Throughput of the matching row in `--baseline`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub baseline_throughput: Option<f64>,
    /// `throughput / baseline_throughput - 1`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub change_vs_baseline: Option<f64>,
    /// Mean split of a timed call into copy-in, compute and copy-out, for engines on a
    /// device (candle: `--engine candle`, `--device cuda`), as trtexec reports it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timing_us: Option<crate::runtime::Timing>,
    /// std / mean of the samples.
    pub cv: f64,
    /// `cv` above [`UNSTABLE_CV`].
    pub unstable: bool,
    /// Throughput of each repeat (`--repeats`), images/s.
    #[serde(default)]
    pub repeat_throughputs: Vec<f64>,
    /// Every timed call, in order (all repeats).
    pub samples_us: Vec<f64>,
}

/// The document `mlops bench --format json` prints and `--baseline` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchDoc {
    /// mlops version.
    pub mlops_version: String,
    /// Commit the binary was built from.
    pub git_commit: String,
    /// Where it ran.
    pub machine: machine::Machine,
    /// One row per artifact x batch x mode.
    pub rows: Vec<BenchRow>,
}
