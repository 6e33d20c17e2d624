//! A property-style test of `mlops serve` (issue 10): a few thousand mutated TF Serving
//! and KServe v2 request bodies (truncated, bytes flipped, numbers replaced by huge,
//! NaN-like or negative values, nesting changed, wrong types, huge counts, gzip and
//! unknown encodings) sent to a running server, one after another on loopback. Every
//! answer must come (no hang: each request is bounded by the client's timeout), be a
//! 200 with only finite numbers (no `null` where a probability or class belongs) or a
//! 4xx with a JSON `{"error": "..."}`; the server must not panic and must count every
//! request. The loop is seeded (`MLOPS_FUZZ_SEED` replays another seed), bounded in
//! count and in time.

use std::io::Write as _;
use std::time::{Duration, Instant};

use rand::seq::IndexedRandom as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::serve::Server;
use crate::util::dir_with_model;

/// Requests sent (about 2 ms each on 2 cores, most answered before the model runs).
const ROUNDS: usize = 2500;
/// The whole loop's bound: past it the server is considered hung.
const DEADLINE: Duration = Duration::from_secs(120);

/// Values from `-0.5` to `1.5` (some outside the `[0, 1]` the model was trained on),
/// three decimals so bodies stay small.
fn image(rng: &mut ChaCha8Rng) -> Vec<f64> {
    (0..784)
        .map(|_| (rng.random_range(-500..1500) as f64) / 1000.0)
        .collect()
}

fn nested(values: &[f64]) -> Value {
    let rows: Vec<Vec<[f64; 1]>> = values
        .chunks(28)
        .map(|row| row.iter().map(|&v| [v]).collect())
        .collect();
    json!(rows)
}

/// A valid body and the route it belongs to.
fn base(rng: &mut ChaCha8Rng) -> (&'static str, Value) {
    let tf = "/v1/models/model:predict";
    let v2 = "/v2/models/model/infer";
    let a = image(rng);
    match rng.random_range(0..6) {
        0 => (tf, json!({ "instances": [a] })),
        1 => (tf, json!({ "instances": [nested(&a), image(rng)] })),
        2 => (
            tf,
            json!({ "inputs": [a], "signature_name": "serving_default" }),
        ),
        3 => (
            v2,
            json!({"id": "r", "inputs": [{"name": "input", "shape": [1, 784],
                "datatype": "FP32", "data": a}]}),
        ),
        4 => (
            v2,
            json!({"inputs": [{"name": "input", "shape": [1, 28, 28, 1],
                "datatype": "FP32", "data": [nested(&a)]}], "outputs": [{"name": "class"}]}),
        ),
        _ => {
            let pixels: Vec<u8> = (0..784).map(|_| rng.random()).collect();
            (
                v2,
                json!({"inputs": [{"name": "input", "shape": [1, 28, 28, 1],
                    "datatype": "UINT8", "data": pixels}]}),
            )
        }
    }
}

/// JSON pointers to nodes of `value` (a few elements of long lists, not all).
fn pointers(value: &Value, at: String, rng: &mut ChaCha8Rng, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            let picks: Vec<usize> = if items.len() <= 4 {
                (0..items.len()).collect()
            } else {
                (0..3).map(|_| rng.random_range(0..items.len())).collect()
            };
            for i in picks {
                pointers(&items[i], format!("{at}/{i}"), rng, out);
            }
        }
        Value::Object(fields) => {
            for (key, item) in fields {
                pointers(item, format!("{at}/{key}"), rng, out);
            }
        }
        _ => {}
    }
    out.push(at);
}

const HOSTILE_NUMBERS: [f64; 14] = [
    3e38, -3e38, 1e308, -1e308, 1e-45, -0.0, 255.0, 256.0, -1.0, 1e6, 4097.0, 1e20, 0.5, 2e9,
];

