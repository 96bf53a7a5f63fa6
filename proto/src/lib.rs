//! The worker gRPC contract: `proto/worker.proto` compiled to Rust.
//!
//! This crate is the one written-down protocol between the router and a worker group's
//! leader. It carries token ids only; it knows nothing of HTTP, tokenizers or tensors.

pub mod auth;
pub mod tls;

/// `llmapi.worker.v1`: messages plus the generated client and server.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("llmapi.worker.v1");
}

/// Limits both ends of the contract apply, written down once.
pub mod limits {
    /// Largest gRPC message either end encodes or decodes: 64 MiB. tonic's default decode
    /// limit (4 MiB) is too small for echo + logprobs on a long prompt (about 150 bytes per
    /// prompt token with 20 alternatives), whose first response carries every prompt token's
    /// logprobs.
    pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
    /// Most stop strings one request may carry; OpenAI allows 4, vLLM does not bound them.
    /// The router scans the text for each one at every step.
    pub const MAX_STOP_STRINGS: usize = 16;
    /// Longest stop string, in bytes of UTF-8.
    pub const MAX_STOP_STRING_BYTES: usize = 256;
    /// Most `stop_token_ids` one request may carry; the worker checks every sampled token
    /// against them.
    pub const MAX_STOP_TOKEN_IDS: usize = 256;
    /// Most `logit_bias` entries one request may carry (vLLM's default cap); the worker adds
    /// each one to every logits row of the request.
    pub const MAX_LOGIT_BIAS: usize = 300;
    /// Largest `logit_bias` value either way (OpenAI's range is [-100, 100]).
    pub const MAX_LOGIT_BIAS_VALUE: f32 = 100.0;
}
