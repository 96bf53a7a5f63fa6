use super::*;
use crate::tools::Format;

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }})
}

fn fields(tools: Value, choice: Option<Value>, parallel: Option<bool>) -> ToolFields {
    ToolFields {
        tools: serde_json::from_value(tools).ok(),
        tool_choice: choice.map(|c| serde_json::from_value(c).unwrap()),
        parallel_tool_calls: parallel,
    }
}

fn refused(f: &ToolFields, parser: Option<ToolParser>) -> (String, String) {
    let e = plan(f, parser).expect_err("refused");
    assert_eq!(e.status, 400);
    (e.param.unwrap_or_default(), e.message)
}

#[test]
fn auto_is_the_default_with_tools_and_reads_with_the_parser() {
    let p = plan(
        &fields(json!([weather()]), None, None),
        Some(ToolParser::Hermes),
    )
    .unwrap();
    assert_eq!(
        p.mode,
        Some(ToolMode::Auto {
            format: Format::Hermes,
            parallel: true
        })
    );
    assert_eq!(p.template_tools.map(|t| t.len()), Some(1));
    assert_eq!(p.schema, None);
}

#[test]
fn auto_without_a_parser_is_refused_naming_the_flag() {
    let (param, msg) = refused(&fields(json!([weather()]), None, None), None);
    assert_eq!(param, "tool_choice");
    assert!(msg.contains("--tool_parser"), "{msg}");
}

#[test]
fn none_keeps_the_tools_for_the_template_but_reads_no_calls() {
    let p = plan(&fields(json!([weather()]), Some(json!("none")), None), None).unwrap();
    assert_eq!((p.mode, p.schema), (None, None));
    assert!(p.template_tools.is_some());
    let p = plan(&ToolFields::default(), None).unwrap();
    assert_eq!(p, ToolPlan::default());
}

#[test]
fn a_named_function_is_held_to_its_parameters() {
    let choice = json!({"type": "function", "function": {"name": "get_weather"}});
    let p = plan(&fields(json!([weather()]), Some(choice), None), None).unwrap();
    assert_eq!(p.mode, Some(ToolMode::Named("get_weather".into())));
    let schema: Value = serde_json::from_str(p.schema.as_deref().unwrap()).unwrap();
    assert_eq!(schema, weather()["function"]["parameters"]);
    let mut sampling = SamplingParams::default();
    p.apply(&mut sampling);
    assert!(matches!(
        sampling.guided.and_then(|g| g.constraint),
        Some(Constraint::JsonSchema(s)) if s.contains("city")
    ));
}

#[test]
fn a_named_function_not_in_tools_is_refused_listing_them() {
    let choice = json!({"type": "function", "function": {"name": "nope"}});
    let (param, msg) = refused(&fields(json!([weather()]), Some(choice), None), None);
    assert_eq!(param, "tool_choice");
    assert!(
        msg.contains("\"nope\"") && msg.contains("get_weather"),
        "{msg}"
    );
}

#[test]
fn required_asks_for_an_array_of_calls_one_without_parallel_calls() {
    let f = fields(json!([weather()]), Some(json!("required")), Some(false));
    let p = plan(&f, None).unwrap();
    assert_eq!(p.mode, Some(ToolMode::Required { parallel: false }));
    let schema: Value = serde_json::from_str(p.schema.as_deref().unwrap()).unwrap();
    assert_eq!(
        (schema["minItems"].clone(), schema["maxItems"].clone()),
        (json!(1), json!(1))
    );
    let call = &schema["items"]["anyOf"][0];
    assert_eq!(call["properties"]["name"]["const"], "get_weather");
    assert_eq!(
        call["properties"]["parameters"],
        weather()["function"]["parameters"]
    );
    let p = plan(
        &fields(json!([weather()]), Some(json!("required")), None),
        None,
    )
    .unwrap();
    let schema: Value = serde_json::from_str(p.schema.as_deref().unwrap()).unwrap();
    assert!(schema.get("maxItems").is_none());
}

#[test]
fn bad_tools_are_refused_naming_the_entry() {
    let cases = [
        (json!([weather(), {"type": "retrieval"}]), "tools[1].type"),
        (json!([{"type": "function"}]), "tools[0].function"),
        (
            json!([{"type": "function", "function": {"name": "a b"}}]),
            "tools[0].function.name",
        ),
        (
            json!([{"type": "function", "function": {"name": "f", "parameters": []}}]),
            "tools[0].function.parameters",
        ),
        (
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]),
            "tools[0].function.parameters",
        ),
        (
            json!([{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]),
            "tools[0].function.parameters",
        ),
        (json!([weather(), weather()]), "tools[1].function.name"),
        (json!(["f"]), "tools[0]"),
    ];
    for (tools, want) in cases {
        let (param, msg) = refused(&fields(tools.clone(), None, None), Some(ToolParser::Hermes));
        assert_eq!(param, want, "{tools}: {msg}");
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn bad_tool_choices_are_refused() {
    for choice in [json!("sometimes"), json!(3), json!({"type": "function"})] {
        let e = serde_json::from_value::<ToolChoice>(choice).unwrap_err();
        assert!(e.to_string().contains("tool_choice must be"), "{e}");
    }
    let (param, msg) = refused(&fields(json!([]), Some(json!("required")), None), None);
    assert_eq!(param, "tool_choice");
    assert!(msg.contains("no tools"), "{msg}");
}

fn message(v: Value) -> ChatMessage {
    serde_json::from_value(v).unwrap()
}

#[test]
fn earlier_calls_reach_the_template_with_object_arguments() {
    let msgs = [
        message(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}
        ]})),
        message(json!({"role": "tool", "tool_call_id": "call_1", "content": "cold"})),
    ];
    let turns = chat_turns(&msgs).unwrap();
    let calls = turns[0].tool_calls.as_ref().unwrap();
    assert_eq!(calls[0]["function"]["arguments"], json!({"city": "Oslo"}));
    assert_eq!(calls[0]["id"], "call_1");
    assert_eq!(turns[1].tool_call_id.as_deref(), Some("call_1"));
    assert_eq!(turns[1].content, "cold");
    let bad = [message(json!({"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}
    ]}))];
    let e = chat_turns(&bad).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[0].tool_calls[0]"));
}