/// One change to a node of the body's JSON tree.
fn mutate_tree(body: &mut Value, rng: &mut ChaCha8Rng) {
    let mut at = Vec::new();
    pointers(body, String::new(), rng, &mut at);
    let pointer = at.choose(rng).cloned().unwrap_or_default();
    let Some(node) = body.pointer_mut(&pointer) else {
        return;
    };
    let replacement = match rng.random_range(0..14) {
        0 => json!(HOSTILE_NUMBERS.choose(rng)),
        1 => [
            json!("x"),
            json!(true),
            Value::Null,
            json!({}),
            json!({"a": 1}),
        ]
        .choose(rng)
        .cloned()
        .unwrap_or_default(),
        2 => json!([node.clone()]),
        3 => match node {
            Value::Array(items) => items.first().cloned().unwrap_or(json!([])),
            _ => json!([]),
        },
        4 => {
            // Huge counts: more images, or values, than any request may carry (of a small
            // element, so the body stays far below the 32 MiB limit tested elsewhere).
            let small = match node {
                Value::Array(items) => items
                    .first()
                    .filter(|item| item.to_string().len() <= 64)
                    .cloned(),
                _ => None,
            };
            json!(vec![small.unwrap_or(json!([0])); 4097])
        }
        5 => match node {
            Value::Array(items) if !items.is_empty() => {
                let keep = rng.random_range(0..items.len());
                json!(items[..keep])
            }
            _ => json!([1u64 << 63, -1, 0]),
        },
        6 => match node {
            // Nesting changed: halves, or rows of 27, 29, 28 ... values.
            Value::Array(items) if items.len() > 2 => {
                let mid = items.len() / 2;
                if rng.random() {
                    json!([items[..mid], items[mid..]])
                } else {
                    let rows: Vec<&[Value]> = items.chunks(27).collect();
                    json!(rows)
                }
            }
            _ => json!([[0.5], [0.5, 0.5]]),
        },
        7 => json!([rng.random_range(0..5000u64), 784]),
        8 => json!([1u64 << 62, 28, 28, 1]),
        9 => json!(["FP16", "BYTES", "INT64", "uint8", ""].choose(rng)),
        10 => {
            if let Value::Object(fields) = node {
                let key = fields.keys().next().cloned();
                if let Some(key) = key {
                    fields.remove(&key);
                }
                let extra = [
                    ("signature_name", json!("predict_images")),
                    ("parameters", json!({"binary_data_output": true})),
                    ("parameters", json!({"binary_data_size": 3136})),
                    ("instances", json!([[0.0]])),
                ];
                let (key, value) = extra.choose(rng).cloned().unwrap_or(("x", json!(0)));
                fields.insert(key.into(), value);
            }
            return;
        }
        11 | 12 => {
            // Every number of the node huge (or merely large, or negative): finite
            // values that may drive the forward pass past the float range.
            let fill = [1e38, -1e38, 3e38, 1e30, -1e20, 1e10, 1000.0, -5.0]
                .choose(rng)
                .copied()
                .unwrap_or(1e38);
            fill_numbers(node, fill);
            return;
        }
        _ => json!(rng.random_range(-1000..1000) as f64 / 7.0),
    };
    *node = replacement;
}

/// Sets every number under `node` to `fill`.
fn fill_numbers(node: &mut Value, fill: f64) {
    match node {
        Value::Number(_) => *node = json!(fill),
        Value::Array(items) => items.iter_mut().for_each(|v| fill_numbers(v, fill)),
        Value::Object(fields) => fields.values_mut().for_each(|v| fill_numbers(v, fill)),
        _ => {}
    }
}

/// Hostile number tokens as text (JSON has no NaN or infinity; clients send them).
const NUMBER_TOKENS: [&str; 16] = [
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "1e39",
    "-1e39",
    "1e999",
    "3e38",
    "-3e38",
    "18446744073709551616",
    "-9223372036854775809",
    "0x10",
    "+1",
    ".5",
    "01",
    "1e",
];

