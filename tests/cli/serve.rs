//! `mlops serve`: the real binary on a free port, spoken to over HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlops::artifact::Artifact;
use mlops::runtime::{CpuEngine, Engine as _};
use mlops::serve::signing::Signer;
use serde_json::{json, Value};

use crate::util::{assert_user_error, dir_with_model, mlops, tiny_data};

/// A running `mlops serve`, stopped (SIGKILL) when dropped.
pub(crate) struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// What the server printed on stderr after its `listening` line.
    log: Arc<Mutex<String>>,
    /// Keeps connections alive between calls; every call is bounded in time.
    agent: ureq::Agent,
}

impl Server {
    pub(crate) fn start(dir: &Path, args: &[&str]) -> Server {
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
            log: Arc::default(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(),
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
        // Keep draining stderr (kept for `log`) so the server never blocks on a full pipe.
        let log = server.log.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while matches!(stderr.read_line(&mut line), Ok(n) if n > 0) {
                log.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        server
    }

    /// `127.0.0.1:PORT`.
    pub(crate) fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// What the server printed on stderr so far (after its `listening` line).
    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the server process is still running.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `(status, body)` of a request with a raw body; `headers` are added as given.
    pub(crate) fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        self.try_send(method, path, body, headers)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `(status, Inference-Header-Content-Length, body bytes)` of a binary POST.
    pub(crate) fn send_binary(
        &self,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, Vec<u8>) {
        let mut request = self.agent.post(&format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let response = match request
            .set("Content-Type", "application/octet-stream")
            .send_bytes(body)
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path}: {e}"),
        };
        let status = response.status();
        let header = response
            .header("Inference-Header-Content-Length")
            .map(str::to_string);
        let mut bytes = Vec::new();
        response.into_reader().read_to_end(&mut bytes).unwrap();
        (status, header, bytes)
    }

    /// [`Server::send`], with a transport error (no answer) returned as text, not a panic.
    pub(crate) fn try_send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String), String> {
        let mut request = self.agent.request(method, &format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let result = match body {
            Some(body) => request
                .set("Content-Type", "application/json")
                .send_bytes(body),
            None => request.call(),
        };
        match result {
            Ok(response) => Ok((response.status(), response.into_string().unwrap())),
            Err(ureq::Error::Status(code, response)) => Ok((code, response.into_string().unwrap())),
            Err(ureq::Error::Transport(e)) => Err(e.to_string()),
        }
    }

    /// `(status, body)` of a request; `headers` are added as given.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        self.send(method, path, body.map(str::as_bytes), headers)
    }

    pub(crate) fn json(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let text = body.map(|b| b.to_string());
        let (code, answer) = self.call(method, path, text.as_deref(), &[]);
        (
            code,
            serde_json::from_str(&answer).unwrap_or(Value::String(answer)),
        )
    }

