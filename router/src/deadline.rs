//! Request deadlines: `--request_timeout` bounds a whole request, `--first_token_timeout` the
//! wait for its first token. Shared by `llmapi-router` and `llmapi-launch serve` (one
//! definition, flattened into both command lines, as `access` is).
//!
//! A request's clock starts when its handler admits it. The whole-request deadline travels to
//! the worker as the gRPC deadline (`grpc-timeout`), so the worker ends and frees a request
//! whose deadline passed even while the router is still connected; the router enforces both
//! deadlines itself too, since a stopped or stuck worker enforces nothing. A timeout answers
//! 504 (`ApiError::timeout`), or an in-band error event once a stream has begun.

use std::time::{Duration, Instant};

use crate::error::ApiError;
use crate::state::RouterConfig;

/// `--request_timeout`'s default in seconds: SGLang's router bounds a request at 1800 s by
/// default (`--request-timeout-secs`); vLLM and trtllm-serve bound none. Long enough for any
/// generation a default OpenAI client (600 s timeout) still waits for.
pub const DEFAULT_REQUEST_TIMEOUT_S: f64 = 1800.0;

/// `--first_token_timeout`'s default in seconds: the OpenAI SDKs' default read timeout (600
/// s), past which a default client has stopped waiting for the first byte.
pub const DEFAULT_FIRST_TOKEN_TIMEOUT_S: f64 = 600.0;

/// Deadline flags of the router's HTTP front.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadlineArgs {
    /// Seconds a whole request may take, queueing included; past it the request ends with
    /// 504 (an in-band error once streaming) and its worker request is aborted and its KV
    /// freed. Sent to workers as the gRPC deadline. 0: no limit.
    #[arg(long = "request_timeout", value_name = "SECONDS", default_value_t = DEFAULT_REQUEST_TIMEOUT_S, value_parser = seconds)]
    pub request_timeout: f64,
    /// Seconds a request may wait for its first token; past it the request ends with 504 and
    /// its worker request is aborted. 0: no limit (the request timeout still applies).
    #[arg(long = "first_token_timeout", value_name = "SECONDS", default_value_t = DEFAULT_FIRST_TOKEN_TIMEOUT_S, value_parser = seconds)]
    pub first_token_timeout: f64,
}

impl Default for DeadlineArgs {
    fn default() -> Self {
        Self {
            request_timeout: DEFAULT_REQUEST_TIMEOUT_S,
            first_token_timeout: DEFAULT_FIRST_TOKEN_TIMEOUT_S,
        }
    }
}

/// Parses a non-negative, finite number of seconds.
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds; give e.g. 30 or 2.5"))?;
    if !(0.0..=1e9).contains(&v) {
        return Err(format!(
            "{s} seconds is out of range; give 0 (no limit) up to 1e9"
        ));
    }
    Ok(v)
}

impl DeadlineArgs {
    /// The deadlines these flags describe.
    pub fn deadlines(&self) -> Deadlines {
        let limit = |s: f64| (s > 0.0).then(|| Duration::from_secs_f64(s));
        Deadlines {
            request: limit(self.request_timeout),
            first_token: limit(self.first_token_timeout),
        }
    }

    /// Writes the deadlines into `config`.
    pub fn apply(&self, config: &mut RouterConfig) {
        config.deadlines = self.deadlines();
    }
}

/// The configured limits; `None` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Whole request (`--request_timeout`).
    pub request: Option<Duration>,
    /// Until the first token (`--first_token_timeout`).
    pub first_token: Option<Duration>,
}

impl Default for Deadlines {
    fn default() -> Self {
        DeadlineArgs::default().deadlines()
    }
}

impl Deadlines {
    /// No limit at all.
    pub const NONE: Self = Self {
        request: None,
        first_token: None,
    };

    /// The deadlines of a request that starts now.
    pub fn start(&self) -> RequestDeadline {
        let now = Instant::now();
        RequestDeadline {
            request: self.request.map(|d| now + d),
            first_token: self.first_token.map(|d| now + d),
            limits: *self,
        }
    }
}

