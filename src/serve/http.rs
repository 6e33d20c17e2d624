//! The HTTP routes (axum): TF Serving and KServe v2 inference, health, metadata and
//! metrics, over the models' batchers and caches.
//!
//! The HTTP contract, enforced by one middleware ([`contract`]) for every route: every
//! answer is counted in `/metrics` by model, API and status; every error body is JSON
//! `{"error": "..."}` (TF Serving's shape, and KServe v2's), including axum's own 405s
//! and extractor rejections; a URI over [`MAX_URI_BYTES`] gets a 414. Request bodies are
//! read under `--read-timeout-ms` and [`MAX_BODY_BYTES`] (also after gzip inflation).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde_json::{json, Value};

use super::batcher::{BatchError, Batcher};
use super::cache::PredictionCache;
use super::metrics::Metrics;
use super::protocol::{self, Batch, ModelShape, Unanswerable};
use super::registry::{self, Pick, Registry};
use super::remote::Remote;
use super::signing::{
    self, NonceStore, SignatureError, SignedHeaders, Signer, NONCE_HEADER, SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
};

/// Largest request body, before and after gzip inflation. One 28x28 image is ~5-10 KB of
/// JSON floats, so this admits requests of a few thousand images (the parsers cap them at
/// [`protocol::MAX_IMAGES_PER_REQUEST`]) and refuses a runaway upload early.
pub(crate) const MAX_BODY_BYTES: usize = 32 << 20;

/// Longest request URI (path and query) answered: the routes need a few dozen bytes; a
/// longer one gets a JSON 414.
pub(crate) const MAX_URI_BYTES: usize = 8 << 10;

/// Largest request head (request line and headers). hyper answers a larger one itself
/// with a bare 431 (counted in `/metrics` as API `http`); it is kept above
/// [`MAX_URI_BYTES`] so a long URI reaches [`contract`] and gets its JSON 414.
pub(crate) const MAX_HEAD_BYTES: usize = 32 << 10;

/// The `model` label of requests that name no model (health, metrics, unknown routes).
pub(crate) const NO_MODEL: &str = "(none)";

/// The `api` label of requests that are not inference requests.
pub(crate) const API_HTTP: &str = "http";

/// One served model version.
pub(crate) struct Model {
    pub name: String,
    /// Its version number (1 for an artifact given on the command line).
    pub version: u64,
    pub shape: ModelShape,
    pub batcher: Batcher,
    pub cache: Option<PredictionCache>,
    /// `mlops:pred:<model>:<version>:<artifact sha256, 16 hex>`: its Redis keys' prefix.
    pub redis_prefix: String,
    /// What `GET` metadata shows about the artifact (precision, sha256, compute, ...).
    pub info: Value,
}

/// Everything the handlers share.
pub(crate) struct AppState {
    /// What is served now (swapped by the repository poller).
    pub registry: registry::Shared,
    pub signer: Option<Signer>,
    /// Nonces of signed requests seen within the signature window.
    pub nonces: NonceStore,
    /// Redis shared with other replicas (`--cache-redis`).
    pub remote: Option<Arc<Remote>>,
    /// SHA-256 digests of the accepted API keys (`--api-key-file`), if required.
    pub api_keys: Option<Vec<[u8; 32]>>,
    /// One log line per request on stderr, in this format (`--log-format`).
    pub log_format: Option<super::LogFormat>,
    /// Requests counted, for request ids.
    pub requests_seen: std::sync::atomic::AtomicU64,
    pub metrics: Arc<Metrics>,
    /// How long a request body may take to arrive (`--read-timeout-ms`).
    pub read_timeout: Duration,
}

type Shared = State<Arc<AppState>>;

/// An error answer: status and a message naming what to fix, as `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// Close the connection after answering (the request's body was not read to its end).
    close: bool,
    /// The `Allow` header of a 405.
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            close: false,
            allow: None,
        }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

impl ApiError {
    /// The answer with `body` (the API's error shape) and this error's status and headers.
    fn respond(self, body: Value) -> Response {
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message });
        self.respond(body)
    }
}

impl From<protocol::BadRequest> for ApiError {
    fn from(e: protocol::BadRequest) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.0)
    }
}

