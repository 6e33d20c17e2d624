//! `mlops export`: write the artifact at another precision, lineage extended.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use mlops::artifact::{LineageEntry, Precision};
use mlops::report::StepReport;

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

#[derive(Debug, Clone, Args)]
pub(crate) struct ExportArgs {
    /// The artifact (.safetensors) to convert
    pub artifact: PathBuf,
    /// Precision of the stored weights
    #[arg(long, value_enum)]
    pub precision: PrecisionArg,
    /// Output file; defaults to NAME.PRECISION.safetensors beside the input
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub output: ReportArgs,
}

pub(crate) fn run(args: &ExportArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let (mut step, started) = StepReport::start("export", "cpu");
    let (artifact, record) = super::eval::load_artifact(&args.artifact)?;
    let precision = Precision::from(args.precision);
    let out = super::output_beside(&args.artifact, args.out.as_ref(), precision.as_str())?;
    let mut exported = artifact.cast(precision)?;
    exported.metrics = None; // measured on the parent's weights, not these
    let mut lineage_args = BTreeMap::new();
    lineage_args.insert("precision".to_string(), precision.as_str().into());
    lineage_args.insert("from".to_string(), artifact.precision.as_str().into());
    exported.lineage.push(LineageEntry::new(
        "export",
        Some((&artifact, &record.sha256)),
        lineage_args,
    ));
    let max_abs_error = artifact
        .params_f32()
        .iter()
        .zip(exported.params_f32())
        .flat_map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0f32, f32::max);
    let written = exported.save(&out)?;
    let ratio = written.bytes as f64 / record.bytes as f64;
    step.metrics = serde_json::json!({
        "from_precision": artifact.precision.as_str(),
        "precision": precision.as_str(),
        "bytes_before": record.bytes,
        "bytes_after": written.bytes,
        "size_ratio": ratio,
        "max_abs_weight_error": max_abs_error,
    });
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
        100.0 * ratio,
        max_abs_error
    );
    ctx.printer.report(&step, &human, &args.output)?;
    Ok(step)
}
