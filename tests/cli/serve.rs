//! `mlops serve`: the real binary on a free port, spoken to over HTTP.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use mlops::artifact::Artifact;
use mlops::runtime::Session;
use mlops::serve::signing::Signer;
use serde_json::{json, Value};

use crate::util::{assert_user_error, dir_with_model, mlops, tiny_data};

/// A running `mlops serve`, stopped (SIGKILL) when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(dir: &Path, args: &[&str]) -> Server {
        let child = Command::new(assert_cmd::cargo::cargo_bin("mlops"))
            .current_dir(dir)
            .args(["serve", "--port", "0", "--threads", "1"])
            .args(args)
            .env("MLOPS_NO_PROGRESS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mlops serve");
        // Owned by `Server` from here on, so a failed assertion still stops it.
        let mut server = Server {
            child,
            base: String::new(),
        };
        let mut stderr = BufReader::new(server.child.stderr.take().unwrap());
        let mut line = String::new();
        while server.base.is_empty() {
            line.clear();
            let read = stderr.read_line(&mut line).unwrap();
            assert!(read > 0, "mlops serve exited before listening");
            if let Some(rest) = line.split("listening on ").nth(1) {
                server.base = rest.split_whitespace().next().unwrap().to_string();
            }
        }
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        server
    }

    /// `(status, body)` of a request; `headers` are added as given.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut request = ureq::request(method, &format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let result = match body {
            Some(body) => request
                .set("Content-Type", "application/json")
                .send_string(body),
            None => request.call(),
        };
        match result {
            Ok(response) => (response.status(), response.into_string().unwrap()),
            Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    fn json(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let text = body.map(|b| b.to_string());
        let (code, answer) = self.call(method, path, text.as_deref(), &[]);
        (
            code,
            serde_json::from_str(&answer).unwrap_or(Value::String(answer)),
        )
    }
}

impl Server {
    /// Sends SIGTERM, asserts a clean exit and returns the step report it wrote to
    /// `report` (a path relative to `dir`).
    #[cfg(unix)]
    fn terminate(mut self, dir: &Path, report: &str) -> Value {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
        let text = std::fs::read_to_string(dir.join(report)).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["steps"][0].clone()
    }
}

