use std::path::Path;

use crate::util::{
    assert_success, assert_usage_error, assert_user_error, json_of, mlops, tiny_data, trained_model,
};

fn prune(dir: &Path, extra: &[&str]) -> std::process::Output {
    std::fs::copy(trained_model(), dir.join("model.safetensors")).unwrap();
    mlops(dir)
        .args([
            "prune",
            "model.safetensors",
            "--batch-size",
            "32",
            "--frequency",
            "4",
            "--data",
        ])
        .arg(tiny_data())
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn prune_reaches_the_target_sparsity_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = prune(dir.path(), &["--sparsity", "0.5", "--json"]);
    assert_success(&output);
    let m = json_of(&output)["metrics"].clone();
    for layer in m["layers"].as_array().unwrap() {
        let s = layer["sparsity"].as_f64().unwrap();
        if layer["pruned"] == true {
            assert!((s - 0.5).abs() <= 0.01, "{}: {s}", layer["name"]);
        } else {
            assert_eq!(s, 0.0, "{} should stay dense", layer["name"]);
        }
    }
    assert!(
        m["gzip_ratio"].as_f64().unwrap() > 1.3,
        "{}",
        m["gzip_ratio"]
    );
    assert!(m["accuracy_after"].as_f64().unwrap() > 0.5);
    assert_eq!(m["fine_tuning"]["lr_schedule"], "cosine");

    // The zeros are real in the written artifact, and it runs and quantizes like any other.
    let inspect = mlops(dir.path())
        .args(["inspect", "model.pruned.safetensors", "--json"])
        .output()
        .unwrap();
    assert_eq!(json_of(&inspect)["metrics"]["lineage"][1]["step"], "prune");
    let quantize = mlops(dir.path())
        .args(["quantize", "model.pruned.safetensors", "--int8", "--calib"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&quantize);
}

#[test]
fn prune_constant_schedule_and_named_layers() {
    let dir = tempfile::tempdir().unwrap();
    let output = prune(
        dir.path(),
        &[
            "--sparsity",
            "0.3",
            "--pruning-schedule",
            "constant",
            "--layers",
            "4",
            "--json",
        ],
    );
    assert_success(&output);
    let layers = json_of(&output)["metrics"]["layers"].clone();
    let pruned: Vec<&serde_json::Value> = layers
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["pruned"] == true)
        .collect();
    assert_eq!(pruned.len(), 1);
    assert_eq!(pruned[0]["name"], "layers.4.weight");
    assert!((pruned[0]["sparsity"].as_f64().unwrap() - 0.3).abs() <= 0.01);
}

/// `--lr-schedule` reaches the fine-tuning: same seed and data, other weights, and the
/// choice is recorded in the report and the artifact's lineage.
#[test]
fn prune_lr_schedule_changes_the_fine_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let weights = |file: &str| {
        let bytes = std::fs::read(dir.path().join(file)).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        tensors.tensor("layers.4.weight").unwrap().data().to_vec()
    };
    let cosine = prune(dir.path(), &["--sparsity", "0.5", "--json"]);
    assert!(cosine.status.success());
    let constant = prune(
        dir.path(),
        &[
            "--sparsity",
            "0.5",
            "--lr-schedule",
            "constant",
            "--out",
            "constant.safetensors",
            "--json",
        ],
    );
    assert_success(&constant);
    assert_eq!(
        json_of(&constant)["metrics"]["fine_tuning"]["lr_schedule"],
        "constant"
    );
    assert_ne!(
        weights("model.pruned.safetensors"),
        weights("constant.safetensors")
    );
    let inspect = mlops(dir.path())
        .args(["inspect", "constant.safetensors", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        json_of(&inspect)["metrics"]["lineage"][1]["args"]["lr_schedule"],
        "constant"
    );
}

#[test]
fn prune_dry_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let output = prune(dir.path(), &["--sparsity", "0.5", "--dry-run"]);
    assert!(output.status.success());
    assert!(!dir.path().join("model.pruned.safetensors").exists());
}