impl From<Unanswerable> for ApiError {
    fn from(e: Unanswerable) -> Self {
        let status = match e {
            Unanswerable::OutOfRange(_) => StatusCode::BAD_REQUEST,
            Unanswerable::BrokenModel(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The router over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let routes = Router::new()
        .route("/v1/models/{target}", get(tf_status).post(tf_predict))
        .route("/v1/models/{name}/metadata", get(tf_metadata))
        .route(
            "/v1/models/{name}/versions/{target}",
            get(tf_version_status).post(tf_version_predict),
        )
        .route(
            "/v1/models/{name}/versions/{version}/metadata",
            get(tf_version_metadata),
        )
        .route(
            "/v1/models/{name}/labels/{target}",
            get(tf_label_status).post(tf_label_predict),
        )
        .route(
            "/v1/models/{name}/labels/{label}/metadata",
            get(tf_label_metadata),
        )
        .route("/v2", get(v2_server))
        .route(
            "/v2/health/live",
            get(|| async { Json(json!({"live": true})) }),
        )
        .route("/v2/health/ready", get(v2_server_ready))
        .route("/v2/models/{name}", get(v2_model))
        .route("/v2/models/{name}/ready", get(v2_model_ready))
        .route("/v2/models/{name}/infer", post(v2_infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(v2_version_model),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(v2_version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(v2_version_infer),
        )
        .route("/predict", post(guide_predict))
        .route("/model_info", get(guide_model_info))
        .route("/health", get(guide_health))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .with_state(state.clone());
    // Around the whole router (not layered onto each route, where axum adds a 405's
    // `Allow` header only after the layer has run).
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn_with_state(state, contract))
}

async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route `{}`: use POST /v1/models/NAME:predict, POST /v2/models/NAME/infer \
             (a version: /v1/models/NAME/versions/N:predict, /v1/models/NAME/labels/L:predict, \
             /v2/models/NAME/versions/N/infer), GET /v1/models/NAME[/metadata], \
             GET /v2/models/NAME[/ready], GET /v2/health/ready, POST /predict or GET /metrics",
            uri.path()
        ),
    )
}

/// Routes answered without an API key: liveness and readiness probes.
const OPEN_ROUTES: [&str; 3] = ["/v2/health/live", "/v2/health/ready", "/health"];

/// With `--api-key-file`, every route but the health probes needs
/// `Authorization: Bearer <one of the keys>`; else a 401 with `WWW-Authenticate: Bearer`.
/// Keys are compared as SHA-256 digests, so the comparison's time says nothing about a
/// key's bytes. Returns the refusal, if any.
fn refuse_without_api_key(state: &AppState, headers: &HeaderMap, path: &str) -> Option<Response> {
    let keys = state.api_keys.as_ref()?;
    if OPEN_ROUTES.contains(&path) {
        return None;
    }
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|token| super::api_key_digest(token.trim()));
    if sent.is_some_and(|digest| keys.contains(&digest)) {
        return None;
    }
    let message = if sent.is_none() {
        "this server needs `Authorization: Bearer <API key>` (`--api-key-file`)"
    } else {
        "the API key is not one of this server's"
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(response)
}

/// Counts a request out of `mlops_requests_in_flight` when it is answered (or dropped).
struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// The version a request was answered by, set on its response by the inference handlers
/// (the `version` label of its metrics).
/// `(model, version, cache)`: cache is `off`, `memory` (every image from this process's
/// cache), `redis` (some from Redis, none computed) or `miss` (some computed).
#[derive(Debug, Clone)]
struct AnsweredBy(String, u64, &'static str);

/// The `api` and `model` labels of a request, from its method and path alone (so that
/// requests refused before routing are counted under the right API too). Names of
/// models not served are counted under `(unknown)`: they would make unbounded labels.
fn labels(registry: &Registry, method: &Method, path: &str) -> (&'static str, String) {
    let model = |name: &str| {
        registry
            .models
            .get_key_value(name)
            .map_or("(unknown)".to_string(), |(k, _)| k.clone())
    };
    if *method == Method::POST {
        if path == "/predict" {
            // The model is the one the handler picked (`AnsweredBy`), when it got that far.
            return ("guide", "(unknown)".to_string());
        }
        if let Some(target) = path.strip_prefix("/v1/models/") {
            let name = target.split(['/', ':']).next().unwrap_or_default();
            let rest = &target[name.len()..];
            let versioned = rest
                .strip_prefix("/versions/")
                .or_else(|| rest.strip_prefix("/labels/"))
                .is_some_and(|r| !r.contains('/'));
            if rest.starts_with(':') || versioned {
                return ("tfserving", model(name));
            }
        }
        if let Some(rest) = path
            .strip_prefix("/v2/models/")
            .and_then(|rest| rest.strip_suffix("/infer"))
        {
            let name = rest.split('/').next().unwrap_or_default();
            let tail = &rest[name.len()..];
            if tail.is_empty()
                || tail
                    .strip_prefix("/versions/")
                    .is_some_and(|v| !v.contains('/'))
            {
                return ("v2", model(name));
            }
        }
    }
    (API_HTTP, NO_MODEL.to_string())
}

/// The middleware every request goes through: refuses an over-long URI, turns any error
/// answer that is not JSON yet (axum's 405 and extractor rejections) into
/// `{"error": ...}`, and counts the answer and its latency by model, version, API and
/// status.
async fn contract(State(state): Shared, request: Request, next: Next) -> Response {
    let started = Instant::now();
    state.metrics.in_flight.inc();
    let _done = InFlight(&state.metrics);
    // The client's `X-Request-Id` (printable, at most 128 bytes), else a counter.
    let request_id = match state.log_format {
        None => String::new(),
        Some(_) => request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map_or_else(
                || {
                    state
                        .requests_seen
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        .to_string()
                },
                str::to_string,
            ),
    };
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    let response = if uri_len > MAX_URI_BYTES {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the URI has {uri_len} bytes; this server takes at most {MAX_URI_BYTES}"),
        )
        .into_response()
    } else if let Some(refused) = refuse_without_api_key(&state, request.headers(), &path) {
        refused
    } else {
        next.run(request).await
    };
    let answered_by = response.extensions().get::<AnsweredBy>().cloned();
    let response = json_error(response, &method, &path).await;
    let (api, mut model) = labels(&state.registry.snapshot(), &method, &path);
    let (version, cache) = match answered_by {
        Some(AnsweredBy(name, version, cache)) => {
            model = name;
            (version.to_string(), cache)
        }
        None => (String::new(), ""),
    };
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    state.metrics.record(&model, &version, api, status, seconds);
    if let Some(format) = state.log_format {
        let line = RequestLine {
            request_id: &request_id,
            method: method.as_str(),
            path: &path,
            api,
            model: &model,
            version: &version,
            status,
            latency_ms: seconds * 1e3,
            cache,
        };
        crate::io::log_line(format_args!("{}", line.render(format)));
    }
    response
}

/// One request's log line (`--log-format`).
#[derive(serde::Serialize)]
struct RequestLine<'a> {
    request_id: &'a str,
    method: &'a str,
    path: &'a str,
    api: &'a str,
    model: &'a str,
    version: &'a str,
    status: u16,
    latency_ms: f64,
    cache: &'a str,
}

