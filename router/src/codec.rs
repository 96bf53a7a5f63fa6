//! Text <-> token ids for the router: the model's tokenizer and chat template behind one trait,
//! so the HTTP layer can be tested with a byte-level double.

use std::path::Path;

use llmapi_common::chat_template::ChatTemplate;
use llmapi_common::tokenizer::Tokenizer;
use serde::Serialize;

/// One chat turn as the template sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTurn {
    /// system, user, assistant or tool.
    pub role: String,
    /// The text content (parts of a multi-part message are joined).
    pub content: String,
    /// An assistant's calls, arguments as objects (absent for the template when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The call a tool result answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The author's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the router needs from a tokenizer.
pub trait TextCodec: Send + Sync + 'static {
    /// Token ids of `text`; `add_special_tokens` adds BOS and the like.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;
    /// Text of `ids` with special tokens skipped; broken UTF-8 shows as U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// The prompt text for `turns`, ending with the assistant header; `tools` (the request's
    /// tool definitions) is the template's `tools` variable.
    fn render_chat(
        &self,
        turns: &[ChatTurn],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, String>;
    /// The model's tokenizer, when the codec has one (structured outputs compile against
    /// it: `guided::Validator`).
    fn tokenizer(&self) -> Option<&Tokenizer> {
        None
    }
}

/// The real codec: a model's tokenizer.json and its chat template.
pub struct HfCodec {
    tokenizer: Tokenizer,
    template: Result<ChatTemplate, String>,
}

impl HfCodec {
    /// Loads the tokenizer of `tokenizer` (a directory with tokenizer.json and
    /// tokenizer_config.json, or a tokenizer.json file; default: the model directory `dir`);
    /// `chat_template` (a file or inline Jinja) overrides the tokenizer directory's own
    /// (chat_template.jinja, tokenizer_config.json or chat_template.json: `TokenizerConfig::read`).
    pub fn load(
        dir: &Path,
        tokenizer: Option<&Path>,
        chat_template: Option<&str>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        use llmapi_common::model_dir::TokenizerConfig;
        let tok_path = tokenizer.unwrap_or(dir);
        // A .gguf file is a whole checkpoint, not a tokenizer.json: read as a directory is.
        let is_gguf = llmapi_common::gguf::is_gguf_file(tok_path);
        let (tokenizer, config) = if tok_path.is_file() && !is_gguf {
            let config = TokenizerConfig::default();
            let t = Tokenizer::with_config(tok_path, &config)
                .with_context(|| format!("loading tokenizer {}", tok_path.display()))?;
            (t, config)
        } else {
            let config = TokenizerConfig::read(tok_path)
                .with_context(|| format!("reading {}/tokenizer_config.json", tok_path.display()))?;
            let t = Tokenizer::from_dir(tok_path)
                .with_context(|| format!("loading the tokenizer of {}", tok_path.display()))?;
            (t, config)
        };
        let source = match chat_template {
            Some(t) if Path::new(t).is_file() => Some(
                std::fs::read_to_string(t).with_context(|| format!("reading chat template {t}"))?,
            ),
            Some(t) => Some(t.to_owned()),
            None => {
                if let Some(file) = &config.chat_template_file {
                    tracing::info!(file = %file.display(), "chat template");
                }
                config.chat_template.clone()
            }
        };
        let bos = tokenizer
            .bos()
            .map(|(t, _)| t.to_owned())
            .unwrap_or_default();
        let eos = tokenizer
            .eos()
            .map(|(t, _)| t.to_owned())
            .unwrap_or_default();
        let template = match source {
            Some(s) => ChatTemplate::new(&s, &bos, &eos).map_err(|e| e.to_string()),
            None => Err(llmapi_common::chat_template::ChatTemplateError::Missing.to_string()),
        };
        if let Err(e) = &template {
            tracing::warn!(error = %e, "chat completions are unavailable");
        }
        Ok(Self {
            tokenizer,
            template,
        })
    }
}

impl TextCodec for HfCodec {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| e.to_string())
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    fn render_chat(
        &self,
        turns: &[ChatTurn],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, String> {
        match &self.template {
            Ok(t) => t
                .render_with_tools(&turns, tools, true)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        }
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.tokenizer)
    }
}

/// Test double: every byte is one token (id = byte value), so multi-byte characters span
/// tokens; the chat template is `tools: <json>\n` when there are tools, `role: content\n`
/// per turn (an assistant's calls as JSON after the content) then `assistant:`.
pub struct ByteCodec;

impl TextCodec for ByteCodec {
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn render_chat(
        &self,
        turns: &[ChatTurn],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, String> {
        let mut s = String::new();
        if let Some(tools) = tools {
            s.push_str("tools: ");
            s.push_str(&serde_json::Value::from(tools.to_vec()).to_string());
            s.push('\n');
        }
        for t in turns {
            s.push_str(&t.role);
            s.push_str(": ");
            s.push_str(&t.content);
            if let Some(calls) = &t.tool_calls {
                s.push_str(&serde_json::Value::from(calls.clone()).to_string());
            }
            s.push('\n');
        }
        s.push_str("assistant:");
        Ok(s)
    }
}
