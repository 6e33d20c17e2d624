//! Flags and helpers shared by several commands: where reports go, where models run,
//! output paths, and call-site hints for errors.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use mlops::device::Device;
use mlops::runtime::{EngineKind, Runtime};

use super::Context;

/// Where a step's report goes, shared by every step command.
#[derive(Debug, Clone, Args)]
pub(crate) struct ReportArgs {
    /// Append this step's report to FILE (JSON, created if missing)
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Print the step's report as JSON on stdout (and nothing else on stdout)
    #[arg(long)]
    pub json: bool,
    /// Also draw this step's report as a self-contained HTML page (charts, no scripts)
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
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
    /// What computes training updates for these flags.
    pub(crate) fn train_engine(&self) -> anyhow::Result<mlops::train::TrainEngine> {
        let engine = match self.engine {
            EngineArg::Native => EngineKind::Native,
            EngineArg::Candle => EngineKind::Candle,
        };
        Ok(mlops::train::TrainEngine::select(
            Device::parse(&self.device)?,
            engine,
        )?)
    }

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
    output_file(input, out, Some(suffix), "safetensors")
}

/// `--out`, else `NAME[.SUFFIX].EXT` beside `input`; refuses an `--out` whose extension
/// is not `ext`, so a file is never written under a name that claims another format.
pub(crate) fn output_file(
    input: &std::path::Path,
    out: Option<&PathBuf>,
    suffix: Option<&str>,
    ext: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(out) = out {
        if let Some(found) = out.extension() {
            if !found.eq_ignore_ascii_case(ext) {
                let what = if ext == "onnx" {
                    "an ONNX model"
                } else {
                    "a safetensors artifact"
                };
                anyhow::bail!(
                    "`--out {}`: this command writes {what}, not `.{}`; name the file `*.{ext}`{}",
                    out.display(),
                    found.to_string_lossy(),
                    if found.eq_ignore_ascii_case("onnx") {
                        " (ONNX: `mlops export ARTIFACT --format onnx`)"
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
        match suffix {
            Some(suffix) => input.with_file_name(format!("{stem}.{suffix}.{ext}")),
            None => input.with_file_name(format!("{stem}.{ext}")),
        }
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
