//! The console block and the result JSON, laid out exactly as benchmark_serving.py prints and
//! saves them, so logs and dashboards written for the original read ours.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Value, json};

use crate::metrics::{BenchmarkMetrics, RequestOutput};
use crate::stats::Summary;

/// A JSON object that keeps insertion order, as Python dicts do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderedJson(pub Vec<(String, Value)>);

impl OrderedJson {
    /// Sets `key`, keeping its first position when it already exists (Python dict semantics).
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Removes `key` if present.
    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The keys in order.
    pub fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

impl Serialize for OrderedJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The per-request lists that only --save-detailed keeps.
pub const DETAILED_FIELDS: [&str; 7] = [
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "e2els",
    "generated_texts",
    "errors",
];

/// `{:<40} {:<10}` as the original's integer lines.
fn int_line(out: &mut String, label: &str, value: impl std::fmt::Display) {
    out.push_str(&format!("{label:<40} {value:<10}\n"));
}

/// `{:<40} {:<10.2f}` as the original's float lines.
fn float_line(out: &mut String, label: &str, value: f64) {
    out.push_str(&format!("{label:<40} {value:<10.2}\n"));
}

/// "P99" for 99.0, "P99.9" for 99.9, as the original's `p_word`.
pub fn percentile_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// The "Error type" lines printed before the block.
pub fn error_lines(m: &BenchmarkMetrics) -> String {
    let mut out = String::new();
    for (kind, count) in &m.error_counts {
        out.push_str(&format!("Error type: {kind}, Count: {count} requests\n"));
    }
    let total: u64 = m.error_counts.values().sum();
    out.push_str(&format!("Total failed requests: {total}\n"));
    out
}

struct MetricSpec {
    attr: &'static str,
    name: &'static str,
    header: &'static str,
}

const LATENCY_METRICS: [MetricSpec; 4] = [
    MetricSpec {
        attr: "ttft",
        name: "TTFT",
        header: "Time to First Token",
    },
    MetricSpec {
        attr: "tpot",
        name: "TPOT",
        header: "Time per Output Token (excl. 1st token)",
    },
    MetricSpec {
        attr: "itl",
        name: "ITL",
        header: "Inter-token Latency",
    },
    MetricSpec {
        attr: "e2el",
        name: "E2EL",
        header: "End-to-end Latency",
    },
];

fn summary_of<'a>(m: &'a BenchmarkMetrics, attr: &str) -> &'a Summary {
    match attr {
        "ttft" => &m.ttft,
        "tpot" => &m.tpot,
        "itl" => &m.itl,
        _ => &m.e2el,
    }
}

/// How one metric section is labelled.
struct Section<'a> {
    attr: &'a str,
    name: &'a str,
    header: &'a str,
    unit: &'a str,
    min_max: Option<(f64, f64)>,
}

/// Prints one metric section into `out` and adds its keys to `result` in the original's order
/// (std, [min, max], mean, median, percentiles).
fn metric_section(out: &mut String, result: &mut OrderedJson, s: &Summary, sec: &Section) {
    let Section {
        attr,
        name,
        header,
        unit,
        min_max,
    } = *sec;
    let (suffix, display) = if unit.is_empty() {
        (String::new(), String::new())
    } else {
        (format!("_{unit}"), format!(" ({unit})"))
    };
    out.push_str(&format!("{header:-^50}\n"));
    float_line(out, &format!("Mean {name}{display}:"), s.mean);
    float_line(out, &format!("Median {name}{display}:"), s.median);
    float_line(out, &format!("Std Dev {name}{display}:"), s.std);
    result.insert(format!("std_{attr}{suffix}"), json!(s.std));
    if let Some((min, max)) = min_max {
        float_line(out, &format!("Min {name}{display}:"), min);
        result.insert(format!("min_{attr}{suffix}"), json!(min));
        float_line(out, &format!("Max {name}{display}:"), max);
        result.insert(format!("max_{attr}{suffix}"), json!(max));
    }
    result.insert(format!("mean_{attr}{suffix}"), json!(s.mean));
    result.insert(format!("median_{attr}{suffix}"), json!(s.median));
    for (p, v) in &s.percentiles {
        let word = percentile_word(*p);
        float_line(out, &format!("P{word} {name}{display}:"), *v);
        result.insert(format!("p{word}_{attr}{suffix}"), json!(v));
    }
}

/// What the block and the JSON need besides the metrics.
pub struct RunFacts<'a> {
    /// Wall time of the run in seconds.
    pub duration: f64,
    /// Every request's outcome, in send order.
    pub outputs: &'a [RequestOutput],
    /// Output length per request (0 when failed).
    pub output_lens: &'a [u64],
    /// Metrics selected with --percentile-metrics.
    pub selected: &'a [String],
    /// Whether --goodput was given.
    pub has_goodput: bool,
}

