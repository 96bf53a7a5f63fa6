//! Structured outputs: a request's output constraint (JSON schema, any JSON object, regex,
//! choice, Lark grammar, structural tag) compiled by llguidance against the model's
//! tokenizer into a token-level matcher.
//!
//! The router compiles to validate (an invalid schema is a 400 that quotes the compiler); the
//! worker compiles to mask logits. Both use `GuidedCompiler`, which keeps the last compiled
//! grammars in a small LRU so a schema sent again (a tool loop, a benchmark) compiles once.
//! Not for: applying masks to logits (the worker's sampler) or parsing HTTP fields.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::Value;

use crate::tokenizer::Tokenizer;

pub use llguidance::Matcher as GuidedMatcher;
pub use llguidance::toktrie::SimpleVob as TokenMask;

/// How many compiled grammars a `GuidedCompiler` keeps.
pub const GRAMMAR_CACHE_SIZE: usize = 32;

/// One constraint on a request's output, as the proto's `GuidedDecoding` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Constraint {
    /// A JSON Schema, as JSON text: the output is one JSON value valid against it.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark dialect.
    Lark(String),
    /// vLLM's `structural_tag`, as JSON text: free text in which each trigger starts one of
    /// the `structures` (`begin`, a JSON value valid against `schema`, `end`).
    StructuralTag(String),
}

impl Constraint {
    /// The name of the constraint's kind, as error messages call it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Lark(_) => "grammar",
            Self::StructuralTag(_) => "structural_tag",
        }
    }
}

/// Errors from building a compiler or compiling a constraint.
#[derive(Debug, thiserror::Error)]
pub enum GuidedError {
    /// The tokenizer's vocabulary could not be read as bytes.
    #[error("structured outputs need the tokenizer's token bytes: {0}")]
    Tokenizer(String),
    /// The constraint does not compile; the message says where.
    #[error("invalid {kind}: {message}")]
    Invalid {
        /// The constraint's kind (`Constraint::kind`).
        kind: &'static str,
        /// What is wrong, and where (llguidance's or the JSON parser's message).
        message: String,
    },
}

/// Compiles constraints for one tokenizer; cheap to share (`Arc`) across threads.
pub struct GuidedCompiler {
    factory: ParserFactory,
    cache: Mutex<VecDeque<(Constraint, TokenParser)>>,
}

impl std::fmt::Debug for GuidedCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuidedCompiler")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl GuidedCompiler {
    /// A compiler over `tokenizer`'s vocabulary, padded to the model's `vocab_size` (ids the
    /// tokenizer lacks are never allowed); `eos_ids` are the tokens that end a sequence, the
    /// ones a mask allows once the constraint is complete.
    pub fn new(
        tokenizer: &Tokenizer,
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self, GuidedError> {
        let env = HfTokEnv::new(tokenizer, vocab_size, eos_ids)?;
        let env: TokEnv = Arc::new(env);
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GuidedError::Tokenizer(e.to_string()))?;
        // llguidance logs to stderr by default; errors reach callers as values instead.
        factory.quiet();
        Ok(Self {
            factory,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The length of the masks this compiler's matchers produce.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// A fresh matcher for `constraint`, compiled once per distinct constraint while it stays
    /// among the last `GRAMMAR_CACHE_SIZE` compiled.
    pub fn matcher(&self, constraint: &Constraint) -> Result<Matcher, GuidedError> {
        let parser = self.parser(constraint)?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(invalid(constraint, e)),
            None => Ok(matcher),
        }
    }

    /// Compiles `constraint` (or takes it from the cache) without keeping a matcher: the
    /// router's validation.
    pub fn check(&self, constraint: &Constraint) -> Result<(), GuidedError> {
        self.matcher(constraint).map(drop)
    }

    fn parser(&self, constraint: &Constraint) -> Result<TokenParser, GuidedError> {
        if let Ok(mut cache) = self.cache.lock()
            && let Some(at) = cache.iter().position(|(c, _)| c == constraint)
            && let Some(hit) = cache.remove(at)
        {
            let fresh = hit.1.deep_clone();
            cache.push_front(hit);
            return Ok(fresh);
        }
        let grammar = grammar(constraint)?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(constraint, e.to_string()))?;
        let fresh = parser.deep_clone();
        if let Ok(mut cache) = self.cache.lock() {
            cache.push_front((constraint.clone(), parser));
            cache.truncate(GRAMMAR_CACHE_SIZE);
        }
        Ok(fresh)
    }
}

fn invalid(constraint: &Constraint, message: impl Into<String>) -> GuidedError {
    GuidedError::Invalid {
        kind: constraint.kind(),
        message: message.into(),
    }
}

