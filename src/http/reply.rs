//! API error replies: `{"error": {"code", "message"}}` with the matching HTTP status.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::script::LoadError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        let status = match &e {
            LoadError::NotFound(_) => StatusCode::NOT_FOUND,
            LoadError::BadName(_) | LoadError::NotUtf8(_) | LoadError::Compile(_) => {
                StatusCode::BAD_REQUEST
            }
            LoadError::TooLarge { .. } | LoadError::TooMany(_) => StatusCode::PAYLOAD_TOO_LARGE,
            LoadError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{e}");
        }
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.status.as_u16(), "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}