impl RequestLine<'_> {
    fn render(&self, format: super::LogFormat) -> String {
        match format {
            super::LogFormat::Json => serde_json::to_string(self).unwrap_or_default(),
            super::LogFormat::Text => format!(
                "request {} {} {} -> {} in {:.3} ms (api {}, model {}{}, cache {})",
                self.request_id,
                self.method,
                self.path,
                self.status,
                self.latency_ms,
                self.api,
                self.model,
                if self.version.is_empty() {
                    String::new()
                } else {
                    format!(" version {}", self.version)
                },
                if self.cache.is_empty() {
                    "-"
                } else {
                    self.cache
                },
            ),
        }
    }
}

/// `response` itself when it is a success or already JSON, else the same status and
/// headers with the body `{"error": <what it said, or what the status means>}`.
async fn json_error(response: Response, method: &Method, path: &str) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Error texts are short; a failed read only loses the detail, not the answer.
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allow = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .replace(',', ", ");
        format!("`{method} {path}` is not allowed: this route takes {allow}")
    } else if text.is_empty() {
        let reason = status.canonical_reason().unwrap_or("error");
        format!("{} (`{method} {path}`)", reason.to_lowercase())
    } else {
        text
    };
    let body = json!({ "error": message }).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        let status = match e {
            BatchError::Overloaded | BatchError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            BatchError::Shape { .. } | BatchError::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The model `name`'s version per `pick`, or a 404 naming what is served.
fn pick(state: &AppState, name: &str, pick: &Pick) -> Result<Arc<Model>, ApiError> {
    state
        .registry
        .snapshot()
        .pick(name, pick)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e.message(name)))
}

