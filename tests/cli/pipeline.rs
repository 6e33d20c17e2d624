use crate::util::{assert_user_error, mlops, tiny_data};

#[test]
fn pipeline_runs_every_step_into_one_report() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data: {}\nout: tiny\nsteps:\n  - {{run: train, epochs: 1, batch_size: 32}}\n  - {{run: export, precision: fp16}}\n  - {{run: eval, artifact: model.safetensors}}\n  - {{run: eval, artifact: model.fp16.safetensors}}\n  - {{run: quantize, int8: true, calib_samples: 64}}\n  - {{run: eval, artifact: model.int8.safetensors}}\n  - {{run: bench, artifacts: [model.safetensors, model.fp16.safetensors, model.int8.safetensors], batch: [1, 4], duration: 0, iters: 2}}\n",
        tiny_data().display()
    );
    std::fs::write(dir.path().join("p.yaml"), config).unwrap();
    let output = mlops(dir.path())
        .args(["pipeline", "p.yaml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("== summary"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tiny/report.json")).unwrap(),
    )
    .unwrap();
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["train", "export", "eval", "eval", "quantize", "eval", "bench"]
    );
    assert!(stderr.contains("p50 us b1"), "{stderr}");
    assert!(output.stdout.is_empty(), "pipeline steps keep stdout clean");
    assert!(dir.path().join("tiny/model.fp16.safetensors").is_file());
}

#[test]
fn pipeline_rejects_an_unknown_flag_before_running_anything() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "out: x\nsteps:\n  - {run: train, epochs: 1}\n  - {run: export, precison: fp16}\n",
    )
    .unwrap();
    let output = mlops(dir.path())
        .args(["pipeline", "p.yaml"])
        .output()
        .unwrap();
    assert_user_error(&output, "step 2");
    assert!(!dir.path().join("x/model.safetensors").exists());
}

/// The shipped default config parses into valid steps (every step is parsed before the
/// first one runs, so a broken config fails at once; a missing data folder then fails
/// the train step rather than the parse).
#[test]
fn default_pipeline_parses_and_starts() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args(["pipeline", "--out", "o"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The built-in default is examples/pipeline.yaml.
    let config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pipeline.yaml"),
    )
    .unwrap();
    let steps = config
        .lines()
        .filter(|l| l.trim_start().starts_with("- run:"))
        .count();
    assert!(
        stderr.contains(&format!("pipeline (built-in default): {steps} steps")),
        "{stderr}"
    );
    assert_user_error(&output, "fixtures/mnist");
}

/// Under torchrun's `WORLD_SIZE` a pipeline is refused before it does anything, saying
/// to run its training under torchrun on its own (every process would run every step).
#[test]
fn pipeline_refuses_to_run_as_one_rank_of_several() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .envs([("WORLD_SIZE", "2"), ("RANK", "0")])
        .args(["pipeline", "--out", "p"])
        .output()
        .unwrap();
    assert_user_error(&output, "a pipeline runs in one process");
    assert!(!dir.path().join("p/report.json").exists());
}
