//! `llmapi-launch serve MODEL --tp_size 2` without Slurm: the server starts its second rank as
//! a child process, answers exactly as one rank does, stops its rank on SIGTERM, and when the
//! rank is killed mid-stream the client's stream ends and, with `--max_restarts 0`, the server
//! exits naming the rank.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use llmapi_tests::{demo_model, free_port, post, send, serve};
use serde_json::json;

/// Pids of the live (not zombie) children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1
            && fields[0] != "Z"
            && fields[1] == pid.to_string()
            && let Ok(p) = entry.file_name().to_string_lossy().parse()
        {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` is gone or a zombie waiting to be reaped.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

fn completion(port: u16) -> String {
    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "Hello, my name is", "max_tokens": 12,
                "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn serve_with_tp_size_2_answers_like_one_rank_and_stops_its_rank_on_sigterm() {
    let want = {
        let port = free_port();
        let _one = serve(demo_model(), port, &[], &[]);
        completion(port)
    };
    let port = free_port();
    let mut two = serve(demo_model(), port, &["--tp_size", "2"], &[]);
    let ranks = children(two.pid());
    assert_eq!(
        ranks.len(),
        1,
        "one rank process besides the leader: {ranks:?}"
    );
    assert_eq!(completion(port), want, "tp_size 2 and 1 differ");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &two.pid().to_string()])
        .status();
    let status = two
        .wait_exit(Duration::from_secs(30))
        .expect("the server stops within 30 s of SIGTERM");
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    let gone = llmapi_tests::wait_until(Duration::from_secs(15), || exited(ranks[0]));
    assert!(gone, "rank process {} outlived the server", ranks[0]);
}

#[test]
fn killing_a_rank_mid_stream_ends_the_stream_and_the_server_exits_naming_it() {
    let port = free_port();
    // Without restarts (restart.rs covers the group restarting instead).
    let mut server = serve(
        demo_model(),
        port,
        &["--tp_size", "2", "--max_restarts", "0"],
        &[],
    );
    let ranks = children(server.pid());
    assert_eq!(ranks.len(), 1, "{ranks:?}");
    let body = json!({"model": "demo", "prompt": "Once upon a time", "max_tokens": 1900,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let stream = send(port, "POST", "/v1/completions", Some(body.as_bytes()), &[]).unwrap();
    let mut reader = BufReader::new(stream);
    // Wait for the first streamed token, then kill the rank.
    let mut line = String::new();
    let started = Instant::now();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream closed early"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &ranks[0].to_string()])
        .status();
    let killed = Instant::now();
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "the stream took {:?} to end after the rank died",
        killed.elapsed()
    );
    assert!(
        !rest.contains("\"finish_reason\":\"length\""),
        "the stream finished normally although its group lost a rank: {rest}"
    );
    assert!(
        rest.contains("\"error\"") && rest.contains("rank 1"),
        "the stream's last event is not an error naming the dead rank: {rest}"
    );
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits within 30 s of losing a rank");
    assert!(!status.success());
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains("rank 1"),
        "the server's log does not name the dead rank:\n{log}"
    );
}

#[test]
fn a_tp_size_the_model_cannot_take_is_refused_before_any_rank_starts() {
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(llmapi_tests::bin("llmapi-launch"))
        .arg("serve")
        .arg(demo_model())
        .args(["--port", &free_port().to_string(), "--tp_size", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("num_attention_heads 4 is not divisible by tp_size 3")
            && err.contains("vocab_size 2048"),
        "{err}"
    );
}

#[test]
fn a_rank_exits_when_the_serve_that_started_it_is_killed() {
    let port = free_port();
    let mut server = serve(demo_model(), port, &["--tp_size", "2"], &[]);
    let ranks = children(server.pid());
    assert_eq!(ranks.len(), 1, "{ranks:?}");
    server.kill();
    let gone = llmapi_tests::wait_until(Duration::from_secs(15), || exited(ranks[0]));
    assert!(gone, "rank process {} outlived its killed leader", ranks[0]);
}

#[test]
fn a_rank_killed_while_the_group_forms_stops_the_server_promptly() {
    let port = free_port();
    let mut cmd = std::process::Command::new(llmapi_tests::bin("llmapi-launch"));
    cmd.arg("serve")
        .arg(demo_model())
        .args(["--port", &port.to_string(), "--tp_size", "2"]);
    let mut server = llmapi_tests::Proc::spawn(&format!("serve-forming-{port}"), cmd);
    let started = Instant::now();
    let rank = loop {
        if let Some(&r) = children(server.pid()).first() {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no rank was started"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &rank.to_string()])
        .status();
    // Whether the rank died before or after the group formed, the server must not wait for
    // the 300 s join timeout.
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits within 30 s of losing a rank");
    assert!(!status.success());
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(log.contains("rank 1"), "{log}");
}
