//! Training: minibatch Adam on softmax cross-entropy, one epoch at a time.
//!
//! [`fit`] shuffles with a seeded ChaCha8 stream per epoch, runs the CPU executor, evaluates
//! on the test split after each epoch and hands a [`Checkpoint`] to the caller, who saves
//! it. Everything random derives from the seed, so the same seed, data and thread count
//! give bit-identical weights, and a resumed run equals an uninterrupted one.

use std::collections::BTreeMap;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

mod candle;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod parallel;
pub mod tcp;

pub use crate::artifact::checkpoint::{Checkpoint, CheckpointState};
pub use crate::nn::adam::Adam;
pub use candle::{CandleTrainer, LossScaler, Precision};

use crate::data::{Dataset, Preprocess};
use crate::io::combined_sha256;
use crate::model::ModelSpec;
use crate::nn::{Executor, Plan};
use crate::progress::Progress;
use crate::runtime::{evaluate, CpuRuntime, EvalReport, Runtime as _};
use crate::{Error, Result};

/// Epochs of a default run on a data set as large as MNIST's 60,000 images.
pub const DEFAULT_EPOCHS: usize = 2;

/// Optimizer updates a default run makes at least (raising the epochs on small data):
/// with 1,500 images, 2 epochs are 48 updates and leave the reference CNN near 33%
/// accuracy, while ~1,000 reach the mid-90s (issue 10).
pub const MIN_UPDATES: usize = 1000;

/// Most epochs a default run chooses (a data set of a few images does not train forever).
pub const MAX_DEFAULT_EPOCHS: usize = 200;

/// The default epochs for `steps_per_epoch` updates per epoch: [`DEFAULT_EPOCHS`], or
/// enough for [`MIN_UPDATES`] (at most [`MAX_DEFAULT_EPOCHS`]).
pub fn default_epochs(steps_per_epoch: usize) -> usize {
    MIN_UPDATES
        .div_ceil(steps_per_epoch.max(1))
        .clamp(DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS)
}

/// How the learning rate moves over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The same rate throughout (Keras' default).
    Constant,
    /// Half-cosine from the rate down to zero over all planned steps.
    Cosine,
}

/// What computes the training updates.
#[derive(Debug, Clone, Default)]
pub enum TrainEngine {
    /// Our CPU kernels ([`Executor`]): the default, bit-reproducible run to run.
    #[default]
    Native,
    /// candle's autograd on a candle device: `--engine candle` on the CPU (what CI runs),
    /// a CUDA device for `--device cuda[:N]` ([`CandleTrainer`]).
    Candle(candle_core::Device),
    /// Data parallel over several candle devices in this process (`--devices`): one rank
    /// per device, gradients summed by NCCL on GPUs or in process on the CPU
    /// ([`parallel::DeviceGroup`]).
    DataParallel {
        /// The ranks' devices, rank order.
        devices: Vec<candle_core::Device>,
        /// How the command line named them (`cuda:0`, `cpu`): for reports and lineage.
        names: Vec<String>,
    },
    /// This process as one rank of a multi-process data-parallel run (`WORLD_SIZE`,
    /// `RANK`, `MASTER_ADDR`, `MASTER_PORT` as torchrun and Slurm wrappers set them): its
    /// ranks meet at rank 0's address ([`tcp::TcpGroup`]) and sum gradients over TCP on the
    /// CPU, with NCCL on GPUs.
    Process {
        /// This rank's device.
        device: candle_core::Device,
        /// How the command line named it.
        name: String,
        /// This rank and the number of ranks.
        world: parallel::WorldEnv,
        /// `MASTER_ADDR` and `MASTER_PORT`.
        master: (String, u16),
        /// What every rank must agree on before training (set by [`fit`] from the model,
        /// settings and starting state; see [`parallel::check_same_everywhere`]).
        agreement: String,
    },
}

