//! Who may call what: the bearer secrets of the HTTP front and the tower layers that check
//! them.
//!
//! Three secrets guard three groups of routes (the router's `server::app` puts each route in
//! its group, so a new route lands behind a layer instead of relying on a call in its handler):
//! the API key guards every route but `/health`; `/metrics` takes the metrics key or the API
//! key; `POST/DELETE /workers` take the admin token only. Keys are compared in time that
//! depends on the presented value's length only, never on the secret.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::error::ApiError;
use crate::state::AppState;

/// A bearer secret (API key, metrics key or admin token). Never empty; `Debug` does not show
/// it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

/// A secret that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {what} is empty; give a non-empty value or leave it unset")]
pub struct EmptySecret {
    /// Which secret, as the message names it (e.g. "API key").
    pub what: &'static str,
}

impl Secret {
    /// `value` as a secret; refuses an empty one (which would either lock every client out or,
    /// worse, be mistaken for "no key").
    pub fn new(what: &'static str, value: impl AsRef<[u8]>) -> Result<Self, EmptySecret> {
        let bytes = value.as_ref();
        if bytes.is_empty() {
            return Err(EmptySecret { what });
        }
        Ok(Self(bytes.into()))
    }

    /// Whether `given` equals this secret. Runs one constant-time byte comparison per byte of
    /// `given` (cycling over the secret) plus a constant-time length check, so its time tells
    /// an attacker neither the secret's bytes nor its length.
    pub fn matches(&self, given: &[u8]) -> bool {
        let secret = &self.0;
        let len = secret.len() as u64;
        let mut equal = (given.len() as u64).ct_eq(&len);
        let mut at = 0u64;
        for g in given {
            // `at < len` always holds: it is reset to 0 whenever it reaches len.
            let s = secret.get(at as usize).copied().unwrap_or_default();
            equal &= g.ct_eq(&s);
            at += 1;
            at.conditional_assign(&0, at.ct_eq(&len));
        }
        equal.into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The token of an `Authorization: Bearer TOKEN` header. The scheme is matched without regard
/// to case (RFC 9110 §11.1) and any number of spaces may separate it from the token.
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether the request carries one of `accepted`.
fn presents(headers: &HeaderMap, accepted: &[&Secret]) -> bool {
    let Some(token) = bearer_token(headers) else {
        return false;
    };
    // Every accepted secret is compared, so the time does not tell which one nearly matched.
    accepted.iter().fold(false, |any, s| s.matches(token) | any)
}

/// A 401 in OpenAI's error shape with `WWW-Authenticate: Bearer`.
fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::unauthorized(message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Layer of the API routes: with `--api_key` set, the request must carry it.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match &state.config.api_key {
        Some(key) if !presents(req.headers(), &[key]) => unauthorized(
            "missing or wrong API key; send Authorization: Bearer <the router's API key>",
        ),
        _ => next.run(req).await,
    }
}

/// Layer of `/metrics`: the metrics key or the API key, whichever are set; open when neither
/// is.
pub async fn require_metrics_key(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let accepted: Vec<&Secret> = [&state.config.metrics_api_key, &state.config.api_key]
        .into_iter()
        .flatten()
        .collect();
    if accepted.is_empty() || presents(req.headers(), &accepted) {
        next.run(req).await
    } else {
        unauthorized(
            "missing or wrong key for /metrics; send Authorization: Bearer <the metrics key or the API key>",
        )
    }
}

/// Layer of the pool's admin routes: the admin token or the job secret; without either,
/// registration is off.
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let config = &state.config;
    let accepted: Vec<&Secret> = [&config.admin_token, &config.job_token]
        .into_iter()
        .flatten()
        .collect();
    if accepted.is_empty() {
        unauthorized(
            "worker registration is disabled; start the router with an admin token (--admin_token_file or LLMAPI_ADMIN_TOKEN)",
        )
    } else if presents(req.headers(), &accepted) {
        next.run(req).await
    } else {
        unauthorized(
            "missing or wrong admin token; send Authorization: Bearer <the router's admin token>",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new("test key", s).expect("non-empty")
    }

    #[test]
    fn a_secret_matches_only_itself() {
        let k = secret("sk-abc");
        assert!(k.matches(b"sk-abc"));
        for wrong in [
            &b""[..],
            b"sk-ab",
            b"sk-abd",
            b"sk-abcsk-abc",
            b"sk-abc ",
            b"SK-ABC",
        ] {
            assert!(!k.matches(wrong), "{:?}", String::from_utf8_lossy(wrong));
        }
        // A value that equals the secret over the cycled positions is still wrong by length.
        assert!(!secret("aa").matches(b"aaaa"));
    }

    #[test]
    fn an_empty_secret_is_refused() {
        assert_eq!(
            Secret::new("API key", "").unwrap_err().to_string(),
            "the API key is empty; give a non-empty value or leave it unset"
        );
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        assert!(!format!("{:?}", secret("sk-visible")).contains("visible"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        for (value, token) in [
            ("Bearer k1", Some(&b"k1"[..])),
            ("bearer k1", Some(b"k1")),
            ("BEARER   k1 ", Some(b"k1")),
            ("Basic k1", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearerk1", None),
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(bearer_token(&h), token, "{value:?}");
        }
    }
}
