use std::path::Path;

use crate::util::{
    assert_success, assert_usage_error, assert_user_error, json_of, mlops, trained_model,
};

/// Quick settings: a few calls per row, no minimum duration.
const QUICK: [&str; 8] = [
    "--iters",
    "3",
    "--duration",
    "0",
    "--warmup",
    "1",
    "--warmup-secs",
    "0",
];

fn with_fp16(dir: &Path) -> (String, String) {
    let fp32 = dir.join("model.safetensors");
    std::fs::copy(trained_model(), &fp32).unwrap();
    mlops(dir)
        .args(["export", "model.safetensors", "--precision", "fp16"])
        .assert()
        .success();
    ("model.safetensors".into(), "model.fp16.safetensors".into())
}

fn bench(dir: &Path, args: &[&str]) -> std::process::Output {
    let (a, b) = with_fp16(dir);
    mlops(dir)
        .args(["bench", &a, &b, "--batch", "1,4"])
        .args(QUICK)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bench_json_follows_the_documented_schema() {
    let dir = tempfile::tempdir().unwrap();
    let output = bench(dir.path(), &["--format", "json"]);
    assert_success(&output);
    let doc = json_of(&output);
    for key in ["mlops_version", "git_commit", "machine", "rows"] {
        assert!(doc.get(key).is_some(), "missing `{key}`");
    }
    for key in ["cpu", "cores", "simd", "gpu", "driver"] {
        assert!(doc["machine"].get(key).is_some(), "missing machine.{key}");
    }
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "2 artifacts x 2 batch sizes");
    for row in rows {
        for key in [
            "artifact",
            "sha256",
            "precision",
            "device",
            "batch",
            "threads",
            "latency_us",
            "throughput_images_per_s",
            "cold_first_us",
            "load_ms",
            "peak_rss_bytes",
            "speedup_vs_first",
            "samples_us",
        ] {
            assert!(row.get(key).is_some(), "row misses `{key}`");
        }
        let l = &row["latency_us"];
        let get = |k: &str| l[k].as_f64().unwrap();
        assert!(get("min") <= get("p50") && get("p50") <= get("p90"));
        assert!(get("p90") <= get("p95") && get("p95") <= get("p99") && get("p99") <= get("max"));
        assert_eq!(row["samples_us"].as_array().unwrap().len(), 3);
    }
    assert_eq!(rows[0]["speedup_vs_first"], 1.0);
    assert_eq!(rows[2]["precision"], "fp16");
}

#[test]
fn bench_csv_jsonl_and_table_carry_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let csv = bench(dir.path(), &["--format", "csv"]);
    assert!(csv.status.success());
    let text = String::from_utf8(csv.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "header + 4 rows: {text}");
    let columns = lines[0].split(',').count();
    assert!(lines[0].contains("latency_us_p99") && lines[0].contains("throughput_images_per_s"));
    for line in &lines[1..] {
        assert_eq!(line.split(',').count(), columns, "{line}");
    }

    let jsonl = bench(dir.path(), &["--format", "jsonl"]);
    let text = String::from_utf8(jsonl.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    assert!(rows[3]["latency_us_p50"].as_f64().unwrap() > 0.0);

    let table = bench(dir.path(), &[]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert_eq!(text.matches("model.fp16.safetensors").count(), 2, "{text}");
    let md = bench(dir.path(), &["--format", "md"]);
    assert!(String::from_utf8(md.stdout)
        .unwrap()
        .starts_with("| artifact |"));
}

#[test]
fn bench_baseline_gate_fails_on_regression_and_passes_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let output = bench(dir.path(), &["--format", "json"]);
    let mut doc = json_of(&output);
    let scale = |doc: &mut serde_json::Value, factor: f64| {
        for row in doc["rows"].as_array_mut().unwrap() {
            let t = row["throughput_images_per_s"].as_f64().unwrap();
            row["throughput_images_per_s"] = (t * factor).into();
        }
    };
    scale(&mut doc, 100.0); // the baseline was 100x faster: we regressed
    std::fs::write(dir.path().join("fast.json"), doc.to_string()).unwrap();
    let failed = bench(
        dir.path(),
        &["--baseline", "fast.json", "--report", "r.json"],
    );
    assert_eq!(
        failed.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("r.json")).unwrap()).unwrap();
    let gates = report["steps"][0]["gates"].as_array().unwrap();
    assert_eq!(gates.len(), 4);
    assert!(gates.iter().all(|g| g["passed"] == false));

    scale(&mut doc, 1e-4); // now 100x slower than us
    std::fs::write(dir.path().join("slow.json"), doc.to_string()).unwrap();
    let passed = bench(dir.path(), &["--baseline", "slow.json"]);
    assert_eq!(
        passed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );
}