impl TrainEngine {
    /// The engine `--devices` asks for: a rank per listed device, all CPU (candle's CPU
    /// backend, ranks summed in process: how CI tests multi-GPU training) or all CUDA
    /// (NCCL: a build with the `nccl` feature). One device makes a group of one rank (the
    /// NCCL path on a one-GPU machine; the same training as `--device`).
    ///
    /// # Errors
    /// [`Error::Config`] for no device, a mix of CPU and CUDA, a GPU listed
    /// twice, CUDA in a build without the `nccl` feature, or a GPU that is not there.
    pub fn select_devices(devices: &[crate::device::Device]) -> Result<Self> {
        use crate::device::Device;
        if devices.is_empty() {
            return Err(Error::Config(
                "`--devices` lists no device; name one or more (`cuda:0,cuda:1`)".into(),
            ));
        }
        let cuda = devices
            .iter()
            .filter(|d| matches!(d, Device::Cuda(_)))
            .count();
        if cuda != 0 && cuda != devices.len() {
            return Err(Error::Config(
                "`--devices` mixes cpu and cuda; list only GPUs (`cuda:0,cuda:1`) or only CPU ranks (`cpu,cpu`)".into(),
            ));
        }
        let mut seen = Vec::new();
        for device in devices {
            if let Device::Cuda(n) = device {
                if seen.contains(n) {
                    return Err(Error::Config(format!(
                        "`--devices` lists cuda:{n} twice; NCCL runs one rank per GPU"
                    )));
                }
                seen.push(*n);
            }
        }
        if cuda > 0 && !cfg!(feature = "nccl") {
            return Err(Error::Config(
                "multi-GPU training (`--devices cuda:0,cuda:1`) sums gradients with NCCL: use a build with `--features nccl` (`scripts/build-cuda.sh` makes one)".into(),
            ));
        }
        let mut candle_devices = Vec::with_capacity(devices.len());
        for device in devices {
            candle_devices.push(match device {
                Device::Cpu => candle_core::Device::Cpu,
                Device::Cuda(n) => cuda_device(*n)?,
            });
        }
        Ok(TrainEngine::DataParallel {
            devices: candle_devices,
            names: devices.iter().map(ToString::to_string).collect(),
        })
    }

    /// `self` (candle on one device) as rank `world.rank` of a multi-process run meeting at
    /// `master` (`MASTER_ADDR`, `MASTER_PORT`).
    ///
    /// # Errors
    /// [`Error::Config`] for the native engine (multi-process runs train on candle) or an
    /// engine that is already data-parallel (`--devices`), and for CUDA in a build without
    /// the `nccl` feature.
    pub fn into_process(self, world: parallel::WorldEnv, master: (String, u16)) -> Result<Self> {
        match self {
            TrainEngine::Candle(device) => {
                if device.is_cuda() && !cfg!(feature = "nccl") {
                    return Err(Error::Config(
                        "multi-process GPU training sums gradients with NCCL: use a build with `--features nccl` (`scripts/build-cuda.sh` makes one)".into(),
                    ));
                }
                let name = if device.is_cpu() {
                    "cpu".to_string()
                } else {
                    format!("cuda:{}", cuda_ordinal(&device))
                };
                Ok(TrainEngine::Process {
                    device,
                    name,
                    world,
                    master,
                    agreement: String::new(),
                })
            }
            TrainEngine::Native => Err(Error::Config(format!(
                "WORLD_SIZE={} asks for a multi-process run, which trains on candle: add `--engine candle` (CPU) or `--device cuda`",
                world.world_size
            ))),
            _ => Err(Error::Config(
                "WORLD_SIZE asks for a multi-process run: use one device per process (`--device`), not `--devices`".into(),
            )),
        }
    }

    /// The devices of a data-parallel run (empty otherwise), as the command line named them.
    pub fn device_names(&self) -> &[String] {
        match self {
            TrainEngine::DataParallel { names, .. } => names,
            TrainEngine::Process { name, .. } => std::slice::from_ref(name),
            _ => &[],
        }
    }

    /// Ranks of the run: 1 unless data-parallel.
    pub fn world_size(&self) -> usize {
        match self {
            TrainEngine::DataParallel { devices, .. } => devices.len(),
            TrainEngine::Process { world, .. } => world.world_size,
            _ => 1,
        }
    }

    /// Where the processes of a multi-process run meet (`MASTER_ADDR`, `MASTER_PORT`).
    pub fn master(&self) -> Option<(&str, u16)> {
        match self {
            TrainEngine::Process { master, .. } => Some((&master.0, master.1)),
            _ => None,
        }
    }

    /// This process's rank (0 unless it is one of several processes).
    pub fn rank(&self) -> usize {
        match self {
            TrainEngine::Process { world, .. } => world.rank,
            _ => 0,
        }
    }

    /// The engine `--device` and `--engine` ask for: our kernels for `cpu` + `native`,
    /// candle on the CPU for `cpu` + `candle`, candle on the GPU for `cuda[:N]`.
    ///
    /// # Errors
    /// `cuda` in a build without the `cuda` feature, or no such GPU
    /// ([`crate::runtime::candle::CandleRuntime::cuda`]).
    pub fn select(
        device: crate::device::Device,
        engine: crate::runtime::EngineKind,
    ) -> Result<Self> {
        use crate::device::Device;
        use crate::runtime::EngineKind;
        Ok(match (device, engine) {
            (Device::Cpu, EngineKind::Native) => TrainEngine::Native,
            (Device::Cpu, EngineKind::Candle) => TrainEngine::Candle(candle_core::Device::Cpu),
            (Device::Cuda(n), _) => TrainEngine::Candle(cuda_device(n)?),
        })
    }

