use std::path::Path;

use crate::util::{
    assert_success, assert_user_error, dir_with_model, json_of, mlops, tiny_data, trained_model,
};

fn quantize(dir: &Path, extra: &[&str]) -> std::process::Output {
    std::fs::copy(trained_model(), dir.join("model.safetensors")).unwrap();
    mlops(dir)
        .args(["quantize", "model.safetensors", "--int8", "--calib"])
        .arg(tiny_data())
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn quantize_int8_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let eval_data = tiny_data().display().to_string();
    let output = quantize(dir.path(), &["--eval-data", &eval_data, "--json"]);
    assert_success(&output);
    let report = json_of(&output);
    let m = &report["metrics"];
    assert_eq!(m["layers"].as_array().unwrap().len(), 5);
    assert!(
        m["compute"].as_str().unwrap().starts_with("int8"),
        "{}",
        m["compute"]
    );
    let ratio = m["size_ratio"].as_f64().unwrap();
    assert!(ratio <= 0.27, "int8 file is {ratio} of fp32");
    let agreement = m["eval"]["top1_agreement"].as_f64().unwrap();
    assert!(
        agreement > 0.9,
        "top-1 agreement {agreement} (chance is 0.1)"
    );
    let int8_accuracy = m["eval"]["int8_accuracy"].as_f64().unwrap();

    // eval runs the int8 artifact through the integer runtime and measures the same.
    let eval = mlops(dir.path())
        .args(["eval", "model.int8.safetensors", "--json", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    let eval = json_of(&eval);
    assert_eq!(eval["metrics"]["accuracy"].as_f64().unwrap(), int8_accuracy);
    assert_eq!(eval["metrics"]["precision"], "int8");

    let inspect = mlops(dir.path())
        .args(["inspect", "model.int8.safetensors", "--json"])
        .output()
        .unwrap();
    let info = json_of(&inspect);
    assert_eq!(info["metrics"]["precision"], "int8");
    assert_eq!(info["metrics"]["lineage"][1]["step"], "quantize");
    assert!(info["metrics"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "layers.2.input_scale"));
}

#[test]
fn quantize_accuracy_gate_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let eval_data = tiny_data().display().to_string();
    // A drop can never be at most -1: the gate must fail.
    let output = quantize(
        dir.path(),
        &["--eval-data", &eval_data, "--max-accuracy-drop=-1"],
    );
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = quantize(
        dir.path(),
        &["--eval-data", &eval_data, "--max-accuracy-drop", "1"],
    );
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn quantize_methods_all_work() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["percentile", "mse", "entropy"] {
        let output = quantize(
            dir.path(),
            &["--calib-method", method, "--calib-samples", "64", "--json"],
        );
        assert!(
            output.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(json_of(&output)["metrics"]["method"]
            .as_str()
            .unwrap()
            .starts_with(method));
    }
}

#[test]
fn quantize_calibrates_on_a_folder_of_images() {
    let dir = tempfile::tempdir().unwrap();
    // 40 PNGs in class folders, from the tiny fixtures' first images.
    let split = mlops::data::load_split(&tiny_data(), mlops::data::SplitKind::Train).unwrap();
    for i in 0..40 {
        let class = dir.path().join("pngs").join(split.labels[i].to_string());
        std::fs::create_dir_all(&class).unwrap();
        let pixels = split.images[i * 784..(i + 1) * 784].to_vec();
        image::GrayImage::from_raw(28, 28, pixels)
            .unwrap()
            .save(class.join(format!("{i}.png")))
            .unwrap();
    }
    std::fs::copy(trained_model(), dir.path().join("model.safetensors")).unwrap();
    let eval_data = tiny_data().display().to_string();
    let output = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--calib",
            "pngs",
            "--json",
        ])
        .args(["--eval-data", &eval_data])
        .output()
        .unwrap();
    assert_success(&output);
    let report = json_of(&output);
    assert_eq!(report["metrics"]["samples"], 40);
    assert!(
        report["metrics"]["eval"]["top1_agreement"]
            .as_f64()
            .unwrap()
            > 0.9
    );

    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let empty = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--calib",
            "empty",
        ])
        .output()
        .unwrap();
    assert_user_error(&empty, "empty");
}

#[test]
fn quantize_dry_run_writes_nothing() {
    let dir = dir_with_model();
    let output = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--dry-run",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let report = json_of(&output);
    assert_eq!(report["metrics"]["tensors"][0]["to"], "I8");
    assert!(!dir.path().join("model.int8.safetensors").exists());
}

#[test]
fn quantize_rejects_bad_input() {
    let dir = dir_with_model();
    let no_calib = mlops(dir.path())
        .args(["quantize", "model.safetensors", "--int8"])
        .output()
        .unwrap();
    assert_user_error(&no_calib, "--calib DIR");

    let ok = quantize(dir.path(), &[]);
    assert!(ok.status.success());
    let again = mlops(dir.path())
        .args(["quantize", "model.int8.safetensors", "--int8", "--calib"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_user_error(&again, "already int8");

    // Calibration images of another shape: the error names the file.
    let calib = dir.path().join("small");
    std::fs::create_dir_all(&calib).unwrap();
    std::fs::write(
        calib.join("train-images-idx3-ubyte"),
        mlops::data::idx::encode_idx(&[2, 8, 8], &[0; 128]),
    )
    .unwrap();
    std::fs::write(
        calib.join("train-labels-idx1-ubyte"),
        mlops::data::idx::encode_idx(&[2], &[0, 1]),
    )
    .unwrap();
    let wrong = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--calib",
            "small",
        ])
        .output()
        .unwrap();
    assert_user_error(&wrong, "train-images-idx3-ubyte");

    let export = mlops(dir.path())
        .args(["export", "model.int8.safetensors", "--precision", "fp16"])
        .output()
        .unwrap();
    assert_user_error(&export, "already int8");
}