/// A `/versions/{v}` path segment: a positive integer, else a 400 naming it.
fn version_number(text: &str) -> Result<u64, ApiError> {
    text.parse::<u64>().ok().filter(|&v| v > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{text}` is not a model version: versions are whole numbers from 1"),
        )
    })
}

/// A JSON answer that records the version that gave it and where its logits came from
/// (for `/metrics` and the request log).
fn answered(model: &Model, cache: &'static str, body: Value) -> Response {
    let mut response = Json(body).into_response();
    response
        .extensions_mut()
        .insert(AnsweredBy(model.name.clone(), model.version, cache));
    response
}

/// Checks a request's signature (when the server requires them), then that its nonce is
/// new: in this process always, and in Redis when configured (a replay sent to another
/// replica). A Redis that cannot answer leaves the in-process check (fail open, counted).
async fn check_signature(
    state: &AppState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(), ApiError> {
    let Some(signer) = &state.signer else {
        return Ok(());
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let refused = |e: SignatureError| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string());
    let signed = SignedHeaders {
        timestamp: header(TIMESTAMP_HEADER),
        nonce: header(NONCE_HEADER),
        signature: header(SIGNATURE_HEADER),
    };
    let nonce = signer
        .verify(signed, method, path, body, now)
        .map_err(refused)?;
    state.nonces.check(nonce, now).map_err(refused)?;
    if let Some(remote) = &state.remote {
        let window = Duration::from_secs(2 * signing::MAX_SKEW_SECS);
        if remote.nonce_is_new(nonce, window).await == Some(false) {
            return Err(refused(SignatureError::Replay));
        }
    }
    Ok(())
}

fn body_too_large(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "{what} over the {} MiB limit; send fewer images per request (at most {})",
            MAX_BODY_BYTES >> 20,
            protocol::MAX_IMAGES_PER_REQUEST
        ),
    )
    .closing()
}

/// Reads a request body: refused at once when its `Content-Length` is over
/// [`MAX_BODY_BYTES`], cut off when it grows past it, and answered 408 when it has not
/// arrived within the read timeout (a half-sent body must not hold its connection).
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(body_too_large(&format!(
            "the body (`Content-Length: {}`) is",
            declared.unwrap_or_default()
        )));
    }
    let read = Limited::new(body, MAX_BODY_BYTES).collect();
    match tokio::time::timeout(state.read_timeout, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(body_too_large("the body is")),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body could not be read: {e}"),
        )
        .closing()),
        Err(_) => {
            state.metrics.read_timeouts.inc();
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} ms (`--read-timeout-ms`)",
                    state.read_timeout.as_millis()
                ),
            )
            .closing())
        }
    }
}

/// The body as JSON text: as sent, or inflated when its `Content-Encoding` is gzip (up
/// to [`MAX_BODY_BYTES`] inflated, so a gzip bomb is refused, not expanded); any other
/// encoding gets a 415 naming it.
fn decode(headers: &HeaderMap, body: Bytes) -> Result<Bytes, ApiError> {
    let Some(encoding) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(body);
    };
    let encoding = String::from_utf8_lossy(encoding.as_bytes())
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => Ok(body),
        "gzip" | "x-gzip" => {
            let mut inflated = Vec::new();
            flate2::read::MultiGzDecoder::new(&body[..])
                .take(MAX_BODY_BYTES as u64 + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("the body is not valid gzip (`Content-Encoding: gzip`): {e}"),
                    )
                })?;
            if inflated.len() > MAX_BODY_BYTES {
                return Err(body_too_large("the gzip body inflates"));
            }
            Ok(inflated.into())
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "`Content-Encoding: {other}` is not supported; send the body as plain JSON or \
                 gzip it (`Content-Encoding: gzip`)"
            ),
        )),
    }
}

/// Logits for `batch`: images in the in-process cache from there, then those in Redis
/// (when configured), the rest through the batcher (and into both caches). Rows that are
/// not finite are never cached.
async fn logits(
    state: &AppState,
    model: &Model,
    batch: &Batch,
) -> Result<(Vec<f32>, &'static str), ApiError> {
    let remote = state.remote.as_ref();
    if model.cache.is_none() && remote.is_none() {
        let computed = run(model, &batch.images, batch.count).await?;
        return Ok((computed, "off"));
    }
    let len = model.shape.input_len();
    let classes = model.shape.labels.len();
    let keys: Vec<_> = batch
        .images
        .chunks_exact(len)
        .map(PredictionCache::key)
        .collect();
    let mut out = vec![0.0; batch.count * classes];
    let mut missing: Vec<usize> = Vec::new();
    match &model.cache {
        Some(cache) => {
            for (i, key) in keys.iter().enumerate() {
                match cache.get(key) {
                    Some(row) => out[i * classes..(i + 1) * classes].copy_from_slice(&row),
                    None => missing.push(i),
                }
            }
            count_cache(
                state,
                model,
                "memory",
                batch.count - missing.len(),
                missing.len(),
            );
        }
        None => missing.extend(0..batch.count),
    }
    let mut level = "memory";
    let remote_keys: Vec<String> = match remote {
        Some(_) if !missing.is_empty() => missing
            .iter()
            .map(|&i| Remote::prediction_key(&model.redis_prefix, &keys[i]))
            .collect(),
        _ => Vec::new(),
    };
    if let (Some(remote), false) = (remote, remote_keys.is_empty()) {
        let found = remote.get_many(&remote_keys, classes).await;
        let mut still = Vec::new();
        for (&i, row) in missing.iter().zip(found) {
            match row.filter(|r| r.iter().all(|v| v.is_finite())) {
                Some(row) => {
                    out[i * classes..(i + 1) * classes].copy_from_slice(&row);
                    if let Some(cache) = &model.cache {
                        cache.put(keys[i], row);
                    }
                }
                None => still.push(i),
            }
        }
        count_cache(
            state,
            model,
            "redis",
            missing.len() - still.len(),
            still.len(),
        );
        if still.len() < missing.len() {
            level = "redis";
        }
        missing = still;
    }
    if missing.is_empty() {
        return Ok((out, level));
    }
    let mut images = Vec::with_capacity(missing.len() * len);
    for &i in &missing {
        images.extend_from_slice(&batch.images[i * len..(i + 1) * len]);
    }
    let computed = run(model, &images, missing.len()).await?;
    let mut to_remote = Vec::new();
    for (row, &i) in computed.chunks_exact(classes).zip(&missing) {
        out[i * classes..(i + 1) * classes].copy_from_slice(row);
        if row.iter().all(|v| v.is_finite()) {
            if let Some(cache) = &model.cache {
                cache.put(keys[i], row.to_vec());
            }
            if remote.is_some() {
                to_remote.push((
                    Remote::prediction_key(&model.redis_prefix, &keys[i]),
                    row.to_vec(),
                ));
            }
        }
    }
    if let Some(remote) = remote {
        remote.put_many(to_remote);
    }
    Ok((out, "miss"))
}

/// Counts one cache level's hits and misses for a request.
fn count_cache(state: &AppState, model: &Model, level: &str, hits: usize, misses: usize) {
    let version = model.version.to_string();
    let labels = [model.name.as_str(), version.as_str(), level];
    state
        .metrics
        .cache_hits
        .with_label_values(&labels)
        .inc_by(hits as u64);
    state
        .metrics
        .cache_misses
        .with_label_values(&labels)
        .inc_by(misses as u64);
}

/// Runs images through the model (inline or on its batching thread).
async fn run(model: &Model, images: &[f32], count: usize) -> Result<Vec<f32>, ApiError> {
    Ok(model.batcher.run(images, count).await?)
}

/// `POST /v1/models/NAME:predict` (the latest version).
async fn tf_predict(
    State(state): Shared,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The last `:` splits, so a model file name may itself hold one.
    let (name, verb) = target.rsplit_once(':').unwrap_or((target.as_str(), ""));
    let path = format!("/v1/models/{target}");
    tf_predict_on(&state, &path, name, verb, Ok(Pick::Latest), &headers, body).await
}

/// `POST /v1/models/NAME/versions/N:predict`.
async fn tf_version_predict(
    State(state): Shared,
    Path((name, target)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (version, verb) = target.rsplit_once(':').unwrap_or((target.as_str(), ""));
    let path = format!("/v1/models/{name}/versions/{target}");
    // Checked after the body is read (in `tf_predict_on`): answering before it would
    // close the connection under a client still sending.
    let pick = version_number(version).map(Pick::Version);
    tf_predict_on(&state, &path, &name, verb, pick, &headers, body).await
}

/// `POST /v1/models/NAME/labels/LABEL:predict`.
async fn tf_label_predict(
    State(state): Shared,
    Path((name, target)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (label, verb) = target.rsplit_once(':').unwrap_or((target.as_str(), ""));
    let path = format!("/v1/models/{name}/labels/{target}");
    let pick = Ok(Pick::Label(label.to_string()));
    tf_predict_on(&state, &path, &name, verb, pick, &headers, body).await
}

async fn tf_predict_on(
    state: &AppState,
    path: &str,
    name: &str,
    verb: &str,
    which: Result<Pick, ApiError>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(state, headers, body).await?;
    // Signature first: an unsigned client learns nothing, not even model names. It
    // covers the body as sent (before any gzip inflation, which it so cannot trigger).
    check_signature(state, headers, "POST", path, &body).await?;
    let which = which?;
    if verb != "predict" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{path}`: this server answers `POST /v1/models/NAME[/versions/N]:predict`"),
        ));
    }
    let model = pick(state, name, &which)?;
    let body = decode(headers, body)?;
    let request = protocol::parse_tf_serving(&body, &model.shape)?;
    let (logits, cache) = logits(state, &model, &request.batch).await?;
    let field = if request.columnar {
        "inputs"
    } else {
        "instances"
    };
    protocol::check_finite(&logits, &request.batch.images, &model.shape, |i| {
        format!("`{field}[{i}]`")
    })?;
    Ok(answered(
        &model,
        cache,
        protocol::tf_serving_response(&logits, &model.shape, request.columnar),
    ))
}

