//! llmapi-bench: the serving benchmark client.
//!
//! A drop-in for TensorRT-LLM's `benchmark_serving.py`: the same flags and defaults, the same
//! metric definitions, console block and result JSON keys, against any OpenAI-compatible server
//! over HTTP/1.1 and server-sent events. Beyond the original: `sweep` runs a whole concurrency
//! sweep with CSV, Markdown and plots; a live progress bar with HDR-histogram percentiles; the
//! server's `/metrics` sampled during the run.
//!
//! Not for: serving, or anything that links the engine; it only needs the model's tokenizer.

pub mod app;
pub mod args;
pub mod client;
pub mod dataset;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod report;
pub mod runner;
pub mod server_metrics;
pub mod sse;
pub mod stats;
pub mod sweep;
pub mod tokenizer;
