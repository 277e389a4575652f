//! Chat messages rendered to a prompt by the model's own Jinja chat template (`tokenizer.chat_template`),
//! or by ChatML when the model has none.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{InferenceError, Result};

/// One turn of a conversation, as HF chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (a template may accept others).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The template used when a model carries none: ChatML, which SmolLM2 and Qwen use.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the model's BOS/EOS texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    from_model: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("from_model", &self.from_model)
            .finish_non_exhaustive()
    }
}

/// HF templates call `raise_exception('...')` to refuse a conversation they cannot format.
fn raise_exception(message: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source` (the model's template), or ChatML when `None`.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // HF renders with Jinja's trim_blocks and lstrip_blocks; the same whitespace rules
        // give the same prompt text, and so the same tokens.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string methods (`.strip()`, `.startswith()`) that many templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.unwrap_or(CHATML_TEMPLATE).to_string())
            .map_err(|e| InferenceError::TemplateSyntax(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            from_model: source.is_some(),
        })
    }

    /// Whether the template came from the model (false: the ChatML fallback).
    pub fn is_from_model(&self) -> bool {
        self.from_model
    }

    /// The prompt text for `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| InferenceError::TemplateSyntax(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| InferenceError::TemplateRender(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as stored in its GGUF.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_fallback_renders_turns_and_generation_prompt() {
        let template = ChatTemplate::new(None, "", "<|im_end|>").unwrap();
        assert!(!template.is_from_model());
        let text = template
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_template_adds_default_system_prompt() {
        let template =
            ChatTemplate::new(Some(SMOLLM2_TEMPLATE), "<|im_start|>", "<|im_end|>").unwrap();
        let text = template
            .render(&[ChatMessage::new("user", "Hi")], false)
            .unwrap();
        assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
        assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n"));
    }

    #[test]
    fn template_variables_python_methods_and_exceptions() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.content.strip() }}]{% endfor %}{{ eos_token }}";
        let template = ChatTemplate::new(Some(source), "<s>", "</s>").unwrap();
        assert_eq!(
            template
                .render(&[ChatMessage::new("user", "  x ")], false)
                .unwrap(),
            "<s>[x]</s>"
        );
        let err = template
            .render(&[ChatMessage::new("tool", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("no tools"), "{err}");
        assert!(matches!(
            ChatTemplate::new(Some("{% for %}"), "", ""),
            Err(InferenceError::TemplateSyntax(_))
        ));
    }
}
