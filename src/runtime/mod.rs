//! Running artifacts: a [`Session`] holds an artifact's plan and f32 weights and predicts.
//!
//! fp16 and bf16 artifacts are widened to f32 at load (as TFLite does for fp16 weights);
//! [`evaluate`] measures accuracy, loss, per-class accuracy and the confusion matrix.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fp32;
pub mod int8;
mod passes;
pub mod reference;

use std::time::Instant;

use serde::Serialize;

use crate::artifact::Artifact;
use crate::data::{Preprocess, Split};
use crate::nn::{softmax_cross_entropy, Executor, Plan};
use crate::{Error, Result};

/// A loaded model ready to predict on the CPU.
pub struct Session {
    engine: Engine,
    preprocess: Preprocess,
}

enum Engine {
    /// fp32 (fp16 / bf16 widened at load).
    Float {
        executor: Executor,
        params: Vec<Vec<f32>>,
    },
    /// fp32 on an in-place SIMD inference kernel (AVX-512 or AVX2, where the CPU has one).
    Direct(fp32::FloatModel),
    /// int8 artifacts: integer kernels.
    Int8(int8::Int8Model),
}

impl Session {
    /// Compiles the artifact for the CPU: int8 artifacts run in the integer runtime,
    /// float ones in fp32.
    pub fn new(artifact: &Artifact, threads: usize) -> Result<Self> {
        if artifact.precision == crate::artifact::Precision::Int8 {
            let model = int8::Int8Model::new(artifact, threads, int8::gemm::Kernel::detect())?;
            return Ok(Session {
                engine: Engine::Int8(model),
                preprocess: artifact.input.preprocess(),
            });
        }
        let mut session = Self::from_params(
            &Plan::compile(&artifact.spec)?,
            artifact.params_f32(),
            threads,
        )?;
        session.preprocess = artifact.input.preprocess();
        Ok(session)
    }

    /// The same session fed through `preprocess` (for a model made from parameters whose
    /// inputs are not [`Preprocess::UNIT`]).
    pub fn with_preprocess(mut self, preprocess: Preprocess) -> Self {
        self.preprocess = preprocess;
        self
    }

    /// How pixel bytes become this model's input ([`Preprocess::UNIT`] for a session made
    /// from parameters): what [`evaluate`] applies.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// A session over parameters already in memory (used while training).
    pub fn from_params(plan: &Plan, params: Vec<Vec<f32>>, threads: usize) -> Result<Self> {
        if let Some(kernel) = fp32::Kernel::detect() {
            return Ok(Session {
                engine: Engine::Direct(fp32::FloatModel::new(plan, &params, threads, kernel)),
                preprocess: Preprocess::UNIT,
            });
        }
        Ok(Session {
            engine: Engine::Float {
                executor: Executor::new(plan, threads),
                params,
            },
            preprocess: Preprocess::UNIT,
        })
    }

    /// The compiled plan.
    pub fn plan(&self) -> &Plan {
        match &self.engine {
            Engine::Float { executor, .. } => executor.plan(),
            Engine::Direct(model) => model.plan(),
            Engine::Int8(model) => model.plan(),
        }
    }

    /// What computes the conv and dense layers, for reports: `fp32` or `int8 (KERNEL)`.
    pub fn compute(&self) -> String {
        match &self.engine {
            Engine::Float { .. } => "fp32".into(),
            Engine::Direct(model) => format!("fp32 ({})", model.kernel().name()),
            Engine::Int8(model) => {
                let layers = model.layers();
                let count = |p: crate::artifact::LayerPrecision| {
                    layers.iter().filter(|l| l.precision == p).count()
                };
                let mut notes = vec![model.kernel().name().to_string()];
                for p in [
                    crate::artifact::LayerPrecision::Int8Dynamic,
                    crate::artifact::LayerPrecision::Fp32,
                ] {
                    if count(p) > 0 {
                        notes.push(format!(
                            "{} of {} layers {}",
                            count(p),
                            layers.len(),
                            p.as_str()
                        ));
                    }
                }
                format!("int8 ({})", notes.join("; "))
            }
        }
    }

    /// Logits `[batch, classes]` for `x` (`[batch, h, w, c]`, already scaled).
    pub fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) {
        match &mut self.engine {
            Engine::Float { executor, params } => executor.predict(params, x, batch, logits),
            Engine::Direct(model) => model.predict(x, batch, logits),
            Engine::Int8(model) => model.predict(x, batch, logits),
        }
    }
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Serialize)]
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

/// Runs the whole split through the session in batches of `batch_size`.
///
/// # Errors
/// [`Error::Config`] when the model's outputs are not finite on some image (weights or
/// inputs that overflow f32): such outputs are not an answer, and accuracy or loss
/// computed from them would be meaningless.
pub fn evaluate(session: &mut Session, split: &Split, batch_size: usize) -> Result<EvalReport> {
    let classes = session.plan().classes;
    let batch_size = batch_size.clamp(1, split.count.max(1));
    let mut confusion = vec![vec![0u64; classes]; classes];
    let (mut x, mut labels, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    let mut loss_sum = 0.0;
    let mut compute = 0.0;
    let indices: Vec<usize> = (0..split.count).collect();
    let preprocess = *session.preprocess();
    for chunk in indices.chunks(batch_size.max(1)) {
        split.gather(chunk, &preprocess, &mut x, &mut labels);
        let started = Instant::now();
        session.predict(&x, chunk.len(), &mut logits);
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
