//! `mlops serve --cache-redis`: a real `redis-server` (one per test, on a free port)
//! shared by two replicas: the second-level prediction cache, replay-proof nonces across
//! replicas, and Redis going away and coming back under load.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlops::serve::signing::Signer;
use serde_json::Value;

use crate::serve::{expected, tf_body, Server};
use crate::util::{dir_with_model, trained_model};

/// A `redis-server` on 127.0.0.1, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// Starts one on `port` (a free one when `None`); `None` when redis-server is not
    /// installed here (under CI that is a failure: `.ci/run` installs it).
    fn start(port: Option<u16>) -> Option<Redis> {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let child = match Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(_) if std::env::var_os("CI").is_some() => {
                panic!("CI must have redis-server (see .ci/run): the Redis tests cannot be skipped there")
            }
            Err(_) => {
                eprintln!("redis-server is not installed: Redis test skipped");
                return None;
            }
        };
        let redis = Redis { child, port };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_until(what: &str, server: &Server, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn now() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

#[test]
fn replicas_share_predictions_and_nonces_through_redis() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let (pixels, classes, _) = expected(&trained_model());
    let dir = dir_with_model();
    let key = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join("key"), key).unwrap();
    let url = redis.url();
    let args = [
        "model.safetensors",
        "--cache-size",
        "0",
        "--cache-redis",
        url.as_str(),
        "--hmac-key-file",
        "key",
    ];
    let (a, b) = (
        Server::start(dir.path(), &args),
        Server::start(dir.path(), &args),
    );
    for server in [&a, &b] {
        wait_until("connected to Redis", server, || {
            server.metric("mlops_redis_up") == 1.0
        });
    }
    let path = "/v1/models/model:predict";
    let body = tf_body(&pixels[..1]).to_string();
    let signer = Signer::new(key.as_bytes().to_vec());
    let signed = |nonce: &str| {
        let ts = now();
        let signature = signer.sign(&ts, nonce, "POST", path, body.as_bytes());
        (ts, nonce.to_string(), signature)
    };
    let send = |server: &Server, (ts, nonce, sig): &(String, String, String)| {
        server.call(
            "POST",
            path,
            Some(&body),
            &[
                ("X-Mlops-Timestamp", ts),
                ("X-Mlops-Nonce", nonce),
                ("X-Mlops-Signature", sig),
            ],
        )
    };
    let first = signed("replica-test-0000");
    let (code, answer) = send(&a, &first);
    assert_eq!(code, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["predictions"][0]["class"], classes[0]);
    let series = |level: &str, what: &str| {
        format!(r#"mlops_cache_{what}_total{{level="{level}",model="model",version="1"}}"#)
    };
    assert_eq!(a.metric(&series("redis", "misses")), 1.0);
    // The other replica finds the prediction in Redis (written in the background).
    let mut n = 0;
    wait_until("a Redis hit on the second replica", &b, || {
        n += 1;
        let (code, answer) = send(&b, &signed(&format!("replica-test-{n:04}-b")));
        assert_eq!(code, 200, "{answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["predictions"][0]["class"], classes[0]);
        b.metric(&series("redis", "hits")) >= 1.0
    });
    // A replay of the first request to the other replica is refused: its nonce is in Redis.
    let (code, e) = send(&b, &first);
    assert_eq!(code, 401, "{e}");
    assert!(e.contains("replayed request"), "{e}");
    assert_eq!(b.metric(r#"mlops_redis_up"#), 1.0);
}

/// The load-and-fault test: requests without pause while a new version is dropped into
/// the repository, a broken one after it, and Redis is stopped and started again: every
/// request is answered 200 with the right classes, none waits long, and Redis is used
/// again once it is back.
#[test]
fn serve_answers_every_request_through_swaps_and_a_redis_outage() {
    let Some(mut redis) = Redis::start(None) else {
        return;
    };
    let port = redis.port;
    let model = trained_model();
    let bytes = std::fs::read(&model).unwrap();
    let (pixels, classes, _) = expected(&model);
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let add = |version: u64, bytes: &[u8]| {
        let staging = dir.path().join(format!("staging-{version}"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("model.safetensors"), bytes).unwrap();
        std::fs::create_dir_all(repo.join("cnn")).unwrap();
        std::fs::rename(&staging, repo.join("cnn").join(version.to_string())).unwrap();
    };
    add(1, &bytes);
    let url = redis.url();
    let server = Arc::new(Server::start(
        dir.path(),
        &[
            "--model-repository",
            "repo",
            "--poll-secs",
            "1",
            "--cache-size",
            "0",
            "--cache-redis",
            &url,
            "--redis-timeout-ms",
            "50",
        ],
    ));
    wait_until("connected to Redis", &server, || {
        server.metric("mlops_redis_up") == 1.0
    });
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (server, stop, pixels, classes) = (
                server.clone(),
                stop.clone(),
                pixels.clone(),
                classes.clone(),
            );
            std::thread::spawn(move || {
                let (mut answered, mut slowest) = (0usize, Duration::ZERO);
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % pixels.len();
                    let body = tf_body(&pixels[k..k + 1]);
                    let started = Instant::now();
                    let (code, answer) = server.json("POST", "/v1/models/cnn:predict", Some(&body));
                    slowest = slowest.max(started.elapsed());
                    assert_eq!(code, 200, "request {answered}: {answer}");
                    assert_eq!(answer["predictions"][0]["class"], classes[k]);
                    answered += 1;
                    i += 1;
                }
                (answered, slowest)
            })
        })
        .collect();
    let version_is = |v: &str| {
        let (_, status) = server.json("GET", "/v1/models/cnn", None);
        status["model_version_status"][0]["version"] == v
            && status["model_version_status"][0]["state"] == "AVAILABLE"
    };
    add(2, &bytes);
    wait_until("version 2 serving", &server, || version_is("2"));
    add(3, b"broken");
    wait_until("version 3 refused", &server, || {
        server.log().contains("version 3 refused")
    });
    let hits = r#"mlops_cache_hits_total{level="redis",model="cnn",version="2"}"#;
    wait_until("Redis hits before the outage", &server, || {
        server.metric(hits) > 0.0
    });
    redis.stop();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(server.metric(r#"mlops_redis_errors_total{op="get"}"#) > 0.0);
    let before = server.metric(hits);
    let _redis = Redis::start(Some(port)).unwrap();
    // Back by itself: hits again (on a fresh, empty Redis: a miss fills it first).
    wait_until("Redis hits after the restart", &server, || {
        server.metric(hits) > before
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (answered, slowest) = client.join().expect("every request answered right");
        total += answered;
        // Bounded: a dead Redis costs at most its timeout, then nothing (back-off).
        assert!(
            slowest < Duration::from_secs(2),
            "a request took {slowest:?}"
        );
    }
    assert!(total >= 1000, "only {total} requests");
    let log = server.log();
    assert!(log.contains("version 2 loaded"), "{log}");
    let _ = Path::new(&repo);
}
