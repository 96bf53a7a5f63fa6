//! Client load for the fault suite: requests whose every ending is classified, and closed-loop
//! clients that keep a number of them in flight.

use std::io::{BufRead, BufReader, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::send;
use crate::sse::{End, read_sse};

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 and every token: `[DONE]` (streaming) or a full body, no error.
    Completed,
    /// Streaming began, then an error event and `[DONE]` (the code of the error).
    InBand(u16),
    /// An HTTP error status before any token, and whether it carried `Retry-After`.
    Refused { status: u16, retry_after: bool },
    /// No connection could be opened (the listener is gone).
    Unreachable,
    /// The connection closed without an answer or before `[DONE]`: work lost silently.
    Lost,
    /// No ending within the client's limit.
    Hung,
}

/// Counts of outcomes.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Completed requests.
    pub completed: usize,
    /// In-band errors by code.
    pub in_band: Vec<u16>,
    /// Refusals: (status, had Retry-After).
    pub refused: Vec<(u16, bool)>,
    /// Connections refused.
    pub unreachable: usize,
    /// Silently lost.
    pub lost: usize,
    /// Hung past the client's limit.
    pub hung: usize,
}

impl Tally {
    /// Adds one outcome.
    pub fn add(&mut self, o: &Outcome) {
        match o {
            Outcome::Completed => self.completed += 1,
            Outcome::InBand(c) => self.in_band.push(*c),
            Outcome::Refused {
                status,
                retry_after,
            } => self.refused.push((*status, *retry_after)),
            Outcome::Unreachable => self.unreachable += 1,
            Outcome::Lost => self.lost += 1,
            Outcome::Hung => self.hung += 1,
        }
    }

    /// Every request counted.
    pub fn total(&self) -> usize {
        self.completed
            + self.in_band.len()
            + self.refused.len()
            + self.unreachable
            + self.lost
            + self.hung
    }

    /// Refusals with `status`.
    pub fn refused_with(&self, status: u16) -> usize {
        self.refused.iter().filter(|(s, _)| *s == status).count()
    }

    /// Whether every refusal with `status` carried Retry-After.
    pub fn all_retry_after(&self, status: u16) -> bool {
        self.refused
            .iter()
            .filter(|(s, _)| *s == status)
            .all(|(_, r)| *r)
    }

    /// Error endings in a short form: `503x3 504x1`.
    pub fn errors(&self) -> String {
        let mut codes: Vec<(String, usize)> = Vec::new();
        let mut bump = |k: String| match codes.iter_mut().find(|(c, _)| *c == k) {
            Some((_, n)) => *n += 1,
            None => codes.push((k, 1)),
        };
        for c in &self.in_band {
            bump(format!("in-band {c}"));
        }
        for (s, _) in &self.refused {
            bump(s.to_string());
        }
        if self.unreachable > 0 {
            bump("refused-conn".into());
        }
        codes.sort();
        let parts: Vec<String> = codes.iter().map(|(c, n)| format!("{c}x{n}")).collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(" ")
        }
    }
}

/// Sends `body` to `path` (streaming when the body says so) and reads to the end, at most
/// `limit` in all.
pub fn run_request(port: u16, path: &str, body: &Value, limit: Duration) -> Outcome {
    let bytes = body.to_string();
    let Ok(stream) = send(port, "POST", path, Some(bytes.as_bytes()), &[]) else {
        return Outcome::Unreachable;
    };
    let start = Instant::now();
    let _ = stream.set_read_timeout(Some(limit));
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    let timed_out = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    match r.read_line(&mut line) {
        Ok(0) => return Outcome::Lost,
        Err(e) if timed_out(&e) => return Outcome::Hung,
        Err(_) => return Outcome::Lost,
        Ok(_) => {}
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut retry_after = false;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Outcome::Lost,
            Err(e) if timed_out(&e) => return Outcome::Hung,
            Err(_) => return Outcome::Lost,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                retry_after |= line.to_ascii_lowercase().starts_with("retry-after:");
            }
        }
    }
    if status != 200 {
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        return Outcome::Refused {
            status,
            retry_after,
        };
    }
    if body["stream"] != true {
        let mut rest = Vec::new();
        return match r.read_to_end(&mut rest) {
            Ok(_) if String::from_utf8_lossy(&rest).contains("\"choices\"") => Outcome::Completed,
            Err(e) if timed_out(&e) => Outcome::Hung,
            _ => Outcome::Lost,
        };
    }
    match read_sse(r, limit.saturating_sub(start.elapsed())) {
        (events, End::Done) => match events.iter().find(|e| !e["error"].is_null()) {
            Some(e) => Outcome::InBand(e["error"]["code"].as_u64().unwrap_or(0) as u16),
            None => Outcome::Completed,
        },
        (_, End::Closed) => Outcome::Lost,
        (_, End::TimedOut) => Outcome::Hung,
    }
}

/// `clients` threads that each send `body` again and again until `stop` is set, tallying
/// every outcome (each request bounded by `limit`).
pub fn closed_loop(
    clients: usize,
    port: u16,
    path: &str,
    body: &Value,
    limit: Duration,
    stop: &AtomicBool,
) -> Tally {
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let o = run_request(port, path, body, limit);
                    if let Ok(mut t) = tally.lock() {
                        t.add(&o);
                    }
                    if o == Outcome::Unreachable {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
        }
    });
    tally.into_inner().unwrap_or_default()
}

/// Sends `count` requests at once (one thread each) and tallies them.
pub fn burst(count: usize, port: u16, path: &str, body: &Value, limit: Duration) -> Tally {
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|s| {
        for _ in 0..count {
            s.spawn(|| {
                let o = run_request(port, path, body, limit);
                if let Ok(mut t) = tally.lock() {
                    t.add(&o);
                }
            });
        }
    });
    tally.into_inner().unwrap_or_default()
}

/// Peak resident memory (VmHWM, MiB) of process `pid`, None when it cannot be read.
pub fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let kb: u64 = l
            .strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024)
    })
}

/// Sends a signal (`STOP`, `CONT`, `TERM`, `KILL`) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}
