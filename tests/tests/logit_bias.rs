//! `logit_bias` through the real binaries (`llmapi-launch serve` on the demo model): a +100
//! bias on one token makes every generated token that token, greedy and sampled, on both
//! endpoints; an id outside the model's vocabulary is a 400 naming the field.

use llmapi_tests::{demo_model, free_port, post, serve};
use serde_json::{Value, json};

/// A merged token of the demo model's byte-level BPE vocabulary (2048 tokens): ASCII text,
/// neither a byte nor a special token.
const FORCED: u32 = 300;
/// Tokens generated per request.
const STEPS: usize = 6;

/// The token strings of a completion with echo and logprobs: the prompt's, then the output's.
fn echoed_tokens(v: &Value) -> Vec<String> {
    v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_full_logit_bias_makes_every_generated_token_the_biased_one() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let bias = json!({ FORCED.to_string(): 100 });
    let completion = |temperature: f64, bias: &Value| {
        let r = post(
            port,
            "/v1/completions",
            &json!({"model": "demo", "prompt": [FORCED], "echo": true, "logprobs": 0,
                "max_tokens": STEPS, "temperature": temperature, "seed": 3,
                "logit_bias": bias}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    // Unbiased, greedy decoding does not repeat the token: the bias is what forces it.
    let free = echoed_tokens(&completion(0.0, &json!({})));
    assert_eq!(free.len(), 1 + STEPS, "{free:?}");
    assert!(free[1..].iter().any(|t| *t != free[0]), "{free:?}");
    for temperature in [0.0, 1.0] {
        let v = completion(temperature, &bias);
        let tokens = echoed_tokens(&v);
        assert_eq!(tokens.len(), 1 + STEPS, "temperature {temperature}: {v}");
        assert!(
            tokens.iter().all(|t| *t == tokens[0]),
            "temperature {temperature}: every token is the prompt's token {FORCED}: {tokens:?}"
        );
        assert_eq!(v["usage"]["completion_tokens"], STEPS);

        let r = post(
            port,
            "/v1/chat/completions",
            &json!({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": STEPS, "temperature": temperature, "logit_bias": bias}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            tokens[0].repeat(STEPS),
            "temperature {temperature}: {v}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
}

#[test]
fn a_logit_bias_outside_the_vocabulary_is_refused_by_name() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "demo", "prompt": "Hi", "max_tokens": 2, "logit_bias": {"2048": 5}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2, "logit_bias": {"7": 5, "99999": -5}}),
        ),
    ] {
        let r = post(port, path, &body);
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["param"], "logit_bias", "{path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("outside the vocabulary")),
            "{path}: {v}"
        );
    }
}
