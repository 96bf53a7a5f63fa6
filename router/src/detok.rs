//! Incremental detokenization and stop strings.
//!
//! Text is decoded over a sliding window of ids so that a character split across tokens is
//! emitted only once complete, and text that could be the start of a stop string is held back
//! until it is known not to be one.

use crate::codec::TextCodec;

/// Turns a stream of token ids into text deltas.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of the text already emitted.
    read_offset: usize,
}

/// Window kept before the unread ids: enough for tokenizers whose decoding of a token depends
/// on its left neighbours (SentencePiece spaces).
const CONTEXT_TOKENS: usize = 5;

impl Detokenizer {
    /// A detokenizer whose context starts with `prompt` (so leading spaces decode as in the
    /// full text); the prompt itself is never emitted.
    pub fn new(prompt: &[u32]) -> Self {
        let start = prompt.len().saturating_sub(CONTEXT_TOKENS);
        let ids = prompt[start..].to_vec();
        let n = ids.len();
        Self {
            ids,
            prefix_offset: 0,
            read_offset: n,
        }
    }

    /// Adds one token; returns the newly complete text, possibly empty.
    pub fn push(&mut self, codec: &dyn TextCodec, id: u32) -> String {
        self.ids.push(id);
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = codec.decode(&self.ids[self.prefix_offset..]);
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token.
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return String::new();
        }
        let delta = match full.get(prefix.len()..) {
            Some(d) if full.starts_with(&prefix) => d.to_owned(),
            // The context decoded differently once extended; emit the difference by chars.
            _ => full.chars().skip(prefix.chars().count()).collect(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.trim();
        delta
    }

    /// Whatever is still pending at the end of a sequence (e.g. a truly invalid byte).
    pub fn flush(&mut self, codec: &dyn TextCodec) -> String {
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = codec.decode(&self.ids[self.prefix_offset..]);
        self.read_offset = self.ids.len();
        full.chars().skip(prefix.chars().count()).collect()
    }

    fn trim(&mut self) {
        // Keep memory bounded on long generations.
        if self.prefix_offset > 64 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

/// What a stop-string check decided for one piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to emit now (possibly empty; the rest is held back).
    Emit(String),
    /// A stop string was found: emit this text and finish.
    Stopped(String),
}

/// Finds stop strings in streamed text, including ones that span deltas.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Feeds text; returns what may be emitted.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Emit(text.to_owned());
        }
        self.pending.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return StopCheck::Stopped(out);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        StopCheck::Emit(out)
    }

    /// The held-back text, released at the end of the sequence.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char bounds.
pub(crate) fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ByteCodec;

    fn stream(text: &str) -> String {
        let codec = ByteCodec;
        let mut d = Detokenizer::new(&[104, 105]);
        let mut out = String::new();
        for id in codec.encode(text, false).unwrap_or_default() {
            let delta = d.push(&codec, id);
            assert!(!delta.contains('\u{FFFD}'), "no broken characters");
            out.push_str(&delta);
        }
        out.push_str(&d.flush(&codec));
        out
    }

    #[test]
    fn multi_byte_characters_split_over_tokens_come_out_whole() {
        let text = "héllo 世界 🎉 done";
        assert_eq!(stream(text), text);
    }

    #[test]
    fn stop_string_spanning_deltas_is_found_and_cut() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST"), StopCheck::Emit("abc ".into()));
        assert_eq!(m.push("O"), StopCheck::Emit(String::new()));
        assert_eq!(m.push("Pxyz"), StopCheck::Stopped(String::new()));
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let mut m = StopMatcher::new(vec!["STOP".into(), "\n\n".into()]);
        assert_eq!(m.push("a S"), StopCheck::Emit("a ".into()));
        assert_eq!(m.push("Tx"), StopCheck::Emit("STx".into()));
        assert_eq!(m.push("end\n"), StopCheck::Emit("end".into()));
        assert_eq!(m.flush(), "\n");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(m.push("hello world"), StopCheck::Stopped("hel".into()));
    }

    #[test]
    fn multi_byte_stop_strings_hold_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["世界".into()]);
        assert_eq!(m.push("a世"), StopCheck::Emit("a".into()));
        assert_eq!(m.push("界"), StopCheck::Stopped(String::new()));
    }
}
