//! The one error shape of the API: `{"error": {"code": "...", "message": "..."}}` with a status that
//! says what went wrong. `docs/service.md` has the table.

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use vram_residency::VramError;

use super::auth::Role;

/// An API error: HTTP status, a stable machine-readable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (send Authorization: Bearer <API token>)",
        )
    }

    /// A valid API token whose role may not call this route.
    pub fn forbidden(needed: Role, held: Role) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this route needs the {} role; the token presented has the {} role",
                needed.name(),
                held.name()
            ),
        )
    }

    pub fn shard_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "shard_not_found",
            format!("no shard {id:?} on this worker"),
        )
    }

    pub fn model_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "sealed_model_not_found",
            format!("no sealed model {id:?} on this worker"),
        )
    }

    pub fn duplicate_model(id: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "duplicate_model_id",
            format!("a sealed model {id:?} already exists on this worker"),
        )
    }

    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the worker is shutting down",
        )
    }

    pub fn body_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than the configured limit (--max-body)",
        )
    }

    /// The request body did not arrive whole within `--body-timeout` (answered with
    /// `Connection: close`: the rest of the body is never read).
    pub fn body_timeout(timeout: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} (--body-timeout)",
                humantime::format_duration(timeout)
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// A request body the JSON extractor refused: too large (413), not JSON (415), or malformed or
    /// with missing, unknown or mistyped fields (400).
    pub fn from_json_rejection(rejection: &JsonRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::body_too_large(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ),
            _ => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not a valid request: {}", rejection.body_text()),
            ),
        }
    }

    /// The metric label for this error (its code).
    pub const fn label(&self) -> &'static str {
        self.code
    }
}

/// The status and code of a core error (see the table in `docs/service.md`).
pub fn classify(error: &VramError) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match error {
        VramError::InvalidShardId { .. } => (S::BAD_REQUEST, "invalid_shard_id"),
        VramError::InvalidDigest { .. } => (S::BAD_REQUEST, "invalid_digest"),
        VramError::InvalidGpuIndex { .. } => (S::BAD_REQUEST, "invalid_gpu"),
        VramError::InvalidInput { .. } => (S::BAD_REQUEST, "invalid_field"),
        VramError::InvalidModelPath { .. } => (S::BAD_REQUEST, "invalid_model_path"),
        VramError::ModelNotFound { .. } => (S::NOT_FOUND, "model_not_found"),
        VramError::DuplicateShardId { .. } => (S::CONFLICT, "duplicate_shard_id"),
        VramError::EmptyModel => (S::UNPROCESSABLE_ENTITY, "empty_model"),
        VramError::MalformedModel(_) => (S::UNPROCESSABLE_ENTITY, "malformed_model"),
        VramError::ModelTooLarge { .. } => (S::UNPROCESSABLE_ENTITY, "model_too_large"),
        VramError::DigestMismatch { .. } => (S::UNPROCESSABLE_ENTITY, "digest_mismatch"),
        VramError::SourceChanged { .. } | VramError::HeaderChanged { .. } => {
            (S::UNPROCESSABLE_ENTITY, "source_changed")
        }
        VramError::InsufficientVram { .. } => (S::INSUFFICIENT_STORAGE, "insufficient_vram"),
        VramError::AllocationFailed { .. } => (S::INSUFFICIENT_STORAGE, "allocation_failed"),
        VramError::WorkerStopped { .. } => (S::SERVICE_UNAVAILABLE, "worker_stopped"),
        VramError::Audit { .. } => (S::SERVICE_UNAVAILABLE, "audit_unavailable"),
        VramError::ModelShardMissing { .. }
        | VramError::ModelShardDuplicated { .. }
        | VramError::ModelShardExtra { .. }
        | VramError::ModelShardMismatch { .. } => (S::CONFLICT, "model_shard_set"),
        // A shard of the model failed: answered as that failure (corruption, forgery, ...).
        VramError::ModelShardFailed { error, .. } => classify(error),
        VramError::SealForgery { .. } | VramError::ModelSealForgery { .. } => {
            (S::INTERNAL_SERVER_ERROR, "seal_forgery")
        }
        VramError::Corruption { .. } => (S::INTERNAL_SERVER_ERROR, "vram_corruption"),
        VramError::PolicyViolation { .. } => (S::INTERNAL_SERVER_ERROR, "policy_violation"),
        VramError::BackendUnavailable { .. } => (S::SERVICE_UNAVAILABLE, "backend_unavailable"),
        VramError::Io { .. } => (S::INTERNAL_SERVER_ERROR, "io_error"),
        _ => (S::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<vram_residency::ids::InvalidShardId> for ApiError {
    fn from(error: vram_residency::ids::InvalidShardId) -> Self {
        VramError::from(error).into()
    }
}

impl From<vram_residency::ids::InvalidDigest> for ApiError {
    fn from(error: vram_residency::ids::InvalidDigest) -> Self {
        VramError::from(error).into()
    }
}

impl From<VramError> for ApiError {
    fn from(error: VramError) -> Self {
        let (status, code) = classify(&error);
        let message = match &error {
            // Io errors name host paths; say what failed without them.
            VramError::Io { source, .. } => format!("reading the model failed: {source}"),
            other => other.to_string(),
        };
        Self::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.code == "body_timeout" {
            // The unread rest of the body would be taken for the next request: close.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vram-residency\""),
            );
        }
        response
    }
}
