//! Routes, the role-checking middleware and the handlers. `docs/openapi.yaml` describes the API.
//!
//! Heavy work (sealing, hashing) runs on blocking threads, bounded by the state's permits. A commit
//! registers its shard from inside its blocking task, so a client that disconnects or times out does
//! not leave a sealed shard unregistered: it shows up in `GET /v1/shards`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use vram_residency::attestation::parse_nonce_hex;
use vram_residency::format::FormatChoice;
use vram_residency::models_dir::check_relative;
use vram_residency::{AuditEvent, Digest, SealOptions, ShardId, VramError, WorkerState};

use super::auth::{Presented, Role};
use super::error::ApiError;
use super::metrics;
use super::state::{AppState, ModelEntry};

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Longest a request may take, body included; then 408 (a commit still completes and registers).
    pub request_timeout: Duration,
    /// Longest a request body may take to arrive, from when a handler starts reading it; then 408
    /// `body_timeout` and the connection is closed.
    pub body_timeout: Duration,
}

/// `--body-timeout`, handed to [`JsonBody`] as a request extension.
#[derive(Debug, Clone, Copy)]
struct BodyTimeout(Duration);

/// A JSON request body that must arrive whole within `--body-timeout`.
///
/// tower-http's `RequestBodyTimeoutLayer` bounds the wait for each *frame*, so a body trickled in a
/// byte at a time would never trip it; this bounds the whole body. Its rejection is the API's error
/// (413, 415, 400 as the `Json` extractor decides; 408 `body_timeout` when time runs out).
struct JsonBody<T>(T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        // The router always installs the extension; without it, the default applies.
        let timeout = request
            .extensions()
            .get::<BodyTimeout>()
            .map_or(DEFAULT_BODY_TIMEOUT, |limit| limit.0);
        match tokio::time::timeout(timeout, Json::<T>::from_request(request, state)).await {
            Ok(Ok(Json(value))) => Ok(Self(value)),
            Ok(Err(rejection)) => Err(ApiError::from_json_rejection(&rejection)),
            Err(_) => Err(ApiError::body_timeout(timeout)),
        }
    }
}