/// The console block (from the `=` header to the closing rule) and the benchmark result
/// dictionary, built together as the original does.
pub fn render(m: &BenchmarkMetrics, facts: &RunFacts) -> (String, OrderedJson) {
    let mut out = String::new();
    let total = facts.outputs.len();
    out.push_str(&format!("{:=^50}\n", " Serving Benchmark Result "));
    int_line(&mut out, "Total requests:", total);
    int_line(&mut out, "Successful requests:", m.completed);
    int_line(&mut out, "Failed requests:", total as u64 - m.completed);
    float_line(&mut out, "Benchmark duration (s):", facts.duration);
    int_line(&mut out, "Total input tokens:", m.total_input);
    int_line(&mut out, "Total generated tokens:", m.total_output);
    float_line(
        &mut out,
        "Request throughput (req/s):",
        m.request_throughput,
    );
    if facts.has_goodput {
        float_line(&mut out, "Request goodput (req/s):", m.request_goodput);
    }
    float_line(
        &mut out,
        "Output token throughput (tok/s):",
        m.output_throughput,
    );
    float_line(
        &mut out,
        "Total Token throughput (tok/s):",
        m.total_token_throughput,
    );
    float_line(&mut out, "User throughput (tok/s):", m.tput_user);
    let failed = total as u64 - m.completed;
    if failed > 0 {
        out.push_str("=======================!FAILED REQUESTS!=======================\n");
        out.push_str(&format!("Total failed requests: {failed}\n"));
        out.push_str("=====================!CHECK LOG FOR ERRORS!====================\n");
    }

    let mut r = OrderedJson::default();
    r.insert("duration", json!(facts.duration));
    r.insert("completed", json!(m.completed));
    r.insert("total_input_tokens", json!(m.total_input));
    r.insert("total_output_tokens", json!(m.total_output));
    r.insert("request_throughput", json!(m.request_throughput));
    // The trailing colon is in the original's key; readers look it up that way.
    let goodput = facts.has_goodput.then_some(m.request_goodput);
    r.insert("request_goodput:", json!(goodput));
    r.insert("output_throughput", json!(m.output_throughput));
    r.insert("total_token_throughput", json!(m.total_token_throughput));
    r.insert("user_throughput", json!(m.tput_user));
    let d = &m.avg_decoded_tokens_per_iter;
    let pct: serde_json::Map<String, Value> = d
        .percentiles
        .iter()
        .map(|(p, v)| (format!("p{p:?}"), json!(v)))
        .collect();
    r.insert(
        "avg_decoded_tokens_per_iter",
        json!({"mean": d.mean, "min": m.min_avg_decoded_tokens_per_iter,
               "max": m.max_avg_decoded_tokens_per_iter, "median": d.median, "std": d.std,
               "percentiles": pct}),
    );
    let o = facts.outputs;
    r.insert(
        "input_lens",
        json!(o.iter().map(|x| x.prompt_len).collect::<Vec<_>>()),
    );
    r.insert("output_lens", json!(facts.output_lens));
    r.insert("ttfts", json!(o.iter().map(|x| x.ttft).collect::<Vec<_>>()));
    r.insert("itls", json!(o.iter().map(|x| &x.itl).collect::<Vec<_>>()));
    r.insert(
        "e2els",
        json!(o.iter().map(|x| x.latency).collect::<Vec<_>>()),
    );
    let texts: Vec<&str> = o.iter().map(|x| x.generated_text.as_str()).collect();
    r.insert("generated_texts", json!(texts));
    r.insert(
        "errors",
        json!(o.iter().map(|x| x.error.as_str()).collect::<Vec<_>>()),
    );

    if d.mean > 0.0 {
        let min_max = Some((
            m.min_avg_decoded_tokens_per_iter,
            m.max_avg_decoded_tokens_per_iter,
        ));
        let name = "Avg Decoded Tokens per Iter";
        let sec = Section {
            attr: "avg_decoded_tokens_per_iter",
            name,
            header: name,
            unit: "",
            min_max,
        };
        metric_section(&mut out, &mut r, d, &sec);
    }
    for spec in &LATENCY_METRICS {
        if facts.selected.iter().any(|s| s == spec.attr) {
            let s = summary_of(m, spec.attr);
            let sec = Section {
                attr: spec.attr,
                name: spec.name,
                header: spec.header,
                unit: "ms",
                min_max: None,
            };
            metric_section(&mut out, &mut r, s, &sec);
        }
    }
    out.push_str(&"=".repeat(50));
    out.push('\n');
    (out, r)
}

/// Python's repr of a float for the lines the original prints with `{}` (1.0, inf, 0.5).
pub fn py_float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{v:?}")
    }
}
