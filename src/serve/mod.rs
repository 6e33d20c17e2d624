//! `mlops serve`: artifacts behind an HTTP inference server.
//!
//! Speaks the JSON forms of TF Serving's REST predict API and KServe's Open Inference
//! Protocol v2 ([`protocol`]; unversioned routes, no v2 binary extension), so the clients
//! and health checks teams already have can talk to it. Requests
//! from all connections are merged into batches ([`batcher`]), repeated images are
//! answered from an LRU cache ([`cache`]), requests can be required to carry an
//! HMAC-SHA256 signature ([`signing`]), and `GET /metrics` exposes Prometheus metrics
//! ([`metrics`]). Every artifact runs through the same `runtime::Session` as `eval` and
//! `bench`, int8 ones on the integer kernels.

pub mod batcher;
pub mod cache;
mod http;
pub mod metrics;
pub mod protocol;
pub mod signing;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use serde_json::json;

use crate::artifact::Artifact;
use crate::report::FileRecord;
use crate::runtime::Session;
use batcher::{BatchConfig, Batcher};
use cache::PredictionCache;
use metrics::Metrics;
use protocol::ModelShape;
use signing::Signer;

/// How the server runs.
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free one).
    pub addr: SocketAddr,
    /// Threads answering HTTP requests (parsing, cache, JSON answers).
    pub threads: usize,
    /// Threads of each model's forward pass (batch shards). 1 is usually best: the other
    /// cores are busy with HTTP, and handing a small batch to a second thread cost more
    /// than it saved (README: serving figures).
    pub model_threads: usize,
    /// Dynamic batching.
    pub batch: BatchConfig,
    /// Images kept in each model's prediction cache (0: no cache).
    pub cache_images: usize,
    /// When set, inference requests must be signed with this key.
    pub signer: Option<Signer>,
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
    /// Inference requests answered, any status.
    pub requests: u64,
    /// Of those, answered with an error status.
    pub failed_requests: u64,
    /// Forward passes run.
    pub forward_passes: u64,
    /// Images run through the model (cache hits excluded).
    pub images_computed: u64,
    /// Images answered from the cache.
    pub cache_hits: u64,
}

/// Serves `models` until Ctrl-C or SIGTERM; `on_ready(address)` is called once the
/// socket is bound (the CLI prints it: with port 0 that is how clients learn the port).
pub fn serve(
    models: Vec<ServedArtifact>,
    config: ServeConfig,
    on_ready: impl FnOnce(SocketAddr),
) -> crate::Result<ServeSummary> {
    let metrics = Arc::new(Metrics::new());
    let mut served = BTreeMap::new();
    for ServedArtifact {
        name,
        artifact,
        record,
    } in models
    {
        let session = Session::new(&artifact, config.model_threads.max(1))?;
        let info = json!({
            "file": record.path, "sha256": record.sha256, "bytes": record.bytes,
            "precision": artifact.precision.as_str(), "compute": session.compute(),
            "labels": artifact.labels, "input": artifact.input,
            "accuracy": artifact.metrics.as_ref().map(|m| m.accuracy),
        });
        let batch_images = metrics.batch_images.with_label_values(&[name.as_str()]);
        let batcher = Batcher::spawn(session, config.batch, move |images| {
            batch_images.observe(images as f64)
        })
        .map_err(|e| crate::Error::io("start the batching thread for", &record.path, e))?;
        let model = http::Model {
            name: name.clone(),
            shape: ModelShape {
                input: artifact.input.clone(),
                labels: artifact.labels.clone(),
            },
            batcher,
            cache: PredictionCache::new(config.cache_images),
            info,
        };
        served.insert(name, model);
    }
    let state = Arc::new(http::AppState {
        models: served,
        signer: config.signer,
        metrics: metrics.clone(),
    });
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
    let address = runtime.block_on(async {
        let stop = shutdown_signal().map_err(network("install signal handlers for"))?;
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(network("listen on"))?;
        let address = listener.local_addr().map_err(network("listen on"))?;
        on_ready(address);
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(stop)
            .await
            .map_err(network("serve on"))?;
        Ok::<_, crate::Error>(address)
    })?;
    Ok(summarize(&metrics, address))
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
    let (mut requests, mut failed) = (0, 0);
    for family in prometheus::core::Collector::collect(&metrics.requests) {
        for metric in family.get_metric() {
            let count = metric.get_counter().get_value() as u64;
            requests += count;
            let ok = metric
                .get_label()
                .iter()
                .any(|l| l.name() == "code" && l.value() == "200");
            if !ok {
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
        forward_passes: passes,
        images_computed: images,
        cache_hits: hits,
    }
}
