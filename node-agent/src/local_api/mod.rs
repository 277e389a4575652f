//! The agent's local, OpenAI-compatible HTTP API over the models it serves: `GET /v1/models`,
//! `POST /v1/chat/completions`, `POST /v1/completions` (with SSE streaming), plus
//! `GET /v1/stats` (counters per model version) and `/healthz`. Bound to loopback by
//! default; an optional bearer key; a bounded number of requests run and wait, and the rest
//! are answered 429 at once.

mod openai;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use nanofleet_inference::{Completion, GenerateRequest, InferenceError, Prompt, TokenEvent};
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::models::{ModelHost, ServedModel};
use openai::{Endpoint, Envelope, Settings, Usage};

/// Request bodies above this are refused (413) before they are parsed.
const MAX_BODY_BYTES: usize = 1 << 20;

/// How the API admits and authenticates requests.
#[derive(Clone)]
pub struct ApiOptions {
    /// Bearer key every request must present; `None` = open (loopback only is the default).
    pub api_key: Option<String>,
    /// Generations that run at once.
    pub max_concurrent: usize,
    /// Requests that may wait for a free slot; beyond that, 429.
    pub queue_depth: usize,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad_request(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            param: None,
        }
    }

    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    fn body(&self) -> Value {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": null,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body())
    }
}

/// What the engine's refusals mean to a caller: their mistakes are 400, ours 500.
impl From<InferenceError> for ApiError {
    fn from(error: InferenceError) -> Self {
        let status = match error {
            InferenceError::EmptyPrompt
            | InferenceError::ContextOverflow { .. }
            | InferenceError::UnknownToken { .. }
            | InferenceError::InvalidSampling(_)
            | InferenceError::Tokenize(_)
            | InferenceError::TemplateRender(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.to_string())
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Requests admitted (running or waiting) and the slots they run in.
struct Admission {
    admitted: Arc<AtomicUsize>,
    limit: usize,
    slots: Arc<Semaphore>,
}

/// A running request's slot; dropping it lets the next waiting request run.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _admitted: Admitted,
}

struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    fn new(max_concurrent: usize, queue_depth: usize) -> Self {
        let max_concurrent = max_concurrent.max(1);
        Self {
            admitted: Arc::new(AtomicUsize::new(0)),
            limit: max_concurrent + queue_depth,
            slots: Arc::new(Semaphore::new(max_concurrent)),
        }
    }

    /// Waits for a slot, or refuses at once when the queue is full.
    async fn enter(&self) -> Result<Slot, ApiError> {
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the request queue is full; retry shortly",
            ));
        }
        let admitted = Admitted(self.admitted.clone());
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        Ok(Slot {
            _permit: permit,
            _admitted: admitted,
        })
    }
}

struct ApiState {
    host: Arc<ModelHost>,
    options: ApiOptions,
    admission: Admission,
}

type Shared = Arc<ApiState>;

