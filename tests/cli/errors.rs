//! Bad input: each case exits 1 with a one-line `error:` naming the file or field,
//! never panics, and never touches an existing artifact.

use std::io::Write;
use std::path::Path;

use crate::util::{assert_user_error, mlops, tiny_data, trained_model};

/// A data folder holding a copy of the tiny fixtures, for breaking one file.
fn data_copy(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(tiny_data()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
    }
    data
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Trains into `run/` over an existing model, expecting failure; the model must survive.
fn train_fails_keeping_model(dir: &Path, data: &Path, needle: &str, extra: &[&str]) {
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let model = dir.join("run/model.safetensors");
    std::fs::copy(trained_model(), &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let output = mlops(dir)
        .args(["train", "--epochs", "1", "--out", "run", "--data"])
        .arg(data)
        .args(extra)
        .output()
        .unwrap();
    assert_user_error(&output, needle);
    assert_eq!(
        std::fs::read(&model).unwrap(),
        before,
        "existing artifact was touched"
    );
}

#[test]
fn missing_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    train_fails_keeping_model(dir.path(), &dir.path().join("nope"), "does not exist", &[]);
}

#[test]
fn corrupt_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_copy(dir.path());
    let file = data.join("train-labels-idx1-ubyte.gz");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes.truncate(n / 2);
    std::fs::write(&file, bytes).unwrap();
    train_fails_keeping_model(dir.path(), &data, "train-labels-idx1-ubyte.gz", &[]);
}

#[test]
fn idx_with_wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_copy(dir.path());
    let file = data.join("t10k-images-idx3-ubyte.gz");
    std::fs::write(&file, gzip(&[9, 9, 8, 3, 0, 0, 0, 1])).unwrap();
    train_fails_keeping_model(dir.path(), &data, "magic", &[]);
}

#[test]
fn labels_count_differs_from_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_copy(dir.path());
    let file = data.join("train-labels-idx1-ubyte.gz");
    let labels = mlops::data::idx::encode_idx(&[10], &[1; 10]);
    std::fs::write(&file, gzip(&labels)).unwrap();
    train_fails_keeping_model(dir.path(), &data, "10 labels", &[]);
}

#[test]
fn truncated_idx() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_copy(dir.path());
    let file = data.join("train-images-idx3-ubyte.gz");
    let body = mlops::data::idx::encode_idx(&[512, 28, 28], &vec![0; 1000]);
    std::fs::write(&file, gzip(&body)).unwrap();
    train_fails_keeping_model(dir.path(), &data, "truncated", &[]);
}

#[test]
fn spec_with_unknown_layer() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "input: [28, 28, 1]\nclasses: 10\nlayers:\n  - {type: flatten}\n  - {type: conv3d, filters: 2}\n",
    )
    .unwrap();
    let spec = spec.display().to_string();
    train_fails_keeping_model(
        dir.path(),
        &tiny_data(),
        "layer 1 (conv3d)",
        &["--model", &spec],
    );
}

#[test]
fn spec_with_kernel_larger_than_input() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    std::fs::write(
        &spec,
        "input: [28, 28, 1]\nclasses: 10\nlayers:\n  - {type: max_pool2d, size: 4}\n  - {type: conv2d, filters: 4, kernel: 9}\n  - {type: flatten}\n  - {type: dense, units: 10}\n",
    )
    .unwrap();
    let spec = spec.display().to_string();
    train_fails_keeping_model(
        dir.path(),
        &tiny_data(),
        "layer 1 (conv2d)",
        &["--model", &spec],
    );
}

#[test]
fn spec_input_not_matching_data() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("small.yaml");
    std::fs::write(
        &spec,
        "input: [14, 14, 1]\nclasses: 10\nlayers:\n  - {type: flatten}\n  - {type: dense, units: 10}\n",
    )
    .unwrap();
    let spec = spec.display().to_string();
    train_fails_keeping_model(
        dir.path(),
        &tiny_data(),
        "model expects [14, 14, 1]",
        &["--model", &spec],
    );
}

#[test]
fn resume_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    train_fails_keeping_model(dir.path(), &tiny_data(), "checkpoint", &["--resume"]);
}

#[test]
fn out_not_writable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("blocker"), b"a file").unwrap();
    let output = mlops(dir.path())
        .args(["train", "--out", "blocker/run", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_user_error(&output, "blocker/run");
}

/// Runs `eval` on a bad artifact file and checks the error; the file must be unchanged.
fn eval_fails(dir: &Path, bytes: &[u8], needle: &str) {
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let output = mlops(dir)
        .args(["eval", "bad.safetensors", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_user_error(&output, needle);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn artifact_that_is_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    eval_fails(
        dir.path(),
        b"this is a text file, not a model",
        "bad.safetensors",
    );
}

#[test]
fn truncated_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(trained_model()).unwrap();
    eval_fails(dir.path(), &bytes[..bytes.len() - 100], "truncated");
}

#[test]
fn artifact_of_another_format() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(trained_model()).unwrap();
    let at = bytes
        .windows(9)
        .position(|w| w == b"\"mlops/1\"")
        .expect("format key in header");
    let mut edited = bytes.clone();
    edited[at + 7] = b'7';
    eval_fails(dir.path(), &edited, "mlops/7");
}

#[test]
fn missing_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args(["inspect", "nope.safetensors"])
        .output()
        .unwrap();
    assert_user_error(&output, "nope.safetensors");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args(["train", "--epochz", "2"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// `predict --top K` with K above the model's classes was clamped without a word; now it
/// is refused, naming the range.
#[test]
fn predict_refuses_more_top_classes_than_the_model_has() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("predict")
        .arg(trained_model())
        .arg("--data")
        .arg(tiny_data())
        .args(["--limit", "2", "--top", "11"])
        .output()
        .unwrap();
    assert_user_error(
        &output,
        "`--top 11` is more than the model's 10 classes; use --top 1..=10",
    );
    let ok = mlops(dir.path())
        .arg("predict")
        .arg(trained_model())
        .arg("--data")
        .arg(tiny_data())
        .args(["--limit", "2", "--top", "10", "--json"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
