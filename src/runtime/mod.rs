//! Running artifacts: one seam between what a command does and where it runs.
//!
//! A [`Runtime`] (after tract's `Runtime -> Runnable`) is a place models run: our CPU
//! kernels ([`cpu::CpuRuntime`]), or candle on a device ([`candle::CandleRuntime`]: the
//! CPU with `--engine candle`, a GPU with `--device cuda[:N]`). It checks it is
//! available and loads an artifact (or parameters in memory) into an [`Engine`], which
//! predicts, names what computes, synchronizes its device (after candle's
//! `synchronize`) and may split its time into copy-in / compute / copy-out.
//! [`select`] resolves `--device` and `--engine` in one place; no command has device
//! logic of its own. fp16 and bf16 artifacts are widened to f32 at load (as TFLite does
//! for fp16 weights); [`evaluate`] measures accuracy, loss, per-class accuracy and the
//! confusion matrix through any engine.

pub mod candle;
pub mod cpu;
pub mod fp32;
pub mod int8;
mod passes;
pub mod reference;
mod winograd;

use std::time::Instant;

use serde::Serialize;

pub use self::candle::{CandleEngine, CandleRuntime};
pub use self::cpu::{CpuEngine, CpuRuntime};
use crate::artifact::Artifact;
use crate::data::{Preprocess, Split};
use crate::device::Device;
use crate::nn::{softmax_cross_entropy, Plan};
use crate::{Error, Result};

/// A place models run: checks it is available and loads models into engines.
pub trait Runtime: Send + Sync {
    /// `cpu`, `cpu (candle)`, `cuda:0 (candle)`: what reports record as the device.
    fn name(&self) -> String;

    /// The device it computes on.
    fn device(&self) -> Device;

    /// Checks the device is there and usable.
    ///
    /// # Errors
    /// A device that is missing or not built in, with what to do.
    fn check(&self) -> Result<()>;

    /// Loads an artifact (its weights, its preprocessing).
    ///
    /// # Errors
    /// An artifact this runtime cannot run (int8 on candle), or a device error.
    fn load(&self, artifact: &Artifact) -> Result<Box<dyn Engine>>;

    /// Loads fp32 parameters in memory (spec order): evaluation while training.
    ///
    /// # Errors
    /// Parameters that do not match the plan, or a device error.
    fn load_params(
        &self,
        plan: &Plan,
        params: Vec<Vec<f32>>,
        preprocess: Preprocess,
    ) -> Result<Box<dyn Engine>>;
}

/// A model loaded on a runtime, ready to predict.
pub trait Engine: Send {
    /// Logits `[batch, classes]` into `logits` for `x`, `[batch, h, w, c]` (NHWC) already
    /// preprocessed ([`Engine::preprocess`]).
    ///
    /// # Errors
    /// `x` not holding `batch` images of the model's input shape; a device error.
    fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) -> Result<()>;

    /// The compiled plan (shapes, classes).
    fn plan(&self) -> &Plan;

    /// What computes the conv and dense layers, for reports: `fp32 (avx512)`,
    /// `fp32 (avx2; 1 of 5 layers winograd)`, `int8 (avx512-vnni)`,
    /// `fp32 (candle, cuda:0 (candle))`.
    fn compute(&self) -> String;

    /// How pixel bytes become this model's input (the artifact's `mlops.input`).
    fn preprocess(&self) -> &Preprocess;

    /// Waits for the device to finish queued work (a no-op on the CPU).
    ///
    /// # Errors
    /// A device error.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Where the last [`Engine::predict`] spent its time, for engines on a device.
    fn timing(&self) -> Option<Timing> {
        None
    }
}

/// Where the time of one prediction went, in microseconds (trtexec's split).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Timing {
    /// Host-to-device copy of the batch.
    pub h2d_us: f64,
    /// The forward pass on the device (synchronized).
    pub compute_us: f64,
    /// Device-to-host copy of the logits.
    pub d2h_us: f64,
}

