//! Request checks made on the caller's thread, before a request reaches the engine loop.

use super::super::{CapacityPolicy, EngineError, EngineInfo, GenerateParams};
use super::total_len;
use llmapi_proto::limits::{MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS};

/// Checks what can be checked without the engine thread. `freed_window`: the sliding window
/// of every layer when blocks before it are freed (a request that gets its blocks as it
/// grows then never holds more than its prompt's or its window's).
pub(crate) fn validate(
    req: &GenerateParams,
    info: &EngineInfo,
    max_num_tokens: usize,
    chunked: bool,
    freed_window: Option<usize>,
    policy: CapacityPolicy,
) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::InvalidRequest(m));
    let never_fits = |m: String| Err(EngineError::DoesNotFit(m));
    let n = req.prompt.len();
    let max_seq_len = info.max_seq_len as usize;
    if n == 0 {
        return bad("the prompt is empty; send at least one token".into());
    }
    if n > max_seq_len {
        return never_fits(format!(
            "prompt has {n} tokens but max_seq_len is {max_seq_len}, which leaves no room for output; \
             shorten it to at most {max_seq_len} tokens or raise --max_seq_len"
        ));
    }
    if let Some(t) = req.prompt.iter().find(|&&t| t >= info.vocab_size) {
        return bad(format!(
            "prompt token id {t} is outside the vocabulary of {} tokens",
            info.vocab_size
        ));
    }
    check_generated(req, info)?;
    if !chunked && n > max_num_tokens {
        return never_fits(format!(
            "prompt has {n} tokens but max_num_tokens is {max_num_tokens} and chunked prefill is off; \
             shorten it, raise --max_num_tokens or enable enable_chunked_prefill"
        ));
    }
    let total = total_len(req, max_seq_len);
    // The last token is sampled, never computed: it takes no KV slot. A request for the
    // whole room gets blocks as it grows (and ends with `length` if it fills the cache
    // alone): only its prompt must fit.
    let whole_room = total > max_seq_len;
    let kv_tokens = if whole_room { n } else { total - 1 };
    let tpb = info.tokens_per_block as usize;
    let mut blocks = kv_tokens.div_ceil(tpb);
    // With a window on every layer a sequence holds at most its prompt's blocks (prefilled
    // whole) or those of its window and the next position: growing as it goes (MAX_UTILIZATION,
    // or the whole room) that is all it needs; reserving (GUARANTEED_NO_EVICT) it reserves both
    // (`Scheduler::admit_front`).
    if let Some(w) = freed_window {
        let at_once = if whole_room || policy == CapacityPolicy::MaxUtilization {
            n.max(w + tpb).div_ceil(tpb)
        } else {
            n.div_ceil(tpb) + w.div_ceil(tpb) + 1
        };
        blocks = blocks.min(at_once);
    }
    let kv_tokens = kv_tokens.min(blocks * tpb);
    if blocks as u64 > info.kv_capacity_blocks {
        return never_fits(format!(
            "request needs {kv_tokens} tokens of KV cache ({blocks} blocks) but the whole cache holds {} blocks of {}; \
             lower max_tokens or raise kv_cache_config.max_tokens",
            info.kv_capacity_blocks, info.tokens_per_block
        ));
    }
    let stop_ids = req.stopping.stop_token_ids.len();
    if stop_ids > MAX_STOP_TOKEN_IDS {
        return bad(format!(
            "{stop_ids} stop_token_ids given; at most {MAX_STOP_TOKEN_IDS} are accepted"
        ));
    }
    let s = &req.sampling;
    if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
        return bad(format!("temperature is {}; it must be >= 0", s.temperature));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return bad(format!("top_p is {}; it must be in (0, 1]", s.top_p));
    }
    if !(0.0..=1.0).contains(&s.min_p) {
        return bad(format!("min_p is {}; it must be in [0, 1]", s.min_p));
    }
    if !(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite()) {
        return bad(format!(
            "repetition_penalty is {}; it must be > 0",
            s.repetition_penalty
        ));
    }
    if !s.presence_penalty.is_finite() || !s.frequency_penalty.is_finite() {
        return bad("presence_penalty and frequency_penalty must be finite numbers".into());
    }
    if s.logit_bias.len() > MAX_LOGIT_BIAS {
        return bad(format!(
            "{} logit_bias entries given; at most {MAX_LOGIT_BIAS} are accepted",
            s.logit_bias.len()
        ));
    }
    if let Some((t, b)) = s
        .logit_bias
        .iter()
        .find(|(t, b)| *t >= info.vocab_size || !b.is_finite())
    {
        return bad(format!(
            "logit_bias of token {t} is {b}; ids must be below the vocabulary size {} and biases finite",
            info.vocab_size
        ));
    }
    if req.stopping.min_tokens as usize + n > total && req.stopping.max_tokens > 0 {
        return bad(format!(
            "min_tokens {} exceeds max_tokens {}",
            req.stopping.min_tokens, req.stopping.max_tokens
        ));
    }
    Ok(())
}

/// Checks the tokens a migrated request already generated (`GenerateParams::generated`):
/// in the vocabulary, and leaving room for at least one more token.
fn check_generated(req: &GenerateParams, info: &EngineInfo) -> Result<(), EngineError> {
    let bad = |m: String| Err(EngineError::InvalidRequest(m));
    let g = req.generated.len();
    if g == 0 {
        return Ok(());
    }
    if let Some(t) = req.generated.iter().find(|&&t| t >= info.vocab_size) {
        return bad(format!(
            "generated token id {t} is outside the vocabulary of {} tokens",
            info.vocab_size
        ));
    }
    let max_tokens = req.stopping.max_tokens as usize;
    if max_tokens > 0 && g >= max_tokens {
        return bad(format!(
            "{g} tokens were already generated and max_tokens is {max_tokens}: nothing is left to \
             generate; send the request only while it has tokens to go"
        ));
    }
    let max_seq_len = info.max_seq_len as usize;
    let n = req.prompt.len() + g;
    if n > max_seq_len {
        return Err(EngineError::DoesNotFit(format!(
            "prompt ({}) and already generated tokens ({g}) come to {n}, past max_seq_len \
             {max_seq_len}: nothing is left to generate",
            req.prompt.len()
        )));
    }
    Ok(())
}
