//! Logging setup shared by the binaries: `tracing` to stderr, levels named as trtllm-serve
//! names them, `RUST_LOG` taking precedence when set, JSON lines on request.

use tracing_subscriber::EnvFilter;

/// Maps a trtllm-serve `--log_level` to a `tracing` level name.
pub fn tracing_level(log_level: &str) -> &'static str {
    match log_level {
        "trace" => "trace",
        "debug" | "verbose" => "debug",
        "warning" => "warn",
        "error" | "internal_error" => "error",
        _ => "info",
    }
}

/// Installs the global subscriber. `json` selects JSON lines (also via LLMAPI_LOG_FORMAT=json).
/// Calling it twice is harmless: the second call does nothing.
pub fn init_logging(log_level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(tracing_level(log_level)));
    let json = json || std::env::var("LLMAPI_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