/// `--body-timeout`'s default.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn router(app: Arc<AppState>, limits: Limits) -> Router {
    // Each method of each route names the role it needs (docs/service.md has the table).
    let needs = |role: Role| middleware::from_fn_with_state((Arc::clone(&app), role), require_role);
    let metrics_route = if app.access.metrics_without_token {
        get(metrics)
    } else {
        get(metrics).route_layer(needs(Role::Observer))
    };
    Router::new()
        .route(
            "/v1/shards",
            get(list)
                .route_layer(needs(Role::Observer))
                .merge(post(commit).route_layer(needs(Role::Operator))),
        )
        .route(
            "/v1/shards/{id}",
            get(get_shard)
                .route_layer(needs(Role::Observer))
                .merge(delete(evict).route_layer(needs(Role::Operator))),
        )
        .route(
            "/v1/shards/{id}/verify",
            post(verify).route_layer(needs(Role::Operator)),
        )
        .route(
            "/v1/shards/{id}/attest",
            post(attest).route_layer(needs(Role::Observer)),
        )
        .route(
            "/v1/models",
            get(list_models)
                .route_layer(needs(Role::Observer))
                .merge(post(seal_model).route_layer(needs(Role::Operator))),
        )
        .route(
            "/v1/models/{id}",
            get(get_model)
                .route_layer(needs(Role::Observer))
                .merge(delete(forget_model).route_layer(needs(Role::Operator))),
        )
        .route(
            "/v1/models/{id}/verify",
            post(verify_model).route_layer(needs(Role::Operator)),
        )
        .route(
            "/v1/models/{id}/attest",
            post(attest_model).route_layer(needs(Role::Observer)),
        )
        .route("/v1/worker", get(worker).route_layer(needs(Role::Observer)))
        .route("/metrics", metrics_route)
        .route("/healthz", get(healthz))
        .route("/v1/identity", get(identity))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_body))
        .layer(Extension(BodyTimeout(limits.body_timeout)))
        .layer(middleware::from_fn_with_state(
            limits.max_body,
            refuse_announced_oversize,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        // 5xx answers (507 for a full device, say) are logged where they arise, with their reason;
        // the per-request trace stays at debug level (-vv).
        .layer(
            TraceLayer::new_for_http()
                // Method and path only: a query string (a client that sends `?access_token=…`)
                // never reaches a log line.
                .make_span_with(|request: &Request| {
                    tracing::debug_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                    )
                })
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        // Outermost, so that nothing after it (traces included) sees the token.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .with_state(app)
}

/// Lets a request through only with `Authorization: Bearer <API token>` of a role at least `needed`:
/// 401 without a configured token, 403 with a token of a lesser role. The worker token gets the same
/// 401 as any wrong token, and the attempt is audited (critical) before the answer goes out.
async fn require_role(
    State((app, needed)): State<(Arc<AppState>, Role)>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .map_or(Presented::Unknown, |value| {
            app.access.identify(value.as_bytes())
        });
    match presented {
        Presented::Role(held) if held >= needed => next.run(request).await,
        Presented::Role(held) => ApiError::forbidden(needed, held).into_response(),
        Presented::WorkerToken => {
            // Method and path are taken out first: a `&Request` cannot be held across an await.
            let method = request.method().to_string();
            let path = request.uri().path().to_owned();
            refused_worker_token(&app, method, path).await;
            ApiError::unauthorized().into_response()
        }
        Presented::Unknown => ApiError::unauthorized().into_response(),
    }
}

/// Records `worker_token_refused` (method and path, without the query string; never the token).
async fn refused_worker_token(app: &Arc<AppState>, method: String, path: String) {
    tracing::error!(
        %method,
        %path,
        "the worker token was presented as an API credential and refused; it is in a client's \
         hands: rotate it"
    );
    let event = AuditEvent::WorkerTokenRefused { method, path };
    let app = Arc::clone(app);
    let recorded = tokio::task::spawn_blocking(move || {
        super::record(app.audit.as_ref(), app.manager.backend_kind(), event)
    })
    .await;
    match recorded {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "recording worker_token_refused failed"),
        Err(_) => tracing::error!("the task recording worker_token_refused failed"),
    }
}

/// Answers 413 at once when `Content-Length` announces more than the limit, before reading any of
/// the body. (Bodies without a length are cut off at the limit as they are read.)
async fn refuse_announced_oversize(
    State(max_body): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if announced.is_some_and(|length| length > max_body as u64) {
        return ApiError::body_too_large().into_response();
    }
    next.run(request).await
}

const fn one() -> u32 {
    1
}

/// `POST /v1/shards`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    /// Path of the model file, relative to the models directory.
    model: String,
    /// Device index.
    gpu: u32,
    #[serde(default)]
    shard_id: Option<String>,
    #[serde(default)]
    expected_digest: Option<String>,
    #[serde(default)]
    model_ref: String,
    #[serde(default)]
    shard_index: u32,
    #[serde(default = "one")]
    total_shards: u32,
    /// `auto` (default), `raw`, `gguf` or `safetensors`.
    #[serde(default)]
    format: Option<String>,
}

async fn commit(
    State(app): State<Arc<AppState>>,
    body: Result<JsonBody<CommitRequest>, ApiError>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let result = commit_inner(&app, body).await;
    app.metrics.seal_result(match &result {
        Ok(_) => "ok",
        Err(error) => error.label(),
    });
    result.map(|view| (StatusCode::CREATED, Json(json!(view))))
}