/// Text-level mutations: truncation, flipped bytes, a number token replaced.
fn mutate_text(text: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    if text.is_empty() {
        return;
    }
    match rng.random_range(0..3) {
        0 => text.truncate(rng.random_range(0..text.len())),
        1 => {
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..text.len());
                text[at] = rng.random();
            }
        }
        _ => {
            let from = rng.random_range(0..text.len());
            let is_number = |b: u8| b.is_ascii_digit() || b"-+.eE".contains(&b);
            let Some(start) = (from..text.len()).find(|&i| text[i].is_ascii_digit()) else {
                return;
            };
            let end = (start..text.len())
                .find(|&i| !is_number(text[i]))
                .unwrap_or(text.len());
            let token = NUMBER_TOKENS.choose(rng).copied().unwrap_or("NaN");
            text.splice(start..end, token.bytes());
        }
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The first `null` in `answer` outside the echoed `id`, as a JSON pointer.
fn null_in(answer: &Value, at: &str) -> Option<String> {
    match answer {
        Value::Null => Some(at.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| null_in(v, &format!("{at}/{i}"))),
        Value::Object(fields) => fields
            .iter()
            .filter(|(key, _)| key.as_str() != "id")
            .find_map(|(key, v)| null_in(v, &format!("{at}/{key}"))),
        _ => None,
    }
}

#[test]
fn serve_survives_mutated_requests() {
    let seed = std::env::var("MLOPS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10u64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = dir_with_model();
    let mut server = Server::start(
        dir.path(),
        &[
            "model.safetensors",
            "--report",
            "r.json",
            "--cache-size",
            "64",
        ],
    );
    // 40 MiB of spaces in ~40 KB: must be refused, not inflated.
    let bomb = gzip(&vec![b' '; 40 << 20]);
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for round in 0..ROUNDS {
        assert!(
            started.elapsed() < DEADLINE,
            "seed {seed}: {round} requests took over {DEADLINE:?}"
        );
        let (route, mut tree) = base(&mut rng);
        for _ in 0..rng.random_range(0..3) {
            mutate_tree(&mut tree, &mut rng);
        }
        let mut body = tree.to_string().into_bytes();
        if rng.random_bool(0.35) {
            mutate_text(&mut body, &mut rng);
        }
        let mut headers: Vec<(&str, &str)> = Vec::new();
        match rng.random_range(0..40) {
            0 => {
                body = gzip(&body);
                headers.push(("Content-Encoding", "gzip"));
            }
            1 => {
                body = gzip(&body);
                mutate_text(&mut body, &mut rng);
                headers.push(("Content-Encoding", "gzip"));
            }
            2 => {
                body = bomb.clone();
                headers.push(("Content-Encoding", "gzip"));
            }
            3 => headers.push(("Content-Encoding", "br")),
            4 => headers.push(("Inference-Header-Content-Length", "12")),
            _ => {}
        }
        let (code, answer) = match server.try_send("POST", route, Some(&body), &headers) {
            Ok(answer) => answer,
            // Over the body limit, the server may answer 413 and close before reading
            // it all: the client then sees its write fail.
            Err(_) if body.len() > 32 << 20 => continue,
            Err(e) => panic!(
                "seed {seed}, round {round}: no answer to {} bytes to {route}: {e}",
                body.len()
            ),
        };
        *statuses.entry(code).or_default() += 1;
        let shown = || {
            let text = String::from_utf8_lossy(&body);
            let cut: String = text.chars().take(300).collect();
            format!(
                "seed {seed}, round {round}, POST {route} {headers:?} {cut}... -> {code} {answer}"
            )
        };
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {}", shown()));
        if code == 200 {
            if let Some(at) = null_in(&answer, "") {
                panic!("a 200 carries a non-finite number at `{at}`: {}", shown());
            }
        } else {
            assert!((400..500).contains(&code), "not a 4xx: {}", shown());
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "no JSON error: {}", shown());
        }
    }
    assert!(server.alive(), "seed {seed}: the server died");
    let log = server.log();
    assert!(!log.contains("panicked"), "seed {seed}: {log}");
    // Both answers must have happened: the mutations are not all fatal, nor all harmless.
    assert!(
        statuses.get(&200).is_some_and(|&n| n > ROUNDS / 20),
        "{statuses:?}"
    );
    assert!(
        statuses.get(&400).is_some_and(|&n| n > ROUNDS / 4),
        "{statuses:?}"
    );
    eprintln!(
        "serve fuzz: seed {seed}, {ROUNDS} requests in {:?}: {statuses:?}",
        started.elapsed()
    );
    #[cfg(unix)]
    {
        let step = server.terminate(dir.path(), "r.json");
        assert_eq!(step["metrics"]["requests"], ROUNDS as u64);
    }
}