/// The llguidance grammar of a constraint. JSON output is compact with a space after `,`
/// and `:` (as Python's `json.dumps` writes it) unless the schema's own `x-guidance` says
/// otherwise: free whitespace would let a model pad a document without end.
pub fn grammar(constraint: &Constraint) -> Result<TopLevelGrammar, GuidedError> {
    let bad = |message: String| invalid(constraint, message);
    Ok(match constraint {
        Constraint::JsonSchema(text) => {
            let schema: Value = serde_json::from_str(text)
                .map_err(|e| bad(format!("the schema is not JSON: {e}")))?;
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("a JSON schema is an object (or true/false)".into()));
            }
            TopLevelGrammar::from_json_schema(with_json_layout(schema))
        }
        Constraint::JsonObject => TopLevelGrammar::from_json_schema(with_json_layout(
            serde_json::json!({"type": "object"}),
        )),
        Constraint::Regex(rx) => {
            regex_syntax::Parser::new()
                .parse(rx)
                .map_err(|e| bad(e.to_string()))?;
            TopLevelGrammar::from_regex(rx)
        }
        Constraint::Choice(choices) => {
            if choices.is_empty() {
                return Err(bad("give at least one choice".into()));
            }
            let alternatives: Vec<String> =
                choices.iter().map(|c| regex_syntax::escape(c)).collect();
            TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
        }
        Constraint::Lark(text) => {
            if text.trim().is_empty() {
                return Err(bad("the grammar is empty".into()));
            }
            if text.contains("::=") {
                return Err(bad(
                    "this looks like a GBNF/EBNF grammar (`::=`); send it in Lark syntax \
                     (`rule: ...`), llguidance's grammar language"
                        .into(),
                ));
            }
            TopLevelGrammar::from_lark(text.clone())
        }
        Constraint::StructuralTag(text) => TopLevelGrammar::from_lark(structural_tag_lark(text)?),
    })
}

/// Adds the compact layout to a schema that does not set its own `x-guidance`.
fn with_json_layout(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut()
        && !obj.contains_key("x-guidance")
    {
        obj.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    schema
}

/// A Lark grammar for vLLM's structural tag: `{"structures": [{"begin", "schema", "end"}],
/// "triggers": [...]}`. Free text runs up to a trigger (a lazy match that ends at the first
/// one); the rest of one of the structures whose `begin` starts with it follows, then its
/// JSON and its `end`. Text after the last tag never contains a trigger.
fn structural_tag_lark(text: &str) -> Result<String, GuidedError> {
    let bad = |message: String| GuidedError::Invalid {
        kind: "structural_tag",
        message,
    };
    let tag: Value = serde_json::from_str(text).map_err(|e| bad(format!("it is not JSON: {e}")))?;
    let structures = tag["structures"]
        .as_array()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("`structures` must be a non-empty array".into()))?;
    let triggers: Vec<&str> = tag["triggers"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if triggers.is_empty() || triggers.iter().any(|t| t.is_empty()) {
        return Err(bad("`triggers` must be a non-empty array of strings".into()));
    }
    let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
    // Per trigger, the alternatives that may follow it.
    let mut after: Vec<Vec<String>> = vec![Vec::new(); triggers.len()];
    for (i, s) in structures.iter().enumerate() {
        let begin = s["begin"]
            .as_str()
            .ok_or_else(|| bad(format!("structures[{i}].begin must be a string")))?;
        let end = s["end"]
            .as_str()
            .ok_or_else(|| bad(format!("structures[{i}].end must be a string")))?;
        let t = triggers
            .iter()
            .position(|t| begin.starts_with(t))
            .ok_or_else(|| {
                bad(format!(
                    "structures[{i}].begin {begin:?} starts with none of the triggers"
                ))
            })?;
        let schema = with_json_layout(s.get("schema").cloned().unwrap_or(Value::Bool(true)));
        let rest = &begin[triggers[t].len()..];
        let rest = if rest.is_empty() {
            String::new()
        } else {
            lit(rest)
        };
        after[t].push(format!("{rest} %json {schema} {}", lit(end)));
    }
    let mut lines = vec!["start: seg* TAIL".to_owned()];
    let mut segs = Vec::new();
    for (t, alts) in after.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
        lines.push(format!("pre_{t}[suffix={}]: /(.|\\n)*/", lit(triggers[t])));
        lines.push(format!("tag_{t}: {}", alts.join(" | ")));
        segs.push(format!("pre_{t} tag_{t}"));
    }
    lines.push(format!("seg: {}", segs.join(" | ")));
    let no_trigger: Vec<String> = triggers
        .iter()
        .map(|t| {
            format!(
                "/(.|\\n)*{}(.|\\n)*/",
                regex_syntax::escape(t).replace('/', "\\/")
            )
        })
        .collect();
    lines.push(format!("TAIL: /(.|\\n)*/ & ~({})", no_trigger.join(" | ")));
    Ok(lines.join("\n") + "\n")
}

/// llguidance's view of a Hugging Face tokenizer: the byte string of every token id (from
/// tokenizer.json) in a trie, and the tokenizer itself for the strings grammars force.
struct HfTokEnv {
    tokenizer: tokenizers::Tokenizer,
    trie: TokTrie,
}

impl HfTokEnv {
    fn new(tokenizer: &Tokenizer, vocab_size: usize, eos_ids: &[u32]) -> Result<Self, GuidedError> {
        let json = tokenizer
            .inner()
            .to_string(false)
            .map_err(|e| GuidedError::Tokenizer(e.to_string()))?;
        let json: Value =
            serde_json::from_str(&json).map_err(|e| GuidedError::Tokenizer(e.to_string()))?;
        // The reader asserts on vocabularies it does not expect; make that an error.
        let words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| GuidedError::Tokenizer("unsupported tokenizer.json layout".into()))?
            .map_err(|e| GuidedError::Tokenizer(e.to_string()))?;
        let mut words = words;
        let n = words.len().max(vocab_size);
        words.resize(n, Vec::new());
        let eos = eos_ids
            .first()
            .copied()
            .or_else(|| tokenizer.eos().map(|e| e.1))
            .ok_or_else(|| GuidedError::Tokenizer("the model names no EOS token".into()))?;
        let info = TokRxInfo::new(n as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos_ids.len() > 1 {
            trie = trie.with_eos_tokens(eos_ids);
        }
        Ok(Self {
            tokenizer: tokenizer.inner().clone(),
            trie,
        })
    }
}

impl TokenizerEnv for HfTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests;
