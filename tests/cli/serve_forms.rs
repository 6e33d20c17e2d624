//! What clients send besides plain tensors: TF Serving's `b64` images and named-input
//! forms, and the guide's Flask/FastAPI endpoints (`/predict`, `/model_info`, `/health`).

use base64::Engine as _;
use serde_json::{json, Value};

use crate::serve::{assert_error, expected, Server};
use crate::util::{dir_with_model, trained_model};

/// One 28x28 grey image as PNG (or JPEG) bytes, base64.
fn b64_image(pixels: &[u8], side: u32, format: image::ImageFormat) -> String {
    let img = image::GrayImage::from_raw(28, 28, pixels.to_vec()).unwrap();
    let img = image::DynamicImage::ImageLuma8(img).resize_exact(
        side,
        side,
        image::imageops::FilterType::Nearest,
    );
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes.into_inner())
}

fn classes_of(answer: &Value) -> Vec<usize> {
    answer["predictions"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .map(|p| p["class"].as_u64().unwrap() as usize)
        .collect()
}

fn unit(pixels: &[u8]) -> Vec<f32> {
    pixels
        .iter()
        .map(|&p| p as f32 * mlops::data::PIXEL_SCALE)
        .collect()
}

#[test]
fn serve_takes_b64_images_and_named_inputs() {
    let (pixels, classes, _) = expected(&trained_model());
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors", "--cache-size", "0"]);
    let png: Vec<Value> = pixels
        .iter()
        .map(|p| json!({"b64": b64_image(p, 28, image::ImageFormat::Png)}))
        .collect();
    // `{"b64": PNG}` is decoded and preprocessed as `mlops.input` says: the same classes
    // as the tensors.
    let (code, answer) = server.json(
        "POST",
        "/v1/models/model:predict",
        Some(&json!({ "instances": png })),
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(classes_of(&answer), classes);
    // Named: `{"input": {"b64": ...}}`, `{"input": [...]}` and the columnar
    // `{"inputs": {"input": [...]}}`.
    let named_b64: Vec<Value> = png.iter().map(|b| json!({ "input": b })).collect();
    let named: Vec<Value> = pixels.iter().map(|p| json!({ "input": unit(p) })).collect();
    let columnar: Vec<Vec<f32>> = pixels.iter().map(|p| unit(p)).collect();
    for body in [
        json!({ "instances": named_b64 }),
        json!({ "instances": named }),
    ] {
        let (code, answer) = server.json("POST", "/v1/models/model:predict", Some(&body));
        assert_eq!(code, 200, "{answer}");
        assert_eq!(classes_of(&answer), classes);
    }
    let (code, answer) = server.json(
        "POST",
        "/v1/models/model:predict",
        Some(&json!({ "inputs": { "input": columnar } })),
    );
    assert_eq!(code, 200, "{answer}");
    let got: Vec<usize> = answer["outputs"]["class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(got, classes);
    // Another size is resized (as `--calib` folders are); JPEG is read too.
    for (side, format) in [
        (56, image::ImageFormat::Png),
        (28, image::ImageFormat::Jpeg),
    ] {
        let body = json!({"instances": [{"b64": b64_image(&pixels[0], side, format)}]});
        let (code, answer) = server.json("POST", "/v1/models/model:predict", Some(&body));
        assert_eq!(code, 200, "{format:?} {side}: {answer}");
    }
    // What is wrong is named.
    for (body, needle) in [
        (
            json!({"instances": [{"b64": "%%%"}]}),
            "`b64` is not base64",
        ),
        (
            json!({"instances": [{"b64": "aGVsbG8="}]}),
            "not a PNG/JPEG image",
        ),
        (
            json!({"instances": [{"pixels": [0.0]}]}),
            "this model has one input, `input`",
        ),
        (
            json!({"inputs": {"image": columnar}}),
            "`inputs` names `image`; this model has one input, `input`",
        ),
        (json!({"instances": [{}]}), "an empty object"),
    ] {
        assert_error(
            server.json("POST", "/v1/models/model:predict", Some(&body)),
            400,
            needle,
        );
    }
    // An image whose header claims 100,000 x 100,000 pixels is refused before decoding.
    let huge = {
        let mut png = Vec::new();
        png.extend_from_slice(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR");
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&100_000u32.to_be_bytes());
        png.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0, 0]);
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    assert_error(
        server.json(
            "POST",
            "/v1/models/model:predict",
            Some(&json!({"instances": [{"b64": huge}]})),
        ),
        400,
        "not a PNG/JPEG image",
    );
}

#[test]
fn serve_answers_the_guide_endpoints() {
    let (pixels, classes, _) = expected(&trained_model());
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors"]);
    let (code, health) = server.json("GET", "/health", None);
    assert_eq!(code, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["model_loaded"], true);
    let (code, info) = server.json("GET", "/model_info", None);
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["input_shape"], json!([28, 28, 1]));
    assert_eq!(info["output_shape"], json!([10]));
    assert_eq!(info["parameters"], 93_322);
    assert_eq!(info["name"], "model");
    // One image, nested as the guide's clients send it (`reshape(-1, 28, 28, 1)`
    // takes any nesting), or several.
    let one: Vec<Vec<f32>> = unit(&pixels[0]).chunks(28).map(<[f32]>::to_vec).collect();
    let (code, answer) = server.json("POST", "/predict", Some(&json!({ "input": one })));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["status"], "success");
    assert_eq!(answer["classes"], json!([classes[0]]));
    let probabilities = answer["predictions"][0].as_array().unwrap();
    assert_eq!(probabilities.len(), 10);
    let sum: f64 = probabilities.iter().map(|p| p.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-4, "{sum}");
    let all: Vec<Vec<f32>> = pixels.iter().map(|p| unit(p)).collect();
    let (code, answer) = server.json("POST", "/predict", Some(&json!({ "input": all })));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["classes"], json!(classes));
    let (code, answer) = server.json(
        "POST",
        "/predict",
        Some(&json!({"input": {"b64": b64_image(&pixels[1], 28, image::ImageFormat::Png)}})),
    );
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["classes"], json!([classes[1]]));
    // Several b64 images (refused as "an object where numbers were expected" before the
    // guide's body was parsed as it streams).
    let several: Vec<Value> = pixels
        .iter()
        .map(|p| json!({"b64": b64_image(p, 28, image::ImageFormat::Png)}))
        .collect();
    let (code, answer) = server.json("POST", "/predict", Some(&json!({ "input": several })));
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["classes"], json!(classes));
    // Errors in the guide's shape: `{"error": ..., "status": "error"}`.
    let (ten, full) = (vec![0.5f32; 10], vec![0.5f32; 784]);
    for (body, needle) in [
        (json!({"image": all}), "expected {\"input\""),
        (json!({ "input": ten }), "`input` has 10 values"),
        (json!({"input": [full, ten]}), "`input[1]` has 10 values"),
    ] {
        let (code, answer) = server.json("POST", "/predict", Some(&body));
        assert_eq!(code, 400, "{answer}");
        assert_eq!(answer["status"], "error", "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{answer}"
        );
    }
    assert_eq!(
        server.metric(r#"mlops_requests_total{api="guide",code="200",model="model",version="1"}"#),
        4.0
    );
}

