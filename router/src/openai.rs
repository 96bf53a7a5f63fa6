//! OpenAI request bodies for /v1/completions and /v1/chat/completions, and their validation
//! into the worker's sampling and stopping parameters.

use serde::Deserialize;

use crate::error::ApiError;
use crate::logit_bias::LogitBias;
use llmapi_common::generation_config::SamplingDefaults;
use llmapi_proto::limits::{MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS};
use llmapi_proto::v1::{SamplingParams, StoppingParams};

/// `prompt`: a string, strings, token ids, or lists of token ids. Read by
/// `parse::completion_request`, which counts prompts and tokens against the request caps as
/// it goes instead of buffering the value first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// Several text prompts (one choice set each).
    Texts(Vec<String>),
    /// One pre-tokenized prompt.
    Ids(Vec<u32>),
    /// Several pre-tokenized prompts.
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list (read without serde's untagged buffering: `parse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to `MAX_STOP_STRINGS` stop strings (OpenAI allows four).
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stream_options`; an option this server does not implement is refused by name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with usage and no choices.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    /// Served model name (or the model path, or its last component).
    pub model: String,
    /// Sampling temperature, 0..=2; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling, (0, 1].
    pub top_p: Option<f32>,
    /// Top-k; 0 or -1 disables.
    pub top_k: Option<i64>,
    /// Min-p, 0..=1.
    pub min_p: Option<f32>,
    /// Choices per prompt.
    pub n: Option<u32>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Token ids that end generation.
    pub stop_token_ids: Option<Vec<u32>>,
    /// Sampling seed.
    pub seed: Option<i64>,
    /// -2..=2.
    pub presence_penalty: Option<f32>,
    /// -2..=2.
    pub frequency_penalty: Option<f32>,
    /// > 0; 1 disables.
    pub repetition_penalty: Option<f32>,
    /// Keep generating past EOS.
    pub ignore_eos: Option<bool>,
    /// Tokens generated before EOS or stop ids may end the request.
    pub min_tokens: Option<u32>,
    /// Stream as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End-user id (logged only).
    pub user: Option<String>,
    /// Token id (a JSON string key) to a bias added to its logit, in [-100, 100].
    pub logit_bias: Option<LogitBias>,
    /// The structured-output constraint (`guided::read`, set by `parse`).
    #[serde(skip)]
    pub guided: Option<crate::guided::Guided>,
}

/// POST /v1/completions, as `parse::completion_request` reads it.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// Shared fields.
    pub common: CommonFields,
    /// The prompt(s).
    pub prompt: Option<Prompt>,
    /// Tokens to generate (default 16).
    pub max_tokens: Option<u32>,
    /// Number of top logprobs per token (0..=20).
    pub logprobs: Option<u32>,
    /// Prepend the prompt to the completion.
    pub echo: Option<bool>,
    /// Choices generated per prompt (>= n); the n with the highest cumulative logprob are
    /// returned.
    pub best_of: Option<u32>,
}

/// Content of a chat message: a string or a list of parts (read without serde's untagged
/// buffering: `parse`).
#[derive(Debug, Clone)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// system, developer, user, assistant or tool.
    pub role: String,
    /// The content; may be null for assistant tool calls.
    pub content: Option<Content>,
    /// An assistant's earlier calls (`tools::request::chat_turns` checks them).
    #[serde(default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call id.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The author's name (a tool result's function name).
    #[serde(default)]
    pub name: Option<String>,
}

/// POST /v1/chat/completions, as `parse::chat_request` reads it.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// Shared fields.
    pub common: CommonFields,
    /// The conversation.
    pub messages: Option<Vec<ChatMessage>>,
    /// Deprecated name of max_completion_tokens.
    pub max_tokens: Option<u32>,
    /// Tokens to generate (default: the rest of the context).
    pub max_completion_tokens: Option<u32>,
    /// Return logprobs of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Number of alternatives per token (0..=20), requires logprobs.
    pub top_logprobs: Option<u32>,
    /// Extension (trtllm-serve's): the whole prompt as token ids, used as is instead of
    /// rendering `messages` (which must then be empty or absent). benchmark_serving.py's
    /// `--tokenize-on-client` sends it.
    pub prompt_token_ids: Option<Vec<u32>>,
    /// `tools`, `tool_choice`, `parallel_tool_calls` (`tools::request`).
    pub tools: crate::tools::request::ToolFields,
}

/// The most choices one request may ask for.
pub const MAX_N: u32 = 16;
/// The most top logprobs per token.
pub const MAX_LOGPROBS: u32 = 20;

/// Validated generation settings, shared by all choices of a request.
#[derive(Debug, Clone)]
pub struct GenSettings {
    /// Worker sampling parameters.
    pub sampling: SamplingParams,
    /// Worker stopping parameters, except max_tokens (set per prompt).
    pub stopping: StoppingParams,
    /// Stop strings, matched by the router.
    pub stop: Vec<String>,
    /// Choices generated per prompt: `n`, or a completion's `best_of`.
    pub n: u32,
    /// Choices returned per prompt (the request's `n`): the `keep` of each prompt's `n`
    /// generated choices with the highest cumulative logprob, all of them when equal.
    pub keep: u32,
    /// Stream or not.
    pub stream: bool,
    /// Add a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// max_tokens for a request that sets none, from generation_config.json's
    /// `max_new_tokens` (None: the endpoint's own default).
    pub default_max_tokens: Option<u32>,
}

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::invalid(
            param,
            format!("{param} is {x} but must be between {lo} and {hi}"),
        )),
        _ => Ok(()),
    }
}

impl CommonFields {
    /// Checks ranges and builds the worker parameters; `logprobs` is the number of top
    /// alternatives asked for, if any. A sampling field the request leaves unset takes the
    /// model's default from `defaults` (generation_config.json, `--generation_config auto`),
    /// else the neutral value; a field the request sets keeps its value. This is the one
    /// place defaults are applied: the worker's parameters carry no "unset".
    pub fn settings(
        &self,
        logprobs: Option<u32>,
        defaults: &SamplingDefaults,
    ) -> Result<GenSettings, ApiError> {
        range("temperature", self.temperature, 0.0, 2.0)?;
        range("top_p", self.top_p, f32::MIN_POSITIVE, 1.0)?;
        range("min_p", self.min_p, 0.0, 1.0)?;
        range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        range(
            "repetition_penalty",
            self.repetition_penalty,
            f32::MIN_POSITIVE,
            10.0,
        )?;
        let top_k = match self.top_k {
            None => defaults.top_k.unwrap_or(0),
            Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k is {k}; use a positive number, or -1 / 0 to disable it"),
                ));
            }
        };
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::invalid(
                "n",
                format!("n is {n} but must be between 1 and {MAX_N}"),
            ));
        }
        if let Some(k) = logprobs
            && k > MAX_LOGPROBS
        {
            return Err(ApiError::invalid(
                "logprobs",
                format!("{k} top logprobs asked for; at most {MAX_LOGPROBS} are returned"),
            ));
        }
        let stop = self.stop.clone().map(Stop::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "{} stop strings given; at most {MAX_STOP_STRINGS} are accepted",
                    stop.len()
                ),
            ));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "a stop string has {} bytes; each may have at most {MAX_STOP_STRING_BYTES}",
                    long.len()
                ),
            ));
        }
        let stop_ids = self.stop_token_ids.as_ref().map_or(0, Vec::len);
        if stop_ids > MAX_STOP_TOKEN_IDS {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!(
                    "{stop_ids} stop_token_ids given; at most {MAX_STOP_TOKEN_IDS} are accepted"
                ),
            ));
        }
        let seed = match self.seed {
            Some(s) => Some(u64::try_from(s).map_err(|_| {
                ApiError::invalid("seed", format!("seed is {s}; use a non-negative integer"))
            })?),
            None => None,
        };
        let stream = self.stream.unwrap_or(false);
        let logit_bias = match &self.logit_bias {
            Some(b) => b.validate()?,
            None => Default::default(),
        };
        Ok(GenSettings {
            sampling: SamplingParams {
                temperature: self.temperature.or(defaults.temperature).unwrap_or(1.0),
                top_k,
                top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
                min_p: self.min_p.or(defaults.min_p).unwrap_or(0.0),
                seed,
                repetition_penalty: self
                    .repetition_penalty
                    .or(defaults.repetition_penalty)
                    .unwrap_or(1.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                logprobs,
                prompt_logprobs: false,
                logit_bias,
                guided: self.guided.as_ref().map(crate::guided::Guided::to_proto),
            },
            stopping: StoppingParams {
                max_tokens: 0,
                min_tokens: self.min_tokens.unwrap_or(0),
                ignore_eos: self.ignore_eos.unwrap_or(false),
                stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            },
            stop,
            n,
            keep: n,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            default_max_tokens: defaults.max_tokens,
        })
    }
}

impl CompletionRequest {
    /// Applies `best_of` to `settings` (built from this request): past `n`, `best_of`
    /// choices are generated per prompt with their logprobs (kept from the response unless
    /// asked for) and the `n` best are returned, as vLLM ranks them. A `best_of` below `n`
    /// or above `MAX_N`, or above `n` in a stream (OpenAI refuses that too), is a 400.
    pub fn apply_best_of(&self, settings: &mut GenSettings) -> Result<(), ApiError> {
        let n = settings.n;
        let Some(best_of) = self.best_of.filter(|&b| b != n) else {
            return Ok(());
        };
        if best_of < n || best_of > MAX_N {
            return Err(ApiError::invalid(
                "best_of",
                format!("best_of is {best_of} but must be between n ({n}) and {MAX_N}"),
            ));
        }
        if settings.stream {
            return Err(ApiError::invalid(
                "best_of",
                format!(
                    "best_of ({best_of}) above n ({n}) cannot be streamed: the best choices are known only at the end; \
                     remove stream or set best_of to n"
                ),
            ));
        }
        settings.n = best_of;
        settings.keep = n;
        settings.sampling.logprobs = Some(settings.sampling.logprobs.unwrap_or(0));
        Ok(())
    }
}

impl ChatMessage {
    /// The text of the message, parts joined.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            "messages",
                            format!(
                                "message part of type {:?} is not supported; send text parts",
                                p.kind
                            ),
                        ));
                    }
                    s.push_str(p.text.as_deref().unwrap_or_default());
                }
                Ok(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_defaults() -> SamplingDefaults {
        SamplingDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(20),
            min_p: Some(0.05),
            repetition_penalty: Some(1.1),
            max_tokens: Some(64),
        }
    }

    #[test]
    fn unset_fields_take_the_model_defaults() {
        let s = CommonFields::default()
            .settings(None, &model_defaults())
            .unwrap();
        let p = &s.sampling;
        assert_eq!(
            (
                p.temperature,
                p.top_p,
                p.top_k,
                p.min_p,
                p.repetition_penalty
            ),
            (0.6, 0.9, 20, 0.05, 1.1)
        );
        assert_eq!(s.default_max_tokens, Some(64));
    }

    #[test]
    fn fields_a_request_sets_keep_their_value() {
        let req = CommonFields {
            temperature: Some(0.0),
            top_p: Some(1.0),
            top_k: Some(-1),
            min_p: Some(0.0),
            repetition_penalty: Some(1.0),
            ..Default::default()
        };
        let p = req.settings(None, &model_defaults()).unwrap().sampling;
        assert_eq!(
            (
                p.temperature,
                p.top_p,
                p.top_k,
                p.min_p,
                p.repetition_penalty
            ),
            (0.0, 1.0, 0, 0.0, 1.0)
        );
    }

    #[test]
    fn without_model_defaults_unset_fields_are_neutral() {
        let s = CommonFields::default()
            .settings(None, &SamplingDefaults::default())
            .unwrap();
        let p = &s.sampling;
        assert_eq!(
            (
                p.temperature,
                p.top_p,
                p.top_k,
                p.min_p,
                p.repetition_penalty
            ),
            (1.0, 1.0, 0, 0.0, 1.0)
        );
        assert_eq!(s.default_max_tokens, None);
    }
}
