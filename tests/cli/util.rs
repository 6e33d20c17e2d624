//! Shared helpers: the real `mlops` binary in a fresh temp dir, and fixture paths.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use assert_cmd::Command;

/// `mlops` with progress bars and colour off, run inside `dir`.
pub fn mlops(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("mlops").expect("binary built");
    cmd.current_dir(dir)
        .env("NO_COLOR", "1")
        .env("MLOPS_NO_PROGRESS", "1")
        .env_remove("RUST_BACKTRACE");
    cmd
}

/// An absolute path under `fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The tiny MNIST subset (512 train, 256 test images).
pub fn tiny_data() -> PathBuf {
    fixture("mnist-tiny")
}

/// A reference CNN trained once per test run on the tiny data (shared, read-only).
pub fn trained_model() -> PathBuf {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        mlops(dir.path())
            .args([
                "train",
                "--epochs",
                "3",
                "--batch-size",
                "32",
                "--lr",
                "0.003",
            ])
            .arg("--data")
            .arg(tiny_data())
            .args(["--out", "run", "--threads", "2"])
            .assert()
            .success();
        let path = dir.path().join("run/model.safetensors");
        (dir, path)
    });
    path.clone()
}

/// Parses a command's stdout as JSON.
pub fn json_of(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Asserts a user error: exit 1, one `error:` line naming `needle`, no panic.
pub fn assert_user_error(output: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let errors = stderr.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(errors, 1, "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

/// Asserts a usage error from flag parsing: exit 2, clap's message naming `needle` (the
/// flag and its range), no panic.
pub fn assert_usage_error(output: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

/// Asserts the command succeeded, showing its stderr when it did not.
pub fn assert_success(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A fresh temp dir holding a copy of the shared trained model as `model.safetensors`.
pub fn dir_with_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(trained_model(), dir.path().join("model.safetensors")).expect("copy model");
    dir
}

/// The sha256 (hex) of a file.
pub fn sha256_of(path: &Path) -> String {
    mlops::io::sha256_hex(&std::fs::read(path).unwrap())
}
