//! `mlops report` (HTML and Markdown), the pipeline's report.html, `--html` on step
//! commands, and the CI examples of `examples/ci/` run locally on the tiny data.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{mlops, tiny_data, trained_model};

/// The pipeline's page for a tiny run of every step kind that draws, shared by the tests.
fn tiny_pipeline() -> &'static (tempfile::TempDir, PathBuf, String) {
    static RUN: std::sync::OnceLock<(tempfile::TempDir, PathBuf, String)> =
        std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "data: {}\nout: tiny\nsteps:\n  - {{run: train, epochs: 2, batch_size: 32}}\n  - {{run: export, precision: fp16}}\n  - {{run: quantize, int8: true, calib_samples: 64}}\n  - {{run: prune, sparsity: 0.5}}\n  - {{run: prune, structured: true, sparsity: 0.5}}\n  - {{run: eval, artifact: model.safetensors}}\n  - {{run: eval, artifact: model.int8.safetensors}}\n  - {{run: bench, artifacts: [model.safetensors, model.int8.safetensors], batch: [1, 4], duration: 0, iters: 30}}\n",
            tiny_data().display()
        );
        std::fs::write(dir.path().join("p.yaml"), config).unwrap();
        let output = mlops(dir.path())
            .args(["pipeline", "p.yaml"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "{stderr}");
        let html = dir.path().join("tiny/report.html");
        (dir, html, stderr)
    })
}

fn report_json(html: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(html.with_extension("json")).unwrap()).unwrap()
}

/// The page's step sections, in order: `(step kind, its HTML)`.
fn sections(page: &str) -> Vec<(String, String)> {
    page.split("<section class=\"step step-")
        .skip(1)
        .map(|s| {
            let kind = s.split('"').next().unwrap().to_string();
            (kind, s.split("</section>").next().unwrap().to_string())
        })
        .collect()
}