#[test]
fn bench_repeats_report_each_round() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("bench")
        .arg(trained_model())
        .args(["--batch", "2", "--repeats", "3", "--format", "json"])
        .args(QUICK)
        .output()
        .unwrap();
    assert!(output.status.success());
    let row = &json_of(&output)["rows"][0];
    assert_eq!(row["repeat_throughputs"].as_array().unwrap().len(), 3);
    assert_eq!(row["samples_us"].as_array().unwrap().len(), 9);
}

#[test]
fn bench_train_mode_measures_training_steps() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("bench")
        .arg(trained_model())
        .args(["--train", "--batch", "8", "--format", "json"])
        .args(QUICK)
        .output()
        .unwrap();
    assert!(output.status.success());
    let doc = json_of(&output);
    assert_eq!(doc["rows"][0]["mode"], "train");
    assert!(doc["rows"][0]["throughput_images_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        mlops(dir.path())
            .arg("bench")
            .arg(trained_model())
            .args(QUICK)
            .args(args)
            .output()
            .unwrap()
    };
    // Without the quick settings, so the flag under test is given once.
    let bare = |args: &[&str]| {
        mlops(dir.path())
            .arg("bench")
            .arg(trained_model())
            .args(args)
            .output()
            .unwrap()
    };
    assert_user_error(&run(&["--device", "tpu"]), "unknown device `tpu`");
    assert_usage_error(
        &run(&["--batch", "0"]),
        "'--batch <BATCH>': must be in 1..=65536",
    );
    // Issue 10: `inf` / `1e300` panicked (`cannot convert float seconds to Duration`),
    // `NaN` was accepted and `--iters 0` silently ran one sample.
    for (flag, value) in [
        ("--duration", "inf"),
        ("--duration", "1e300"),
        ("--duration", "NaN"),
        ("--warmup-secs", "inf"),
        ("--warmup-secs", "-1"),
    ] {
        let flag = format!("{flag}={value}");
        assert_usage_error(&bare(&[&flag]), "must be a finite number in [0, 3600]");
    }
    assert_usage_error(
        &bare(&["--iters", "0"]),
        "'--iters <ITERS>': must be in 1..=",
    );
    assert_usage_error(&bare(&["--repeats", "0"]), "must be in 1..=");
    std::fs::write(dir.path().join("other.json"), r#"{"rows": [{"x": 1}]}"#).unwrap();
    assert_user_error(&run(&["--baseline", "other.json"]), "another schema");
    std::fs::write(dir.path().join("plain.json"), r#"{"hello": 1}"#).unwrap();
    assert_user_error(
        &run(&["--baseline", "plain.json"]),
        "not an mlops bench report",
    );
    let missing = mlops(dir.path())
        .args(["bench", "nope.safetensors"])
        .output()
        .unwrap();
    assert_user_error(&missing, "nope.safetensors");
}

/// `mlops bench runs/x/*.safetensors` (the README's and CI scripts' form) also matches the
/// training checkpoint `mlops train` writes beside the model: it is skipped with a
/// warning, not an error; a checkpoint alone is a clear error.
#[test]
fn bench_skips_the_training_checkpoint_in_a_glob() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(trained_model(), dir.path().join("model.safetensors")).unwrap();
    let checkpoint = trained_model().with_file_name("checkpoint.safetensors");
    std::fs::copy(&checkpoint, dir.path().join("checkpoint.safetensors")).unwrap();
    let output = mlops(dir.path())
        .args([
            "bench",
            "checkpoint.safetensors",
            "model.safetensors",
            "--batch",
            "1",
            "--format",
            "json",
        ])
        .args(QUICK)
        .output()
        .unwrap();
    assert_success(&output);
    assert_eq!(json_of(&output)["rows"].as_array().unwrap().len(), 1);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("skipped `checkpoint.safetensors`"),
        "{stderr}"
    );
    let alone = mlops(dir.path())
        .args(["bench", "checkpoint.safetensors"])
        .args(QUICK)
        .output()
        .unwrap();
    assert_user_error(&alone, "nothing to bench");
}

/// On the candle engine (the code a GPU runs) each row splits a call's time into
/// copy-in, compute and copy-out, as `mlops bench --device cuda` reports it.
#[test]
fn bench_on_the_candle_engine_reports_the_timing_split() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("bench")
        .arg(trained_model())
        .args(QUICK)
        .args(["--engine", "candle", "--batch", "4", "--format", "json"])
        .output()
        .unwrap();
    assert_success(&output);
    let doc = json_of(&output);
    let row = &doc["rows"][0];
    assert_eq!(row["device"], "cpu (candle)");
    assert!(
        row["timing_us"]["compute_us"].as_f64().unwrap() > 0.0,
        "{row}"
    );
    assert!(row["timing_us"]["h2d_us"].as_f64().is_some(), "{row}");
}