/// TF Serving's `model_version_status` entries of `versions` (all when `None`).
fn version_status(registry: &Registry, name: &str, only: Option<u64>) -> Result<Value, ApiError> {
    let served = registry.models.get(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            registry::PickError::NoModel {
                known: registry.models.keys().cloned().collect(),
            }
            .message(name),
        )
    })?;
    let entries: Vec<Value> = served
        .states
        .iter()
        .rev()
        .filter(|(v, _)| only.is_none_or(|o| o == **v))
        .map(|(v, status)| {
            json!({
                "version": v.to_string(),
                "state": status.state.as_str(),
                "status": match &status.error {
                    None => json!({"error_code": "OK", "error_message": ""}),
                    Some(e) => json!({"error_code": "UNKNOWN", "error_message": e}),
                },
            })
        })
        .collect();
    if let Some(v) = only.filter(|_| entries.is_empty()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model `{name}` has no version {v}; versions: {:?}",
                served.states.keys().collect::<Vec<_>>()
            ),
        ));
    }
    Ok(json!({ "model_version_status": entries }))
}

/// A 405 for `GET ...:predict`, or a 404 for another verb.
fn wrong_verb(method: &Method, path: &str, verb: &str) -> ApiError {
    if matches!(verb, "predict" | "classify" | "regress") {
        let mut e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("`{method} {path}` is not allowed: `:{verb}` takes POST"),
        );
        e.allow = Some("POST");
        return e;
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("`{path}`: this server answers `/v1/models/NAME[/versions/N]:predict`"),
    )
}

/// `GET /v1/models/NAME`: every version's state. `GET /v1/models/NAME:predict` (a verb
/// of a served model) gets a 405 naming the method, not a 404 for a model `NAME:predict`.
async fn tf_status(
    State(state): Shared,
    method: Method,
    Path(target): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = state.registry.snapshot();
    if !registry.models.contains_key(&target) {
        if let Some((name, verb)) = target.rsplit_once(':') {
            if registry.models.contains_key(name) {
                return Err(wrong_verb(&method, &format!("/v1/models/{target}"), verb));
            }
            return Ok(Json(version_status(&registry, name, None)?));
        }
    }
    Ok(Json(version_status(&registry, &target, None)?))
}