/// Asserts an error answer: its status, and `needle` in its JSON `error`.
fn assert_error((code, answer): (u16, Value), status: u16, needle: &str) {
    assert_eq!(code, status, "{answer}");
    let message = answer["error"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "expected `{needle}` in: {answer}");
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Eight test images as pixels, and the model's own classes and logits for them.
fn expected(model: &Path) -> (Vec<Vec<u8>>, Vec<usize>, Vec<f32>) {
    let split = mlops::data::load_split(&tiny_data(), mlops::data::SplitKind::Test).unwrap();
    let pixels: Vec<Vec<u8>> = split
        .images
        .chunks_exact(784)
        .take(8)
        .map(<[u8]>::to_vec)
        .collect();
    let (mut x, mut labels, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    split.gather(&(0..8).collect::<Vec<_>>(), &mut x, &mut labels);
    let (artifact, _) = Artifact::load(model).unwrap();
    Session::new(&artifact, 1)
        .unwrap()
        .predict(&x, 8, &mut logits);
    let classes = logits
        .chunks_exact(10)
        .map(mlops::runtime::argmax)
        .collect();
    (pixels, classes, logits)
}

fn tf_body(pixels: &[Vec<u8>]) -> Value {
    let instances: Vec<Vec<f32>> = pixels
        .iter()
        .map(|p| {
            p.iter()
                .map(|&v| v as f32 * mlops::data::PIXEL_SCALE)
                .collect()
        })
        .collect();
    json!({ "instances": instances })
}

fn v2_body(pixels: &[Vec<u8>]) -> Value {
    json!({"id": "42", "inputs": [{"name": "input", "shape": [pixels.len(), 28, 28, 1],
        "datatype": "UINT8", "data": pixels.concat()}]})
}

/// Both APIs answer what the runtime computes for the same images; health and
/// metadata endpoints describe the model. The training checkpoint a `*.safetensors` glob
/// also matches is skipped, not served and not an error.
#[test]
fn serve_answers_both_apis_like_the_runtime() {
    let dir = dir_with_model();
    let checkpoint = crate::util::trained_model().with_file_name("checkpoint.safetensors");
    std::fs::copy(checkpoint, dir.path().join("checkpoint.safetensors")).unwrap();
    let (pixels, classes, logits) = expected(&dir.path().join("model.safetensors"));
    let server = Server::start(dir.path(), &["checkpoint.safetensors", "model.safetensors"]);
    assert_eq!(server.json("GET", "/v2/models/checkpoint", None).0, 404);

    let (code, tf) = server.json("POST", "/v1/models/model:predict", Some(&tf_body(&pixels)));
    assert_eq!(code, 200, "{tf}");
    let predictions = tf["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 8);
    for (i, p) in predictions.iter().enumerate() {
        assert_eq!(p["class"], classes[i], "image {i}");
        let row = &logits[i * 10..(i + 1) * 10];
        let max = row.iter().fold(f32::MIN, |m, &v| m.max(v));
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        let want = (row[classes[i]] - max).exp() / sum;
        let got = p["probabilities"][classes[i]].as_f64().unwrap() as f32;
        assert!((want - got).abs() < 1e-4, "image {i}: {want} vs {got}");
    }

    let (code, v2) = server.json("POST", "/v2/models/model/infer", Some(&v2_body(&pixels)));
    assert_eq!(code, 200, "{v2}");
    assert_eq!(v2["id"], "42");
    let class_output = v2["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "class")
        .unwrap();
    assert_eq!(class_output["data"], json!(classes));
    assert_eq!(class_output["shape"], json!([8]));

    assert_eq!(server.json("GET", "/v2/health/ready", None).0, 200);
    assert_eq!(
        server.json("GET", "/v2/models/model/ready", None).1["ready"],
        true
    );
    let (_, status) = server.json("GET", "/v1/models/model", None);
    assert_eq!(status["model_version_status"][0]["state"], "AVAILABLE");
    let (_, meta) = server.json("GET", "/v2/models/model", None);
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 28, 28, 1]));
    assert_eq!(meta["parameters"]["precision"], "fp32");
    let (_, tf_meta) = server.json("GET", "/v1/models/model/metadata", None);
    let signature = &tf_meta["metadata"]["signature_def"]["signature_def"]["serving_default"];
    assert_eq!(signature["inputs"]["input"]["dtype"], "DT_FLOAT");
}

/// A repeated request is answered from the cache, and `/metrics` counts requests,
/// forward passes and cache hits.
#[test]
fn serve_caches_repeats_and_exports_metrics() {
    let dir = dir_with_model();
    let (pixels, _, _) = expected(&dir.path().join("model.safetensors"));
    let server = Server::start(
        dir.path(),
        &[
            "model.safetensors",
            "--max-batch",
            "64",
            "--batch-wait-us",
            "100",
        ],
    );
    let body = tf_body(&pixels);
    let first = server.json("POST", "/v1/models/model:predict", Some(&body));
    let second = server.json("POST", "/v1/models/model:predict", Some(&body));
    assert_eq!(first, second);
    let (code, metrics) = server.call("GET", "/metrics", None, &[]);
    assert_eq!(code, 200);
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("no `{series}` in:\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value(r#"mlops_cache_hits_total{model="model"}"#), 8.0);
    assert_eq!(value(r#"mlops_cache_misses_total{model="model"}"#), 8.0);
    assert_eq!(value(r#"mlops_batch_images_sum{model="model"}"#), 8.0);
    assert_eq!(
        value(r#"mlops_requests_total{api="tfserving",code="200",model="model"}"#),
        2.0
    );
}

/// Bad requests get a 4xx with a JSON error naming the field, model or route.
#[test]
fn serve_names_what_is_wrong_with_a_request() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors"]);
    let post = |path: &str, body: Value| server.json("POST", path, Some(&body));
    let short = json!({"instances": [[0.5, 0.5]]});
    assert_error(
        post("/v1/models/model:predict", short),
        400,
        "`instances[0]` has 2 values",
    );
    let one = json!({"instances": [[0.5]]});
    assert_error(post("/v1/models/nope:predict", one), 404, "[\"model\"]");
    assert_error(
        post("/v1/models/model:classify", json!({})),
        400,
        ":predict",
    );
    let (code, body) = server.call("POST", "/v2/models/model/infer", Some("{not json"), &[]);
    assert_eq!(code, 400);
    assert!(body.contains("not JSON"), "{body}");
    let unknown = server.json("GET", "/v3/anything", None);
    assert_error(unknown, 404, "/v1/models/NAME:predict");
}

/// With `--hmac-key-file`, unsigned or tampered requests get 401 and signed ones run.
#[test]
fn serve_checks_request_signatures() {
    let dir = dir_with_model();
    let key = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join("key"), format!("{key}\n")).unwrap();
    let server = Server::start(dir.path(), &["model.safetensors", "--hmac-key-file", "key"]);
    let body = json!({"instances": [vec![0.0f32; 784]]}).to_string();
    let path = "/v1/models/model:predict";
    let (code, e) = server.call("POST", path, Some(&body), &[]);
    assert_eq!(code, 401, "{e}");
    assert!(e.contains("x-mlops-timestamp"), "{e}");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let signature = Signer::new(key.as_bytes().to_vec()).sign(&now, "POST", path, body.as_bytes());
    let headers = [
        ("X-Mlops-Timestamp", now.as_str()),
        ("X-Mlops-Signature", signature.as_str()),
    ];
    let (code, answer) = server.call("POST", path, Some(&body), &headers);
    assert_eq!(code, 200, "{answer}");
    let tampered = body.replace("0.0", "1.0");
    let (code, e) = server.call("POST", path, Some(&tampered), &headers);
    assert_eq!(code, 401);
    assert!(e.contains("does not match"), "{e}");
    // The same signed body sent to another route is refused too, and an unsigned client
    // does not learn which models exist.
    let (code, _) = server.call("POST", "/v1/models/other:predict", Some(&body), &headers);
    assert_eq!(code, 401);
}

/// SIGTERM stops the server cleanly (exit 0) and writes its step report.
#[cfg(unix)]
#[test]
fn serve_reports_on_sigterm() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors", "--report", "serve.json"]);
    let (code, _) = server.json(
        "POST",
        "/v1/models/model:predict",
        Some(&json!({"instances": [vec![0.0f32; 784]]})),
    );
    assert_eq!(code, 200);
    let step = server.terminate(dir.path(), "serve.json");
    assert_eq!(step["step"], "serve");
    assert_eq!(step["metrics"]["requests"], 1);
    assert_eq!(step["metrics"]["images_computed"], 1);
}

/// A SIGTERM right after start-up, before any request, still stops it cleanly (the
/// signal handler used to be installed only once a request had come in, so this
/// killed the process with no report).
#[cfg(unix)]
#[test]
fn serve_stops_cleanly_before_any_request() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors", "--report", "r.json"]);
    let step = server.terminate(dir.path(), "r.json");
    assert_eq!(step["metrics"]["requests"], 0);
}

#[test]
fn serve_refuses_bad_settings() {
    let dir = dir_with_model();
    let run = |args: &[&str]| mlops(dir.path()).arg("serve").args(args).output().unwrap();
    assert_user_error(
        &run(&["missing.safetensors", "--port", "0"]),
        "missing.safetensors",
    );
    std::fs::write(dir.path().join("short"), "abc").unwrap();
    assert_user_error(
        &run(&[
            "model.safetensors",
            "--port",
            "0",
            "--hmac-key-file",
            "short",
        ]),
        "at least 16",
    );
    std::fs::create_dir(dir.path().join("other")).unwrap();
    std::fs::copy(
        dir.path().join("model.safetensors"),
        dir.path().join("other/model.safetensors"),
    )
    .unwrap();
    assert_user_error(
        &run(&[
            "model.safetensors",
            "other/model.safetensors",
            "--port",
            "0",
        ]),
        "both be served as `model`",
    );
    // A port already taken: the error says so and how to pick another.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    assert_user_error(&run(&["model.safetensors", "--port", &port]), "--port");
}
