//! Just enough of Prometheus' formats for the observability kit's test: the metric and label
//! names of a text exposition, the selectors of a PromQL expression, the `expr:` of a rule
//! file and the queries of a Grafana dashboard.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// What a scrape exposes: metric family (TYPE) names and, per series name, its label names.
#[derive(Default)]
pub struct Scrape {
    /// Family name (from `# TYPE`) to its type.
    pub families: BTreeMap<String, String>,
    /// Series name to the label names its samples carry.
    pub labels: BTreeMap<String, BTreeSet<String>>,
}

/// Parses a Prometheus text exposition.
pub fn parse_scrape(body: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                s.families.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = s.labels.entry(line[..end].to_owned()).or_default();
        if let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) {
            let mut inside = &line[open + 1..close];
            while let Some(eq) = inside.find('=') {
                labels.insert(inside[..eq].trim().trim_start_matches(',').to_owned());
                // Skip the quoted value (escapes included).
                let rest = &inside[eq + 1..];
                let mut chars = rest.char_indices().skip(1);
                let mut end = rest.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                inside = rest[end..].trim_start_matches(',');
            }
        }
    }
    s
}

/// The metric selectors of a PromQL expression: (metric name, label names it matches on).
pub fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        // Aggregations, which may take `by (...)` before their parenthesis.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let next_non_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 0;
    let mut skip_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            // A range or subquery duration.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
        } else if c == '$' {
            while i + 1 < chars.len() && ident(chars[i + 1]) {
                i += 1;
            }
            i += 1;
        } else if ident(c) && !c.is_ascii_digit() && (i == 0 || !ident(chars[i - 1])) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            if KEYWORDS.contains(&word.to_lowercase().as_str()) {
                // by (...), on (...): label lists, not metrics.
                skip_list = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                continue;
            }
            skip_list = false;
            if chars.get(after) == Some(&'(') {
                continue; // a function
            }
            let mut labels = Vec::new();
            if chars.get(after) == Some(&'{') {
                let mut j = after + 1;
                while j < chars.len() && chars[j] != '}' {
                    if chars[j] == '"' {
                        j += 1;
                        while j < chars.len() && chars[j] != '"' {
                            j += if chars[j] == '\\' { 2 } else { 1 };
                        }
                        j += 1;
                    } else if ident(chars[j]) {
                        let s = j;
                        while j < chars.len() && ident(chars[j]) {
                            j += 1;
                        }
                        labels.push(chars[s..j].iter().collect());
                    } else {
                        j += 1;
                    }
                }
                i = j + 1;
            }
            out.push((word, labels));
        } else if c == '(' && skip_list {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_list = false;
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr:` of a Prometheus rule file (one line, or a `|` block).
pub fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(at) = line.find("expr:") else {
            continue;
        };
        if !line[..at].trim().trim_start_matches('-').trim().is_empty() {
            continue;
        }
        let value = line[at + 5..].trim();
        if value == "|" || value == ">" {
            // The block: the lines indented deeper than the key.
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > at)
                .copied()
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(value.to_owned());
        }
    }
    out
}

/// The metrics table of docs/serving.md ("| `name` | type | `label`, ... | ..."): each
/// metric's type and label names.
pub fn documented_metrics(markdown: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out = BTreeMap::new();
    for line in markdown.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", name, type, labels, ...
        if cells.len() < 5 || !cells[1].starts_with("`llmapi_") {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        out.insert(name, (cells[2].to_owned(), labels));
    }
    out
}

/// Every `"expr"` string of a Grafana dashboard, appended to `out`.
pub fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_scanner_finds_metrics_and_their_labels_only() {
        let found = selectors(
            r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{route!~"/x{1}", status="5"}[5m]))) / on (instance) group_left b > bool 3 or up{job="r"} unless $value"#,
        );
        assert_eq!(
            found,
            vec![
                (
                    "a_bucket".to_owned(),
                    vec!["route".to_owned(), "status".to_owned()]
                ),
                ("b".to_owned(), vec![]),
                ("up".to_owned(), vec!["job".to_owned()]),
            ]
        );
        let exprs = rule_exprs(
            "  - expr: a > 1\n    for: 1m\n  - expr: |\n      b\n      or c\n    labels: {}\n",
        );
        assert_eq!(
            exprs,
            vec!["a > 1".to_owned(), "      b\n      or c".to_owned()]
        );
        let docs = documented_metrics(
            "| metric | type | labels |\n|---|---|---|\n| `llmapi_a_total` | counter | `worker`, `cause` | x |\n| `llmapi_b` | histogram | | y |\n",
        );
        assert_eq!(docs["llmapi_a_total"].0, "counter");
        assert_eq!(docs["llmapi_a_total"].1.len(), 2);
        assert!(docs["llmapi_b"].1.is_empty());
        let s = parse_scrape("# TYPE x counter\nx{a=\"1,b=\\\"2\",c=\"3\"} 1\n");
        assert_eq!(
            s.labels["x"],
            ["a", "c"].iter().map(|s| s.to_string()).collect()
        );
    }
}