    /// `native`, `candle` (CPU) or `candle-cuda` (for reports and lineage).
    pub fn name(&self) -> &'static str {
        match self {
            TrainEngine::Native => "native",
            TrainEngine::Candle(d) if d.is_cpu() => "candle",
            TrainEngine::Candle(_) => "candle-cuda",
            TrainEngine::DataParallel { devices, .. } if devices.iter().all(|d| d.is_cpu()) => {
                "candle"
            }
            TrainEngine::DataParallel { .. } => "candle-cuda",
            TrainEngine::Process { device, .. } if device.is_cpu() => "candle",
            TrainEngine::Process { .. } => "candle-cuda",
        }
    }
}

/// The ordinal of a candle CUDA device (0 for any other).
fn cuda_ordinal(device: &candle_core::Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}

/// candle's device for GPU `ordinal`, checked ([`crate::runtime::candle::CandleRuntime::cuda`]).
fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    Ok(crate::runtime::candle::CandleRuntime::cuda(ordinal)?
        .candle_device()
        .clone())
}

/// Settings of a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Epochs in the whole run (a resumed run continues up to this).
    pub epochs: usize,
    /// Images per optimizer step.
    pub batch_size: usize,
    /// Peak Adam learning rate.
    pub learning_rate: f32,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Seed of initialization, shuffling and dropout.
    pub seed: u64,
    /// Batch shards run in parallel (one per thread).
    pub threads: usize,
    /// Stop after this many epochs of this invocation, leaving a checkpoint to resume.
    pub stop_after: Option<usize>,
    /// How pixel bytes become inputs: [`Preprocess::UNIT`] for a new model (what its
    /// artifact records), the artifact's own `mlops.input` when fine-tuning one.
    pub preprocess: Preprocess,
    /// What computes the updates.
    pub engine: TrainEngine,
    /// What the forward and backward passes compute in (not fp32: candle only).
    pub precision: Precision,
}

impl TrainConfig {
    /// The learning rate of update `step` (0-based) out of `total_steps`.
    pub fn learning_rate_at(&self, step: u64, total_steps: u64) -> f32 {
        match self.schedule {
            LrSchedule::Constant => self.learning_rate,
            LrSchedule::Cosine => {
                let progress = (step as f64 / total_steps.max(1) as f64).min(1.0);
                (self.learning_rate as f64 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
                    as f32
            }
        }
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Learning rate of the epoch's last update.
    pub learning_rate: f32,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Training accuracy over the epoch (weights changing as it goes).
    pub train_accuracy: f64,
    /// Loss on the test split after the epoch.
    pub test_loss: f64,
    /// Accuracy on the test split after the epoch.
    pub test_accuracy: f64,
    /// Wall time of the training batches (evaluation excluded).
    pub train_seconds: f64,
    /// Training images per second (forward + backward + update).
    pub images_per_s: f64,
}

/// Most points of [`TrainReport::history`] a run records (a point every
/// `ceil(total updates / HISTORY_POINTS)` updates, plus one at each epoch's end), so the
/// report stays small however long the run.
pub const HISTORY_POINTS: u64 = 200;

/// Training figures over a window of updates (what the report's curves draw).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Updates done so far in the whole run (1-based: the window's last update).
    pub step: u64,
    /// Epochs done so far, fractional (`1.5`: halfway through the second epoch).
    pub epoch: f64,
    /// Learning rate of the window's last update.
    pub learning_rate: f32,
    /// Mean training loss over the window's images.
    pub train_loss: f64,
    /// Training accuracy over the window's images.
    pub train_accuracy: f64,
    /// Training images per second over the window.
    pub images_per_s: f64,
}

/// What a training run did and measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    /// The spec's name.
    pub model: String,
    /// Trainable values.
    pub params: usize,
    /// Training images per epoch.
    pub train_images: usize,
    /// Test images evaluated after each epoch.
    pub test_images: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Threads (batch shards).
    pub threads: usize,
    /// Planned epochs.
    pub epochs: usize,
    /// Epochs already done when this run started (resume).
    pub resumed_from_epoch: Option<usize>,
    /// The epochs run by this invocation.
    pub epoch_reports: Vec<EpochReport>,
    /// Finer than `epoch_reports`: at most about [`HISTORY_POINTS`] windows of updates
    /// (empty in reports of older mlops versions).
    #[serde(default)]
    pub history: Vec<HistoryPoint>,
    /// Median of the epochs' training images/s.
    pub images_per_s: f64,
    /// Test accuracy after the last epoch.
    pub test_accuracy: f64,
    /// Test loss after the last epoch.
    pub test_loss: f64,
    /// What computed the updates: `native`, `candle`, `candle-cuda`.
    #[serde(default)]
    pub engine: String,
    /// The ranks' devices of a data-parallel run (`--devices`, rank order; this process's
    /// for one rank of several processes); empty for one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Ranks of a data-parallel run (1 otherwise).
    #[serde(default = "one")]
    pub world_size: usize,
    /// What the forward and backward passes computed in.
    #[serde(default)]
    pub precision: Precision,
    /// fp16: the loss scale at the end of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// fp16: updates skipped because their gradients overflowed.
    #[serde(default)]
    pub skipped_steps: u64,
    /// The last test evaluation in full.
    #[serde(skip)]
    pub last_eval: Option<EvalReport>,
}

