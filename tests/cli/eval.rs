use crate::util::{assert_success, assert_user_error, json_of, mlops, tiny_data, trained_model};

#[test]
fn eval_reports_accuracy_confusion_and_per_class() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("eval")
        .arg(trained_model())
        .arg("--data")
        .arg(tiny_data())
        .arg("--json")
        .output()
        .unwrap();
    assert_success(&output);
    let report = json_of(&output);
    let m = &report["metrics"];
    assert_eq!(m["images"], 256);
    let confusion = m["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
    let total: u64 = confusion
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 256);
    let diagonal: u64 = (0..10).map(|i| confusion[i][i].as_u64().unwrap()).sum();
    let accuracy = m["accuracy"].as_f64().unwrap();
    assert!((accuracy - diagonal as f64 / 256.0).abs() < 1e-12);
    assert_eq!(m["per_class_accuracy"].as_array().unwrap().len(), 10);

    // The accuracy recorded in the artifact at training time is what eval measures.
    let inspect = mlops(dir.path())
        .arg("inspect")
        .arg(trained_model())
        .arg("--json")
        .output()
        .unwrap();
    let recorded = json_of(&inspect)["metrics"]["metrics"]["accuracy"]
        .as_f64()
        .unwrap();
    assert_eq!(recorded, accuracy);
}

#[test]
fn eval_min_accuracy_gate() {
    let dir = tempfile::tempdir().unwrap();
    let run = |threshold: &str| {
        mlops(dir.path())
            .arg("eval")
            .arg(trained_model())
            .arg("--data")
            .arg(tiny_data())
            .args(["--min-accuracy", threshold])
            .output()
            .unwrap()
    };
    assert_eq!(run("0.2").status.code(), Some(0));
    assert_eq!(run("0.9999").status.code(), Some(3));
}

/// `--engine candle` runs the model through candle on the CPU (the code a GPU runs):
/// the same predictions as our kernels, and the report names the runtime.
#[test]
fn eval_on_the_candle_engine_agrees_with_the_native_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = |engine: &str| {
        let output = mlops(dir.path())
            .arg("eval")
            .arg(trained_model())
            .args(["--engine", engine, "--json", "--data"])
            .arg(tiny_data())
            .output()
            .unwrap();
        assert_success(&output);
        json_of(&output)
    };
    let (native, candle) = (run("native"), run("candle"));
    assert_eq!(native["device"], "cpu");
    assert_eq!(candle["device"], "cpu (candle)");
    assert!(candle["metrics"]["compute"]
        .as_str()
        .unwrap()
        .contains("candle"));
    assert_eq!(
        native["metrics"]["confusion"],
        candle["metrics"]["confusion"]
    );
}

/// `--device cuda` reaches the CUDA runtime: without the `cuda` feature it says how to
/// get a build that has it.
#[cfg(not(feature = "cuda"))]
#[test]
fn eval_on_cuda_without_the_feature_says_how_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("eval")
        .arg(trained_model())
        .args(["--device", "cuda:1"])
        .output()
        .unwrap();
    assert_user_error(
        &output,
        "`--device cuda:1` needs a build with the `cuda` feature",
    );
}
