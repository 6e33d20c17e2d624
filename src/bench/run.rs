//! The bench stage as one library call: [`run`] times every artifact at every batch size
//! on a runtime and returns the [`BenchDoc`] (rows, machine, version) with the warnings a
//! reader needs; [`compare_baseline`] matches rows against an earlier document and gives
//! one regression gate per matched row. The CLI only loads files and renders.

use std::time::Instant;

use super::machine::{Machine, Usage};
use super::{measure, BenchConfig, BenchDoc, BenchRow, LatencyStats, GIT_COMMIT, UNSTABLE_CV};
use crate::artifact::Artifact;
use crate::data::{synthetic_batch, Split};
use crate::io::{FileRecord, MLOPS_VERSION};
use crate::nn::Plan;
use crate::progress::Progress;
use crate::report::Gate;
use crate::runtime::{evaluate, Runtime, Timing};
use crate::train::{Adam, Trainer};
use crate::{Error, Result};

/// One artifact to time, as loaded.
pub struct BenchInput {
    /// The path as given (rows name it).
    pub path: String,
    /// The artifact.
    pub artifact: Artifact,
    /// Its file.
    pub record: FileRecord,
    /// Reading and checking the file, in milliseconds (the engine's load is added).
    pub load_ms: f64,
}

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Batch sizes, each a row per artifact.
    pub batches: Vec<usize>,
    /// Time training updates (forward + backward + Adam, as `train` runs them) instead
    /// of inference.
    pub train: bool,
    /// Warm-up, iterations, duration, repeats.
    pub config: BenchConfig,
    /// Worker threads (recorded in rows).
    pub threads: usize,
}

