//! llmapi-worker: the inference engine and the worker gRPC service.
//!
//! The engine (`engine`) loads a Hugging Face checkpoint, keeps a paged KV cache, batches
//! requests iteration by iteration and samples tokens. The service (`service`) exposes it over
//! the gRPC contract in `llmapi-proto`. Not for: HTTP, tokenization or chat templates (the
//! router's), or process placement (the launcher's).

pub mod backend;
pub mod dist;
pub mod engine;
pub mod kv;
pub mod kv_feed;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod spans;
pub mod spec;
