//! Request migration: a choice whose worker fails after the first token (the connection is
//! reset, the worker process is killed, its engine fails) moves to another healthy worker,
//! which continues it from the tokens already streamed, and the client's response goes on as
//! one: the same SSE stream or the same JSON body. Shared by `llmapi-router` and
//! `llmapi-launch serve` (one flag definition, flattened into both command lines).
//!
//! The next worker gets the original request (prompt, max_tokens, stop conditions, sampling)
//! plus `generated_token_ids`, the tokens streamed so far: it computes them after the prompt
//! and counts them as generated (max_tokens, min_tokens, penalties, usage), and a seeded
//! sampler continues its random stream after their draws. The router's detokenizer and stop
//! string matcher carry on across the seam, so text, stop strings, logprobs, usage and
//! finish_reason are those of an undisturbed run. Request faults (4xx: a request that can
//! never fit, a full queue) never migrate; only worker faults do, at most `--max_migrations`
//! times per choice. Not for: failures before the first token (`generate`'s retries).

use llmapi_proto::v1::GenerateRequest;

/// `--max_migrations`' default: Dynamo's default migration limit.
pub const DEFAULT_MAX_MIGRATIONS: u32 = 3;

/// The migration flag of the router's HTTP front.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrationArgs {
    /// Times one choice may move to another worker when its worker fails after the first
    /// token (the new worker continues from the tokens already streamed; the client sees one
    /// uninterrupted response). Past it, or with no other healthy worker, the stream ends
    /// with an in-band error. 0: never migrate.
    #[arg(long = "max_migrations", value_name = "N", default_value_t = DEFAULT_MAX_MIGRATIONS)]
    pub max_migrations: u32,
}

impl Default for MigrationArgs {
    fn default() -> Self {
        Self {
            max_migrations: DEFAULT_MAX_MIGRATIONS,
        }
    }
}

/// How a worker failed a stream mid-way: the `cause` label of
/// `llmapi_router_migrations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// The call ended with an error status: the connection was reset or refused (a killed
    /// process), or the worker reported a failure of its own (UNAVAILABLE, INTERNAL).
    StreamError,
    /// The worker closed the stream without finishing the request.
    StreamEnded,
    /// The worker went silent for a keep-alive interval and the connection's keep-alive
    /// check ended the call (a stopped process, a cut link).
    Unresponsive,
}

impl Cause {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Cause::StreamError => "stream_error",
            Cause::StreamEnded => "stream_ended",
            Cause::Unresponsive => "unresponsive",
        }
    }
}

/// The request that continues `original` on another worker after `generated` tokens (all of
/// them, from every worker so far) were streamed: the same request (prompt, max_tokens, stop
/// conditions, sampling, seed) with the tokens carried over. The prompt's logprobs, already sent with the first token, are not
/// asked for again.
pub fn resume_request(original: &GenerateRequest, generated: &[u32]) -> GenerateRequest {
    let mut request = original.clone();
    request.generated_token_ids = generated.to_vec();
    if let Some(s) = request.sampling.as_mut() {
        s.prompt_logprobs = false;
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmapi_proto::v1::{SamplingParams, StoppingParams};

    #[test]
    fn a_resumed_request_is_the_original_with_its_tokens_and_no_prompt_logprobs() {
        let original = GenerateRequest {
            request_id: "cmpl-1-0".into(),
            prompt_token_ids: vec![1, 2, 3],
            sampling: Some(SamplingParams {
                temperature: 0.7,
                seed: Some(9),
                logprobs: Some(2),
                prompt_logprobs: true,
                ..SamplingParams::default()
            }),
            stopping: Some(StoppingParams {
                max_tokens: 50,
                min_tokens: 4,
                stop_token_ids: vec![7],
                ..StoppingParams::default()
            }),
            ..GenerateRequest::default()
        };
        let r = resume_request(&original, &[10, 11]);
        assert_eq!(r.generated_token_ids, vec![10, 11]);
        assert_eq!(r.prompt_token_ids, original.prompt_token_ids);
        assert_eq!(
            r.stopping, original.stopping,
            "max_tokens counts the carried tokens"
        );
        let s = r.sampling.unwrap_or_default();
        assert_eq!(s.seed, Some(9));
        assert_eq!(s.logprobs, Some(2));
        assert!(!s.prompt_logprobs);
    }
}
