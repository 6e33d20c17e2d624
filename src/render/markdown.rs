//! `mlops report --format md`: the key tables of a report file as GitHub-flavoured
//! Markdown, for a CI job summary (`>> $GITHUB_STEP_SUMMARY`). No pictures: job summaries
//! do not show inline SVG; the HTML page has them.

use std::fmt::Write as _;

use super::html::{pct, subject};
use super::view::{self, file_name, PruneView, StepView};
use crate::report::ReportFile;

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn md_table<S: AsRef<str>>(header: &[&str], rows: &[Vec<S>]) -> String {
    let mut out = format!("| {} |\n|", header.join(" | "));
    for _ in header {
        out.push_str(" --- |");
    }
    out.push('\n');
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| cell(c.as_ref())).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// The Markdown for `report` (`source` names it in the heading).
pub fn render(report: &ReportFile, source: &str) -> String {
    let mut out = format!(
        "## mlops report: `{}`\n\n{} step(s), mlops {}\n\n",
        cell(source),
        report.steps.len(),
        report.mlops_version
    );
    let mut steps = Vec::new();
    let mut gates = Vec::new();
    let mut unread = Vec::new();
    for (i, s) in report.steps.iter().enumerate() {
        let key = match view::view(s) {
            StepView::Train(t) => format!(
                "test accuracy {}, {:.0} images/s, {} epoch(s)",
                pct(t.test_accuracy),
                t.images_per_s,
                t.epoch_reports.len()
            ),
            StepView::Eval(e) => format!(
                "{} accuracy {}, loss {:.4}",
                e.precision,
                pct(e.report.accuracy),
                e.report.loss
            ),
            StepView::Quantize(q) => match &q.eval {
                Some(e) => format!(
                    "int8 accuracy {} (drop {:+.2} pt), {} -> {} bytes",
                    pct(e.int8_accuracy),
                    100.0 * e.accuracy_drop,
                    q.bytes_before,
                    q.bytes_after
                ),
                None => format!("{} -> {} bytes", q.bytes_before, q.bytes_after),
            },
            StepView::Prune(p) => match p.as_ref() {
                PruneView::Magnitude(m) => format!(
                    "sparsity {}, accuracy {} -> {}",
                    pct(m.total_sparsity),
                    pct(m.accuracy_before),
                    pct(m.accuracy_after)
                ),
                PruneView::Structured(s) => format!(
                    "params {} -> {}, accuracy {} -> {}",
                    s.params_before,
                    s.params_after,
                    pct(s.accuracy_before),
                    pct(s.accuracy_after)
                ),
            },
            StepView::Bench(b) => format!("{} row(s)", b.rows.len()),
            StepView::Other => String::new(),
            StepView::Unreadable(e) => {
                unread.push(format!("step {} ({}): {e}", i + 1, s.step));
                "figures unreadable".into()
            }
        };
        steps.push(vec![
            (i + 1).to_string(),
            s.step.clone(),
            subject(s),
            format!("{:.1}", s.duration_s),
            key,
        ]);
        for g in &s.gates {
            gates.push(vec![
                (i + 1).to_string(),
                g.name.clone(),
                format!("{}", g.threshold),
                format!("{}", g.value),
                if g.passed { "passed" } else { "**FAILED**" }.into(),
            ]);
        }
    }
    out.push_str(&md_table(
        &["#", "step", "on", "seconds", "figures"],
        &steps,
    ));
    let artifacts = view::artifacts(&report.steps);
    if !artifacts.is_empty() {
        let rows: Vec<Vec<String>> = artifacts
            .iter()
            .map(|r| {
                vec![
                    file_name(&r.path),
                    r.precision.clone(),
                    r.bytes.to_string(),
                    pct(r.accuracy),
                    r.p50_b1_us.map_or("-".into(), |v| format!("{v:.1}")),
                    match (r.images_per_s, r.batch) {
                        (Some(v), Some(b)) => format!("{v:.0} (batch {b})"),
                        _ => "-".into(),
                    },
                ]
            })
            .collect();
        out.push_str("\n### Artifacts\n\n");
        out.push_str(&md_table(
            &[
                "artifact",
                "precision",
                "bytes",
                "accuracy",
                "p50 us b1",
                "images/s",
            ],
            &rows,
        ));
    }
    for s in &report.steps {
        if let StepView::Bench(doc) = view::view(s) {
            let rows: Vec<Vec<String>> = doc
                .rows
                .iter()
                .map(|r| {
                    vec![
                        file_name(&r.artifact),
                        r.mode.clone(),
                        r.batch.to_string(),
                        format!("{:.1}", r.latency_us.p50),
                        format!("{:.1}", r.latency_us.p99),
                        format!("{:.0}", r.throughput_images_per_s),
                        r.change_vs_baseline
                            .map_or("-".into(), |c| format!("{:+.1}%", 100.0 * c)),
                    ]
                })
                .collect();
            out.push_str("\n### Bench\n\n");
            out.push_str(&md_table(
                &[
                    "artifact",
                    "mode",
                    "batch",
                    "p50 us",
                    "p99 us",
                    "images/s",
                    "vs baseline",
                ],
                &rows,
            ));
        }
    }
    if !gates.is_empty() {
        out.push_str("\n### Gates\n\n");
        out.push_str(&md_table(
            &["step", "gate", "threshold", "value", "outcome"],
            &gates,
        ));
    }
    let warnings: Vec<String> = report
        .steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.warnings
                .iter()
                .map(move |w| format!("- step {} ({}): {}", i + 1, s.step, cell(w)))
        })
        .chain(unread.iter().map(|u| format!("- not drawn: {}", cell(u))))
        .collect();
    if !warnings.is_empty() {
        out.push_str("\n### Warnings\n\n");
        out.push_str(&warnings.join("\n"));
        out.push('\n');
    }
    out
}