/// Which code runs the model on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Our own kernels on the CPU; candle on CUDA (the only engine there).
    #[default]
    Native,
    /// candle's tensor ops (on the CPU: the code a GPU runs, for tests and comparison).
    Candle,
}

/// The runtime for `device` and `engine`, checked: the one place `--device` and
/// `--engine` are resolved.
///
/// # Errors
/// A CUDA device in a build without the `cuda` feature or not present.
pub fn select(device: Device, engine: EngineKind, threads: usize) -> Result<Box<dyn Runtime>> {
    let runtime: Box<dyn Runtime> = match (device, engine) {
        (Device::Cpu, EngineKind::Native) => Box::new(CpuRuntime::new(threads)),
        (Device::Cpu, EngineKind::Candle) => Box::new(CandleRuntime::cpu()),
        (Device::Cuda(n), _) => Box::new(CandleRuntime::cuda(n)?),
    };
    runtime.check()?;
    Ok(runtime)
}

/// The runtimes this build and machine can run, for conformance tests: the CPU kernels,
/// candle on the CPU, and candle on CUDA device 0 when it is built in and present.
pub fn available(threads: usize) -> Vec<Box<dyn Runtime>> {
    let mut all: Vec<Box<dyn Runtime>> = vec![
        Box::new(CpuRuntime::new(threads)),
        Box::new(CandleRuntime::cpu()),
    ];
    if let Ok(cuda) = select(Device::Cuda(0), EngineKind::Native, threads) {
        all.push(cuda);
    }
    all
}

/// Checks `x` holds `batch` images of the plan's input.
fn check_input(plan: &Plan, x: &[f32], batch: usize) -> Result<()> {
    if batch.checked_mul(plan.input_len) != Some(x.len()) {
        return Err(Error::Config(format!(
            "the input holds {} values, not {batch} images of {:?} ({} values each)",
            x.len(),
            plan.spec.input,
            plan.input_len
        )));
    }
    Ok(())
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EvalReport {
    /// Top-1 accuracy in `[0, 1]`.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Images evaluated.
    pub images: usize,
    /// Accuracy per true class (NaN-free: a class with no image gets `null`).
    pub per_class_accuracy: Vec<Option<f64>>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Images per second of the forward passes (data preparation excluded).
    pub images_per_s: f64,
}

/// What `mlops eval` reports (its `metrics`): the evaluation, and what ran it on what.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EvalSummary {
    /// The figures.
    #[serde(flatten)]
    pub report: EvalReport,
    /// The artifact's precision.
    pub precision: crate::artifact::Precision,
    /// What computed it ([`Engine::compute`]).
    pub compute: String,
    /// The data folder as given.
    pub data: String,
}

/// For people: accuracy, loss and speed, then the confusion matrix with per-class accuracy.
impl std::fmt::Display for EvalSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let report = &self.report;
        let classes = report.confusion.len();
        let mut header = vec!["true\\pred".to_string()];
        header.extend((0..classes).map(|c| c.to_string()));
        header.push("acc".into());
        let mut table = crate::report::table::Table::new(header);
        for (c, row) in report.confusion.iter().enumerate() {
            let mut cells = vec![c.to_string()];
            cells.extend(row.iter().map(u64::to_string));
            cells.push(
                report.per_class_accuracy[c].map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
            );
            table.row(cells);
        }
        writeln!(
            f,
            "({}): accuracy {:.2}%, loss {:.4} on {} images ({:.0} images/s)\n",
            self.precision,
            100.0 * report.accuracy,
            report.loss,
            report.images,
            report.images_per_s
        )?;
        write!(f, "{table}")
    }
}

