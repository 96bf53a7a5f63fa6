use super::*;

/// Streams `pieces` through a splitter; returns the content and the calls (name, arguments),
/// checking the delta shape on the way: a call's first delta names it with empty arguments,
/// the later ones only add arguments.
fn run(mode: &ToolMode, pieces: &[&str]) -> (String, Vec<(String, String)>) {
    let mut s = ToolStream::new(mode.clone());
    let mut deltas = Vec::new();
    let mut content = String::new();
    for p in pieces {
        let d = s.push(p);
        content.push_str(&d.content);
        deltas.extend(d.calls);
    }
    let d = s.flush();
    content.push_str(&d.content);
    deltas.extend(d.calls);
    let mut calls: Vec<(String, String)> = Vec::new();
    for d in &deltas {
        match &d.start {
            Some(start) => {
                assert_eq!(d.index, calls.len(), "{deltas:?}");
                assert!(d.arguments.is_empty(), "{deltas:?}");
                assert!(
                    start.id.starts_with("call_") || start.id.len() == 9,
                    "{deltas:?}"
                );
                calls.push((start.name.clone(), String::new()));
            }
            None => calls[d.index].1.push_str(&d.arguments),
        }
    }
    (content, calls)
}

/// Every way to cut `text` in two on a char boundary, and cut char by char.
fn cuts(text: &str) -> Vec<Vec<&str>> {
    let mut out: Vec<Vec<&str>> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .map(|i| vec![&text[..i], &text[i..]])
        .collect();
    out.push(
        text.char_indices()
            .map(|(i, c)| &text[i..i + c.len_utf8()])
            .collect(),
    );
    out
}

fn auto(format: Format) -> ToolMode {
    ToolMode::Auto {
        format,
        parallel: true,
    }
}

fn owned(calls: &[(&str, &str)]) -> Vec<(String, String)> {
    calls
        .iter()
        .map(|(n, a)| ((*n).to_owned(), (*a).to_owned()))
        .collect()
}

/// `text` gives `content` and `calls` however the stream is cut.
fn same_at_every_cut(mode: &ToolMode, text: &str, content: &str, calls: &[(&str, &str)]) {
    let want = (content.to_owned(), owned(calls));
    for pieces in cuts(text) {
        assert_eq!(run(mode, &pieces), want, "{pieces:?}");
    }
}