pub fn router(host: Arc<ModelHost>, options: ApiOptions) -> Router {
    let state = Arc::new(ApiState {
        admission: Admission::new(options.max_concurrent, options.queue_depth),
        host,
        options,
    });
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/stats", get(stats))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.options.api_key {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| same_secret(p.as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid API key is required: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn models(State(state): State<Shared>) -> Response {
    let data: Vec<Value> = state
        .host
        .list()
        .iter()
        .map(|model| {
            let info = model.engine.model_info();
            json!({
                "id": model.name,
                "object": "model",
                "created": model.activated_at,
                "owned_by": "nanofleet",
                "version": model.version,
                "architecture": info.architecture,
                "context_length": info.context_length,
                "device": info.device,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn stats(State(state): State<Shared>) -> Response {
    json_response(StatusCode::OK, &json!({"versions": state.host.stats()}))
}

fn served(state: &ApiState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    state.host.get(name).ok_or_else(|| {
        let served: Vec<String> = state.host.list().iter().map(|m| m.name.clone()).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model {name:?} is not served here; served: {served:?}"),
        )
        .param("model")
    })
}

async fn chat_completions(State(state): State<Shared>, body: Bytes) -> Response {
    let result = async {
        let request: openai::ChatRequest = openai::parse(&body)?;
        let settings = request.common.settings()?;
        let model = served(&state, &request.common.model)?;
        let messages = request.messages()?;
        let prompt = model
            .engine
            .render_chat(&messages)
            .map_err(ApiError::from)?;
        respond(&state, model, Endpoint::Chat, prompt, settings, None).await
    }
    .instrument(tracing::info_span!("chat_completions"))
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<Shared>, body: Bytes) -> Response {
    let result = async {
        let request: openai::CompletionRequest = openai::parse(&body)?;
        let settings = request.common.settings()?;
        let model = served(&state, &request.common.model)?;
        let prompt = request.prompt()?;
        let echo = request.echo.then(|| prompt.clone());
        let settings = Settings {
            max_tokens: settings
                .max_tokens
                .or(Some(openai::DEFAULT_COMPLETION_MAX_TOKENS)),
            ..settings
        };
        respond(&state, model, Endpoint::Completion, prompt, settings, echo).await
    }
    .instrument(tracing::info_span!("completions"))
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Checks the prompt against the model, waits for a slot, then answers in full or as SSE.
async fn respond(
    state: &Shared,
    model: Arc<ServedModel>,
    endpoint: Endpoint,
    prompt: String,
    settings: Settings,
    echo: Option<String>,
) -> Result<Response, ApiError> {
    let tokens = model.engine.tokenize(&prompt, true)?;
    let context = model.engine.model_info().context_length;
    // Without max_tokens a request may generate as many tokens as still fit.
    let max_tokens = settings
        .max_tokens
        .unwrap_or(context.saturating_sub(tokens.len()));
    let request = GenerateRequest {
        prompt: Prompt::Tokens(tokens),
        sampling: settings.sampling,
        max_tokens,
        stop: settings.stop,
        seed: settings.seed,
        ignore_eos: false,
    };
    // Refuse what cannot run before the client waits in the queue.
    if request.max_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1".to_owned(),
        ));
    }
    model.engine.check_request(&request)?;
    let envelope = Envelope {
        endpoint,
        id: format!(
            "{}-{:016x}",
            if endpoint == Endpoint::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: model.name.clone(),
        fingerprint: model.version.clone(),
    };
    let slot = state.admission.enter().await?;
    let host = state.host.clone();
    if settings.stream {
        return Ok(stream(
            host,
            model,
            request,
            envelope,
            settings.include_usage,
            echo,
            slot,
        ));
    }
    let completion = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        run_generation(&host, &model, &request, |_| ControlFlow::Continue(()))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {e}"),
        )
    })??;
    let text = echo.unwrap_or_default() + &completion.text;
    Ok(json_response(
        StatusCode::OK,
        &envelope.complete(
            &text,
            completion.stats.finish_reason,
            &Usage::from(&completion.stats),
        ),
    ))
}

/// Generates and counts the outcome against the model's version.
fn run_generation(
    host: &ModelHost,
    model: &ServedModel,
    request: &GenerateRequest,
    on_token: impl FnMut(TokenEvent) -> ControlFlow<()>,
) -> Result<Completion, InferenceError> {
    let started = Instant::now();
    let result = model.engine.generate(request, on_token);
    host.record(model, started.elapsed(), result.as_ref());
    result
}

/// What the generation thread hands to the SSE stream.
enum Streamed {
    Text(String),
    Done(Result<Completion, ApiError>),
}

