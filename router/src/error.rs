//! OpenAI-style errors: every failure the router reports leaves as
//! `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answered to an HTTP client in OpenAI's shape.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status sent with the body.
    pub status: StatusCode,
    /// What went wrong and what to change.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// Seconds the client should wait before retrying, sent as `Retry-After` (429, 503).
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// The inner object of an OpenAI error body.
#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: u16,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after_s: None,
        }
    }

    /// The same error, telling the client to retry after `seconds` (`Retry-After`).
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// 400: a field is missing, has the wrong type or is out of range.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// 400 not tied to one field (bad JSON, for example).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401: missing or wrong API key / admin token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 403: the caller is known but may not do this (a worker host outside the allowlist).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// 409: the request conflicts with the router's state (the worker pool is full).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 404: unknown model or route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 413: the request body is larger than the router accepts.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than {limit} bytes; send less or raise --max_body_bytes"
            ),
        )
    }

    /// 429: admission control refused the request for now.
    pub fn too_many(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, message)
    }

    /// 503: no worker can take the request (none healthy, draining, or the worker failed).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// 504: the request ran past one of its deadlines (`--request_timeout`,
    /// `--first_token_timeout`).
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, message)
    }

    /// 500: a router bug.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The OpenAI `type` string for this status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            409 => "conflict_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            504 => "timeout_error",
            _ => "internal_server_error",
        }
    }

    /// The JSON body, also used as an SSE error event.
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind(),
                param: self.param.as_deref(),
                code: self.status.as_u16(),
            },
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body_json())).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
