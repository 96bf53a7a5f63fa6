//! /metrics through the real app over scripted workers: the histograms move as requests
//! do (one TTFT and end-to-end observation per request, generation tokens summing to the
//! tokens generated), the exposition is well-formed OpenMetrics text (`# TYPE` for every
//! sample, cumulative buckets, `+Inf` equal to `_count`, `# EOF`), it is served with the
//! OpenMetrics content type, and every metric docs/serving.md lists is there.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{Harness, eventually, health, sse_payloads, start};
use llmapi_router::server::app;
use llmapi_router::testing::{LoadCounters, Script};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The metrics table of docs/serving.md.
const SERVING_MD: &str = include_str!("../../docs/serving.md");

/// One sample line: name, labels (in order) and value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// An exposition parsed: each family's type, and the samples.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, v) = rest.split_once("=\"").expect("label=\"value\"");
        let end = v.find('"').expect("closing quote");
        out.push((k.to_owned(), v[..end].to_owned()));
        rest = v[end + 1..].trim_start_matches(',');
    }
    out
}

/// Parses the text format, checking as it goes that it is well formed: `# EOF` last, one
/// `# TYPE` per family before its samples, and every sample of a declared family with the
/// suffixes its type allows.
fn parse(text: &str) -> Exposition {
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some("# EOF"), "the exposition ends with # EOF");
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in lines {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, ty) = t.split_once(' ').expect("# TYPE name type");
            let old = types.insert(name.to_owned(), ty.to_owned());
            assert!(old.is_none(), "two # TYPE lines for {name}");
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.strip_suffix('}').expect("closing brace"))),
            None => (series, Vec::new()),
        };
        let value: f64 = value.parse().expect("numeric value");
        let family = types
            .iter()
            .find(|(f, ty)| {
                let suffixes: &[&str] = match ty.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| name == format!("{f}{s}"))
            })
            .map(|(f, _)| f.clone());
        assert!(
            family.is_some(),
            "sample {name} has no # TYPE line before it"
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Exposition { types, samples }
}

impl Exposition {
    /// The value of the sample `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && s.labels
                        .iter()
                        .zip(labels)
                        .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            })
            .map(|s| s.value)
    }

    /// `_count` and `_sum` of the unlabelled histogram `name`.
    fn histogram(&self, name: &str) -> (f64, f64) {
        let count = self.value(&format!("{name}_count"), &[]).expect(name);
        let sum = self.value(&format!("{name}_sum"), &[]).expect(name);
        (count, sum)
    }

    /// Every histogram's buckets, per series (its labels but `le`), are cumulative,
    /// ascending in `le`, end at `+Inf`, and `+Inf` equals the series' `_count`.
    fn check_histograms(&self) {
        for (family, ty) in &self.types {
            if ty != "histogram" {
                continue;
            }
            let bucket = format!("{family}_bucket");
            let mut series: BTreeMap<Vec<(String, String)>, Vec<&Sample>> = BTreeMap::new();
            for b in self.samples.iter().filter(|s| s.name == bucket) {
                let key = b
                    .labels
                    .iter()
                    .filter(|(k, _)| k != "le")
                    .cloned()
                    .collect();
                series.entry(key).or_default().push(b);
            }
            assert!(!series.is_empty(), "{family} has no buckets");
            for (labels, buckets) in series {
                let mut last_le = f64::NEG_INFINITY;
                let mut last_n = 0.0;
                for b in &buckets {
                    let le = &b.labels.iter().find(|(k, _)| k == "le").expect("le").1;
                    let le: f64 = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("numeric le")
                    };
                    assert!(le > last_le, "{family}{labels:?}: le not ascending");
                    assert!(
                        b.value >= last_n,
                        "{family}{labels:?}: buckets not cumulative"
                    );
                    last_le = le;
                    last_n = b.value;
                }
                assert_eq!(
                    last_le,
                    f64::INFINITY,
                    "{family}{labels:?}: last bucket is +Inf"
                );
                let pairs: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let count = self
                    .value(&format!("{family}_count"), &pairs)
                    .expect("count");
                assert_eq!(
                    last_n, count,
                    "{family}{labels:?}: +Inf bucket equals _count"
                );
            }
        }
    }

    /// Whether the documented metric `name` (samples' spelling) is declared.
    fn declares(&self, name: &str) -> bool {
        let family = name.strip_suffix("_total").unwrap_or(name);
        self.types.contains_key(name) || self.types.get(family).is_some_and(|ty| ty == "counter")
    }
}

