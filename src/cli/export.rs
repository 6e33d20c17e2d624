//! `mlops export`: write the artifact at another precision, lineage extended.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use mlops::artifact::Precision;
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
