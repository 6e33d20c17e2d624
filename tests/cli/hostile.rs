//! Issue 10, "Nothing silent": each test is a failure people reported against TF-MOT, the
//! TFLite converter, ONNX Runtime quantization or safetensors, replayed on `mlops`. Each
//! failed before the fix it pins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use mlops::artifact::safetensors::{decode, encode, TensorData};
use mlops::artifact::{Artifact, DIGEST_KEY};
use mlops::runtime::Engine as _;

use crate::util::{
    assert_success, assert_usage_error, assert_user_error, dir_with_model, json_of, mlops,
    tiny_data,
};

// === 1. A step that did not do what was asked must not exit 0 ===

fn prune(dir: &Path, extra: &[&str]) -> std::process::Output {
    mlops(dir)
        .args(["prune", "model.safetensors", "--sparsity", "0.5", "--json"])
        .arg("--data")
        .arg(tiny_data())
        .args(extra)
        .output()
        .unwrap()
}

/// `--limit 2000` gave 32 fine-tuning steps: with the default `--frequency 100` the
/// schedule never reached its end, the model had 0.00% sparsity, and the lineage said
/// 0.5. Here 512 images in batches of 64 are 8 steps; `--end-step 300` likewise.
#[test]
fn prune_fits_its_schedule_to_a_short_run_and_records_what_it_did() {
    for extra in [&[][..], &["--end-step", "300"][..]] {
        let dir = dir_with_model();
        let output = prune(dir.path(), extra);
        assert_success(&output);
        let report = json_of(&output);
        for layer in report["metrics"]["layers"].as_array().unwrap() {
            if layer["pruned"] == true {
                let s = layer["sparsity"].as_f64().unwrap();
                assert!((0.49..=0.51).contains(&s), "{extra:?}: {layer}");
            }
        }
        let realized = report["metrics"]["total_sparsity"].as_f64().unwrap();
        let info = json_of(
            &mlops(dir.path())
                .args(["inspect", "model.pruned.safetensors", "--json"])
                .output()
                .unwrap(),
        );
        let lineage = info["metrics"]["lineage"].as_array().unwrap();
        let entry = &lineage.last().unwrap()["args"];
        assert_eq!(entry["sparsity"].as_f64().unwrap(), realized);
        if !extra.is_empty() {
            let warnings = report["warnings"].as_array().unwrap();
            assert!(
                warnings
                    .iter()
                    .any(|w| w.as_str().unwrap().contains("end step 300")),
                "{warnings:?}"
            );
        }
    }
}

/// `--begin-step 1000` on an 8-step run pruned nothing and exited 0.
#[test]
fn prune_refuses_a_schedule_that_starts_after_the_run() {
    let dir = dir_with_model();
    let output = prune(dir.path(), &["--begin-step", "1000"]);
    assert_user_error(
        &output,
        "`--begin-step 1000` is past the last fine-tuning step",
    );
    assert!(!dir.path().join("model.pruned.safetensors").exists());
}

/// Writes `count` copies of one all-black PNG into `dir`.
fn black_images(dir: &Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        image::GrayImage::from_pixel(28, 28, image::Luma([0u8]))
            .save(dir.join(format!("{i}.png")))
            .unwrap();
    }
}

