//! llmapi-router: the OpenAI-compatible HTTP front of an llmapi cluster.
//!
//! It validates OpenAI requests, tokenizes them (tokenizer.json and the chat template), picks a
//! worker group by policy, relays token ids from the worker's gRPC stream back as text, one JSON
//! body or SSE, and keeps workers healthy (checks, retries, circuit breakers). Not for: tensors
//! or the engine (the router never links it), or process placement (the launcher's).

pub mod access;
pub mod admin;
pub mod admission;
pub mod args;
pub mod auth;
pub mod codec;
pub mod deadline;
pub mod detok;
pub mod discovery;
pub mod error;
pub mod fields;
pub mod front;
pub mod generate;
pub mod group;
pub mod guided;
pub mod handlers;
pub mod kv_index;
pub mod kv_routes;
pub mod kv_subscribe;
pub mod logit_bias;
pub mod metrics;
pub mod migrate;
pub mod openai;
pub mod parse;
pub mod policy;
pub mod pool;
pub mod reasoning;
pub mod registration;
pub mod respond;
pub mod responses;
pub mod server;
pub mod spans;
pub mod state;
pub mod testing;
pub mod tls;
pub mod tools;

pub use state::{AppState, RouterConfig};