/// Which limit a request ran past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// `--request_timeout`.
    Request,
    /// `--first_token_timeout`.
    FirstToken,
}

/// One request's deadlines, as instants.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline {
    request: Option<Instant>,
    first_token: Option<Instant>,
    limits: Deadlines,
}

impl RequestDeadline {
    /// A request without deadlines.
    pub fn none() -> Self {
        Deadlines::NONE.start()
    }

    /// Time left of the whole request (zero once past), to send as the gRPC deadline; `None`
    /// when unlimited.
    pub fn remaining(&self) -> Option<Duration> {
        self.request
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The deadlines left once the first token has been sent: the whole request's only. A
    /// choice that moves to another worker mid-stream (`migrate`) waits for that worker's
    /// first token under these.
    pub fn after_first_token(&self) -> Self {
        Self {
            first_token: None,
            ..*self
        }
    }

    /// The whole request's deadline.
    pub fn whole(&self) -> Option<(Instant, Expired)> {
        self.request.map(|d| (d, Expired::Request))
    }

    /// The earlier of the two deadlines: what the wait for the first token is bounded by.
    pub fn first_token(&self) -> Option<(Instant, Expired)> {
        match (self.first_token, self.request) {
            (Some(f), Some(r)) if r <= f => Some((r, Expired::Request)),
            (Some(f), _) => Some((f, Expired::FirstToken)),
            (None, Some(r)) => Some((r, Expired::Request)),
            (None, None) => None,
        }
    }

    /// The 504 a request gets for running past `which`, naming the flag to raise.
    pub fn error(&self, which: Expired) -> ApiError {
        let secs = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
        match which {
            Expired::Request => ApiError::timeout(format!(
                "the request ran past --request_timeout ({} s); ask for fewer tokens (max_tokens), \
                 retry, or raise the router's --request_timeout",
                secs(self.limits.request)
            )),
            Expired::FirstToken => ApiError::timeout(format!(
                "no token arrived within --first_token_timeout ({} s): the workers are overloaded \
                 or stuck; retry later, or raise the router's --first_token_timeout",
                secs(self.limits.first_token)
            )),
        }
    }
}

/// Waits until `deadline` (forever when `None`) and says which limit it was.
pub async fn expiry(deadline: Option<(Instant, Expired)>) -> Expired {
    match deadline {
        Some((at, which)) => {
            tokio::time::sleep_until(at.into()).await;
            which
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_limit_and_bad_values_name_the_range() {
        let d = DeadlineArgs {
            request_timeout: 0.0,
            first_token_timeout: 2.5,
        }
        .deadlines();
        assert_eq!(d.request, None);
        assert_eq!(d.first_token, Some(Duration::from_millis(2500)));
        assert!(seconds("-1").unwrap_err().contains("out of range"));
        assert!(seconds("soon").unwrap_err().contains("not a number"));
        assert_eq!(seconds("30"), Ok(30.0));
    }

    #[test]
    fn the_first_token_wait_ends_at_the_earlier_deadline() {
        let both = Deadlines {
            request: Some(Duration::from_secs(1)),
            first_token: Some(Duration::from_secs(5)),
        }
        .start();
        assert_eq!(both.first_token().map(|d| d.1), Some(Expired::Request));
        let first = Deadlines {
            request: Some(Duration::from_secs(9)),
            first_token: Some(Duration::from_secs(5)),
        }
        .start();
        assert_eq!(first.first_token().map(|d| d.1), Some(Expired::FirstToken));
        assert_eq!(
            first.after_first_token().first_token().map(|d| d.1),
            Some(Expired::Request),
            "after the first token only the whole request's deadline is left"
        );
        assert!(RequestDeadline::none().first_token().is_none());
        assert!(RequestDeadline::none().remaining().is_none());
        let e = first.error(Expired::FirstToken);
        assert_eq!(e.status.as_u16(), 504);
        assert!(e.message.contains("--first_token_timeout (5 s)"));
    }
}