/// Runs the whole split through the engine in batches of `batch_size`, each image
/// through the engine's own preprocessing (the artifact's `mlops.input`).
///
/// # Errors
/// [`Error::Config`] when the model's outputs are not finite on some image (weights or
/// inputs that overflow f32): such outputs are not an answer, and accuracy or loss
/// computed from them would be meaningless.
pub fn evaluate(engine: &mut dyn Engine, split: &Split, batch_size: usize) -> Result<EvalReport> {
    let classes = engine.plan().classes;
    let batch_size = batch_size.clamp(1, split.count.max(1));
    let mut confusion = vec![vec![0u64; classes]; classes];
    let (mut x, mut labels, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    let mut loss_sum = 0.0;
    let mut compute = 0.0;
    let indices: Vec<usize> = (0..split.count).collect();
    let preprocess = *engine.preprocess();
    for chunk in indices.chunks(batch_size.max(1)) {
        split.gather(chunk, &preprocess, &mut x, &mut labels);
        let started = Instant::now();
        engine.predict(&x, chunk.len(), &mut logits)?;
        compute += started.elapsed().as_secs_f64();
        if let Some(bad) = logits.iter().position(|v| !v.is_finite()) {
            let first = chunk[bad / classes];
            let count = logits
                .chunks_exact(classes)
                .filter(|row| row.iter().any(|v| !v.is_finite()))
                .count();
            return Err(Error::Config(format!(
                "the model's outputs are not finite on {count} of {} images in a batch (first: image {first}); its weights or inputs overflow f32",
                chunk.len()
            )));
        }
        loss_sum += softmax_cross_entropy(&logits, &labels, classes, chunk.len(), None).0;
        for (row, &label) in logits.chunks_exact(classes).zip(&labels) {
            let predicted = argmax(row);
            if (label as usize) < classes {
                confusion[label as usize][predicted] += 1;
            }
        }
    }
    if !loss_sum.is_finite() {
        return Err(Error::Config(format!(
            "the model's loss is not finite on {} images: its outputs are too large for f32 arithmetic (weights or inputs out of range)",
            split.count
        )));
    }
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: u64 = row.iter().sum();
            (total > 0).then(|| row[c] as f64 / total as f64)
        })
        .collect();
    let images = split.count;
    Ok(EvalReport {
        accuracy: if images > 0 {
            correct as f64 / images as f64
        } else {
            0.0
        },
        loss: if images > 0 {
            loss_sum / images as f64
        } else {
            0.0
        },
        images,
        per_class_accuracy,
        confusion,
        images_per_s: if compute > 0.0 {
            images as f64 / compute
        } else {
            0.0
        },
    })
}

/// Index of the largest value (first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// The engine-conformance suite (tract's `test-rt` pattern): every runtime this build and
/// machine can run ([`available`]) gets the same checks, so a new device gets the whole
/// suite by being listed there.
#[cfg(test)]
mod conformance {
    use super::*;
    use crate::model::ModelSpec;

    fn artifact() -> Artifact {
        let spec = ModelSpec::reference_cnn();
        let plan = Plan::compile(&spec).unwrap();
        Artifact::from_params(&spec, &plan.init_params(7)).unwrap()
    }

    fn images(plan: &Plan, batch: usize) -> Vec<f32> {
        (0..batch * plan.input_len)
            .map(|i| ((i * 7919) % 255) as f32 / 255.0)
            .collect()
    }

    /// The training executor's forward pass, the reference every engine must match.
    fn reference_logits(artifact: &Artifact, x: &[f32], batch: usize) -> Vec<f32> {
        let plan = Plan::compile(&artifact.spec).unwrap();
        let mut logits = Vec::new();
        crate::nn::Executor::new(&plan, 1).predict(&artifact.params_f32(), x, batch, &mut logits);
        logits
    }

