//! Memory of reading a hostile body: 30 MiB of `[[1],[1],...]` as `prompt`, or under an
//! unknown key, is refused (the unknown key's value skipped, its name kept) without being
//! buffered into serde's intermediate values first. Peak resident memory (VmHWM, reset through /proc/self/clear_refs) is read
//! around the parse; one test per binary, so no other test's allocations interleave.
//! Linux only: elsewhere the figures cannot be read and the test says so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use llmapi_router::parse::{BodyCaps, completion_request};
use llmapi_router::state::{
    DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST, DEFAULT_MAX_PROMPTS_PER_REQUEST,
};

const MIB: u64 = 1 << 20;

/// `VmRSS` or `VmHWM` of this process, in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Peak resident bytes above the resident size before `f` ran.
fn peak_growth(f: impl FnOnce()) -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    let before = status_bytes("VmRSS:")?;
    f();
    Some(status_bytes("VmHWM:")?.saturating_sub(before))
}

/// `{"model": "demo", <key>: [[1],[1],...]}` of about `bytes` bytes.
fn body(key: &str, bytes: usize) -> Vec<u8> {
    let items = bytes / 4;
    let mut b = format!(r#"{{"model": "demo", "max_tokens": 1, "{key}": ["#).into_bytes();
    b.reserve(bytes + 64);
    for _ in 1..items {
        b.extend_from_slice(b"[1],");
    }
    b.extend_from_slice(b"[1]]");
    if key != "prompt" {
        b.extend_from_slice(br#", "prompt": "hi""#);
    }
    b.extend_from_slice(b"}");
    b
}

#[test]
fn a_30_mib_prompt_list_is_read_without_buffering_it() {
    let caps = BodyCaps {
        max_prompts: DEFAULT_MAX_PROMPTS_PER_REQUEST,
        max_prompt_tokens: DEFAULT_MAX_PROMPT_TOKENS_PER_REQUEST,
    };
    let prompts = body("prompt", 30 << 20);
    let junk = body("junk", 30 << 20);
    let mut refused = None;
    let Some(as_prompt) = peak_growth(|| refused = Some(completion_request(&prompts, caps))) else {
        eprintln!("peak memory cannot be read here (/proc/self/clear_refs): not measured");
        return;
    };
    let e = refused
        .expect("ran")
        .expect_err("7.9 million prompts are refused");
    assert!(e.message.contains("7864320 prompts"), "{}", e.message);
    let mut read = None;
    let as_junk = peak_growth(|| read = Some(completion_request(&junk, caps))).expect("measured");
    let e = read
        .expect("ran")
        .expect_err("an unknown key is skipped, then refused");
    assert_eq!(e.param.as_deref(), Some("junk"), "{}", e.message);
    println!(
        "30 MiB [[1],...] body: peak growth while reading {} KiB as prompt, {} KiB under an unknown key",
        as_prompt >> 10,
        as_junk >> 10
    );
    // serde's untagged / flatten buffering of the same body peaks above 1 GiB.
    assert!(as_prompt < 64 * MIB, "prompt: {} MiB", as_prompt / MIB);
    assert!(as_junk < 64 * MIB, "unknown key: {} MiB", as_junk / MIB);
}
