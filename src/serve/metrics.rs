//! Prometheus metrics for `GET /metrics` (the `prometheus` crate's registry and text
//! encoder): every answered request by model, version, API and status; request latency,
//! split into queue time and compute time per forward pass; images per forward pass (how
//! well dynamic batching merges); cache hits and misses per level; Redis errors;
//! requests in flight, open connections, read timeouts; versions loaded; the process's
//! CPU seconds and resident memory; build info.

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// The server's metrics; every handler records into it.
pub struct Metrics {
    registry: Registry,
    /// Answered requests by `model`, `version`, `api` (`tfserving`, `v2`; `http` for every other
    /// route, unknown routes and HTTP the server could not parse) and HTTP `code`.
    pub requests: IntCounterVec,
    /// Request latency in seconds by `model` and `api`, parse to answer.
    pub latency: HistogramVec,
    /// Images per forward pass by `model`, `version`.
    pub batch_images: HistogramVec,
    /// Seconds a request waited in its model's queue before its forward pass started.
    pub queue_seconds: HistogramVec,
    /// Seconds of each forward pass (a batch: all its requests share it).
    pub compute_seconds: HistogramVec,
    /// Requests being answered now (any route).
    pub in_flight: IntGauge,
    /// Versions loaded now, by `model`.
    pub loaded_versions: prometheus::IntGaugeVec,
    /// Images answered from the cache, by `model`.
    pub cache_hits: IntCounterVec,
    /// Images that had to run, by `model` (with caching on).
    pub cache_misses: IntCounterVec,
    /// Connections open now (at most `--max-connections`).
    pub open_connections: IntGauge,
    /// Redis calls that failed or timed out, by `op` (`connect`, `get`, `set`, `nonce`);
    /// each one answered as if Redis had nothing.
    pub redis_errors: IntCounterVec,
    /// 1 while the last Redis call worked, 0 after a failure (absent without Redis).
    pub redis_up: IntGauge,
    /// Request heads or bodies that did not arrive within `--read-timeout-ms` (their
    /// connections were closed).
    pub read_timeouts: IntCounter,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    ///
    /// # Panics
    /// Never in practice: every name, label set and bucket list is a constant that
    /// prometheus accepts, and each name is registered once.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "mlops_requests_total",
                "Requests answered, by model, API and status",
            ),
            &["model", "version", "api", "code"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "mlops_request_duration_seconds",
                "Time from a request's head to its answer",
            )
            .buckets(exponential_buckets(25e-6, 2.0, 16).expect("valid buckets")),
            &["model", "version", "api"],
        )
        .expect("valid metric");
        let batch_images = HistogramVec::new(
            HistogramOpts::new("mlops_batch_images", "Images per forward pass")
                .buckets(exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
            &["model", "version"],
        )
        .expect("valid metric");
        let queue_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mlops_queue_seconds",
                "Time a request waited in its model's queue before its forward pass",
            )
            .buckets(exponential_buckets(1e-6, 2.0, 22).expect("valid buckets")),
            &["model", "version"],
        )
        .expect("valid metric");
        let compute_seconds = HistogramVec::new(
            HistogramOpts::new("mlops_compute_seconds", "Time of each forward pass")
                .buckets(exponential_buckets(1e-5, 2.0, 18).expect("valid buckets")),
            &["model", "version"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new("mlops_requests_in_flight", "Requests being answered now")
            .expect("valid metric");
        let loaded_versions = prometheus::IntGaugeVec::new(
            Opts::new(
                "mlops_model_versions_loaded",
                "Versions loaded now, by model",
            ),
            &["model"],
        )
        .expect("valid metric");
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "mlops_build_info",
                "1, labelled with the mlops version and the platform it was built for",
            ),
            &["version", "arch", "os"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[
                crate::report::MLOPS_VERSION,
                std::env::consts::ARCH,
                std::env::consts::OS,
            ])
            .set(1);
        let cache_hits = IntCounterVec::new(
            Opts::new(
                "mlops_cache_hits_total",
                "Images answered from a cache, by level (memory: this process's LRU; redis: shared)",
            ),
            &["model", "version", "level"],
        )
        .expect("valid metric");
        let cache_misses = IntCounterVec::new(
            Opts::new(
                "mlops_cache_misses_total",
                "Images not found in a cache level (a redis miss ran the model)",
            ),
            &["model", "version", "level"],
        )
        .expect("valid metric");
        let open_connections =
            IntGauge::new("mlops_open_connections", "Connections open now").expect("valid metric");
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "mlops_redis_errors_total",
                "Redis calls that failed or timed out (answered as if Redis had nothing)",
            ),
            &["op"],
        )
        .expect("valid metric");
        let redis_up = IntGauge::new("mlops_redis_up", "1 while the last Redis call worked")
            .expect("valid metric");
        let read_timeouts = IntCounter::new(
            "mlops_read_timeouts_total",
            "Request heads or bodies that did not arrive within --read-timeout-ms",
        )
        .expect("valid metric");
        for metric in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(batch_images.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(open_connections.clone()),
            Box::new(read_timeouts.clone()),
            Box::new(redis_errors.clone()),
            Box::new(redis_up.clone()),
            Box::new(queue_seconds.clone()),
            Box::new(compute_seconds.clone()),
            Box::new(in_flight.clone()),
            Box::new(loaded_versions.clone()),
            Box::new(build_info),
        ] {
            registry.register(metric).expect("unique metric names");
        }
        // The guide monitors the server's CPU and memory: process_cpu_seconds_total,
        // process_resident_memory_bytes, open fds, start time (Linux; elsewhere absent).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric names");
        Metrics {
            registry,
            requests,
            latency,
            batch_images,
            queue_seconds,
            compute_seconds,
            in_flight,
            loaded_versions,
            cache_hits,
            cache_misses,
            open_connections,
            read_timeouts,
            redis_errors,
            redis_up,
        }
    }

    /// Counts one answered request and its latency (`version` empty when no version
    /// answered it: refused before one was picked, or not an inference request).
    pub fn record(&self, model: &str, version: &str, api: &str, code: u16, seconds: f64) {
        let code = code.to_string();
        self.requests
            .with_label_values(&[model, version, api, code.as_str()])
            .inc();
        self.latency
            .with_label_values(&[model, version, api])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    ///
    /// # Panics
    /// Never in practice: the registry holds only named, non-empty metric families
    /// (`gather` drops empty ones), writing to memory cannot fail, and the text is built
    /// from UTF-8 strings.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
