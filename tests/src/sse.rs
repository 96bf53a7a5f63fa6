//! Reading a streamed (SSE) response as it arrives, with deadlines.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Reads an open SSE response until its first `data:` line (the first token has arrived);
/// None when the stream ends or `limit` passes first.
pub fn first_event(stream: TcpStream, limit: Duration) -> Option<BufReader<TcpStream>> {
    let start = Instant::now();
    let _ = stream.set_read_timeout(Some(limit));
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    while start.elapsed() < limit {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if line.starts_with("data: ") => return Some(r),
            Ok(_) => {}
        }
    }
    None
}

/// How a stream read by [`read_sse`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `data: [DONE]` arrived.
    Done,
    /// The connection closed (or failed) before `[DONE]`.
    Closed,
    /// `limit` passed first.
    TimedOut,
}

/// Reads SSE payloads until `[DONE]`, EOF or `limit`; the payloads and how it ended.
pub fn read_sse(r: BufReader<TcpStream>, limit: Duration) -> (Vec<Value>, End) {
    read_sse_counting(r, limit, &AtomicUsize::new(0))
}

/// [`read_sse`], adding one to `payloads` as each payload arrives, so that another thread
/// can see how far the stream has come (and fault what serves it there).
pub fn read_sse_counting(
    mut r: BufReader<TcpStream>,
    limit: Duration,
    payloads: &AtomicUsize,
) -> (Vec<Value>, End) {
    let start = Instant::now();
    let mut events = Vec::new();
    let mut line = String::new();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (events, End::TimedOut);
        }
        let _ = r.get_ref().set_read_timeout(Some(left));
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return (events, End::Closed),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (events, End::TimedOut);
            }
            Err(_) => return (events, End::Closed),
            Ok(_) => {}
        }
        if let Some(d) = line.trim_end().strip_prefix("data: ") {
            let v = serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_owned()));
            let done = v == Value::String("[DONE]".into());
            events.push(v);
            payloads.fetch_add(1, Ordering::SeqCst);
            if done {
                return (events, End::Done);
            }
        }
    }
}
