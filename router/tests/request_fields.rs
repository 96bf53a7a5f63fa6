//! No request field is silently ignored: every field an endpoint accepts is read, any other
//! key and every unimplemented OpenAI field that asks for something is a 400 naming it, the
//! openai Python SDK's default bodies are accepted, and docs/serving.md lists exactly the
//! fields the parser accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;

use llmapi_router::error::ApiError;
use llmapi_router::fields::{COMMON_FIELDS, Endpoint};
use llmapi_router::parse::{BodyCaps, chat_request, completion_request};
use serde_json::{Value, json};

const CAPS: BodyCaps = BodyCaps {
    max_prompts: 8,
    max_prompt_tokens: 64,
};

/// Parses `extra` merged over a minimal valid body of `endpoint`.
fn parse(endpoint: Endpoint, extra: Value) -> Result<(), ApiError> {
    let mut body = match endpoint {
        Endpoint::Completions => json!({"model": "m", "prompt": "hi"}),
        Endpoint::Chat => json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    };
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let bytes = serde_json::to_vec(&body).unwrap();
    match endpoint {
        Endpoint::Completions => completion_request(&bytes, CAPS).map(|_| ()),
        Endpoint::Chat => chat_request(&bytes, CAPS).map(|_| ()),
    }
}

const ENDPOINTS: [Endpoint; 2] = [Endpoint::Completions, Endpoint::Chat];

#[test]
fn every_accepted_field_is_read() {
    for endpoint in ENDPOINTS {
        for field in endpoint.accepted() {
            // A field that is read refuses at least one of these shapes as the wrong type; a
            // skipped one would take both.
            let results: Vec<_> = [json!("x"), json!({"x": 1})]
                .into_iter()
                .map(|v| parse(endpoint, json!({ field: v })))
                .collect();
            assert!(
                results.iter().any(Result::is_err),
                "{endpoint:?}: `{field}` takes any value: it is not read"
            );
            for e in results.into_iter().filter_map(Result::err) {
                assert!(
                    !e.message.starts_with("unknown field"),
                    "{endpoint:?}: accepted `{field}` refused as unknown: {}",
                    e.message
                );
            }
        }
    }
}

#[test]
fn unknown_keys_are_refused_naming_the_first() {
    for endpoint in ENDPOINTS {
        let e = parse(endpoint, json!({"frobnicate": true, "zz_other": 1})).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("frobnicate"), "{}", e.message);
        assert!(
            e.message.contains("unknown field `frobnicate`"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("accepted fields: model,"),
            "{}",
            e.message
        );
    }
    // Endpoint fields are not shared: echo is a completions field, messages a chat one.
    let e = parse(Endpoint::Chat, json!({"echo": true})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("echo"));
    let e = parse(Endpoint::Completions, json!({"messages": []})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"));
    // A huge key is named cut short.
    let long = "k".repeat(100_000);
    let e = parse(Endpoint::Completions, json!({ long.as_str(): 1 })).unwrap_err();
    assert_eq!(e.param.as_deref().map(str::len), Some(64));
}

#[test]
fn unimplemented_fields_are_refused_unless_they_ask_for_nothing() {
    use Endpoint::{Chat, Completions};
    let cases: &[(Endpoint, &str, Vec<Value>, Vec<Value>)] = &[
        (
            Completions,
            "suffix",
            vec![json!("")],
            vec![json!(" and then")],
        ),
        (
            Chat,
            "functions",
            vec![json!([])],
            vec![json!([{"name": "f"}])],
        ),
        (
            Chat,
            "function_call",
            vec![json!("none")],
            vec![json!("auto")],
        ),
    ];
    for (endpoint, field, fine, refused) in cases {
        parse(*endpoint, json!({ *field: null })).expect("null asks for nothing");
        for v in fine {
            parse(*endpoint, json!({ *field: v }))
                .unwrap_or_else(|e| panic!("{field} {v} asks for nothing: {}", e.message));
        }
        for v in refused {
            let e = parse(*endpoint, json!({ *field: v })).expect_err(&format!("{field} {v}"));
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(*field), "{}", e.message);
            assert!(e.message.contains("not implemented"), "{}", e.message);
        }
    }
}

#[test]
fn structured_output_fields_are_read_on_both_endpoints() {
    use llmapi_common::guided::Constraint;
    for endpoint in ENDPOINTS {
        let mut body = match endpoint {
            Endpoint::Completions => json!({"model": "m", "prompt": "hi"}),
            Endpoint::Chat => {
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            }
        };
        body["response_format"] = json!({"type": "json_object"});
        let bytes = serde_json::to_vec(&body).unwrap();
        let common = match endpoint {
            Endpoint::Completions => completion_request(&bytes, CAPS).map(|r| r.common),
            Endpoint::Chat => chat_request(&bytes, CAPS).map(|r| r.common),
        }
        .unwrap();
        let guided = common.guided.expect("response_format read");
        assert_eq!(guided.constraint, Constraint::JsonObject, "{endpoint:?}");
        body["guided_choice"] = json!(["a"]);
        let e = parse(endpoint, body.clone()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("guided_choice"), "{}", e.message);
    }
}