async fn commit_inner(
    app: &Arc<AppState>,
    body: Result<JsonBody<CommitRequest>, ApiError>,
) -> Result<vram_residency::SealView, ApiError> {
    let JsonBody(request) = body?;
    app.check_accepting()?;
    check_relative(&request.model)?;
    let opts = SealOptions {
        shard_id: request.shard_id.as_deref().map(ShardId::new).transpose()?,
        expected_digest: request
            .expected_digest
            .as_deref()
            .map(str::parse::<Digest>)
            .transpose()?,
        model_ref: request.model_ref,
        shard_index: request.shard_index,
        total_shards: request.total_shards,
        tensor_table: None,
        format: request
            .format
            .as_deref()
            .map(str::parse::<FormatChoice>)
            .transpose()
            .map_err(|reason| {
                ApiError::from(VramError::InvalidInput {
                    field: "format",
                    reason,
                })
            })?
            .unwrap_or_default(),
        progress: None,
    };
    // Open (and type-check) the file before taking an operation slot: a path that is not a
    // regular file — a FIFO swapped in, say — is refused at once and never holds a slot.
    let open_app = Arc::clone(app);
    let model = request.model.clone();
    let opened = tokio::task::spawn_blocking(move || open_app.models.open(&model))
        .await
        .map_err(|_| ApiError::internal("the open task failed"))??;
    let permit = app.permit().await?;
    let app = Arc::clone(app);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        app.commit_blocking(opened, &request.model, request.gpu, &opts)
    })
    .await
    .map_err(|_| ApiError::internal("the commit task failed"))?
}

/// `GET /v1/shards`.
async fn list(State(app): State<Arc<AppState>>) -> Json<Value> {
    let shards: Vec<_> = app
        .snapshot()
        .iter()
        .map(|entry| entry.view.clone())
        .collect();
    Json(json!({ "shards": shards }))
}

/// `GET /v1/shards/{id}`.
async fn get_shard(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(app.entry(&id)?.view)))
}

/// `POST /v1/shards/{id}/verify`.
async fn verify(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.check_accepting()?;
    let entry = app.entry(&id)?;
    let permit = app.permit().await?;
    let task_app = Arc::clone(&app);
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        task_app.verify_blocking(&entry)
    })
    .await
    .map_err(|_| ApiError::internal("the verification task failed"))?
    .ok_or_else(|| ApiError::shard_not_found(&id))?;
    let report = result?;
    Ok(Json(json!({
        "verified": true,
        "shard_id": report.shard_id,
        "digest": report.digest,
        "vram_bytes": report.vram_bytes,
        "elapsed_ns": u64::try_from(report.elapsed.as_nanos()).unwrap_or(u64::MAX),
        "backend": report.backend,
    })))
}

/// `POST /v1/shards/{id}/attest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestRequest {
    /// 16 to 64 bytes, hex.
    nonce: String,
}

async fn attest(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<JsonBody<AttestRequest>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let JsonBody(request) = body?;
    let nonce = parse_nonce_hex(&request.nonce)?;
    app.check_accepting()?;
    let entry = app.entry(&id)?;
    let permit = app.permit().await?;
    let task_app = Arc::clone(&app);
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        task_app.attest_blocking(&entry, &nonce)
    })
    .await
    .map_err(|_| ApiError::internal("the attestation task failed"))?
    .ok_or_else(|| ApiError::shard_not_found(&id))?;
    Ok(Json(result?.to_json()))
}

/// `POST /v1/models`: seals shards already committed (`POST /v1/shards` with the same `model_ref`,
/// their `shard_index` and `total_shards`) as one model.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealModelRequest {
    /// The shards, by id: every index of the model exactly once.
    shards: Vec<String>,
    /// Id for the sealed model (as shard ids: 1 to 256 of `A-Za-z0-9_-`); generated when absent.
    #[serde(default)]
    model_id: Option<String>,
}

/// Most shards one `POST /v1/models` may name.
const MAX_MODEL_SHARDS_PER_REQUEST: usize = vram_residency::model_seal::MAX_MODEL_SHARDS as usize;

