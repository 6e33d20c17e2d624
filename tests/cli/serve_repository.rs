//! `mlops serve --model-repository`: versions, version policies and labels, hot swap
//! under load, broken versions refused, SIGHUP reloads.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::serve::{assert_error, expected, tf_body, v2_body, Server};
use crate::util::trained_model;

/// Puts `model` in as `repo/name/version/model.safetensors` the way TF Serving asks
/// for it: written beside, then renamed into place in one step.
fn add_version(repo: &Path, name: &str, version: u64, bytes: &[u8]) {
    let staging = repo.join(format!(".staging-{name}-{version}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("model.safetensors"), bytes).unwrap();
    std::fs::create_dir_all(repo.join(name)).unwrap();
    std::fs::rename(&staging, repo.join(name).join(version.to_string())).unwrap();
}

/// Each version's `state` in `GET /v1/models/NAME`, highest version first.
fn states(server: &Server, name: &str) -> Vec<(String, String)> {
    let (code, status) = server.json("GET", &format!("/v1/models/{name}"), None);
    assert_eq!(code, 200, "{status}");
    status["model_version_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits (at most 30 s) until `name`'s version states are `want`.
fn wait_for(server: &Server, name: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(v, s)| (v.to_string(), s.to_string()))
        .collect();
    let started = Instant::now();
    loop {
        let now = states(server, name);
        if now == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "model `{name}`: still {now:?}, waiting for {want:?}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_swaps_versions_under_load_and_refuses_broken_ones() {
    let model = trained_model();
    let bytes = std::fs::read(&model).unwrap();
    let (pixels, classes, _) = expected(&model);
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    add_version(&repo, "cnn", 1, &bytes);
    let server = Arc::new(Server::start(
        dir.path(),
        &["--model-repository", "repo", "--poll-secs", "1"],
    ));
    wait_for(&server, "cnn", &[("1", "AVAILABLE")]);

    // Requests keep flowing through every change below; each must be answered, right.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (server, stop) = (server.clone(), stop.clone());
        let body = tf_body(&pixels);
        let classes = classes.clone();
        std::thread::spawn(move || {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                let (code, answer) = server.json("POST", "/v1/models/cnn:predict", Some(&body));
                assert_eq!(code, 200, "{answer}");
                let got: Vec<usize> = answer["predictions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["class"].as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(got, classes);
                answered += 1;
            }
            answered
        })
    };

    // A new version: loaded, warmed up, swapped in; the old one (policy: latest 1) unloaded.
    add_version(&repo, "cnn", 2, &bytes);
    wait_for(&server, "cnn", &[("2", "AVAILABLE"), ("1", "END")]);
    let (code, answer) = server.json("POST", "/v2/models/cnn/infer", Some(&v2_body(&pixels)));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model_version"], "2");
    assert_error(
        server.json(
            "POST",
            "/v2/models/cnn/versions/1/infer",
            Some(&v2_body(&pixels)),
        ),
        404,
        "no version 1 loaded; loaded: [2]",
    );

    // A broken version 3 is refused, said in the log and the status; 2 keeps serving.
    add_version(&repo, "cnn", 3, b"not a safetensors file");
    let started = Instant::now();
    while !server.log().contains("version 3 refused") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, status) = server.json("GET", "/v1/models/cnn/versions/3", None);
    let v3 = &status["model_version_status"][0];
    assert_eq!(v3["state"], "END");
    assert_ne!(v3["status"]["error_code"], "OK", "{status}");
    assert!(
        server.log().contains("(versions [2] keep serving)"),
        "{}",
        server.log()
    );
    let (_, answer) = server.json("POST", "/v2/models/cnn/infer", Some(&v2_body(&pixels)));
    assert_eq!(answer["model_version"], "2");

    stop.store(true, Ordering::Relaxed);
    let answered = load
        .join()
        .expect("every request under load answered right");
    assert!(answered > 0);
    assert_eq!(
        server.metric(r#"mlops_requests_total{api="tfserving",code="503",model="cnn",version=""}"#),
        0.0
    );
}

#[test]
fn serve_follows_the_model_config_policies_and_labels() {
    let model = trained_model();
    let bytes = std::fs::read(&model).unwrap();
    let (pixels, classes, _) = expected(&model);
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    for v in [1, 2, 3] {
        add_version(&repo, "cnn", v, &bytes);
    }
    add_version(&repo, "other", 7, &bytes);
    let config = dir.path().join("models.yaml");
    std::fs::write(
        &config,
        "model_config_list:\n  - name: cnn\n    model_version_policy: {specific: {versions: [1, 3]}}\n    version_labels: {stable: 1, canary: 3}\n",
    )
    .unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--model-repository",
            "repo",
            "--model-config",
            "models.yaml",
            "--poll-secs",
            "1",
        ],
    );
    wait_for(&server, "cnn", &[("3", "AVAILABLE"), ("1", "AVAILABLE")]);
    // Only configured models are served.
    assert_error(
        server.json("GET", "/v1/models/other", None),
        404,
        "no model `other`",
    );

    let body = tf_body(&pixels[..2]);
    for path in [
        "/v1/models/cnn/versions/1:predict",
        "/v1/models/cnn/versions/3:predict",
        "/v1/models/cnn/labels/stable:predict",
        "/v1/models/cnn/labels/canary:predict",
        "/v1/models/cnn:predict",
    ] {
        let (code, answer) = server.json("POST", path, Some(&body));
        assert_eq!(code, 200, "{path}: {answer}");
        assert_eq!(answer["predictions"][1]["class"], classes[1], "{path}");
    }
    assert_error(
        server.json("POST", "/v1/models/cnn/versions/2:predict", Some(&body)),
        404,
        "no version 2 loaded; loaded: [1, 3]",
    );
    assert_error(
        server.json("POST", "/v1/models/cnn/labels/beta:predict", Some(&body)),
        404,
        "no version label `beta`; labels: [\"canary\", \"stable\"]",
    );
    // A bad version is answered after the body is read: answering first closed the
    // connection under a client still sending (a broken pipe, seen in CI), most surely
    // with a large body.
    let large = tf_body(&vec![pixels[0].clone(); 512]);
    for path in [
        "/v1/models/cnn/versions/x:predict",
        "/v2/models/cnn/versions/0/infer",
    ] {
        assert_error(
            server.json("POST", path, Some(&large)),
            400,
            "not a model version",
        );
    }
    let (code, meta) = server.json("GET", "/v1/models/cnn/labels/stable/metadata", None);
    assert_eq!(code, 200, "{meta}");
    assert_eq!(meta["model_spec"]["version"], "1");
    // KServe v2, as tritonclient calls it with model_version="1".
    let (code, meta) = server.json("GET", "/v2/models/cnn", None);
    assert_eq!(code, 200);
    assert_eq!(meta["versions"], json!(["1", "3"]));
    let (code, ready) = server.json("GET", "/v2/models/cnn/versions/1/ready", None);
    assert_eq!((code, &ready["ready"]), (200, &Value::Bool(true)));
    let (code, answer) = server.json(
        "POST",
        "/v2/models/cnn/versions/1/infer",
        Some(&v2_body(&pixels[..2])),
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model_version"], "1");
    assert_eq!(
        server.metric(r#"mlops_requests_total{api="v2",code="200",model="cnn",version="1"}"#),
        1.0
    );

    // The config is re-read on every poll: `all` now, and `other` too.
    std::fs::write(
        &config,
        "model_config_list:\n  - {name: cnn, model_version_policy: {all: {}}}\n  - {name: other}\n",
    )
    .unwrap();
    wait_for(
        &server,
        "cnn",
        &[("3", "AVAILABLE"), ("2", "AVAILABLE"), ("1", "AVAILABLE")],
    );
    wait_for(&server, "other", &[("7", "AVAILABLE")]);
    // A broken config keeps what is served, and says so.
    std::fs::write(&config, "model_config_list: [{nme: cnn}]").unwrap();
    let started = Instant::now();
    while !server.log().contains("keeping the previous model config") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        server
            .json("POST", "/v1/models/cnn/versions/2:predict", Some(&body))
            .0,
        200
    );
}

#[cfg(unix)]
#[test]
fn serve_reads_the_repository_again_on_sighup() {
    let bytes = std::fs::read(trained_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    add_version(&repo, "cnn", 1, &bytes);
    let server = Server::start(
        dir.path(),
        &["--model-repository", "repo", "--poll-secs", "0"],
    );
    wait_for(&server, "cnn", &[("1", "AVAILABLE")]);
    add_version(&repo, "cnn", 2, &bytes);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        states(&server, "cnn"),
        [("1".into(), "AVAILABLE".into())],
        "no polling"
    );
    server.signal(libc::SIGHUP);
    wait_for(&server, "cnn", &[("2", "AVAILABLE"), ("1", "END")]);
}

/// An empty repository is served (a deployment may fill it later) but said out loud, and
/// readiness says no until a version loads.
#[test]
fn serve_warns_about_a_repository_with_nothing_to_serve() {
    let bytes = std::fs::read(trained_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("cnn")).unwrap();
    let output = crate::util::mlops(dir.path())
        .args([
            "serve",
            "--port",
            "0",
            "--model-repository",
            "repo",
            "--poll-secs",
            "1",
        ])
        .timeout(Duration::from_secs(3))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "has no version that loads (expected DIR/<name>/<version>/model.safetensors)"
        ),
        "{stderr}"
    );
    let server = Server::start(
        dir.path(),
        &["--model-repository", "repo", "--poll-secs", "1"],
    );
    assert_eq!(server.json("GET", "/v2/health/ready", None).0, 503);
    add_version(&repo, "cnn", 1, &bytes);
    wait_for(&server, "cnn", &[("1", "AVAILABLE")]);
    assert_eq!(server.json("GET", "/v2/health/ready", None).0, 200);
}

