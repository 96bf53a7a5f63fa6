//! llmapi-common: what every llmapi binary shares.
//!
//! The `LlmArgs` configuration model and its sources (CLI flags, YAML, `--set`), Hugging Face
//! model directories, the tokenizer and chat templates, the built-in checkpoint writer, secret
//! files, logging setup and request traces (OpenTelemetry spans, W3C trace context in headers
//! and gRPC metadata). Not for: tensors, serving HTTP or gRPC.

pub mod args;
pub mod block_hash;
pub mod chat_template;
pub mod checkpoint;
pub mod config_keys;
pub mod generation_config;
pub mod gguf;
pub mod guided;
pub mod model_config;
pub mod model_dir;
pub mod net;
pub mod secret_file;
pub mod telemetry;
pub mod tokenizer;
pub mod traces;