/// `GET /v1/models/NAME/versions/N`: that version's state.
async fn tf_version_status(
    State(state): Shared,
    method: Method,
    Path((name, target)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if let Some((_, verb)) = target.rsplit_once(':') {
        return Err(wrong_verb(
            &method,
            &format!("/v1/models/{name}/versions/{target}"),
            verb,
        ));
    }
    let version = version_number(&target)?;
    Ok(Json(version_status(
        &state.registry.snapshot(),
        &name,
        Some(version),
    )?))
}

/// `GET /v1/models/NAME/labels/LABEL`: the labelled version's state.
async fn tf_label_status(
    State(state): Shared,
    method: Method,
    Path((name, target)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if let Some((_, verb)) = target.rsplit_once(':') {
        return Err(wrong_verb(
            &method,
            &format!("/v1/models/{name}/labels/{target}"),
            verb,
        ));
    }
    let model = pick(&state, &name, &Pick::Label(target))?;
    Ok(Json(version_status(
        &state.registry.snapshot(),
        &name,
        Some(model.version),
    )?))
}

fn dims(shape: &ModelShape) -> Vec<i64> {
    std::iter::once(-1)
        .chain(shape.input.shape.iter().map(|&d| d as i64))
        .collect()
}

/// TF Serving's `GET .../metadata` body for one version.
fn tf_metadata_of(model: &Model) -> Value {
    let tensor = |dtype: &str, dims: Vec<i64>, name: &str| {
        json!({"dtype": dtype, "name": name,
               "tensor_shape": {"dim": dims.iter().map(|d| json!({"size": d.to_string()})).collect::<Vec<_>>()}})
    };
    let classes = model.shape.labels.len() as i64;
    json!({
        "model_spec": {"name": model.name, "signature_name": "", "version": model.version.to_string()},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": {"input": tensor("DT_FLOAT", dims(&model.shape), "input")},
            "outputs": {
                "probabilities": tensor("DT_FLOAT", vec![-1, classes], "probabilities"),
                "class": tensor("DT_INT64", vec![-1], "class"),
                "label": tensor("DT_STRING", vec![-1], "label"),
            },
            "method_name": "tensorflow/serving/predict",
        }}}},
        "mlops": model.info,
    })
}

async fn tf_metadata(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let model = pick(&state, &name, &Pick::Latest)?;
    Ok(Json(tf_metadata_of(&model)))
}

async fn tf_version_metadata(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let which = Pick::Version(version_number(&version)?);
    let model = pick(&state, &name, &which)?;
    Ok(Json(tf_metadata_of(&model)))
}

async fn tf_label_metadata(
    State(state): Shared,
    Path((name, label)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let model = pick(&state, &name, &Pick::Label(label))?;
    Ok(Json(tf_metadata_of(&model)))
}

async fn v2_server() -> Json<Value> {
    Json(
        json!({"name": "mlops", "version": crate::report::MLOPS_VERSION,
                "extensions": [protocol::BINARY_EXTENSION]}),
    )
}

/// KServe v2 model metadata of `model`, listing every loaded version of its name.
fn v2_metadata_of(state: &AppState, model: &Model) -> Value {
    let classes = model.shape.labels.len() as i64;
    let versions: Vec<String> = state
        .registry
        .snapshot()
        .models
        .get(&model.name)
        .map(|s| s.versions.keys().map(u64::to_string).collect())
        .unwrap_or_default();
    json!({
        "name": model.name,
        "versions": versions,
        "platform": "mlops",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": dims(&model.shape)}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "class", "datatype": "INT64", "shape": [-1]},
        ],
        "parameters": scalar_parameters(&model.info),
    })
}

async fn v2_model(State(state): Shared, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let model = pick(&state, &name, &Pick::Latest)?;
    Ok(Json(v2_metadata_of(&state, &model)))
}

async fn v2_version_model(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let model = pick(&state, &name, &Pick::Version(version_number(&version)?))?;
    Ok(Json(v2_metadata_of(&state, &model)))
}

/// v2 model parameters may only be strings, numbers or booleans: lists and objects are
/// sent as their JSON text, missing values left out.
fn scalar_parameters(info: &Value) -> Value {
    let Some(fields) = info.as_object() else {
        return json!({});
    };
    let scalar = fields
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::Array(_) | Value::Object(_) => (k.clone(), Value::String(v.to_string())),
            _ => (k.clone(), v.clone()),
        });
    Value::Object(scalar.collect())
}

async fn v2_model_ready(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    pick(&state, &name, &Pick::Latest)?;
    Ok(Json(json!({"name": name, "ready": true})))
}

async fn v2_version_ready(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    pick(&state, &name, &Pick::Version(version_number(&version)?))?;
    Ok(Json(json!({"name": name, "ready": true})))
}

async fn v2_infer(
    State(state): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let path = format!("/v2/models/{name}/infer");
    v2_infer_on(&state, &path, &name, Ok(Pick::Latest), &headers, body).await
}

async fn v2_version_infer(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let path = format!("/v2/models/{name}/versions/{version}/infer");
    // Checked after the body is read, as in `tf_version_predict`.
    let which = version_number(&version).map(Pick::Version);
    v2_infer_on(&state, &path, &name, which, &headers, body).await
}

