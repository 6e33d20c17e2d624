//! The HTTP routes (axum): TF Serving and KServe v2 inference, health, metadata and
//! metrics, over the models' batchers and caches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::batcher::{BatchError, Batcher};
use super::cache::PredictionCache;
use super::metrics::Metrics;
use super::protocol::{self, Batch, ModelShape};
use super::signing::{Signer, SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// Largest request body. One 28x28 image is ~5-10 KB of JSON floats, so this admits
/// requests of a few thousand images (the parsers cap them at
/// [`protocol::MAX_IMAGES_PER_REQUEST`]) and refuses a runaway upload early.
const MAX_BODY_BYTES: usize = 32 << 20;

/// One served model.
pub(crate) struct Model {
    pub name: String,
    pub shape: ModelShape,
    pub batcher: Batcher,
    pub cache: Option<PredictionCache>,
    /// What `GET` metadata shows about the artifact (precision, sha256, compute, ...).
    pub info: Value,
}

/// Everything the handlers share.
pub(crate) struct AppState {
    pub models: BTreeMap<String, Model>,
    pub signer: Option<Signer>,
    pub metrics: Arc<Metrics>,
}

type Shared = State<Arc<AppState>>;

/// An error answer: status and a message naming what to fix.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<protocol::BadRequest> for ApiError {
    fn from(e: protocol::BadRequest) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.0)
    }
}

/// The router over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models/{target}", get(tf_status).post(tf_predict))
        .route("/v1/models/{name}/metadata", get(tf_metadata))
        .route("/v2", get(v2_server))
        .route(
            "/v2/health/live",
            get(|| async { Json(json!({"live": true})) }),
        )
        .route(
            "/v2/health/ready",
            get(|| async { Json(json!({"ready": true})) }),
        )
        .route("/v2/models/{name}", get(v2_model))
        .route("/v2/models/{name}/ready", get(v2_model_ready))
        .route("/v2/models/{name}/infer", post(v2_infer))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no route `{}`: use POST /v1/models/NAME:predict, POST /v2/models/NAME/infer, \
             GET /v1/models/NAME[/metadata], GET /v2/models/NAME[/ready], GET /v2/health/ready \
             or GET /metrics",
            uri.path()
        ),
    )
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        let status = match e {
            BatchError::Overloaded | BatchError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            BatchError::Shape { .. } | BatchError::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn model<'a>(state: &'a AppState, name: &str) -> Result<&'a Model, ApiError> {
    state.models.get(name).ok_or_else(|| {
        let known: Vec<&str> = state.models.keys().map(String::as_str).collect();
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no model `{name}`; this server has {known:?}"),
        )
    })
}

fn check_signature(
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
    signer
        .verify(
            header(TIMESTAMP_HEADER),
            header(SIGNATURE_HEADER),
            method,
            path,
            body,
            now,
        )
        .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, e.to_string()))
}

/// Logits for `batch`: cached images from the cache, the rest through the batcher.
async fn logits(state: &AppState, model: &Model, batch: Batch) -> Result<Vec<f32>, ApiError> {
    let Some(cache) = &model.cache else {
        return run(model, batch.images, batch.count).await;
    };
    let len = model.shape.input_len();
    let classes = model.shape.labels.len();
    let keys: Vec<_> = batch
        .images
        .chunks_exact(len)
        .map(PredictionCache::key)
        .collect();
    let mut out = vec![0.0; batch.count * classes];
    let (mut missing, mut missing_images) = (Vec::new(), Vec::new());
    for (i, key) in keys.iter().enumerate() {
        match cache.get(key) {
            Some(row) => out[i * classes..(i + 1) * classes].copy_from_slice(&row),
            None => {
                missing.push(i);
                missing_images.extend_from_slice(&batch.images[i * len..(i + 1) * len]);
            }
        }
    }
    let hits = batch.count - missing.len();
    let label = [model.name.as_str()];
    state
        .metrics
        .cache_hits
        .with_label_values(&label)
        .inc_by(hits as u64);
    state
        .metrics
        .cache_misses
        .with_label_values(&label)
        .inc_by(missing.len() as u64);
    if !missing.is_empty() {
        let computed = run(model, missing_images, missing.len()).await?;
        for (row, &i) in computed.chunks_exact(classes).zip(&missing) {
            out[i * classes..(i + 1) * classes].copy_from_slice(row);
            cache.put(keys[i], row.to_vec());
        }
    }
    Ok(out)
}