#[test]
fn hermes_calls_split_from_content_at_every_cut() {
    same_at_every_cut(
        &auto(Format::Hermes),
        "Let me look 世界.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
        "Let me look 世界.\n",
        &[("get_weather", r#"{"city": "Zürich"}"#), ("now", "{}")],
    );
}

#[test]
fn llama3_json_calls_split_at_every_cut() {
    let want = [("get_weather", r#"{"city": "Paris"}"#)];
    same_at_every_cut(
        &auto(Format::Llama3Json),
        r#" {"name": "get_weather", "parameters": {"city": "Paris"}}"#,
        "",
        &want,
    );
    same_at_every_cut(
        &auto(Format::Llama3Json),
        r#"ok <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}"#,
        "ok ",
        &want,
    );
}

#[test]
fn mistral_calls_split_at_every_cut() {
    same_at_every_cut(
        &auto(Format::Mistral),
        r#"[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]"#,
        "",
        &[("a", r#"{"x": 1}"#), ("b", "{}")],
    );
}

#[test]
fn pythonic_calls_split_at_every_cut() {
    same_at_every_cut(
        &auto(Format::Pythonic),
        r#"[get_weather(city="Köln", days=2), now()]"#,
        "",
        &[
            ("get_weather", r#"{"city":"Köln","days":2}"#),
            ("now", "{}"),
        ],
    );
}

#[test]
fn text_that_is_not_a_call_stays_content_at_every_cut() {
    for (format, text) in [
        (
            Format::Hermes,
            "a <tool_cal b <tool_call>{not json}</tool_call>",
        ),
        (Format::Llama3Json, " {\"weather\": \"sunny\"} today"),
        (Format::Mistral, "[1, 2, 3] are numbers"),
        (Format::Pythonic, "[the list] of things"),
        (Format::Pythonic, "plain words [f(a=1)]"),
    ] {
        same_at_every_cut(&auto(format), text, text, &[]);
    }
}

#[test]
fn text_after_the_calls_is_content() {
    let (content, calls) = run(
        &auto(Format::Hermes),
        &["<tool_call>{\"name\": \"f\"}</tool_call>", " done"],
    );
    assert_eq!((content.as_str(), calls.len()), (" done", 1));
}

#[test]
fn without_parallel_calls_only_the_first_is_kept() {
    let mode = ToolMode::Auto {
        format: Format::Pythonic,
        parallel: false,
    };
    let (_, calls) = run(&mode, &["[f(a=1), g(b=2)]"]);
    assert_eq!(calls, owned(&[("f", r#"{"a":1}"#)]));
}

#[test]
fn a_named_function_streams_its_arguments_as_they_come() {
    let mode = ToolMode::Named("get_weather".into());
    let mut s = ToolStream::new(mode.clone());
    let first = s.push("{\"ci");
    assert_eq!(first.calls.len(), 2);
    assert_eq!(
        first.calls[0].start.as_ref().map(|c| c.name.as_str()),
        Some("get_weather")
    );
    assert_eq!(first.calls[1].arguments, "{\"ci");
    let next = s.push("ty\": 1}");
    assert_eq!(next.calls.len(), 1);
    assert!(next.calls[0].start.is_none());
    assert_eq!(s.finish_reason("stop"), "stop");
    assert_eq!(
        run(&mode, &["{\"a\"", ": 1}"]),
        (String::new(), owned(&[("get_weather", r#"{"a": 1}"#)]))
    );
}

#[test]
fn required_output_is_read_as_a_call_array_at_every_cut() {
    same_at_every_cut(
        &ToolMode::Required { parallel: true },
        r#"[{"name": "f", "parameters": {"q": "x"}}]"#,
        "",
        &[("f", r#"{"q": "x"}"#)],
    );
}

#[test]
fn calls_that_ended_by_themselves_finish_with_tool_calls() {
    let mut s = ToolStream::new(auto(Format::Pythonic));
    s.push("[f()]");
    s.flush();
    assert_eq!(s.finish_reason("stop"), "tool_calls");
    assert_eq!(s.finish_reason("length"), "length");
    let mut s = ToolStream::new(auto(Format::Pythonic));
    s.push("no calls");
    s.flush();
    assert_eq!(s.finish_reason("stop"), "stop");
}

#[test]
fn call_ids_differ() {
    let (a, b) = (new_call_id(), new_call_id());
    assert!(a.starts_with("call_") && a.len() == 29, "{a}");
    assert_ne!(a, b);
    let (a, b) = (new_mistral_call_id(), new_mistral_call_id());
    assert!(
        a.len() == 9 && a.chars().all(|c| c.is_ascii_alphanumeric()),
        "{a}"
    );
    assert_ne!(a, b);
}

#[test]
fn complete_calls_are_put_together_from_deltas() {
    let mut s = ToolStream::new(ToolMode::Named("f".into()));
    let mut acc = CallsAcc::default();
    acc.add(&s.push("{\"a\":").calls);
    acc.add(&s.push(" 1}").calls);
    acc.add(&s.flush().calls);
    let v = acc.to_json();
    assert_eq!(v[0]["function"]["name"], "f");
    assert_eq!(v[0]["function"]["arguments"], "{\"a\": 1}");
    assert_eq!(v[0]["type"], "function");
}

#[test]
fn a_json_call_starts_once_named_and_its_arguments_stream_as_written() {
    let mut s = ToolStream::new(auto(Format::Hermes));
    let d = s.push("<tool_call>\n{\"name\": \"f\", ");
    assert_eq!(d.calls.len(), 1, "{d:?}");
    assert_eq!(
        d.calls[0].start.as_ref().map(|c| c.name.as_str()),
        Some("f")
    );
    let d = s.push("\"arguments\": {\"a\": \"x");
    assert_eq!(d.calls.len(), 1, "{d:?}");
    assert_eq!(
        (d.calls[0].index, d.calls[0].arguments.as_str()),
        (0, "{\"a\": \"x")
    );
    let d = s.push("y\"}}\n</tool_call>");
    assert_eq!(d.calls.len(), 1, "{d:?}");
    assert_eq!(
        (d.calls[0].start.is_none(), d.calls[0].arguments.as_str()),
        (true, "y\"}")
    );
    assert!(s.flush().calls.is_empty());
    assert_eq!(s.finish_reason("stop"), "tool_calls");
}

#[test]
fn a_call_cut_short_stays_a_call_and_is_not_repeated_as_content() {
    let text = "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1";
    for pieces in cuts(text) {
        assert_eq!(
            run(&auto(Format::Hermes), &pieces),
            (String::new(), owned(&[("f", "{\"a\": 1")])),
            "{pieces:?}"
        );
    }
}

#[test]
fn without_parallel_calls_a_second_json_call_is_not_streamed() {
    let mode = ToolMode::Auto {
        format: Format::Mistral,
        parallel: false,
    };
    same_at_every_cut(
        &mode,
        r#"[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]"#,
        "",
        &[("a", r#"{"x": 1}"#)],
    );
}