async fn v2_infer_on(
    state: &AppState,
    path: &str,
    name: &str,
    which: Result<Pick, ApiError>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(state, headers, body).await?;
    check_signature(state, headers, "POST", path, &body).await?;
    let model = pick(state, name, &which?)?;
    let body = decode(headers, body)?;
    let header = match headers.get(protocol::BINARY_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "`Inference-Header-Content-Length` is not a byte count",
            )
        })?),
    };
    let (json_part, binary_part) = protocol::split_binary(&body, header)?;
    let request = protocol::parse_v2(json_part, binary_part, &model.shape)?;
    let (logits, cache) = logits(state, &model, &request.batch).await?;
    protocol::check_finite(&logits, &request.batch.images, &model.shape, |i| {
        format!("image {i} of `inputs[0]`")
    })?;
    let answer = protocol::v2_response(
        name,
        model.version,
        &request.outputs,
        request.id.as_ref(),
        &logits,
        model.shape.labels.len(),
    );
    if answer.binary.is_empty() {
        return Ok(answered(&model, cache, answer.json));
    }
    // The binary tensor extension: JSON, then the tensors' bytes; the header gives where
    // the JSON ends.
    let mut bytes = serde_json::to_vec(&answer.json).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("answer not encoded: {e}"),
        )
    })?;
    let json_len = bytes.len();
    bytes.extend_from_slice(&answer.binary);
    let mut response = (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(protocol::BINARY_HEADER),
                HeaderValue::from(json_len),
            ),
        ],
        bytes,
    )
        .into_response();
    response
        .extensions_mut()
        .insert(AnsweredBy(model.name.clone(), model.version, cache));
    Ok(response)
}

async fn v2_server_ready(State(state): Shared) -> Response {
    let loaded = state
        .registry
        .snapshot()
        .models
        .values()
        .any(|m| !m.versions.is_empty());
    let status = if loaded {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": loaded}))).into_response()
}

/// An error of the guide's endpoints: `{"error": ..., "status": "error"}`, as its
/// Flask/FastAPI server answers.
struct GuideError(ApiError);

impl From<ApiError> for GuideError {
    fn from(e: ApiError) -> Self {
        GuideError(e)
    }
}

impl IntoResponse for GuideError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.0.message, "status": "error"});
        self.0.respond(body)
    }
}

/// `?model=NAME` of the guide's endpoints.
#[derive(Debug, serde::Deserialize)]
struct GuideQuery {
    model: Option<String>,
}

/// The model the guide's endpoints answer with: `?model=NAME`, or the only model served
/// (the guide's server has one); with several and no `?model=`, a 400 listing them.
fn guide_model(state: &AppState, query: &GuideQuery) -> Result<Arc<Model>, ApiError> {
    if let Some(name) = &query.model {
        return pick(state, name, &Pick::Latest);
    }
    let registry = state.registry.snapshot();
    let names: Vec<&String> = registry.models.keys().collect();
    match names.as_slice() {
        [only] => pick(state, only, &Pick::Latest),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "this server has {} models {names:?}: name one with `?model=NAME`",
                names.len()
            ),
        )),
    }
}

