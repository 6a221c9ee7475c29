//! Operations endpoints: Prometheus `/metrics`, `POST /v1/admin/drain`, `POST /v1/admin/reload`.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use super::{ApiError, ApiState};

/// What the admin endpoints act on (the application implements it).
pub trait Admin: Send + Sync {
    /// Start draining: refuse new calls, let live ones finish, then exit.
    fn drain(&self);
    fn draining(&self) -> bool;
    /// Re-read the configuration file and apply routes, ACLs, users and trunks; on any error
    /// nothing changes and the reason is returned.
    fn reload(&self) -> Result<String, String>;
}

pub async fn metrics(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(token) = state.metrics_token.as_deref() {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !presented.is_some_and(|p| super::auth::same(p.as_bytes(), token.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "metrics need the [http] metrics_token",
            )
            .into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::metrics().render(),
    )
        .into_response()
}

fn admin(state: &ApiState) -> Result<&Arc<dyn Admin>, ApiError> {
    state.admin.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "no admin operations in this process",
        )
    })
}

pub async fn drain(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    admin(&state)?.drain();
    Ok((StatusCode::ACCEPTED, Json(json!({"draining": true}))).into_response())
}

pub async fn reload(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    match admin(&state)?.reload() {
        Ok(summary) => Ok(Json(json!({"reloaded": true, "summary": summary})).into_response()),
        Err(reason) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason)),
    }
}
