//! Redis behind `serve --cache-redis`: the second-level prediction cache, and the
//! signed-request nonces, shared by every replica pointed at the same Redis.
//!
//! Redis is an optimisation and a second line of defence, never a dependency of an
//! answer: every call is bounded by `--redis-timeout-ms`, an error or timeout answers as
//! if Redis had nothing (fail open) and is counted in `/metrics`
//! (`mlops_redis_errors_total`), and after one the server leaves Redis alone for a
//! back-off (100 ms, doubling to 5 s) so a dead Redis costs requests nothing. The
//! connection is made in the background at start-up and remade by the `redis` crate's
//! `ConnectionManager`, so a Redis that starts late or restarts is picked up by itself.
//!
//! Keys: `mlops:pred:<model>:<version>:<artifact sha256, 16 hex>:<input sha256>` ->
//! the image's logits as little-endian f32 (with `--cache-ttl`); `mlops:nonce:<nonce>`
//! (with the signature window's TTL, set with `NX`: a second `SET` of the same nonce is a
//! replay).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::metrics::Metrics;

/// How Redis is reached and used.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://HOST:PORT/DB` or `unix:///path/to/socket`.
    pub url: String,
    /// Lifetime of a cached prediction.
    pub ttl: Duration,
    /// Longest a request waits for Redis.
    pub timeout: Duration,
}

/// Back-off after an error: first and longest.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A Redis shared by replicas; every method fails open.
pub(crate) struct Remote {
    config: RedisConfig,
    connection: Mutex<Option<ConnectionManager>>,
    /// Milliseconds since `epoch` before which Redis is not tried (back-off).
    skip_until_ms: AtomicU64,
    backoff_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

impl Remote {
    /// A handle for `config`; connects in the background (call from within the tokio
    /// runtime).
    ///
    /// # Errors
    /// [`crate::Error::Config`] when the URL is not a Redis URL.
    pub(crate) fn start(config: RedisConfig, metrics: Arc<Metrics>) -> crate::Result<Arc<Self>> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            crate::Error::Config(format!(
                "`--cache-redis {}` is not a Redis URL ({e}); use redis://HOST:PORT/DB or unix:///path/to/redis.sock",
                config.url
            ))
        })?;
        let remote = Arc::new(Remote {
            config,
            connection: Mutex::new(None),
            skip_until_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        });
        let background = remote.clone();
        tokio::spawn(async move { background.connect(client).await });
        Ok(remote)
    }

    /// Connects, retrying with back-off until it works (the manager then reconnects by
    /// itself).
    async fn connect(self: Arc<Self>, client: redis::Client) {
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let mut wait = BACKOFF_MIN;
        let mut told = false;
        loop {
            match client
                .get_connection_manager_with_config(settings.clone())
                .await
            {
                Ok(manager) => {
                    *self.lock() = Some(manager);
                    self.metrics.redis_up.set(1);
                    crate::io::log_line(format_args!(
                        "mlops serve: connected to Redis at {}",
                        self.config.url
                    ));
                    return;
                }
                Err(e) => {
                    self.metrics
                        .redis_errors
                        .with_label_values(&["connect"])
                        .inc();
                    if !told {
                        crate::io::log_line(format_args!(
                            "mlops serve: Redis at {} is not reachable ({e}); serving without it and retrying",
                            self.config.url
                        ));
                        told = true;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ConnectionManager>> {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The connection, unless not connected yet or backing off.
    fn usable(&self) -> Option<ConnectionManager> {
        if self.now_ms() < self.skip_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        self.lock().clone()
    }

    /// Runs `command` within the timeout; `None` (and a back-off) on error or timeout.
    async fn run<T: redis::FromRedisValue>(&self, op: &str, command: redis::Cmd) -> Option<T> {
        let mut connection = self.usable()?;
        let result = tokio::time::timeout(
            self.config.timeout,
            command.query_async::<T>(&mut connection),
        )
        .await;
        match result {
            Ok(Ok(value)) => {
                self.backoff_ms.store(0, Ordering::Relaxed);
                self.metrics.redis_up.set(1);
                Some(value)
            }
            _ => {
                self.metrics.redis_errors.with_label_values(&[op]).inc();
                self.metrics.redis_up.set(0);
                let last = self.backoff_ms.load(Ordering::Relaxed);
                let next = if last == 0 {
                    BACKOFF_MIN.as_millis() as u64
                } else {
                    (last * 2).min(BACKOFF_MAX.as_millis() as u64)
                };
                self.backoff_ms.store(next, Ordering::Relaxed);
                self.skip_until_ms
                    .store(self.now_ms() + next, Ordering::Relaxed);
                None
            }
        }
    }

    /// The prediction key of one image.
    pub(crate) fn prediction_key(prefix: &str, input_sha256: &[u8; 32]) -> String {
        format!("{prefix}:{}", crate::io::hex(input_sha256))
    }

    /// Cached logits for `keys` (one entry per key; `None` when absent, malformed, or
    /// Redis is unavailable).
    pub(crate) async fn get_many(&self, keys: &[String], classes: usize) -> Vec<Option<Vec<f32>>> {
        let mut command = redis::cmd("MGET");
        for key in keys {
            command.arg(key);
        }
        let Some(values) = self.run::<Vec<Option<Vec<u8>>>>("get", command).await else {
            return vec![None; keys.len()];
        };
        values
            .into_iter()
            .map(|v| {
                v.filter(|bytes| bytes.len() == classes * 4).map(|bytes| {
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                })
            })
            .collect()
    }

    /// Stores logits under their keys with the TTL, in the background (the answer does
    /// not wait for it).
    pub(crate) fn put_many(self: &Arc<Self>, items: Vec<(String, Vec<f32>)>) {
        if items.is_empty() || self.usable().is_none() {
            return;
        }
        let remote = self.clone();
        tokio::spawn(async move {
            let ttl = remote.config.ttl.as_secs().max(1);
            let mut pipe = redis::pipe();
            for (key, logits) in &items {
                let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
                pipe.cmd("SET")
                    .arg(key)
                    .arg(bytes)
                    .arg("EX")
                    .arg(ttl)
                    .ignore();
            }
            let Some(mut connection) = remote.usable() else {
                return;
            };
            let result = tokio::time::timeout(
                remote.config.timeout,
                pipe.query_async::<()>(&mut connection),
            )
            .await;
            if !matches!(result, Ok(Ok(()))) {
                remote
                    .metrics
                    .redis_errors
                    .with_label_values(&["set"])
                    .inc();
            }
        });
    }

    /// Records `nonce` for `window`; `Some(false)` when it was already there (a replay),
    /// `None` when Redis could not say.
    pub(crate) async fn nonce_is_new(&self, nonce: &str, window: Duration) -> Option<bool> {
        let mut command = redis::cmd("SET");
        command
            .arg(format!("mlops:nonce:{nonce}"))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(window.as_secs().max(1));
        // `SET NX` answers OK when set, nil when the key existed.
        let answer = self.run::<Option<String>>("nonce", command).await?;
        Some(answer.is_some())
    }
}
