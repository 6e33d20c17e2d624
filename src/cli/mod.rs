//! The command line: clap definitions, one file per subcommand, and the dispatch.
//!
//! Each subcommand turns its args into library calls, builds a `StepReport` and hands it
//! to the [`printer::Printer`]; nothing here computes figures of its own.

mod args;
mod bench;
mod convert;
mod eval;
mod export;
mod inspect;
mod parse;
mod pipeline;
mod predict;
pub(crate) mod printer;

pub(crate) use args::{
    output_beside, output_file, DeviceArgs, EngineArg, HintExt, Hinted, ReportArgs, IDX_FOLDER_HINT,
};
mod prune;
mod quantize;
mod report;
mod serve;
mod train;

use clap::{Args, Parser, Subcommand};

use mlops::report::StepReport;
use mlops::runtime::CpuRuntime;

/// Take an image classifier from training to a fast, small, trustworthy artifact.
#[derive(Debug, Parser)]
#[command(name = "mlops", version, about, max_term_width = 100)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts.
#[derive(Debug, Clone, Args)]
pub(crate) struct GlobalArgs {
    /// Print nothing but errors and `--json` output
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Worker threads (batch shards); defaults to the number of cores
    #[arg(long, global = true, value_name = "N", value_parser = parse::threads)]
    pub threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Train a model (the reference CNN by default) and write an fp32 artifact
    Train(train::TrainArgs),
    /// Measure an artifact's accuracy, loss, per-class accuracy and confusion matrix
    Eval(eval::EvalArgs),
    /// Convert a Keras (.keras, .h5) or ONNX model into an mlops artifact
    Convert(convert::ConvertArgs),
    /// Write a copy of an artifact at another precision (fp16, bf16), or as ONNX
    Export(export::ExportArgs),
    /// Prune the smallest weights on a schedule while fine-tuning (unstructured)
    Prune(prune::PruneArgs),
    /// Quantize an artifact to int8 with a calibration set (or to fp16 / bf16)
    Quantize(quantize::QuantizeArgs),
    /// Measure latency percentiles and throughput of artifacts side by side
    Bench(bench::BenchArgs),
    /// Class, label and probabilities per image (files or a data folder)
    Predict(predict::PredictArgs),
    /// Show an artifact's metadata, lineage, layers and tensors
    Inspect(inspect::InspectArgs),
    /// Serve artifacts over HTTP (TF Serving and KServe v2 APIs, metrics, batching, cache)
    Serve(serve::ServeArgs),
    /// Run the steps of a pipeline config (default: train, export fp16/bf16, eval each)
    Pipeline(pipeline::PipelineArgs),
    /// Draw a report file as one self-contained HTML page (charts), or Markdown tables
    Report(report::ReportCmdArgs),
}

/// How a command ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Exit 0.
    Success,
    /// A `--min-accuracy`-style gate did not hold: exit 3.
    GateFailed,
}

impl Outcome {
    fn of(report: &StepReport) -> Self {
        if report.gates_passed() {
            Outcome::Success
        } else {
            Outcome::GateFailed
        }
    }
}

/// Runs one parsed command line.
pub(crate) fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let threads = cli
        .global
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // The CPU runtime owns the process-wide pool and flush-to-zero.
    let cpu = CpuRuntime::new(threads);
    let printer = printer::Printer::new(cli.global.quiet);
    let in_pipeline = matches!(cli.command, Command::Pipeline(_));
    let context = Context {
        threads,
        cpu,
        printer,
        in_pipeline,
    };
    let report = match &cli.command {
        Command::Train(args) => train::run(args, &context)?,
        Command::Eval(args) => eval::run(args, &context)?,
        Command::Convert(args) => convert::run(args, &context)?,
        Command::Export(args) => export::run(args, &context)?,
        Command::Predict(args) => predict::run(args, &context)?,
        Command::Inspect(args) => inspect::run(args, &context)?,
        Command::Bench(args) => bench::run(args, &context)?,
        Command::Quantize(args) => quantize::run(args, &context)?,
        Command::Prune(args) => prune::run(args, &context)?,
        Command::Serve(args) => serve::run(args, &context)?,
        Command::Pipeline(args) => return pipeline::run(args, &context),
        Command::Report(args) => return report::run(args, &context),
    };
    Ok(Outcome::of(&report))
}

/// What every command gets besides its own args.
pub(crate) struct Context {
    pub threads: usize,
    /// Our CPU kernels, for the steps that run on the CPU (quantize, prune).
    pub cpu: CpuRuntime,
    pub printer: printer::Printer,
    /// Steps run inside `mlops pipeline` print their tables to stderr, keeping stdout
    /// for the pipeline's own `--json`.
    pub in_pipeline: bool,
}

/// `error: ...`, each cause on its own line, then a hint where one is known.
pub(crate) fn render_error(err: &anyhow::Error) -> String {
    let mut out = format!("error: {err}");
    for cause in err.chain().skip(1) {
        out.push_str(&format!("\n  Caused by: {cause}"));
    }
    let hint = err
        .downcast_ref::<Hinted>()
        .map(|h| h.hint.clone())
        .or_else(|| {
            err.chain()
                .find_map(|c| c.downcast_ref::<mlops::Error>())
                .and_then(mlops::Error::hint)
        });
    if let Some(hint) = hint {
        out.push_str(&format!("\n\nhint: {hint}"));
    }
    out
}