impl BenchPlan {
    /// Checks what a user can get wrong: no batch sizes, a batch of 0 or past
    /// `MAX_BATCH`, zero threads ([`BenchConfig::from_seconds`] checks the timing).
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting.
    pub fn check(&self) -> Result<()> {
        if self.batches.is_empty() {
            return Err(Error::Config(
                "`--batch` needs at least one batch size".into(),
            ));
        }
        if let Some(bad) = self
            .batches
            .iter()
            .find(|&&b| b == 0 || b > crate::model::MAX_BATCH)
        {
            return Err(Error::Config(format!(
                "`--batch` {bad} is outside 1..={}",
                crate::model::MAX_BATCH
            )));
        }
        if self.threads == 0 || self.config.iters == 0 || self.config.repeats == 0 {
            return Err(Error::Config(
                "threads, `--iters` and `--repeats` must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Learning rate of the timed training updates (the value does not change their cost).
const BENCH_LEARNING_RATE: f32 = 1e-4;

/// Times every input at every batch size on `runtime`; with `eval`, also measures each
/// artifact's accuracy on it and times on its first images (else on synthetic pixels).
/// Returns the document and warnings (unstable rows, synthetic inputs).
///
/// # Errors
/// A training batch past the memory limit, training on a runtime other than our CPU
/// kernels, an artifact that does not fit `eval`, a failed prediction.
pub fn run(
    inputs: &[BenchInput],
    plan: &BenchPlan,
    eval: Option<&Split>,
    runtime: &dyn Runtime,
    progress: &dyn Progress,
) -> Result<(BenchDoc, Vec<String>)> {
    plan.check()?;
    if plan.train && runtime.name() != "cpu" {
        return Err(Error::Config(format!(
            "`--train` times our CPU training step; training on `{}` is not built yet (the CUDA issue adds it)",
            runtime.name()
        )));
    }
    let mode = if plan.train { "train" } else { "infer" };
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut warnings = Vec::new();
    for input in inputs {
        let artifact = &input.artifact;
        if plan.train {
            for &batch in &plan.batches {
                artifact.spec.check_batch(batch)?;
            }
        }
        let load = Instant::now();
        let mut engine = runtime.load(artifact)?;
        let load_ms = input.load_ms + load.elapsed().as_secs_f64() * 1e3;
        let accuracy = match eval {
            Some(split) => {
                split.check_fits(artifact.spec.input, artifact.spec.classes)?;
                Some(evaluate(engine.as_mut(), split, 256)?.accuracy)
            }
            None => None,
        };
        let model = Plan::compile(&artifact.spec)?;
        for &batch in &plan.batches {
            progress.line(&format!(
                "bench {} ({}) {mode} batch {batch} ...",
                input.path, artifact.precision
            ));
            let x = match eval {
                Some(split) if split.count >= batch => {
                    let (mut x, mut labels) = (Vec::new(), Vec::new());
                    split.gather(
                        &(0..batch).collect::<Vec<_>>(),
                        &artifact.input.preprocess(),
                        &mut x,
                        &mut labels,
                    );
                    x
                }
                Some(split) => {
                    let note = format!(
                        "batch {batch} of `{}` timed on synthetic pixels: `--eval-data` has only {} images",
                        input.path, split.count
                    );
                    progress.line(&note);
                    warnings.push(note);
                    synthetic_batch(model.input_len, batch)
                }
                None => synthetic_batch(model.input_len, batch),
            };
            let before = Usage::now();
            let wall = Instant::now();
            let mut timing = None;
            let (cold_us, repeats) = if plan.train {
                let labels: Vec<u8> = (0..batch).map(|i| (i % model.classes) as u8).collect();
                let params = artifact.params_f32();
                let adam = Adam::new(&params);
                let mut trainer = Trainer::new(&model, params, adam, plan.threads);
                measure(&plan.config, || {
                    trainer.step(&x, &labels, 0, BENCH_LEARNING_RATE)?;
                    Ok(())
                })?
            } else {
                let mut logits = Vec::new();
                let (mut split, mut calls) = (Timing::default(), 0u32);
                let timed = measure(&plan.config, || {
                    engine.predict(&x, batch, &mut logits)?;
                    if let Some(t) = engine.timing() {
                        split.h2d_us += t.h2d_us;
                        split.compute_us += t.compute_us;
                        split.d2h_us += t.d2h_us;
                        calls += 1;
                    }
                    Ok(())
                })?;
                if calls > 0 {
                    let n = f64::from(calls);
                    timing = Some(Timing {
                        h2d_us: split.h2d_us / n,
                        compute_us: split.compute_us / n,
                        d2h_us: split.d2h_us / n,
                    });
                }
                timed
            };
            let wall_s = wall.elapsed().as_secs_f64();
            let after = Usage::now();
            let repeat_throughputs: Vec<f64> = repeats
                .iter()
                .map(|r| batch as f64 * r.len() as f64 / (r.iter().sum::<f64>() / 1e6))
                .collect();
            let samples: Vec<f64> = repeats.into_iter().flatten().collect();
            let latency = LatencyStats::of(&samples)
                .ok_or_else(|| Error::Config("no sample was timed; raise `--iters`".into()))?;
            let total_s: f64 = samples.iter().sum::<f64>() / 1e6;
            let throughput = batch as f64 * samples.len() as f64 / total_s;
            let first = rows
                .iter()
                .find(|r| r.batch == batch && r.mode == mode)
                .map(|r| (r.throughput_images_per_s, r.accuracy));
            rows.push(BenchRow {
                artifact: input.path.clone(),
                sha256: input.record.sha256.clone(),
                precision: artifact.precision.as_str().into(),
                compute: engine.compute(),
                device: runtime.name(),
                mode: mode.into(),
                batch,
                threads: plan.threads,
                latency_us: latency,
                throughput_images_per_s: throughput,
                cold_first_us: cold_us,
                load_ms,
                peak_rss_bytes: after.peak_rss_bytes,
                cpu_utilization: (after.cpu_s - before.cpu_s) / wall_s,
                speedup_vs_first: first.map_or(1.0, |(t, _)| throughput / t),
                accuracy,
                accuracy_drop: match (first.and_then(|(_, a)| a), accuracy) {
                    (Some(base), Some(a)) => Some(base - a),
                    _ => None,
                },
                baseline_throughput: None,
                change_vs_baseline: None,
                timing_us: timing,
                cv: latency.cv(),
                unstable: latency.cv() > UNSTABLE_CV,
                repeat_throughputs,
                samples_us: samples,
            });
        }
    }
    for row in rows.iter().filter(|r| r.unstable) {
        warnings.push(format!(
            "unstable: {} batch {} has a coefficient of variation of {:.0}% (over {:.0}%); the machine may be busy",
            row.artifact,
            row.batch,
            100.0 * row.cv,
            100.0 * UNSTABLE_CV
        ));
    }
    let doc = BenchDoc {
        mlops_version: MLOPS_VERSION.into(),
        git_commit: GIT_COMMIT.into(),
        machine: Machine::detect(),
        rows,
    };
    Ok((doc, warnings))
}

/// Fills each row's baseline columns from the matching row of `baseline` (same batch,
/// mode and device; the same file sha256, else the same file name) and returns one gate
/// per matched row (throughput may fall at most `max_regression`) and a warning per row
/// without a match.
pub fn compare_baseline(
    doc: &mut BenchDoc,
    baseline: &BenchDoc,
    max_regression: f64,
) -> (Vec<Gate>, Vec<String>) {
    let file_name = |p: &str| {
        std::path::Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
    };
    let (mut gates, mut warnings) = (Vec::new(), Vec::new());
    for row in doc.rows.iter_mut() {
        let same =
            |b: &&BenchRow| b.batch == row.batch && b.mode == row.mode && b.device == row.device;
        let matched = baseline
            .rows
            .iter()
            .filter(same)
            .find(|b| b.sha256 == row.sha256)
            .or_else(|| {
                baseline
                    .rows
                    .iter()
                    .filter(same)
                    .find(|b| file_name(&b.artifact) == file_name(&row.artifact))
            });
        let Some(base) = matched else {
            warnings.push(format!(
                "no baseline row for {} batch {} ({})",
                row.artifact, row.batch, row.mode
            ));
            continue;
        };
        let change = row.throughput_images_per_s / base.throughput_images_per_s - 1.0;
        row.baseline_throughput = Some(base.throughput_images_per_s);
        row.change_vs_baseline = Some(change);
        gates.push(Gate {
            name: format!(
                "max_regression {} batch {} {}",
                row.artifact, row.batch, row.mode
            ),
            threshold: -max_regression,
            value: change,
            passed: change >= -max_regression,
        });
    }
    (gates, warnings)
}

/// Reads a baseline for [`compare_baseline`]: a bench document (`mlops bench --format
/// json`), or the last bench step of a report file (`--report`, `mlops pipeline`).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; [`Error::Data`] when it is not JSON, holds
/// no bench document, or has another schema than this version writes.
pub fn read_baseline(path: &std::path::Path) -> Result<BenchDoc> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::data(path, format!("`--baseline` is not JSON: {e}")))?;
    let doc = if value.get("rows").is_some() {
        value
    } else {
        value["steps"]
            .as_array()
            .and_then(|steps| steps.iter().rev().find(|s| s["step"] == "bench"))
            .map(|s| s["metrics"].clone())
            .ok_or_else(|| {
                Error::data(
                    path,
                    "`--baseline` is not an mlops bench report (no `rows`, no bench step); \
                     make one with `mlops bench --format json`",
                )
            })?
    };
    serde_json::from_value(doc).map_err(|e| {
        Error::data(
            path,
            format!(
                "`--baseline` has another schema than this mlops {} writes ({e})",
                crate::io::MLOPS_VERSION
            ),
        )
    })
}
