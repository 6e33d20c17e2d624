//! `mlops prune`: magnitude pruning on a TF-MOT schedule while fine-tuning, with sparsity,
//! gzip size and accuracy before and after in the report.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use mlops::prune::{FineTune, Method, PruneConfig, PruneData, PruneReport, ScheduleKind};
use mlops::report::{Gate, StepReport};

use super::train::LrScheduleArg;
use super::{Context, HintExt as _, ReportArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ScheduleArg {
    Constant,
    Polynomial,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PruneArgs {
    /// The fp32 artifact to prune
    pub artifact: PathBuf,
    /// Share of the pruned layers removed, in [0, 1): of their weights (TF-MOT's
    /// `target_sparsity`), or with `--structured` of their filters / units (torch's `amount`)
    #[arg(long, required_unless_present = "keep", value_parser = super::parse::sparsity)]
    pub sparsity: Option<f32>,
    /// Remove whole conv filters / dense units (smallest L1 norm) instead of single weights
    #[arg(long)]
    pub structured: bool,
    /// Old spelling of `--structured --sparsity 1-F`: the share of filters kept
    #[arg(long, hide = true, conflicts_with = "sparsity", requires = "structured", value_parser = super::parse::share)]
    pub keep: Option<f32>,
    /// Rank filters of all pruned layers together instead of per layer
    #[arg(long, requires = "structured")]
    pub global: bool,
    /// Pruning schedule (TF-MOT's `pruning_schedule`): `polynomial` ramps 0 -> sparsity
    /// (PolynomialDecay); `constant` prunes to it at once (ConstantSparsity)
    #[arg(long = "pruning-schedule", alias = "schedule", value_enum, default_value_t = ScheduleArg::Polynomial)]
    pub pruning_schedule: ScheduleArg,
    /// First optimizer step that prunes
    #[arg(long, default_value_t = 0)]
    pub begin_step: u64,
    /// Step where the final sparsity is reached (default: the last multiple of
    /// `--frequency` within the fine-tuning steps)
    #[arg(long)]
    pub end_step: Option<u64>,
    /// Steps between mask updates
    #[arg(long, default_value_t = 100, value_parser = super::parse::steps)]
    pub frequency: u64,
    /// Exponent of the polynomial schedule
    #[arg(long, default_value_t = 3.0, value_parser = super::parse::exponent)]
    pub power: f32,
    /// Epochs of fine-tuning while pruning (0 with `--structured` skips fine-tuning)
    #[arg(long, default_value_t = 1, value_parser = super::parse::count)]
    pub fine_tune_epochs: usize,
    /// Training data folder
    #[arg(long, value_name = "DIR", default_value = super::train::DEFAULT_DATA)]
    pub data: PathBuf,
    /// Use only the first N training images
    #[arg(long, value_name = "N", value_parser = super::parse::at_least_one)]
    pub limit: Option<usize>,
    /// Fine-tuning learning rate (Adam; the peak with `--lr-schedule cosine`)
    #[arg(long, default_value_t = 0.001, value_parser = super::parse::learning_rate)]
    pub lr: f32,
    /// Fine-tuning learning-rate schedule: `cosine` decays from `--lr` to zero over the
    /// fine-tuning steps and recovers more accuracy than `constant` (README: prune figures)
    #[arg(long, value_enum, default_value_t = LrScheduleArg::Cosine)]
    pub lr_schedule: LrScheduleArg,
    /// Images per step
    #[arg(long, default_value_t = 64, value_parser = super::parse::batch)]
    pub batch_size: usize,
    /// Prune runs of N consecutive weights along the input axis together, ranked by mean
    /// magnitude (TF-MOT's `block_size=(1, N)`); 1 prunes single weights. Blocks put the
    /// zeros side by side, which compresses better (see the gzip figures)
    #[arg(
        long,
        default_value_t = 1,
        value_name = "N",
        conflicts_with = "structured",
        value_parser = super::parse::at_least_one
    )]
    pub block: usize,
    /// Layers to prune (`layers.4` or `4`); default: every conv/dense but the first and last
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Seed of shuffling during fine-tuning
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Evaluation data (default: `--data`'s test split)
    #[arg(long, value_name = "DIR")]
    pub eval_data: Option<PathBuf>,
    /// Exit 3 when accuracy drops more than F (0..1) against the input artifact
    #[arg(long, value_name = "F", value_parser = super::parse::accuracy_drop)]
    pub max_accuracy_drop: Option<f64>,
    /// Output file; defaults to NAME.pruned.safetensors beside the input
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Show the plan and write nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub output: ReportArgs,
}

impl PruneArgs {
    /// The library's settings from the flags.
    fn config(&self, threads: usize) -> PruneConfig {
        let method = if self.structured {
            Method::Structured {
                keep: self
                    .keep
                    .unwrap_or_else(|| 1.0 - self.sparsity.unwrap_or_default()),
                global: self.global,
            }
        } else {
            Method::Magnitude {
                sparsity: self.sparsity.unwrap_or_default(),
                schedule: match self.pruning_schedule {
                    ScheduleArg::Constant => ScheduleKind::Constant,
                    ScheduleArg::Polynomial => ScheduleKind::Polynomial,
                },
                begin_step: self.begin_step,
                end_step: self.end_step,
                frequency: self.frequency,
                power: self.power,
                block: self.block,
            }
        };
        PruneConfig {
            method,
            layers: self.layers.clone(),
            fine_tune: FineTune {
                epochs: self.fine_tune_epochs,
                learning_rate: self.lr,
                lr_schedule: self.lr_schedule.into(),
                batch_size: self.batch_size,
                seed: self.seed,
                threads,
            },
        }
    }
}

pub(crate) fn run(args: &PruneArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let suffix = if args.structured { "slim" } else { "pruned" };
    let out_path = super::output_beside(&args.artifact, args.out.as_ref(), suffix)?;
    let (artifact, record) = super::eval::load_artifact(&args.artifact)?;
    let config = args.config(ctx.threads);
    let context = || format!("cannot prune `{}`", args.artifact.display());
    let (mut step, started) = StepReport::start("prune", "cpu");
    if args.dry_run {
        let plan = mlops::prune::plan(&artifact, &config).with_context(context)?;
        step.inputs.push(record);
        step.metrics = serde_json::to_value(&plan)?;
        step.finish(started);
        let human = format!("\n{plan}dry run: nothing written\n");
        ctx.printer.report(&step, &human, &args.output)?;
        return Ok(step);
    }
    // Fail before loading data when the settings cannot work.
    config.resolve(&artifact).with_context(context)?;
    let data = super::train::load_data(&args.data, args.limit, None)?;
    let eval_split = match &args.eval_data {
        Some(dir) => mlops::data::load_split(dir, mlops::data::SplitKind::Test).hinted(
            || format!("cannot load `--eval-data` `{}`", dir.display()),
            &format!("`--eval-data` {}", super::IDX_FOLDER_HINT),
        )?,
        None => data.test.clone(),
    };
    let prune_data = PruneData {
        data: &data,
        eval: &eval_split,
        eval_name: args
            .eval_data
            .as_ref()
            .unwrap_or(&args.data)
            .display()
            .to_string(),
    };
    let progress = ctx.printer.progress();
    let (pruned, report) = mlops::prune::prune(
        &artifact,
        &record,
        &prune_data,
        &config,
        &ctx.cpu,
        &progress,
    )
    .with_context(context)?;
    let written = pruned.save(&out_path)?;
    for warning in report.warnings() {
        ctx.printer.note(warning);
        step.warnings.push(warning.clone());
    }
    let (_, _, drop) = report.accuracy();
    if let Some(max) = args.max_accuracy_drop {
        step.gates
            .push(Gate::at_most("max_accuracy_drop", max, drop));
    }
    step.inputs.push(record.clone());
    step.inputs.extend(data.train.files.iter().cloned());
    step.outputs.push(written.clone());
    step.metrics = serde_json::to_value(&report)?;
    step.finish(started);
    let human = format!(
        "\n{report}wrote `{}` (from `{}`){}\n",
        out_path.display(),
        args.artifact.display(),
        if matches!(report, PruneReport::Structured(_)) {
            format!(
                "; measure the speed-up with `mlops bench {} {}`",
                args.artifact.display(),
                out_path.display()
            )
        } else {
            String::new()
        }
    );
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}
