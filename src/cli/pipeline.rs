//! `mlops pipeline`: run the steps of a YAML config in order, one report for all of them.
//!
//! A step is a subcommand name plus its flags as YAML keys (`run: export`,
//! `precision: fp16`), parsed by the same clap definitions as the command line, so every
//! flag works in a pipeline exactly as it does by hand.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Parser};
use serde::Deserialize;

use mlops::report::ReportFile;

use super::{Cli, Command, Context, Outcome};

/// The default pipeline, also shipped as `examples/pipeline.yaml`.
const DEFAULT_CONFIG: &str = include_str!("../../examples/pipeline.yaml");

#[derive(Debug, Clone, Args)]
pub(crate) struct PipelineArgs {
    /// Pipeline config (YAML); the built-in default when omitted
    #[arg(value_name = "CONFIG.yaml")]
    pub config: Option<PathBuf>,
    /// Folder for every artifact and report.json (overrides the config's `out`)
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the whole report as JSON on stdout at the end
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineConfig {
    /// Data folder given to steps that take `--data` (unless the step sets its own).
    #[serde(default)]
    data: Option<PathBuf>,
    /// Output folder; artifact paths in steps are relative to it.
    #[serde(default)]
    out: Option<PathBuf>,
    steps: Vec<BTreeMap<String, serde_yaml::Value>>,
}

fn scalar(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Sequence(items) => {
            let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
            parts.map(|p| p.join(","))
        }
        _ => None,
    }
}

/// Turns one step's YAML keys into a command line for clap.
fn step_argv(
    index: usize,
    step: &BTreeMap<String, serde_yaml::Value>,
    data: Option<&Path>,
    out: &Path,
    report: &Path,
) -> anyhow::Result<Vec<String>> {
    let name = step
        .get("run")
        .and_then(serde_yaml::Value::as_str)
        .with_context(|| format!("pipeline step {}: missing `run: <command>`", index + 1))?;
    let mut argv = vec!["mlops".to_string(), name.to_string()];
    let in_out = |p: &str| out.join(p).display().to_string();
    let takes_artifact = matches!(name, "eval" | "export" | "inspect" | "quantize" | "prune");
    if name == "bench" {
        let list = match step.get("artifacts") {
            Some(serde_yaml::Value::Sequence(items)) => items.iter().filter_map(scalar).collect(),
            Some(other) => vec![scalar(other).unwrap_or_default()],
            None => vec!["model.safetensors".to_string()],
        };
        argv.extend(list.iter().map(|a| in_out(a)));
    }
    if name == "convert" {
        // The source model is the user's file (relative to where the pipeline runs); the
        // artifact lands in the pipeline's folder as `model.safetensors` unless `out` says.
        let model = step.get("model").and_then(scalar).with_context(|| {
            format!(
                "pipeline step {} (convert): missing `model: PATH` (a .keras, .h5 or .onnx file)",
                index + 1
            )
        })?;
        argv.push(model);
        if !step.contains_key("out") {
            argv.extend(["--out".into(), in_out("model.safetensors")]);
        }
    }
    if takes_artifact {
        let artifact = step
            .get("artifact")
            .and_then(scalar)
            .unwrap_or_else(|| "model.safetensors".into());
        argv.push(in_out(&artifact));
    }
    for (key, value) in step {
        if key == "run"
            || (takes_artifact && key == "artifact")
            || (name == "bench" && key == "artifacts")
            || (name == "convert" && key == "model")
        {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            serde_yaml::Value::Bool(true) => argv.push(flag),
            serde_yaml::Value::Bool(false) => {}
            other => {
                let text = scalar(other).with_context(|| {
                    format!(
                        "pipeline step {} ({name}): `{key}` must be a scalar or a list",
                        index + 1
                    )
                })?;
                let text = if key == "out" { in_out(&text) } else { text };
                argv.extend([flag, text]);
            }
        }
    }
    if matches!(name, "train" | "eval" | "prune") && !step.contains_key("data") {
        if let Some(data) = data {
            argv.extend(["--data".into(), data.display().to_string()]);
        }
    }
    let int8 = matches!(step.get("int8"), Some(serde_yaml::Value::Bool(true)));
    if name == "quantize" && int8 && !step.contains_key("calib") {
        if let Some(data) = data {
            argv.extend(["--calib".into(), data.display().to_string()]);
        }
    }
    if name == "train" && !step.contains_key("out") {
        argv.extend(["--out".into(), out.display().to_string()]);
    }
    if name != "inspect" {
        argv.extend(["--report".into(), report.display().to_string()]);
    }
    Ok(argv)
}

