//! fp32 inference on an NVIDIA GPU through candle (built with `--features cuda`).
//!
//! The weights are uploaded once ([`reference::Weights`]); each call copies the batch to
//! the device, runs candle's conv/pool/matmul kernels and copies the logits back, with the
//! three parts timed apart (the device is synchronized between them), which is what
//! `mlops bench --device cuda` has to report. int8 artifacts are refused: their runtime
//! is the CPU integer one, and dequantizing them here would not be int8 inference.
//!
//! Compiled but not yet run on a GPU (no session so far had one): the CLI does not
//! accept `--device cuda` until a GPU session has tested this (see issue 5).

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::reference::Weights;
use crate::artifact::{Artifact, Precision};
use crate::nn::Plan;
use crate::{Error, Result};

/// Where the time of the last call went, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Host-to-device copy of the batch.
    pub h2d_us: f64,
    /// The forward pass on the device (synchronized).
    pub compute_us: f64,
    /// Device-to-host copy of the logits.
    pub d2h_us: f64,
}

/// An fp32 (or fp16/bf16, widened) artifact resident on one GPU.
pub struct CudaModel {
    plan: Plan,
    device: Device,
    weights: Weights,
    /// The split of the last [`CudaModel::predict`] call.
    pub last: Timing,
}

impl CudaModel {
    /// Uploads `artifact` to GPU `ordinal`.
    pub fn new(artifact: &Artifact, ordinal: usize) -> Result<Self> {
        if artifact.precision == Precision::Int8 {
            return Err(Error::Config(
                "int8 artifacts run on the CPU integer runtime; benchmark the fp32/fp16/bf16 artifact on CUDA".into(),
            ));
        }
        let device = Device::new_cuda(ordinal)?;
        let plan = Plan::compile(&artifact.spec)?;
        let weights = Weights::upload(&artifact.spec, &artifact.params_f32(), &device)?;
        device.synchronize()?;
        Ok(CudaModel {
            plan,
            device,
            weights,
            last: Timing::default(),
        })
    }

    /// The compiled plan (shapes, classes).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Logits `[batch, classes]` for NHWC input `x` into `logits`; times the parts.
    pub fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) -> Result<()> {
        let [h, w, c] = self.plan.spec.input;
        let start = Instant::now();
        let xs = Tensor::from_slice(&x[..batch * h * w * c], (batch, h, w, c), &self.device)?;
        self.device.synchronize()?;
        let copied = Instant::now();
        let ys = self.weights.forward(&xs)?;
        self.device.synchronize()?;
        let computed = Instant::now();
        *logits = ys.flatten_all()?.to_vec1::<f32>()?;
        let done = Instant::now();
        let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
        self.last = Timing {
            h2d_us: us(start, copied),
            compute_us: us(copied, computed),
            d2h_us: us(computed, done),
        };
        Ok(())
    }
}
