//! The observability kit of deploy/observability (deploy/README.md): the alert rules under
//! `promtool check rules` and `promtool test rules`, a live `/metrics` of `llmapi-launch
//! serve` under `promtool check metrics`, and every PromQL expression of the rules and the
//! Grafana dashboard against the metric and label names that live scrape exposes.
//!
//! Without promtool the promtool checks skip with a notice, unless LLMAPI_REQUIRE_PROMTOOL is
//! set (CI).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use llmapi_tests::deploy_tools::{deploy, promtool, read, run, text};
use llmapi_tests::promql::{
    dashboard_exprs, documented_metrics, parse_scrape, rule_exprs, selectors,
};
use llmapi_tests::{demo_model, free_port, get, post, serve};
use serde_json::{Value, json};

/// Labels Prometheus attaches to every scraped series (the target's), not the exporter.
const TARGET_LABELS: &[&str] = &["job", "instance"];

#[test]
fn alert_rules_pass_promtool_and_fire_on_their_conditions() {
    let Some(promtool) = promtool() else { return };
    let rules = deploy("observability/alerts.yaml");
    let out = run(
        "promtool check rules",
        Command::new(&promtool).args(["check", "rules"]).arg(&rules),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        "promtool test rules",
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(deploy("observability/alerts_test.yaml")),
    );
    assert!(out.status.success(), "{}", text(&out));

    // A rule that does not parse is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("alerts.yaml");
    std::fs::write(
        &bad,
        read(&rules).replace(
            "up{job=\"llmapi-router\"} == 0",
            "up{job=\"llmapi-router\" == 0",
        ),
    )
    .expect("write rules");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&bad)
        .output()
        .expect("promtool");
    assert!(!out.status.success(), "a broken expression passed");
}

#[test]
fn a_live_scrape_passes_promtool_and_names_every_metric_the_kits_query() {
    let port = free_port();
    let _server = serve(demo_model(), port, &[], &[]);
    let r = post(
        port,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "hello", "max_tokens": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let metrics = get(port, "/metrics");
    assert_eq!(metrics.status, 200);
    let scrape = parse_scrape(&metrics.body);
    assert!(scrape.labels.contains_key("llmapi_router_requests_total"));
    // docs/serving.md's table of metrics: what a family shows only with its first series
    // (llmapi_router_migrations_total after the first migration) is known from there.
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/serving.md");
    let documented = documented_metrics(&read(&docs));
    assert!(
        documented.len() >= 20,
        "the metrics table of docs/serving.md"
    );

    // Every metric the rules and the dashboard query is in the live scrape or documented, and
    // every label they match on is one its series carry (or the table lists).
    let mut exprs = rule_exprs(&read(&deploy("observability/alerts.yaml")));
    assert!(exprs.len() >= 10, "the rule file's expressions: {exprs:?}");
    let dashboard: Value =
        serde_json::from_str(&read(&deploy("observability/grafana-dashboard.json")))
            .expect("the dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    let before = exprs.len();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > before + 20, "the dashboard's queries");
    let mut unknown = BTreeSet::new();
    let mut checked = BTreeSet::new();
    for expr in &exprs {
        let found = selectors(expr);
        assert!(!found.is_empty(), "no metric in {expr}");
        for (name, labels) in found {
            // A histogram's series: `_bucket` (with `le`), `_sum`, `_count` of a documented
            // histogram family.
            let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|b| {
                        documented
                            .get(*b)
                            .is_some_and(|(kind, _)| kind == "histogram")
                    })
                    .map(|b| (b, *suffix == "_bucket"))
            });
            let allowed: Option<BTreeSet<String>> = if name == "up" {
                Some(BTreeSet::new())
            } else if let Some(served) = scrape.labels.get(&name) {
                Some(served.clone())
            } else if let Some((base, bucket)) = histogram {
                let mut l = documented[base].1.clone();
                if bucket {
                    l.insert("le".to_owned());
                }
                Some(l)
            } else {
                documented.get(&name).map(|(_, l)| l.clone())
            };
            let Some(allowed) = allowed else {
                unknown.insert(name.clone());
                continue;
            };
            checked.insert(name.clone());
            for l in labels {
                assert!(
                    allowed.contains(&l) || TARGET_LABELS.contains(&l.as_str()),
                    "{expr}: {name} has no label {l} (it has {allowed:?})"
                );
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the kits query metrics that neither a live scrape nor docs/serving.md's table has: {unknown:?} (scraped: {:?})",
        scrape.labels.keys().collect::<Vec<_>>()
    );
    println!(
        "{} metric names in {} queries checked",
        checked.len(),
        exprs.len()
    );

    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(metrics.body.as_bytes())
            .expect("write the scrape to promtool");
    }
    let out = child.wait_with_output().expect("promtool check metrics");
    let report = text(&out);
    // The router serves OpenMetrics, whose counter families are named without `_total` (with
    // their `# HELP` on that name); promtool 2.42 reads the classic format, in which such a
    // counter's `_total` series has no help text. That finding is a notice; any other (a
    // parse error, a counter not named *_total, a unit not in base units) fails.
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.ends_with(" no help text"))
        .collect();
    assert!(
        problems.is_empty(),
        "promtool check metrics on a live scrape:\n{report}"
    );
    let no_help = report
        .lines()
        .filter(|l| l.ends_with(" no help text"))
        .count();
    if no_help > 0 {
        println!("NOTICE: promtool check metrics: {no_help} metric families have no # HELP line");
    }
}