#[test]
fn prune_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    assert_usage_error(
        &prune(dir.path(), &["--sparsity", "1.0"]),
        "'--sparsity <SPARSITY>': must be a finite number in [0, 1)",
    );
    assert_user_error(
        &prune(dir.path(), &["--sparsity", "0.5", "--layers", "layers.5"]),
        "did you mean",
    );
    let q = mlops(dir.path())
        .args(["quantize", "model.safetensors", "--int8", "--calib"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert!(q.status.success());
    let int8 = mlops(dir.path())
        .args(["prune", "model.int8.safetensors", "--sparsity", "0.5"])
        .output()
        .unwrap();
    assert_user_error(&int8, "is int8");
}

/// The old spellings (`--schedule`, `--keep`) are hidden aliases of `--pruning-schedule`
/// and `--structured --sparsity 1-F` for one release.
#[test]
fn prune_old_flag_spellings_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let new = prune(
        dir.path(),
        &["--structured", "--sparsity", "0.5", "--dry-run", "--json"],
    );
    let old = prune(
        dir.path(),
        &["--structured", "--keep", "0.5", "--dry-run", "--json"],
    );
    assert_success(&new);
    assert_success(&old);
    assert_eq!(
        json_of(&new)["metrics"]["plan"],
        json_of(&old)["metrics"]["plan"]
    );
    let schedule = prune(
        dir.path(),
        &["--sparsity", "0.3", "--schedule", "constant", "--dry-run"],
    );
    assert_success(&schedule);
}

#[test]
fn prune_structured_makes_a_smaller_model() {
    let dir = tempfile::tempdir().unwrap();
    let output = prune(dir.path(), &["--structured", "--sparsity", "0.5", "--json"]);
    assert_success(&output);
    let m = json_of(&output)["metrics"].clone();
    let ratio = m["params_after"].as_f64().unwrap() / m["params_before"].as_f64().unwrap();
    assert!(ratio < 0.4, "parameters kept: {ratio}");
    let flops = m["flops_after"].as_f64().unwrap() / m["flops_before"].as_f64().unwrap();
    assert!((0.4..0.6).contains(&flops), "FLOPs kept: {flops}");
    assert!(m["bytes_after"].as_u64().unwrap() < m["bytes_before"].as_u64().unwrap());
    let info = mlops(dir.path())
        .args(["inspect", "model.slim.safetensors", "--json"])
        .output()
        .unwrap();
    let info = json_of(&info);
    assert_eq!(info["metrics"]["model"]["layers"][2]["filters"], 32);
    let quantize = mlops(dir.path())
        .args(["quantize", "model.slim.safetensors", "--int8", "--calib"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&quantize);
}

#[test]
fn prune_structured_rejects_bad_sparsity() {
    let dir = tempfile::tempdir().unwrap();
    assert_usage_error(
        &prune(dir.path(), &["--structured", "--sparsity", "1"]),
        "'--sparsity <SPARSITY>': must be a finite number in [0, 1)",
    );
    // The old spelling `--keep` is still read, and checked the same way.
    assert_usage_error(
        &prune(dir.path(), &["--structured", "--keep", "0"]),
        "'--keep <KEEP>': must be a finite number in (0, 1]",
    );
    let dry = prune(
        dir.path(),
        &["--structured", "--sparsity", "0.5", "--dry-run"],
    );
    assert!(dry.status.success());
    assert!(!dir.path().join("model.slim.safetensors").exists());
}

/// `--block 4` zeroes whole runs of four weights along the input axis, to the target
/// sparsity; a block that does not divide a layer's rows is refused, naming the layer.
#[test]
fn prune_in_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let output = prune(dir.path(), &["--sparsity", "0.5", "--block", "4", "--json"]);
    assert_success(&output);
    let m = json_of(&output)["metrics"].clone();
    assert_eq!(m["block"], 4);
    let (artifact, _) =
        mlops::artifact::Artifact::load(&dir.path().join("model.pruned.safetensors")).unwrap();
    assert_eq!(artifact.sparsity.as_ref().unwrap()["block"], 4);
    let params = artifact.params_f32();
    for (info, values) in artifact.spec.params().unwrap().iter().zip(&params) {
        if !["layers.2.weight", "layers.4.weight", "layers.6.weight"].contains(&info.name.as_str())
        {
            continue;
        }
        let zero_blocks = values
            .chunks(4)
            .filter(|b| b.iter().all(|v| *v == 0.0))
            .count();
        let mixed = values
            .chunks(4)
            .filter(|b| b.contains(&0.0) && !b.iter().all(|v| *v == 0.0))
            .count();
        assert_eq!(zero_blocks * 8, values.len(), "{}", info.name);
        assert_eq!(mixed, 0, "{}", info.name);
    }

    let bad = prune(dir.path(), &["--sparsity", "0.5", "--block", "5"]);
    assert_user_error(&bad, "layers.2.weight");
}
