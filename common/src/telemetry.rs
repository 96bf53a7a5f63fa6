//! Logging setup shared by the binaries: `tracing` to stderr, levels named as trtllm-serve
//! names them, `RUST_LOG` taking precedence when set, text or JSON lines (`--log_format`), and
//! ANSI colours only on a terminal.

use std::io::IsTerminal;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::traces::Tracers;

/// The environment variable that selects the log format when no `--log_format` is given.
pub const LOG_FORMAT_ENV: &str = "LLMAPI_LOG_FORMAT";

/// How log lines are written (`--log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event; coloured only when stderr is a terminal and
    /// NO_COLOR is unset.
    #[default]
    Text,
    /// One JSON object per line with the event's fields and the fields of its spans
    /// (request_id, trace_id), for Loki, Elasticsearch or any log shipper.
    Json,
}

impl LogFormat {
    /// The format a binary logs in: the flag when given, else `LLMAPI_LOG_FORMAT`, else text.
    /// An unknown environment value is an error that names the variable.
    pub fn resolve(flag: Option<LogFormat>) -> Result<LogFormat, String> {
        if let Some(f) = flag {
            return Ok(f);
        }
        match std::env::var(LOG_FORMAT_ENV) {
            Ok(v) => Self::parse(&v)
                .ok_or_else(|| format!("{LOG_FORMAT_ENV}={v}: expected text or json")),
            Err(_) => Ok(LogFormat::Text),
        }
    }

    /// Parses `text` or `json` (any case).
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// The flag's spelling of this format.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `--log_level` and `--log_format` for the binaries whose flags are clap structs
/// (`llmapi-router`, `llmapi-bench`); `llmapi-launch serve` has them in its flag table.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// trace | debug | verbose | info | warning | error | internal_error (RUST_LOG overrides it)
    #[arg(long = "log_level", alias = "log-level", value_parser = LOG_LEVELS)]
    pub log_level: Option<String>,
    /// text | json: json writes one JSON object per line with request_id and trace_id, for log
    /// shippers (default: LLMAPI_LOG_FORMAT, else text; text has colours only on a terminal)
    #[arg(long = "log_format", alias = "log-format", value_enum)]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    /// Installs the subscriber, `default_level` when no `--log_level` is given.
    pub fn init(&self, default_level: &str) -> Result<(), String> {
        self.init_with(default_level, &Tracers::none())
    }

    /// `init`, with `tracers`' layers (`init_logging_with`).
    pub fn init_with(&self, default_level: &str, tracers: &Tracers) -> Result<(), String> {
        let format = LogFormat::resolve(self.log_format)?;
        let level = self.log_level.as_deref().unwrap_or(default_level);
        init_logging_with(level, format, tracers);
        Ok(())
    }
}

/// The `--log_level` values, trtllm-serve's names.
pub const LOG_LEVELS: [&str; 7] = [
    "trace",
    "debug",
    "verbose",
    "info",
    "warning",
    "error",
    "internal_error",
];

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

/// Whether text lines get ANSI colours: only on a terminal, and never with NO_COLOR set
/// (<https://no-color.org>), so a redirected log file holds no escape codes.
pub fn use_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber at `log_level` in `format`, with no traces. Calling it twice
/// is harmless: the second call does nothing.
pub fn init_logging(log_level: &str, format: LogFormat) {
    init_logging_with(log_level, format, &Tracers::none());
}

/// Installs the global subscriber: log lines at `log_level` in `format`, and `tracers`'
/// layers, which see their services' spans whatever the log level (`crate::traces`).
/// Calling it twice is harmless: the second call does nothing.
pub fn init_logging_with(log_level: &str, format: LogFormat, tracers: &Tracers) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(tracing_level(log_level)));
    let registry = tracing_subscriber::registry().with(tracers.layers());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(fmt.with_ansi(use_colour()).with_filter(filter))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_in_any_case_and_reject_others() {
        assert_eq!(LogFormat::parse("JSON"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("yaml"), None);
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        assert_eq!(
            LogFormat::resolve(Some(LogFormat::Json)),
            Ok(LogFormat::Json)
        );
    }
}
