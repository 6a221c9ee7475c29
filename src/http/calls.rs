//! `/v1/calls`: place a call (`POST {to, from, trunk, script, data, timeout}` → 201 `{id}`),
//! list live calls with their state and duration (`GET`), one call (`GET /v1/calls/{id}`),
//! and hang one up (`DELETE /v1/calls/{id}` → 204).

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json as JsonBody,
};
use serde_json::{json, Value as Json};

use super::{ApiError, ApiState};
use crate::modules::originate::Originator;

fn originator(state: &ApiState) -> Result<Arc<dyn Originator>, ApiError> {
    state.calls.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SIP is not running here: configure a [[route]] (and a [[trunk]]) with [sip] enabled",
        )
    })
}

fn call_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("'{id}' is not a call id (a number from GET /v1/calls)"),
        )
    })
}

pub async fn place_call(State(state): State<Arc<ApiState>>, body: Bytes) -> Response {
    let o = match originator(&state) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let request: Json = match serde_json::from_slice(&body) {
        Ok(v @ Json::Object(_)) => v,
        Ok(_) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object {to, script, from?, trunk?, data?, timeout?}",
            )
            .into_response()
        }
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")).into_response()
        }
    };
    match o.originate(request).await {
        Ok(id) => (
            StatusCode::CREATED,
            JsonBody(json!({"id": id, "state": "calling"})),
        )
            .into_response(),
        Err((status, message)) => ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            message,
        )
        .into_response(),
    }
}

pub async fn list_calls(State(state): State<Arc<ApiState>>) -> Response {
    match originator(&state) {
        Ok(o) => JsonBody(o.list()).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn get_call(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let found = originator(&state).and_then(|o| {
        let id = call_id(&id)?;
        o.get(id)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no live call {id}")))
    });
    match found {
        Ok(c) => JsonBody(c).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn hang_up_call(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let done = originator(&state).and_then(|o| {
        let id = call_id(&id)?;
        if o.hang_up(id) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no live call {id}"),
            ))
        }
    });
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}
