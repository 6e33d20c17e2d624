//! `mlops serve`: artifacts behind an HTTP inference server.
//!
//! Speaks the JSON forms of TF Serving's REST predict API and KServe's Open Inference
//! Protocol v2 ([`protocol`]; versioned routes and the binary tensor extension), so the clients
//! and health checks teams already have can talk to it. Each request's forward pass runs
//! on the HTTP worker thread that read it, on an engine of that thread's own, or, with
//! `--max-batch` above 1, requests from all connections are merged into batches on one
//! thread per model ([`batcher`]); repeated images are
//! answered from an LRU cache ([`cache`]), requests can be required to carry an
//! HMAC-SHA256 signature ([`signing`]), and `GET /metrics` exposes Prometheus metrics
//! ([`metrics`]). Every artifact runs through the same `runtime::Engine` as `eval` and
//! `bench`, int8 ones on the integer kernels.
//!
//! Resources are bounded before any work: at most `--max-connections` connections are
//! open (more wait in the listen backlog), a request head or body that has not arrived
//! within `--read-timeout-ms` closes its connection (also an idle keep-alive one), heads
//! are capped at 32 KiB, bodies at 32 MiB (also after gzip inflation) and requests at
//! 4,096 images.

pub mod batcher;
pub mod cache;
mod http;
mod loader;
pub mod metrics;
pub mod protocol;
mod registry;
pub mod remote;
pub mod repository;
mod scan;
pub mod signing;

pub use loader::RepositoryConfig;
pub use remote::RedisConfig;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::artifact::Artifact;
use crate::report::FileRecord;
use crate::runtime::Runtime;
use batcher::BatchConfig;
use metrics::Metrics;
use signing::Signer;

/// How the server runs.
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free one).
    pub addr: SocketAddr,
    /// Threads answering HTTP requests (parsing, cache, JSON answers) and, when nothing
    /// is batched, running their forward passes (one engine per thread and version).
    pub threads: usize,
    /// Threads of each model's forward pass (batch shards). 1 is usually best: the other
    /// cores are busy with HTTP, and handing a small batch to a second thread cost more
    /// than it saved (README: serving figures).
    pub model_threads: usize,
    /// Dynamic batching.
    pub batch: BatchConfig,
    /// Where the models run (`--device`, `--engine`); `None` is our CPU kernels with
    /// `model_threads` threads.
    pub runtime: Option<Box<dyn Runtime>>,
    /// Images kept in each model's prediction cache (0: no cache).
    pub cache_images: usize,
    /// When set, inference requests must be signed with this key.
    pub signer: Option<Signer>,
    /// How long a request's head, and then its body, may take to arrive; also how long an
    /// idle keep-alive connection is kept.
    pub read_timeout: Duration,
    /// Connections open at once at most; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// A model repository to serve (and poll) besides the artifacts given.
    pub repository: Option<RepositoryConfig>,
    /// Redis shared by replicas: second-level prediction cache and signed-request nonces.
    pub redis: Option<RedisConfig>,
    /// One line per request on stderr in this format; `None`: no request log (the
    /// default, for speed).
    pub log_format: Option<LogFormat>,
    /// When set, every route but the health probes needs `Authorization: Bearer KEY`
    /// with one of these keys.
    pub api_keys: Option<Vec<String>>,
}

/// How an API key is held and compared: its SHA-256.
pub(crate) fn api_key_digest(key: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// The request log's format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line: request_id, method, path, api, model, version, status,
    /// latency_ms, cache.
    Json,
    /// The same as a sentence.
    Text,
}

/// One artifact to serve under `name`.
pub struct ServedArtifact {
    /// The name in URLs (`/v1/models/NAME:predict`).
    pub name: String,
    /// The loaded artifact.
    pub artifact: Artifact,
    /// Its file (path, bytes, sha256).
    pub record: FileRecord,
}

/// What the server did, for the step report written at shutdown.
#[derive(Debug, Clone, Serialize)]
pub struct ServeSummary {
    /// Where it listened.
    pub address: String,
    /// Inference requests answered (TF Serving and KServe v2 routes), any status.
    pub requests: u64,
    /// Of those, answered with an error status.
    pub failed_requests: u64,
    /// Other requests answered: health, metadata, metrics, unknown routes and HTTP the
    /// server could not parse.
    pub other_requests: u64,
    /// Every answered request by HTTP status (`"200"`, `"404"`, `"413"`, ...).
    pub status_codes: BTreeMap<String, u64>,
    /// Request heads or bodies that did not arrive within the read timeout.
    pub read_timeouts: u64,
    /// Forward passes run.
    pub forward_passes: u64,
    /// Images run through the model (cache hits excluded).
    pub images_computed: u64,
    /// Images answered from the cache.
    pub cache_hits: u64,
}

