//! Reading request bodies with their caps applied while parsing.
//!
//! A body may be 32 MiB. serde's `untagged` enums and `flatten` buffer a value into an
//! intermediate tree before choosing what it is (some 16 bytes and an allocation per number of
//! `[[1],[1],...]`), so a capped field would already have cost gigabytes when its cap is
//! checked. Here nothing is buffered: the shared fields are read in one pass
//! (`CommonFields`, other keys skipped), the endpoint's own in another, where `prompt` and
//! `prompt_token_ids` are counted as they stream by and stored only while under the caps, and
//! any other key is skipped without being kept but noted (`fields::Refusals`): an unknown key
//! or an unimplemented field that asks for something is then a 400 naming it. Not for:
//! validating values (`openai`).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;
use crate::fields::{Endpoint, Refusals};
use crate::openai::{
    ChatMessage, ChatRequest, CommonFields, CompletionRequest, Content, Prompt, Stop,
};
use crate::tools::bounded::ToolsSeed;
use crate::tools::request::ToolFields;

/// What one request may carry, checked while its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyCaps {
    /// Most prompts in a completions request's `prompt` list (`--max_prompts_per_request`).
    pub max_prompts: usize,
    /// Most prompt tokens a request sends to workers, all prompts times `n`
    /// (`--max_prompt_tokens_per_request`); while parsing `n` is not known yet, so the
    /// tokens themselves are held to it, and `check_prompt_tokens` applies `n` after.
    pub max_prompt_tokens: usize,
}

/// A prompt as read, with the counts of what the body held (beyond the caps too: storing
/// stops at a cap, counting does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPrompt {
    /// The prompt (complete only when the counts are within the caps).
    pub prompt: Prompt,
    /// Prompts in the body.
    pub prompts: usize,
    /// Token ids in the body (text prompts count 0 until tokenized).
    pub tokens: usize,
}

fn json_error(e: serde_json::Error) -> ApiError {
    let what = if e.is_syntax() || e.is_eof() {
        "request body is not valid JSON"
    } else {
        "request body has a wrong or missing field"
    };
    ApiError::bad_request(format!("{what}: {e}"))
}

/// 400 when `tokens` prompt tokens sent `n` times each exceed the cap.
pub fn check_prompt_tokens(
    caps: &BodyCaps,
    param: &str,
    tokens: usize,
    n: u32,
) -> Result<(), ApiError> {
    let sent = tokens.saturating_mul(n.max(1) as usize);
    if sent <= caps.max_prompt_tokens {
        return Ok(());
    }
    let times = if n > 1 {
        format!(" ({tokens} tokens x n={n})")
    } else {
        String::new()
    };
    Err(ApiError::invalid(
        param,
        format!(
            "the request sends {sent} prompt tokens to workers{times} but one request may send at most {}; \
             send fewer or shorter prompts, a smaller n, or raise --max_prompt_tokens_per_request",
            caps.max_prompt_tokens
        ),
    ))
}

fn check_prompt_count(caps: &BodyCaps, prompts: usize) -> Result<(), ApiError> {
    if prompts <= caps.max_prompts {
        return Ok(());
    }
    Err(ApiError::invalid(
        "prompt",
        format!(
            "prompt lists {prompts} prompts but one request may carry at most {}; \
             split it into several requests or raise --max_prompts_per_request",
            caps.max_prompts
        ),
    ))
}

/// Reads a /v1/completions body under `caps`: 400 for bad JSON, a wrong field, or a prompt
/// past a cap (naming the cap, the value and the flag).
pub fn completion_request(body: &[u8], caps: BodyCaps) -> Result<CompletionRequest, ApiError> {
    let mut common: CommonFields = serde_json::from_slice(body).map_err(json_error)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let own = CompletionSeed { caps }
        .deserialize(&mut de)
        .map_err(json_error)?;
    own.refusals.check(
        Endpoint::Completions,
        common.stream,
        common.stream_options.is_some(),
    )?;
    common.guided = crate::guided::read(body)?;
    if let Some(read) = &own.prompt {
        check_prompt_count(&caps, read.prompts)?;
        check_prompt_tokens(&caps, "prompt", read.tokens, 1)?;
    }
    Ok(CompletionRequest {
        common,
        prompt: own.prompt.map(|r| r.prompt),
        max_tokens: own.max_tokens,
        logprobs: own.logprobs,
        echo: own.echo,
        best_of: own.best_of,
    })
}