/// 20 all-black calibration images: int8 accuracy collapsed, exit 0, `warnings: []`, and
/// a comparison on those same images claimed cosine 0.99996.
#[test]
fn quantize_warns_on_a_degenerate_calibration_set() {
    let dir = dir_with_model();
    black_images(&dir.path().join("black"), 20);
    let run = |extra: &[&str]| {
        mlops(dir.path())
            .args([
                "quantize",
                "model.safetensors",
                "--int8",
                "--calib",
                "black",
                "--json",
            ])
            .arg("--eval-data")
            .arg(tiny_data())
            .args(extra)
            .output()
            .unwrap()
    };
    let output = run(&[]);
    assert_success(&output);
    let report = json_of(&output);
    let warnings: Vec<String> = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    let all = warnings.join("\n");
    assert!(
        all.contains("20 of the 20 calibration images are constant"),
        "{all}"
    );
    assert!(all.contains("only 1 distinct calibration image"), "{all}");
    assert!(
        all.contains("`layers.0.weight`: its input was the constant 0"),
        "{all}"
    );
    assert_eq!(report["metrics"]["comparison"]["data"], "evaluation");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning: 20 of the 20"), "{stderr}");
    // `--strict` turns them into a failed gate: exit 3.
    let strict = run(&["--strict", "--out", "strict.safetensors"]);
    assert_eq!(strict.status.code(), Some(3));
    assert_eq!(json_of(&strict)["gates"][0]["name"], "strict");
    // Real images warn about nothing.
    let real = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--strict",
            "--json",
            "--out",
            "r.safetensors",
            "--calib",
        ])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&real);
    assert_eq!(json_of(&real)["warnings"], serde_json::json!([]));
}

/// The text said `drop +0.06 pt` for a gain and `drop -43.49 pt` for a loss, the
/// opposite of the JSON's `accuracy_drop`. One convention: drop = fp32 - int8.
#[test]
fn quantize_prints_the_drop_with_the_sign_of_the_json() {
    let dir = dir_with_model();
    black_images(&dir.path().join("black"), 20);
    let output = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--calib",
            "black",
            "--json",
        ])
        .arg("--eval-data")
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&output);
    let drop = json_of(&output)["metrics"]["eval"]["accuracy_drop"]
        .as_f64()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = stderr
        .split("(drop ")
        .nth(1)
        .and_then(|rest| rest.split(" pt").next())
        .unwrap_or_else(|| panic!("no drop in: {stderr}"));
    let printed: f64 = text.parse().unwrap();
    assert!(
        (printed - 100.0 * drop).abs() < 0.006,
        "text {printed} pt vs JSON {drop}"
    );
}