fn one() -> usize {
    1
}

/// For people: a row per epoch and the final test accuracy and speed.
impl std::fmt::Display for TrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut table = crate::report::table::Table::new([
            "epoch",
            "lr",
            "train loss",
            "train acc",
            "test loss",
            "test acc",
            "img/s",
            "s",
        ]);
        for e in &self.epoch_reports {
            table.row([
                e.epoch.to_string(),
                format!("{:.2e}", e.learning_rate),
                format!("{:.4}", e.train_loss),
                format!("{:.2}%", 100.0 * e.train_accuracy),
                format!("{:.4}", e.test_loss),
                format!("{:.2}%", 100.0 * e.test_accuracy),
                format!("{:.0}", e.images_per_s),
                format!("{:.1}", e.train_seconds),
            ]);
        }
        writeln!(f, "{table}")?;
        write!(
            f,
            "test accuracy {:.2}% after {} epoch(s); training {:.0} images/s (median of epochs)",
            100.0 * self.test_accuracy,
            self.epoch_reports.last().map_or(0, |e| e.epoch),
            self.images_per_s,
        )
    }
}

/// Settings a resumed run must share with its checkpoint, as recorded in it.
///
/// # Panics
/// Never in practice: `config.schedule` is a unit enum, which serde_json always
/// serializes (to `"constant"` or `"cosine"`).
pub fn resume_settings(
    config: &TrainConfig,
    data: &Dataset,
) -> BTreeMap<String, serde_json::Value> {
    let mut s = BTreeMap::new();
    s.insert("batch_size".into(), config.batch_size.into());
    s.insert("learning_rate".into(), (config.learning_rate as f64).into());
    s.insert(
        "schedule".into(),
        serde_json::to_value(config.schedule).expect("enum serializes"),
    );
    s.insert("seed".into(), config.seed.into());
    s.insert("threads".into(), config.threads.into());
    s.insert("train_images".into(), data.train.count.into());
    s.insert(
        "train_data_sha256".into(),
        combined_sha256(&data.train.files).into(),
    );
    s
}

/// The artifact of a training run after `epoch`: the weights of `checkpoint`, a `train`
/// lineage step with the settings that determine them and the epochs done so far (not
/// the epochs asked for: a run stopped or killed after epoch 1 of 2 says 1), and the
/// test figures of that epoch on `data`'s test split (`data_name` as given).
///
/// # Errors
/// Parameters that do not match the spec.
pub fn epoch_artifact(
    spec: &ModelSpec,
    config: &TrainConfig,
    data: &Dataset,
    data_name: &str,
    checkpoint: &Checkpoint,
    epoch: &EpochReport,
) -> Result<crate::artifact::Artifact> {
    use crate::artifact::{Artifact, EvalMetrics, LineageEntry};
    let mut artifact = Artifact::from_params(spec, &checkpoint.params)?;
    artifact.input = crate::artifact::InputSpec {
        shape: spec.input,
        layout: "nhwc".into(),
        scale: config.preprocess.scale,
        mean: config.preprocess.mean,
        std: config.preprocess.std,
    };
    let mut args = resume_settings(config, data);
    args.insert("model".into(), spec.name.clone().into());
    args.insert("epochs".into(), epoch.epoch.into());
    args.insert("planned_epochs".into(), config.epochs.into());
    // What computed the updates (not a resume setting: a checkpoint resumes on any engine).
    args.insert("engine".into(), config.engine.name().into());
    args.insert("precision".into(), config.precision.as_str().into());
    if !config.engine.device_names().is_empty() {
        args.insert("world_size".into(), config.engine.world_size().into());
        if let TrainEngine::DataParallel { names, .. } = &config.engine {
            args.insert("devices".into(), names.as_slice().into());
        }
    }
    artifact
        .lineage
        .push(LineageEntry::new("train", None, args));
    artifact.metrics = Some(EvalMetrics {
        accuracy: epoch.test_accuracy,
        loss: epoch.test_loss,
        images: data.test.count,
        data: data_name.into(),
        data_sha256: combined_sha256(&data.test.files),
    });
    Ok(artifact)
}