    /// Sends `bytes` on a fresh connection and returns everything the server answers
    /// until it closes the connection (at most 10 s).
    fn raw(&self, bytes: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The server may answer and close before taking everything: that is the point.
        let _ = stream.write_all(bytes);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// The value of one `/metrics` series (0 when absent).
    pub(crate) fn metric(&self, series: &str) -> f64 {
        let (code, metrics) = self.call("GET", "/metrics", None, &[]);
        assert_eq!(code, 200);
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }
}

impl Server {
    /// Sends `signal` to the server process.
    #[cfg(unix)]
    pub(crate) fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Sends SIGTERM, asserts a clean exit and returns the step report it wrote to
    /// `report` (a path relative to `dir`).
    #[cfg(unix)]
    pub(crate) fn terminate(mut self, dir: &Path, report: &str) -> Value {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
        let text = std::fs::read_to_string(dir.join(report)).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["steps"][0].clone()
    }
}

/// Asserts an error answer: its status, and `needle` in its JSON `error`.
pub(crate) fn assert_error((code, answer): (u16, Value), status: u16, needle: &str) {
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
pub(crate) fn expected(model: &Path) -> (Vec<Vec<u8>>, Vec<usize>, Vec<f32>) {
    let split = mlops::data::load_split(&tiny_data(), mlops::data::SplitKind::Test).unwrap();
    let pixels: Vec<Vec<u8>> = split
        .images
        .chunks_exact(784)
        .take(8)
        .map(<[u8]>::to_vec)
        .collect();
    let (mut x, mut labels, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    let (artifact, _) = Artifact::load(model).unwrap();
    split.gather(
        &(0..8).collect::<Vec<_>>(),
        &artifact.input.preprocess(),
        &mut x,
        &mut labels,
    );
    CpuEngine::new(&artifact, 1)
        .unwrap()
        .predict(&x, 8, &mut logits)
        .unwrap();
    let classes = logits
        .chunks_exact(10)
        .map(mlops::runtime::argmax)
        .collect();
    (pixels, classes, logits)
}

pub(crate) fn tf_body(pixels: &[Vec<u8>]) -> Value {
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

pub(crate) fn v2_body(pixels: &[Vec<u8>]) -> Value {
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
    assert_eq!(
        value(r#"mlops_cache_hits_total{level="memory",model="model",version="1"}"#),
        8.0
    );
    assert_eq!(
        value(r#"mlops_cache_misses_total{level="memory",model="model",version="1"}"#),
        8.0
    );
    assert_eq!(
        value(r#"mlops_batch_images_sum{model="model",version="1"}"#),
        8.0
    );
    assert_eq!(
        value(r#"mlops_requests_total{api="tfserving",code="200",model="model",version="1"}"#),
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
    let nonce = "request-0001-abcdef";
    let signature =
        Signer::new(key.as_bytes().to_vec()).sign(&now, nonce, "POST", path, body.as_bytes());
    let headers = [
        ("X-Mlops-Timestamp", now.as_str()),
        ("X-Mlops-Nonce", nonce),
        ("X-Mlops-Signature", signature.as_str()),
    ];
    let (code, answer) = server.call("POST", path, Some(&body), &headers);
    assert_eq!(code, 200, "{answer}");
    // The same request again, within the window: a replay.
    let (code, e) = server.call("POST", path, Some(&body), &headers);
    assert_eq!(code, 401, "{e}");
    assert!(e.contains("replayed request"), "{e}");
    // Without a nonce: refused, naming the header.
    let (code, e) = server.call("POST", path, Some(&body), &[headers[0], headers[2]]);
    assert_eq!(code, 401);
    assert!(e.contains("x-mlops-nonce"), "{e}");
    let tampered = body.replace("0.0", "1.0");
    let fresh = [
        headers[0],
        ("X-Mlops-Nonce", "request-0002-abcdef"),
        headers[2],
    ];
    let (code, e) = server.call("POST", path, Some(&tampered), &fresh);
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

/// A TF Serving body of one image with every value `v`.
fn filled(v: f64) -> Value {
    json!({ "instances": [vec![v; 784]] })
}

/// Issue 10: finite but absurd values (3e38) drove the forward pass past the float range
/// and were answered 200 with `null` probabilities and a confident class. Logits that
/// are not finite are never an answer: a 400 says the input is out of the model's range
/// and what that range is (from `mlops.input`).
#[test]
fn serve_never_answers_non_finite_numbers() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors"]);
    let predict = "/v1/models/model:predict";
    // 1e38 made `null` probabilities; 3e38 a confident class from garbage. The second
    // time goes past the cache, which must not have kept the row either.
    for v in [1e38, 3e38, 3e38] {
        let answer = server.json("POST", predict, Some(&filled(v)));
        assert_error(
            answer.clone(),
            400,
            "`instances[0]` is far outside the model's input range",
        );
        assert_error(answer, 400, "from `0` to `1`");
    }
    let columnar = json!({ "inputs": [vec![-3e38; 784]] });
    assert_error(
        server.json("POST", predict, Some(&columnar)),
        400,
        "`inputs[0]` is far outside the model's input range",
    );
    let data = [vec![0.5; 784], vec![3e38; 784]].concat();
    let v2 = json!({"inputs": [{"name": "input", "shape": [2, 784], "datatype": "FP32",
        "data": data}]});
    assert_error(
        server.json("POST", "/v2/models/model/infer", Some(&v2)),
        400,
        "image 1 of `inputs[0].data` is far outside the model's input range",
    );
    // In range still answers, with finite probabilities.
    let (code, fine) = server.json("POST", predict, Some(&filled(0.5)));
    assert_eq!(code, 200, "{fine}");
    assert!(fine["predictions"][0]["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .all(Value::is_f64));
}

/// Issue 10: `--cache-size 1000000000` allocated ~36 GB up front and aborted. Every
/// numeric flag of serve is checked at parse time and the error names its range (exit 2,
/// a usage error).
#[test]
fn serve_checks_every_numeric_flag_against_its_range() {
    let dir = dir_with_model();
    let cases = [
        ("--cache-size", "1000000000", "0..=1000000"),
        ("--max-batch", "0", "1..=4096"),
        ("--max-batch", "100000", "1..=4096"),
        ("--batch-wait-us", "18446744073709551615", "0..=1000000"),
        ("--model-threads", "0", "1..=1024"),
        ("--read-timeout-ms", "0", "10..=600000"),
        ("--max-connections", "0", "1..=65536"),
        ("--max-connections", "-1", "1..=65536"),
        ("--port", "70000", "0..=65535"),
    ];
    for (flag, value, range) in cases {
        let output = mlops(dir.path())
            .args(["serve", "model.safetensors"])
            // A free port unless the port is what is tested.
            .args(if flag == "--port" {
                None
            } else {
                Some("--port=0")
            })
            .arg(format!("{flag}={value}"))
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(stderr.contains(range), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Issue 10: half-sent requests were never timed out, and enough of them locked every
/// other client out. With `--read-timeout-ms` a connection whose head or body has not
/// arrived in time is closed (a half-sent body gets a JSON 408 first), and
/// `--max-connections` caps the open ones: a normal client is still answered.
#[test]
fn serve_closes_half_sent_requests_and_keeps_answering() {
    let dir = dir_with_model();
    let server = Server::start(
        dir.path(),
        &[
            "model.safetensors",
            "--read-timeout-ms",
            "500",
            "--max-connections",
            "8",
            "--report",
            "r.json",
        ],
    );
    let predict = "/v1/models/model:predict";
    let body = filled(0.0).to_string();
    let partial_head = format!("POST {predict} HTTP/1.1\r\nHost: x\r\nContent-Len");
    let partial_body = format!(
        "POST {predict} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..body.len() / 2]
    );
    let opened = Instant::now();
    // Three kinds, ten of each: nothing sent, half a head, a head and half a body. More
    // than the cap, so some wait in the backlog until others time out.
    let half_sent: Vec<(usize, TcpStream)> = (0..30)
        .map(|i| {
            let mut stream = TcpStream::connect(server.addr()).unwrap();
            match i % 3 {
                0 => {}
                1 => stream.write_all(partial_head.as_bytes()).unwrap(),
                _ => stream.write_all(partial_body.as_bytes()).unwrap(),
            }
            (i % 3, stream)
        })
        .collect();
    // A normal client, on its own connection, is answered (once slots free up).
    let client = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build();
    let answer = client
        .post(&format!("{}{predict}", server.base))
        .set("Content-Type", "application/json")
        .send_string(&body)
        .expect("a normal client is answered");
    assert_eq!(answer.status(), 200);
    // Every half-sent connection is closed by the server, well before 15 s.
    for (kind, mut stream) in half_sent {
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("half-sent connection of kind {kind} was not closed: {e}"),
        }
        let answer = String::from_utf8_lossy(&answer);
        if kind == 2 {
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
            assert!(answer.contains(r#"{"error":"the body did not arrive within 500 ms"#));
        }
    }
    let elapsed = opened.elapsed();
    assert!(elapsed < Duration::from_secs(12), "{elapsed:?}");
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    // Ten bodies and twenty heads (the normal client's idle keep-alive connection may
    // have timed out too).
    assert!(server.metric("mlops_read_timeouts_total") >= 30.0);

    // The cap: with 8 connections held, a ninth waits until one times out.
    let started = Instant::now();
    let held: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    // A fresh agent: a pooled connection would skip the queue.
    let ninth = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build()
        .get(&format!("{}/v2/health/ready", server.base))
        .call()
        .expect("the ninth client is answered once a slot frees");
    assert_eq!(ninth.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    drop(held);
    #[cfg(unix)]
    {
        let step = server.terminate(dir.path(), "r.json");
        assert_eq!(step["metrics"]["status_codes"]["408"], 10);
        assert!(step["metrics"]["read_timeouts"].as_u64().unwrap() >= 28);
    }
}

/// Issue 10: error bodies were not always JSON (a plain-text 413, an empty 405), a GET of
/// `MODEL:predict` answered 404 for a model that exists, and 413/414 were not counted.
/// Every error is `{"error": ...}` now, and every status is counted in `/metrics` and in
/// the shutdown report.
#[test]
fn serve_answers_every_error_in_json_and_counts_it() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors", "--report", "r.json"]);
    // 413: refused from `Content-Length` alone, before the body is read.
    let answer = server.raw(
        b"POST /v1/models/model:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 40000000\r\n\r\n{\"instances\": [",
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains(
            r#"{"error":"the body (`Content-Length: 40000000`) is over the 32 MiB limit"#
        ),
        "{answer}"
    );
    // 414: a URI over 8 KiB, in JSON.
    let long = format!("/v1/models/{}:predict", "m".repeat(10_000));
    assert_error(
        server.json("POST", &long, Some(&filled(0.0))),
        414,
        "the URI has 10019 bytes; this server takes at most 8192",
    );
    // A head over 32 KiB is refused by hyper itself (431): counted too.
    let huge = format!("/v1/models/{}:predict", "m".repeat(70_000));
    let answer = server.raw(format!("GET {huge} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // 405s name the method and what the route takes.
    let (code, body) = server.call("POST", "/v2/health/ready", Some("{}"), &[]);
    assert_eq!(code, 405);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["error"],
        "`POST /v2/health/ready` is not allowed: this route takes GET, HEAD"
    );
    assert_error(
        server.json("GET", "/v1/models/model:predict", None),
        405,
        "`:predict` takes POST",
    );
    assert_error(
        server.json("GET", "/v1/models/nope:predict", None),
        404,
        "no model `nope`",
    );
    assert_eq!(server.json("GET", "/v1/models/model", None).0, 200);

    // Refused requests were answered by no version: `version=""`.
    let series = |api: &str, model: &str, code: u16| {
        server.metric(&format!(
            r#"mlops_requests_total{{api="{api}",code="{code}",model="{model}",version=""}}"#
        ))
    };
    assert_eq!(series("tfserving", "model", 413), 1.0);
    assert_eq!(series("tfserving", "(unknown)", 414), 1.0);
    assert_eq!(series("http", "(none)", 431), 1.0);
    assert_eq!(series("http", "(none)", 405), 2.0);
    assert_eq!(series("http", "(none)", 404), 1.0);
    #[cfg(unix)]
    {
        let step = server.terminate(dir.path(), "r.json");
        let metrics = &step["metrics"];
        assert_eq!(metrics["requests"], 2, "{metrics}");
        assert_eq!(metrics["failed_requests"], 2, "{metrics}");
        for code in ["413", "414", "431", "405", "404"] {
            assert!(
                metrics["status_codes"][code].as_u64() >= Some(1),
                "{code}: {metrics}"
            );
        }
    }
}

/// Issue 10: nested instances whose inner shape does not match the model (rows of 27,
/// 29, 28 ... values adding up to 784; `[2][392]`) were flattened and answered 200.
/// Nested input must match the model's shape exactly; flat input may be reshaped.
#[test]
fn serve_holds_nested_images_to_the_model_shape() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors"]);
    let predict = "/v1/models/model:predict";
    let pixels: Vec<f32> = (0..784).map(|i| (i % 256) as f32 / 255.0).collect();
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let mut at = 0;
    for (i, len) in std::iter::repeat([27, 29, 28]).flatten().enumerate() {
        let len = if i == 27 { 784 - at } else { len };
        rows.push(pixels[at..at + len].to_vec());
        at += len;
        if at == 784 {
            break;
        }
    }
    let ragged = json!({ "instances": [rows] });
    assert_error(
        server.json("POST", predict, Some(&ragged)),
        400,
        "`instances[0]` is ragged (lists at depth 1 have 27 and 29 values)",
    );
    let halves = json!({ "instances": [[&pixels[..392], &pixels[392..]]] });
    assert_error(
        server.json("POST", predict, Some(&halves)),
        400,
        "`instances[0]` has shape [2, 392]",
    );
    let flat = server.json("POST", predict, Some(&json!({ "instances": [&pixels] })));
    assert_eq!(flat.0, 200, "{}", flat.1);
    let nested: Vec<Vec<Vec<f32>>> = pixels
        .chunks(28)
        .map(|row| row.iter().map(|&v| vec![v]).collect())
        .collect();
    let exact = server.json("POST", predict, Some(&json!({ "instances": [nested] })));
    assert_eq!(exact, flat);
    let v2 = json!({"inputs": [{"name": "input", "shape": [1, 28, 28, 1], "datatype": "FP32",
        "data": [&pixels[..392], &pixels[392..]]}]});
    assert_error(
        server.json("POST", "/v2/models/model/infer", Some(&v2)),
        400,
        "`inputs[0].data` is nested as [2, 392] but `shape` is [1, 28, 28, 1]",
    );
}

/// Issue 10: an unknown `signature_name` was silently ignored (200).
#[test]
fn serve_refuses_unknown_signature_names() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors"]);
    let predict = "/v1/models/model:predict";
    let mut body = filled(0.0);
    body["signature_name"] = json!("predict_images");
    assert_error(
        server.json("POST", predict, Some(&body)),
        400,
        r#"`signature_name` is `predict_images`; this model has ["serving_default"]"#,
    );
    body["signature_name"] = json!("serving_default");
    assert_eq!(server.json("POST", predict, Some(&body)).0, 200);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Issue 10: a body sent with `Content-Encoding: gzip` got "the body is not JSON". It is
/// inflated now, never past the body limit (a gzip bomb gets a 413), and an encoding
/// the server does not speak gets a 415 naming it.
#[test]
fn serve_inflates_gzip_bodies_within_the_limit() {
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors"]);
    let predict = "/v1/models/model:predict";
    let body = filled(0.25).to_string();
    let plain = server.call("POST", predict, Some(&body), &[]);
    assert_eq!(plain.0, 200, "{}", plain.1);
    let gzip_header = [("Content-Encoding", "gzip")];
    let inflated = server.send("POST", predict, Some(&gzip(body.as_bytes())), &gzip_header);
    assert_eq!(inflated, plain);
    // 40 MiB of spaces, ~40 KB sent.
    let bomb = gzip(&vec![b' '; 40 << 20]);
    let (code, answer) = server.send("POST", predict, Some(&bomb), &gzip_header);
    assert_eq!(code, 413, "{answer}");
    assert!(
        answer.contains("inflates over the 32 MiB limit"),
        "{answer}"
    );
    let (code, answer) = server.send(
        "POST",
        predict,
        Some(body.as_bytes()),
        &[("Content-Encoding", "br")],
    );
    assert_eq!(code, 415, "{answer}");
    assert!(
        answer.contains("`Content-Encoding: br` is not supported"),
        "{answer}"
    );
}

/// Issue 14: the KServe v2 binary tensor extension both ways, as tritonclient sends it
/// by default (`binary_data=True` inputs, binary outputs when none are named): the same
/// classes and probabilities as the runtime; issue 10 had only refused it by name.
#[test]
fn serve_speaks_the_v2_binary_tensor_extension() {
    let model = crate::util::trained_model();
    let (pixels, classes, logits) = expected(&model);
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors", "--cache-size", "0"]);
    let n = pixels.len();
    let unit: Vec<f32> = pixels
        .concat()
        .iter()
        .map(|&p| p as f32 * mlops::data::PIXEL_SCALE)
        .collect();
    let fp32: Vec<u8> = unit.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (datatype, tensor) in [("FP32", fp32), ("UINT8", pixels.concat())] {
        let header = json!({"inputs": [{"name": "input", "shape": [n, 28, 28, 1],
            "datatype": datatype, "parameters": {"binary_data_size": tensor.len()}}],
            "parameters": {"binary_data_output": true}})
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&tensor);
        let length = header.len().to_string();
        let (code, json_len, answer) = server.send_binary(
            "/v2/models/model/infer",
            &body,
            &[("Inference-Header-Content-Length", &length)],
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));
        let json_len: usize = json_len
            .expect("Inference-Header-Content-Length")
            .parse()
            .unwrap();
        let meta: Value = serde_json::from_slice(&answer[..json_len]).unwrap();
        let outputs = meta["outputs"].as_array().unwrap();
        assert_eq!(outputs[0]["name"], "probabilities");
        assert_eq!(outputs[0]["parameters"]["binary_data_size"], n * 10 * 4);
        assert_eq!(outputs[1]["parameters"]["binary_data_size"], n * 8);
        let binary = &answer[json_len..];
        assert_eq!(binary.len(), n * 10 * 4 + n * 8);
        let probabilities: Vec<f32> = binary[..n * 40]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got: Vec<usize> = binary[n * 40..]
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect();
        assert_eq!(got, classes, "{datatype}");
        for (row, logit_row) in probabilities.chunks_exact(10).zip(logits.chunks_exact(10)) {
            let want = mlops::predict::softmax(logit_row);
            for (a, b) in row.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{datatype}: {row:?} vs {want:?}");
            }
        }
    }
    // JSON outputs for binary inputs, when asked per output.
    let header = json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "UINT8",
        "parameters": {"binary_data_size": 784}}],
        "outputs": [{"name": "class", "parameters": {"binary_data": false}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&pixels[0]);
    let length = header.len().to_string();
    let (code, answer) = server.send(
        "POST",
        "/v2/models/model/infer",
        Some(&body),
        &[("Inference-Header-Content-Length", &length)],
    );
    assert_eq!(code, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["outputs"][0]["data"], json!([classes[0]]));
    // The server says it speaks the extension.
    let (_, server_meta) = server.json("GET", "/v2", None);
    assert_eq!(server_meta["extensions"], json!(["binary_tensor_data"]));
    // Sizes that do not add up are named.
    let (code, answer) = server.send(
        "POST",
        "/v2/models/model/infer",
        Some(&body[..body.len() - 1]),
        &[("Inference-Header-Content-Length", &length)],
    );
    assert_eq!(code, 400);
    assert!(
        answer.contains("the body has 783 bytes after its JSON part"),
        "{answer}"
    );
}