/// The guide's `POST /predict`: `{"input": IMAGE | [IMAGE, ...]}` ->
/// `{"predictions": [[p0..p9], ...], "classes", "labels", "status": "success"}`.
async fn guide_predict(
    State(state): Shared,
    axum::extract::Query(query): axum::extract::Query<GuideQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GuideError> {
    let body = read_body(&state, &headers, body).await?;
    check_signature(&state, &headers, "POST", "/predict", &body).await?;
    let model = guide_model(&state, &query)?;
    let body = decode(&headers, body)?;
    let batch = protocol::parse_guide(&body, &model.shape).map_err(ApiError::from)?;
    let (logits, cache) = logits(&state, &model, &batch).await?;
    protocol::check_finite(&logits, &batch.images, &model.shape, |i| {
        format!("`input[{i}]`")
    })
    .map_err(ApiError::from)?;
    let mut answer = protocol::guide_response(&logits, &model.shape);
    answer["model"] = json!(model.name);
    answer["version"] = json!(model.version);
    Ok(answered(&model, cache, answer))
}

/// The guide's `GET /model_info`: name, version, input and output shapes, parameters.
async fn guide_model_info(
    State(state): Shared,
    axum::extract::Query(query): axum::extract::Query<GuideQuery>,
) -> Result<Json<Value>, GuideError> {
    let model = guide_model(&state, &query)?;
    let [h, w, c] = model.shape.input.shape;
    Ok(Json(json!({
        "name": model.name,
        "version": model.version,
        "input_shape": [h, w, c],
        "output_shape": [model.shape.labels.len()],
        "parameters": model.info["parameters"],
        "precision": model.info["precision"],
        "labels": model.shape.labels,
        "status": "success",
    })))
}

/// The guide's `GET /health`: `{"status": "healthy", "model_loaded": true}`, or 503
/// `unhealthy` while no model version is loaded.
async fn guide_health(State(state): Shared) -> Response {
    let registry = state.registry.snapshot();
    let models: BTreeMap<&String, Vec<u64>> = registry
        .models
        .iter()
        .map(|(name, m)| (name, m.versions.keys().copied().collect()))
        .collect();
    let loaded = models.values().any(|v| !v.is_empty());
    let (status, word) = if loaded {
        (StatusCode::OK, "healthy")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    (
        status,
        Json(json!({"status": word, "model_loaded": loaded, "models": models})),
    )
        .into_response()
}

async fn metrics(State(state): Shared) -> impl IntoResponse {
    for (name, served) in &state.registry.snapshot().models {
        state
            .metrics
            .loaded_versions
            .with_label_values(&[name.as_str()])
            .set(served.versions.len() as i64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    fn state(read_timeout: Duration) -> AppState {
        AppState {
            registry: registry::Shared::new(Registry::default()),
            signer: None,
            nonces: NonceStore::default(),
            remote: None,
            api_keys: None,
            log_format: None,
            requests_seen: Default::default(),
            metrics: Arc::new(Metrics::new()),
            read_timeout,
        }
    }

    fn gzip(bytes: &[u8]) -> Bytes {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap().into()
    }

    fn encoded(encoding: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_str(encoding).unwrap(),
        );
        headers
    }

    /// Issue 10: a gzip body got "the body is not JSON"; it is inflated now, but never past
    /// the body limit (a bomb of 33 MiB of zeros is ~33 KB sent).
    #[test]
    fn gzip_bodies_are_inflated_within_the_limit() {
        let body = br#"{"instances": [[0]]}"#;
        let plain = decode(&HeaderMap::new(), Bytes::from_static(body)).unwrap();
        assert_eq!(&plain[..], body);
        let inflated = decode(&encoded("gzip"), gzip(body)).unwrap();
        assert_eq!(&inflated[..], body);
        let bomb = gzip(&vec![b' '; MAX_BODY_BYTES + 1]);
        assert!(bomb.len() < MAX_BODY_BYTES / 100);
        let err = decode(&encoded("gzip"), bomb).unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(err.message.contains("inflates"), "{}", err.message);
        let err = decode(&encoded("gzip"), Bytes::from_static(b"not gzip")).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let err = decode(&encoded("br"), Bytes::from_static(body)).unwrap_err();
        assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(
            err.message.contains("`Content-Encoding: br`"),
            "{}",
            err.message
        );
    }

    /// A body that never finishes.
    struct Stalled;

    impl axum::body::HttpBody for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    /// Bodies are bounded in size (declared or sent) and in time.
    #[tokio::test]
    async fn bodies_are_bounded_in_size_and_time() {
        let state = state(Duration::from_millis(50));
        let body = read_body(&state, &HeaderMap::new(), Body::from("{}"))
            .await
            .unwrap();
        assert_eq!(&body[..], b"{}");
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("40000000"));
        let err = read_body(&state, &declared, Body::from("{}"))
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        let big = Body::from(vec![b' '; MAX_BODY_BYTES + 1]);
        let err = read_body(&state, &HeaderMap::new(), big).await.unwrap_err();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        let err = read_body(&state, &HeaderMap::new(), Body::new(Stalled))
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::REQUEST_TIMEOUT);
        assert!(err.close);
        assert_eq!(state.metrics.read_timeouts.get(), 1);
    }

    /// Error answers that are not JSON (axum's 405, extractor rejections) become
    /// `{"error": ...}` with their status and headers kept.
    #[tokio::test]
    async fn error_answers_are_always_json() {
        let mut not_allowed = StatusCode::METHOD_NOT_ALLOWED.into_response();
        not_allowed
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
        let answer = json_error(not_allowed, &Method::POST, "/v2/health/ready").await;
        assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer.headers()[header::ALLOW], "GET,HEAD");
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["error"],
            "`POST /v2/health/ready` is not allowed: this route takes GET, HEAD"
        );
        let text = (StatusCode::BAD_REQUEST, "Invalid URL").into_response();
        let answer = json_error(text, &Method::GET, "/x").await;
        let body = axum::body::to_bytes(answer.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "Invalid URL");
        let fine = json_error(Json(json!({"ok": 1})).into_response(), &Method::GET, "/").await;
        assert_eq!(fine.status(), StatusCode::OK);
    }

    /// Requests are counted under their API even when refused before routing.
    #[test]
    fn labels_come_from_the_path() {
        let mut registry = Registry::default();
        registry
            .models
            .insert("m".into(), registry::Served::default());
        let post = Method::POST;
        let label = |method: &Method, path: &str| {
            let (api, model) = labels(&registry, method, path);
            (api, model)
        };
        for path in [
            "/v1/models/m:predict",
            "/v1/models/m/versions/2:predict",
            "/v1/models/m/labels/stable:predict",
        ] {
            assert_eq!(label(&post, path), ("tfserving", "m".into()), "{path}");
        }
        assert_eq!(
            label(&post, "/v1/models/x:predict"),
            ("tfserving", "(unknown)".into())
        );
        for path in ["/v2/models/m/infer", "/v2/models/m/versions/3/infer"] {
            assert_eq!(label(&post, path), ("v2", "m".into()), "{path}");
        }
        for (method, path) in [
            (&Method::GET, "/v1/models/m"),
            (&post, "/metrics"),
            (&Method::GET, "/v2/models/m/infer"),
            (&post, "/v2/models/m/versions/3/ready/infer"),
        ] {
            assert_eq!(
                label(method, path),
                (API_HTTP, NO_MODEL.to_string()),
                "{method} {path}"
            );
        }
    }
}
