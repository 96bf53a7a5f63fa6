//! The worker gRPC contract: `proto/worker.proto` compiled to Rust.
//!
//! This crate is the one written-down protocol between the router and a worker group's
//! leader. It carries token ids only; it knows nothing of HTTP, tokenizers or tensors.

pub mod auth;

/// `llmapi.worker.v1`: messages plus the generated client and server.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("llmapi.worker.v1");
}
