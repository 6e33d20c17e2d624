//! `mlops train`: data + spec -> fp32 artifact, checkpoint and train report.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use mlops::data::Dataset;
use mlops::model::ModelSpec;
use mlops::report::{FileRecord, Gate, StepReport};
use mlops::train::{epoch_artifact, fit, Checkpoint, LrSchedule, Start, TrainConfig, TrainReport};

use super::{Context, HintExt as _, ReportArgs};

/// Default data folder: the full MNIST committed to the repository.
pub(crate) const DEFAULT_DATA: &str = "fixtures/mnist";

/// Learning-rate schedule as the command line names it (train and prune's fine-tuning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LrScheduleArg {
    Constant,
    Cosine,
}

impl From<LrScheduleArg> for LrSchedule {
    fn from(arg: LrScheduleArg) -> Self {
        match arg {
            LrScheduleArg::Constant => LrSchedule::Constant,
            LrScheduleArg::Cosine => LrSchedule::Cosine,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct TrainArgs {
    /// Model spec (YAML); the reference CNN when omitted
    #[arg(long, value_name = "SPEC.yaml")]
    pub model: Option<PathBuf>,
    /// Folder of MNIST-layout IDX files (raw or .gz)
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// Epochs to train [default: 2, or more on a small data set so that the run makes
    /// at least 1,000 optimizer updates (the report says which)]
    #[arg(long, value_parser = super::parse::at_least_one)]
    pub epochs: Option<usize>,
    /// Images per optimizer step
    #[arg(long, default_value_t = 64, value_parser = super::parse::batch)]
    pub batch_size: usize,
    /// Peak learning rate of Adam
    #[arg(long, default_value_t = 0.001, value_parser = super::parse::learning_rate)]
    pub lr: f32,
    /// Learning-rate schedule over the planned steps (`--schedule` is the old spelling)
    #[arg(long = "lr-schedule", alias = "schedule", value_enum, default_value_t = LrScheduleArg::Cosine)]
    pub lr_schedule: LrScheduleArg,
    /// Seed of initialization, shuffling and dropout
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// What the forward and backward passes compute in: `fp32`, or mixed precision
    /// (`bf16`, `fp16` with dynamic loss scaling; f32 master weights) on candle
    /// (`--engine candle` or `--device cuda`)
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
    pub precision: PrecisionArg,
    /// Use only the first N training images
    #[arg(long, value_name = "N", value_parser = super::parse::at_least_one)]
    pub limit: Option<usize>,
    /// Use only the first N test images for evaluation
    #[arg(long, value_name = "N", value_parser = super::parse::at_least_one)]
    pub val_limit: Option<usize>,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Data-parallel training, one rank per listed device, gradients summed every step:
    /// `cuda:0,cuda:1` (NCCL: a build with `--features nccl`) or `cpu,cpu` (candle's CPU
    /// backend, ranks summed in process: how CI tests the multi-GPU logic). Always candle;
    /// `--batch-size` is the global batch, cut into one shard per rank
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        conflicts_with = "device"
    )]
    pub devices: Option<Vec<String>>,
    /// Folder for model.safetensors and checkpoint.safetensors
    #[arg(long, value_name = "DIR", default_value = "runs/default")]
    pub out: PathBuf,
    /// Continue from DIR/checkpoint.safetensors
    #[arg(long)]
    pub resume: bool,
    /// Stop after N epochs of this invocation (resume later with `--resume`)
    #[arg(long, value_name = "N", value_parser = super::parse::at_least_one)]
    pub stop_after: Option<usize>,
    /// Exit 3 when the final test accuracy (0..1) is below F
    #[arg(long, value_name = "F", value_parser = super::parse::fraction)]
    pub min_accuracy: Option<f64>,
    #[command(flatten)]
    pub output: ReportArgs,
}

/// Fails early (before loading data) when `dir` cannot hold files.
pub(crate) fn ensure_writable_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| mlops::Error::io("create folder", dir, e))
        .context("`--out` is not usable")?;
    let probe = dir.join(format!(".mlops-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| mlops::Error::io("write to", dir, e))
        .context("`--out` is not writable; choose another folder")?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Loads a data folder and applies `--limit` / `--val-limit`.
pub(crate) fn load_data(
    dir: &Path,
    limit: Option<usize>,
    val_limit: Option<usize>,
) -> anyhow::Result<Dataset> {
    Dataset::load_limited(dir, limit, val_limit).hinted(
        || format!("cannot load the data set `{}`", dir.display()),
        &format!("`--data` {}", super::IDX_FOLDER_HINT),
    )
}

/// `--precision` as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PrecisionArg {
    Fp32,
    Bf16,
    Fp16,
}

pub(crate) fn run(args: &TrainArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let (engine, runtime_name) = match &args.devices {
        Some(list) => {
            if let Some(world) =
                mlops::train::parallel::world_from_env()?.filter(|w| w.world_size > 1)
            {
                anyhow::bail!(
                    "WORLD_SIZE={} makes this process one rank of a multi-process run: give it one device (`--device`), not `--devices`",
                    world.world_size
                );
            }
            let devices = list
                .iter()
                .map(|d| mlops::device::Device::parse(d.trim()))
                .collect::<mlops::Result<Vec<_>>>()
                .context("`--devices`")?;
            let engine = mlops::train::TrainEngine::select_devices(&devices)?;
            let name = format!(
                "{} (candle, data parallel)",
                engine.device_names().join(",")
            );
            (engine, name)
        }
        None => {
            let mut device = args.device.clone();
            let world = mlops::train::parallel::world_from_env()?.filter(|w| w.world_size > 1);
            if world.is_some() && device.device == "cuda" {
                // torchrun's one process per GPU: `--device cuda` is this node's LOCAL_RANK.
                if let Some(local) = std::env::var("LOCAL_RANK")
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                {
                    device.device = format!("cuda:{local}");
                }
            }
            let engine = device.train_engine()?;
            let name = device.runtime(ctx)?.name();
            match world {
                Some(world) => {
                    let master = mlops::train::parallel::master_from_env()?;
                    let engine = engine.into_process(world, master)?;
                    let name = format!(
                        "{name}, rank {} of {} processes",
                        world.rank, world.world_size
                    );
                    (engine, name)
                }
                None => (engine, name),
            }
        }
    };
    // In a multi-process run every rank trains; rank 0 alone writes files and the report.
    let engine_rank = engine.rank();
    let writer = engine_rank == 0;
    let (mut step, started) = StepReport::start("train", &runtime_name);
    let spec = match &args.model {
        Some(path) => ModelSpec::from_file(path)?,
        None => ModelSpec::reference_cnn(),
    };
    ensure_writable_dir(&args.out)?;
    let checkpoint_path = args.out.join("checkpoint.safetensors");
    let model_path = args.out.join("model.safetensors");
    let start = if args.resume {
        Start::Resume(Box::new(Checkpoint::load(&checkpoint_path)?))
    } else {
        Start::Fresh
    };
    let data = load_data(&args.data, args.limit, args.val_limit)?;
    data.train.check_fits(spec.input, spec.classes)?;
    data.test.check_fits(spec.input, spec.classes)?;
    let steps_per_epoch = data.train.count.div_ceil(args.batch_size.max(1));
    let epochs = args
        .epochs
        .unwrap_or_else(|| mlops::train::default_epochs(steps_per_epoch));
    let total_updates = steps_per_epoch * epochs;
    if args.epochs.is_none() && epochs != mlops::train::DEFAULT_EPOCHS {
        ctx.printer.note(&format!(
            "{epochs} epochs (not {}): {steps_per_epoch} updates per epoch on {} images, and a run needs about {} updates (set `--epochs` to choose)",
            mlops::train::DEFAULT_EPOCHS,
            data.train.count,
            mlops::train::MIN_UPDATES
        ));
    }
    if total_updates < mlops::train::MIN_UPDATES / 4 {
        step.warnings.push(format!(
            "this run makes only {total_updates} optimizer updates ({epochs} epochs of {steps_per_epoch}); models rarely converge in fewer than ~{}: raise `--epochs` or lower `--batch-size`",
            mlops::train::MIN_UPDATES
        ));
    }
    let config = TrainConfig {
        epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        schedule: args.lr_schedule.into(),
        seed: args.seed,
        threads: ctx.threads,
        stop_after: args.stop_after,
        preprocess: mlops::data::Preprocess::UNIT,
        engine,
        precision: match args.precision {
            PrecisionArg::Fp32 => mlops::train::Precision::Fp32,
            PrecisionArg::Bf16 => mlops::train::Precision::Bf16,
            PrecisionArg::Fp16 => mlops::train::Precision::Fp16,
        },
    };
    ctx.printer.note(&format!(
        "training {} ({} parameters) on {} images from `{}`, testing on {}, batch {}, {}",
        if spec.name.is_empty() {
            "model"
        } else {
            &spec.name
        },
        spec.param_count()?,
        data.train.count,
        args.data.display(),
        data.test.count,
        args.batch_size,
        match (config.engine.device_names(), config.engine.world_size()) {
            ([], _) => format!("{} thread(s)", ctx.threads),
            (names, world) if names.len() == world => {
                format!("{world} rank(s) ({})", names.join(", "))
            }
            (names, world) => {
                let (addr, port) = config.engine.master().unwrap_or(("?", 0));
                format!(
                    "rank {} of {world} processes ({}), meeting the others at {addr}:{port} (each waits up to {} s for the rest to start)",
                    config.engine.rank(),
                    names.join(", "),
                    mlops::train::JOIN_TIMEOUT.as_secs()
                )
            }
        }
    ));
    let data_name = args.data.display().to_string();
    let mut model_record = None;
    let progress = ctx.printer.progress();
    let (_params, report) = fit(
        &spec,
        &data,
        &config,
        start,
        &progress,
        None,
        |ck, epoch| {
            if !writer {
                return Ok(());
            }
            ck.save(&checkpoint_path)?;
            let artifact = epoch_artifact(&spec, &config, &data, &data_name, ck, epoch)?;
            model_record = Some(artifact.save(&model_path)?);
            Ok(())
        },
    )?;
    step.inputs = data.train.files.clone();
    step.inputs.extend(data.test.files.iter().cloned());
    if let Some(path) = &args.model {
        step.inputs.push(FileRecord::of(path)?);
    }
    step.outputs.extend(model_record);
    if writer {
        step.outputs.push(FileRecord::of(&checkpoint_path)?);
    }
    if let Some(min) = args.min_accuracy {
        step.gates
            .push(Gate::at_least("min_accuracy", min, report.test_accuracy));
    }
    if args.stop_after.is_some() && report.epoch_reports.last().map(|e| e.epoch) < Some(epochs) {
        step.warnings.push(format!(
            "stopped after {} epoch(s) of {epochs}; continue with `--resume`",
            report.epoch_reports.len(),
        ));
    }
    step.metrics = serde_json::to_value(&report)?;
    step.metrics["epochs_chosen"] = if args.epochs.is_some() {
        "flag".into()
    } else {
        format!(
            "default: at least {} updates at {steps_per_epoch} per epoch",
            mlops::train::MIN_UPDATES
        )
        .into()
    };
    step.finish(started);
    if !writer {
        ctx.printer.note(&format!(
            "rank {} of {}: test accuracy {:.2}%; rank 0 writes the model, checkpoint and report",
            engine_rank,
            report.world_size,
            100.0 * report.test_accuracy
        ));
        return Ok(step);
    }
    ctx.printer
        .report(&step, &human(&report, &model_path), &args.output)?;
    Ok(step)
}

fn human(report: &TrainReport, model_path: &Path) -> String {
    format!("\n{report}; model written to `{}`\n", model_path.display())
}