#[test]
fn serve_refuses_a_bad_repository_or_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "model_config_list: [{name: ../x}]",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("repo")).unwrap();
    for (args, needle) in [
        (
            vec!["--model-repository", "missing"],
            "cannot list the model repository",
        ),
        (
            vec!["--model-repository", "repo", "--model-config", "bad.yaml"],
            "must be 1-128 letters",
        ),
        (vec!["--model-config", "bad.yaml"], "--model-repository"),
        (
            vec!["--model-repository", "repo", "--poll-secs", "86401"],
            "--poll-secs",
        ),
    ] {
        let output = crate::util::mlops(dir.path())
            .args(["serve", "--port", "0"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// A Python with tritonclient[http] (`.ci/run` makes one from
/// `examples/requirements-triton.txt` and sets `MLOPS_TRITON_PYTHON`). Locally without it
/// the test says so and passes; under CI it fails, so CI always runs it.
fn triton_python() -> Option<std::path::PathBuf> {
    match std::env::var_os("MLOPS_TRITON_PYTHON") {
        Some(p) => Some(p.into()),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must set MLOPS_TRITON_PYTHON (see .ci/run): the tritonclient check cannot be skipped there")
        }
        None => {
            eprintln!("MLOPS_TRITON_PYTHON is not set: tritonclient check skipped");
            None
        }
    }
}

/// NVIDIA's own client, as a user runs it (`examples/triton_check.py`): health,
/// metadata, and every test image of the tiny set sent four ways (FP32 and UINT8, binary
/// tensors and JSON) to version 2 of a repository model, `model_version="2"`; every class
/// equals the runtime's.
#[test]
fn tritonclient_gets_the_runtimes_classes_from_a_repository_version() {
    let Some(python) = triton_python() else {
        return;
    };
    let model = trained_model();
    let bytes = std::fs::read(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    add_version(&repo, "cnn", 1, &bytes);
    add_version(&repo, "cnn", 2, &bytes);
    std::fs::write(
        dir.path().join("models.yaml"),
        "model_config_list: [{name: cnn, model_version_policy: {all: {}}}]",
    )
    .unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--model-repository",
            "repo",
            "--model-config",
            "models.yaml",
            "--cache-size",
            "0",
        ],
    );
    // The runtime's classes for every tiny test image.
    let split =
        mlops::data::load_split(&crate::util::tiny_data(), mlops::data::SplitKind::Test).unwrap();
    let (artifact, _) = mlops::artifact::Artifact::load(&model).unwrap();
    let (mut x, mut labels, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    split.gather(
        &(0..split.count).collect::<Vec<_>>(),
        &artifact.input.preprocess(),
        &mut x,
        &mut labels,
    );
    use mlops::runtime::Engine as _;
    mlops::runtime::CpuEngine::new(&artifact, 1)
        .unwrap()
        .predict(&x, split.count, &mut logits)
        .unwrap();
    let want: Vec<u64> = logits
        .chunks_exact(10)
        .map(|r| mlops::runtime::argmax(r) as u64)
        .collect();
    let output = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/triton_check.py"))
        .arg(server.addr())
        .arg("cnn")
        .arg("--data")
        .arg(crate::util::tiny_data())
        .args(["--limit", "1000", "--batch", "50", "--model-version", "2"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (&report["live"], &report["ready"], &report["model_ready"]),
        (&json!(true), &json!(true), &json!(true))
    );
    assert_eq!(report["model"]["versions"], json!(["1", "2"]));
    assert_eq!(
        report["server"]["extensions"],
        json!(["binary_tensor_data"])
    );
    for way in ["fp32_binary", "fp32_json", "uint8_binary", "uint8_json"] {
        let got: Vec<u64> = report["ways"][way]["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(got.len(), split.count, "{way}");
        assert_eq!(got, want, "{way}");
    }
    assert_eq!(
        server.metric(r#"mlops_requests_total{api="v2",code="200",model="cnn",version="2"}"#),
        4.0 * (split.count as f64 / 50.0).ceil()
    );
}