fn shuffle_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Median of sorted values (mean of the middle two for an even count; 0 when empty).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// One optimizer update as [`fit`] runs it: forward and backward on the CPU executor,
/// then Adam (or the same on a candle device, [`CandleTrainer`]). Shared by `fit`,
/// pruning's fine-tuning and `mlops bench --train`, so what bench times is what training
/// does.
pub struct Trainer {
    executor: Executor,
    candle: Option<CandleTrainer>,
    group: Option<parallel::DeviceGroup>,
    /// Parameters, spec order. Updated in place on the native engine; on candle, a host
    /// copy made by [`Trainer::sync`].
    pub params: Vec<Vec<f32>>,
    /// Optimizer state (on candle: `step` always current, moments as of the last sync).
    pub adam: Adam,
}

/// The collectives of a data-parallel group on `devices` (rank order): in process for CPU
/// ranks, NCCL for GPUs.
fn collectives_for(devices: &[candle_core::Device]) -> Result<Vec<Box<dyn parallel::Collective>>> {
    if devices.iter().all(candle_core::Device::is_cpu) {
        return Ok(parallel::InProcess::group(devices.len())
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn parallel::Collective>)
            .collect());
    }
    #[cfg(feature = "nccl")]
    {
        Ok(nccl::Nccl::group(devices)?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn parallel::Collective>)
            .collect())
    }
    #[cfg(not(feature = "nccl"))]
    Err(Error::Config(
        "multi-GPU training sums gradients with NCCL: use a build with `--features nccl`".into(),
    ))
}

/// How long the ranks of a multi-process run wait for each other to start.
pub const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// This process's collective in a multi-process run: the TCP group on the CPU; on a GPU,
/// NCCL, whose unique id rank 0 makes and sends over the TCP group.
fn process_collective(
    device: &candle_core::Device,
    world: parallel::WorldEnv,
    (addr, port): &(String, u16),
    agreement: &str,
) -> Result<Box<dyn parallel::Collective>> {
    let tcp = tcp::TcpGroup::join(
        world.rank,
        world.world_size,
        (addr, *port),
        JOIN_TIMEOUT,
        parallel::DEFAULT_TIMEOUT,
    )?;
    // Before NCCL, which cannot tell ranks with different buffer sizes apart.
    parallel::check_same_everywhere(&tcp, agreement)?;
    if device.is_cpu() {
        return Ok(Box::new(tcp));
    }
    #[cfg(feature = "nccl")]
    {
        let mut id = [0u8; 128];
        if world.rank == 0 {
            id = nccl::Nccl::unique_id()?;
        }
        tcp.broadcast_bytes(&mut id, 0)?;
        Ok(Box::new(nccl::Nccl::join(
            device,
            world.rank,
            world.world_size,
            id,
        )?))
    }
    #[cfg(not(feature = "nccl"))]
    Err(Error::Config(
        "multi-process GPU training sums gradients with NCCL: use a build with `--features nccl`"
            .into(),
    ))
}

impl Trainer {
    /// A trainer for `plan` from `params` and `adam`, with `threads` batch shards.
    pub fn new(plan: &Plan, params: Vec<Vec<f32>>, adam: Adam, threads: usize) -> Self {
        Trainer {
            executor: Executor::new(plan, threads),
            candle: None,
            group: None,
            params,
            adam,
        }
    }

    /// A trainer on `engine` computing in `precision`: [`Trainer::new`] for the native
    /// one, the parameters and moments uploaded to the device for candle (to every rank's
    /// device for a data-parallel engine).
    ///
    /// # Errors
    /// [`Error::Config`] for a precision other than fp32 on the native engine; as
    /// [`CandleTrainer::with_precision`] and [`parallel::DeviceGroup::new`].
    pub fn on(
        (engine, precision): (&TrainEngine, Precision),
        plan: &Plan,
        params: Vec<Vec<f32>>,
        adam: Adam,
        threads: usize,
    ) -> Result<Self> {
        let (candle, group) = match engine {
            TrainEngine::Native if precision != Precision::Fp32 => {
                return Err(Error::Config(format!(
                    "{} mixed precision runs on candle: add `--engine candle` (CPU) or `--device cuda`",
                    precision.as_str()
                )))
            }
            TrainEngine::Native => (None, None),
            TrainEngine::Candle(device) => (
                Some(CandleTrainer::with_precision(
                    &plan.spec, &params, &adam, device, precision,
                )?),
                None,
            ),
            TrainEngine::DataParallel { devices, .. } => {
                let trainers = devices
                    .iter()
                    .map(|d| CandleTrainer::with_precision(&plan.spec, &params, &adam, d, precision))
                    .collect::<Result<Vec<_>>>()?;
                let collectives = collectives_for(devices)?;
                (None, Some(parallel::DeviceGroup::new(trainers, collectives, &adam)?))
            }
            TrainEngine::Process {
                device,
                world,
                master,
                agreement,
                ..
            } => {
                let trainer =
                    CandleTrainer::with_precision(&plan.spec, &params, &adam, device, precision)?;
                let collective = process_collective(device, *world, master, agreement)?;
                (
                    None,
                    Some(parallel::DeviceGroup::new(vec![trainer], vec![collective], &adam)?),
                )
            }
        };
        let single = candle.is_some() || group.is_some();
        Ok(Trainer {
            executor: Executor::new(plan, if single { 1 } else { threads }),
            candle,
            group,
            params,
            adam,
        })
    }

