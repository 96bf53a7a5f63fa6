//! `--reasoning_parser`: splitting a reasoning model's chat output into `reasoning_content`
//! (the text between `<think>` and `</think>`) and `content`, as vLLM's reasoning parsers do.
//!
//! Streamed text may cut a tag anywhere; text that could be the start of the tag being
//! looked for is held back until it is known (as the stop-string matcher does).

use crate::detok::longest_suffix_prefix;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// The reasoning formats `--reasoning_parser` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReasoningParser {
    /// DeepSeek-R1: the chat template opens the thinking part, so the output starts inside
    /// it (a leading `<think>` is dropped); everything up to `</think>` is reasoning.
    #[value(name = "deepseek-r1")]
    DeepseekR1,
    /// Qwen3: only text inside an explicit `<think>...</think>` is reasoning; without the
    /// tag everything is content.
    #[value(name = "qwen3")]
    Qwen3,
}

/// The `--reasoning_parser` flag of the router's HTTP front.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReasoningArgs {
    /// Split chat completions of a reasoning model into `reasoning_content` (between
    /// `<think>` and `</think>`) and `content`, and count the reasoning tokens in
    /// `usage.completion_tokens_details.reasoning_tokens`. Default: no splitting.
    #[arg(long = "reasoning_parser", value_enum, value_name = "NAME")]
    pub reasoning_parser: Option<ReasoningParser>,
}

/// One piece of text, split.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// Text of the thinking part.
    pub reasoning: String,
    /// Text of the answer.
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// deepseek-r1 at the start: a leading `<think>` is dropped.
    Opening,
    /// qwen3 before `<think>`: content.
    Before,
    /// Inside the thinking part, looking for `</think>`.
    Reasoning,
    /// After `</think>`: content.
    After,
}

/// Splits one choice's streamed text.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    phase: Phase,
    pending: String,
    reasoning_tokens: u32,
}

impl ReasoningSplitter {
    /// A splitter for one choice of `parser`'s format.
    pub fn new(parser: ReasoningParser) -> Self {
        Self {
            phase: match parser {
                ReasoningParser::DeepseekR1 => Phase::Opening,
                ReasoningParser::Qwen3 => Phase::Before,
            },
            pending: String::new(),
            reasoning_tokens: 0,
        }
    }

