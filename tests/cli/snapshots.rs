//! Snapshots of how the common failures read (`error:` / `Caused by:` / `hint:`), after
//! uv's `uv_snapshot!`: a change to a message shows up as a diff to review, not as a
//! silently different user experience. Paths are replaced by `[TEMP]` / `[FIXTURES]`.
//! Update with `INSTA_UPDATE=always cargo test --test cli snapshots` and review the diff.

use std::path::Path;

use crate::util::{dir_with_model, fixture, mlops};

/// stderr and exit code of `mlops ARGS` run in `dir`, with paths filtered.
fn run(dir: &Path, args: &[&str]) -> String {
    let output = mlops(dir).args(args).output().unwrap();
    let text = format!(
        "exit code: {}\n{}",
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr)
    );
    text.replace(&dir.display().to_string(), "[TEMP]")
        .replace(&fixture("").display().to_string(), "[FIXTURES]/")
}

#[test]
fn snapshots_of_common_failures() {
    let dir = dir_with_model();
    std::fs::write(dir.path().join("m.keras"), b"PK\x03\x04\0\0config.json").unwrap();
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    insta::assert_snapshot!(
        "missing_artifact",
        run(dir.path(), &["eval", "nope.safetensors"])
    );
    insta::assert_snapshot!("keras_file", run(dir.path(), &["inspect", "m.keras"]));
    insta::assert_snapshot!(
        "data_folder_without_idx",
        run(dir.path(), &["train", "--data", "empty", "--epochs", "1"])
    );
    insta::assert_snapshot!(
        "calibration_folder_without_images",
        run(
            dir.path(),
            &[
                "quantize",
                "model.safetensors",
                "--int8",
                "--calib",
                "empty"
            ]
        )
    );
    insta::assert_snapshot!(
        "sparsity_out_of_range",
        run(
            dir.path(),
            &["prune", "model.safetensors", "--sparsity", "1.5"]
        )
    );
    insta::assert_snapshot!(
        "output_of_another_format",
        run(
            dir.path(),
            &[
                "export",
                "model.safetensors",
                "--precision",
                "fp16",
                "--out",
                "m.onnx"
            ]
        )
    );
}
