//! The candle engine: the model's forward pass as candle tensor ops on any candle device.
//!
//! On CUDA (`--device cuda[:N]`, built with `--features cuda`) it is how mlops runs on a
//! GPU; on the CPU (`--engine candle`) it runs exactly the same code, which is how CI, with
//! no GPU, exercises everything but candle's own CUDA kernels. The weights are uploaded
//! once ([`super::reference::Weights`]); each call copies the batch to the device, runs candle's
//! conv/pool/matmul and copies the logits back, with the three parts timed apart (the
//! device is synchronized between them: the `h2d_us` / `compute_us` / `d2h_us` split that
//! `mlops bench` reports, as trtexec does). int8 artifacts are refused: their runtime is
//! the CPU integer one, and dequantizing them here would not be int8 inference.

use std::time::Instant;

use candle_core::Tensor;

use super::reference::Weights;
use super::{Engine, Runtime, Timing};
use crate::artifact::{Artifact, Precision};
use crate::data::Preprocess;
use crate::device::Device;
use crate::nn::Plan;
use crate::{Error, Result};

/// Candle on one device: [`candle_core::Device::Cpu`] for `--engine candle`, a CUDA
/// device for `--device cuda[:N]`.
#[derive(Debug, Clone)]
pub struct CandleRuntime {
    device: Device,
    candle: candle_core::Device,
}

impl CandleRuntime {
    /// The candle device models run on (what candle training uses too).
    pub fn candle_device(&self) -> &candle_core::Device {
        &self.candle
    }

    /// Candle on the CPU (available in every build).
    pub fn cpu() -> Self {
        CandleRuntime {
            device: Device::Cpu,
            candle: candle_core::Device::Cpu,
        }
    }

    /// Candle on CUDA device `ordinal`.
    ///
    /// # Errors
    /// A build without the `cuda` feature, or no such device (no driver, no GPU, an
    /// ordinal past the last GPU): candle's error, with what to do.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        if !cfg!(feature = "cuda") {
            return Err(Error::Config(format!(
                "`--device cuda:{ordinal}` needs a build with the `cuda` feature: \
                 `cargo build --release --features cuda` (a CUDA 12+ toolkit on the build machine, \
                 or `../shared/cuda/RECIPE.sh`)"
            )));
        }
        let candle = candle_core::Device::new_cuda(ordinal).map_err(|e| {
            Error::Config(format!(
                "`--device cuda:{ordinal}` is not available: {e}; check `nvidia-smi` lists GPU {ordinal}"
            ))
        })?;
        Ok(CandleRuntime {
            device: Device::Cuda(ordinal),
            candle,
        })
    }
}

impl Runtime for CandleRuntime {
    fn name(&self) -> String {
        format!("{} (candle)", self.device)
    }

    fn device(&self) -> Device {
        self.device
    }

    fn check(&self) -> Result<()> {
        self.candle.synchronize().map_err(Error::from)
    }

    fn load(&self, artifact: &Artifact) -> Result<Box<dyn Engine>> {
        if artifact.precision == Precision::Int8 {
            return Err(Error::Config(
                "int8 artifacts run on the CPU integer runtime (`--engine native`); run the fp32/fp16/bf16 artifact on candle".into(),
            ));
        }
        let plan = Plan::compile(&artifact.spec)?;
        let engine = CandleEngine::new(
            plan,
            &artifact.params_f32(),
            artifact.input.preprocess(),
            self,
        )?;
        Ok(Box::new(engine))
    }

    fn load_params(
        &self,
        plan: &Plan,
        params: Vec<Vec<f32>>,
        preprocess: Preprocess,
    ) -> Result<Box<dyn Engine>> {
        Ok(Box::new(CandleEngine::new(
            plan.clone(),
            &params,
            preprocess,
            self,
        )?))
    }
}

/// A model resident on a candle device.
pub struct CandleEngine {
    plan: Plan,
    device: candle_core::Device,
    name: String,
    weights: Weights,
    preprocess: Preprocess,
    last: Timing,
}

impl CandleEngine {
    fn new(
        plan: Plan,
        params: &[Vec<f32>],
        preprocess: Preprocess,
        runtime: &CandleRuntime,
    ) -> Result<Self> {
        let weights = Weights::upload(&plan.spec, params, &runtime.candle)?;
        runtime.candle.synchronize()?;
        Ok(CandleEngine {
            plan,
            device: runtime.candle.clone(),
            name: runtime.name(),
            weights,
            preprocess,
            last: Timing::default(),
        })
    }
}

impl Engine for CandleEngine {
    fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) -> Result<()> {
        super::check_input(&self.plan, x, batch)?;
        let [h, w, c] = self.plan.spec.input;
        let start = Instant::now();
        let xs = Tensor::from_slice(x, (batch, h, w, c), &self.device)?;
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

    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn compute(&self) -> String {
        format!("fp32 (candle, {})", self.name)
    }

    fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    fn sync(&self) -> Result<()> {
        self.device.synchronize().map_err(Error::from)
    }

    fn timing(&self) -> Option<Timing> {
        Some(self.last)
    }
}
