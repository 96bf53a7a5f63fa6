//! Logs an operator can ship: `--log_format json` writes one JSON object per line carrying the
//! request's id and trace id, and text logs written to a file hold no ANSI escape codes.

use std::process::Command;
use std::time::Duration;

use llmapi_tests::{Proc, bin, demo_model, free_port, post, serve};
use serde_json::{Value, json};

fn chat(port: u16) -> Value {
    let r = post(
        port,
        "/v1/chat/completions",
        &json!({
            "model": demo_model().file_name().expect("model dir").to_string_lossy(),
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn stop(mut p: Proc) -> String {
    assert!(
        p.terminate(Duration::from_secs(30)),
        "{} did not stop",
        p.name
    );
    std::fs::read_to_string(&p.log).expect("log file")
}

#[test]
fn json_lines_carry_the_request_id_and_trace_id() {
    let port = free_port();
    let p = serve(
        demo_model(),
        port,
        &["--log_format", "json", "--log_level", "debug"],
        &[],
    );
    let id = chat(port)["id"].as_str().expect("id").to_owned();
    let log = stop(p);
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 10, "too few lines:\n{log}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object()),
        "a line without level or fields:\n{log}"
    );
    // The worker's line for the request names it and the trace the router opened.
    let generate = lines
        .iter()
        .find(|l| {
            l["span"]["name"] == "generate"
                && l["span"]["request_id"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&id))
        })
        .unwrap_or_else(|| panic!("no line in the request's generate span:\n{log}"));
    let trace = generate["span"]["trace_id"].as_str().expect("trace_id");
    assert_eq!(trace.len(), 32, "{generate}");
    // The router's line for the same request sits under the same trace.
    assert!(
        lines.iter().any(|l| l["spans"].as_array().is_some_and(|s| s
            .iter()
            .any(|s| s["name"] == "request" && s["trace_id"] == trace))),
        "no router line under trace {trace}:\n{log}"
    );
}

#[test]
fn text_logs_written_to_a_file_hold_no_colour_codes() {
    let port = free_port();
    let p = serve(demo_model(), port, &[], &[]);
    chat(port);
    let log = stop(p);
    assert!(log.contains("INFO"), "no log lines:\n{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a redirected log:\n{log}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_values() {
    let out = Command::new(bin("llmapi-launch"))
        .args(["serve", "--log_format", "yaml"])
        .output()
        .expect("llmapi-launch");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_format") && err.contains("json"), "{err}");

    let out = Command::new(bin("llmapi-router"))
        .arg(demo_model())
        .args(["--log_format", "yaml"])
        .output()
        .expect("llmapi-router");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--log_format") && err.contains("json"),
        "{err}"
    );

    let out = Command::new(bin("llmapi-launch"))
        .args(["serve", "--port", "1"])
        .env("LLMAPI_LOG_FORMAT", "yaml")
        .output()
        .expect("llmapi-launch");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LLMAPI_LOG_FORMAT=yaml"), "{err}");
}
