//! Checkpoints laid out as the Hub ships them, served by `llmapi-launch serve`: a chat
//! template only in chat_template.jinja, and generation_config.json's sampling defaults
//! (`--generation_config auto|vllm`).

use std::path::{Path, PathBuf};

use llmapi_tests::{demo_model, free_port, post, serve};
use serde_json::{Value, json};

/// A copy of the demo model in a temp dir (still named `demo`, its served name), changed by
/// `edit`.
fn demo_copy(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("demo");
    std::fs::create_dir(&dir).expect("model dir");
    for entry in std::fs::read_dir(demo_model())
        .expect("demo model")
        .flatten()
    {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy a model file");
    }
    edit(&dir);
    (root, dir)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON")
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, v.to_string()).expect("write");
}

#[test]
fn a_model_whose_chat_template_is_only_in_chat_template_jinja_answers_chat() {
    let (_root, dir) = demo_copy(|dir| {
        let path = dir.join("tokenizer_config.json");
        let mut config = read_json(&path);
        let template = config
            .as_object_mut()
            .and_then(|m| m.remove("chat_template"))
            .and_then(|t| t.as_str().map(String::from))
            .expect("the demo model has a chat template");
        write_json(&path, &config);
        std::fs::write(dir.join("chat_template.jinja"), template).expect("write the template");
    });
    let port = free_port();
    let server = serve(&dir, port, &[], &[]);
    let r = post(
        port,
        "/v1/chat/completions",
        &json!({"model": "demo", "messages": [{"role": "user", "content": "Hi!"}],
        "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{v}");
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains("chat_template.jinja"),
        "the log names the template's file:\n{log}"
    );
}

/// The completion text of `prompt` for a request with `extra` fields (12 tokens, ignoring EOS).
fn complete(port: u16, extra: Value) -> String {
    let mut body = json!({"model": "demo", "prompt": "Once upon a time", "max_tokens": 12,
        "ignore_eos": true});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let r = post(port, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"]
        .as_str()
        .expect("a completion text")
        .to_owned()
}

/// Whether every seeded request with `extra` fields equals `greedy`.
fn all_seeds_give(port: u16, extra: &Value, greedy: &str) -> bool {
    (1..=3).all(|seed| {
        let mut e = extra.clone();
        e["seed"] = json!(seed);
        complete(port, e) == greedy
    })
}

#[test]
fn generation_config_defaults_fill_unset_fields_and_explicit_fields_win() {
    // top_k 1 makes a request that sets no top_k greedy, whatever its seed.
    let (_root, dir) = demo_copy(|dir| {
        let path = dir.join("generation_config.json");
        let mut g = read_json(&path);
        g["temperature"] = json!(1.0);
        g["top_k"] = json!(1);
        write_json(&path, &g);
    });
    let port = free_port();
    let server = serve(&dir, port, &[], &[]);
    let greedy = complete(port, json!({"temperature": 0}));
    assert!(
        all_seeds_give(port, &json!({}), &greedy),
        "an unset top_k takes generation_config.json's top_k 1"
    );
    assert!(
        !all_seeds_give(port, &json!({"top_k": -1}), &greedy),
        "an explicit top_k keeps its value (sampling at temperature 1 differs from greedy)"
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains(
            "Default sampling parameters have been overridden by the model's generation config"
        ) && log.contains(r#""top_k":1"#),
        "the override is logged at start:\n{log}"
    );
    drop(server);

    let port = free_port();
    let _server = serve(&dir, port, &["--generation_config", "vllm"], &[]);
    assert_eq!(complete(port, json!({"temperature": 0})), greedy);
    assert!(
        !all_seeds_give(port, &json!({}), &greedy),
        "--generation_config vllm: an unset top_k stays disabled"
    );
}
