//! `mlops bench`: latency percentiles and throughput per artifact x batch size, side by
//! side, in table / md / csv / json / jsonl, with an optional regression gate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use mlops::bench::{compare_baseline, BenchConfig, BenchDoc, BenchInput, BenchPlan, BenchRow};
use mlops::report::table::Table;
use mlops::report::{StepReport, MLOPS_VERSION};

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
}

fn config(args: &BenchArgs) -> BenchConfig {
    BenchConfig {
        warmup_iters: args.warmup,
        warmup_time: Duration::from_secs_f64(args.warmup_secs),
        iters: args.iters,
        duration: Duration::from_secs_f64(args.duration),
        repeats: args.repeats,
    }
}

pub(crate) fn run(args: &BenchArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let runtime = args.device.runtime(ctx)?;
    let baseline = args.baseline.as_deref().map(read_baseline).transpose()?;
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
        config: config(args),
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
    if ctx.in_pipeline {
        if !ctx.printer.is_quiet() {
            print_doc(&mut std::io::stderr().lock(), &doc, args.format)?;
        }
    } else {
        print_doc(&mut std::io::stdout().lock(), &doc, args.format)?;
    }
    // The document above is bench's own output (`--format`); only `--report` remains.
    let output = super::ReportArgs {
        report: args.report.clone(),
        json: false,
    };
    ctx.printer.report(&step, "", &output)?;
    Ok(step)
}

/// Reads a bench document, or the last bench step of a report file.
fn read_baseline(path: &Path) -> anyhow::Result<BenchDoc> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| mlops::Error::io("read", path, e))
        .context("cannot read `--baseline`")?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("`--baseline` `{}` is not JSON", path.display()))?;
    let doc = if value.get("rows").is_some() {
        value
    } else {
        value["steps"]
            .as_array()
            .and_then(|steps| steps.iter().rev().find(|s| s["step"] == "bench"))
            .map(|s| s["metrics"].clone())
            .with_context(|| {
                format!(
                    "`--baseline` `{}` is not an mlops bench report (no `rows`, no bench step); \
                     make one with `mlops bench --format json`",
                    path.display()
                )
            })?
    };
    serde_json::from_value(doc).with_context(|| {
        format!(
            "`--baseline` `{}` has another schema than this mlops {MLOPS_VERSION} writes",
            path.display()
        )
    })
}

fn print_doc(out: &mut dyn std::io::Write, doc: &BenchDoc, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, doc)?;
            writeln!(out)?;
        }
        Format::Jsonl => {
            for row in &doc.rows {
                let mut value = flat_row(doc, row);
                value.insert("samples_us".into(), serde_json::to_value(&row.samples_us)?);
                writeln!(out, "{}", serde_json::Value::Object(value))?;
            }
        }
        Format::Csv => {
            let rows: Vec<_> = doc.rows.iter().map(|r| flat_row(doc, r)).collect();
            let header: Vec<String> = rows
                .first()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default();
            writeln!(out, "{},samples_us", header.join(","))?;
            for (row, flat) in doc.rows.iter().zip(&rows) {
                let cells: Vec<String> = header.iter().map(|k| csv_cell(&flat[k])).collect();
                let samples: Vec<String> =
                    row.samples_us.iter().map(|s| format!("{s:.3}")).collect();
                writeln!(out, "{},{}", cells.join(","), samples.join(";"))?;
            }
        }
        Format::Table | Format::Md => {
            let table = human_table(doc);
            if format == Format::Md {
                write!(out, "{}", table.to_markdown())?;
            } else {
                write!(out, "{}", table)?;
                writeln!(
                    out,
                    "\n{} ({} cores, {}), mlops {} ({})",
                    doc.machine.cpu,
                    doc.machine.cores,
                    doc.machine.simd.join(" "),
                    doc.mlops_version,
                    doc.git_commit
                )?;
            }
        }
    }
    Ok(())
}

/// A row as flat `key: scalar` pairs (csv and jsonl), machine fields included.
fn flat_row(doc: &BenchDoc, row: &BenchRow) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    map.insert("mlops_version".into(), doc.mlops_version.clone().into());
    map.insert("git_commit".into(), doc.git_commit.clone().into());
    map.insert("cpu".into(), doc.machine.cpu.clone().into());
    map.insert("cores".into(), doc.machine.cores.into());
    map.insert("simd".into(), doc.machine.simd.join(" ").into());
    let value = serde_json::to_value(row).expect("rows serialize");
    for (key, v) in value.as_object().expect("row is an object") {
        match (key.as_str(), v) {
            ("samples_us", _) => {}
            (_, serde_json::Value::Array(items)) => {
                let joined: Vec<String> = items.iter().map(|v| v.to_string()).collect();
                map.insert(key.clone(), joined.join(";").into());
            }
            (_, serde_json::Value::Object(inner)) => {
                for (k, x) in inner {
                    map.insert(format!("{key}_{k}"), x.clone());
                }
            }
            _ => {
                map.insert(key.clone(), v.clone());
            }
        }
    }
    for key in [
        "accuracy",
        "accuracy_drop",
        "baseline_throughput",
        "change_vs_baseline",
    ] {
        map.entry(key).or_insert(serde_json::Value::Null);
    }
    map
}

fn csv_cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) if s.contains([',', '"', '\n']) => {
            format!("\"{}\"", s.replace('"', "\"\""))
        }
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn human_table(doc: &BenchDoc) -> Table {
    let with_accuracy = doc.rows.iter().any(|r| r.accuracy.is_some());
    let with_baseline = doc.rows.iter().any(|r| r.change_vs_baseline.is_some());
    let mut header = vec![
        "artifact",
        "precision",
        "mode",
        "batch",
        "p50 us",
        "p90 us",
        "p99 us",
        "mean±std us",
        "images/s",
        "speedup",
    ];
    if with_accuracy {
        header.extend(["accuracy", "drop"]);
    }
    if with_baseline {
        header.push("vs baseline");
    }
    let mut table = Table::new(header);
    for r in &doc.rows {
        let mut cells = vec![
            r.artifact.clone(),
            r.precision.clone(),
            r.mode.clone(),
            r.batch.to_string(),
            format!("{:.1}", r.latency_us.p50),
            format!("{:.1}", r.latency_us.p90),
            format!("{:.1}", r.latency_us.p99),
            format!(
                "{:.1}±{:.1}{}",
                r.latency_us.mean,
                r.latency_us.std,
                if r.unstable { " !" } else { "" }
            ),
            format!("{:.0}", r.throughput_images_per_s),
            format!("{:.2}x", r.speedup_vs_first),
        ];
        if with_accuracy {
            cells.push(
                r.accuracy
                    .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
            );
            cells.push(
                r.accuracy_drop
                    .map_or("-".into(), |d| format!("{:+.2} pt", -100.0 * d)),
            );
        }
        if with_baseline {
            cells.push(
                r.change_vs_baseline
                    .map_or("-".into(), |c| format!("{:+.1}%", 100.0 * c)),
            );
        }
        table.row(cells);
    }
    table
}
