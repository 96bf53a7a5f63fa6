//! A sequence's output grammar during decoding (structured outputs).
//!
//! A `Guide` wraps the llguidance matcher of one request. After each accepted token it starts
//! computing the next token mask on a small dedicated thread pool, so the mask is built while
//! the next forward pass runs; the sampler joins it just before sampling. Not for: compiling
//! grammars (`llmapi_common::guided`) or deciding when a sequence stops (the runner asks
//! `Guide::advance`).

use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, sync_channel};

use llmapi_common::guided::{GuidedMatcher, TokenMask};

/// Threads that compute masks: enough to overlap a batch's masks with a forward pass, few
/// enough to leave the CPU backend its cores.
fn mask_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism()
            .map_or(2, |n| n.get() / 2)
            .clamp(1, 8);
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("llmapi-guided-{i}"))
            .build()
            .map_err(|e| tracing::warn!(error = %e, "no mask threads; masks computed inline"))
            .ok()
    })
    .as_ref()
}

type MaskResult = Result<TokenMask, String>;

enum State {
    /// The mask for the next token is being computed.
    Computing(Receiver<(Box<GuidedMatcher>, MaskResult)>),
    /// The mask for the next token is known.
    Ready(Box<GuidedMatcher>, MaskResult),
    /// The grammar is complete, or failed with this message.
    Done(Option<String>),
}

/// One request's grammar state: the matcher and the mask of its next token.
pub struct Guide {
    state: State,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Computing(_) => "computing",
            State::Ready(..) => "ready",
            State::Done(None) => "complete",
            State::Done(Some(_)) => "failed",
        };
        f.debug_struct("Guide").field("state", &state).finish()
    }
}

impl Guide {
    /// A guide over a fresh `matcher`, advanced past `generated` (the tokens a migrated
    /// request already produced); Err when they break the grammar. The first mask starts
    /// computing at once, while the prompt is prefilled.
    pub fn new(mut matcher: GuidedMatcher, generated: &[u32]) -> Result<Self, String> {
        matcher.consume_tokens(generated).map_err(|e| {
            format!("the generated_token_ids do not follow the request's grammar: {e}")
        })?;
        let mut guide = Self {
            state: State::Done(None),
        };
        if !matcher.is_stopped() {
            guide.compute(Box::new(matcher));
        }
        Ok(guide)
    }

    fn compute(&mut self, mut matcher: Box<GuidedMatcher>) {
        let Some(pool) = mask_pool() else {
            let mask = matcher.compute_mask().map_err(|e| e.to_string());
            self.state = State::Ready(matcher, mask);
            return;
        };
        let (tx, rx) = sync_channel(1);
        pool.spawn(move || {
            let mask = matcher.compute_mask().map_err(|e| e.to_string());
            let _ = tx.send((matcher, mask));
        });
        self.state = State::Computing(rx);
    }

    /// Waits for the pending mask, if one is being computed.
    fn join(&mut self) {
        if let State::Computing(rx) = &self.state {
            self.state = match rx.recv() {
                Ok((m, mask)) => State::Ready(m, mask),
                Err(_) => State::Done(Some("the grammar's mask thread failed".into())),
            };
        }
    }

    /// Sets every logit the grammar does not allow next to negative infinity (ids beyond the
    /// mask included). Err when the mask could not be computed; the row is then left as it
    /// was, and the caller ends the request.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.join();
        if let State::Ready(_, Err(e)) = &self.state {
            self.state = State::Done(Some(e.clone()));
        }
        match &self.state {
            State::Ready(_, Ok(mask)) => {
                mask_logits(mask, logits);
                Ok(())
            }
            State::Done(Some(e)) => Err(e.clone()),
            State::Ready(_, Err(_)) => Err("the grammar's mask failed".into()),
            State::Done(None) => Err("the grammar is already complete".into()),
            State::Computing(_) => Err("the grammar's mask is not ready".into()),
        }
    }

    /// Advances past the accepted `token`: Ok(true) when the grammar is complete (the output
    /// is a whole document and nothing may follow), Ok(false) when it goes on (the next mask
    /// then starts computing), Err when the token breaks it or the matcher failed.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.join();
        match std::mem::replace(&mut self.state, State::Done(None)) {
            State::Ready(mut m, _) => {
                if let Err(e) = m.consume_token(token) {
                    let e = format!("token {token} breaks the request's grammar: {e}");
                    self.state = State::Done(Some(e.clone()));
                    return Err(e);
                }
                if m.is_stopped() {
                    return Ok(true);
                }
                self.compute(m);
                Ok(false)
            }
            State::Done(None) => Ok(true),
            State::Done(Some(e)) => {
                self.state = State::Done(Some(e.clone()));
                Err(e)
            }
            State::Computing(_) => Err("the grammar's mask is not ready".into()),
        }
    }
}

/// `logits[i] = -inf` wherever bit i of `mask` is clear, a 32-token word at a time.
fn mask_logits(mask: &TokenMask, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}
