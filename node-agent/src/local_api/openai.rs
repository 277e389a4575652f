//! The OpenAI API's request and response shapes for chat and text completions, and their
//! translation into the engine's `GenerateRequest`. Fields the engine cannot honour are
//! refused with a message; fields that change nothing here (`user`, `logit_bias` of none)
//! are accepted and ignored, as OpenAI-compatible local servers do.

use nanofleet_inference::{ChatMessage, FinishReason, GenerateStats, SamplingParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or a list of parts of which only text parts are understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What both endpoints share: sampling, limits, streaming.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; llama.cpp's server and vLLM take it too.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Not in OpenAI's API; llama.cpp's server and vLLM take it too.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub tools: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<MessageIn>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: Common,
}

/// Parses a request body, answering a clear 400 for anything that is not the expected JSON.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

/// OpenAI's defaults: temperature 1 and top_p 1.
const DEFAULT_TEMPERATURE: f32 = 1.0;
/// OpenAI's default `max_tokens` for text completions.
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// Generation settings taken from the request, checked.
#[derive(Debug)]
pub struct Settings {
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub seed: u64,
    pub stream: bool,
    pub include_usage: bool,
}

impl Common {
    pub fn settings(&self) -> Result<Settings, ApiError> {
        if self.model.is_empty() {
            return Err(ApiError::bad_request("`model` is required".to_owned()).param("model"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported".to_owned()).param("n"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| v != &Value::Bool(false) && !v.is_null())
        {
            return Err(
                ApiError::bad_request("logprobs are not supported".to_owned()).param("logprobs"),
            );
        }
        if self.tools.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request("tools are not supported".to_owned()).param("tools"));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p.unwrap_or(1.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            ..SamplingParams::default()
        };
        sampling
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(stop)) => vec![stop.clone()],
            Some(Stop::Many(stops)) => stops.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_request(
                "`stop` takes up to 4 non-empty sequences".to_owned(),
            )
            .param("stop"));
        }
        Ok(Settings {
            sampling,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            stop,
            seed: self.seed.unwrap_or_else(rand::random),
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|options| options.include_usage),
        })
    }
}

impl ChatRequest {
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(
                ApiError::bad_request("`messages` must not be empty".to_owned()).param("messages"),
            );
        }
        self.messages
            .iter()
            .map(|message| {
                let content = match &message.content {
                    None => String::new(),
                    Some(Content::Text(text)) => text.clone(),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .map(|part| match (part.kind.as_str(), &part.text) {
                            ("text", Some(text)) => Ok(text.as_str()),
                            (kind, _) => Err(ApiError::bad_request(format!(
                                "content parts of type {kind:?} are not supported; send text"
                            ))
                            .param("messages")),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .concat(),
                };
                Ok(ChatMessage::new(message.role.clone(), content))
            })
            .collect()
    }
}

impl CompletionRequest {
    /// The prompt text; a list is accepted when it holds exactly one string.
    pub fn prompt(&self) -> Result<String, ApiError> {
        let one = |value: &Value| value.as_str().map(str::to_owned);
        match &self.prompt {
            Value::String(text) => Ok(text.clone()),
            Value::Array(items) if items.len() == 1 && one(&items[0]).is_some() => {
                Ok(one(&items[0]).unwrap_or_default())
            }
            _ => Err(ApiError::bad_request(
                "`prompt` must be a string (or a list of one string)".to_owned(),
            )
            .param("prompt")),
        }
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// The fixed parts of every response object of one request.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// The artifact version that serves the request.
    pub fingerprint: String,
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Only a client that went away cancels; nobody reads this.
        FinishReason::Cancelled => "cancelled",
    }
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl From<&GenerateStats> for Usage {
    fn from(stats: &GenerateStats) -> Self {
        Self {
            prompt_tokens: stats.prompt_tokens,
            completion_tokens: stats.completion_tokens,
            total_tokens: stats.prompt_tokens + stats.completion_tokens,
        }
    }
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn with(&self, chunk: bool, choices: Value, usage: Option<&Usage>) -> Value {
        let mut object = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if let Some(usage) = usage {
            object["usage"] = json!(usage);
        }
        object
    }

    /// The whole answer of a non-streaming request.
    pub fn complete(&self, text: &str, reason: FinishReason, usage: &Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason(reason),
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(reason),
            }),
        };
        self.with(false, json!([choice]), Some(usage))
    }

    /// One streamed piece of text; the first chat chunk also names the role.
    pub fn delta(&self, text: &str, first: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat if first => json!({
                "index": 0,
                "delta": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": null,
            }),
            Endpoint::Chat => json!({
                "index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null,
            }),
            Endpoint::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": null,
            }),
        };
        self.with(true, json!([choice]), None)
    }

    /// The streamed chunk that carries the finish reason.
    pub fn finish(&self, reason: FinishReason) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(reason),
            }),
            Endpoint::Completion => json!({
                "index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason(reason),
            }),
        };
        self.with(true, json!([choice]), None)
    }

    /// The last streamed chunk when the client asked for usage: no choices, only counts.
    pub fn usage(&self, usage: &Usage) -> Value {
        self.with(true, json!([]), Some(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(body: Value) -> Common {
        serde_json::from_value::<CompletionRequest>(body)
            .unwrap()
            .common
    }

    #[test]
    fn openai_defaults_apply() {
        let settings = common(json!({"model": "m", "prompt": "hi"}))
            .settings()
            .unwrap();
        assert_eq!(settings.sampling.temperature, 1.0);
        assert_eq!(settings.sampling.top_p, 1.0);
        assert_eq!(settings.max_tokens, None);
        assert!(!settings.stream);
    }

    #[test]
    fn unsupported_or_invalid_fields_are_refused_with_their_name() {
        for (body, param) in [
            (json!({"model": "m", "prompt": "x", "n": 2}), "n"),
            (json!({"model": "", "prompt": "x"}), "model"),
            (
                json!({"model": "m", "prompt": "x", "logprobs": true}),
                "logprobs",
            ),
            (
                json!({"model": "m", "prompt": "x", "stop": ["a","b","c","d","e"]}),
                "stop",
            ),
        ] {
            let error = common(body).settings().unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param));
        }
        let error = common(json!({"model": "m", "prompt": "x", "temperature": -1.0}))
            .settings()
            .unwrap_err();
        assert!(error.message.contains("temperature"), "{}", error.message);
    }

    #[test]
    fn content_parts_join_and_non_text_parts_are_refused() {
        let request: ChatRequest = parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(request.messages().unwrap()[0].content, "ab");
        let request: ChatRequest = parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
        )
        .unwrap();
        assert!(request.messages().is_err());
        let request: ChatRequest = parse(br#"{"model":"m","messages":[]}"#).unwrap();
        assert!(request.messages().is_err());
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        for body in [&b"{"[..], b"[]", b"{\"model\": 3}", b"\xff\xfe"] {
            let error = parse::<ChatRequest>(body).unwrap_err();
            assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn response_objects_have_openai_shapes() {
        let envelope = Envelope {
            endpoint: Endpoint::Chat,
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            fingerprint: "1.0.0".into(),
        };
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
        };
        let body = envelope.complete("hi", FinishReason::Stop, &usage);
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], "hi");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["total_tokens"], 5);
        let first = envelope.delta("h", true);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(envelope.usage(&usage)["choices"], json!([]));
    }
}
