//! What is known of a JSON call object whose text may still be growing: its name once the
//! name's string is complete, and the raw text of its arguments object so far. A stream sends
//! a call's name and its arguments as they are generated from this, and a complete call's
//! arguments are the same raw text, so the streamed fragments add up to them.

use serde_json::Value;

/// A call object's known parts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CallPrefix<'a> {
    /// The function's name, once its string is complete.
    pub name: Option<String>,
    /// The text of the arguments object so far (when the arguments are an object).
    pub arguments: Option<&'a str>,
    /// The arguments object is complete.
    pub closed: bool,
}

/// Reads `text` (starting at a call object's `{`, possibly cut anywhere) for the name and
/// the object under the first of `arg_keys`.
pub fn call_prefix<'a>(text: &'a str, arg_keys: &[&str]) -> CallPrefix<'a> {
    let mut out = CallPrefix::default();
    // `None` only stops the walk: what was found so far is kept.
    let _ = walk(text, arg_keys, &mut out);
    out
}

fn walk<'a>(text: &'a str, arg_keys: &[&str], out: &mut CallPrefix<'a>) -> Option<()> {
    let b = text.as_bytes();
    let mut at = skip_ws(b, 0);
    if b.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_ws(b, at);
        if b.get(at) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, at)?;
        let key: String = serde_json::from_str(&text[at..key_end]).ok()?;
        at = skip_ws(b, key_end);
        if b.get(at) != Some(&b':') {
            return None;
        }
        at = skip_ws(b, at + 1);
        let first = *b.get(at)?;
        if key == "name" && first == b'"' && out.name.is_none() {
            let end = string_end(b, at)?;
            out.name = Some(serde_json::from_str(&text[at..end]).ok()?);
            at = end;
        } else if arg_keys.contains(&key.as_str()) && first == b'{' && out.arguments.is_none() {
            match value_end(b, at) {
                Some(end) => {
                    out.arguments = Some(&text[at..end]);
                    out.closed = true;
                    at = end;
                }
                None => {
                    out.arguments = Some(&text[at..]);
                    return None;
                }
            }
        } else {
            at = value_end(b, at)?;
        }
        at = skip_ws(b, at);
        if b.get(at) != Some(&b',') {
            return None;
        }
        at += 1;
    }
}

fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while b.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The end of the JSON string starting at `at` (a `"`), past its closing quote.
fn string_end(b: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    while let Some(&c) = b.get(i) {
        match c {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end of the JSON value starting at `at`; `None` when the text ends inside it.
fn value_end(b: &[u8], at: usize) -> Option<usize> {
    match *b.get(at)? {
        b'"' => string_end(b, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&c) = b.get(i) {
                match c {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = b[at..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace())?;
            Some(at + len)
        }
    }
}

/// The arguments of a complete call object `text` (parsed as `v`): the raw text of its
/// arguments object, or, given as a JSON string, that string's object; `{}` when absent.
pub fn arguments_of(text: &str, v: &Value, arg_keys: &[&str]) -> Option<String> {
    let prefix = call_prefix(text, arg_keys);
    if let (Some(raw), true) = (prefix.arguments, prefix.closed) {
        return Some(raw.to_owned());
    }
    match arg_keys.iter().find_map(|k| v.get(*k)) {
        None | Some(Value::Null) => Some("{}".to_owned()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(o @ Value::Object(_)) => Some(o.to_string()),
            _ => None,
        },
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["arguments", "parameters"];

    #[test]
    fn the_name_and_the_arguments_so_far_are_found_however_the_text_is_cut() {
        let text = r#"{"name": "get_weather", "arguments": {"city": "Z\"ü}", "n": [1, {"a": 2}]}}"#;
        let args = r#"{"city": "Z\"ü}", "n": [1, {"a": 2}]}"#;
        let args_at = text.find(args).unwrap();
        for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            let p = call_prefix(&text[..cut], KEYS);
            let name_known = cut > text.find(r#"", "#).unwrap();
            assert_eq!(p.name.is_some(), name_known, "{cut}");
            if cut > args_at {
                let seen = &text[args_at..cut.min(args_at + args.len())];
                assert_eq!(p.arguments, Some(seen), "{cut}");
                assert_eq!(p.closed, cut >= args_at + args.len(), "{cut}");
            } else {
                assert_eq!(p.arguments, None, "{cut}");
            }
        }
    }

    #[test]
    fn other_keys_are_skipped_and_string_arguments_are_not_streamed() {
        let p = call_prefix(
            r#"{"id": 7, "type": "f", "name": "x", "parameters": {}}"#,
            KEYS,
        );
        assert_eq!(
            (p.name.as_deref(), p.arguments, p.closed),
            (Some("x"), Some("{}"), true)
        );
        let p = call_prefix(r#"{"name": "x", "arguments": "{\"a\": 1}"}"#, KEYS);
        assert_eq!((p.name.as_deref(), p.arguments), (Some("x"), None));
    }

    #[test]
    fn complete_arguments_keep_their_text() {
        let text = r#"{"name": "x", "arguments": {"a":  1}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            arguments_of(text, &v, KEYS).as_deref(),
            Some(r#"{"a":  1}"#)
        );
        let text = r#"{"name": "x", "arguments": "{\"a\": 1}"}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(arguments_of(text, &v, KEYS).as_deref(), Some(r#"{"a":1}"#));
        let v = serde_json::json!({"name": "x"});
        assert_eq!(
            arguments_of(r#"{"name": "x"}"#, &v, KEYS).as_deref(),
            Some("{}")
        );
    }
}
