//! Authentication of every call to a worker: the caller sends `authorization: Bearer
//! <secret>` metadata, the worker compares it in constant time with its own secret and answers
//! anything else with UNAUTHENTICATED.
//!
//! Both halves live here, beside the contract, so that the header's shape is written down
//! once: [`RequireToken`] is the worker's tonic interceptor, [`AttachToken`] the caller's.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key the secret travels in.
pub const AUTHORIZATION: &str = "authorization";

/// A secret that cannot travel in a header.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Empty secret.
    #[error("the worker token is empty; give a secret of at least 16 characters")]
    Empty,
    /// A character a header cannot carry.
    #[error(
        "the worker token contains a space, a control or a non-ASCII character; use printable ASCII, e.g. the output of `openssl rand -hex 32`"
    )]
    NotPrintable,
}

/// Checks that `token` can be sent as a bearer token (non-empty printable ASCII, no spaces).
pub fn check_token(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable);
    }
    Ok(())
}

/// The bearer token in `value` (`Bearer x`, the scheme in any case), if it has that shape.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = b"bearer ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    Some(value[scheme.len()..].trim_ascii())
}

/// The worker's interceptor: admits a call only when its bearer token equals the secret.
#[derive(Clone)]
pub struct RequireToken {
    secret: Arc<[u8]>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequireToken(<redacted>)")
    }
}

impl RequireToken {
    /// An interceptor that admits callers presenting `secret`.
    pub fn new(secret: &str) -> Result<Self, TokenError> {
        check_token(secret)?;
        Ok(Self {
            secret: Arc::from(secret.as_bytes()),
        })
    }

    /// Whether `value` (an `authorization` header) carries the secret. The comparison takes
    /// the same time wherever the first differing byte is.
    pub fn admits(&self, value: Option<&[u8]>) -> bool {
        value
            .and_then(bearer)
            .is_some_and(|t| bool::from(t.ct_eq(&self.secret)))
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let value = request
            .metadata()
            .get(AUTHORIZATION)
            .map(MetadataValue::as_bytes);
        if self.admits(value) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong worker token: send `authorization: Bearer <job secret>` \
                 (the router's --worker_token_file / LLMAPI_WORKER_TOKEN must equal the job's secret)",
            ))
        }
    }
}

/// The caller's interceptor: adds `authorization: Bearer <secret>` to every call (nothing
/// when built without a secret).
#[derive(Clone, Default)]
pub struct AttachToken {
    value: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for AttachToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.value.is_some() {
            "AttachToken(<redacted>)"
        } else {
            "AttachToken(none)"
        })
    }
}

impl AttachToken {
    /// Sends `secret` on every call, or nothing when `None`.
    pub fn new(secret: Option<&str>) -> Result<Self, TokenError> {
        let value = match secret {
            None => None,
            Some(s) => {
                check_token(s)?;
                let mut v = MetadataValue::try_from(format!("Bearer {s}"))
                    .map_err(|_| TokenError::NotPrintable)?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(Self { value })
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.value {
            request.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_secret_is_admitted_and_the_scheme_is_case_insensitive() {
        let check = RequireToken::new("s3cret-s3cret-s3cret").unwrap();
        assert!(check.admits(Some(b"Bearer s3cret-s3cret-s3cret")));
        assert!(check.admits(Some(b"bearer s3cret-s3cret-s3cret")));
        assert!(!check.admits(None));
        assert!(!check.admits(Some(b"s3cret-s3cret-s3cret")));
        assert!(!check.admits(Some(b"Bearer s3cret-s3cret-s3cre")));
        assert!(!check.admits(Some(b"Bearer s3cret-s3cret-s3cret-")));
        assert!(!check.admits(Some(b"Basic s3cret-s3cret-s3cret")));
        assert!(!check.admits(Some(b"Bearer ")));
    }

    #[test]
    fn secrets_a_header_cannot_carry_are_refused() {
        assert_eq!(RequireToken::new("").unwrap_err(), TokenError::Empty);
        assert_eq!(
            AttachToken::new(Some("a b")).unwrap_err(),
            TokenError::NotPrintable
        );
        assert_eq!(
            AttachToken::new(Some("é")).unwrap_err(),
            TokenError::NotPrintable
        );
    }

    #[test]
    fn the_caller_attaches_what_the_worker_admits() {
        let mut attach = AttachToken::new(Some("tok-tok-tok-tok-1")).unwrap();
        let request = attach.call(Request::new(())).unwrap();
        let check = RequireToken::new("tok-tok-tok-tok-1").unwrap();
        let mut check2 = check.clone();
        assert!(check2.call(request).is_ok());
        let unsent = AttachToken::default().call(Request::new(())).unwrap();
        let refused = check2.call(unsent).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
}