/// Runs images through the model's batcher.
async fn run(model: &Model, images: Vec<f32>, count: usize) -> Result<Vec<f32>, ApiError> {
    let answer = model.batcher.submit(images, count)?;
    Ok(answer.await.map_err(|_| BatchError::Stopped)??)
}

/// Runs `handle` for `model_name`, recording the request count and latency.
async fn recorded<F>(state: &AppState, model_name: &str, api: &str, handle: F) -> Response
where
    F: std::future::Future<Output = Result<Value, ApiError>>,
{
    let started = Instant::now();
    let response = match handle.await {
        Ok(answer) => (StatusCode::OK, Json(answer)).into_response(),
        Err(e) => e.into_response(),
    };
    // Unknown model names would make unbounded label values: count them under one.
    let name = if state.models.contains_key(model_name) {
        model_name
    } else {
        "(unknown)"
    };
    let code = response.status().as_u16().to_string();
    let metrics = &state.metrics;
    metrics
        .requests
        .with_label_values(&[name, api, code.as_str()])
        .inc();
    metrics
        .latency
        .with_label_values(&[name, api])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn tf_predict(
    State(state): Shared,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The last `:` splits, so a model file name may itself hold one.
    let (name, verb) = target.rsplit_once(':').unwrap_or((target.as_str(), ""));
    let path = format!("/v1/models/{target}");
    let handle = async {
        // Signature first: an unsigned client learns nothing, not even model names.
        check_signature(&state, &headers, "POST", &path, &body)?;
        if verb != "predict" {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("`{target}`: this server answers `/v1/models/NAME:predict`"),
            ));
        }
        let model = model(&state, name)?;
        let request = protocol::parse_tf_serving(&body, &model.shape)?;
        let logits = logits(&state, model, request.batch).await?;
        Ok(protocol::tf_serving_response(
            &logits,
            &model.shape,
            request.columnar,
        ))
    };
    recorded(&state, name, "tfserving", handle).await
}

async fn tf_status(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    model(&state, &name)?;
    Ok(Json(json!({"model_version_status": [{
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }]})))
}

fn dims(shape: &ModelShape) -> Vec<i64> {
    std::iter::once(-1)
        .chain(shape.input.shape.iter().map(|&d| d as i64))
        .collect()
}

async fn tf_metadata(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let model = model(&state, &name)?;
    let tensor = |dtype: &str, dims: Vec<i64>, name: &str| {
        json!({"dtype": dtype, "name": name,
               "tensor_shape": {"dim": dims.iter().map(|d| json!({"size": d.to_string()})).collect::<Vec<_>>()}})
    };
    let classes = model.shape.labels.len() as i64;
    Ok(Json(json!({
        "model_spec": {"name": name, "signature_name": "", "version": "1"},
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
    })))
}

async fn v2_server() -> Json<Value> {
    Json(json!({"name": "mlops", "version": crate::report::MLOPS_VERSION, "extensions": []}))
}

async fn v2_model(State(state): Shared, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let model = model(&state, &name)?;
    let classes = model.shape.labels.len() as i64;
    Ok(Json(json!({
        "name": name,
        "versions": ["1"],
        "platform": "mlops",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": dims(&model.shape)}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "class", "datatype": "INT64", "shape": [-1]},
        ],
        "parameters": scalar_parameters(&model.info),
    })))
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
    model(&state, &name)?;
    Ok(Json(json!({"name": name, "ready": true})))
}

async fn v2_infer(
    State(state): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v2/models/{name}/infer");
    let handle = async {
        check_signature(&state, &headers, "POST", &path, &body)?;
        let model = model(&state, &name)?;
        let request = protocol::parse_v2(&body, &model.shape)?;
        let logits = logits(&state, model, request.batch).await?;
        Ok(protocol::v2_response(
            &name,
            &request.outputs,
            request.id.as_ref(),
            &logits,
            model.shape.labels.len(),
        ))
    };
    recorded(&state, &name, "v2", handle).await
}

async fn metrics(State(state): Shared) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