/// With default flags a 1,500-image set stopped after 48 updates at ~33% accuracy. The
/// default epochs now scale with the data; an explicit short run is warned about.
#[test]
fn train_defaults_scale_with_a_small_data_set() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args([
            "train",
            "--limit",
            "100",
            "--batch-size",
            "50",
            "--val-limit",
            "64",
        ])
        .args(["--out", "run", "--json", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&output);
    let report = json_of(&output);
    assert_eq!(
        report["metrics"]["epochs"], 200,
        "2 updates per epoch, at most 200 epochs"
    );
    assert!(report["metrics"]["epochs_chosen"]
        .as_str()
        .unwrap()
        .starts_with("default"));
    assert_eq!(report["warnings"], serde_json::json!([]));
    let short = mlops(dir.path())
        .args([
            "train",
            "--limit",
            "100",
            "--batch-size",
            "100",
            "--val-limit",
            "64",
        ])
        .args(["--epochs", "2", "--out", "short", "--json", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&short);
    let warnings = json_of(&short)["warnings"].to_string();
    assert!(warnings.contains("only 2 optimizer updates"), "{warnings}");
}

// === 2. Non-finite numbers never become an answer ===

/// The tensors and metadata of `path`.
fn parts(path: &Path) -> (Vec<mlops::artifact::NamedTensor>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    decode(path, &bytes).unwrap()
}

/// Writes tensors and metadata as they are (no checks, no digest update) to `dir/name`.
fn write_raw(
    dir: &Path,
    name: &str,
    tensors: &[mlops::artifact::NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, encode(tensors, metadata).unwrap()).unwrap();
    path
}

fn set_f32(tensors: &mut [mlops::artifact::NamedTensor], name: &str, index: usize, v: f32) {
    let t = tensors.iter_mut().find(|t| t.name == name).unwrap();
    let TensorData::F32(values) = &mut t.data else {
        panic!("{name} is not f32");
    };
    values[index] = v;
}

fn int8_model(dir: &Path) -> PathBuf {
    let output = mlops(dir)
        .args(["quantize", "model.safetensors", "--int8", "--calib"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&output);
    dir.join("model.int8.safetensors")
}

/// NaN in a bias, +Inf in a weight, an int8 `input_scale` of 0 / Inf / NaN, a negative
/// `weight_scale`, `mlops.input` with std 0 or negative: all loaded and evaluated to
/// `loss NaN` (and `serve` answered 200 with `null`s). Each is refused, naming what.
#[test]
fn artifacts_with_non_finite_or_invalid_numbers_are_refused() {
    let dir = dir_with_model();
    let fp32 = dir.path().join("model.safetensors");
    let int8 = int8_model(dir.path());
    let mut cases: Vec<(PathBuf, String)> = Vec::new();
    for (tensor, value, needle) in [
        (
            "layers.0.bias",
            f32::NAN,
            "tensor `layers.0.bias` holds a non-finite value",
        ),
        (
            "layers.2.weight",
            f32::INFINITY,
            "tensor `layers.2.weight` holds a non-finite value",
        ),
    ] {
        let (mut t, m) = parts(&fp32);
        set_f32(&mut t, tensor, 3, value);
        cases.push((
            write_raw(dir.path(), &format!("{tensor}.safetensors"), &t, &m),
            needle.into(),
        ));
    }
    for (tensor, value, needle) in [
        (
            "layers.2.input_scale",
            0.0,
            "tensor `layers.2.input_scale` holds scale 0 at index 0",
        ),
        (
            "layers.2.input_scale",
            f32::INFINITY,
            "tensor `layers.2.input_scale` holds a non-finite value (inf",
        ),
        (
            "layers.2.input_scale",
            f32::NAN,
            "tensor `layers.2.input_scale` holds a non-finite value (NaN",
        ),
        (
            "layers.4.weight_scale",
            -0.5,
            "tensor `layers.4.weight_scale` holds scale -0.5",
        ),
        // Subnormal: 0 to the CPU kernels, which flush denormals.
        (
            "layers.4.weight_scale",
            1e-39,
            "`layers.4.weight_scale` holds scale 0.000000000000000000000000000000000000001 at index 0; quantization scales must be positive, at least",
        ),
    ] {
        let (mut t, m) = parts(&int8);
        set_f32(&mut t, tensor, 0, value);
        let name = format!("int8-{tensor}-{value}.safetensors");
        cases.push((write_raw(dir.path(), &name, &t, &m), needle.into()));
    }
    for std in ["0.0", "-1.0"] {
        let (t, mut m) = parts(&fp32);
        let input = m["mlops.input"].replace("\"std\":1.0", &format!("\"std\":{std}"));
        assert_ne!(input, m["mlops.input"]);
        m.insert("mlops.input".into(), input);
        cases.push((
            write_raw(dir.path(), &format!("std{std}.safetensors"), &t, &m),
            format!("`mlops.input` std is {}", std.trim_end_matches(".0")),
        ));
    }
    for (path, needle) in cases {
        let output = mlops(dir.path())
            .arg("eval")
            .arg(&path)
            .arg("--data")
            .arg(tiny_data())
            .output()
            .unwrap();
        assert_user_error(&output, &needle);
        assert_user_error(&output, &path.file_name().unwrap().to_string_lossy());
    }
}

/// A training run that diverges (or a cast that overflows) must not write its result:
/// fp16 cannot hold 1e6, so exporting such a weight would write +Inf.
#[test]
fn no_step_writes_a_non_finite_number() {
    let dir = dir_with_model();
    let (mut artifact, _) = Artifact::load(&dir.path().join("model.safetensors")).unwrap();
    let t = artifact
        .tensors
        .iter_mut()
        .find(|t| t.name == "layers.0.weight")
        .unwrap();
    let TensorData::F32(values) = &mut t.data else {
        panic!()
    };
    values[0] = 1e6;
    artifact.save(&dir.path().join("big.safetensors")).unwrap();
    let output = mlops(dir.path())
        .args(["export", "big.safetensors", "--precision", "fp16"])
        .output()
        .unwrap();
    assert_user_error(&output, "tensor `layers.0.weight` holds a non-finite value");
    assert!(!dir.path().join("big.fp16.safetensors").exists());
}

/// `eval` ignored `mlops.input` while serve's UINT8 path applied it: with mean = std =
/// 0.5 the two disagreed on 20% of images. Every path now uses the artifact's.
#[test]
fn eval_applies_the_artifacts_input_normalisation() {
    let dir = dir_with_model();
    let (mut artifact, _) = Artifact::load(&dir.path().join("model.safetensors")).unwrap();
    artifact.input.mean = 0.5;
    artifact.input.std = 0.5;
    artifact.save(&dir.path().join("norm.safetensors")).unwrap();
    let split = mlops::data::load_split(&tiny_data(), mlops::data::SplitKind::Test).unwrap();
    let mut session = mlops::runtime::CpuEngine::new(&artifact, 1).unwrap();
    let (mut x, mut labels, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    let indices: Vec<usize> = (0..split.count).collect();
    // By hand: (pixel / 255 - 0.5) / 0.5, in [-1, 1].
    split.gather(
        &indices,
        &mlops::data::Preprocess::UNIT,
        &mut x,
        &mut labels,
    );
    x.iter_mut().for_each(|v| *v = (*v - 0.5) / 0.5);
    session.predict(&x, split.count, &mut logits).unwrap();
    let correct = logits
        .chunks_exact(10)
        .zip(&labels)
        .filter(|(row, &l)| mlops::runtime::argmax(row) == l as usize)
        .count();
    let eval = mlops(dir.path())
        .args(["eval", "norm.safetensors", "--json", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&eval);
    let accuracy = json_of(&eval)["metrics"]["accuracy"].as_f64().unwrap();
    assert_eq!(accuracy, correct as f64 / split.count as f64);
}

// === 3. Bounded resources ===

/// `filters: 1000000` aborted on a 27 GB allocation; `2^62` panicked.
#[test]
fn train_refuses_a_spec_past_the_size_limits() {
    let dir = tempfile::tempdir().unwrap();
    for filters in ["1000000", "4611686018427387904"] {
        std::fs::write(
            dir.path().join("big.yaml"),
            format!("input: [28, 28, 1]\nclasses: 10\nlayers:\n  - {{type: conv2d, filters: {filters}, kernel: 3}}\n  - {{type: flatten}}\n  - {{type: dense, units: 10}}\n"),
        )
        .unwrap();
        let output = mlops(dir.path())
            .args(["train", "--model", "big.yaml", "--epochs", "1", "--data"])
            .arg(tiny_data())
            .output()
            .unwrap();
        assert_user_error(&output, "layer 0 (conv2d)");
        assert_user_error(&output, "limit of this mlops");
    }
}

/// An artifact whose spec input is `[2^32, 2^32, 1]` loaded (the size wrapped to 0).
#[test]
fn an_artifact_whose_sizes_wrap_is_refused() {
    let dir = dir_with_model();
    let (t, mut m) = parts(&dir.path().join("model.safetensors"));
    for key in ["mlops.model", "mlops.input"] {
        let text = m[key].replace("[28,28,1]", "[4294967296,4294967296,1]");
        assert_ne!(text, m[key], "{key}");
        m.insert(key.into(), text);
    }
    let path = write_raw(dir.path(), "wrap.safetensors", &t, &m);
    let output = mlops(dir.path())
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    assert_user_error(&output, "has more than 67108864 values per image");
}

// === 5. Processes and messages ===

/// With stderr a closed pipe (`mlops prune ... 2>&1 | head`), every long command
/// panicked with exit 101 and wrote no report. Now they finish and write it.
#[test]
fn a_closed_stderr_does_not_stop_a_command() {
    let dir = dir_with_model();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("mlops"))
        .current_dir(dir.path())
        .args([
            "prune",
            "model.safetensors",
            "--sparsity",
            "0.5",
            "--report",
            "r.json",
        ])
        .arg("--data")
        .arg(tiny_data())
        .env("MLOPS_NO_PROGRESS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(dir.path().join("r.json").exists());
    assert!(dir.path().join("model.pruned.safetensors").exists());
}

/// A model written after epoch 1 of 2 said `epochs: 2` in its lineage; an interrupted
/// run's artifact says what was done.
#[test]
fn an_interrupted_training_records_the_epochs_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args([
            "train",
            "--epochs",
            "2",
            "--stop-after",
            "1",
            "--limit",
            "128",
        ])
        .args(["--val-limit", "64", "--out", "run", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&output);
    let (artifact, _) = Artifact::load(&dir.path().join("run/model.safetensors")).unwrap();
    let args = &artifact.lineage[0].args;
    assert_eq!(args["epochs"], 1);
    assert_eq!(args["planned_epochs"], 2);
}

/// `inspect` sliced a lineage sha256 by bytes: a multibyte character panicked it.
#[test]
fn inspect_survives_multibyte_lineage_text() {
    let dir = dir_with_model();
    let (t, mut m) = parts(&dir.path().join("model.safetensors"));
    m.remove(DIGEST_KEY); // as an older mlops wrote it, so nothing is verified
    let lineage =
        r#"[{"step":"train","mlops_version":"0.1.0","parent_sha256":"ééééééééé","args":{}}]"#;
    m.insert("mlops.lineage".into(), lineage.into());
    let path = write_raw(dir.path(), "old.safetensors", &t, &m);
    let output = mlops(dir.path())
        .arg("inspect")
        .arg(&path)
        .output()
        .unwrap();
    assert_success(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("éééééé"), "{stdout}");
    assert!(stdout.contains("no digest recorded"), "{stdout}");
}

/// Hints belong to the call site: a bad `--report` file or a `--calib` folder got the
/// `--data` hint.
#[test]
fn hints_name_the_flag_that_was_given() {
    let dir = dir_with_model();
    std::fs::write(dir.path().join("bad.json"), "{}").unwrap();
    let output = mlops(dir.path())
        .args([
            "eval",
            "model.safetensors",
            "--report",
            "bad.json",
            "--data",
        ])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_user_error(&output, "choose another `--report` file");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("`--data` expects"));
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let output = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--calib",
            "empty",
        ])
        .output()
        .unwrap();
    assert_user_error(&output, "hint: `--calib` takes a folder of PNG/JPEG images");
}

/// A calibration folder of 11 class folders was refused (``` `` ```: "holds label 10");
/// calibration does not use labels.
#[test]
fn quantize_ignores_the_labels_of_a_calibration_folder() {
    let dir = dir_with_model();
    for class in 0..11u8 {
        let folder = dir.path().join(format!("calib/{class:02}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..2u8 {
            image::GrayImage::from_fn(28, 28, |x, y| {
                image::Luma([(x * 9 + y * 3) as u8 ^ (class * 16 + i)])
            })
            .save(folder.join(format!("{i}.png")))
            .unwrap();
        }
    }
    let output = mlops(dir.path())
        .args([
            "quantize",
            "model.safetensors",
            "--int8",
            "--calib",
            "calib",
        ])
        .output()
        .unwrap();
    assert_success(&output);
}

/// A Keras `.keras` / `.h5` or an ONNX file got "not a valid safetensors file (header too
/// large)"; `export --out m.onnx` wrote safetensors into a `.onnx` file.
#[test]
fn foreign_model_files_are_named_and_mismatched_outputs_refused() {
    let dir = dir_with_model();
    for (name, bytes, needle) in [
        (
            "m.keras",
            &b"PK\x03\x04\x14\0\0\0\0\0config.json"[..],
            "is a Keras 3 `.keras` archive",
        ),
        (
            "m.h5",
            b"\x89HDF\r\n\x1a\n\0\0\0\0\0\0\0\0",
            "is an HDF5 file",
        ),
        (
            "m.onnx",
            b"\x08\x07\x12\x07pytorch\x1a\x032.1",
            "is an ONNX model",
        ),
    ] {
        std::fs::write(dir.path().join(name), bytes).unwrap();
        for command in ["eval", "inspect", "bench"] {
            let output = mlops(dir.path()).args([command, name]).output().unwrap();
            assert_user_error(&output, needle);
        }
    }
    let output = mlops(dir.path())
        .args([
            "export",
            "model.safetensors",
            "--precision",
            "fp16",
            "--out",
            "m2.onnx",
        ])
        .output()
        .unwrap();
    assert_user_error(&output, "writes a safetensors artifact, not `.onnx`");
    assert!(!dir.path().join("m2.onnx").exists());
}

// === 6. Integrity ===

/// safetensors has no checksum: a flipped bit in a weight loaded silently, and an edited
/// `mlops.metrics` was shown as fact.
#[test]
fn a_changed_artifact_is_refused_at_load() {
    let dir = dir_with_model();
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0x01; // a low mantissa bit of the last bias
    std::fs::write(dir.path().join("flipped.safetensors"), &bytes).unwrap();
    let output = mlops(dir.path())
        .args(["eval", "flipped.safetensors", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_user_error(&output, "does not match the digest");

    let (t, mut m) = parts(&path);
    let metrics = m["mlops.metrics"].replacen("\"accuracy\":0.", "\"accuracy\":0.99", 1);
    assert_ne!(metrics, m["mlops.metrics"]);
    m.insert("mlops.metrics".into(), metrics);
    let edited = write_raw(dir.path(), "edited.safetensors", &t, &m);
    let output = mlops(dir.path())
        .arg("inspect")
        .arg(&edited)
        .output()
        .unwrap();
    assert_user_error(&output, "metadata does not match the digest");
}

/// Each lineage entry keeps its parent's digest and its own, so `inspect` says whether the
/// recorded chain is intact.
#[test]
fn inspect_checks_the_lineage_chain() {
    let dir = dir_with_model();
    let output = int8_model(dir.path());
    let info = json_of(
        &mlops(dir.path())
            .arg("inspect")
            .arg(&output)
            .arg("--json")
            .output()
            .unwrap(),
    );
    assert_eq!(info["metrics"]["lineage_check"]["state"], "intact");
    let lineage = info["metrics"]["lineage"].as_array().unwrap();
    assert_eq!(lineage[1]["parent_digest"], lineage[0]["digest"]);
}

/// Usage errors for flags name the flag and its range (see also bench and prune tests).
#[test]
fn train_refuses_non_finite_learning_rates() {
    let dir = tempfile::tempdir().unwrap();
    for lr in ["NaN", "inf", "0", "-0.1"] {
        let output = mlops(dir.path())
            .args(["train", &format!("--lr={lr}")])
            .output()
            .unwrap();
        assert_usage_error(&output, "'--lr <LR>': must be a finite number in (0, 10]");
    }
}

// === Property: mutated artifacts never panic, hang or answer with a non-finite number ===

/// A small deterministic generator (SplitMix64), so a failure names a reproducible case.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One byte-level mutation of an artifact file: flipped bits, overwritten bytes,
/// truncation, trailing garbage, a forged header length, a spliced number.
fn mutate(bytes: &[u8], rng: &mut Mix) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    match rng.below(7) {
        0 => {
            let at = rng.below(out.len());
            out[at] ^= 1 << rng.below(8);
        }
        1 => {
            // Inside the JSON header, where names, shapes and metadata live.
            let at = 8 + rng.below(header_end - 8);
            let alphabet = b"{}[],:\"0123456789-eE.x ";
            out[at] = alphabet[rng.below(alphabet.len())];
        }
        2 => out.truncate(rng.below(out.len())),
        3 => out.extend((0..rng.below(64) + 1).map(|_| rng.next() as u8)),
        4 => {
            let forged = match rng.below(3) {
                0 => rng.next(),
                1 => (header_end - 8) as u64 + 1 + rng.below(16) as u64,
                _ => u64::MAX,
            };
            out[..8].copy_from_slice(&forged.to_le_bytes());
        }
        5 => {
            // A weight replaced by NaN, an infinity or a huge finite value.
            let at = header_end + 4 * rng.below((out.len() - header_end) / 4);
            let v = [f32::NAN, f32::INFINITY, -f32::INFINITY, 3e38][rng.below(4)];
            out[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        _ => {
            // A number in the metadata text replaced.
            let text = String::from_utf8_lossy(&out[8..header_end]).to_string();
            let digits: Vec<usize> = text
                .char_indices()
                .filter(|(_, c)| c.is_ascii_digit())
                .map(|(i, _)| i)
                .collect();
            if let Some(&at) = digits.get(rng.below(digits.len())) {
                let with = ["9", "0", "-1", "1e39", "NaN", "4294967296"][rng.below(6)];
                let mut t = text.clone();
                t.replace_range(at..at + 1, with);
                let mut header = t.into_bytes();
                header.resize(header_end - 8, b' ');
                if header.len() == header_end - 8 {
                    out[8..header_end].copy_from_slice(&header);
                }
            }
        }
    }
    out
}

/// A few thousand mutated fp32 and int8 artifacts through the loader (in process, where
/// a panic is caught and named), every one that loads through evaluation, and a sample
/// through `mlops eval` and `mlops inspect`: no panic, no hang, no finite-looking answer
/// from non-finite numbers; exit 0 or 1 otherwise.
#[test]
fn mutated_artifacts_are_refused_or_evaluate_finitely() {
    let dir = dir_with_model();
    let fp32 = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let int8 = std::fs::read(int8_model(dir.path())).unwrap();
    let split = mlops::data::load_split(&tiny_data(), mlops::data::SplitKind::Test).unwrap();
    let mut small = split.clone();
    small.truncate(16);
    let mut rng = Mix(0x5EED);
    let (mut loaded, mut refused) = (0usize, 0usize);
    let started = std::time::Instant::now();
    for case in 0..3000 {
        let base = if case % 2 == 0 { &fp32 } else { &int8 };
        let bytes = mutate(base, &mut rng);
        let path = dir.path().join(format!("m{}.safetensors", case % 2));
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| match Artifact::load(&path) {
            Err(e) => {
                assert!(
                    e.to_string().contains(&path.display().to_string()),
                    "case {case}: {e}"
                );
                None
            }
            Ok((artifact, _)) => {
                let mut session = mlops::runtime::CpuEngine::new(&artifact, 1).ok()?;
                match mlops::runtime::evaluate(&mut session, &small, 8) {
                    Ok(report) => {
                        assert!(report.loss.is_finite() && report.accuracy.is_finite());
                        Some(true)
                    }
                    Err(e) => {
                        assert!(e.to_string().contains("not finite"), "case {case}: {e}");
                        Some(false)
                    }
                }
            }
        });
        match outcome {
            Ok(Some(_)) => loaded += 1,
            Ok(None) => refused += 1,
            Err(_) => panic!("case {case} panicked (SplitMix64 seed 0x5EED)"),
        }
        // The real binary on a sample of the cases.
        if case % 100 == 0 {
            for command in ["eval", "inspect"] {
                let mut cmd = mlops(dir.path());
                cmd.arg(command).arg(&path);
                if command == "eval" {
                    cmd.args(["--limit", "16", "--data"]).arg(tiny_data());
                }
                let output = cmd.output().unwrap();
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(
                    matches!(output.status.code(), Some(0 | 1)),
                    "case {case} {command}: {stderr}"
                );
                assert!(
                    !stderr.contains("panicked"),
                    "case {case} {command}: {stderr}"
                );
            }
        }
    }
    assert!(
        refused > 2000,
        "most mutations must be refused: {refused} refused, {loaded} loaded"
    );

    // Valid files with extreme values (written through the library, so the digest
    // holds): refused at write when not finite, else evaluated finitely or refused.
    let (base, _) = Artifact::load(&dir.path().join("model.safetensors")).unwrap();
    for case in 0..300 {
        let mut artifact = base.clone();
        let t = rng.below(artifact.tensors.len());
        let factor = 10f32.powi(rng.below(77) as i32 - 38);
        if let TensorData::F32(values) = &mut artifact.tensors[t].data {
            values.iter_mut().for_each(|v| *v *= factor);
        }
        match rng.below(4) {
            0 => artifact.input.std = 10f32.powi(rng.below(60) as i32 - 30),
            1 => artifact.input.mean = 10f32.powi(rng.below(60) as i32 - 30),
            2 => artifact.input.scale = 10f32.powi(rng.below(60) as i32 - 30),
            _ => {}
        }
        let path = dir.path().join("extreme.safetensors");
        if let Err(e) = artifact.save(&path) {
            assert!(
                e.to_string().contains("non-finite"),
                "extreme case {case}: {e}"
            );
            continue;
        }
        let (loaded, _) = Artifact::load(&path).unwrap();
        let mut session = mlops::runtime::CpuEngine::new(&loaded, 1).unwrap();
        match mlops::runtime::evaluate(&mut session, &small, 8) {
            Ok(report) => assert!(report.loss.is_finite(), "extreme case {case}"),
            Err(e) => assert!(
                e.to_string().contains("not finite"),
                "extreme case {case}: {e}"
            ),
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}

/// A model whose only weight layers are the first and the last had nothing to prune by
/// default: `prune --sparsity 0.5` wrote a 0% "pruned" model and exited 0.
#[test]
fn prune_refuses_when_no_layer_would_be_pruned() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("two.yaml"),
        "input: [28, 28, 1]\nclasses: 10\nlayers:\n  - {type: flatten}\n  - {type: dense, units: 16, activation: relu}\n  - {type: dense, units: 10}\n",
    )
    .unwrap();
    let train = mlops(dir.path())
        .args([
            "train", "--model", "two.yaml", "--epochs", "1", "--limit", "64",
        ])
        .args(["--val-limit", "32", "--out", "run", "--data"])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&train);
    let output = mlops(dir.path())
        .args([
            "prune",
            "run/model.safetensors",
            "--sparsity",
            "0.5",
            "--data",
        ])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_user_error(&output, "has no layer to prune by default");
    assert!(!dir.path().join("run/model.pruned.safetensors").exists());
}

/// Sizes from flags are checked before allocation: a training batch whose activations
/// would need tens of GB is refused with the largest batch that fits.
#[test]
fn bench_refuses_a_training_batch_past_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .arg("bench")
        .arg(dir_with_model().path().join("model.safetensors"))
        .args(["--train", "--batch", "65536"])
        .output()
        .unwrap();
    assert_user_error(&output, "a batch of 65536 images needs about");
}

/// An artifact given as `--model` got a YAML parser's complaint about binary bytes.
#[test]
fn train_names_a_binary_file_given_as_a_spec() {
    let dir = dir_with_model();
    let output = mlops(dir.path())
        .args(["train", "--model", "model.safetensors"])
        .output()
        .unwrap();
    assert_user_error(&output, "is not a YAML model spec: it is a binary file");
}

/// `serve` with stderr closed after its `listening` line (`mlops serve 2>&1 | head -1`)
/// panicked on its next log line and wrote no report at SIGTERM.
#[test]
fn serve_survives_a_closed_stderr_and_writes_its_report() {
    use std::io::BufRead;
    let dir = dir_with_model();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("mlops"))
        .current_dir(dir.path())
        .args([
            "serve",
            "model.safetensors",
            "--port",
            "0",
            "--threads",
            "1",
        ])
        .args(["--report", "serve.json"])
        .env("MLOPS_NO_PROGRESS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on ") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
    }
    let base = line.split("listening on ").nth(1).unwrap();
    let base = base.split_whitespace().next().unwrap().to_string();
    drop(stderr); // the reader goes away, as `head -1` does
    let answer = ureq::get(&format!("{base}/v2/health/ready"))
        .call()
        .unwrap();
    assert_eq!(answer.status(), 200);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(dir.path().join("serve.json").exists());
}
