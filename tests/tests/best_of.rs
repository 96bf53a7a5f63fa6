//! `best_of` through the real binaries on the demo model: of best_of seeded sampled choices,
//! the one returned is the one with the highest cumulative logprob, the same choice that
//! n = best_of with the same seed shows among all of them.

use llmapi_tests::{demo_model, free_port, post, serve};
use serde_json::{Value, json};

const BEST_OF: usize = 4;

/// Text and cumulative logprob of each choice.
fn scored(v: &Value) -> Vec<(String, f64)> {
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    choices
        .iter()
        .map(|c| {
            let sum = c["logprobs"]["token_logprobs"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).sum())
                .unwrap_or(f64::NAN);
            (c["text"].as_str().unwrap_or_default().to_owned(), sum)
        })
        .collect()
}

#[test]
fn best_of_returns_the_choice_with_the_highest_cumulative_logprob() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let ask = |extra: Value| {
        let mut body = json!({"model": "demo", "prompt": "Once upon a time", "max_tokens": 8,
            "temperature": 1.0, "seed": 24, "logprobs": 0});
        body.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        let r = post(port, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        scored(&r.json())
    };
    // The same seeds (seed + choice index) with every choice returned.
    let all = ask(json!({"n": BEST_OF}));
    assert_eq!(all.len(), BEST_OF);
    let texts: std::collections::HashSet<&str> = all.iter().map(|c| c.0.as_str()).collect();
    assert!(
        texts.len() > 1,
        "sampled choices differ, so ranking matters: {all:?}"
    );
    let (at, best) = all
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.1.total_cmp(&b.1.1))
        .expect("choices");
    // With this seed the best is not the first choice: returning the first would fail.
    assert_ne!(at, 0, "{all:?}");
    let kept = ask(json!({"n": 1, "best_of": BEST_OF}));
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].0, best.0, "the best of {all:?}");
    assert!((kept[0].1 - best.1).abs() < 1e-4, "{kept:?} vs {best:?}");
}
