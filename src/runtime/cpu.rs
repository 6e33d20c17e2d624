//! The CPU runtime: our own kernels (fp32 in-place fused convs, the int8 integer runtime,
//! the training executor's forward pass as the fallback), and the process-wide numerics
//! they need.
//!
//! Flush-to-zero / denormals-are-zero and the worker pool are properties of this runtime,
//! not of the CLI: [`CpuRuntime::new`] sets them up once per process, so a library caller
//! gets the same speed and the same bits as `mlops` (with subnormals left on, the first
//! epochs run ~10x slower and round differently; see `nn::denormals`).

use std::sync::OnceLock;

use super::{fp32, int8, Engine, Runtime};
use crate::artifact::{Artifact, LayerPrecision, Precision};
use crate::data::Preprocess;
use crate::device::Device;
use crate::nn::{Executor, Plan};
use crate::{Error, Result};

/// Threads of the process-wide worker pool, fixed by the first [`CpuRuntime::new`].
static POOL_THREADS: OnceLock<usize> = OnceLock::new();

/// Our CPU kernels, on a worker pool of `threads` (batch shards run in parallel).
#[derive(Debug, Clone, Copy)]
pub struct CpuRuntime {
    threads: usize,
}

impl CpuRuntime {
    /// The CPU runtime with `threads` workers (at least 1). The first call in a process
    /// builds the global rayon pool with flush-to-zero on every worker and on the calling
    /// thread; later calls reuse it (the pool can be built only once per process).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        POOL_THREADS.get_or_init(|| {
            // An error means another caller built the global pool first; we use it.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .start_handler(|_| crate::nn::denormals::flush_denormals_on_this_thread())
                .build_global();
            threads
        });
        crate::nn::denormals::flush_denormals_on_this_thread();
        CpuRuntime { threads }
    }

    /// Worker threads (batch shards).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The CPU engine for `artifact`, as its concrete type (serve and tests that want it).
    ///
    /// # Errors
    /// As [`Runtime::load`].
    pub fn engine(&self, artifact: &Artifact) -> Result<CpuEngine> {
        CpuEngine::new(artifact, self.threads)
    }
}

impl Runtime for CpuRuntime {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn check(&self) -> Result<()> {
        Ok(())
    }

    fn load(&self, artifact: &Artifact) -> Result<Box<dyn Engine>> {
        Ok(Box::new(self.engine(artifact)?))
    }

    fn load_params(
        &self,
        plan: &Plan,
        params: Vec<Vec<f32>>,
        preprocess: Preprocess,
    ) -> Result<Box<dyn Engine>> {
        let mut engine = CpuEngine::from_params(plan, params, self.threads)?;
        engine.preprocess = preprocess;
        Ok(Box::new(engine))
    }
}

/// A model loaded for our CPU kernels: int8 artifacts on the integer runtime, float ones
/// on the fp32 SIMD kernel where the CPU has one (AVX-512 or AVX2 + FMA), else on the
/// training executor's forward pass. All three agree with candle's forward pass (tests).
pub struct CpuEngine {
    kernels: Kernels,
    preprocess: Preprocess,
}

/// What computes, chosen once at load from the artifact and the CPU's features.
enum Kernels {
    /// fp32 (fp16 / bf16 widened at load) on the training executor's forward pass.
    Executor {
        executor: Executor,
        params: Vec<Vec<f32>>,
    },
    /// fp32 on an in-place SIMD inference kernel.
    Fp32(fp32::FloatModel),
    /// int8 artifacts: integer kernels.
    Int8(int8::Int8Model),
}

impl CpuEngine {
    /// Compiles the artifact for the CPU with `threads` batch shards.
    ///
    /// # Errors
    /// An int8 artifact whose layers the integer runtime cannot build.
    pub fn new(artifact: &Artifact, threads: usize) -> Result<Self> {
        if artifact.precision == Precision::Int8 {
            let model = int8::Int8Model::new(artifact, threads, int8::gemm::Kernel::detect())?;
            return Ok(CpuEngine {
                kernels: Kernels::Int8(model),
                preprocess: artifact.input.preprocess(),
            });
        }
        let mut engine = Self::from_params(
            &Plan::compile(&artifact.spec)?,
            artifact.params_f32(),
            threads,
        )?;
        engine.preprocess = artifact.input.preprocess();
        Ok(engine)
    }

    /// An engine over fp32 parameters already in memory (evaluation while training), fed
    /// [`Preprocess::UNIT`].
    ///
    /// # Errors
    /// Parameters that do not match the plan's tensors.
    pub fn from_params(plan: &Plan, params: Vec<Vec<f32>>, threads: usize) -> Result<Self> {
        if params.len() != plan.params.len()
            || params
                .iter()
                .zip(&plan.params)
                .any(|(p, info)| p.len() != info.len())
        {
            return Err(Error::Config(format!(
                "{} parameter tensors do not match the model's {}",
                params.len(),
                plan.params.len()
            )));
        }
        let kernels = match fp32::Kernel::detect() {
            Some(kernel) => Kernels::Fp32(fp32::FloatModel::new(plan, &params, threads, kernel)),
            None => Kernels::Executor {
                executor: Executor::new(plan, threads),
                params,
            },
        };
        Ok(CpuEngine {
            kernels,
            preprocess: Preprocess::UNIT,
        })
    }
}

impl Engine for CpuEngine {
    fn predict(&mut self, x: &[f32], batch: usize, logits: &mut Vec<f32>) -> Result<()> {
        super::check_input(self.plan(), x, batch)?;
        match &mut self.kernels {
            Kernels::Executor { executor, params } => executor.predict(params, x, batch, logits),
            Kernels::Fp32(model) => model.predict(x, batch, logits),
            Kernels::Int8(model) => model.predict(x, batch, logits),
        }
        Ok(())
    }

    fn plan(&self) -> &Plan {
        match &self.kernels {
            Kernels::Executor { executor, .. } => executor.plan(),
            Kernels::Fp32(model) => model.plan(),
            Kernels::Int8(model) => model.plan(),
        }
    }

    fn compute(&self) -> String {
        match &self.kernels {
            Kernels::Executor { .. } => "fp32".into(),
            Kernels::Fp32(model) => match model.winograd_layers() {
                (0, _) => format!("fp32 ({})", model.kernel().name()),
                (w, all) => format!(
                    "fp32 ({}; {w} of {all} layers winograd)",
                    model.kernel().name()
                ),
            },
            Kernels::Int8(model) => {
                let layers = model.layers();
                let count = |p: LayerPrecision| layers.iter().filter(|l| l.precision == p).count();
                let mut notes = vec![model.kernel().name().to_string()];
                for p in [LayerPrecision::Int8Dynamic, LayerPrecision::Fp32] {
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

    fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }
}