/// Reads a /v1/chat/completions body under `caps` (its `prompt_token_ids` are held to the
/// token cap).
pub fn chat_request(body: &[u8], caps: BodyCaps) -> Result<ChatRequest, ApiError> {
    let mut common: CommonFields = serde_json::from_slice(body).map_err(json_error)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let own = ChatSeed { caps }.deserialize(&mut de).map_err(json_error)?;
    own.refusals.check(
        Endpoint::Chat,
        common.stream,
        common.stream_options.is_some(),
    )?;
    common.guided = crate::guided::read(body)?;
    let prompt_token_ids = match own.prompt_token_ids {
        Some((ids, count)) => {
            check_prompt_tokens(&caps, "prompt_token_ids", count, 1)?;
            Some(ids)
        }
        None => None,
    };
    Ok(ChatRequest {
        common,
        messages: own.messages,
        max_tokens: own.max_tokens,
        max_completion_tokens: own.max_completion_tokens,
        logprobs: own.logprobs,
        top_logprobs: own.top_logprobs,
        prompt_token_ids,
        tools: own.tools,
    })
}

#[derive(Default)]
struct CompletionFields {
    prompt: Option<ReadPrompt>,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    echo: Option<bool>,
    best_of: Option<u32>,
    refusals: Refusals,
}

/// Sets `slot` from the map's next value, refusing a second occurrence as serde's derive does.
fn once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = map.next_value()?;
    Ok(())
}

struct CompletionSeed {
    caps: BodyCaps,
}

impl<'de> DeserializeSeed<'de> for CompletionSeed {
    type Value = CompletionFields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CompletionSeed {
    type Value = CompletionFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a completions request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = CompletionFields::default();
        let mut seen_prompt = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "prompt" => {
                    if std::mem::replace(&mut seen_prompt, true) {
                        return Err(de::Error::duplicate_field("prompt"));
                    }
                    out.prompt = map.next_value_seed(PromptSeed { caps: self.caps })?;
                }
                "max_tokens" => once(&mut map, &mut out.max_tokens, "max_tokens")?,
                "logprobs" => once(&mut map, &mut out.logprobs, "logprobs")?,
                "echo" => once(&mut map, &mut out.echo, "echo")?,
                "best_of" => once(&mut map, &mut out.best_of, "best_of")?,
                other => out.refusals.note(Endpoint::Completions, other, &mut map)?,
            }
        }
        Ok(out)
    }
}

#[derive(Default)]
struct ChatFields {
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    prompt_token_ids: Option<(Vec<u32>, usize)>,
    tools: ToolFields,
    refusals: Refusals,
}

struct ChatSeed {
    caps: BodyCaps,
}

impl<'de> DeserializeSeed<'de> for ChatSeed {
    type Value = ChatFields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ChatSeed {
    type Value = ChatFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat completions request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = ChatFields::default();
        let mut seen_ids = false;
        let mut seen_tools = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "messages" => once(&mut map, &mut out.messages, "messages")?,
                "max_tokens" => once(&mut map, &mut out.max_tokens, "max_tokens")?,
                "max_completion_tokens" => once(
                    &mut map,
                    &mut out.max_completion_tokens,
                    "max_completion_tokens",
                )?,
                "logprobs" => once(&mut map, &mut out.logprobs, "logprobs")?,
                "top_logprobs" => once(&mut map, &mut out.top_logprobs, "top_logprobs")?,
                "prompt_token_ids" => {
                    if std::mem::replace(&mut seen_ids, true) {
                        return Err(de::Error::duplicate_field("prompt_token_ids"));
                    }
                    out.prompt_token_ids = map.next_value_seed(IdsSeed {
                        max_tokens: self.caps.max_prompt_tokens,
                    })?;
                }
                "tools" => {
                    if std::mem::replace(&mut seen_tools, true) {
                        return Err(de::Error::duplicate_field("tools"));
                    }
                    out.tools.tools = map.next_value_seed(ToolsSeed)?;
                }
                "tool_choice" => once(&mut map, &mut out.tools.tool_choice, "tool_choice")?,
                "parallel_tool_calls" => once(
                    &mut map,
                    &mut out.tools.parallel_tool_calls,
                    "parallel_tool_calls",
                )?,
                other => out.refusals.note(Endpoint::Chat, other, &mut map)?,
            }
        }
        Ok(out)
    }
}

/// A flat list of token ids (or null), stored up to `max_tokens` and counted to the end.
struct IdsSeed {
    max_tokens: usize,
}

impl<'de> DeserializeSeed<'de> for IdsSeed {
    type Value = Option<(Vec<u32>, usize)>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IdsSeed {
    type Value = Option<(Vec<u32>, usize)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of token ids")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut ids = Vec::new();
        let mut count = 0usize;
        while let Some(id) = seq.next_element::<u32>()? {
            count += 1;
            if count <= self.max_tokens {
                ids.push(id);
            }
        }
        Ok(Some((ids, count)))
    }
}