/// The public view of a sealed model.
fn model_view(entry: &ModelEntry) -> Value {
    let record = &entry.sealed.record;
    json!({
        "model_id": entry.id,
        "model_ref": record.model_ref,
        "total_shards": record.shards.len(),
        "backend": record.backend,
        "sealed_at_ns": record.sealed_at_ns,
        "total_bytes": record.total_bytes(),
        "shards": record.shards.iter().map(|shard| json!({
            "shard_index": shard.shard_index,
            "shard_id": shard.shard_id,
            "digest": shard.digest,
            "vram_bytes": shard.vram_bytes,
            "gpu_device": shard.gpu_device,
            "device_uuid": vram_residency::shard::format_uuid(&shard.device_uuid),
        })).collect::<Vec<_>>(),
    })
}

async fn seal_model(
    State(app): State<Arc<AppState>>,
    body: Result<JsonBody<SealModelRequest>, ApiError>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let JsonBody(request) = body?;
    app.check_accepting()?;
    if request.shards.is_empty() || request.shards.len() > MAX_MODEL_SHARDS_PER_REQUEST {
        return Err(VramError::InvalidInput {
            field: "shards",
            reason: format!("1 to {MAX_MODEL_SHARDS_PER_REQUEST} shard ids are required"),
        }
        .into());
    }
    let ids = request
        .shards
        .iter()
        .map(|id| ShardId::new(id))
        .collect::<Result<Vec<_>, _>>()?;
    let id = match request.model_id.as_deref() {
        Some(id) => ShardId::new(id)?,
        None => ShardId::new(&ShardId::generate().as_str().replacen("shard-", "model-", 1))?,
    };
    let permit = app.permit().await?;
    let task_app = Arc::clone(&app);
    let entry = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        task_app.seal_model_blocking(id, &ids)
    })
    .await
    .map_err(|_| ApiError::internal("the model seal task failed"))??;
    Ok((StatusCode::CREATED, Json(model_view(&entry))))
}

/// `GET /v1/models`.
async fn list_models(State(app): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = app
        .models_snapshot()
        .iter()
        .map(|entry| model_view(entry))
        .collect();
    Json(json!({ "models": models }))
}

/// `GET /v1/models/{id}`.
async fn get_model(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = app.model(&id)?;
    Ok(Json(model_view(&entry)))
}

/// `POST /v1/models/{id}/verify`: every shard re-hashed where it lies, all GPUs at once.
async fn verify_model(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.check_accepting()?;
    let entry = app.model(&id)?;
    let permit = app.permit().await?;
    let task_app = Arc::clone(&app);
    let report = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        task_app.verify_model_blocking(&entry)
    })
    .await
    .map_err(|_| ApiError::internal("the model verification task failed"))??;
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Ok(Json(json!({
        "verified": true,
        "model_id": id,
        "model_ref": report.model_ref,
        "backend": app.manager.backend_kind(),
        "total_bytes": report.total_bytes,
        "elapsed_ns": nanos(report.elapsed),
        "shards": report.shards.iter().zip(0u32..).map(|(shard, index)| json!({
            "shard_index": index,
            "shard_id": shard.shard_id,
            "digest": shard.digest,
            "vram_bytes": shard.vram_bytes,
            "elapsed_ns": nanos(shard.elapsed),
        })).collect::<Vec<_>>(),
        "gpus": report.per_gpu.iter().map(|gpu| json!({
            "gpu": gpu.gpu,
            "shard_indices": gpu.shard_indices,
            "bytes": gpu.bytes,
            "elapsed_ns": nanos(gpu.elapsed),
        })).collect::<Vec<_>>(),
    })))
}