/// `report.html` beside the pipeline's `report.json`, drawn from it.
fn write_html(report_path: &Path, ctx: &Context) -> anyhow::Result<()> {
    let report = ReportFile::load(report_path, "the pipeline's own report")?;
    let html = report_path.with_extension("html");
    let source = report_path.display().to_string();
    super::report::write_html(&report, &source, &html, &ctx.printer)
}

pub(crate) fn run(args: &PipelineArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    // Under torchrun every process would run every step, and ranks other than 0 write no
    // model for the later steps to read.
    if let Some(world) = mlops::train::parallel::world_from_env()?.filter(|w| w.world_size > 1) {
        bail!(
            "WORLD_SIZE={} asks for a multi-process run, but a pipeline runs in one process: start its training on its own under torchrun (`mlops train ... --out DIR`), then the other steps once",
            world.world_size
        );
    }
    let (text, source) = match &args.config {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| mlops::Error::io("read", path, e))
                .context("cannot read the pipeline config")?,
            path.display().to_string(),
        ),
        None => (DEFAULT_CONFIG.to_string(), "built-in default".to_string()),
    };
    let config: PipelineConfig = serde_yaml::from_str(&text)
        .with_context(|| format!("pipeline config ({source}) is not valid"))?;
    let out = args
        .out
        .clone()
        .or(config.out.clone())
        .unwrap_or_else(|| PathBuf::from("runs/default"));
    super::train::ensure_writable_dir(&out)?;
    let report_path = out.join("report.json");
    ReportFile::new().save(&report_path)?;
    // Parse every step before running any, so a typo fails in seconds, not after training.
    let mut commands = Vec::new();
    for (index, step) in config.steps.iter().enumerate() {
        let argv = step_argv(index, step, config.data.as_deref(), &out, &report_path)?;
        let cli = Cli::try_parse_from(&argv).map_err(|e| {
            anyhow::anyhow!(
                "pipeline step {} (`{}`): {}",
                index + 1,
                argv[1..].join(" "),
                e.kind()
            )
            .context(e.render().to_string().trim().to_string())
        })?;
        match cli.command {
            Command::Pipeline(_) => {
                bail!("pipeline step {}: a pipeline cannot run a pipeline", index + 1)
            }
            Command::Serve(_) => bail!(
                "pipeline step {}: `serve` runs until stopped; start it on its own after the pipeline",
                index + 1
            ),
            Command::Report(_) => bail!(
                "pipeline step {}: the pipeline writes report.html itself at the end",
                index + 1
            ),
            _ => {}
        }
        commands.push((argv, cli.command));
    }
    ctx.printer.note(&format!(
        "pipeline ({source}): {} steps, output in `{}`",
        commands.len(),
        out.display()
    ));
    let mut reports = Vec::new();
    for (index, (argv, command)) in commands.iter().enumerate() {
        ctx.printer.note(&format!(
            "\n== step {}/{}: {}",
            index + 1,
            commands.len(),
            argv[1..].join(" ")
        ));
        let report = match command {
            Command::Train(a) => super::train::run(a, ctx)?,
            Command::Eval(a) => super::eval::run(a, ctx)?,
            Command::Export(a) => super::export::run(a, ctx)?,
            Command::Convert(a) => super::convert::run(a, ctx)?,
            Command::Predict(a) => super::predict::run(a, ctx)?,
            Command::Inspect(a) => super::inspect::run(a, ctx)?,
            Command::Bench(a) => super::bench::run(a, ctx)?,
            Command::Quantize(a) => super::quantize::run(a, ctx)?,
            Command::Prune(a) => super::prune::run(a, ctx)?,
            Command::Pipeline(_) | Command::Serve(_) | Command::Report(_) => {
                unreachable!("refused when the steps were parsed")
            }
        };
        let passed = report.gates_passed();
        reports.push(report);
        if !passed {
            ctx.printer.note(&format!(
                "pipeline stopped: a gate failed in step {}",
                index + 1
            ));
            write_html(&report_path, ctx)?;
            return Ok(Outcome::GateFailed);
        }
    }
    ctx.printer.note(&mlops::pipeline::summary(&reports)?);
    ctx.printer
        .note(&format!("report: `{}`", report_path.display()));
    write_html(&report_path, ctx)?;
    if args.json {
        let text = std::fs::read_to_string(&report_path)?;
        std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    }
    Ok(Outcome::Success)
}
