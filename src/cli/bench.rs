//! `mlops bench`: latency percentiles and throughput per artifact x batch size, side by
//! side, in table / md / csv / json / jsonl, with an optional regression gate.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use mlops::bench::format::{write_doc, OutputFormat};
use mlops::bench::{compare_baseline, read_baseline, BenchConfig, BenchInput, BenchPlan};
use mlops::report::StepReport;

use super::{Context, HintExt as _};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    Md,
    Csv,
    Json,
    Jsonl,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// Artifacts to compare; the first is the baseline of the table
    #[arg(required = true, value_name = "ARTIFACT")]
    pub artifacts: Vec<PathBuf>,
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Batch sizes to measure
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64], value_parser = super::parse::batch)]
    pub batch: Vec<usize>,
    /// Warm-up calls before timing
    #[arg(long, default_value_t = 10, value_parser = super::parse::count)]
    pub warmup: usize,
    /// Also warm up for at least this many seconds (0 to 3600)
    #[arg(long, default_value_t = 0.2, value_name = "S", value_parser = super::parse::seconds_or_zero)]
    pub warmup_secs: f64,
    /// Timed calls (at least)
    #[arg(long, default_value_t = 20, value_parser = super::parse::at_least_one)]
    pub iters: usize,
    /// Time for at least this many seconds per row (and repeat), 0 to 3600 (0: just
    /// `--iters` calls)
    #[arg(long, default_value_t = 1.0, value_name = "S", value_parser = super::parse::seconds_or_zero)]
    pub duration: f64,
    /// Timed rounds per row; the spread between them shows the run's stability
    #[arg(long, default_value_t = 1, value_name = "R", value_parser = super::parse::at_least_one)]
    pub repeats: usize,
    /// Measure training steps (forward + backward + Adam) instead of inference
    #[arg(long)]
    pub train: bool,
    /// Also measure each artifact's accuracy on this folder's test split
    #[arg(long, value_name = "DIR")]
    pub eval_data: Option<PathBuf>,
    /// Output on stdout
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// A previous `--format json` output (or report file) to compare with
    #[arg(long, value_name = "REPORT.json")]
    pub baseline: Option<PathBuf>,
    /// Exit 3 when a row's throughput falls more than this fraction below the baseline
    #[arg(long, default_value_t = 0.10, value_name = "F", value_parser = super::parse::fraction_below_one)]
    pub max_regression: f64,
    /// Append this step's report to FILE
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Also draw this step's report as a self-contained HTML page (charts, no scripts)
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

pub(crate) fn run(args: &BenchArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let runtime = args.device.runtime(ctx)?;
    let config = BenchConfig::from_seconds(
        args.warmup,
        args.warmup_secs,
        args.iters,
        args.duration,
        args.repeats,
    )?;
    let baseline = args
        .baseline
        .as_deref()
        .map(read_baseline)
        .transpose()
        .context("cannot read `--baseline`")?;
    let (mut step, started) = StepReport::start("bench", &runtime.name());
    let eval_split = match &args.eval_data {
        Some(dir) => Some(
            mlops::data::load_split(dir, mlops::data::SplitKind::Test).hinted(
                || "cannot load `--eval-data`".into(),
                &format!("`--eval-data` {}", super::IDX_FOLDER_HINT),
            )?,
        ),
        None => None,
    };
    let mut inputs = Vec::new();
    for path in super::eval::skip_checkpoints(&args.artifacts, ctx, &mut step, "bench")? {
        let load = Instant::now();
        let (artifact, record) = super::eval::load_artifact(path)?;
        step.inputs.push(record.clone());
        inputs.push(BenchInput {
            path: path.display().to_string(),
            artifact,
            record,
            load_ms: load.elapsed().as_secs_f64() * 1e3,
        });
    }
    let plan = BenchPlan {
        batches: args.batch.clone(),
        train: args.train,
        config,
        threads: ctx.threads,
    };
    let progress = ctx.printer.progress();
    let (mut doc, warnings) = mlops::bench::run(
        &inputs,
        &plan,
        eval_split.as_ref(),
        runtime.as_ref(),
        &progress,
    )?;
    step.warnings.extend(warnings);
    if let Some(baseline) = &baseline {
        let (gates, warnings) = compare_baseline(&mut doc, baseline, args.max_regression);
        step.gates.extend(gates);
        step.warnings.extend(warnings);
    }
    step.metrics = serde_json::to_value(&doc)?;
    step.finish(started);
    let format = match args.format {
        Format::Table => OutputFormat::Table,
        Format::Md => OutputFormat::Md,
        Format::Csv => OutputFormat::Csv,
        Format::Json => OutputFormat::Json,
        Format::Jsonl => OutputFormat::Jsonl,
    };
    if ctx.in_pipeline {
        if !ctx.printer.is_quiet() {
            // Pipeline steps keep stdout for the pipeline's own `--json`; a closed stderr
            // is not an error worth failing the pipeline for.
            let _ = write_doc(&mut std::io::stderr().lock(), &doc, format);
        }
    } else {
        write_doc(&mut std::io::stdout().lock(), &doc, format)?;
    }
    // The document above is bench's own output (`--format`); only `--report` remains.
    let output = super::ReportArgs {
        report: args.report.clone(),
        json: false,
        html: args.html.clone(),
    };
    ctx.printer.report(&step, "", &output)?;
    Ok(step)
}
