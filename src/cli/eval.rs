//! `mlops eval`: run an artifact over a test split; accuracy, loss, per-class, confusion.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

use mlops::artifact::Artifact;
use mlops::report::{Gate, StepReport};
use mlops::runtime::evaluate;

use super::{Context, HintExt as _, ReportArgs};

#[derive(Debug, Clone, Args)]
pub(crate) struct EvalArgs {
    /// The artifact (.safetensors) to evaluate
    pub artifact: PathBuf,
    /// Data folder; defaults to the one recorded in the artifact, else fixtures/mnist
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Use only the first N test images
    #[arg(long, value_name = "N", value_parser = super::parse::at_least_one)]
    pub limit: Option<usize>,
    /// Images per forward pass
    #[arg(long, default_value_t = 256, value_parser = super::parse::batch)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Exit 3 when accuracy (0..1) is below F
    #[arg(long, value_name = "F", value_parser = super::parse::fraction)]
    pub min_accuracy: Option<f64>,
    #[command(flatten)]
    pub output: ReportArgs,
}

/// The paths of `paths` that are not training checkpoints. `mlops train` writes its
/// checkpoint beside the model, so `runs/x/*.safetensors` matches it; commands that take
/// many artifacts (bench, serve) skip it with a note and a report warning, and fail only
/// when nothing is left.
pub(crate) fn skip_checkpoints<'a>(
    paths: &'a [PathBuf],
    ctx: &super::Context,
    step: &mut StepReport,
    command: &str,
) -> anyhow::Result<Vec<&'a PathBuf>> {
    let mut artifacts = Vec::new();
    for path in paths {
        if mlops::train::Checkpoint::is_checkpoint(path) {
            let note = format!(
                "skipped `{}`: a training checkpoint, not an artifact",
                path.display()
            );
            ctx.printer.note(&note);
            step.warnings.push(note);
        } else {
            artifacts.push(path);
        }
    }
    if artifacts.is_empty() {
        anyhow::bail!(
            "nothing to {command}: every path given is a training checkpoint; pass the model artifacts (e.g. `runs/mnist/model*.safetensors`)"
        );
    }
    Ok(artifacts)
}

/// Loads an artifact, naming it in the error.
pub(crate) fn load_artifact(path: &Path) -> anyhow::Result<(Artifact, mlops::report::FileRecord)> {
    Artifact::load(path).with_context(|| format!("failed to load artifact `{}`", path.display()))
}

pub(crate) fn run(args: &EvalArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let runtime = args.device.runtime(ctx)?;
    let (mut step, started) = StepReport::start("eval", &runtime.name());
    let (artifact, record) = load_artifact(&args.artifact)?;
    let data_dir = args.data.clone().unwrap_or_else(|| {
        artifact
            .metrics
            .as_ref()
            .map(|m| PathBuf::from(&m.data))
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| PathBuf::from(super::train::DEFAULT_DATA))
    });
    let split =
        mlops::data::load_split_limited(&data_dir, mlops::data::SplitKind::Test, args.limit)
            .hinted(
                || "cannot load the evaluation data".into(),
                &format!("`--data` {}", super::IDX_FOLDER_HINT),
            )?;
    split.check_fits(artifact.spec.input, artifact.spec.classes)?;
    let mut engine = runtime.load(&artifact)?;
    let report = evaluate(engine.as_mut(), &split, args.batch_size.max(1))?;
    step.inputs.push(record);
    step.inputs.extend(split.files.iter().cloned());
    let summary = mlops::runtime::EvalSummary {
        report: report.clone(),
        precision: artifact.precision,
        compute: engine.compute(),
        data: data_dir.display().to_string(),
    };
    step.metrics = serde_json::to_value(&summary)?;
    if let Some(min) = args.min_accuracy {
        step.gates
            .push(Gate::at_least("min_accuracy", min, report.accuracy));
    }
    step.finish(started);
    ctx.printer.report(
        &step,
        &format!("\n`{}` {summary}", args.artifact.display()),
        &args.output,
    )?;
    Ok(step)
}