/// Runs the generation on a blocking thread and streams its text as SSE events; a client
/// that goes away cancels the generation at the next token.
fn stream(
    host: Arc<ModelHost>,
    model: Arc<ServedModel>,
    request: GenerateRequest,
    envelope: Envelope,
    include_usage: bool,
    echo: Option<String>,
    slot: Slot,
) -> Response {
    let (sender, receiver) = mpsc::channel::<Streamed>(64);
    tokio::task::spawn_blocking(move || {
        // The slot is held for as long as the generation runs, not the handler.
        let _slot = slot;
        if let Some(echo) = echo {
            let _ = sender.blocking_send(Streamed::Text(echo));
        }
        let result = run_generation(&host, &model, &request, |event| {
            if event.text.is_empty() {
                return ControlFlow::Continue(());
            }
            match sender.blocking_send(Streamed::Text(event.text)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        });
        let _ = sender.blocking_send(Streamed::Done(result.map_err(ApiError::from)));
    });
    let mut first = true;
    let events = tokio_stream::wrappers::ReceiverStream::new(receiver).flat_map(move |item| {
        let events: Vec<Value> = match item {
            Streamed::Text(text) => {
                let chunk = envelope.delta(&text, first);
                first = false;
                vec![chunk]
            }
            Streamed::Done(Ok(completion)) => {
                let mut events = vec![envelope.finish(completion.stats.finish_reason)];
                if include_usage {
                    events.push(envelope.usage(&Usage::from(&completion.stats)));
                }
                events
            }
            Streamed::Done(Err(error)) => vec![error.body()],
        };
        futures::stream::iter(events.into_iter().map(|value| {
            Ok::<_, std::convert::Infallible>(Event::default().data(value.to_string()))
        }))
    });
    let done = futures::stream::once(async { Ok(Event::default().data("[DONE]")) });
    Sse::new(events.chain(done))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Records where the API listens, for operators and tests that bind port 0.
pub fn write_bound_address(data_dir: &std::path::Path, address: SocketAddr) -> std::io::Result<()> {
    std::fs::write(data_dir.join("api.addr"), format!("{address}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::HostOptions;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use nanofleet_inference::tiny::{write_tiny_model, TinyTokenizer};
    use nanofleet_inference::Architecture;
    use tower::ServiceExt;

    fn served_router(api_key: Option<&str>) -> (tempfile::TempDir, Router) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tiny.gguf");
        write_tiny_model(&file, Architecture::Llama, TinyTokenizer::ByteLevel, 3).unwrap();
        let host = Arc::new(ModelHost::new(HostOptions {
            threads: Some(1),
            context_length: None,
            device: nanofleet_inference::Device::Cpu,
            smoke_prompt: "Say hello.".into(),
            smoke_max_tokens: 2,
        }));
        host.activate(host.prove("tiny", "1.0.0", &file, None).unwrap());
        let router = router(
            host,
            ApiOptions {
                api_key: api_key.map(str::to_owned),
                max_concurrent: 2,
                queue_depth: 2,
            },
        );
        (dir, router)
    }

    async fn call(router: &Router, method: &str, path: &str, body: &str) -> (StatusCode, String) {
        let request = HttpRequest::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn chat(extra: &str) -> String {
        chat_with_max_tokens(12, extra)
    }

    fn chat_with_max_tokens(max_tokens: usize, extra: &str) -> String {
        format!(
            r#"{{"model":"tiny","messages":[{{"role":"user","content":"the cat"}}],"max_tokens":{max_tokens}{extra}}}"#
        )
    }

    /// The text of an SSE body's chunks, and whether it ended with `[DONE]`.
    fn sse_text(body: &str) -> (String, bool) {
        let data: Vec<&str> = body
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .collect();
        let text = data
            .iter()
            .filter(|d| **d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .or(v["choices"][0]["text"].as_str())
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        (text, data.last() == Some(&"[DONE]"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn models_and_completions_answer_in_openai_shapes() {
        let (_dir, router) = served_router(None);
        let (status, body) = call(&router, "GET", "/v1/models", "").await;
        assert_eq!(status, StatusCode::OK);
        let models: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(models["data"][0]["id"], "tiny");
        assert_eq!(models["data"][0]["version"], "1.0.0");
        assert_eq!(models["data"][0]["device"], "cpu");

        let (status, body) = call(
            &router,
            "POST",
            "/v1/chat/completions",
            &chat(r#","seed":5"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["system_fingerprint"], "1.0.0");
        let usage = &answer["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        let text = answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();

        // The same request streamed gives the same text, then [DONE].
        let (status, body) = call(
            &router,
            "POST",
            "/v1/chat/completions",
            &chat(r#","seed":5,"stream":true,"stream_options":{"include_usage":true}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (streamed, done) = sse_text(&body);
        assert_eq!(streamed, text);
        assert!(done, "{body}");
        assert!(body.contains(r#""usage""#), "{body}");

        let (status, body) = call(
            &router,
            "POST",
            "/v1/completions",
            r#"{"model":"tiny","prompt":"the cat","max_tokens":5,"temperature":0}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["object"], "text_completion");
        assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() <= 5);

        let stats: Value =
            serde_json::from_str(&call(&router, "GET", "/v1/stats", "").await.1).unwrap();
        assert_eq!(stats["versions"][0]["version"], "1.0.0");
        assert_eq!(stats["versions"][0]["requests"], 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seeds_decide_sampled_text() {
        let (_dir, router) = served_router(None);
        let mut texts = Vec::new();
        for seed in [1, 1, 2] {
            let body = chat_with_max_tokens(24, &format!(r#","seed":{seed},"temperature":1.0"#));
            let (status, body) = call(&router, "POST", "/v1/chat/completions", &body).await;
            assert_eq!(status, StatusCode::OK);
            let answer: Value = serde_json::from_str(&body).unwrap();
            texts.push(
                answer["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_eq!(texts[0], texts[1], "same seed, same text");
        assert_ne!(texts[0], texts[2], "another seed, other text");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests_get_clear_errors_and_the_api_keeps_serving() {
        let (_dir, router) = served_router(None);
        let cases = [
            (
                "/v1/chat/completions",
                "{not json".to_owned(),
                StatusCode::BAD_REQUEST,
                "not valid",
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"tiny"}"#.to_owned(),
                StatusCode::BAD_REQUEST,
                "messages",
            ),
            (
                "/v1/chat/completions",
                chat(r#","temperature":-2"#),
                StatusCode::BAD_REQUEST,
                "temperature",
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#.to_owned(),
                StatusCode::NOT_FOUND,
                "not served",
            ),
            (
                "/v1/completions",
                r#"{"model":"tiny","prompt":"x","max_tokens":100000}"#.to_owned(),
                StatusCode::BAD_REQUEST,
                "context length",
            ),
            (
                "/v1/completions",
                r#"{"model":"tiny","prompt":""}"#.to_owned(),
                StatusCode::BAD_REQUEST,
                "empty",
            ),
            (
                "/v1/nothing",
                "{}".to_owned(),
                StatusCode::NOT_FOUND,
                "no such endpoint",
            ),
        ];
        for (path, body, expected, words) in cases {
            let (status, answer) = call(&router, "POST", path, &body).await;
            assert_eq!(status, expected, "{path} {body}: {answer}");
            let error: Value = serde_json::from_str(&answer).unwrap();
            let message = error["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(words),
                "{message:?} should mention {words:?}"
            );
        }
        let huge = format!(
            r#"{{"model":"tiny","prompt":"{}"}}"#,
            "a".repeat(MAX_BODY_BYTES)
        );
        let (status, _) = call(&router, "POST", "/v1/completions", &huge).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, _) = call(&router, "POST", "/v1/chat/completions", &chat("")).await;
        assert_eq!(status, StatusCode::OK, "still serving");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_api_key_is_required_when_configured() {
        let (_dir, router) = served_router(Some("s3cret"));
        let (status, body) = call(&router, "GET", "/v1/models", "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.contains("API key"));
        let request = HttpRequest::builder()
            .uri("/v1/models")
            .header(header::AUTHORIZATION, "Bearer s3cret")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            router.clone().oneshot(request).await.unwrap().status(),
            StatusCode::OK
        );
        let request = HttpRequest::builder()
            .uri("/v1/models")
            .header(header::AUTHORIZATION, "Bearer s3cre")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            router.clone().oneshot(request).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(call(&router, "GET", "/healthz", "").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_full_queue_answers_429_and_frees_up() {
        let admission = Admission::new(1, 1);
        let running = admission.enter().await.unwrap();
        // The second request waits for the slot; the third finds the queue full.
        let waiting = tokio::spawn({
            let admitted = admission.admitted.clone();
            let slots = admission.slots.clone();
            async move {
                let admission = Admission {
                    admitted,
                    limit: 2,
                    slots,
                };
                admission.enter().await.map(|_| ())
            }
        });
        assert!(wait(|| admission.admitted.load(Ordering::Acquire) == 2).await);
        let refused = admission.enter().await.err().unwrap();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        drop(running);
        waiting.await.unwrap().unwrap();
        assert!(
            admission.enter().await.is_ok(),
            "room again once the others finished"
        );
    }

    async fn wait(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if check() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        false
    }
}
