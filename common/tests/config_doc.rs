//! docs/configuration.md lists every flag and YAML key with its default; this test fails when
//! the document and the `LlmArgs` definition disagree.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;

use llmapi_common::args::{CLI_FLAGS, LlmArgs};
use serde_json::Value;

fn doc() -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    std::fs::read_to_string(p).expect("docs/configuration.md exists")
}

/// Rows of the table under `heading`, as cells with surrounding backticks removed.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            inside = line.trim() == heading;
            continue;
        }
        if inside && line.starts_with('|') && !line.starts_with("|---") {
            let cells: Vec<String> = line
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect();
            rows.push(cells);
        }
    }
    rows.remove(0); // header
    rows
}

fn leaves(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    if let Value::Object(map) = v {
        for (k, sub) in map {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if sub.is_object() {
                out.insert(key.clone(), Value::Object(Default::default()));
                leaves(sub, &key, out);
            } else {
                out.insert(key, sub.clone());
            }
        }
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(_) => "{}".into(),
        other => other.to_string(),
    }
}

#[test]
fn every_yaml_key_is_documented_with_its_default() {
    let mut expected = BTreeMap::new();
    leaves(
        &serde_json::to_value(LlmArgs::default()).unwrap(),
        "",
        &mut expected,
    );
    let documented: BTreeMap<String, String> = table(&doc(), "## YAML keys")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let extra: Vec<_> = documented
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from docs/configuration.md: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "documented keys LlmArgs does not have: {extra:?}"
    );
    for (k, v) in &expected {
        assert_eq!(documented[k], shown(v), "default of {k}");
    }
}

#[test]
fn every_flag_is_documented_with_its_key_and_aliases() {
    let rows = table(&doc(), "## Command-line flags");
    let by_flag: BTreeMap<String, &Vec<String>> = rows.iter().map(|r| (r[0].clone(), r)).collect();
    let mut defaults = BTreeMap::new();
    leaves(
        &serde_json::to_value(LlmArgs::default()).unwrap(),
        "",
        &mut defaults,
    );
    for f in CLI_FLAGS {
        let row = by_flag
            .get(&format!("--{}", f.name))
            .unwrap_or_else(|| panic!("--{} is not documented", f.name));
        assert_eq!(row[2], f.key, "key of --{}", f.name);
        let aliases: Vec<String> = f.aliases.iter().map(|a| format!("--{a}")).collect();
        assert_eq!(row[1], aliases.join(", "), "aliases of --{}", f.name);
        assert_eq!(row[3], shown(&defaults[f.key]), "default of --{}", f.name);
    }
    let known: Vec<String> = CLI_FLAGS
        .iter()
        .map(|f| format!("--{}", f.name))
        .chain(
            [
                "MODEL",
                "--extra_llm_api_options",
                "--set",
                "--print_config",
            ]
            .map(String::from),
        )
        .collect();
    for flag in by_flag.keys() {
        assert!(
            known.contains(flag),
            "{flag} is documented but not a serve flag"
        );
    }
}
