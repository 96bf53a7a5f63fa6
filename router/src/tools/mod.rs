//! Tool calling, as vLLM serves it: `tools`, `tool_choice` and `parallel_tool_calls` are
//! validated (`request`), the tools reach the chat template, and the output is read back into
//! `message.tool_calls`: with `tool_choice: "auto"` by the `--tool_parser` format
//! (`formats`, `pythonic`), with `"required"` or a named function from the JSON a guided
//! schema holds the output to; streamed as OpenAI's tool-call deltas (`stream`).
//!
//! Not for: enforcing the schema (the worker's guided decoding), the HTTP shapes of the rest
//! of the response (`respond`).

pub mod bounded;
pub mod formats;
pub mod partial;
mod pythonic;
pub mod request;
pub mod stream;

pub use formats::Format;
pub use stream::{ToolMode, ToolStream};

/// The formats `--tool_parser` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolParser {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Qwen2.5, Qwen3, Hermes).
    #[value(name = "hermes")]
    Hermes,
    /// `{"name": ..., "parameters": ...}`, possibly after `<|python_tag|>` (Llama 3.1+).
    #[value(name = "llama3_json")]
    Llama3Json,
    /// `[TOOL_CALLS][{"name": ..., "arguments": ...}]` (Mistral).
    #[value(name = "mistral")]
    Mistral,
    /// `[f(a=1), g(b="x")]` (Llama 3.2 / 4 pythonic), parsed without evaluation.
    #[value(name = "pythonic")]
    Pythonic,
}

impl ToolParser {
    /// The output format this parser reads.
    pub fn format(self) -> Format {
        match self {
            Self::Hermes => Format::Hermes,
            Self::Llama3Json => Format::Llama3Json,
            Self::Mistral => Format::Mistral,
            Self::Pythonic => Format::Pythonic,
        }
    }
}

/// The `--tool_parser` flag of the router's HTTP front.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ToolArgs {
    /// Read tool calls out of chat output written in this model family's format, for
    /// requests with `tools` and `tool_choice` "auto" (the default when tools are given).
    /// Default: none; such requests are refused, while "required" and named tool choices
    /// work without a parser.
    #[arg(long = "tool_parser", value_enum, value_name = "NAME")]
    pub tool_parser: Option<ToolParser>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_parser_name_is_a_cli_error_listing_the_known_ones() {
        use clap::Parser;
        let args = ["llmapi-router", "/m", "--tool_parser", "llama3_json"];
        let parsed = crate::args::RouterArgs::try_parse_from(args).map(|a| a.config());
        assert_eq!(
            parsed.map(|c| c.tool_parser).ok(),
            Some(Some(ToolParser::Llama3Json))
        );
        let args = ["llmapi-router", "/m", "--tool_parser", "qwen"];
        let err = crate::args::RouterArgs::try_parse_from(args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for name in ["'qwen'", "hermes", "llama3_json", "mistral", "pythonic"] {
            assert!(err.contains(name), "{name}: {err}");
        }
    }
}
