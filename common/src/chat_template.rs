//! Chat templates: the model's Jinja template (`model_dir::TokenizerConfig::read` finds it)
//! or --chat_template's, rendered with minijinja and Python-compatible string methods.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// Errors from compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The model has no template and none was given.
    #[error(
        "this model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json, no chat_template.json); pass --chat_template FILE or use /v1/completions"
    )]
    Missing,
    /// The template does not compile.
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// Rendering failed, including `raise_exception` calls from the template itself.
    #[error("chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are exposed to it by those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders `messages` (OpenAI-shaped: role, content, ...). With `add_generation_prompt`
    /// the output ends with the assistant header, ready for generation.
    pub fn render<M: Serialize>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools::<M, ()>(messages, None, add_generation_prompt)
    }

    /// `render` with the request's tool definitions as the template's `tools` (none when
    /// `None`, so that `{% if tools %}` is false, as transformers passes them).
    pub fn render_with_tools<M: Serialize, T: Serialize + ?Sized>(
        &self,
        messages: &M,
        tools: Option<&T>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            ChatTemplateError::Render(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LLAMA3_LIKE: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

    #[test]
    fn renders_messages_with_generation_prompt() {
        let t = ChatTemplate::new(LLAMA3_LIKE, "<s>", "</s>").unwrap();
        let out = t
            .render(&json!([{"role": "user", "content": " hi "}]), true)
            .unwrap();
        assert_eq!(
            out,
            "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}", "", "").unwrap();
        assert_eq!(
            t.render(&json!([{"role": "user", "content": " ab "}]), false)
                .unwrap(),
            "AB"
        );
    }

    #[test]
    fn the_demo_template_renders_tools_calls_and_results_and_is_plain_llama3_without() {
        let demo = ChatTemplate::new(crate::checkpoint::CHAT_TEMPLATE, "<s>", "</s>").unwrap();
        let plain = ChatTemplate::new(LLAMA3_LIKE, "<s>", "</s>").unwrap();
        let chat =
            json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi "}]);
        assert_eq!(
            demo.render(&chat, true).unwrap(),
            plain.render(&chat, true).unwrap()
        );
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let turns = json!([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        ]);
        let out = demo.render_with_tools(&turns, Some(&tools), true).unwrap();
        assert!(
            out.starts_with("<s><|start_header_id|>system<|end_header_id|>\n\n"),
            "{out}"
        );
        assert!(
            out.contains("<tools>\n{") && out.contains("\"get_weather\""),
            "{out}"
        );
        assert!(
            out.contains(r#"<tool_call>{"arguments":{"city":"Oslo"},"name":"get_weather"}</tool_call><|eot_id|>"#)
                || out.contains(r#"<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call><|eot_id|>"#),
            "{out}"
        );
        assert!(
            out.contains("<|start_header_id|>tool<|end_header_id|>\n\n<tool_response>\ncold\n</tool_response><|eot_id|>"),
            "{out}"
        );
        assert!(out.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn raise_exception_becomes_a_render_error_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&json!([]), false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}