/// `--dynamic` needs no calibration; `--exclude` keeps layers in fp32; both artifacts
/// load and run in `eval` and `bench`, and the report says how each layer runs.
#[test]
fn quantize_dynamic_and_mixed_precision() {
    let dir = dir_with_model();
    let eval_data = tiny_data().display().to_string();
    let dynamic = mlops(dir.path())
        .args(["quantize", "model.safetensors", "--int8", "--dynamic"])
        .args([
            "--out",
            "dynamic.safetensors",
            "--json",
            "--eval-data",
            &eval_data,
        ])
        .output()
        .unwrap();
    assert_success(&dynamic);
    let m = &json_of(&dynamic)["metrics"];
    assert_eq!(m["activations"], "dynamic");
    assert_eq!(m["layers"][2]["precision"], "int8-dynamic");
    assert!(m["layers"][2]["input_scale"].is_null());
    assert!(m["eval"]["top1_agreement"].as_f64().unwrap() > 0.9);
    // With no calibration images, layers are compared on the evaluation images.
    assert_eq!(m["comparison"]["data"], "evaluation");
    assert!(m["layers"][2]["output_cosine"].as_f64().unwrap() > 0.99);

    let mixed = quantize(
        dir.path(),
        &[
            "--exclude",
            "0,layers.7",
            "--out",
            "mixed.safetensors",
            "--json",
        ],
    );
    assert_success(&mixed);
    let m = &json_of(&mixed)["metrics"];
    assert_eq!(
        m["layers_fp32"],
        serde_json::json!(["layers.0.weight", "layers.7.weight"])
    );
    assert_eq!(m["layers_int8"].as_array().unwrap().len(), 3);
    assert_eq!(m["layers"][0]["precision"], "fp32");
    assert!(m["compute"]
        .as_str()
        .unwrap()
        .contains("2 of 5 layers fp32"));

    for artifact in ["dynamic.safetensors", "mixed.safetensors"] {
        let eval = mlops(dir.path())
            .args(["eval", artifact, "--json", "--data"])
            .arg(tiny_data())
            .output()
            .unwrap();
        assert!(eval.status.success(), "{artifact}");
        assert!(json_of(&eval)["metrics"]["accuracy"].as_f64().unwrap() > 0.5);
    }

    let unknown = mlops(dir.path())
        .args(["quantize", "model.safetensors", "--int8", "--dynamic"])
        .args(["--exclude", "layers.3"])
        .output()
        .unwrap();
    assert_user_error(&unknown, "did you mean");

    let dry = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--dry-run",
            "--json",
        ])
        .args(["--exclude", "7"])
        .output()
        .unwrap();
    let tensors = json_of(&dry)["metrics"]["tensors"].clone();
    let to = |name: &str| {
        tensors
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tensor"] == name)
            .map(|t| t["to"].clone())
    };
    assert_eq!(to("layers.7.weight"), Some("F32".into()));
    assert_eq!(to("layers.6.weight"), Some("I8".into()));
}

/// `mlops::quantize::run` gives the artifact and summary `mlops quantize` writes (issue 11:
/// the library returns the finished int8 artifact, the CLI only saves it).
#[test]
fn quantize_through_the_library_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let output = quantize(dir.path(), &["--calib-samples", "64", "--json"]);
    assert_success(&output);
    let cli = std::fs::read(dir.path().join("model.int8.safetensors")).unwrap();
    let cli_metrics = json_of(&output)["metrics"].clone();

    let path = dir.path().join("model.safetensors");
    let (artifact, record) = mlops::artifact::Artifact::load(&path).unwrap();
    let calib = mlops::data::load_split(&tiny_data(), mlops::data::SplitKind::Train).unwrap();
    let settings = mlops::quantize::QuantizeConfig {
        method: mlops::quantize::MethodName::MinMax,
        percentile: 99.99,
        samples: 64,
        per_tensor: false,
        dynamic: false,
        exclude: Vec::new(),
    };
    let config = settings.resolve(&artifact).unwrap();
    let inputs = mlops::quantize::QuantizeInputs {
        artifact: &artifact,
        record: Some(&record),
        calib: Some(&calib),
        eval: None,
    };
    let runtime = mlops::runtime::CpuRuntime::new(1);
    let (quantized, summary) = mlops::quantize::run(inputs, &config, &runtime).unwrap();
    assert_eq!(quantized.to_bytes().unwrap(), cli);
    let library = serde_json::to_value(&summary).unwrap();
    for key in [
        "bytes_before",
        "bytes_after",
        "layers_int8",
        "bits_per_weight",
    ] {
        assert_eq!(library[key], cli_metrics[key], "{key}");
    }
}
