//! The HTTP API (axum): run scripts, forms and drivers; manage scripts; records; health.

mod admin;
mod auth;
mod calls;
pub mod listener;
pub mod percore;
mod records;
mod reply;

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, DefaultBodyLimit, Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json as JsonBody, Router,
};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::{
    script::{Engine, Invocation, LoadError, Mode, ScriptLibrary},
    store::{now_ms, ExecutionRecord, Records},
};

pub use admin::Admin;
pub use reply::ApiError;

/// What the handlers share.
pub struct ApiState {
    pub engine: Arc<Engine>,
    /// Class4 runs go to the routing workers (see `App::routing`).
    pub routing: Arc<Engine>,
    pub library: Arc<ScriptLibrary>,
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// Every run is recorded here before it is answered; `None` when records are disabled.
    pub records: Option<Records>,
    /// The voice layer for `/v1/calls` (attached when SIP starts).
    pub calls: crate::modules::originate::OriginatorSlot,
    /// Drain and reload (`/v1/admin/*`); `None` answers 501.
    pub admin: Option<Arc<dyn Admin>>,
    /// Serve `/metrics`, behind this bearer token when one is set.
    pub metrics: bool,
    pub metrics_token: Option<String>,
}

/// The API's routes; `/healthz` is open, `/v1/*` needs the bearer token when one is set.
pub fn router(state: Arc<ApiState>) -> Router {
    let v1 = Router::new()
        .route("/v1/run/{script}", post(run_script))
        .route("/v1/forms/{script}", post(submit_form))
        .route("/v1/drivers/{script}/{function}", post(call_driver))
        .route("/v1/scripts", get(list_scripts))
        .route("/v1/admin/drain", post(admin::drain))
        .route("/v1/admin/reload", post(admin::reload))
        .route("/v1/executions", get(records::list_executions))
        .route("/v1/cdrs", get(records::list_cdrs))
        .route("/v1/calls", get(calls::list_calls).post(calls::place_call))
        .route(
            "/v1/calls/{id}",
            get(calls::get_call).delete(calls::hang_up_call),
        )
        .route(
            "/v1/scripts/{name}",
            get(get_script).put(put_script).delete(delete_script),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let mut open = Router::new().route("/healthz", get(healthz));
    if state.metrics {
        open = open.route("/metrics", get(admin::metrics));
    }
    open.merge(v1)
        // Our own limit check answers with a JSON 413; axum's default 2 MiB cap is lifted so
        // the configured one is the one that counts.
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<ApiState>>) -> Response {
    // A load balancer's health check takes the engine out of rotation while it drains.
    if state.admin.as_ref().is_some_and(|a| a.draining()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            JsonBody(json!({"status": "draining", "workers": state.engine.workers()})),
        )
            .into_response();
    }
    JsonBody(json!({"status": "ok", "workers": state.engine.workers()})).into_response()
}

#[derive(Debug, Deserialize)]
struct RunQuery {
    mode: Option<String>,
    #[serde(rename = "fn")]
    function: Option<String>,
}

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than the {limit}-byte limit"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
        }
    })
}

fn parse_json(bytes: &[u8]) -> Result<Json, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))
}

