//! `mlops quantize`: fp32 artifact + calibration images -> int8 artifact, with per-layer
//! figures and (with evaluation data) accuracy, agreement and the drop against fp32.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};

use mlops::data::{load_split, Split, SplitKind};
use mlops::quantize::{MethodName, QuantConfig, QuantizeConfig, QuantizeInputs};
use mlops::report::{FileRecord, Gate, StepReport};

use super::{Context, HintExt as _, ReportArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum MethodArg {
    Minmax,
    Percentile,
    Mse,
    Entropy,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct QuantizeArgs {
    /// The fp32 (or fp16/bf16) artifact to quantize
    pub artifact: PathBuf,
    /// Static int8: int8 weights per output channel, calibrated uint8 activations
    #[arg(long)]
    pub int8: bool,
    /// Shorthand of `mlops export --precision fp16`
    #[arg(long, conflicts_with_all = ["int8", "bf16"])]
    pub fp16: bool,
    /// Shorthand of `mlops export --precision bf16`
    #[arg(long, conflicts_with_all = ["int8", "fp16"])]
    pub bf16: bool,
    /// Calibration images: a folder of PNG/JPEG images (flat or one sub-folder per class),
    /// or an IDX folder (its training split when it has one)
    #[arg(long, value_name = "DIR")]
    pub calib: Option<PathBuf>,
    /// Calibration images to use, chosen with a fixed seed
    #[arg(long, default_value_t = 500, value_name = "N", value_parser = super::parse::at_least_one)]
    pub calib_samples: usize,
    /// How activation ranges become scales
    #[arg(long, value_enum, default_value_t = MethodArg::Minmax)]
    pub calib_method: MethodArg,
    /// Percentile kept by `--calib-method percentile`
    #[arg(long, default_value_t = 99.99, value_parser = super::parse::percentile)]
    pub percentile: f32,
    /// One weight scale per tensor instead of per output channel
    #[arg(long)]
    pub per_tensor: bool,
    /// Weights-only int8 (dynamic range): activations are quantized per image at run
    /// time, so no `--calib` is needed (given, it is used for the fp32 comparison)
    #[arg(long, requires = "int8")]
    pub dynamic: bool,
    /// Keep these conv/dense layers in fp32 (mixed precision), e.g. `--exclude 0,7`
    #[arg(long, value_name = "LAYER,...", value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Evaluate fp32 and int8 on this folder's test split (default: the artifact's own
    /// evaluation data when it is recorded and present)
    #[arg(long, value_name = "DIR")]
    pub eval_data: Option<PathBuf>,
    /// Exit 3 when int8 accuracy is more than F (0..1) below fp32
    #[arg(long, value_name = "F", value_parser = super::parse::accuracy_drop)]
    pub max_accuracy_drop: Option<f64>,
    /// Output file; defaults to NAME.int8.safetensors beside the input
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Exit 3 when quantization warned (a degenerate calibration set, a collapsed
    /// activation range), as a failed gate does
    #[arg(long)]
    pub strict: bool,
    /// Show what would be quantized and write nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub output: ReportArgs,
}

/// Calibration images: a folder of PNG/JPEG images (converted to `shape`), else the
/// training split of an IDX folder, else its test split.
fn calibration_split(dir: &Path, shape: [usize; 3]) -> anyhow::Result<Split> {
    if !dir.is_dir() {
        bail!(mlops::Error::data(dir, "calibration folder does not exist"));
    }
    let context = || format!("cannot read calibration images from `{}`", dir.display());
    let hint = "`--calib` takes a folder of PNG/JPEG images (flat, or one sub-folder per class; labels are not used) or an IDX folder such as `fixtures/mnist`";
    if mlops::data::images::looks_like_image_folder(dir) {
        return mlops::data::images::load_image_folder(dir, shape).hinted(context, hint);
    }
    load_split(dir, SplitKind::Train)
        .or_else(|_| load_split(dir, SplitKind::Test))
        .hinted(context, hint)
}

pub(crate) fn run(args: &QuantizeArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    if args.fp16 || args.bf16 {
        let export = super::export::ExportArgs {
            artifact: args.artifact.clone(),
            precision: Some(if args.fp16 {
                super::export::PrecisionArg::Fp16
            } else {
                super::export::PrecisionArg::Bf16
            }),
            format: super::export::FormatArg::Safetensors,
            opset: mlops::onnx::DEFAULT_OPSET,
            input_layout: super::export::LayoutArg::Nhwc,
            out: args.out.clone(),
            output: args.output.clone(),
        };
        return super::export::run(&export, ctx);
    }
    if !args.int8 {
        bail!("say what to quantize to: `--int8` (with `--calib DIR`), `--fp16` or `--bf16`");
    }
    let out_path = super::output_beside(&args.artifact, args.out.as_ref(), "int8")?;
    let (artifact, record) = super::eval::load_artifact(&args.artifact)?;
    let config = settings(args)
        .resolve(&artifact)
        .with_context(|| format!("cannot quantize `{}`", args.artifact.display()))?;
    if args.dry_run {
        return dry_run(args, &artifact, &config, ctx);
    }
    if args.calib.is_none() && !args.dynamic {
        bail!("`--int8` needs calibration images: add `--calib DIR` (an IDX folder such as `fixtures/mnist`), or use `--dynamic` (weights-only int8, no calibration)");
    }
    let (mut step, started) = StepReport::start("quantize", "cpu");
    let calib = match &args.calib {
        Some(dir) => {
            // Calibration needs images of the model's shape; their labels are not used.
            let calib = calibration_split(dir, artifact.spec.input)?;
            calib.check_shape(artifact.spec.input)?;
            Some(calib)
        }
        None => None,
    };
    // Evaluation data: `--eval-data`, else the artifact's own when recorded and present.
    let eval_dir = args.eval_data.clone().or_else(|| {
        artifact
            .metrics
            .as_ref()
            .map(|m| PathBuf::from(&m.data))
            .filter(|p| p.is_dir())
    });
    if args.max_accuracy_drop.is_some() && eval_dir.is_none() {
        bail!("`--max-accuracy-drop` needs evaluation data: add `--eval-data DIR`");
    }
    let eval_split = match &eval_dir {
        Some(dir) => {
            let split = load_split(dir, SplitKind::Test).hinted(
                || format!("cannot load `--eval-data` `{}`", dir.display()),
                &format!("`--eval-data` {}", super::IDX_FOLDER_HINT),
            )?;
            split.check_fits(artifact.spec.input, artifact.spec.classes)?;
            Some(split)
        }
        None => None,
    };
    let eval_name = eval_dir.as_ref().map(|d| d.display().to_string());
    let inputs = QuantizeInputs {
        artifact: &artifact,
        record: Some(&record),
        calib: calib.as_ref(),
        eval: eval_split.as_ref().zip(eval_name.as_deref()),
    };
    let (quantized, summary) = mlops::quantize::run(inputs, &config, &ctx.cpu)?;
    if let (Some(eval), Some(max)) = (&summary.eval, args.max_accuracy_drop) {
        step.gates
            .push(Gate::at_most("max_accuracy_drop", max, eval.accuracy_drop));
    }
    step.warnings
        .extend(summary.report.warnings.iter().cloned());
    if args.strict {
        step.gates.push(Gate {
            name: "strict".into(),
            threshold: 0.0,
            value: step.warnings.len() as f64,
            passed: step.warnings.is_empty(),
        });
    }
    let written = quantized.save(&out_path)?;
    step.inputs.push(record);
    for split in [&eval_split, &calib].into_iter().flatten() {
        step.inputs.extend(split.files.iter().cloned());
    }
    step.outputs.push(written);
    step.metrics = serde_json::to_value(&summary)?;
    step.finish(started);
    let human = format!(
        "\n{summary}quantized `{}` -> `{}`\n",
        args.artifact.display(),
        out_path.display()
    );
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}

/// The flags as the library's settings.
fn settings(args: &QuantizeArgs) -> QuantizeConfig {
    QuantizeConfig {
        method: match args.calib_method {
            MethodArg::Minmax => MethodName::MinMax,
            MethodArg::Percentile => MethodName::Percentile,
            MethodArg::Mse => MethodName::Mse,
            MethodArg::Entropy => MethodName::Entropy,
        },
        percentile: args.percentile,
        samples: args.calib_samples,
        per_tensor: args.per_tensor,
        dynamic: args.dynamic,
        exclude: args.exclude.clone(),
    }
}

/// `--dry-run`: a row per tensor that would change, and nothing written.
fn dry_run(
    args: &QuantizeArgs,
    artifact: &mlops::artifact::Artifact,
    config: &QuantConfig,
    ctx: &Context,
) -> anyhow::Result<StepReport> {
    let plan = mlops::quantize::plan(artifact, config)?;
    let (mut step, started) = StepReport::start("quantize", "cpu");
    step.inputs.push(FileRecord::of(&args.artifact)?);
    step.metrics = serde_json::to_value(&plan)?;
    step.finish(started);
    let human = format!("\n{plan}; dry run: nothing written\n");
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}
