//! The command line: clap definitions, one file per subcommand, and the dispatch.
//!
//! Each subcommand turns its args into library calls, builds a `StepReport` and hands it
//! to the [`printer::Printer`]; nothing here computes figures of its own.

mod bench;
mod eval;
mod export;
mod inspect;
mod parse;
mod pipeline;
pub(crate) mod printer;
mod prune;
mod quantize;
mod serve;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use mlops::device::Device;
use mlops::report::StepReport;
use mlops::runtime::{CpuRuntime, EngineKind, Runtime};

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
    /// Write a copy of an artifact at another precision (fp16, bf16)
    Export(export::ExportArgs),
    /// Prune the smallest weights on a schedule while fine-tuning (unstructured)
    Prune(prune::PruneArgs),
    /// Quantize an artifact to int8 with a calibration set (or to fp16 / bf16)
    Quantize(quantize::QuantizeArgs),
    /// Measure latency percentiles and throughput of artifacts side by side
    Bench(bench::BenchArgs),
    /// Show an artifact's metadata, lineage, layers and tensors
    Inspect(inspect::InspectArgs),
    /// Serve artifacts over HTTP (TF Serving and KServe v2 APIs, metrics, batching, cache)
    Serve(serve::ServeArgs),
    /// Run the steps of a pipeline config (default: train, export fp16/bf16, eval each)
    Pipeline(pipeline::PipelineArgs),
}

/// Where a step's report goes, shared by every step command.
#[derive(Debug, Clone, Args)]
pub(crate) struct ReportArgs {
    /// Append this step's report to FILE (JSON, created if missing)
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Print the step's report as JSON on stdout (and nothing else on stdout)
    #[arg(long)]
    pub json: bool,
}

/// Where a command runs its models: `--device` and `--engine`, shared by every command that
/// runs one (resolved by [`mlops::runtime::select`], the one place that knows devices).
#[derive(Debug, Clone, Args)]
pub(crate) struct DeviceArgs {
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What runs the model: `native` (our kernels on the CPU) or `candle` (candle's ops,
    /// the code a GPU runs); on CUDA it is always candle
    #[arg(long, value_enum, default_value_t = EngineArg::Native)]
    pub engine: EngineArg,
}

/// `--engine` as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum EngineArg {
    Native,
    Candle,
}

impl DeviceArgs {
    /// The checked runtime these flags ask for.
    pub(crate) fn runtime(&self, ctx: &Context) -> anyhow::Result<Box<dyn Runtime>> {
        let engine = match self.engine {
            EngineArg::Native => EngineKind::Native,
            EngineArg::Candle => EngineKind::Candle,
        };
        Ok(mlops::runtime::select(
            Device::parse(&self.device)?,
            engine,
            ctx.threads,
        )?)
    }
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
        Command::Export(args) => export::run(args, &context)?,
        Command::Inspect(args) => inspect::run(args, &context)?,
        Command::Bench(args) => bench::run(args, &context)?,
        Command::Quantize(args) => quantize::run(args, &context)?,
        Command::Prune(args) => prune::run(args, &context)?,
        Command::Serve(args) => serve::run(args, &context)?,
        Command::Pipeline(args) => return pipeline::run(args, &context),
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

/// `--out` when given, else `NAME.SUFFIX.safetensors` beside the input artifact.
///
/// # Errors
/// When `--out` names another format by its extension (`m.onnx`, `m.h5`): mlops writes
/// safetensors, and a file whose name says otherwise would mislead every tool after it.
pub(crate) fn output_beside(
    input: &std::path::Path,
    out: Option<&PathBuf>,
    suffix: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(out) = out {
        if let Some(ext) = out.extension() {
            if !ext.eq_ignore_ascii_case("safetensors") {
                anyhow::bail!(
                    "`--out {}`: this command writes a safetensors artifact, not `.{}`; name the file `*.safetensors`{}",
                    out.display(),
                    ext.to_string_lossy(),
                    if ext.eq_ignore_ascii_case("onnx") {
                        " (ONNX export is not built yet)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(out.cloned().unwrap_or_else(|| {
        let stem = input
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().to_string());
        input.with_file_name(format!("{stem}.{suffix}.safetensors"))
    }))
}

/// An error context that carries the fix known at its call site: rendered as the
/// context's line, and its `hint` as the `hint:` line. Hints belong to the call site (a
/// `--calib` folder and a `--data` folder fail with the same error kind but need different
/// advice), so they are attached where the flag is read, not derived from the error kind.
#[derive(Debug)]
pub(crate) struct Hinted {
    pub message: String,
    pub hint: String,
}

impl std::fmt::Display for Hinted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// `.hinted(message, hint)` on results: context with a call-site hint.
pub(crate) trait HintExt<T> {
    fn hinted(self, message: impl FnOnce() -> String, hint: &str) -> anyhow::Result<T>;
}

impl<T, E> HintExt<T> for Result<T, E>
where
    Result<T, E>: anyhow::Context<T, E>,
{
    fn hinted(self, message: impl FnOnce() -> String, hint: &str) -> anyhow::Result<T> {
        anyhow::Context::with_context(self, || Hinted {
            message: message(),
            hint: hint.to_string(),
        })
    }
}

/// The hint of `--data`-style flags that take an IDX folder.
pub(crate) const IDX_FOLDER_HINT: &str = "expects a folder of MNIST-layout IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)";

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
