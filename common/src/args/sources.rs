//! Merging the configuration sources: defaults < CLI flags < YAML < `--set`.
//!
//! Everything is merged as a JSON tree whose shape is `LlmArgs::default()` serialized, so the
//! set of valid keys is derived from the struct itself. Nested sections merge key by key.

use std::collections::BTreeMap;
use std::path::Path;

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde_json::{Map, Value};

use super::flags::{CLI_FLAGS, FlagKind};
use super::{LlmArgs, validate};

/// A configuration error, phrased as what to change.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A YAML file could not be read or parsed.
    #[error("cannot read {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong, with the line where the parser knows it.
        message: String,
    },
    /// A key that LlmArgs does not have.
    #[error("{source_name}: unknown key '{key}'{}", hint.as_ref().map(|h| format!("; did you mean '{h}'?")).unwrap_or_default())]
    UnknownKey {
        /// Where the key came from (a file path or `--set`).
        source_name: String,
        /// The full key path.
        key: String,
        /// The closest valid key path, if any is close.
        hint: Option<String>,
    },
    /// A value of the wrong type or outside its allowed set.
    #[error("{0}")]
    Invalid(String),
}

/// How loud a notice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeLevel {
    /// An override or a resolved value.
    Info,
    /// A legacy spelling, an ignored or approximated setting.
    Warn,
}

/// Something the resolution wants logged once logging is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Level.
    pub level: NoticeLevel,
    /// Text.
    pub message: String,
}

impl Notice {
    pub(crate) fn info(message: impl Into<String>) -> Self {
        Self {
            level: NoticeLevel::Info,
            message: message.into(),
        }
    }
    pub(crate) fn warn(message: impl Into<String>) -> Self {
        Self {
            level: NoticeLevel::Warn,
            message: message.into(),
        }
    }
}

/// The outcome of resolving a `serve` command line.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The effective configuration.
    pub args: LlmArgs,
    /// Overrides, legacy spellings and fallbacks, to be logged once.
    pub notices: Vec<Notice>,
    /// `--print_config` was given.
    pub print_config: bool,
}

/// Resolves `serve` matches (from `serve_command()`) into `LlmArgs`.
pub fn resolve(matches: &ArgMatches) -> Result<Resolved, ArgsError> {
    let schema = serde_json::to_value(LlmArgs::default())
        .map_err(|e| ArgsError::Invalid(format!("internal: defaults do not serialize: {e}")))?;
    let mut tree = schema.clone();
    let mut notices = Vec::new();
    // Keys set on the command line, with the flag that set them, to name YAML overrides.
    let mut from_cli: BTreeMap<&str, String> = BTreeMap::new();

    if let Some(model) = matches.get_one::<String>("model") {
        set(&mut tree, "model", Value::String(model.clone()));
    }
    for f in CLI_FLAGS {
        if matches.value_source(f.name) != Some(ValueSource::CommandLine) {
            continue;
        }
        let value = if f.kind == FlagKind::Switch {
            Value::Bool(matches.get_flag(f.name))
        } else {
            let raw = matches
                .get_one::<String>(f.name)
                .cloned()
                .unwrap_or_default();
            parse_flag_value(f.name, f.kind, &raw)?
        };
        from_cli.insert(f.key, format!("--{} {}", f.name, display(&value)));
        set(&mut tree, f.key, value);
    }

    if let Some(path) = matches.get_one::<String>("extra_llm_api_options") {
        let yaml = read_yaml(Path::new(path))?;
        apply_source(&mut tree, &schema, yaml, path, &from_cli, &mut notices)?;
    }
    for item in matches.get_many::<String>("set").into_iter().flatten() {
        let (key, raw) = item.split_once('=').ok_or_else(|| {
            ArgsError::Invalid(format!(
                "--set {item}: expected KEY.PATH=VALUE, e.g. --set kv_cache_config.dtype=fp8"
            ))
        })?;
        let value: Value = serde_saphyr::from_str(raw).map_err(|e| {
            ArgsError::Invalid(format!("--set {item}: cannot parse value '{raw}': {e}"))
        })?;
        let mut doc = Value::Object(Map::new());
        set(&mut doc, key.trim(), value);
        apply_source(
            &mut tree,
            &schema,
            doc,
            &format!("--set {item}"),
            &from_cli,
            &mut notices,
        )?;
    }

    let mut args: LlmArgs = serde_path_to_error::deserialize(tree).map_err(|e| {
        ArgsError::Invalid(format!("configuration key {}: {}", e.path(), e.inner()))
    })?;
    validate::check(&mut args, &mut notices)?;
    Ok(Resolved {
        args,
        notices,
        print_config: matches.get_flag("print_config"),
    })
}

