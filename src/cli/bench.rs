//! `mlops bench`: latency percentiles and throughput per artifact x batch size, side by
//! side, in table / md / csv / json / jsonl, with an optional regression gate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};

use mlops::bench::machine::{Machine, Usage};
use mlops::bench::{
    measure, BenchConfig, BenchDoc, BenchRow, LatencyStats, GIT_COMMIT, UNSTABLE_CV,
};
use mlops::nn::{Executor, Plan};
use mlops::report::table::Table;
use mlops::report::{Gate, StepReport, MLOPS_VERSION};
use mlops::runtime::evaluate;
use mlops::train::Adam;

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

/// Deterministic stand-in pixels when no data folder is given.
fn synthetic_batch(input_len: usize, batch: usize) -> Vec<f32> {
    (0..batch * input_len)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0)
        .collect()
}

pub(crate) fn run(args: &BenchArgs, ctx: &Context) -> anyhow::Result<StepReport> {
    let runtime = args.device.runtime(ctx)?;
    if args.train && runtime.name() != "cpu" {
        bail!(
            "`--train` times our CPU training step; training on `{}` is not built yet (the CUDA issue adds it)",
            runtime.name()
        );
    }
    if args.batch.contains(&0) {
        bail!("`--batch` sizes must be at least 1");
    }
    if !(0.0..1.0).contains(&args.max_regression) {
        bail!("`--max-regression` must be in [0, 1), e.g. 0.10 for 10%");
    }
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
    let config = config(args);
    let mode = if args.train { "train" } else { "infer" };
    let mut rows: Vec<BenchRow> = Vec::new();
    let artifacts = super::eval::skip_checkpoints(&args.artifacts, ctx, &mut step, "bench")?;
    for path in artifacts {
        let load = Instant::now();
        let (artifact, record) = super::eval::load_artifact(path)?;
        let mut engine = runtime.load(&artifact)?;
        let load_ms = load.elapsed().as_secs_f64() * 1e3;
        step.inputs.push(record.clone());
        let accuracy = match &eval_split {
            Some(split) => {
                split.check_fits(artifact.spec.input, artifact.spec.classes)?;
                Some(evaluate(engine.as_mut(), split, 256)?.accuracy)
            }
            None => None,
        };
        let plan = Plan::compile(&artifact.spec)?;
        if args.train {
            for &batch in &args.batch {
                artifact.spec.check_batch(batch)?;
            }
        }
        for &batch in &args.batch {
            ctx.printer.note(&format!(
                "bench {} ({}) {mode} batch {batch} ...",
                path.display(),
                artifact.precision
            ));
            let x = match &eval_split {
                Some(split) if split.count >= batch => {
                    let (mut x, mut labels) = (Vec::new(), Vec::new());
                    split.gather(
                        &(0..batch).collect::<Vec<_>>(),
                        &artifact.input.preprocess(),
                        &mut x,
                        &mut labels,
                    );
                    x
                }
                Some(split) => {
                    let note = format!(
                        "batch {batch} of `{}` timed on synthetic pixels: `--eval-data` has only {} images",
                        path.display(),
                        split.count
                    );
                    ctx.printer.note(&note);
                    step.warnings.push(note);
                    synthetic_batch(plan.input_len, batch)
                }
                None => synthetic_batch(plan.input_len, batch),
            };
            let before = Usage::now();
            let wall = Instant::now();
            let (cold_us, repeats) = if args.train {
                let labels: Vec<u8> = (0..batch).map(|i| (i % plan.classes) as u8).collect();
                let mut params = artifact.params_f32();
                let mut adam = Adam::new(&params);
                let mut executor = Executor::new(&plan, ctx.threads);
                measure(&config, || {
                    executor.train_step(&params, &x, &labels, adam.step);
                    adam.update(&mut params, &executor.grads, 1e-4);
                    Ok(())
                })?
            } else {
                let mut logits = Vec::new();
                measure(&config, || engine.predict(&x, batch, &mut logits))?
            };
            let wall_s = wall.elapsed().as_secs_f64();
            let after = Usage::now();
            let repeat_throughputs: Vec<f64> = repeats
                .iter()
                .map(|r| batch as f64 * r.len() as f64 / (r.iter().sum::<f64>() / 1e6))
                .collect();
            let samples: Vec<f64> = repeats.into_iter().flatten().collect();
            let latency = LatencyStats::of(&samples).expect("at least one sample");
            let total_s: f64 = samples.iter().sum::<f64>() / 1e6;
            let throughput = batch as f64 * samples.len() as f64 / total_s;
            let first = rows
                .iter()
                .find(|r| r.batch == batch && r.mode == mode)
                .map(|r| (r.throughput_images_per_s, r.accuracy));
            rows.push(BenchRow {
                artifact: path.display().to_string(),
                sha256: record.sha256.clone(),
                precision: artifact.precision.as_str().into(),
                compute: engine.compute(),
                device: runtime.name(),
                mode: mode.into(),
                batch,
                threads: ctx.threads,
                latency_us: latency,
                throughput_images_per_s: throughput,
                cold_first_us: cold_us,
                load_ms,
                peak_rss_bytes: after.peak_rss_bytes,
                cpu_utilization: (after.cpu_s - before.cpu_s) / wall_s,
                speedup_vs_first: first.map_or(1.0, |(t, _)| throughput / t),
                accuracy,
                accuracy_drop: match (first.and_then(|(_, a)| a), accuracy) {
                    (Some(base), Some(a)) => Some(base - a),
                    _ => None,
                },
                baseline_throughput: None,
                change_vs_baseline: None,
                cv: latency.cv(),
                unstable: latency.cv() > UNSTABLE_CV,
                repeat_throughputs,
                samples_us: samples,
            });
        }
    }
    for row in &rows {
        if row.unstable {
            step.warnings.push(format!(
                "unstable: {} batch {} has a coefficient of variation of {:.0}% (over {:.0}%); the machine may be busy",
                row.artifact,
                row.batch,
                100.0 * row.cv,
                100.0 * UNSTABLE_CV
            ));
        }
    }
    if let Some(baseline) = &baseline {
        compare(&mut rows, baseline, args.max_regression, &mut step);
    }
    let doc = BenchDoc {
        mlops_version: MLOPS_VERSION.into(),
        git_commit: GIT_COMMIT.into(),
        machine: Machine::detect(),
        rows,
    };
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

/// Fills the baseline columns and adds one gate per matched row.
fn compare(rows: &mut [BenchRow], baseline: &BenchDoc, max_regression: f64, step: &mut StepReport) {
    let file_name = |p: &str| {
        Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
    };
    for row in rows.iter_mut() {
        let same =
            |b: &&BenchRow| b.batch == row.batch && b.mode == row.mode && b.device == row.device;
        let matched = baseline
            .rows
            .iter()
            .filter(same)
            .find(|b| b.sha256 == row.sha256)
            .or_else(|| {
                baseline
                    .rows
                    .iter()
                    .filter(same)
                    .find(|b| file_name(&b.artifact) == file_name(&row.artifact))
            });
        let Some(base) = matched else {
            step.warnings.push(format!(
                "no baseline row for {} batch {} ({})",
                row.artifact, row.batch, row.mode
            ));
            continue;
        };
        let change = row.throughput_images_per_s / base.throughput_images_per_s - 1.0;
        row.baseline_throughput = Some(base.throughput_images_per_s);
        row.change_vs_baseline = Some(change);
        step.gates.push(Gate {
            name: format!(
                "max_regression {} batch {} {}",
                row.artifact, row.batch, row.mode
            ),
            threshold: -max_regression,
            value: change,
            passed: change >= -max_regression,
        });
    }
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