/// GET /metrics: status, content type and body.
async fn scrape(h: &Harness) -> (StatusCode, String, String) {
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .expect("request");
    let resp = app(h.state.clone()).oneshot(req).await.expect("infallible");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .expect("body");
    (status, ctype, String::from_utf8_lossy(&bytes).into_owned())
}

/// The metric names of the table in docs/serving.md's Metrics section.
fn documented() -> Vec<String> {
    let section = SERVING_MD
        .split("\n## Metrics\n")
        .nth(1)
        .expect("docs/serving.md has a ## Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

fn script() -> Script {
    Script {
        reply: b"hello world, how are you"
            .iter()
            .map(|&b| u32::from(b))
            .collect(),
        token_delay: Duration::from_millis(2),
        load_counters: LoadCounters {
            preemptions: 3,
            prefix_cache_queries: 200,
            prefix_cache_hits: 50,
            iterations: 10,
            iteration_tokens: 40,
        },
        ..Script::default()
    }
}

#[tokio::test]
async fn histograms_follow_streamed_and_whole_requests_and_the_text_parses() {
    let h = start(vec![script()], |_| {}).await;
    let before = parse(&h.metrics().await);
    assert_eq!(
        before
            .histogram("llmapi_router_time_to_first_token_seconds")
            .0,
        0.0
    );

    // Two whole answers (one of n = 2) and two streams: four requests, five choices.
    let mut generated = 0u64;
    for (max_tokens, n) in [(5u32, 1u32), (3, 2)] {
        let (status, v) = h
            .post(
                json!({"model": "demo", "prompt": "abcdefghij", "max_tokens": max_tokens, "n": n}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], max_tokens * n, "{v}");
        generated += u64::from(max_tokens * n);
    }
    for max_tokens in [4u32, 6] {
        let resp = h
            .send(
                json!({"model": "demo", "prompt": "abcdefghij", "max_tokens": max_tokens,
                         "stream": true, "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let events: Vec<Value> = sse_payloads(&String::from_utf8_lossy(&bytes));
        let usage = events
            .iter()
            .find(|e| !e["usage"].is_null())
            .expect("a usage chunk");
        assert_eq!(usage["usage"]["completion_tokens"], max_tokens);
        generated += u64::from(max_tokens);
    }
    // A request refused before admission: counted by status, not in the histograms.
    let (status, _) = h
        .post(json!({"model": "demo", "prompt": "x", "max_tokens": -1}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let m = parse(&h.metrics().await);
    m.check_histograms();
    let (ttft_n, ttft_sum) = m.histogram("llmapi_router_time_to_first_token_seconds");
    assert_eq!(ttft_n, 4.0, "one TTFT per request");
    assert!(ttft_sum > 0.0);
    let (e2e_n, e2e_sum) = m.histogram("llmapi_router_e2e_request_latency_seconds");
    assert_eq!(e2e_n, 4.0, "one end-to-end latency per request");
    assert!(e2e_sum >= ttft_sum, "a request ends after its first token");
    assert_eq!(
        m.histogram("llmapi_router_request_queue_time_seconds").0,
        4.0
    );
    let (gen_n, gen_sum) = m.histogram("llmapi_router_request_generation_tokens");
    assert_eq!((gen_n, gen_sum), (4.0, generated as f64));
    assert_eq!(
        m.value("llmapi_router_generation_tokens_total", &[]),
        Some(generated as f64)
    );
    let (prompt_n, prompt_sum) = m.histogram("llmapi_router_request_prompt_tokens");
    assert_eq!(prompt_n, 4.0);
    assert_eq!(
        m.value("llmapi_router_prompt_tokens_total", &[]),
        Some(prompt_sum),
        "per-request prompt tokens add up to the counter"
    );
    assert!(
        prompt_sum >= 40.0,
        "four prompts of ten bytes: {prompt_sum}"
    );
    // Deliveries after each choice's first: at least one per choice of several tokens,
    // never more than its tokens after the first.
    let (itl_n, _) = m.histogram("llmapi_router_inter_token_latency_seconds");
    assert!(itl_n >= 5.0 && itl_n <= (generated - 5) as f64, "{itl_n}");

    let route = "/v1/completions";
    assert_eq!(
        m.value(
            "llmapi_router_requests_total",
            &[("route", route), ("status", "200")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.value(
            "llmapi_router_requests_total",
            &[("route", route), ("status", "400")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("llmapi_router_num_requests_running", &[]),
        Some(0.0)
    );
    assert_eq!(
        m.value("llmapi_router_num_requests_waiting", &[]),
        Some(0.0)
    );

    // Per worker, from its Load answers.
    let url = h.workers[0].url();
    let w = [("worker", url.as_str())];
    assert_eq!(
        m.value("llmapi_worker_prefix_cache_hit_ratio", &w),
        Some(0.25)
    );
    assert_eq!(
        m.value("llmapi_worker_prefix_cache_queries_total", &w),
        Some(200.0)
    );
    assert_eq!(
        m.value("llmapi_worker_prefix_cache_hits_total", &w),
        Some(50.0)
    );
    assert_eq!(
        m.value("llmapi_worker_num_preemptions_total", &w),
        Some(3.0)
    );
    assert_eq!(m.value("llmapi_worker_iterations_total", &w), Some(10.0));
    assert_eq!(
        m.value("llmapi_worker_iteration_tokens_total", &w),
        Some(40.0)
    );
    assert_eq!(
        m.value("llmapi_worker_step_tokens_count", &w),
        Some(10.0),
        "the worker's step histogram, as it reported it"
    );
    assert_eq!(m.value("llmapi_worker_step_tokens_sum", &w), Some(40.0));
    assert_eq!(m.value("llmapi_worker_requests_total", &w), Some(5.0));
    assert_eq!(m.value("llmapi_worker_healthy", &w), Some(1.0));

    // A labelled family shows with its first series; migrations need a failing worker
    // (tests/migration.rs), the only event this test does not cause.
    for name in documented() {
        if name == "llmapi_router_migrations_total" {
            continue;
        }
        assert!(m.declares(&name), "documented metric {name} is not exposed");
    }
    assert!(
        documented().len() >= 30,
        "the docs table was not found whole"
    );
    // And the other way round: nothing exposed goes undocumented.
    let docs = documented();
    for (family, ty) in &m.types {
        let sample = if ty == "counter" {
            format!("{family}_total")
        } else {
            family.clone()
        };
        assert!(
            docs.contains(&sample),
            "{sample} is exposed but not in docs/serving.md"
        );
    }
}

#[tokio::test]
async fn kv_cache_usage_is_the_fraction_of_the_workers_blocks_in_use() {
    let slow = Script {
        token_delay: Duration::from_secs(1),
        kv_capacity_blocks: 64,
        ..script()
    };
    let h = start(vec![slow], |_| {}).await;
    let url = h.workers[0].url();
    let w = [("worker", url.as_str())];
    let idle = parse(&h.metrics().await);
    assert_eq!(
        idle.value("llmapi_worker_kv_cache_usage_ratio", &w),
        Some(0.0)
    );

    let state = h.state.clone();
    let running = tokio::spawn(async move {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"model": "demo", "prompt": "abcdefghij", "max_tokens": 2}).to_string(),
            ))
            .expect("request");
        app(state).oneshot(req).await.expect("infallible").status()
    });
    assert!(
        eventually(|| h.requests(0) == 1).await,
        "the request reached the worker"
    );
    h.state.pool.check_all(&health()).await;
    let busy = parse(&h.metrics().await);
    let used = busy
        .value("llmapi_worker_kv_blocks_used", &w)
        .expect("kv blocks used");
    assert!(used > 0.0, "the running request holds blocks");
    assert_eq!(
        busy.value("llmapi_worker_kv_cache_usage_ratio", &w),
        Some(used / 64.0)
    );
    assert_eq!(
        busy.value("llmapi_worker_num_requests_running", &w),
        Some(1.0)
    );
    assert_eq!(
        busy.value("llmapi_router_num_requests_running", &[]),
        Some(1.0)
    );
    // The first token has not come yet: no TTFT is observed before it.
    assert_eq!(
        busy.histogram("llmapi_router_time_to_first_token_seconds")
            .0,
        0.0
    );
    assert_eq!(running.await.expect("join"), StatusCode::OK);
}

#[tokio::test]
async fn metrics_are_served_as_openmetrics_text() {
    let h = start(vec![script()], |_| {}).await;
    let (status, ctype, text) = scrape(&h).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let m = parse(&text);
    // Counters are declared under their family name, their samples end in _total.
    assert_eq!(
        m.types.get("llmapi_router_retries").map(String::as_str),
        Some("counter")
    );
    assert_eq!(m.value("llmapi_router_retries_total", &[]), Some(0.0));
    assert_eq!(
        m.value(
            "llmapi_router_rejected_requests_total",
            &[("reason", "queue_full")]
        ),
        Some(0.0)
    );
    m.check_histograms();
}