#[test]
fn logit_bias_is_read_on_both_endpoints_and_checked_by_name() {
    use llmapi_common::generation_config::SamplingDefaults;
    for (i, endpoint) in ENDPOINTS.into_iter().enumerate() {
        let mut body = match endpoint {
            Endpoint::Completions => json!({"model": "m", "prompt": "hi"}),
            Endpoint::Chat => {
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            }
        };
        let settings = |b: &Value| {
            let bytes = serde_json::to_vec(b).unwrap();
            let common = match endpoint {
                Endpoint::Completions => completion_request(&bytes, CAPS).map(|r| r.common),
                Endpoint::Chat => chat_request(&bytes, CAPS).map(|r| r.common),
            }?;
            common.settings(None, &SamplingDefaults::default())
        };
        body["logit_bias"] = json!({"50256": -100, "7": 2.5});
        let s = settings(&body).unwrap_or_else(|e| panic!("{endpoint:?}: {}", e.message));
        assert_eq!(s.sampling.logit_bias.len(), 2, "{endpoint:?}");
        assert_eq!(s.sampling.logit_bias[&50256], -100.0);
        body["logit_bias"] = json!({ "1": 101 + i });
        let e = settings(&body).expect_err("a bias past 100");
        assert_eq!(e.param.as_deref(), Some("logit_bias"), "{}", e.message);
    }
}

#[test]
fn best_of_is_read_and_held_between_n_and_the_cap() {
    use llmapi_common::generation_config::SamplingDefaults;
    let settings = |extra: Value| {
        let mut body = json!({"model": "m", "prompt": "hi"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let req = completion_request(&serde_json::to_vec(&body).unwrap(), CAPS)?;
        let mut s = req
            .common
            .settings(req.logprobs, &SamplingDefaults::default())?;
        req.apply_best_of(&mut s)?;
        Ok::<_, ApiError>(s)
    };
    for (extra, n, keep, logprobs) in [
        (json!({}), 1, 1, None),
        (json!({"best_of": 1}), 1, 1, None),
        (json!({"best_of": 3, "n": 3}), 3, 3, None),
        (json!({"best_of": 4, "n": 2}), 4, 2, Some(0)),
        (json!({"best_of": 3, "logprobs": 2}), 3, 1, Some(2)),
    ] {
        let s = settings(extra.clone()).unwrap_or_else(|e| panic!("{extra}: {}", e.message));
        assert_eq!((s.n, s.keep), (n, keep), "{extra}: choices run and kept");
        assert_eq!(
            s.sampling.logprobs, logprobs,
            "{extra}: logprobs asked of workers"
        );
    }
    for (bad, says) in [
        (json!({"best_of": 1, "n": 2}), "between n (2)"),
        (json!({"best_of": 17}), "and 16"),
        (json!({"best_of": 2, "stream": true}), "cannot be streamed"),
    ] {
        let e = settings(bad.clone()).expect_err(&bad.to_string());
        assert_eq!(e.param.as_deref(), Some("best_of"), "{}", e.message);
        assert!(e.message.contains(says), "{bad}: {}", e.message);
    }
    let e = settings(json!({"best_of": "2"})).expect_err("a string");
    assert_eq!(e.status, 400, "{}", e.message);
}

#[test]
fn stream_options_need_stream() {
    for endpoint in ENDPOINTS {
        let opts = json!({"include_usage": true});
        parse(endpoint, json!({"stream": true, "stream_options": opts})).unwrap();
        let vllm_only = json!({"stream": true, "stream_options": {"continuous_usage_stats": true}});
        let e = parse(endpoint, vllm_only).unwrap_err();
        assert!(
            e.message.contains("continuous_usage_stats"),
            "{}",
            e.message
        );
        for stream in [json!({}), json!({"stream": false})] {
            let mut body = stream.clone();
            body["stream_options"] = opts.clone();
            let e = parse(endpoint, body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("stream_options"), "{}", e.message);
        }
    }
}

#[test]
fn the_openai_sdks_default_bodies_are_accepted() {
    // As openai-python 3.x sends them (captured): only the fields a caller passes.
    let bodies = [
        (Endpoint::Completions, r#"{"model": "m", "prompt": "hi"}"#),
        (
            Endpoint::Completions,
            r#"{"model": "m", "stream": true, "prompt": "hi"}"#,
        ),
        (
            Endpoint::Chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#,
        ),
        (
            Endpoint::Chat,
            r#"{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}"#,
        ),
    ];
    for (endpoint, body) in bodies {
        let r = match endpoint {
            Endpoint::Completions => completion_request(body.as_bytes(), CAPS).map(|_| ()),
            Endpoint::Chat => chat_request(body.as_bytes(), CAPS).map(|_| ()),
        };
        r.unwrap_or_else(|e| panic!("{body}: {}", e.message));
    }
}

#[test]
fn docs_serving_md_lists_the_accepted_fields() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/serving.md");
    let doc = std::fs::read_to_string(p).expect("docs/serving.md exists");
    let mut read: [BTreeSet<String>; 3] = Default::default();
    let mut unimplemented: [BTreeSet<String>; 2] = Default::default();
    for line in doc.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [endpoint, field, accepted] = cells[..] else {
            continue;
        };
        let slot = match endpoint {
            "both" => 0,
            "`/v1/completions`" => 1,
            "`/v1/chat/completions`" => 2,
            _ => continue,
        };
        let field = field.trim_matches('`').to_owned();
        if accepted.starts_with("read") {
            read[slot].insert(field);
        } else if accepted.starts_with("not implemented") && slot > 0 {
            unimplemented[slot - 1].insert(field);
        } else {
            panic!("docs/serving.md: unexpected row {line}");
        }
    }
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(read[0], set(COMMON_FIELDS), "fields of both endpoints");
    for (i, endpoint) in ENDPOINTS.into_iter().enumerate() {
        let own: Vec<&str> = endpoint
            .accepted()
            .into_iter()
            .filter(|f| !COMMON_FIELDS.contains(f))
            .collect();
        assert_eq!(read[i + 1], set(&own), "{endpoint:?}: fields read");
        assert_eq!(
            unimplemented[i],
            set(endpoint.unimplemented()),
            "{endpoint:?}: unimplemented fields"
        );
    }
}
