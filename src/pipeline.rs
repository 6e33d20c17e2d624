//! The pipeline's closing summary: one row per evaluated artifact (size and accuracy
//! against the first fp32 one, and the bench step's batch-1 latency and batch-64
//! throughput), read from the steps' typed reports.

use crate::artifact::Precision;
use crate::bench::{BenchDoc, BenchRow};
use crate::report::table::Table;
use crate::report::StepReport;
use crate::runtime::EvalSummary;
use crate::train::TrainReport;
use crate::{Error, Result};

/// A step report whose figures do not have the schema this mlops writes.
fn unreadable(e: serde_json::Error) -> Error {
    Error::Config(format!(
        "a step report does not have the schema this mlops writes ({e})"
    ))
}

/// The summary table of a pipeline run's `reports`.
///
/// # Errors
/// A train, eval or bench report that does not deserialize into its typed report (a
/// renamed field is an error here, never a silent 0.00%).
pub fn summary(reports: &[StepReport]) -> Result<String> {
    let mut bench_rows: Vec<BenchRow> = Vec::new();
    for r in reports.iter().filter(|r| r.step == "bench") {
        let doc: BenchDoc = serde_json::from_value(r.metrics.clone()).map_err(unreadable)?;
        bench_rows.extend(doc.rows.into_iter().filter(|r| r.mode == "infer"));
    }
    let bench_cell = |artifact: &str, batch: usize, f: &dyn Fn(&BenchRow) -> String| {
        bench_rows
            .iter()
            .find(|r| r.artifact == artifact && r.batch == batch)
            .map_or("-".to_string(), f)
    };
    let mut table = Table::new([
        "artifact",
        "precision",
        "bytes",
        "size vs fp32",
        "accuracy",
        "vs fp32",
        "p50 us b1",
        "p99 us b1",
        "images/s b64",
    ]);
    // Typed: a renamed field is an error here, never a silent 0.00%.
    let evals = reports
        .iter()
        .filter(|r| r.step == "eval")
        .map(|r| Ok((r, serde_json::from_value::<EvalSummary>(r.metrics.clone())?)))
        .collect::<std::result::Result<Vec<_>, serde_json::Error>>()
        .map_err(unreadable)?;
    let baseline = evals
        .iter()
        .find(|(_, e)| e.precision == Precision::Fp32)
        .map(|(r, e)| (r.inputs[0].bytes as f64, e.report.accuracy));
    for (r, e) in &evals {
        let bytes = r.inputs[0].bytes as f64;
        let accuracy = e.report.accuracy;
        let (size, delta) = match baseline {
            Some((b_bytes, b_acc)) => (
                format!("{:.1}%", 100.0 * bytes / b_bytes),
                format!("{:+.2} pt", 100.0 * (accuracy - b_acc)),
            ),
            None => ("-".into(), "-".into()),
        };
        let path = r.inputs[0].path.clone();
        table.row([
            path.clone(),
            e.precision.to_string(),
            format!("{}", bytes as u64),
            size,
            format!("{:.2}%", 100.0 * accuracy),
            delta,
            bench_cell(&path, 1, &|b| format!("{:.1}", b.latency_us.p50)),
            bench_cell(&path, 1, &|b| format!("{:.1}", b.latency_us.p99)),
            bench_cell(&path, 64, &|b| format!("{:.0}", b.throughput_images_per_s)),
        ]);
    }
    let train = match reports.iter().find(|r| r.step == "train") {
        Some(r) => {
            let t: TrainReport = serde_json::from_value(r.metrics.clone()).map_err(unreadable)?;
            format!(
                "training: {:.0} images/s, {:.1} s in all\n",
                t.images_per_s, r.duration_s
            )
        }
        None => String::new(),
    };
    Ok(format!("\n== summary\n{train}{table}"))
}
