use crate::util::{assert_success, assert_user_error, fixture, json_of, mlops, tiny_data};

fn train_args(out: &str) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--threads", "2", "--out", out]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push("--data".into());
    args.push(tiny_data().display().to_string());
    args
}

#[test]
fn train_end_to_end_learns_well_above_chance() {
    let dir = tempfile::tempdir().unwrap();
    // 512 images / batch 16 = 32 steps per epoch, 8 epochs = 256 steps.
    let output = mlops(dir.path())
        .args(train_args("run"))
        .args([
            "--batch-size",
            "16",
            "--epochs",
            "8",
            "--lr",
            "0.002",
            "--json",
        ])
        .output()
        .unwrap();
    assert_success(&output);
    let report = json_of(&output);
    assert_eq!(report["step"], "train");
    let accuracy = report["metrics"]["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.6, "test accuracy {accuracy} (chance is 0.1)");
    assert!(report["metrics"]["images_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["outputs"].as_array().unwrap().len(), 2);
}

#[test]
fn train_same_seed_gives_bit_identical_artifact() {
    let dir = tempfile::tempdir().unwrap();
    for out in ["a", "b"] {
        mlops(dir.path())
            .args(train_args(out))
            .args(["--limit", "128", "--epochs", "1", "--batch-size", "32"])
            .assert()
            .success();
    }
    let a = std::fs::read(dir.path().join("a/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("b/model.safetensors")).unwrap();
    assert!(a == b, "two runs with the same seed differ");
    mlops(dir.path())
        .args(train_args("c"))
        .args(["--limit", "128", "--epochs", "1", "--seed", "7"])
        .assert()
        .success();
    let c = std::fs::read(dir.path().join("c/model.safetensors")).unwrap();
    assert!(a != c, "another seed gave the same weights");
}

#[test]
fn train_resume_matches_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    mlops(dir.path())
        .args(train_args("full"))
        .args(["--limit", "256", "--epochs", "2"])
        .assert()
        .success();
    mlops(dir.path())
        .args(train_args("parts"))
        .args(["--limit", "256", "--epochs", "2", "--stop-after", "1"])
        .assert()
        .success();
    mlops(dir.path())
        .args(train_args("parts"))
        .args(["--limit", "256", "--epochs", "2", "--resume"])
        .assert()
        .success();
    let full = std::fs::read(dir.path().join("full/model.safetensors")).unwrap();
    let parts = std::fs::read(dir.path().join("parts/model.safetensors")).unwrap();
    assert!(
        full == parts,
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn train_resume_with_other_settings_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    mlops(dir.path())
        .args(train_args("run"))
        .args(["--limit", "64", "--epochs", "2", "--stop-after", "1"])
        .assert()
        .success();
    let output = mlops(dir.path())
        .args(train_args("run"))
        .args(["--limit", "64", "--epochs", "2", "--resume", "--seed", "9"])
        .output()
        .unwrap();
    assert_user_error(&output, "seed");
}

#[test]
fn train_report_file_collects_steps() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        mlops(dir.path())
            .args(train_args("run"))
            .args(["--limit", "64", "--epochs", "1", "--report", "r.json"])
            .assert()
            .success();
    }
    let text = std::fs::read_to_string(dir.path().join("r.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(report["mlops_version"].is_string());
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for step in steps {
        for key in [
            "step",
            "started_at",
            "duration_s",
            "device",
            "inputs",
            "outputs",
            "metrics",
            "gates",
            "warnings",
        ] {
            assert!(step.get(key).is_some(), "missing `{key}`");
        }
        assert_eq!(step["inputs"][0]["sha256"].as_str().unwrap().len(), 64);
    }
}

#[test]
fn train_min_accuracy_gate_exits_3_and_keeps_the_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args(train_args("run"))
        .args([
            "--limit",
            "64",
            "--epochs",
            "1",
            "--min-accuracy",
            "0.999",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let report = json_of(&output);
    assert_eq!(report["gates"][0]["name"], "min_accuracy");
    assert_eq!(report["gates"][0]["passed"], false);
    assert!(dir.path().join("run/model.safetensors").is_file());
}

#[test]
fn train_accepts_a_yaml_spec() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args(train_args("mlp"))
        .args(["--epochs", "2", "--json", "--model"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/mlp.yaml"))
        .output()
        .unwrap();
    assert_success(&output);
    let report = json_of(&output);
    assert_eq!(report["metrics"]["model"], "mlp-128");
    assert!(report["metrics"]["test_accuracy"].as_f64().unwrap() > 0.5);
}

#[test]
fn train_on_cuda_without_the_feature_says_how_to_build() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args(train_args("run"))
        .args(["--device", "cuda"])
        .output()
        .unwrap();
    assert_user_error(&output, "--features cuda");
}

#[test]
fn train_quiet_json_prints_only_json() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args(train_args("run"))
        .args(["--limit", "32", "--epochs", "1", "--json", "--quiet"])
        .output()
        .unwrap();
    assert!(output.status.success());
    json_of(&output);
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = fixture("mnist-tiny");
}

/// `train --engine candle` runs candle's autograd on the CPU (the code a GPU runs): the
/// same initialization, data order, loss and Adam as our trainer, so the same accuracy up
/// to float summation order, and the lineage says which engine computed the updates.
#[test]
fn candle_engine_trains_like_the_native_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut accuracies = Vec::new();
    for engine in ["native", "candle"] {
        let output = mlops(dir.path())
            .args([
                "train",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--lr",
                "0.003",
            ])
            .args(["--engine", engine, "--out", engine, "--json", "--data"])
            .arg(tiny_data())
            .output()
            .unwrap();
        assert_success(&output);
        accuracies.push(
            json_of(&output)["metrics"]["test_accuracy"]
                .as_f64()
                .unwrap(),
        );
        let inspect = mlops(dir.path())
            .args(["inspect", &format!("{engine}/model.safetensors"), "--json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&inspect.stdout).to_string();
        assert!(
            text.contains(&format!("\"engine\":\"{engine}\""))
                || text.contains(&format!("\"engine\": \"{engine}\"")),
            "{text}"
        );
    }
    let (native, candle) = (accuracies[0], accuracies[1]);
    assert!(native > 0.6, "native reached only {native}");
    assert!(
        (native - candle).abs() < 0.03,
        "native {native} vs candle {candle}"
    );
}

/// `--precision fp16` on candle's CPU device: mixed precision with dynamic loss scaling
/// converges like fp32 and reports its scale; on the native engine it is refused saying
/// what to do.
#[test]
fn fp16_mixed_precision_trains_on_candle_and_is_refused_on_native() {
    let dir = tempfile::tempdir().unwrap();
    let output = mlops(dir.path())
        .args([
            "train",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--lr",
            "0.003",
        ])
        .args([
            "--engine",
            "candle",
            "--precision",
            "fp16",
            "--out",
            "half",
            "--json",
        ])
        .arg("--data")
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_success(&output);
    let m = &json_of(&output)["metrics"];
    assert_eq!(m["precision"], "fp16");
    assert_eq!(m["engine"], "candle");
    assert!(m["loss_scale"].as_f64().unwrap() >= 1.0, "{m}");
    let accuracy = m["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.6, "fp16 reached only {accuracy}");

    let refused = mlops(dir.path())
        .args([
            "train",
            "--epochs",
            "1",
            "--precision",
            "bf16",
            "--out",
            "x",
            "--data",
        ])
        .arg(tiny_data())
        .output()
        .unwrap();
    assert_user_error(&refused, "--engine candle");
}

/// `train --devices cpu,cpu`: two data-parallel candle ranks on the CPU, each on half of
/// every batch, gradients summed in process (the code path of `--devices cuda:0,cuda:1`
/// but NCCL): the same training as one candle rank on the whole batch, up to float
/// summation order, and the report and lineage name the devices.
#[test]
fn data_parallel_cpu_ranks_train_like_one_candle_rank() {
    let dir = tempfile::tempdir().unwrap();
    let train = |extra: &[&str], out: &str| {
        let output = mlops(dir.path())
            .args([
                "train",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--lr",
                "0.003",
                "--out",
                out,
                "--json",
            ])
            .args(extra)
            .arg("--data")
            .arg(tiny_data())
            .output()
            .unwrap();
        assert_success(&output);
        json_of(&output)
    };
    let one = train(&["--engine", "candle"], "one");
    let two = train(&["--devices", "cpu,cpu"], "two");
    let m = &two["metrics"];
    assert_eq!(m["engine"], "candle", "{m}");
    assert_eq!(m["devices"], serde_json::json!(["cpu", "cpu"]), "{m}");
    assert!(
        two["device"].as_str().unwrap_or("").contains("cpu,cpu"),
        "{two}"
    );
    let (a, b) = (
        one["metrics"]["test_accuracy"].as_f64().unwrap(),
        m["test_accuracy"].as_f64().unwrap(),
    );
    assert!(a > 0.6, "one rank reached only {a}");
    assert!((a - b).abs() < 0.03, "one rank {a} vs two ranks {b}");
    let inspect = mlops(dir.path())
        .args(["inspect", "two/model.safetensors", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout).to_string();
    let lineage: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        text.contains("\"devices\"") && text.contains("\"cpu\""),
        "{lineage}"
    );
}

/// `--devices` that cannot work fail before any data is read, each saying what to do.
#[test]
fn bad_devices_lists_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    for (list, says) in [
        ("", "unknown device ``"),
        ("cpu,cuda:0", "mixes cpu and cuda"),
        ("cpu,tpu", "unknown device `tpu`"),
        ("cuda:0,cuda:0", "twice"),
        // The test binary is the default build (no `nccl` feature).
        ("cuda:0,cuda:1", "--features nccl"),
    ] {
        let output = mlops(dir.path())
            .args(["train", "--epochs", "1", "--out", "x", "--devices", list])
            .arg("--data")
            .arg(tiny_data())
            .output()
            .unwrap();
        assert_user_error(&output, says);
    }
    let both = mlops(dir.path())
        .args(["train", "--device", "cpu", "--devices", "cpu,cpu"])
        .output()
        .unwrap();
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
}

/// Two `mlops train` processes as torchrun starts them (`WORLD_SIZE`, `RANK`,
/// `MASTER_ADDR`, `MASTER_PORT`) meet at rank 0 and train one model, summing gradients over
/// TCP: the same training as `--devices cpu,cpu` (the same shards, sums in rank order), so
/// the same test figures; rank 0 alone writes the model and the report.
#[test]
fn two_processes_train_like_two_in_process_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--lr",
            "0.003",
            "--out",
            out,
            "--json",
            "--data",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([tiny_data().display().to_string()])
        .collect()
    };
    // Both ranks of a two-process run on a fresh port, each with its extra flags; rank 1
    // starts first (it waits for rank 0 to listen). Their outputs, rank 0's first.
    let pair = |out: &str, extra: [&[&str]; 2]| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let spawn = |rank: &str, extra: &[&str]| {
            std::process::Command::new(assert_cmd::cargo::cargo_bin("mlops"))
                .current_dir(dir.path())
                .env("NO_COLOR", "1")
                .env("MLOPS_NO_PROGRESS", "1")
                .env_remove("RUST_BACKTRACE")
                .envs([
                    ("WORLD_SIZE", "2"),
                    ("RANK", rank),
                    ("MASTER_ADDR", "127.0.0.1"),
                    ("MASTER_PORT", port.as_str()),
                ])
                .args(args(out))
                .args(["--engine", "candle"])
                .args(extra)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let rank1 = spawn("1", extra[1]);
        let rank0 = spawn("0", extra[0]);
        (
            rank0.wait_with_output().unwrap(),
            rank1.wait_with_output().unwrap(),
        )
    };
    let (out0, out1) = pair("procs", [&[], &[]]);
    assert_success(&out0);
    assert_success(&out1);
    assert!(out1.stdout.is_empty(), "rank 1 printed a report");
    let said = String::from_utf8_lossy(&out1.stderr);
    assert!(
        said.contains("rank 1 of 2 processes (cpu), meeting the others at 127.0.0.1:")
            && said.contains("rank 1 of 2: test accuracy"),
        "{said}"
    );
    let procs = json_of(&out0);
    assert_eq!(procs["metrics"]["world_size"], 2, "{procs}");
    assert!(dir.path().join("procs/model.safetensors").exists());

    let threads = mlops(dir.path())
        .args(args("threads"))
        .args(["--devices", "cpu,cpu"])
        .output()
        .unwrap();
    assert_success(&threads);
    let threads = json_of(&threads);
    for key in ["test_accuracy", "test_loss", "train_accuracy"] {
        let (a, b) = (
            procs["metrics"]["epoch_reports"][0][key].as_f64().unwrap(),
            threads["metrics"]["epoch_reports"][0][key]
                .as_f64()
                .unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "{key}: processes {a} vs threads {b}"
        );
    }

    // Ranks started with different settings (here the seed) fail at once, both.
    let (a, b) = pair("mismatch", [&["--seed", "2"], &["--seed", "1"]]);
    for out in [a, b] {
        assert_user_error(&out, "different settings");
    }
    assert!(!dir.path().join("mismatch/model.safetensors").exists());

    // `--devices` in a process that is one rank of several is refused.
    let both = mlops(dir.path())
        .envs([("WORLD_SIZE", "2"), ("RANK", "0")])
        .args(args("both"))
        .args(["--devices", "cpu,cpu"])
        .output()
        .unwrap();
    assert_user_error(&both, "not `--devices`");

    // A process that cannot find rank 0's address fails with what to set.
    let lone = mlops(dir.path())
        .envs([("WORLD_SIZE", "2"), ("RANK", "1")])
        .env_remove("MASTER_ADDR")
        .args(args("lone"))
        .args(["--engine", "candle"])
        .output()
        .unwrap();
    assert_user_error(&lone, "MASTER_ADDR");
    let native = mlops(dir.path())
        .envs([
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1"),
        ])
        .args(args("native"))
        .output()
        .unwrap();
    assert_user_error(&native, "--engine candle");
}
