use crate::util::{assert_success, dir_with_model, json_of, mlops, tiny_data, trained_model};

fn accuracy(dir: &std::path::Path, artifact: &std::path::Path) -> f64 {
    let output = mlops(dir)
        .arg("eval")
        .arg(artifact)
        .arg("--data")
        .arg(tiny_data())
        .arg("--json")
        .output()
        .unwrap();
    json_of(&output)["metrics"]["accuracy"].as_f64().unwrap()
}

#[test]
fn export_half_precisions_halve_the_file_and_keep_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let fp32_bytes = std::fs::metadata(trained_model()).unwrap().len() as f64;
    let fp32_accuracy = accuracy(dir.path(), &trained_model());
    for precision in ["fp16", "bf16"] {
        let out = dir.path().join(format!("m.{precision}.safetensors"));
        let output = mlops(dir.path())
            .arg("export")
            .arg(trained_model())
            .args(["--precision", precision, "--json", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert_success(&output);
        let report = json_of(&output);
        let ratio = std::fs::metadata(&out).unwrap().len() as f64 / fp32_bytes;
        assert!(
            (0.45..0.55).contains(&ratio),
            "{precision}: size ratio {ratio}"
        );
        assert_eq!(report["metrics"]["size_ratio"].as_f64().unwrap(), ratio);
        // 256 test images: allow one image to flip (0.4 point); the full set is in the README.
        let drop = (fp32_accuracy - accuracy(dir.path(), &out)).abs();
        assert!(
            drop <= 1.0 / 256.0 + 1e-12,
            "{precision}: accuracy moved by {drop}"
        );

        let inspect = mlops(dir.path())
            .arg("inspect")
            .arg(&out)
            .arg("--json")
            .output()
            .unwrap();
        let info = json_of(&inspect);
        assert_eq!(info["metrics"]["precision"], precision);
        let lineage = info["metrics"]["lineage"].as_array().unwrap();
        assert_eq!(lineage.len(), 2);
        assert_eq!(lineage[1]["step"], "export");
        assert_eq!(
            lineage[1]["parent_sha256"], report["inputs"][0]["sha256"],
            "lineage must point at the parent's hash"
        );
    }
}

#[test]
fn export_default_name_sits_beside_the_input() {
    let dir = dir_with_model();
    mlops(dir.path())
        .args(["export", "model.safetensors", "--precision", "bf16"])
        .assert()
        .success();
    assert!(dir.path().join("model.bf16.safetensors").is_file());
}

/// An artifact made through the library API is byte-identical to the one `mlops` writes
/// (issue 11: the library returns finished artifacts, the CLI only saves them).
#[test]
fn export_through_the_library_writes_the_same_bytes() {
    let dir = crate::util::dir_with_model();
    let output = mlops(dir.path())
        .args(["export", "model.safetensors", "--precision", "bf16"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let cli = std::fs::read(dir.path().join("model.bf16.safetensors")).unwrap();
    let (artifact, record) =
        mlops::artifact::Artifact::load(&dir.path().join("model.safetensors")).unwrap();
    let (exported, _) =
        mlops::export::export(&artifact, &record, mlops::artifact::Precision::Bf16).unwrap();
    assert_eq!(exported.to_bytes().unwrap(), cli);
}