async fn execute(
    state: &ApiState,
    name: &str,
    mode: Mode,
    data: Json,
    function: Option<String>,
) -> Result<Response, ApiError> {
    let started_at = now_ms();
    let script = state.library.get(name)?;
    let data = match state.library.vars(name) {
        Ok(Some(vars)) => crate::script::vars::merge(data, &vars),
        Ok(None) => data,
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            ))
        }
    };
    let mut inv = Invocation::new(script, mode, data);
    inv.function = function.clone();
    // A class4 run asked for on a routing worker (thread-per-core serving, see `percore`)
    // runs on that worker; any other goes to its engine's least busy worker.
    let out = if mode == Mode::Class4 {
        state.routing.run_here_first(inv).await
    } else {
        state.engine.run(inv).await
    }
    .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let duration_us = out.duration.as_micros() as u64;
    // The answer is serialized first, so the result can then move into the record instead of
    // being copied (it was cloned twice, and the copies freed on other threads).
    let (status, error, result) = match out.result {
        Ok(result) => (StatusCode::OK, None, Some(result)),
        Err(e) => {
            tracing::debug!(script = name, code = e.code, "script error: {}", e.message);
            (StatusCode::UNPROCESSABLE_ENTITY, Some(e), None)
        }
    };
    let body = serde_json::to_vec(&RunAnswer {
        duration_us,
        error: error.as_ref(),
        logs: &out.logs,
        result: result.as_ref(),
    })
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(records) = &state.records {
        // Committed before the answer leaves: a crash after a reply never loses its record.
        let record = ExecutionRecord {
            id: 0,
            started_at,
            script: name.to_string(),
            mode: mode.to_string(),
            function,
            duration_us,
            ok: error.is_none(),
            code: error.as_ref().map(|e| e.code),
            message: error.map(|e| e.message),
            result,
        };
        if let Err(e) = records.write_execution(record).await {
            tracing::error!(script = name, "cannot write the execution record: {e}");
        }
    }
    Ok((
        status,
        [(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// A run's answer: `{"result"|"error", "logs", "duration_us"}`. Fields in the order of the
/// `json!` map this replaced (keys sorted), so the bytes on the wire did not change.
#[derive(serde::Serialize)]
struct RunAnswer<'a> {
    duration_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a crate::script::ScriptError>,
    logs: &'a [crate::script::LogLine],
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Json>,
}

async fn run_script(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<RunQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mode = match q.mode.as_deref() {
        None | Some("") => Mode::App,
        Some(m) => m
            .parse::<Mode>()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?,
    };
    if mode == Mode::Class5 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "class5 scripts run on calls, not over HTTP",
        ));
    }
    let data = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    execute(&state, &name, mode, data, q.function).await
}

async fn submit_form(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, state.max_body_bytes)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let data = if content_type.starts_with("application/x-www-form-urlencoded") {
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("malformed form body: {e}"))
        })?;
        // A field sent several times (checkboxes) becomes an array.
        let mut map: BTreeMap<String, Json> = BTreeMap::new();
        for (k, v) in fields {
            match map.get_mut(&k) {
                None => {
                    map.insert(k, Json::String(v));
                }
                Some(Json::Array(items)) => items.push(Json::String(v)),
                Some(existing) => {
                    let first = existing.take();
                    *existing = Json::Array(vec![first, Json::String(v)]);
                }
            }
        }
        serde_json::to_value(map).unwrap_or_default()
    } else {
        parse_json(&bytes)?
    };
    execute(&state, &name, Mode::Form, data, None).await
}

async fn call_driver(
    State(state): State<Arc<ApiState>>,
    Path((name, function)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let data = parse_json(&body_bytes(body, state.max_body_bytes)?)?;
    execute(&state, &name, Mode::Driver, data, Some(function)).await
}

async fn list_scripts(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let scripts = state.library.list()?;
    Ok(JsonBody(json!({ "scripts": scripts })).into_response())
}

async fn get_script(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let source = state.library.source(&name)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/javascript; charset=utf-8",
        )],
        source,
    )
        .into_response())
}

async fn put_script(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, state.max_body_bytes)?;
    let source = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "script is not valid UTF-8"))?;
    let library = state.library.clone();
    let name_for_put = name.clone();
    let script = tokio::task::spawn_blocking(move || library.put(&name_for_put, &source))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    tracing::info!(script = %name, id = %script.id, "script uploaded");
    Ok((
        StatusCode::OK,
        JsonBody(json!({"name": script.name, "id": script.id, "driver": script.is_driver})),
    )
        .into_response())
}

async fn delete_script(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if state.library.delete(&name)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(LoadError::NotFound(name).into())
    }
}