/// Normalizes legacy spellings in one source document, rejects unknown keys, and merges it.
fn apply_source(
    tree: &mut Value,
    schema: &Value,
    mut doc: Value,
    source_name: &str,
    from_cli: &BTreeMap<&str, String>,
    notices: &mut Vec<Notice>,
) -> Result<(), ArgsError> {
    if doc.is_null() {
        return Ok(());
    }
    if !doc.is_object() {
        return Err(ArgsError::File {
            path: source_name.into(),
            message: "expected a mapping of LlmArgs keys at the top level".into(),
        });
    }
    super::validate::normalize_legacy(&mut doc, source_name, notices)?;
    check_keys(&doc, schema, "", source_name, schema)?;
    let mut changes = Vec::new();
    merge(tree, doc, "", &mut changes);
    for (key, old, new) in changes {
        match from_cli.get(key.as_str()) {
            Some(flag) => notices.push(Notice::info(format!(
                "{source_name} overrides {flag}: {key} = {}",
                display(&new)
            ))),
            None if old != new => notices.push(Notice::info(format!(
                "{source_name}: {key} = {} (was {})",
                display(&new),
                display(&old)
            ))),
            None => {}
        }
    }
    Ok(())
}

fn parse_flag_value(name: &str, kind: FlagKind, raw: &str) -> Result<Value, ArgsError> {
    let bad = |what: &str| ArgsError::Invalid(format!("--{name} {raw}: expected {what}"));
    Ok(match kind {
        FlagKind::Text => Value::String(raw.to_owned()),
        FlagKind::Int => Value::from(raw.parse::<u64>().map_err(|_| bad("a whole number"))?),
        FlagKind::Float => {
            let v: f64 = raw.parse().map_err(|_| bad("a number"))?;
            serde_json::Number::from_f64(v)
                .map(Value::Number)
                .ok_or_else(|| bad("a finite number"))?
        }
        FlagKind::Switch => Value::Bool(true),
    })
}

fn read_yaml(path: &Path) -> Result<Value, ArgsError> {
    let text = std::fs::read_to_string(path).map_err(|e| ArgsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_saphyr::from_str(&text).map_err(|e| ArgsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Looks up a dotted key path.
pub(crate) fn lookup<'a>(tree: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(tree, |v, part| v.get(part))
}

/// Sets a dotted key path, creating (or replacing non-mapping values with) mappings on the way.
pub(crate) fn set(tree: &mut Value, key: &str, value: Value) {
    let mut node = tree;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(map) = node else { return };
        if parts.peek().is_none() {
            map.insert(part.to_owned(), value);
            return;
        }
        node = map.entry(part.to_owned()).or_insert(Value::Null);
    }
}

/// Deep merge: mappings merge key by key, anything else replaces. Records (key, old, new)
/// for every leaf written.
fn merge(base: &mut Value, doc: Value, prefix: &str, changes: &mut Vec<(String, Value, Value)>) {
    let Value::Object(doc) = doc else { return };
    for (k, v) in doc {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if !base.is_object() {
            *base = Value::Object(Map::new());
        }
        let Value::Object(map) = base else { return };
        let slot = map.entry(k).or_insert(Value::Null);
        match v {
            Value::Object(_) if slot.is_object() => merge(slot, v, &key, changes),
            Value::Object(_) => {
                // A section re-enabled after null (e.g. cuda_graph_config): start from empty.
                *slot = Value::Object(Map::new());
                merge(slot, v, &key, changes);
            }
            v => {
                changes.push((key, slot.clone(), v.clone()));
                *slot = v;
            }
        }
    }
}

fn check_keys(
    doc: &Value,
    schema: &Value,
    prefix: &str,
    source_name: &str,
    root: &Value,
) -> Result<(), ArgsError> {
    let (Value::Object(doc), Value::Object(known)) = (doc, schema) else {
        return Ok(());
    };
    for (k, v) in doc {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match known.get(k) {
            Some(sub @ Value::Object(_)) => check_keys(v, sub, &key, source_name, root)?,
            Some(_) => {}
            None => {
                return Err(ArgsError::UnknownKey {
                    source_name: source_name.into(),
                    hint: closest_key(k, prefix, known, root),
                    key,
                });
            }
        }
    }
    Ok(())
}

/// The closest valid key: a similar sibling, else a key of that name in another section.
fn closest_key(
    k: &str,
    prefix: &str,
    siblings: &Map<String, Value>,
    root: &Value,
) -> Option<String> {
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_owned()
        } else {
            format!("{p}.{s}")
        }
    };
    let best = siblings
        .keys()
        .map(|s| (strsim::normalized_damerau_levenshtein(k, s), s))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((score, s)) = best
        && score >= 0.6
    {
        return Some(join(prefix, s));
    }
    let mut all = Vec::new();
    leaf_paths(root, "", &mut all);
    all.into_iter()
        .map(|p| {
            let last = p.rsplit('.').next().unwrap_or(&p).to_owned();
            (strsim::normalized_damerau_levenshtein(k, &last), p)
        })
        .filter(|(score, _)| *score >= 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, p)| p)
}

fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = v {
        for (k, sub) in map {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.push(key.clone());
            leaf_paths(sub, &key, out);
        }
    }
}

/// A value as a person would type it.
pub(crate) fn display(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