/// Serves `models` until Ctrl-C or SIGTERM; `on_ready(address)` is called once the
/// socket is bound (the CLI prints it: with port 0 that is how clients learn the port).
///
/// # Errors
/// - As [`Runtime::load`] (with `config.runtime`) or
///   [`CpuEngine::new`] when a model cannot be loaded: [`crate::Error::Config`] for an
///   int8 artifact that cannot run there, [`crate::Error::Candle`] for a device error.
/// - [`crate::Error::Io`] naming the artifact when its batching thread cannot start.
/// - [`crate::Error::Network`] when the async runtime or the signal handlers cannot
///   start, or `config.addr` cannot be bound (in use, not allowed, not local).
pub fn serve(
    models: Vec<ServedArtifact>,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> crate::Result<ServeSummary> {
    let wanted = config.addr.to_string();
    let network = |action| {
        let addr = wanted.clone();
        move |source| crate::Error::Network {
            action,
            addr,
            source,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.max(1))
        .enable_all()
        .build()
        .map_err(network("start the server for"))?;
    let metrics = Arc::new(Metrics::new());
    let remote = match config.redis {
        Some(redis) => {
            // Its background connection task runs on the server's runtime.
            let _entered = runtime.enter();
            Some(remote::Remote::start(redis, metrics.clone())?)
        }
        None => None,
    };
    let loader = loader::Loader {
        runtime: config.runtime.map(Arc::from),
        model_threads: config.model_threads,
        batch: config.batch,
        // Inline passes (batcher module docs) when nothing is batched, on our kernels, one
        // thread per pass (several inline passes sharded over the rayon pool would
        // oversubscribe the cores).
        inline_engines: if config.batch.max_batch == 1 && config.model_threads == 1 {
            config.threads.max(1)
        } else {
            0
        },
        cache_images: config.cache_images,
        metrics: metrics.clone(),
    };
    let mut fixed = registry::Registry::default();
    for ServedArtifact {
        name,
        artifact,
        record,
    } in models
    {
        let model = loader.load(&name, 1, &artifact, &record)?;
        let mut entry = registry::Served {
            policy: "fixed (an artifact given on the command line)".into(),
            ..registry::Served::default()
        };
        entry.versions.insert(1, Arc::new(model));
        entry.states.insert(
            1,
            registry::VersionStatus {
                state: registry::VersionState::Available,
                error: None,
            },
        );
        fixed.models.insert(name, entry);
    }
    let state = Arc::new(http::AppState {
        registry: registry::Shared::new(fixed),
        signer: config.signer,
        nonces: signing::NonceStore::default(),
        remote,
        log_format: config.log_format,
        api_keys: config
            .api_keys
            .map(|keys| keys.iter().map(|k| api_key_digest(k)).collect()),
        requests_seen: Default::default(),
        metrics: metrics.clone(),
        read_timeout: config.read_timeout,
    });
    // The repository is read once before listening (its first versions are warm when
    // the first request comes), then polled on its own thread.
    let (wake, woken) = std::sync::mpsc::channel::<()>();
    if let Some(repository) = config.repository {
        let mut poller = loader::Poller::new(repository, loader);
        poller.first(&state)?;
        let state = state.clone();
        std::thread::Builder::new()
            .name("mlops-repository".into())
            .spawn(move || poller.run(state, woken))
            .map_err(|e| {
                crate::Error::io("start the repository poller for", "the model repository", e)
            })?;
    }
    let limits = Limits {
        read_timeout: config.read_timeout,
        max_connections: config.max_connections.max(1),
    };
    let address = runtime.block_on(async {
        let stop = shutdown_signal().map_err(network("install signal handlers for"))?;
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(network("listen on"))?;
        let address = listener.local_addr().map_err(network("listen on"))?;
        reload_on_sighup(wake).map_err(network("install signal handlers for"))?;
        on_ready(address);
        accept_loop(listener, http::router(state), limits, &metrics, stop).await;
        Ok::<_, crate::Error>(address)
    })?;
    Ok(summarize(&metrics, address))
}

/// The connection limits of [`accept_loop`].
#[derive(Debug, Clone, Copy)]
struct Limits {
    read_timeout: Duration,
    max_connections: usize,
}

/// Serves connections until `stop` resolves, then lets open ones finish (bounded).
///
/// Written here rather than `axum::serve`, which sets no timeouts and no connection cap
/// (axum 0.8): connections are served by hyper's own HTTP/1 connection (its
/// `header_read_timeout` closes a connection whose request head has not arrived in
/// time, idle keep-alive ones included, and `max_header_size` caps heads), the cap is a
/// tokio `Semaphore` taken before `accept` (so excess clients wait in the kernel's
/// backlog instead of being accepted and starved), graceful shutdown is hyper-util's
/// `GracefulShutdown`, and accept errors are retried by axum's `Listener` impl. Bodies
/// are timed out where they are read (`http::read_body`).
async fn accept_loop(
    mut listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: Limits,
    metrics: &Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_header_size(http::MAX_HEAD_BYTES);
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
            _ = &mut stop => break,
        };
        let (stream, _) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            _ = &mut stop => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let metrics = metrics.clone();
        metrics.open_connections.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                connection_error(&metrics, &e);
            }
            metrics.open_connections.dec();
            drop(permit);
        });
    }
    // No new connections from here; each open one finishes the request it is in
    // (bounded by the read timeout while reading) and closes.
    drop(listener);
    let grace = limits.read_timeout.max(Duration::from_secs(5));
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        crate::io::log_line(format_args!(
            "mlops serve: {} connection(s) still open {} ms after the stop signal; closing them",
            metrics.open_connections.get(),
            grace.as_millis()
        ));
    }
}