fn svg_titles(html: &str) -> Vec<String> {
    html.split("<svg ")
        .skip(1)
        .map(|s| {
            s.split("<title>")
                .nth(1)
                .unwrap()
                .split("</title>")
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Asserts the page loads nothing: no scripts, no links, no URLs of any kind.
fn assert_self_contained(page: &str) {
    for needle in [
        "http://", "https://", "<script", "<link", "src=", "href=", "url(", "@import", "<img",
        "<iframe",
    ] {
        assert!(!page.contains(needle), "the page contains `{needle}`");
    }
}

#[test]
fn pipeline_writes_report_html_with_a_chart_per_figure() {
    let (_, html, stderr) = tiny_pipeline();
    assert!(
        stderr.contains(&format!("html report: `{}`", "tiny/report.html")),
        "{stderr}"
    );
    let page = std::fs::read_to_string(html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert_self_contained(&page);
    assert!(page.len() < 1_000_000, "{} bytes", page.len());
    let report = report_json(html);
    let steps = report["steps"].as_array().unwrap();
    let sections = sections(&page);
    let kinds: Vec<&str> = sections.iter().map(|(k, _)| k.as_str()).collect();
    let expected: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(kinds, expected, "one section per step, in order");
    let expected_titles: [(&str, &[&str]); 8] = [
        (
            "train",
            &["Loss", "Accuracy", "Learning rate", "Training speed"],
        ),
        ("export", &[]),
        (
            "quantize",
            &[
                "Layer output SNR, int8 vs fp32",
                "Layer output cosine, int8 vs fp32",
                "Weight scales per layer (min..max over channels)",
                "File size",
            ],
        ),
        (
            "prune",
            &["Sparsity per layer", "Accuracy before and after"],
        ),
        (
            "prune",
            &[
                "Filters / units per layer",
                "Parameters per layer",
                "FLOPs per image per layer",
                "Accuracy before and after",
            ],
        ),
        ("eval", &["Confusion matrix", "Accuracy per class"]),
        ("eval", &["Confusion matrix", "Accuracy per class"]),
        (
            "bench",
            &[
                "Throughput (infer)",
                "Latency distribution (infer, batch 1)",
                "Latency distribution (infer, batch 4)",
            ],
        ),
    ];
    for ((kind, html), (want_kind, titles)) in sections.iter().zip(expected_titles) {
        assert_eq!(kind, want_kind);
        assert_eq!(svg_titles(html), titles, "charts of the {kind} step");
        // Every chart names both its axes.
        assert_eq!(
            html.matches("class=\"axis-label\"").count(),
            2 * titles.len(),
            "{kind}"
        );
    }
    let summary = page.split("<section id=\"summary\">").nth(1).unwrap();
    let summary = summary.split("</section>").next().unwrap();
    assert_eq!(
        svg_titles(summary),
        ["Artifacts: size vs accuracy vs throughput"]
    );
    assert_eq!(svg_titles(&page).len(), 1 + 4 + 4 + 2 + 4 + 2 + 2 + 3);
    // The numbers in the tables are the report's.
    let pct = |v: &Value| format!("{:.2}%", 100.0 * v.as_f64().unwrap());
    let section = |i: usize| &sections[i].1;
    assert!(section(0).contains(&pct(&steps[0]["metrics"]["test_accuracy"])));
    for e in &steps[0]["metrics"]["epoch_reports"].as_array().unwrap()[..] {
        assert!(section(0).contains(&format!(">{:.4}<", e["train_loss"].as_f64().unwrap())));
    }
    let q = &steps[2]["metrics"];
    assert!(section(2).contains(&format!(">{}<", q["bytes_after"])));
    assert!(section(2).contains(&pct(&q["comparison"]["top1_agreement"])));
    // Structured pruning: params and FLOPs per weighted layer, before and after, adding
    // up to the model's; the layer after a cut one shrinks too.
    let s = &steps[4]["metrics"];
    let layers = s["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5, "every conv and dense layer: {layers:?}");
    for (key, total) in [
        ("params_before", "params_before"),
        ("params_after", "params_after"),
        ("flops_before", "flops_before"),
        ("flops_after", "flops_after"),
    ] {
        let sum: u64 = layers.iter().map(|l| l[key].as_u64().unwrap()).sum();
        assert_eq!(sum, s[total].as_u64().unwrap(), "{key}");
    }
    for l in layers {
        for key in [
            "params_before",
            "params_after",
            "flops_before",
            "flops_after",
        ] {
            assert!(
                section(4).contains(&format!(">{}<", l[key])),
                "{key} of {l}"
            );
        }
    }
    let cut = s["plan"][0]["layer"].as_u64().unwrap();
    let next = layers
        .iter()
        .find(|l| l["layer"].as_u64().unwrap() > cut)
        .unwrap();
    assert!(next["params_after"].as_u64() < next["params_before"].as_u64());
    for (i, step) in [(5, &steps[5]), (6, &steps[6])] {
        let m = &step["metrics"];
        assert!(section(i).contains(&format!("<b>{}</b>", pct(&m["accuracy"]))));
        // Every count of the confusion matrix is in its heat map.
        let counts: u64 = m["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
            .sum();
        assert_eq!(counts, m["images"].as_u64().unwrap());
        let drawn: u64 = section(i)
            .split("class=\"count")
            .skip(1)
            .map(|s| s.split('>').nth(1).unwrap().split('<').next().unwrap())
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        assert_eq!(drawn, counts);
    }
    let rows = steps[7]["metrics"]["rows"].as_array().unwrap();
    for row in rows {
        let p50 = format!(">{:.1}<", row["latency_us"]["p50"].as_f64().unwrap());
        let tput = format!(">{:.0}<", row["throughput_images_per_s"].as_f64().unwrap());
        assert!(
            section(7).contains(&p50) && section(7).contains(&tput),
            "{p50} {tput}"
        );
    }
    assert!(section(7).contains(&format!(">{}<", steps[7]["metrics"]["machine"]["cores"])));
    // The byte-stable renderer: the same report gives the same page.
    let (dir, _, _) = tiny_pipeline();
    mlops(dir.path())
        .args(["report", "tiny/report.json", "--out", "tiny/again.html"])
        .assert()
        .success();
    let again = std::fs::read_to_string(dir.path().join("tiny/again.html")).unwrap();
    assert_eq!(again, page);
}

#[test]
fn training_history_is_finer_than_epochs_and_small() {
    let (_dir, html, _) = tiny_pipeline();
    let report = report_json(html);
    let train = &report["steps"][0]["metrics"];
    let history = train["history"].as_array().unwrap();
    // 512 images at batch 32: 16 updates per epoch, 2 epochs: a point per update.
    assert_eq!(history.len(), 32);
    let steps: Vec<u64> = history
        .iter()
        .map(|h| h["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=32).collect::<Vec<_>>());
    assert_eq!(history[15]["epoch"].as_f64(), Some(1.0));
    assert_eq!(history[31]["epoch"].as_f64(), Some(2.0));
    for h in history {
        for key in [
            "train_loss",
            "train_accuracy",
            "images_per_s",
            "learning_rate",
        ] {
            assert!(h[key].as_f64().unwrap().is_finite(), "{key}: {h}");
        }
    }
    // The windows' images add up to the epochs' figures: per epoch, the mean of the
    // 16 one-update windows (32 images each) is the epoch's mean loss.
    let e1 = &train["epoch_reports"][0];
    let mean: f64 = history[..16]
        .iter()
        .map(|h| h["train_loss"].as_f64().unwrap())
        .sum::<f64>()
        / 16.0;
    assert!((mean - e1["train_loss"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn report_md_has_the_key_tables() {
    let (_dir, html, _) = tiny_pipeline();
    let report = report_json(html);
    let output = mlops(Path::new("."))
        .arg("report")
        .arg(html.with_extension("json"))
        .args(["--format", "md"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let md = String::from_utf8(output.stdout).unwrap();
    assert!(md.contains("| # | step | on | seconds | figures |"), "{md}");
    assert!(
        md.contains("### Artifacts") && md.contains("### Bench"),
        "{md}"
    );
    let eval = &report["steps"][5]["metrics"];
    assert!(md.contains(&format!(
        "| model.safetensors | fp32 | {} | {:.2}% |",
        report["steps"][5]["inputs"][0]["bytes"],
        100.0 * eval["accuracy"].as_f64().unwrap()
    )));
    let bench_rows = report["steps"][7]["metrics"]["rows"].as_array().unwrap();
    assert_eq!(
        md.lines()
            .filter(|l| l.starts_with("| model.") && l.contains("| infer |"))
            .count(),
        bench_rows.len()
    );
    assert!(!md.contains("<svg"));
}

#[test]
fn step_commands_write_html_with_their_charts() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model();
    mlops(dir.path())
        .arg("quantize")
        .arg(&model)
        .args(["--int8", "--calib-samples", "32", "--out", "q.safetensors"])
        .arg("--calib")
        .arg(tiny_data())
        .args(["--html", "q.html"])
        .assert()
        .success();
    let page = std::fs::read_to_string(dir.path().join("q.html")).unwrap();
    assert_self_contained(&page);
    assert_eq!(svg_titles(&page).len(), 4, "quantize draws 4 charts");
    mlops(dir.path())
        .arg("bench")
        .arg(&model)
        .arg("q.safetensors")
        .args(["--batch", "2", "--duration", "0", "--iters", "5"])
        .args(["--html", "b.html", "--format", "json"])
        .assert()
        .success();
    let page = std::fs::read_to_string(dir.path().join("b.html")).unwrap();
    assert_eq!(
        svg_titles(&page),
        [
            "Throughput (infer)",
            "Latency distribution (infer, batch 2)"
        ]
    );
    // Both artifacts' CDF lines, with a p50 and a p99 marker each.
    assert_eq!(page.matches("class=\"series\"").count(), 2);
    assert_eq!(page.matches(">p50</text>").count(), 2);
    assert_eq!(page.matches(">p99</text>").count(), 2);
}

#[test]
fn a_step_that_cannot_be_read_is_listed_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let report = serde_json::json!({
        "mlops_version": "0.0.0",
        "steps": [{
            "step": "eval", "started_at": "2024-01-01T00:00:00Z", "duration_s": 1.0,
            "device": "cpu", "inputs": [], "outputs": [],
            "metrics": {"accuracy": "high"}, "gates": [], "warnings": []
        }]
    });
    std::fs::write(dir.path().join("r.json"), report.to_string()).unwrap();
    let output = mlops(dir.path())
        .args(["report", "r.json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("step 1 (eval) not drawn"), "{stderr}");
    let page = std::fs::read_to_string(dir.path().join("r.html")).unwrap();
    assert!(page.contains("not drawn: the figures of this step"));
    assert!(page.contains("<td>accuracy</td><td>high</td>"));
    std::fs::write(dir.path().join("x.json"), "{\"rows\": []}").unwrap();
    let output = mlops(dir.path())
        .args(["report", "x.json"])
        .output()
        .unwrap();
    crate::util::assert_user_error(&output, "not an mlops report");
}

/// The shell scripts of a CI example, in order, but the build (`cargo build`).
fn ci_scripts(file: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/ci")
        .join(file);
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut scripts = Vec::new();
    let text = |v: &serde_yaml::Value| v.as_str().unwrap().to_string();
    if let Some(jobs) = doc.get("jobs") {
        for (_, job) in jobs.as_mapping().unwrap() {
            for step in job["steps"].as_sequence().unwrap() {
                if let Some(run) = step.get("run") {
                    scripts.push(text(run));
                }
            }
        }
    } else {
        for key in ["script", "after_script"] {
            scripts.extend(doc["mlops"][key].as_sequence().unwrap().iter().map(text));
        }
        scripts.extend(
            doc["mlops-baseline"]["script"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(text),
        );
    }
    scripts.retain(|s| !s.contains("cargo build"));
    scripts
}

/// Runs a CI example's scripts twice in one folder, as two pipelines would (the second
/// with the first one's bench as its baseline, as the cache hands it over).
fn run_ci(file: &str) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = ci_scripts(file);
    assert!(scripts.len() >= 4, "{scripts:?}");
    let binary = assert_cmd::cargo::cargo_bin("mlops");
    let summary = dir.path().join("summary.md");
    for round in 0..2 {
        for script in &scripts {
            let output = std::process::Command::new("bash")
                .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
                .current_dir(dir.path())
                .env("MLOPS", &binary)
                .env("DATA", tiny_data())
                .env("OUT", "runs/ci")
                .env("EPOCHS", "2")
                .env("MIN_ACCURACY", "0.2")
                .env("MAX_ACCURACY_DROP", "0.5")
                .env("MAX_REGRESSION", "0.95")
                .env("BENCH_SECONDS", "0")
                .env("GITHUB_STEP_SUMMARY", &summary)
                .env("MLOPS_NO_PROGRESS", "1")
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{file} round {round}: `{script}`\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let out = dir.path().join("runs/ci");
        assert!(out.join("report.html").is_file() && out.join("bench.json").is_file());
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let steps = report["steps"].as_array().unwrap();
        let kinds: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
        assert_eq!(
            &kinds[kinds.len() - 5..],
            ["train", "quantize", "eval", "eval", "bench"]
        );
        let gates: Vec<&str> = steps
            .iter()
            .flat_map(|s| s["gates"].as_array().unwrap())
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert!(gates.contains(&"min_accuracy") && gates.contains(&"max_accuracy_drop"));
        let regression_gates = steps.last().unwrap()["gates"].as_array().unwrap().len();
        // Round 0 has no baseline; round 1 compares all 4 rows with round 0's.
        assert_eq!(regression_gates, if round == 0 { 0 } else { 4 }, "{file}");
        assert!(dir.path().join("baseline/bench.json").is_file());
        std::fs::remove_file(out.join("report.json")).unwrap();
    }
    if file.starts_with("github") {
        let md = std::fs::read_to_string(&summary).unwrap();
        assert_eq!(md.matches("## mlops report").count(), 2, "{md}");
        assert!(md.contains("### Gates"), "{md}");
    } else {
        assert!(dir.path().join("runs/ci/report.md").is_file());
    }
}

#[test]
fn github_actions_example_runs_locally() {
    run_ci("github-actions.yml");
}

#[test]
fn gitlab_ci_example_runs_locally() {
    run_ci("gitlab-ci.yml");
}