#[test]
fn guide_endpoints_need_a_model_name_when_several_are_served() {
    let dir = dir_with_model();
    std::fs::copy(
        dir.path().join("model.safetensors"),
        dir.path().join("other.safetensors"),
    )
    .unwrap();
    let server = Server::start(dir.path(), &["model.safetensors", "other.safetensors"]);
    let (code, answer) = server.json("GET", "/model_info", None);
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("?model=NAME"));
    let (code, answer) = server.json("GET", "/model_info?model=other", None);
    assert_eq!((code, &answer["name"]), (200, &json!("other")), "{answer}");
    let (code, answer) = server.json("GET", "/model_info?model=nope", None);
    assert_eq!(code, 404, "{answer}");
    assert_eq!(answer["status"], "error");
}

/// What an operator watches: queue and compute time per model version, requests in
/// flight, versions loaded, the process's CPU and memory, build info; and, with
/// `--log-format json`, one JSON line per request naming its model, version, status,
/// latency and cache level.
#[test]
fn serve_exports_operations_metrics_and_logs_each_request() {
    let (pixels, _, _) = expected(&trained_model());
    let dir = dir_with_model();
    let server = Server::start(dir.path(), &["model.safetensors", "--log-format", "json"]);
    let body = crate::serve::tf_body(&pixels[..2]);
    for _ in 0..2 {
        let (code, _) = server.call(
            "POST",
            "/v1/models/model:predict",
            Some(&body.to_string()),
            &[("X-Request-Id", "req-42")],
        );
        assert_eq!(code, 200);
    }
    let (_, metrics) = server.call("GET", "/metrics", None, &[]);
    for series in [
        r#"mlops_queue_seconds_count{model="model",version="1"} 1"#,
        r#"mlops_compute_seconds_count{model="model",version="1"} 1"#,
        r#"mlops_model_versions_loaded{model="model"} 1"#,
        "mlops_requests_in_flight 1",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        r#"mlops_build_info{arch=""#,
    ] {
        assert!(metrics.contains(series), "no `{series}` in:\n{metrics}");
    }
    // The second request was answered from the cache: no second forward pass, and the
    // log says so.
    let started = std::time::Instant::now();
    let lines: Vec<Value> = loop {
        let lines: Vec<Value> = server
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 3 || started.elapsed() > std::time::Duration::from_secs(10) {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 3, "{lines:?}");
    let first = &lines[0];
    assert_eq!(first["request_id"], "req-42");
    assert_eq!(first["api"], "tfserving");
    assert_eq!(
        (&first["model"], &first["version"]),
        (&json!("model"), &json!("1"))
    );
    assert_eq!(first["status"], 200);
    assert_eq!(first["cache"], "miss");
    assert!(first["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[1]["cache"], "memory");
    assert_eq!(lines[2]["path"], "/metrics");
}

/// `--api-key-file`: every route but the health probes needs a Bearer key of the file.
#[test]
fn serve_requires_an_api_key_when_given_a_key_file() {
    let dir = dir_with_model();
    std::fs::write(
        dir.path().join("keys"),
        "# team keys\nabcdefabcdefabcdef0001\n\nabcdefabcdefabcdef0002\n",
    )
    .unwrap();
    let server = Server::start(dir.path(), &["model.safetensors", "--api-key-file", "keys"]);
    let body = json!({"instances": [vec![0.0f32; 784]]}).to_string();
    let path = "/v1/models/model:predict";
    let (code, e) = server.call("POST", path, Some(&body), &[]);
    assert_eq!(code, 401, "{e}");
    assert!(e.contains("Authorization: Bearer"), "{e}");
    let (code, e) = server.call(
        "POST",
        path,
        Some(&body),
        &[("Authorization", "Bearer abcdefabcdefabcdef0003")],
    );
    assert_eq!(code, 401);
    assert!(e.contains("not one of this server's"), "{e}");
    for key in ["abcdefabcdefabcdef0001", "abcdefabcdefabcdef0002"] {
        let auth = format!("Bearer {key}");
        let (code, answer) = server.call("POST", path, Some(&body), &[("Authorization", &auth)]);
        assert_eq!(code, 200, "{answer}");
    }
    assert_eq!(server.call("GET", "/metrics", None, &[]).0, 401);
    for open in ["/v2/health/live", "/v2/health/ready", "/health"] {
        assert_eq!(server.call("GET", open, None, &[]).0, 200, "{open}");
    }
    // A key file without keys, or with a short key, is refused at start-up.
    for (text, needle) in [("# none\n", "has no keys"), ("short\n", "shorter than 16")] {
        std::fs::write(dir.path().join("bad"), text).unwrap();
        let output = crate::util::mlops(dir.path())
            .args([
                "serve",
                "model.safetensors",
                "--port",
                "0",
                "--api-key-file",
                "bad",
            ])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{stderr}");
    }
}
