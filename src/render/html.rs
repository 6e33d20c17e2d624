//! `mlops report --format html`: every step of a report file as one self-contained page.
//!
//! Inline CSS and inline SVG ([`super::svg`]) only: no script, no font, no image, no link
//! to anything, so the page works offline, as a CI artifact and from an e-mail. Every
//! number drawn or tabled comes from the report; a step whose figures cannot be read is
//! shown with the reason, and a step kind with no chart shows its figures as a table.
//!
//! Charts per step: train 4 (loss, accuracy, learning rate, images/s), eval 2
//! (confusion heat map, per-class accuracy), quantize 4 (output SNR, output cosine, weight
//! scale ranges, size), prune 2 (sparsity target vs realized, accuracy) or structured 3
//! (filters kept, share kept, accuracy), bench 1 throughput chart per mode plus 1 latency
//! CDF per mode x batch, and the summary 1 (size vs accuracy vs throughput).

use std::fmt::Write as _;

use super::svg::{self, escape, Axes, Bubble, Marker, Series};
use super::view::{self, file_name, ArtifactRow, PruneView, StepView};
use crate::bench::{BenchDoc, BenchRow};
use crate::quantize::QuantizeSummary;
use crate::report::{ReportFile, StepReport};
use crate::runtime::EvalSummary;
use crate::train::TrainReport;

/// Most points of one latency CDF line (the samples are subsampled at even ranks).
pub const CDF_POINTS: usize = 200;

