//! `mlops bench`'s output formats: a table for people, markdown for CI summaries, and
//! csv / json / jsonl for scripts (every timed sample included), from one [`BenchDoc`].

use std::io::Write;

use super::{BenchDoc, BenchRow};
use crate::report::table::Table;

/// How a bench document is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns and the machine line.
    Table,
    /// A markdown table (GitHub step summaries).
    Md,
    /// One row per line, flat columns, samples joined by `;`.
    Csv,
    /// The document, pretty-printed.
    Json,
    /// One flat JSON object per row, samples included.
    Jsonl,
}

/// Writes `doc` to `out` as `format`.
///
/// # Errors
/// The writer's error (a closed pipe, a full disk).
pub fn write_doc(out: &mut dyn Write, doc: &BenchDoc, format: OutputFormat) -> std::io::Result<()> {
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, doc).map_err(std::io::Error::other)?;
            writeln!(out)?;
        }
        OutputFormat::Jsonl => {
            for row in &doc.rows {
                let mut value = flat_row(doc, row);
                value.insert("samples_us".into(), row.samples_us.clone().into());
                writeln!(out, "{}", serde_json::Value::Object(value))?;
            }
        }
        OutputFormat::Csv => {
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
        OutputFormat::Table | OutputFormat::Md => {
            let table = human_table(doc);
            if format == OutputFormat::Md {
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

/// The table people read (also the markdown format's rows).
pub fn human_table(doc: &BenchDoc) -> Table {
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
                // The drop as in JSON: first artifact minus this one, positive when lost.
                r.accuracy_drop
                    .map_or("-".into(), |d| format!("{:+.2} pt", 100.0 * d)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{machine::Machine, LatencyStats};

    fn row(artifact: &str, accuracy: f64, drop: Option<f64>) -> BenchRow {
        let latency = LatencyStats::of(&[10.0, 11.0]).unwrap();
        BenchRow {
            artifact: artifact.into(),
            sha256: String::new(),
            precision: "fp32".into(),
            compute: String::new(),
            device: "cpu".into(),
            mode: "infer".into(),
            batch: 1,
            threads: 1,
            latency_us: latency,
            throughput_images_per_s: 1.0,
            cold_first_us: 1.0,
            load_ms: 1.0,
            peak_rss_bytes: 0,
            cpu_utilization: 1.0,
            speedup_vs_first: 1.0,
            accuracy: Some(accuracy),
            accuracy_drop: drop,
            baseline_throughput: None,
            change_vs_baseline: None,
            timing_us: None,
            cv: 0.0,
            unstable: false,
            repeat_throughputs: Vec::new(),
            samples_us: vec![10.0, 11.0],
        }
    }

    /// Issue 10's sign convention, everywhere: the table's `drop` column printed
    /// `-100 * accuracy_drop` (a loss showed as `-0.50 pt`); it has the JSON's sign now.
    #[test]
    fn the_drop_column_has_the_sign_of_the_json() {
        let doc = BenchDoc {
            mlops_version: "x".into(),
            git_commit: "x".into(),
            machine: Machine::detect(),
            rows: vec![row("a", 0.99, None), row("b", 0.985, Some(0.005))],
        };
        let text = human_table(&doc).to_string();
        assert!(text.contains("+0.50 pt"), "{text}");
    }
}
