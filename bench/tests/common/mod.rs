//! Shared pieces of the bench tests: the scripted server double, a tiny tokenizer, and a runner
//! for the real `llmapi-bench` binary with a bounded wait.

#![allow(dead_code)]

pub mod scripted_server;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Writes a word-level tokenizer.json of 64 words ("w0".."w63", plus "tok") into `dir`.
pub fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    // Every token's text encodes back to that one token (as byte-level BPE nearly always
    // does), so random prompts reach exactly the requested length.
    vocab.insert("unk".into(), 0.into());
    vocab.insert("tok".into(), 1.into());
    for i in 2..64 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "unk"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("write tokenizer");
}

/// Runs the llmapi-bench binary with `args`, killing it after `limit`.
pub fn run_bench(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmapi-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn llmapi-bench");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

/// stdout and stderr as text.
pub fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
