use crate::util::{json_of, mlops, trained_model};

#[test]
fn inspect_describes_the_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("inspect")
        .arg(trained_model())
        .arg("--json")
        .output()
        .unwrap();
    assert!(output.status.success());
    let info = json_of(&output);
    let m = &info["metrics"];
    assert_eq!(m["param_count"], 93_322);
    assert_eq!(m["precision"], "fp32");
    assert_eq!(m["tensors"].as_array().unwrap().len(), 10);
    assert_eq!(m["tensors"][0]["name"], "layers.0.weight");
    assert_eq!(m["tensors"][0]["shape"], serde_json::json!([32, 3, 3, 1]));
    assert_eq!(m["layers"].as_array().unwrap().len(), 8);
    assert_eq!(m["lineage"][0]["step"], "train");
    let bytes = std::fs::read(trained_model()).unwrap();
    assert_eq!(m["file"]["sha256"], mlops::report::sha256_hex(&bytes));
}

#[test]
fn inspect_human_output_lists_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("inspect")
        .arg(trained_model())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("layers.6.weight"), "{text}");
    assert!(text.contains("93322 parameters"), "{text}");
}