    #[test]
    fn every_runtime_matches_the_reference_forward_pass() {
        let artifact = artifact();
        for runtime in available(2) {
            let name = runtime.name();
            runtime.check().unwrap();
            let mut engine = runtime.load(&artifact).unwrap();
            assert_eq!(engine.plan().classes, 10, "{name}");
            assert!(!engine.compute().is_empty(), "{name}");
            assert_eq!(*engine.preprocess(), Preprocess::UNIT, "{name}");
            for batch in [1, 3, 64] {
                let x = images(engine.plan(), batch);
                let mut logits = Vec::new();
                engine.predict(&x, batch, &mut logits).unwrap();
                engine.sync().unwrap();
                let want = reference_logits(&artifact, &x, batch);
                assert_eq!(logits.len(), want.len(), "{name} batch {batch}");
                for (a, b) in logits.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{name} batch {batch}: {a} vs {b}"
                    );
                }
            }
            // Parameters in memory give the same engine as the artifact.
            let plan = Plan::compile(&artifact.spec).unwrap();
            let mut from_params = runtime
                .load_params(&plan, artifact.params_f32(), Preprocess::UNIT)
                .unwrap();
            let x = images(&plan, 2);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            engine.predict(&x, 2, &mut a).unwrap();
            from_params.predict(&x, 2, &mut b).unwrap();
            assert_eq!(a, b, "{name}");
        }
    }

    #[test]
    fn every_runtime_refuses_input_of_the_wrong_size() {
        let artifact = artifact();
        for runtime in available(1) {
            let mut engine = runtime.load(&artifact).unwrap();
            let mut logits = Vec::new();
            let err = engine.predict(&[0.0; 100], 1, &mut logits).unwrap_err();
            assert!(
                err.to_string().contains("not 1 images"),
                "{}: {err}",
                runtime.name()
            );
        }
    }

    /// `evaluate` runs through any engine and applies the artifact's preprocessing.
    #[test]
    fn every_runtime_evaluates_alike() {
        let mut artifact = artifact();
        artifact.input.mean = 0.5;
        artifact.input.std = 0.5;
        let split = Split {
            images: (0..16 * 784).map(|i| (i * 31 % 256) as u8).collect(),
            labels: (0..16).map(|i| i % 10).collect(),
            count: 16,
            shape: [28, 28, 1],
            files: Vec::new(),
        };
        let reports: Vec<(String, EvalReport)> = available(1)
            .into_iter()
            .map(|runtime| {
                let mut engine = runtime.load(&artifact).unwrap();
                assert_eq!(engine.preprocess().mean, 0.5);
                (
                    runtime.name(),
                    evaluate(engine.as_mut(), &split, 5).unwrap(),
                )
            })
            .collect();
        for (name, report) in &reports[1..] {
            assert_eq!(report.confusion, reports[0].1.confusion, "{name}");
            assert!((report.loss - reports[0].1.loss).abs() < 1e-4, "{name}");
        }
    }

    /// int8 artifacts run only on our integer runtime; candle says so.
    #[test]
    fn candle_refuses_int8_naming_the_runtime_that_runs_it() {
        let artifact = artifact();
        let calib = Split {
            images: (0..32 * 784).map(|i| (i * 7 % 256) as u8).collect(),
            labels: vec![0; 32],
            count: 32,
            shape: [28, 28, 1],
            files: Vec::new(),
        };
        let config = crate::quantize::QuantConfig {
            method: crate::quantize::CalibMethod::MinMax,
            samples: 32,
            seed: 0,
            per_tensor: false,
            dynamic: false,
            exclude: Vec::new(),
        };
        let (int8, _) = crate::quantize::quantize(&artifact, None, Some(&calib), &config).unwrap();
        let err = CandleRuntime::cpu().load(&int8).err().unwrap().to_string();
        assert!(err.contains("--engine native"), "{err}");
        CpuRuntime::new(1).load(&int8).unwrap();
    }

    /// `--device cuda` reaches the CUDA runtime's availability check: in a build without
    /// the feature it says how to build one; with it, it asks the driver.
    #[test]
    fn cuda_is_resolved_by_the_runtime() {
        let result = select(Device::Cuda(0), EngineKind::Native, 1);
        if cfg!(feature = "cuda") {
            if let Err(e) = result {
                assert!(e.to_string().contains("is not available"), "{e}");
            }
        } else {
            let err = result.err().unwrap().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