    /// Tokens counted as reasoning: those of every delta after which the thinking part was
    /// still open, i.e. with one token per delta, the tokens before the one completing
    /// `</think>`.
    pub fn reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    /// Feeds a delta of `text` made of `tokens` tokens; returns what may be shown now.
    pub fn push(&mut self, text: &str, tokens: u32) -> Split {
        self.pending.push_str(text);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Opening => {
                    if let Some(rest) = self.pending.strip_prefix(OPEN) {
                        self.pending = rest.to_owned();
                    } else if OPEN.starts_with(self.pending.as_str()) {
                        break;
                    }
                    self.phase = Phase::Reasoning;
                }
                Phase::Before => {
                    if !self.take_until(OPEN, &mut out.content) {
                        break;
                    }
                    self.phase = Phase::Reasoning;
                }
                Phase::Reasoning => {
                    if !self.take_until(CLOSE, &mut out.reasoning) {
                        break;
                    }
                    self.phase = Phase::After;
                }
                Phase::After => {
                    out.content.push_str(&self.pending);
                    self.pending.clear();
                    break;
                }
            }
        }
        if matches!(self.phase, Phase::Opening | Phase::Reasoning) {
            self.reasoning_tokens = self.reasoning_tokens.saturating_add(tokens);
        }
        out
    }

    /// The held-back text, released at the end of the choice on the side it was on.
    pub fn flush(&mut self) -> Split {
        let text = std::mem::take(&mut self.pending);
        match self.phase {
            Phase::Opening | Phase::Reasoning => Split {
                reasoning: text,
                content: String::new(),
            },
            Phase::Before | Phase::After => Split {
                reasoning: String::new(),
                content: text,
            },
        }
    }

    /// Moves the pending text before `tag` into `into` and drops the tag: true when the tag
    /// was found; else moves all but a possible start of the tag and returns false.
    fn take_until(&mut self, tag: &str, into: &mut String) -> bool {
        if let Some(at) = self.pending.find(tag) {
            into.push_str(&self.pending[..at]);
            self.pending.drain(..at + tag.len());
            return true;
        }
        let cut = self.pending.len() - longest_suffix_prefix(&self.pending, tag);
        into.push_str(&self.pending[..cut]);
        self.pending.drain(..cut);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams `pieces` (one token each) through a splitter; returns the joined reasoning,
    /// the joined content and the reasoning token count.
    fn run(parser: ReasoningParser, pieces: &[&str]) -> (String, String, u32) {
        let mut s = ReasoningSplitter::new(parser);
        let mut all = Split::default();
        for p in pieces {
            let out = s.push(p, 1);
            all.reasoning.push_str(&out.reasoning);
            all.content.push_str(&out.content);
        }
        let out = s.flush();
        all.reasoning.push_str(&out.reasoning);
        all.content.push_str(&out.content);
        (all.reasoning, all.content, s.reasoning_tokens())
    }

    /// Every way to cut `text` in two, and cut char by char.
    fn cuts(text: &str) -> Vec<Vec<&str>> {
        let mut out: Vec<Vec<&str>> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .map(|i| vec![&text[..i], &text[i..]])
            .collect();
        out.push(
            text.char_indices()
                .map(|(i, c)| &text[i..i + c.len_utf8()])
                .collect(),
        );
        out
    }

    #[test]
    fn deepseek_r1_splits_at_the_end_tag_however_the_stream_is_cut() {
        for text in ["<think>why 世界</think>answer", "why 世界</think>answer"] {
            for pieces in cuts(text) {
                let (r, c, _) = run(ReasoningParser::DeepseekR1, &pieces);
                assert_eq!(
                    (r.as_str(), c.as_str()),
                    ("why 世界", "answer"),
                    "{pieces:?}"
                );
            }
        }
    }

    #[test]
    fn qwen3_splits_only_an_explicit_think_part_however_the_stream_is_cut() {
        let text = "<think>why 世界</think>answer";
        for pieces in cuts(text) {
            let (r, c, _) = run(ReasoningParser::Qwen3, &pieces);
            assert_eq!(
                (r.as_str(), c.as_str()),
                ("why 世界", "answer"),
                "{pieces:?}"
            );
        }
        for pieces in cuts("no tags <thin here") {
            let (r, c, _) = run(ReasoningParser::Qwen3, &pieces);
            assert_eq!((r.as_str(), c.as_str()), ("", "no tags <thin here"));
        }
    }

    #[test]
    fn without_an_end_tag_the_thinking_part_runs_to_the_end() {
        let (r, c, n) = run(
            ReasoningParser::DeepseekR1,
            &["still ", "think", "ing </thi"],
        );
        assert_eq!((r.as_str(), c.as_str(), n), ("still thinking </thi", "", 3));
        let (r, c, _) = run(ReasoningParser::Qwen3, &["<think>", "still"]);
        assert_eq!((r.as_str(), c.as_str()), ("still", ""));
    }

    #[test]
    fn empty_reasoning_gives_empty_reasoning_and_no_reasoning_tokens() {
        let (r, c, n) = run(ReasoningParser::DeepseekR1, &["<think>", "</think>", "hi"]);
        assert_eq!((r.as_str(), c.as_str(), n), ("", "hi", 1));
        let (r, c, n) = run(ReasoningParser::DeepseekR1, &["</think>", "hi"]);
        assert_eq!((r.as_str(), c.as_str(), n), ("", "hi", 0));
    }

    #[test]
    fn reasoning_tokens_are_those_before_the_end_tag() {
        let (_, _, n) = run(
            ReasoningParser::DeepseekR1,
            &["a", "b", "c", "</think>", "x", "y"],
        );
        assert_eq!(n, 3);
        // qwen3 counts from its <think> token on.
        let (_, _, n) = run(
            ReasoningParser::Qwen3,
            &["pre", "<think>", "a", "</think>", "x"],
        );
        assert_eq!(n, 2);
    }

    #[test]
    fn a_tag_prefix_is_held_back_then_released() {
        let mut s = ReasoningSplitter::new(ReasoningParser::DeepseekR1);
        assert_eq!(s.push("ab</th", 1).reasoning, "ab");
        assert_eq!(s.push("x", 1).reasoning, "</thx");
    }

    #[test]
    fn an_unknown_parser_name_is_a_cli_error_listing_the_known_ones() {
        use clap::Parser;
        let args = ["llmapi-router", "/m", "--reasoning_parser", "deepseek-r1"];
        let parsed = crate::args::RouterArgs::try_parse_from(args).map(|a| a.config());
        assert_eq!(
            parsed.map(|c| c.reasoning_parser).ok(),
            Some(Some(ReasoningParser::DeepseekR1))
        );
        let args = ["llmapi-router", "/m", "--reasoning_parser", "r1"];
        let err = crate::args::RouterArgs::try_parse_from(args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("'r1'") && err.contains("deepseek-r1") && err.contains("qwen3"),
            "{err}"
        );
    }
}