/// Counts what a connection that ended in an error left behind: hyper answers a request
/// it cannot parse itself (a bare 400, or 431 for a head over the limit) and closes a
/// connection whose head did not arrive in time; neither reaches the router, so they
/// are counted here.
fn connection_error(metrics: &Metrics, e: &hyper::Error) {
    if e.is_timeout() {
        metrics.read_timeouts.inc();
    } else if e.is_parse() && !e.is_parse_version_h2() {
        let code = if !e.is_parse_too_large() {
            400
        } else if e.to_string().contains("URI") {
            414
        } else {
            431
        };
        metrics.record(http::NO_MODEL, "", http::API_HTTP, code, 0.0);
    }
}

/// Reads the model repository again on each SIGHUP (TF Serving and nginx reload on it),
/// by waking the poller. Without a repository the poller is not running and the signal
/// is ignored (SIGHUP's default action would end the server).
fn reload_on_sighup(wake: std::sync::mpsc::Sender<()>) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let _ = wake.send(());
            }
        });
    }
    #[cfg(not(unix))]
    drop(wake);
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal right after start-up still stops the
/// server cleanly (and it still writes its report).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn summarize(metrics: &Metrics, address: SocketAddr) -> ServeSummary {
    let (mut requests, mut failed, mut other) = (0, 0, 0);
    let mut status_codes = BTreeMap::new();
    for family in prometheus::core::Collector::collect(&metrics.requests) {
        for metric in family.get_metric() {
            let count = metric.get_counter().get_value() as u64;
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map_or("", |l| l.value())
            };
            let code = label("code");
            *status_codes.entry(code.to_string()).or_insert(0) += count;
            if label("api") == http::API_HTTP {
                other += count;
                continue;
            }
            requests += count;
            if code != "200" {
                failed += count;
            }
        }
    }
    let (mut passes, mut images) = (0, 0);
    for family in prometheus::core::Collector::collect(&metrics.batch_images) {
        for metric in family.get_metric() {
            passes += metric.get_histogram().get_sample_count();
            images += metric.get_histogram().get_sample_sum() as u64;
        }
    }
    let mut hits = 0;
    for family in prometheus::core::Collector::collect(&metrics.cache_hits) {
        for metric in family.get_metric() {
            hits += metric.get_counter().get_value() as u64;
        }
    }
    ServeSummary {
        address: address.to_string(),
        requests,
        failed_requests: failed,
        other_requests: other,
        status_codes,
        read_timeouts: metrics.read_timeouts.get(),
        forward_passes: passes,
        images_computed: images,
        cache_hits: hits,
    }
}
