//! `mlops export`: write the artifact at another precision (safetensors), or as an ONNX
//! model (fp32, or the QDQ graph of an int8 artifact), lineage extended.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};

use mlops::artifact::Precision;
use mlops::report::{FileRecord, StepReport};

use super::{Context, ReportArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PrecisionArg {
    Fp32,
    Fp16,
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Fp16 => Precision::Fp16,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum FormatArg {
    /// An mlops artifact at `--precision`
    #[default]
    Safetensors,
    /// An ONNX model: fp32 graph, or a QDQ graph (QuantizeLinear/DequantizeLinear) for an
    /// int8 artifact
    Onnx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum LayoutArg {
    /// `[batch, h, w, c]`, as mlops and TF Serving take images (a Transpose at the front)
    #[default]
    Nhwc,
    /// `[batch, c, h, w]`, as PyTorch models take images
    Nchw,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct ExportArgs {
    /// The artifact (.safetensors) to export
    pub artifact: PathBuf,
    /// Precision of the stored weights (safetensors)
    #[arg(long, value_enum, required_unless_present = "format")]
    pub precision: Option<PrecisionArg>,
    /// What to write
    #[arg(long, value_enum, default_value_t = FormatArg::Safetensors)]
    pub format: FormatArg,
    /// ONNX opset of the default domain (13 to 21)
    #[arg(long, default_value_t = mlops::onnx::DEFAULT_OPSET, value_name = "N")]
    pub opset: i64,
    /// Memory order of the ONNX graph's `input`
    #[arg(long, value_enum, default_value_t = LayoutArg::Nhwc)]
    pub input_layout: LayoutArg,
    /// Output file; defaults to NAME.PRECISION.safetensors (NAME.onnx) beside the input
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub output: ReportArgs,
}

pub(crate) fn run(args: &ExportArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let (mut step, started) = StepReport::start("export", "cpu");
    let (artifact, record) = super::eval::load_artifact(&args.artifact)?;
    if args.format == FormatArg::Onnx {
        return onnx(args, ctx, step, started, artifact, record);
    }
    let Some(precision) = args.precision.map(Precision::from) else {
        bail!("say what to export to: `--precision fp32|fp16|bf16`, or `--format onnx`");
    };
    let out = super::output_beside(&args.artifact, args.out.as_ref(), precision.as_str())?;
    let (exported, report) = mlops::export::export(&artifact, &record, precision)?;
    let written = exported.save(&out)?;
    step.metrics = serde_json::to_value(&report)?;
    step.inputs.push(record.clone());
    step.outputs.push(written.clone());
    step.finish(started);
    let human = format!(
        "exported `{}` ({}) -> `{}` ({precision}): {} -> {} bytes ({:.1}%), max weight error {:.2e}\n",
        args.artifact.display(),
        artifact.precision,
        out.display(),
        record.bytes,
        written.bytes,
        100.0 * report.size_ratio,
        report.max_abs_weight_error
    );
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}

/// `--format onnx`: the graph [`mlops::onnx::to_onnx`] builds, written atomically.
fn onnx(
    args: &ExportArgs,
    ctx: &Context,
    mut step: StepReport,
    started: std::time::Instant,
    artifact: mlops::artifact::Artifact,
    record: FileRecord,
) -> anyhow::Result<StepReport> {
    if let Some(p) = args.precision {
        if Precision::from(p) != Precision::Fp32 {
            bail!(
                "`--format onnx` writes an fp32 graph (or a QDQ graph for an int8 artifact); `--precision {}` applies to safetensors exports only",
                Precision::from(p)
            );
        }
    }
    let out = super::output_file(&args.artifact, args.out.as_ref(), None, "onnx")?;
    let layout = match args.input_layout {
        LayoutArg::Nhwc => mlops::onnx::InputLayout::Nhwc,
        LayoutArg::Nchw => mlops::onnx::InputLayout::Nchw,
    };
    let (bytes, report) = mlops::onnx::to_onnx(&artifact, &record, args.opset, layout)?;
    mlops::io::write_atomically(&out, &bytes)?;
    let written = FileRecord::of_bytes(&out, &bytes);
    step.metrics = serde_json::to_value(&report)?;
    step.inputs.push(record);
    step.outputs.push(written);
    step.finish(started);
    let human = format!(
        "exported `{}` ({}) -> `{}` (ONNX opset {}, {} graph, input {:?} {}, {} nodes: {}): {} -> {} bytes\n",
        args.artifact.display(),
        artifact.precision,
        out.display(),
        report.opset,
        report.graph,
        report.input.1,
        format!("{:?}", report.input_layout).to_uppercase(),
        report.nodes,
        report.op_types.join(", "),
        report.bytes_before,
        report.bytes_after,
    );
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}