const STYLE: &str = "body{font-family:sans-serif;margin:24px auto;max-width:1240px;color:#222;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0 0 6px;border-bottom:2px solid #0072b2;padding-bottom:3px}
h3{font-size:15px;margin:14px 0 6px}p.meta{color:#555;margin:2px 0 10px;font-size:13px}
section{margin:26px 0}.charts{display:grid;grid-template-columns:repeat(2,600px);gap:14px 24px}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:600px}
svg.chart{background:#fcfcfc;border:1px solid #e3e3e3}
svg text{font-family:sans-serif;font-size:11px;fill:#333}svg .chart-title{font-size:13px;font-weight:bold}
svg .axis-label{font-size:12px;fill:#444}svg .tick{fill:#666;font-size:10px}
svg .grid{stroke:#e6e6e6}svg .frame{fill:none;stroke:#bbb}svg .count{font-size:10px}svg .count.light{fill:#fff}
svg .value{font-size:10px;fill:#333}svg .empty{fill:#999}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f2f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#087f23;font-weight:bold}.fail{color:#c62828;font-weight:bold}
.warn{background:#fff8e1;border-left:4px solid #e69f00;padding:4px 8px;margin:4px 0;font-size:13px}
.unreadable{background:#fdecea;border-left:4px solid #c62828;padding:4px 8px}
ul.confusions{font-size:13px;margin:4px 0}code{font-size:12px}";

/// `v` in `[0, 1]` as a percentage with two decimals (`0.98125` -> `98.13%`): how every
/// accuracy is printed in the page's tables and by [`super::markdown`].
pub fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

/// An HTML table; a cell that starts with a digit, a sign or a dot is right-aligned.
pub fn table<S: AsRef<str>>(header: &[&str], rows: &[Vec<S>]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let cell = cell.as_ref();
            let numeric = !cell.is_empty()
                && cell
                    .chars()
                    .all(|c| c.is_ascii_digit() || "+-.e% pt".contains(c));
            let class = if numeric { " class=\"num\"" } else { "" };
            let _ = write!(out, "<td{class}>{}</td>", escape(cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

fn figure(svg: String, caption: &str) -> String {
    if caption.is_empty() {
        format!("<figure>{svg}</figure>")
    } else {
        format!(
            "<figure>{svg}<figcaption>{}</figcaption></figure>",
            escape(caption)
        )
    }
}

fn charts(figures: Vec<String>) -> String {
    format!("<div class=\"charts\">{}</div>", figures.concat())
}

/// What a step worked on, in a few words (the table of contents' second column).
pub fn subject(step: &StepReport) -> String {
    match step.step.as_str() {
        "train" => step
            .metrics
            .get("model")
            .and_then(|m| m.as_str())
            .map_or_else(|| "model".into(), |m| m.to_string()),
        "bench" => format!("{} artifact(s)", step.inputs.len()),
        _ => step
            .inputs
            .first()
            .map_or_else(String::new, |f| file_name(&f.path)),
    }
}

/// The whole page for `report`; `source` names the report file in the heading.
pub fn render(report: &ReportFile, source: &str) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<header><h1>mlops report</h1><p class=\"meta\">{} · {} step(s) · written by mlops {}</p></header>",
        escape(source),
        report.steps.len(),
        escape(&report.mlops_version)
    );
    let toc: Vec<Vec<String>> = report
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vec![
                format!("{}", i + 1),
                s.step.clone(),
                subject(s),
                format!("{:.1}", s.duration_s),
                s.device.clone(),
                gates_word(s),
            ]
        })
        .collect();
    body.push_str("<section id=\"steps\"><h2>Steps</h2>");
    body.push_str(&table(
        &["#", "step", "on", "seconds", "device", "gates"],
        &toc,
    ));
    body.push_str("</section>");
    body.push_str(&summary_section(&view::artifacts(&report.steps)));
    for (i, step) in report.steps.iter().enumerate() {
        body.push_str(&step_section(i + 1, step));
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>mlops report: {}</title><style>{STYLE}</style></head><body>{body}</body></html>\n",
        escape(source)
    )
}

fn gates_word(step: &StepReport) -> String {
    if step.gates.is_empty() {
        "-".into()
    } else if step.gates_passed() {
        format!("{} passed", step.gates.len())
    } else {
        format!("{} FAILED", step.gates.iter().filter(|g| !g.passed).count())
    }
}

/// The closing summary: every evaluated artifact on one chart, and as a table.
fn summary_section(rows: &[ArtifactRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let bubbles: Vec<Bubble> = rows
        .iter()
        .map(|r| Bubble {
            label: file_name(&r.path)
                .trim_end_matches(".safetensors")
                .to_string(),
            x: r.bytes as f64 / 1024.0,
            y: 100.0 * r.accuracy,
            size: r.images_per_s,
        })
        .collect();
    let batch = rows.iter().filter_map(|r| r.batch).max();
    let size_name = match batch {
        Some(b) => format!("images/s (bench, largest batch, {b})"),
        None => "no bench step: rings".into(),
    };
    let chart = svg::bubble_chart(
        &Axes::new(
            "Artifacts: size vs accuracy vs throughput",
            "file size (KiB)",
            "test accuracy (%)",
        ),
        &bubbles,
        &size_name,
    );
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.path.clone(),
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
    format!(
        "<section id=\"summary\"><h2>Summary</h2>{}{}</section>",
        charts(vec![figure(
            chart,
            "One circle per evaluated artifact; its area is the bench throughput (hollow ring: not benchmarked)."
        )]),
        table(
            &["artifact", "precision", "bytes", "accuracy", "p50 us b1", "images/s"],
            &table_rows
        )
    )
}

fn step_section(n: usize, step: &StepReport) -> String {
    let mut out = format!(
        "<section class=\"step step-{kind}\" id=\"step-{n}\"><h2>{n}. {kind}: {}</h2><p class=\"meta\">started {} · {:.1} s · {}</p>",
        escape(&subject(step)),
        escape(&step.started_at),
        step.duration_s,
        escape(&step.device),
        kind = escape(&step.step),
    );
    let body = match view::view(step) {
        StepView::Train(t) => train(&t),
        StepView::Eval(e) => eval(&e),
        StepView::Quantize(q) => quantize(&q),
        StepView::Prune(p) => prune(&p),
        StepView::Bench(b) => bench(&b),
        StepView::Other => other(step),
        StepView::Unreadable(reason) => format!(
            "<p class=\"unreadable\">not drawn: the figures of this step do not have the schema this mlops writes ({})</p>{}",
            escape(&reason),
            other(step)
        ),
    };
    out.push_str(&body);
    if !step.gates.is_empty() {
        let rows: Vec<Vec<String>> = step
            .gates
            .iter()
            .map(|g| {
                vec![
                    g.name.clone(),
                    format!("{}", g.threshold),
                    format!("{}", g.value),
                    if g.passed { "passed" } else { "FAILED" }.into(),
                ]
            })
            .collect();
        out.push_str("<h3>Gates</h3>");
        out.push_str(&table(&["gate", "threshold", "value", "outcome"], &rows));
    }
    for w in &step.warnings {
        let _ = write!(out, "<p class=\"warn\">warning: {}</p>", escape(w));
    }
    let files: Vec<Vec<String>> = step
        .inputs
        .iter()
        .map(|f| ("in", f))
        .chain(step.outputs.iter().map(|f| ("out", f)))
        .map(|(dir, f)| {
            vec![
                dir.to_string(),
                f.path.clone(),
                f.bytes.to_string(),
                f.sha256.chars().take(12).collect(),
            ]
        })
        .collect();
    if !files.is_empty() {
        out.push_str("<h3>Files</h3>");
        out.push_str(&table(&["", "path", "bytes", "sha256"], &files));
    }
    out.push_str("</section>");
    out
}

/// Scalar figures of a step with no chart of its own.
fn other(step: &StepReport) -> String {
    let rows: Vec<Vec<String>> = match step.metrics.as_object() {
        Some(map) => map
            .iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array())
            .map(|(k, v)| {
                vec![
                    k.clone(),
                    match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                ]
            })
            .collect(),
        None => Vec::new(),
    };
    let mut out = String::from("<p class=\"meta\">no chart for this step; its figures:</p>");
    if !rows.is_empty() {
        out.push_str(&table(&["figure", "value"], &rows));
    }
    out
}

fn train(t: &TrainReport) -> String {
    let epochs: Vec<_> = t.epoch_reports.iter().collect();
    let at_epoch = |f: fn(&crate::train::EpochReport) -> f64| -> Vec<(f64, f64)> {
        epochs.iter().map(|e| (e.epoch as f64, f(e))).collect()
    };
    // The fine history when the report has one (mlops >= this version), else per epoch.
    let fine = !t.history.is_empty();
    let hist = |f: fn(&crate::train::HistoryPoint) -> f64| -> Vec<(f64, f64)> {
        t.history.iter().map(|h| (h.epoch, f(h))).collect()
    };
    let (train_loss, train_acc, lr, speed) = if fine {
        (
            hist(|h| h.train_loss),
            hist(|h| 100.0 * h.train_accuracy),
            hist(|h| h.learning_rate as f64),
            hist(|h| h.images_per_s),
        )
    } else {
        (
            at_epoch(|e| e.train_loss),
            at_epoch(|e| 100.0 * e.train_accuracy),
            at_epoch(|e| e.learning_rate as f64),
            at_epoch(|e| e.images_per_s),
        )
    };
    let line = |name: &str, points: Vec<(f64, f64)>, dots: bool| Series {
        name: name.into(),
        points,
        dots,
        dashed: false,
    };
    let train_name = if fine {
        format!(
            "train (windows of ~{} updates)",
            t.history.first().map_or(1, |h| h.step)
        )
    } else {
        "train (epoch mean)".into()
    };
    let loss = svg::line_chart(
        &Axes::new("Loss", "epoch", "cross-entropy"),
        &[
            line(&train_name, train_loss, !fine),
            line("test (after each epoch)", at_epoch(|e| e.test_loss), true),
        ],
        &[],
        true,
    );
    let acc = svg::line_chart(
        &Axes::new("Accuracy", "epoch", "accuracy (%)"),
        &[
            line(&train_name, train_acc, !fine),
            line(
                "test (after each epoch)",
                at_epoch(|e| 100.0 * e.test_accuracy),
                true,
            ),
        ],
        &[],
        false,
    );
    let lr = svg::line_chart(
        &Axes::new("Learning rate", "epoch", "learning rate"),
        &[line("learning rate", lr, !fine)],
        &[],
        true,
    );
    let speed = svg::line_chart(
        &Axes::new("Training speed", "epoch", "images/s"),
        &[line("images/s", speed, !fine)],
        &[],
        true,
    );
    let rows: Vec<Vec<String>> = t
        .epoch_reports
        .iter()
        .map(|e| {
            vec![
                e.epoch.to_string(),
                format!("{:.2e}", e.learning_rate),
                format!("{:.4}", e.train_loss),
                pct(e.train_accuracy),
                format!("{:.4}", e.test_loss),
                pct(e.test_accuracy),
                format!("{:.0}", e.images_per_s),
                format!("{:.1}", e.train_seconds),
            ]
        })
        .collect();
    format!(
        "<p class=\"meta\">{} parameters · {} training / {} test images · batch {} · {} thread(s) · test accuracy {} · {:.0} images/s</p>{}{}",
        t.params,
        t.train_images,
        t.test_images,
        t.batch_size,
        t.threads,
        pct(t.test_accuracy),
        t.images_per_s,
        charts(vec![
            figure(loss, ""),
            figure(acc, ""),
            figure(lr, ""),
            figure(speed, "")
        ]),
        table(
            &["epoch", "lr", "train loss", "train acc", "test loss", "test acc", "img/s", "s"],
            &rows
        )
    )
}

/// The largest off-diagonal cells: `(true, predicted, count)`, most first.
pub fn worst_confusions(confusion: &[Vec<u64>], count: usize) -> Vec<(usize, usize, u64)> {
    let mut cells: Vec<(usize, usize, u64)> = confusion
        .iter()
        .enumerate()
        .flat_map(|(i, row)| {
            row.iter()
                .enumerate()
                .filter(move |(j, v)| *j != i && **v > 0)
                .map(move |(j, v)| (i, j, *v))
        })
        .collect();
    cells.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    cells.truncate(count);
    cells
}

fn eval(e: &EvalSummary) -> String {
    let r = &e.report;
    let heat = svg::heat_map(
        &Axes::new("Confusion matrix", "predicted class", "true class"),
        &r.confusion,
    );
    let classes: Vec<String> = (0..r.per_class_accuracy.len())
        .map(|c| format!("class {c}"))
        .collect();
    let bars = svg::bar_chart(
        &Axes::new("Accuracy per class", "accuracy (%)", "true class"),
        &classes,
        &[(
            "accuracy".into(),
            r.per_class_accuracy
                .iter()
                .map(|a| a.map(|a| 100.0 * a))
                .collect(),
        )],
        &|v| format!("{v:.2}%"),
    );
    let mut worst = String::from("<h3>Worst confusions</h3><ul class=\"confusions\">");
    let confusions = worst_confusions(&r.confusion, 5);
    if confusions.is_empty() {
        worst.push_str("<li>none: every image was classified correctly</li>");
    }
    for (t, p, n) in confusions {
        let of = r.confusion[t].iter().sum::<u64>().max(1);
        let _ = write!(
            worst,
            "<li>true {t} predicted as {p}: {n} image(s), {} of the {t}s</li>",
            pct(n as f64 / of as f64)
        );
    }
    worst.push_str("</ul>");
    format!(
        "<p class=\"meta\">{} · accuracy <b>{}</b> · loss {:.4} · {} images · {:.0} images/s · {}</p>{}{}",
        e.precision,
        pct(r.accuracy),
        r.loss,
        r.images,
        r.images_per_s,
        escape(&e.compute),
        charts(vec![
            figure(heat, "Diagonal (blue): the row's share classified right; off-diagonal (red): mistakes, scaled to the largest."),
            figure(bars, "")
        ]),
        worst
    )
}

fn quantize(q: &QuantizeSummary) -> String {
    let r = &q.report;
    let names: Vec<String> = r.layers.iter().map(|l| l.name.clone()).collect();
    let snr = svg::bar_chart(
        &Axes::new(
            "Layer output SNR, int8 vs fp32",
            "SNR (dB, higher is closer)",
            "layer",
        ),
        &names,
        &[(
            "output SNR".into(),
            r.layers.iter().map(|l| l.output_snr_db).collect(),
        )],
        &|v| format!("{v:.1} dB"),
    );
    let cosine = svg::bar_chart(
        &Axes::new(
            "Layer output cosine, int8 vs fp32",
            "cosine similarity",
            "layer",
        ),
        &names,
        &[(
            "output cosine".into(),
            r.layers.iter().map(|l| l.output_cosine).collect(),
        )],
        &|v| format!("{v:.5}"),
    );
    let scales = svg::range_chart(
        &Axes::new(
            "Weight scales per layer (min..max over channels)",
            "scale (log10)",
            "layer",
        ),
        &names,
        &r.layers
            .iter()
            .map(|l| l.weight_scale_range.map(|[a, b]| (a as f64, b as f64)))
            .collect::<Vec<_>>(),
    );
    let size = svg::bar_chart(
        &Axes::new("File size", "KiB", "file"),
        &["before (input)".into(), "after (int8)".into()],
        &[(
            "size".into(),
            vec![
                Some(q.bytes_before as f64 / 1024.0),
                Some(q.bytes_after as f64 / 1024.0),
            ],
        )],
        &|v| format!("{v:.1} KiB"),
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut rows = vec![
        vec![
            "top-1 agreement (logits)".to_string(),
            or_dash(q.comparison.top1_agreement.map(pct)),
        ],
        vec![
            "logits cosine".into(),
            or_dash(q.comparison.logits_cosine.map(|c| format!("{c:.5}"))),
        ],
        vec![
            "compared on".into(),
            format!("{} {} image(s)", q.comparison.images, q.comparison.data),
        ],
    ];
    if let Some(e) = &q.eval {
        rows.extend([
            vec!["fp32 accuracy".into(), pct(e.fp32_accuracy)],
            vec!["int8 accuracy".into(), pct(e.int8_accuracy)],
            vec![
                "accuracy drop".into(),
                format!("{:+.2} pt", 100.0 * e.accuracy_drop),
            ],
            vec!["top-1 agreement (eval)".into(), pct(e.top1_agreement)],
            vec![
                "worst class".into(),
                or_dash(
                    e.worst_class
                        .map(|w| format!("{} ({:+.2} pt)", w.class, 100.0 * w.drop)),
                ),
            ],
        ]);
    }
    rows.extend([
        vec!["bytes before".into(), q.bytes_before.to_string()],
        vec!["bytes after".into(), q.bytes_after.to_string()],
        vec!["size ratio".into(), format!("{:.3}", q.size_ratio)],
    ]);
    let layer_rows: Vec<Vec<String>> = r
        .layers
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                l.precision.as_str().to_string(),
                or_dash(
                    l.weight_scale_range
                        .map(|r| format!("{:.2e}..{:.2e}", r[0], r[1])),
                ),
                or_dash(l.weight_snr_db.map(|d| format!("{d:.1}"))),
                or_dash(l.output_snr_db.map(|d| format!("{d:.1}"))),
                or_dash(l.output_cosine.map(|c| format!("{c:.5}"))),
                l.bytes_fp32.to_string(),
                l.bytes_stored.to_string(),
            ]
        })
        .collect();
    format!(
        "<p class=\"meta\">{} {} weights, {} activations, {} calibration image(s), {:.2} bits/weight · {}</p>{}<h3>int8 vs fp32</h3>{}<h3>Layers</h3>{}",
        escape(&r.weight_scheme),
        escape(&r.method),
        escape(&r.activations),
        r.samples,
        r.bits_per_weight,
        escape(&q.compute),
        charts(vec![
            figure(
                snr,
                if r.layers.iter().any(|l| l.output_snr_db.is_none()) {
                    "n/a: a layer kept in fp32, or no data to compare on."
                } else {
                    ""
                }
            ),
            figure(cosine, ""),
            figure(scales, ""),
            figure(size, "")
        ]),
        table(&["figure", "value"], &rows),
        table(
            &["layer", "runs in", "w scale min..max", "w SNR dB", "out SNR dB", "out cosine", "bytes fp32", "bytes stored"],
            &layer_rows
        )
    )
}

fn accuracy_bars(labels: &[&str], values: &[Option<f64>]) -> String {
    svg::bar_chart(
        &Axes::new("Accuracy before and after", "test accuracy (%)", "model"),
        &labels.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        &[(
            "accuracy".into(),
            values.iter().map(|v| v.map(|v| 100.0 * v)).collect(),
        )],
        &|v| format!("{v:.2}%"),
    )
}

fn prune(p: &PruneView) -> String {
    match p {
        PruneView::Magnitude(m) => {
            let names: Vec<String> = m.layers.iter().map(|l| l.name.clone()).collect();
            let sparsity = svg::bar_chart(
                &Axes::new("Sparsity per layer", "zeros (%)", "weight"),
                &names,
                &[
                    (
                        "target".into(),
                        m.layers
                            .iter()
                            .map(|l| {
                                Some(if l.pruned {
                                    100.0 * m.target_sparsity
                                } else {
                                    0.0
                                })
                            })
                            .collect(),
                    ),
                    (
                        "realized".into(),
                        m.layers.iter().map(|l| Some(100.0 * l.sparsity)).collect(),
                    ),
                ],
                &|v| format!("{v:.1}%"),
            );
            let acc = accuracy_bars(
                &["before", "after"],
                &[Some(m.accuracy_before), Some(m.accuracy_after)],
            );
            let rows = vec![
                vec!["target sparsity".to_string(), pct(m.target_sparsity)],
                vec!["total sparsity".into(), pct(m.total_sparsity)],
                vec!["accuracy before".into(), pct(m.accuracy_before)],
                vec!["accuracy after".into(), pct(m.accuracy_after)],
                vec!["bytes before".into(), m.bytes_before.to_string()],
                vec!["bytes after".into(), m.bytes_after.to_string()],
                vec!["gzip bytes before".into(), m.gzip_bytes_before.to_string()],
                vec!["gzip bytes after".into(), m.gzip_bytes_after.to_string()],
                vec!["fine-tuning updates".into(), m.fine_tune_steps.to_string()],
            ];
            let layer_rows: Vec<Vec<String>> = m
                .layers
                .iter()
                .map(|l| {
                    vec![
                        l.name.clone(),
                        l.params.to_string(),
                        if l.pruned { "yes" } else { "no" }.into(),
                        pct(l.sparsity),
                    ]
                })
                .collect();
            format!(
                "<p class=\"meta\">magnitude pruning to {} sparsity</p>{}{}{}",
                pct(m.target_sparsity),
                charts(vec![
                    figure(sparsity, "Target: 0 for weights left unpruned."),
                    figure(acc, "")
                ]),
                table(&["figure", "value"], &rows),
                table(&["weight", "params", "pruned", "sparsity"], &layer_rows)
            )
        }
        PruneView::Structured(s) => {
            let names: Vec<String> = s
                .plan
                .iter()
                .map(|c| format!("layer {} {}", c.layer, c.kind))
                .collect();
            let units = svg::bar_chart(
                &Axes::new("Filters / units per layer", "count", "layer"),
                &names,
                &[
                    (
                        "before".into(),
                        s.plan.iter().map(|c| Some(c.before as f64)).collect(),
                    ),
                    (
                        "kept".into(),
                        s.plan.iter().map(|c| Some(c.kept as f64)).collect(),
                    ),
                ],
                &|v| format!("{v:.0}"),
            );
            // Per weighted layer (a layer after a cut one shrinks too), then the model.
            let mut cost_names: Vec<String> = s
                .layers
                .iter()
                .map(|l| format!("layer {} {}", l.layer, l.kind))
                .collect();
            cost_names.push("model".into());
            let with_total = |per: Vec<u64>, total: u64| -> Vec<Option<f64>> {
                per.into_iter()
                    .chain([total])
                    .map(|v| Some(v as f64))
                    .collect()
            };
            let params_chart = svg::bar_chart(
                &Axes::new("Parameters per layer", "parameters", "layer"),
                &cost_names,
                &[
                    (
                        "before".into(),
                        with_total(
                            s.layers.iter().map(|l| l.params_before).collect(),
                            s.params_before,
                        ),
                    ),
                    (
                        "after".into(),
                        with_total(
                            s.layers.iter().map(|l| l.params_after).collect(),
                            s.params_after,
                        ),
                    ),
                ],
                &|v| format!("{v:.0}"),
            );
            let flops_chart = svg::bar_chart(
                &Axes::new("FLOPs per image per layer", "MFLOP", "layer"),
                &cost_names,
                &[
                    (
                        "before".into(),
                        with_total(
                            s.layers.iter().map(|l| l.flops_before).collect(),
                            s.flops_before,
                        )
                        .into_iter()
                        .map(|v| v.map(|f| f / 1e6))
                        .collect(),
                    ),
                    (
                        "after".into(),
                        with_total(
                            s.layers.iter().map(|l| l.flops_after).collect(),
                            s.flops_after,
                        )
                        .into_iter()
                        .map(|v| v.map(|f| f / 1e6))
                        .collect(),
                    ),
                ],
                &|v| format!("{v:.3}"),
            );
            let layer_rows: Vec<Vec<String>> = s
                .layers
                .iter()
                .map(|l| {
                    let kept = s
                        .plan
                        .iter()
                        .find(|c| c.layer == l.layer)
                        .map_or("-".to_string(), |c| format!("{} of {}", c.kept, c.before));
                    vec![
                        format!("layers.{}", l.layer),
                        l.kind.clone(),
                        kept,
                        l.params_before.to_string(),
                        l.params_after.to_string(),
                        l.flops_before.to_string(),
                        l.flops_after.to_string(),
                    ]
                })
                .collect();
            let acc = accuracy_bars(
                &["before", "after cut", "after fine-tuning"],
                &[
                    Some(s.accuracy_before),
                    s.accuracy_after_pruning,
                    Some(s.accuracy_after),
                ],
            );
            let rows = vec![
                vec!["target sparsity".to_string(), pct(s.target_sparsity)],
                vec!["filters/units removed".into(), pct(s.sparsity)],
                vec!["params before".into(), s.params_before.to_string()],
                vec!["params after".into(), s.params_after.to_string()],
                vec!["FLOPs/image before".into(), s.flops_before.to_string()],
                vec!["FLOPs/image after".into(), s.flops_after.to_string()],
                vec!["bytes before".into(), s.bytes_before.to_string()],
                vec!["bytes after".into(), s.bytes_after.to_string()],
                vec!["accuracy before".into(), pct(s.accuracy_before)],
                vec![
                    "accuracy after cut".into(),
                    s.accuracy_after_pruning.map_or("-".into(), pct),
                ],
                vec!["accuracy after".into(), pct(s.accuracy_after)],
            ];
            format!(
                "<p class=\"meta\">structured pruning: whole filters / units removed (structured = {})</p>{}{}{}",
                s.structured,
                charts(vec![
                    figure(units, ""),
                    figure(params_chart, if s.layers.is_empty() {
                        "This report has no per-layer split (written before mlops recorded one): the model's total only."
                    } else {
                        "A layer after a cut one shrinks too: it has fewer inputs."
                    }),
                    figure(flops_chart, ""),
                    figure(
                        acc,
                        if s.accuracy_after_pruning.is_none() {
                            "n/a: no fine-tuning, so no accuracy right after the cut was measured separately."
                        } else {
                            ""
                        }
                    )
                ]),
                table(&["figure", "value"], &rows),
                table(
                    &[
                        "layer",
                        "type",
                        "outputs kept",
                        "params before",
                        "params after",
                        "FLOPs before",
                        "FLOPs after"
                    ],
                    &layer_rows
                )
            )
        }
    }
}

/// Evenly spaced ranks of the sorted samples as `(µs, cumulative share)` points, at most
/// [`CDF_POINTS`], and only up to `clip` µs.
fn cdf(samples: &[f64], clip: f64) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let m = n.min(CDF_POINTS);
    (0..m)
        .map(|k| if m == 1 { n - 1 } else { k * (n - 1) / (m - 1) })
        .map(|i| (sorted[i], (i + 1) as f64 / n as f64))
        .filter(|p| p.0 <= clip)
        .collect()
}

fn bench(doc: &BenchDoc) -> String {
    let mut figures = Vec::new();
    let mut modes: Vec<&str> = doc.rows.iter().map(|r| r.mode.as_str()).collect();
    modes.dedup();
    modes.sort_unstable();
    modes.dedup();
    for mode in modes {
        let rows: Vec<&BenchRow> = doc.rows.iter().filter(|r| r.mode == mode).collect();
        let mut artifacts: Vec<&str> = Vec::new();
        let mut batches: Vec<usize> = Vec::new();
        for r in &rows {
            if !artifacts.contains(&r.artifact.as_str()) {
                artifacts.push(&r.artifact);
            }
            if !batches.contains(&r.batch) {
                batches.push(r.batch);
            }
        }
        let find = |a: &str, b: usize| rows.iter().find(|r| r.artifact == a && r.batch == b);
        let series: Vec<(String, Vec<Option<f64>>)> = batches
            .iter()
            .map(|&b| {
                (
                    format!("batch {b}"),
                    artifacts
                        .iter()
                        .map(|a| find(a, b).map(|r| r.throughput_images_per_s))
                        .collect(),
                )
            })
            .collect();
        figures.push(figure(
            svg::bar_chart(
                &Axes::new(&format!("Throughput ({mode})"), "images/s", "artifact"),
                &artifacts.iter().map(|a| file_name(a)).collect::<Vec<_>>(),
                &series,
                &|v| format!("{v:.0}"),
            ),
            "",
        ));
        for &b in &batches {
            let at_batch: Vec<&&BenchRow> = rows.iter().filter(|r| r.batch == b).collect();
            let clip = 1.25
                * at_batch
                    .iter()
                    .map(|r| r.latency_us.p99)
                    .fold(0.0f64, f64::max);
            let beyond: usize = at_batch
                .iter()
                .map(|r| r.samples_us.iter().filter(|s| **s > clip).count())
                .sum();
            let series: Vec<Series> = at_batch
                .iter()
                .map(|r| Series {
                    name: file_name(&r.artifact),
                    points: cdf(&r.samples_us, clip),
                    dots: false,
                    dashed: false,
                })
                .collect();
            let markers: Vec<Marker> = at_batch
                .iter()
                .enumerate()
                .flat_map(|(i, r)| {
                    [
                        Marker {
                            series: i,
                            x: r.latency_us.p50,
                            y: 0.5,
                            label: "p50".into(),
                        },
                        Marker {
                            series: i,
                            x: r.latency_us.p99,
                            y: 0.99,
                            label: "p99".into(),
                        },
                    ]
                })
                .collect();
            let samples: usize = at_batch.iter().map(|r| r.samples_us.len()).sum();
            figures.push(figure(
                svg::line_chart(
                    &Axes::new(
                        &format!("Latency distribution ({mode}, batch {b})"),
                        "latency per call (µs)",
                        "share of calls at or below",
                    ),
                    &series,
                    &markers,
                    true,
                ),
                &format!(
                    "Cumulative share of {samples} timed calls; hollow circles mark p50, squares p99. The x axis ends at 1.25 × the largest p99 ({} call(s) beyond it not drawn).",
                    beyond
                ),
            ));
        }
    }
    let rows: Vec<Vec<String>> = doc
        .rows
        .iter()
        .map(|r| {
            vec![
                r.artifact.clone(),
                r.precision.clone(),
                r.mode.clone(),
                r.batch.to_string(),
                format!("{:.1}", r.latency_us.p50),
                format!("{:.1}", r.latency_us.p99),
                format!("{:.0}", r.throughput_images_per_s),
                format!("{:.2}", r.speedup_vs_first),
                format!("{:.3}", r.cv),
                r.change_vs_baseline
                    .map_or("-".into(), |c| format!("{:+.1}%", 100.0 * c)),
                r.samples_us.len().to_string(),
            ]
        })
        .collect();
    let m = &doc.machine;
    let machine = vec![
        vec!["cpu".to_string(), m.cpu.clone()],
        vec!["cores".into(), m.cores.to_string()],
        vec!["simd".into(), m.simd.join(", ")],
        vec!["gpu".into(), m.gpu.clone().unwrap_or_else(|| "-".into())],
        vec![
            "driver".into(),
            m.driver.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["mlops".into(), doc.mlops_version.clone()],
        vec!["commit".into(), doc.git_commit.clone()],
    ];
    format!(
        "{}<h3>Rows</h3>{}<h3>Machine</h3>{}",
        charts(figures),
        table(
            &[
                "artifact",
                "precision",
                "mode",
                "batch",
                "p50 us",
                "p99 us",
                "images/s",
                "speedup",
                "cv",
                "vs baseline",
                "samples"
            ],
            &rows
        ),
        table(&["fact", "value"], &machine)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_bounded_monotone_and_ends_at_one() {
        let samples: Vec<f64> = (0..1000).rev().map(f64::from).collect();
        let points = cdf(&samples, f64::INFINITY);
        assert_eq!(points.len(), CDF_POINTS);
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert_eq!(points.last().copied(), Some((999.0, 1.0)));
        assert_eq!(points[0], (0.0, 0.001));
        assert_eq!(
            cdf(&samples, 499.5).last().map(|p| p.0 <= 499.5),
            Some(true)
        );
    }

    #[test]
    fn worst_confusions_are_off_diagonal_and_sorted() {
        let m = vec![vec![50, 2, 7], vec![0, 40, 1], vec![7, 0, 30]];
        assert_eq!(worst_confusions(&m, 2), vec![(0, 2, 7), (2, 0, 7)]);
        assert!(worst_confusions(&[vec![3]], 5).is_empty());
    }
}