/// `prompt`: a string, or a list of strings, of token ids, or of lists of token ids.
struct PromptSeed {
    caps: BodyCaps,
}

impl<'de> DeserializeSeed<'de> for PromptSeed {
    type Value = Option<ReadPrompt>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

const PROMPT_EXPECTED: &str =
    "a prompt: a string, a list of strings, a list of token ids or a list of lists of token ids";

impl<'de> Visitor<'de> for PromptSeed {
    type Value = Option<ReadPrompt>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PROMPT_EXPECTED)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.visit_string(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(ReadPrompt {
            prompt: Prompt::Text(v),
            prompts: 1,
            tokens: 0,
        }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut acc = PromptAcc {
            caps: self.caps,
            kind: None,
            prompts: 0,
            tokens: 0,
            texts: Vec::new(),
            ids: Vec::new(),
            lists: Vec::new(),
        };
        while seq.next_element_seed(ItemSeed { acc: &mut acc })?.is_some() {}
        let prompt = match acc.kind {
            None | Some(Kind::Texts) => Prompt::Texts(acc.texts),
            Some(Kind::Ids) => {
                acc.prompts = 1;
                Prompt::Ids(acc.ids)
            }
            Some(Kind::IdLists) => Prompt::IdLists(acc.lists),
        };
        Ok(Some(ReadPrompt {
            prompt,
            prompts: acc.prompts,
            tokens: acc.tokens,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Texts,
    Ids,
    IdLists,
}

/// The items of a prompt list read so far: stored while under the caps, always counted.
struct PromptAcc {
    caps: BodyCaps,
    kind: Option<Kind>,
    prompts: usize,
    tokens: usize,
    texts: Vec<String>,
    ids: Vec<u32>,
    lists: Vec<Vec<u32>>,
}

impl PromptAcc {
    fn kind<E: de::Error>(&mut self, kind: Kind) -> Result<(), E> {
        match self.kind {
            None => {
                self.kind = Some(kind);
                Ok(())
            }
            Some(k) if k == kind => Ok(()),
            Some(_) => Err(E::custom(
                "prompt mixes strings, token ids and lists of token ids; a prompt list holds one kind",
            )),
        }
    }

    fn token<E: de::Error>(&mut self, id: u64) -> Result<Option<u32>, E> {
        let id = u32::try_from(id).map_err(|_| {
            E::custom(format!(
                "token id {id} is out of range; ids are 0 to {}",
                u32::MAX
            ))
        })?;
        self.tokens += 1;
        Ok((self.tokens <= self.caps.max_prompt_tokens).then_some(id))
    }

    fn within_prompt_cap(&self) -> bool {
        self.prompts <= self.caps.max_prompts
    }
}

/// One item of a prompt list.
struct ItemSeed<'a> {
    acc: &'a mut PromptAcc,
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PROMPT_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.acc.kind(Kind::Texts)?;
        self.acc.prompts += 1;
        if self.acc.within_prompt_cap() {
            self.acc.texts.push(v.to_owned());
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.acc.kind(Kind::Ids)?;
        if let Some(id) = self.acc.token(v)? {
            self.acc.ids.push(id);
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "token id {v} is out of range; ids are 0 to {}",
                u32::MAX
            ))),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let acc = self.acc;
        acc.kind(Kind::IdLists)?;
        acc.prompts += 1;
        let keep = acc.within_prompt_cap();
        let mut list = Vec::new();
        while let Some(id) = seq.next_element::<u64>()? {
            if let Some(id) = acc.token(id)?
                && keep
            {
                list.push(id);
            }
        }
        if keep {
            acc.lists.push(list);
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StopVisitor;
        impl<'de> Visitor<'de> for StopVisitor {
            type Value = Stop;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a stop string or a list of stop strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Stop, E> {
                Ok(Stop::One(v.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stop, A::Error> {
                let mut all = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    all.push(s);
                }
                Ok(Stop::Many(all))
            }
        }
        d.deserialize_any(StopVisitor)
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = Content;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("message content: a string or a list of parts")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(ContentVisitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code

    use super::*;

    const CAPS: BodyCaps = BodyCaps {
        max_prompts: 3,
        max_prompt_tokens: 5,
    };

    fn prompt(json: &str) -> Result<Option<Prompt>, ApiError> {
        let body = format!(r#"{{"model": "m", "prompt": {json}}}"#);
        completion_request(body.as_bytes(), CAPS).map(|r| r.prompt)
    }

    #[test]
    fn every_prompt_shape_is_read() {
        assert_eq!(prompt(r#""hi""#).unwrap(), Some(Prompt::Text("hi".into())));
        assert_eq!(
            prompt(r#"["a", "b"]"#).unwrap(),
            Some(Prompt::Texts(vec!["a".into(), "b".into()]))
        );
        assert_eq!(prompt("[1, 2]").unwrap(), Some(Prompt::Ids(vec![1, 2])));
        assert_eq!(
            prompt("[[1], [2, 3], []]").unwrap(),
            Some(Prompt::IdLists(vec![vec![1], vec![2, 3], vec![]]))
        );
        assert_eq!(prompt("[]").unwrap(), Some(Prompt::Texts(vec![])));
        assert_eq!(prompt("null").unwrap(), None);
    }

    #[test]
    fn caps_are_named_with_the_value_and_the_flag() {
        let e = prompt("[[1], [1], [1], [1]]").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("4 prompts"), "{}", e.message);
        assert!(e.message.contains("at most 3"), "{}", e.message);
        assert!(
            e.message.contains("--max_prompts_per_request"),
            "{}",
            e.message
        );
        let e = prompt("[[1, 2, 3], [4, 5, 6]]").unwrap_err();
        assert!(e.message.contains("6 prompt tokens"), "{}", e.message);
        assert!(
            e.message.contains("--max_prompt_tokens_per_request"),
            "{}",
            e.message
        );
        let e = prompt("[1, 2, 3, 4, 5, 6, 7]").unwrap_err();
        assert!(e.message.contains("7 prompt tokens"), "{}", e.message);
        let e = prompt(r#"["a", "b", "c", "d"]"#).unwrap_err();
        assert!(e.message.contains("4 prompts"), "{}", e.message);
    }

    #[test]
    fn bad_prompts_say_what_is_wrong() {
        assert!(prompt(r#"[1, "a"]"#).unwrap_err().message.contains("mixes"));
        assert!(prompt("[-1]").unwrap_err().message.contains("out of range"));
        assert!(
            prompt("[4294967296]")
                .unwrap_err()
                .message
                .contains("out of range")
        );
        assert!(
            prompt("[[1.5]]")
                .unwrap_err()
                .message
                .contains("wrong or missing field")
        );
        assert!(prompt("{}").unwrap_err().message.contains("a prompt"));
    }

    #[test]
    fn duplicate_and_unknown_keys() {
        let e = completion_request(br#"{"model": "m", "prompt": "a", "prompt": "b"}"#, CAPS)
            .unwrap_err();
        assert!(
            e.message.contains("duplicate field `prompt`"),
            "{}",
            e.message
        );
        let r = completion_request(
            br#"{"model": "m", "prompt": "a", "echo": true, "n": 2}"#,
            CAPS,
        )
        .unwrap();
        assert_eq!(r.echo, Some(true));
        assert_eq!(r.common.n, Some(2));
        let e = completion_request(
            br#"{"model": "m", "junk": [[1], {"a": [2]}], "prompt": "a", "more": 1}"#,
            CAPS,
        )
        .unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("junk"),
            "the first unknown key is named"
        );
        let e = completion_request(br#"{"prompt": "a"}"#, CAPS).unwrap_err();
        assert!(e.message.contains("missing field `model`"), "{}", e.message);
    }

    #[test]
    fn chat_fields_and_the_token_cap_on_prompt_token_ids() {
        let r = chat_request(
            br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "stop": ["x", "y"], "max_completion_tokens": 3}"#,
            CAPS,
        )
        .unwrap();
        assert_eq!(r.max_completion_tokens, Some(3));
        assert_eq!(r.messages.unwrap()[0].text().unwrap(), "hi");
        assert_eq!(
            r.common.stop,
            Some(Stop::Many(vec!["x".into(), "y".into()]))
        );
        let e = chat_request(
            br#"{"model": "m", "prompt_token_ids": [1,2,3,4,5,6]}"#,
            CAPS,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt_token_ids"));
        assert!(e.message.contains("6 prompt tokens"), "{}", e.message);
    }

    #[test]
    fn the_token_cap_counts_n() {
        assert!(check_prompt_tokens(&CAPS, "prompt", 2, 2).is_ok());
        let e = check_prompt_tokens(&CAPS, "prompt", 2, 3).unwrap_err();
        assert!(e.message.contains("6 prompt tokens"), "{}", e.message);
        assert!(e.message.contains("n=3"), "{}", e.message);
    }
}