    /// One update on batch `x` (`[batch, h, w, c]`, preprocessed) with `labels`; the
    /// dropout masks derive from `seed` and the Adam step. A data-parallel trainer cuts
    /// the batch into one shard per rank.
    ///
    /// # Errors
    /// Only on candle: a device error or a batch that does not fit (see
    /// [`CandleTrainer::step`], [`parallel::DeviceGroup::step`]).
    pub fn step(
        &mut self,
        x: &[f32],
        labels: &[u8],
        seed: u64,
        learning_rate: f32,
    ) -> Result<crate::nn::BatchStats> {
        if let Some(group) = &mut self.group {
            return group.step(x, labels, &mut self.adam, learning_rate);
        }
        if let Some(candle) = &mut self.candle {
            return candle.step(x, labels, &mut self.adam, learning_rate);
        }
        let stats = self
            .executor
            .train_step(&self.params, x, labels, seed ^ self.adam.step);
        self.adam
            .update(&mut self.params, &self.executor.grads, learning_rate);
        Ok(stats)
    }

    /// Makes `params` and `adam` current (copies them from the device on candle).
    ///
    /// # Errors
    /// A device error.
    pub fn sync(&mut self) -> Result<()> {
        if let Some(group) = &self.group {
            group.download(&mut self.params, &mut self.adam)?;
        } else if let Some(candle) = &self.candle {
            candle.download(&mut self.params, &mut self.adam)?;
        }
        Ok(())
    }

    /// The candle trainer, when updates run on candle (its precision, loss scaler and
    /// skipped steps); rank 0's in a data-parallel run (the same on every rank).
    pub fn candle(&self) -> Option<&CandleTrainer> {
        match &self.group {
            Some(group) => Some(group.rank0()),
            None => self.candle.as_ref(),
        }
    }

    /// `local` if it is `Ok` in every process of a multi-process run (see
    /// [`parallel::DeviceGroup::agree`]); `local` as it is otherwise.
    ///
    /// # Errors
    /// `local`'s error, or that another process failed.
    pub fn agree<T>(&self, local: Result<T>) -> Result<T> {
        match &self.group {
            Some(group) => group.agree(local),
            None => local,
        }
    }

    /// Sends `params`, changed on the host, back to the device (every rank's; no-op on
    /// native).
    ///
    /// # Errors
    /// A device error.
    pub fn push(&mut self) -> Result<()> {
        if let Some(group) = &mut self.group {
            group.upload(&self.params)?;
        } else if let Some(candle) = &mut self.candle {
            candle.upload(&self.params)?;
        }
        Ok(())
    }
}

/// Where training starts from.
#[derive(Debug, Clone)]
pub enum Start {
    /// Fresh Glorot-initialized weights from the seed.
    Fresh,
    /// A checkpoint of an interrupted run with the same settings.
    Resume(Box<Checkpoint>),
    /// Given weights (fine-tuning an artifact), with fresh optimizer state.
    From(Vec<Vec<f32>>),
}

/// Called after every optimizer update with the update's 0-based index (pruning re-applies
/// its masks here).
pub type AfterUpdate<'a> = &'a mut dyn FnMut(u64, &mut [Vec<f32>]);

