//! `GET /v1/executions` and `GET /v1/cdrs`: records by time window (`from`, `to`: Unix
//! milliseconds), `limit` (default 100, at most 1000) and the `after` cursor of the last page.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json as JsonBody,
};

use super::{ApiError, ApiState};
use crate::store::{RecordQuery, Records};

fn parse_query(q: &HashMap<String, String>) -> Result<RecordQuery, ApiError> {
    let int = |key: &str| -> Result<Option<i64>, ApiError> {
        match q.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{key} must be an integer (Unix milliseconds for from/to), not '{v}'"),
                )
            }),
        }
    };
    if let Some(unknown) = q
        .keys()
        .find(|k| !matches!(k.as_str(), "from" | "to" | "limit" | "after"))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter '{unknown}': expected from, to, limit, after"),
        ));
    }
    let limit = int("limit")?;
    if limit.is_some_and(|l| l < 1) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit must be at least 1",
        ));
    }
    Ok(RecordQuery {
        from: int("from")?,
        to: int("to")?,
        limit: limit.map(|l| l.min(i64::from(u32::MAX)) as usize),
        after: int("after")?,
    })
}

fn records(state: &ApiState) -> Result<&Records, ApiError> {
    state.records.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "records are disabled ([records] enabled = false)",
        )
    })
}

fn store_failure(e: crate::store::StoreError) -> ApiError {
    tracing::error!("{e}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub async fn list_executions(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let query = parse_query(&q)?;
    let page = records(&state)?
        .executions(query)
        .await
        .map_err(store_failure)?;
    Ok(JsonBody(page).into_response())
}

pub async fn list_cdrs(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let query = parse_query(&q)?;
    let page = records(&state)?.cdrs(query).await.map_err(store_failure)?;
    Ok(JsonBody(page).into_response())
}
