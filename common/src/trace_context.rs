//! W3C Trace Context (`traceparent` / `tracestate`, <https://www.w3.org/TR/trace-context/>):
//! parsing what a caller sent, and the span of this hop that the next hop sees as its parent.
//!
//! The router and the worker both use it, so a trace id a client sends appears unchanged in
//! the router's and the worker's log lines. Not for: exporting spans (`llmapi-otlp` does that).

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The `traceparent` fields of a caller, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never all zero.
    pub trace_id: u128,
    /// The caller's span id, never zero.
    pub parent_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header value. `None` when it breaks the W3C rules (wrong
    /// length, upper-case or non-hex digits, version `ff`, an all-zero id), in which case the
    /// receiver starts a new trace.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let version = u8::from_str_radix(hex_field(value.get(0..2)?)?, 16).ok()?;
        if version == 0xff {
            return None;
        }
        // Version 00 is exactly 55 characters; later versions may append fields after a dash.
        let fits = match version {
            0 => value.len() == 55,
            _ => value.len() == 55 || value.as_bytes().get(55) == Some(&b'-'),
        };
        let b = value.as_bytes();
        if !fits || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = u128::from_str_radix(hex_field(value.get(3..35)?)?, 16).ok()?;
        let parent_id = u64::from_str_radix(hex_field(value.get(36..52)?)?, 16).ok()?;
        let flags = u8::from_str_radix(hex_field(value.get(53..55)?)?, 16).ok()?;
        (trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

/// Lower-case hex only, as the spec requires (`from_str_radix` alone would take `A-F` and `+`).
fn hex_field(s: &str) -> Option<&str> {
    s.bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        .then_some(s)
}

/// This hop's place in a trace: the trace id, this hop's own span id, and the caller's span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id: the caller's, or a new one.
    pub trace_id: u128,
    /// This hop's span id, the parent of whatever this hop calls.
    pub span_id: u64,
    /// The caller's span id; `None` when this hop started the trace.
    pub parent_id: Option<u64>,
    /// Trace flags, passed on unchanged (new traces: 00; the router sets the sampled bit when
    /// it exports spans).
    pub flags: u8,
    /// The caller's `tracestate`, passed on unchanged with a valid `traceparent`.
    pub tracestate: Option<String>,
}

/// The longest `tracestate` passed on; the spec asks for at least 512 characters.
pub const MAX_TRACESTATE_LEN: usize = 1024;

impl TraceContext {
    /// The span of this hop for a request that came with `traceparent` / `tracestate` (either
    /// may be absent or invalid: then a new trace starts and `tracestate` is dropped).
    pub fn continue_from(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        match traceparent.and_then(TraceParent::parse) {
            Some(p) => Self {
                trace_id: p.trace_id,
                span_id: new_span_id(),
                parent_id: Some(p.parent_id),
                flags: p.flags,
                tracestate: tracestate
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_LEN && s.is_ascii())
                    .map(str::to_owned),
            },
            None => Self {
                trace_id: new_trace_id(),
                span_id: new_span_id(),
                parent_id: None,
                flags: 0,
                tracestate: None,
            },
        }
    }

    /// The `traceparent` the next hop receives: this trace, with this hop's span as parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    /// The trace id as 32 hex digits, as log lines show it.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// This hop's span id as 16 hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The caller's span id as 16 hex digits, or empty when this hop began the trace.
    pub fn parent_id_hex(&self) -> String {
        self.parent_id
            .map(|p| format!("{p:016x}"))
            .unwrap_or_default()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// 64 random bits: SipHash under the process's randomly keyed `RandomState`, over a counter.
/// Unpredictable enough for ids, with no extra dependency.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

fn new_span_id() -> u64 {
    loop {
        let id = random_u64();
        if id != 0 {
            return id;
        }
    }
}

fn new_trace_id() -> u128 {
    loop {
        let id = (u128::from(random_u64()) << 64) | u128::from(random_u64());
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let t = TraceContext::continue_from(Some(GOOD), Some("congo=t61rcWkgMzE"));
        assert_eq!(t.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.parent_id_hex(), "b7ad6b7169203331");
        assert_ne!(t.span_id, 0xb7ad6b7169203331);
        assert_eq!(t.flags, 1);
        assert_eq!(t.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let next = t.traceparent();
        assert_eq!(next.len(), 55);
        assert!(next.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(next.ends_with("-01"));
        assert_eq!(
            TraceParent::parse(&next).map(|p| p.parent_id),
            Some(t.span_id)
        );
    }

    #[test]
    fn invalid_or_missing_traceparents_start_a_new_trace() {
        let bad = [
            "",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b), None, "{b:?}");
            let t = TraceContext::continue_from(Some(b), Some("a=b"));
            assert_eq!(t.parent_id, None);
            assert_eq!(
                t.tracestate, None,
                "tracestate without a valid parent is dropped"
            );
            assert_ne!(t.trace_id, 0);
        }
        let a = TraceContext::continue_from(None, None);
        let b = TraceContext::continue_from(None, None);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
        assert_eq!(a.flags, 0);
    }

    #[test]
    fn future_versions_may_carry_more_fields() {
        let v = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-next";
        assert!(TraceParent::parse(v).is_some());
    }
}
