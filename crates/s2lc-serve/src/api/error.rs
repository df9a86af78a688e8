//! The API's error: a status and a message naming the problem, answered as OpenAI's JSON error
//! body `{"error": {"message", "type", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::cache::CacheError;
use crate::source::SourceError;

/// An API error: status, message, and for 429/503 how many seconds to wait before retrying.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
    /// `Retry-After` seconds, for overload answers.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 400 Bad Request.
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 500 for a failure that is the server's fault.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }

    /// Adds a `Retry-After` header of `seconds`.
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON body of the error.
    pub fn body(&self) -> serde_json::Value {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        json!({"error": {"message": self.message, "type": kind, "code": self.status.as_u16()}})
    }
}

impl From<SourceError> for ApiError {
    fn from(e: SourceError) -> Self {
        let status = match e {
            SourceError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SourceError::NotFound(_) => StatusCode::NOT_FOUND,
            SourceError::Unusable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            SourceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<CacheError<SourceError>> for ApiError {
    fn from(e: CacheError<SourceError>) -> Self {
        match e {
            CacheError::Load(e) => e.into(),
            e @ CacheError::OverBudget { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).retry_after(1)
            }
            e @ CacheError::Panicked(_) => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