/// Trains `spec` on `data`, calling `on_epoch` with a checkpoint after every epoch.
/// Returns the final parameters (spec order, our layouts: conv `[out, kh, kw, in]`, dense
/// `[out, in]`) and the report. `data`'s images must fit `spec`
/// ([`crate::data::Split::check_fits`]), and `Start::From` weights match its tensors.
///
/// # Errors
/// - [`Error::Config`] when `epochs` or `batch_size` is 0, the batch does not fit the
///   activation limit ([`ModelSpec::check_batch`]), a resumed checkpoint was made for
///   another spec or other settings or has already trained `epochs`, or the model gives
///   non-finite outputs on the test split (training diverged).
/// - [`Error::Spec`] / [`Error::SpecLayer`] when `spec` is invalid.
/// - Whatever `on_epoch` returns (saving the checkpoint or artifact).
///
/// # Panics
/// If `data.train`'s images have fewer values than `spec.input` or a label is `classes`
/// or more, or `Start::From` holds fewer or shorter tensors than the spec (the executor
/// indexes by the spec's shapes).
pub fn fit(
    spec: &ModelSpec,
    data: &Dataset,
    config: &TrainConfig,
    start: Start,
    progress: &dyn Progress,
    mut after_update: Option<AfterUpdate<'_>>,
    mut on_epoch: impl FnMut(&Checkpoint, &EpochReport) -> Result<()>,
) -> Result<(Vec<Vec<f32>>, TrainReport)> {
    if config.batch_size == 0 || config.epochs == 0 {
        return Err(Error::Config(
            "`--epochs` and `--batch-size` must be at least 1".into(),
        ));
    }
    spec.check_batch(config.batch_size)?;
    let plan = Plan::compile(spec)?;
    let settings = resume_settings(config, data);
    let (params, adam, start_epoch) = match start {
        Start::Resume(ck) => {
            if ck.state.spec != *spec {
                return Err(Error::Config(
                    "the checkpoint was made for another model spec; pass the same `--model`"
                        .into(),
                ));
            }
            for (key, value) in &ck.state.settings {
                if settings.get(key) != Some(value) {
                    return Err(Error::Config(format!(
                        "the checkpoint was made with {key} = {value}, this run has {}; resume with the same settings",
                        settings.get(key).map_or("nothing".into(), |v| v.to_string())
                    )));
                }
            }
            if ck.state.epoch >= config.epochs {
                return Err(Error::Config(format!(
                    "the checkpoint has already trained {} epochs; raise `--epochs` to train further",
                    ck.state.epoch
                )));
            }
            (ck.params, ck.adam, ck.state.epoch)
        }
        Start::Fresh => {
            let params = plan.init_params(config.seed);
            let adam = Adam::new(&params);
            (params, adam, 0)
        }
        Start::From(params) => {
            let adam = Adam::new(&params);
            (params, adam, 0)
        }
    };
    let train = &data.train;
    let batches_per_epoch = train.count.div_ceil(config.batch_size) as u64;
    let total_steps = batches_per_epoch * config.epochs as u64;
    // Ranks in other processes must start from the same model, settings and state.
    let mut engine = config.engine.clone();
    if let TrainEngine::Process { agreement, .. } = &mut engine {
        let mut shared = settings.clone();
        shared.remove("threads");
        *agreement = format!(
            "{spec:?}|{shared:?}|epochs {} stop {:?}|{:?}|{:?}|start {start_epoch} step {}|{:?}",
            config.epochs,
            config.stop_after,
            config.precision,
            config.preprocess,
            adam.step,
            params.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
    let mut trainer = Trainer::on(
        (&engine, config.precision),
        &plan,
        params,
        adam,
        config.threads,
    )?;
    let (mut x, mut labels) = (Vec::new(), Vec::new());
    let mut epoch_reports = Vec::new();
    let mut history = Vec::new();
    let history_every = total_steps.div_ceil(HISTORY_POINTS).max(1);
    let mut last_eval = None;
    let end_epoch = match config.stop_after {
        Some(n) => (start_epoch + n).min(config.epochs),
        None => config.epochs,
    };
    for epoch in start_epoch..end_epoch {
        let mut order: Vec<usize> = (0..train.count).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(shuffle_seed(
            config.seed,
            epoch,
        )));
        progress.start(
            &format!("epoch {}/{}", epoch + 1, config.epochs),
            batches_per_epoch,
        );
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        // The history window: figures since its last point (recording only, no math).
        let (mut w_loss, mut w_correct, mut w_seen, mut w_started) =
            (0.0, 0usize, 0usize, Instant::now());
        let mut learning_rate = config.learning_rate;
        for (b, chunk) in order.chunks(config.batch_size).enumerate() {
            train.gather(chunk, &config.preprocess, &mut x, &mut labels);
            learning_rate = config.learning_rate_at(trainer.adam.step, total_steps);
            let stats = trainer.step(&x, &labels, config.seed, learning_rate)?;
            if let Some(hook) = after_update.as_mut() {
                // On candle the hook sees (and may change) the device's weights.
                trainer.sync()?;
                hook(trainer.adam.step - 1, &mut trainer.params);
                trainer.push()?;
            }
            loss_sum += stats.loss_sum;
            correct += stats.correct;
            seen += chunk.len();
            (w_loss, w_correct, w_seen) = (
                w_loss + stats.loss_sum,
                w_correct + stats.correct,
                w_seen + chunk.len(),
            );
            let step = trainer.adam.step;
            if step % history_every == 0 || b as u64 + 1 == batches_per_epoch {
                history.push(HistoryPoint {
                    step,
                    epoch: epoch as f64 + (b as f64 + 1.0) / batches_per_epoch as f64,
                    learning_rate,
                    train_loss: w_loss / w_seen.max(1) as f64,
                    train_accuracy: w_correct as f64 / w_seen.max(1) as f64,
                    images_per_s: w_seen as f64 / w_started.elapsed().as_secs_f64(),
                });
                (w_loss, w_correct, w_seen, w_started) = (0.0, 0, 0, Instant::now());
            }
            if b % 8 == 7 || b as u64 + 1 == batches_per_epoch {
                let rate = seen as f64 / started.elapsed().as_secs_f64();
                progress.update(
                    b as u64 + 1,
                    &format!(
                        "loss {:.4} acc {:.2}% {:.0} img/s",
                        loss_sum / seen as f64,
                        100.0 * correct as f64 / seen as f64,
                        rate
                    ),
                );
            }
        }
        trainer.sync()?;
        let train_seconds = started.elapsed().as_secs_f64();
        progress.finish();
        let mut engine = CpuRuntime::new(config.threads).load_params(
            &plan,
            trainer.params.clone(),
            config.preprocess,
        )?;
        let eval = evaluate(engine.as_mut(), &data.test, 256).map_err(|e| {
            Error::Config(format!(
                "training diverged in epoch {}: {e}; lower `--lr` (it was {})",
                epoch + 1,
                config.learning_rate
            ))
        })?;
        let report = EpochReport {
            epoch: epoch + 1,
            learning_rate,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_loss: eval.loss,
            test_accuracy: eval.accuracy,
            train_seconds,
            images_per_s: seen as f64 / train_seconds,
        };
        progress.line(&format!(
            "epoch {:>3}/{}  train loss {:.4}  acc {:6.2}%  |  test loss {:.4}  acc {:6.2}%  |  {:.0} img/s, {:.1} s",
            report.epoch,
            config.epochs,
            report.train_loss,
            100.0 * report.train_accuracy,
            report.test_loss,
            100.0 * report.test_accuracy,
            report.images_per_s,
            report.train_seconds
        ));
        let checkpoint = Checkpoint {
            state: CheckpointState {
                epoch: epoch + 1,
                spec: spec.clone(),
                settings: settings.clone(),
                rng: serde_json::json!({
                    "algorithm": "chacha8",
                    "seed": config.seed,
                    "next_shuffle_epoch": epoch + 1,
                    "dropout_step": trainer.adam.step,
                }),
            },
            params: trainer.params.clone(),
            adam: trainer.adam.clone(),
        };
        // Rank 0 alone saves in a multi-process run: all ranks learn whether it worked.
        trainer.agree(on_epoch(&checkpoint, &report))?;
        epoch_reports.push(report);
        last_eval = Some(eval);
    }
    let mut rates: Vec<f64> = epoch_reports.iter().map(|e| e.images_per_s).collect();
    rates.sort_by(f64::total_cmp);
    let last = epoch_reports.last();
    let report = TrainReport {
        model: spec.name.clone(),
        params: spec.param_count()?,
        train_images: train.count,
        test_images: data.test.count,
        batch_size: config.batch_size,
        threads: config.threads,
        epochs: config.epochs,
        resumed_from_epoch: (start_epoch > 0).then_some(start_epoch),
        images_per_s: median(&rates),
        test_accuracy: last.map_or(0.0, |e| e.test_accuracy),
        test_loss: last.map_or(0.0, |e| e.test_loss),
        engine: config.engine.name().into(),
        devices: config.engine.device_names().to_vec(),
        world_size: config.engine.world_size(),
        precision: config.precision,
        loss_scale: trainer
            .candle()
            .and_then(CandleTrainer::loss_scaler)
            .map(|s| s.scale),
        skipped_steps: trainer.candle().map_or(0, CandleTrainer::skipped_steps),
        epoch_reports,
        history,
        last_eval,
    };
    Ok((trainer.params, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_starts_at_rate_and_ends_at_zero() {
        let config = TrainConfig {
            epochs: 1,
            batch_size: 1,
            learning_rate: 0.01,
            schedule: LrSchedule::Cosine,
            seed: 0,
            threads: 1,
            stop_after: None,
            preprocess: Preprocess::UNIT,
            engine: TrainEngine::Native,
            precision: Precision::Fp32,
        };
        assert_eq!(config.learning_rate_at(0, 100), 0.01);
        assert!((config.learning_rate_at(50, 100) - 0.005).abs() < 1e-7);
        assert!(config.learning_rate_at(100, 100).abs() < 1e-9);
    }
}