/// `POST /v1/models/{id}/attest`.
async fn attest_model(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<JsonBody<AttestRequest>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let JsonBody(request) = body?;
    let nonce = parse_nonce_hex(&request.nonce)?;
    app.check_accepting()?;
    let entry = app.model(&id)?;
    let permit = app.permit().await?;
    let task_app = Arc::clone(&app);
    let envelope = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        task_app.attest_model_blocking(&entry, &nonce)
    })
    .await
    .map_err(|_| ApiError::internal("the model attestation task failed"))??;
    Ok(Json(envelope.to_json()))
}

/// `DELETE /v1/models/{id}`: forgets the model seal; its shards stay resident (evict them with
/// `DELETE /v1/shards/{id}`).
async fn forget_model(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = ShardId::new(&id)?;
    if app.forget_model(&id) {
        Ok(Json(json!({ "model_id": id, "forgotten": true })))
    } else {
        Err(ApiError::model_not_found(id.as_str()))
    }
}

/// `DELETE /v1/shards/{id}`: allowed while stopped (freeing memory is always safe).
async fn evict(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = ShardId::new(&id)?;
    let task_app = Arc::clone(&app);
    let task_id = id.clone();
    let freed = tokio::task::spawn_blocking(move || task_app.evict_blocking(&task_id))
        .await
        .map_err(|_| ApiError::internal("the eviction task failed"))??;
    Ok(Json(json!({ "shard_id": id, "freed_bytes": freed })))
}

/// `GET /v1/worker`.
async fn worker(State(app): State<Arc<AppState>>) -> Json<Value> {
    let manager = &app.manager;
    let shards = app.snapshot();
    let devices: Vec<Value> = manager
        .devices()
        .iter()
        .map(|device| {
            let capacity = manager.capacity(device.index).ok();
            let on_device = shards
                .iter()
                .filter(|entry| entry.view.gpu_device == device.index)
                .count();
            json!({
                "index": device.index,
                "name": device.name,
                "uuid": vram_residency::shard::format_uuid(&device.uuid),
                "total_bytes": capacity.map(|c| c.total),
                "used_bytes": capacity.map(|c| c.used),
                "available_bytes": capacity.map(|c| c.available),
                "headroom_bytes": manager.config().headroom_bytes,
                "shards": on_device,
            })
        })
        .collect();
    let (state, reason) = match manager.state() {
        WorkerState::Running => ("running", None),
        WorkerState::Stopped { reason } => ("stopped", Some(reason)),
    };
    Json(json!({
        "state": state,
        "reason": reason,
        "backend": manager.backend_kind(),
        "version": env!("CARGO_PKG_VERSION"),
        "devices": devices,
        "shards": shards.len(),
        "max_model_bytes": manager.config().max_model_bytes,
        "sweep_interval_s": app.sweep_interval.as_secs_f64(),
        "transport": app.transport.name(),
        "key_id": manager.public_key().key_id(),
        "audit_head": manager.audit_head().map(|head| json!({
            "seq": head.seq,
            "hash": hex::encode(head.hash),
            "head": head.to_string(),
        })),
    }))
}

/// `GET /v1/identity` (no token: the key is public): the worker's Ed25519 public key, which verifies
/// its attestations and its audit log.
async fn identity(State(app): State<Arc<AppState>>) -> Json<Value> {
    let public = app.manager.public_key();
    Json(json!({
        "key_id": public.key_id(),
        "algorithm": "ed25519",
        "public_key_pem": public.to_pem(),
    }))
}

/// `GET /healthz` (no token): 200 while running, 503 once stopped. Says nothing else.
async fn healthz(State(app): State<Arc<AppState>>) -> Response {
    match app.manager.state() {
        WorkerState::Running => (StatusCode::OK, Json(json!({ "status": "running" }))),
        WorkerState::Stopped { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "stopped" })),
        ),
    }
    .into_response()
}

/// `GET /metrics` (observer or operator token, unless `--metrics-without-token`).
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let text = app.metrics.render(&app.manager, app.shard_count());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
