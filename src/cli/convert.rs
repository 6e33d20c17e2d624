//! `mlops convert`: a Keras (`.keras`, `.h5`) or ONNX model as an mlops artifact.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use mlops::convert::{ConvertConfig, InputMapping};
use mlops::report::StepReport;

use super::{Context, ReportArgs};

#[derive(Debug, Clone, Args)]
pub(crate) struct ConvertArgs {
    /// The model: Keras 3 `.keras`, legacy Keras `.h5`, or `.onnx` (format found from the
    /// file's first bytes)
    pub model: PathBuf,
    /// Output artifact; defaults to NAME.safetensors beside the input
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Class names, one per line, in class order (default: the file's own, else 0, 1, ...)
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Input mapping `value = (pixel * scale - mean) / std`. Default: the file's own when
    /// mlops exported it, else pixel / 255 (scale 0.00392157, mean 0, std 1), what Keras
    /// and PyTorch MNIST models are usually trained on
    #[arg(long, value_name = "F", value_parser = super::parse::finite)]
    pub input_scale: Option<f32>,
    /// Subtracted after scaling (see `--input-scale`)
    #[arg(long, value_name = "F", value_parser = super::parse::finite)]
    pub input_mean: Option<f32>,
    /// Divided by last, > 0 (see `--input-scale`)
    #[arg(long, value_name = "F", value_parser = super::parse::positive)]
    pub input_std: Option<f32>,
    #[command(flatten)]
    pub output: ReportArgs,
}

pub(crate) fn run(args: &ConvertArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let (mut step, started) = StepReport::start("convert", "cpu");
    let out = super::output_file(&args.model, args.out.as_ref(), None, "safetensors")?;
    if out == args.model {
        anyhow::bail!(
            "`--out {}` is the model being converted; name another file",
            out.display()
        );
    }
    let labels = match &args.labels {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| mlops::Error::io("read", path, e))
                .context("cannot read `--labels`")?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        ),
        None => None,
    };
    let given = args.input_scale.is_some() || args.input_mean.is_some() || args.input_std.is_some();
    let default = InputMapping::default();
    let config = ConvertConfig {
        input: given.then(|| InputMapping {
            scale: args.input_scale.unwrap_or(default.scale),
            mean: args.input_mean.unwrap_or(default.mean),
            std: args.input_std.unwrap_or(default.std),
        }),
        labels,
    };
    let (artifact, report, source) = mlops::convert::convert(&args.model, &config)
        .with_context(|| format!("cannot convert `{}`", args.model.display()))?;
    let written = artifact.save(&out)?;
    step.inputs.push(source);
    step.outputs.push(written.clone());
    step.metrics = serde_json::to_value(&report)?;
    step.finish(started);
    let human = format!(
        "converted `{}` ({}{}, {} layout) -> `{}`: {} ({} parameters), input [{}] {} as (pixel * {} - {}) / {} ({})\n",
        args.model.display(),
        report.format.as_str(),
        if report.producer.is_empty() {
            String::new()
        } else {
            format!(" from {}", report.producer)
        },
        report.source_layout,
        out.display(),
        report.layers.join("-"),
        report.parameters,
        report
            .input_shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        "nhwc",
        report.input.scale,
        report.input.mean,
        report.input.std,
        report.input_from,
    );
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}
