//! The HTTP API: OpenAI-style completions over one base model and the store's adapters.
//!
//! `model` is the base's id (`smollm2`) or `base:adapter@requirement` (`smollm2:legal@^1.2`); the
//! S2LC field `adapter` does the same (`auto`: routed by the prompt's embedding). S2LC's `route`
//! field carries tags (`"domain=python"` or `{"domain": "python"}`) that pick the adapter by the
//! server's tag rules, and `morph` (`{"python": 0.7, "linux": 0.3}`) blends members of the pack
//! the adapter names into one hybrid in their shared basis. Every error is a JSON body
//! `{"error": {"message", "type", "code"}}` with a 4xx/5xx status, and the server keeps serving.
//!
//! Load is bounded at every step, and no waiting holds a thread:
//! - connections: at most `max_connections` ([`listen`]), headers within `header_timeout`;
//! - admission: at most `max_batch + max_queue` completion requests at once; more get `429` with
//!   `Retry-After` at once;
//! - each admitted request has a deadline (`request_timeout`): past it, a `504` (or an error event
//!   in a stream), and its sequence leaves the batch;
//! - the body must arrive within `body_timeout` and fit `max_body_bytes`;
//! - adapters: at most `max_batch + 1` requests hold or load one (an async semaphore), so queued
//!   requests do not keep evicted adapters alive.
//!
//! Modules: [`request`] (the body and its validation), [`prepare`] (prompt, adapter choice,
//! cache), [`generation`] (tokens to text, stop strings, log-probabilities), [`access`] (API
//! keys, content type, CORS), [`metrics`], [`listen`] (connections), [`error`].

pub mod access;
pub mod error;
pub mod generation;
pub mod listen;
pub mod metrics;
pub mod prepare;
pub mod request;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};

use s2lc_model::llama::LlamaModel;

use s2lc_model::tokenizer::Tokenizer;

use crate::batch::{BatchConfig, Batcher};
use crate::cache::JitCache;
use crate::resident::Resident;
use crate::router::{SemanticRouter, TagRule};
use crate::source::{AdapterSource, SourceError};
pub use error::ApiError;
use generation::{chat_logprobs, completion_logprobs, Generation, Step};
use listen::ConnectionLimits;
use metrics::Metrics;
use prepare::Job;

/// Limits and names of a server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The id clients use for the base model (`model` in requests).
    pub model_id: String,
    /// Bytes the unpacked adapters may hold (f32 factors).
    pub adapter_budget: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Adapters (`name@requirement`) loaded at start and pinned: never evicted.
    pub pinned: Vec<String>,
    /// Tag rules, tried in order for requests that carry `route` tags.
    pub rules: Vec<TagRule>,
    /// API keys; when not empty every route but `/health` needs `Authorization: Bearer KEY`.
    pub api_keys: Vec<String>,
    /// Origins allowed to call from a browser (`*`: any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Completion requests admitted beyond those decoding; more get 429.
    pub max_queue: usize,
    /// A request's deadline, from its arrival to its last token.
    pub request_timeout: Duration,
    /// Time a client has to send its request body.
    pub body_timeout: Duration,
    /// Time a client has to send its request headers (and an idle connection stays open).
    pub header_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// How long an adapter spec's resolution to a version is reused before the store is asked
    /// again.
    pub resolve_ttl: Duration,
}

impl ServeConfig {
    /// The defaults for a base model named `model_id` (the flags of `s2lc serve` show them).
    pub fn new(model_id: impl Into<String>) -> Self {
        ServeConfig {
            model_id: model_id.into(),
            adapter_budget: 256 << 20,
            max_tokens: 512,
            max_body_bytes: 1 << 20,
            pinned: Vec::new(),
            rules: Vec::new(),
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            max_queue: 64,
            request_timeout: Duration::from_secs(300),
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_connections: 4096,
            resolve_ttl: Duration::from_secs(5),
        }
    }
}

/// The base model and what generation needs: concurrent requests decode together in batches
/// ([`crate::batch`]).
pub struct Engine {
    batcher: Batcher,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    stop: Vec<u32>,
    max_seq_len: usize,
    max_batch: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Engine(max_seq_len {}, max_batch {})",
            self.max_seq_len, self.max_batch
        )
    }
}

impl Engine {
    /// An engine over a loaded model, its tokenizer and its chat template (if any), decoding as
    /// `batch` says (a `max_batch` or `prefill_chunk` of 0 is taken as 1).
    pub fn new(
        model: LlamaModel,
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        batch: BatchConfig,
    ) -> Self {
        let stop = tokenizer.stop_ids();
        let max_seq_len = model.config().max_seq_len;
        let batch = BatchConfig {
            max_batch: batch.max_batch.max(1),
            prefill_chunk: batch.prefill_chunk.max(1),
            ..batch
        };
        let max_batch = batch.max_batch;
        Engine {
            batcher: Batcher::start(model, stop.clone(), batch),
            tokenizer,
            chat_template,
            stop,
            max_seq_len,
            max_batch,
        }
    }
}

/// Everything a request handler needs.
pub struct AppState {
    engine: Engine,
    source: Box<dyn AdapterSource>,
    cache: JitCache<Resident, SourceError>,
    router: Option<SemanticRouter>,
    /// Completion requests admitted (decoding, queued, or preparing).
    admission: Arc<Semaphore>,
    admitted_limit: usize,
    /// Requests holding or loading an adapter.
    adapter_permits: Arc<Semaphore>,
    /// The last version each adapter spec resolved to, and when.
    resolved: Mutex<HashMap<String, (prepare::Resolved, std::time::Instant)>>,
    config: ServeConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppState({:?}, {:?})", self.engine, self.config)
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A pinned adapter could not be loaded or does not fit the budget.
    #[error("pinning {spec}: {message}")]
    Pin {
        /// The adapter as given.
        spec: String,
        /// What went wrong.
        message: String,
    },
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// Listening or the runtime failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A server: its state and routes, ready to run on a listener (or to be driven in process by
/// tests through [`Server::router`]).
#[derive(Debug, Clone)]
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    /// A server over `engine` and `source`; the pinned adapters are loaded first and the server
    /// refuses to start if one fails. With a router, requests for the adapter `auto` are routed
    /// by their prompt's embedding.
    pub fn new(
        engine: Engine,
        source: Box<dyn AdapterSource>,
        router: Option<SemanticRouter>,
        config: ServeConfig,
    ) -> Result<Self, ServeError> {
        access::cors(&config.cors_origins).map_err(ServeError::Config)?;
        if config.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(ServeError::Config("an API key is empty".into()));
        }
        let admitted_limit = engine.max_batch + config.max_queue;
        let holders = engine.max_batch + 1;
        let state = Arc::new(AppState {
            engine,
            source,
            cache: JitCache::with_busy(config.adapter_budget, Resident::busy),
            router,
            admission: Arc::new(Semaphore::new(admitted_limit)),
            admitted_limit,
            adapter_permits: Arc::new(Semaphore::new(holders)),
            resolved: Mutex::new(HashMap::new()),
            config,
            metrics: Arc::new(Metrics::default()),
        });
        for spec in &state.config.pinned {
            let pin = |message: String| ServeError::Pin {
                spec: spec.clone(),
                message,
            };
            // Through `resolve`, so the mapping is remembered: a pinned adapter keeps serving even
            // if the store is unreachable before any request has named it.
            let r = prepare::resolve(&state, spec).map_err(|e| pin(e.message))?;
            state
                .cache
                .get_or_load(&r.content, || prepare::load_entry(&state, &r, &[]))
                .map_err(|e| pin(e.to_string()))?;
            state.cache.set_pinned(&r.content, true);
        }
        Ok(Server { state })
    }

    /// The routes with their middleware (API keys, CORS).
    pub fn router(&self) -> Router {
        let s = self.state.clone();
        let app = Router::new()
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .route("/v1/models", get(models))
            .route("/metrics", get(metrics::metrics))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
            .layer(axum::middleware::from_fn_with_state(
                s.clone(),
                access::require_key,
            ));
        // Checked in `new`.
        let app = match access::cors(&s.config.cors_origins).ok().flatten() {
            Some(cors) => app.layer(cors),
            None => app,
        };
        app.with_state(s)
    }

    /// Serves on `listener` until the process ends.
    pub async fn run(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let limits = ConnectionLimits {
            max_connections: self.state.config.max_connections,
            header_timeout: self.state.config.header_timeout,
        };
        let metrics = self.state.metrics.clone();
        listen::serve_connections(listener, self.router(), limits, metrics).await
    }
}

/// Serves the API on `listener` until the process ends (blocking; runs its own tokio runtime).
/// See [`Server::new`].
pub fn serve(
    listener: std::net::TcpListener,
    engine: Engine,
    source: Box<dyn AdapterSource>,
    router: Option<SemanticRouter>,
    config: ServeConfig,
) -> Result<(), ServeError> {
    let server = Server::new(engine, source, router, config)?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        server.run(listener).await
    })?;
    Ok(())
}

async fn models(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let st = s.clone();
    let adapters = blocking(move || Ok(st.source.list()?)).await?;
    let base = &s.config.model_id;
    let mut data = vec![json!({"id": base, "object": "model", "owned_by": "s2lc"})];
    data.extend(adapters.iter().map(|a| {
        json!({"id": format!("{base}:{a}"), "object": "model", "owned_by": "s2lc", "root": base})
    }));
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(s, headers, body, false).await
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(s, headers, body, true).await
}

async fn respond(s: Arc<AppState>, headers: HeaderMap, body: Body, chat: bool) -> Response {
    s.metrics.requests.inc();
    handle(&s, &headers, body, chat)
        .await
        .unwrap_or_else(|e: ApiError| {
            s.metrics.errors.inc();
            e.into_response()
        })
}

/// The 504 of a request past its deadline.
fn deadline_error(s: &AppState) -> ApiError {
    s.metrics.deadline_exceeded.inc();
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the request ran past its deadline of {} s",
            s.config.request_timeout.as_secs_f64()
        ),
    )
}

/// Admission, body, validation, adapter, generation: each bounded (see the module docs).
async fn handle(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    chat: bool,
) -> Result<Response, ApiError> {
    access::require_json(headers)?;
    let deadline = Instant::now() + s.config.request_timeout;
    let limit = s.config.max_body_bytes;
    let bytes = match timeout(s.config.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    s.config.body_timeout.as_secs_f64()
                ),
            ))
        }
        Ok(Err(e)) if is_length_limit(&e) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over this server's limit of {limit} bytes"),
            ))
        }
        Ok(Err(e)) => return Err(ApiError::bad(format!("reading the request body: {e}"))),
        Ok(Ok(b)) => b,
    };
    // Admission after the body is read: a refused request's unread body would make the close
    // a reset that can reach the client before the 429 does.
    let admitted = s.admission.clone().try_acquire_owned().map_err(|_| {
        s.metrics.rejected.inc();
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the server is at capacity ({} requests decoding or queued); retry shortly",
                s.admitted_limit
            ),
        )
        .retry_after(1)
    })?;
    // Blocking work started for this request holds its admission too, so work abandoned at the
    // deadline still counts until it ends.
    let admitted = Arc::new(admitted);
    let req = request::parse(&bytes)?;
    let prepared = async {
        let (st, held) = (s.clone(), admitted.clone());
        let plan = blocking(move || {
            let _held = held;
            prepare::plan(&st, req, chat)
        })
        .await?;
        let permit = match plan.spec {
            None => None,
            Some(_) => Some(
                s.adapter_permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(ApiError::internal)?,
            ),
        };
        let id = s.metrics.requests.get();
        let (st, held) = (s.clone(), admitted.clone());
        let job = blocking(move || {
            let _held = held;
            prepare::load(&st, plan, id)
        })
        .await?;
        Ok::<_, ApiError>((job, permit))
    };
    let (job, permit) = timeout_at(deadline, prepared)
        .await
        .map_err(|_| deadline_error(s))??;
    if job.plan.params.stream {
        return Ok(stream(s.clone(), job, (admitted, permit), deadline));
    }
    let body = timeout_at(deadline, complete(s, &job))
        .await
        .map_err(|_| deadline_error(s))??;
    Ok(Json(body).into_response())
}

/// Whether reading a body failed on its length limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.to_string().contains("length limit exceeded") {
            return true;
        }
        source = err.source();
    }
    false
}

/// Runs blocking work (tokenizing, routing, loading adapters) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

/// Generates a whole answer. Dropping the future (client gone, deadline) cancels the sequence.
async fn complete(s: &AppState, job: &Job) -> Result<Value, ApiError> {
    let mut g = Generation::start(s, job)?;
    let mut text = String::new();
    let mut records = Vec::new();
    let finish = loop {
        match g.next().await? {
            Step::Piece(piece, lps) => {
                text.push_str(&piece);
                records.extend(lps);
            }
            Step::Finished(reason) => break reason,
        }
    };
    count_tokens(s, job, g.tokens);
    let tok = &s.engine.tokenizer;
    let logprobs = job.plan.params.logprobs.map(|_| {
        if job.plan.chat {
            chat_logprobs(tok, &records)
        } else {
            completion_logprobs(tok, &records, 0)
        }
    });
    let choice = if job.plan.chat {
        json!({"index": 0, "finish_reason": finish, "logprobs": logprobs,
               "message": {"role": "assistant", "content": text}})
    } else {
        json!({"index": 0, "finish_reason": finish, "logprobs": logprobs, "text": text})
    };
    let object = if job.plan.chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let mut body = envelope(s, job, object);
    body["choices"] = json!([choice]);
    let prompt = job.plan.prompt.len();
    body["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": g.tokens,
                           "total_tokens": prompt + g.tokens});
    Ok(body)
}

fn count_tokens(s: &AppState, job: &Job, generated: usize) {
    s.metrics.prompt_tokens.add(job.plan.prompt.len() as u64);
    s.metrics.completion_tokens.add(generated as u64);
}

/// The fields every response (and every stream chunk) carries.
fn envelope(s: &AppState, job: &Job, object: &str) -> Value {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "id": format!("cmpl-{}", job.id),
        "object": object,
        "created": created,
        "model": match &job.key {
            Some(k) => format!("{}:{k}", s.config.model_id),
            None => s.config.model_id.clone(),
        },
        "s2lc": {"adapter": job.key, "adapter_cache": job.cache, "route": job.plan.route,
                 "morph": job.plan.morph_shown},
    })
}

/// A streamed response: server-sent events, one chunk per piece of text, then one with the
/// finish reason (or an error event), then `data: [DONE]`. Generation stops when the client goes
/// away or the deadline passes; `held` (admission and adapter permits) is released then.
fn stream(
    s: Arc<AppState>,
    job: Job,
    held: (Arc<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>),
    deadline: Instant,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let _held = held;
        let object = if job.plan.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let tok = &s.engine.tokenizer;
        let chunk = |text: Option<&str>, finish: Option<&str>, lp: Option<Value>| {
            let mut c = envelope(&s, &job, object);
            let mut choice = match (job.plan.chat, text) {
                (true, Some(t)) => json!({"index": 0, "delta": {"content": t}}),
                (true, None) => json!({"index": 0, "delta": {}}),
                (false, t) => json!({"index": 0, "text": t.unwrap_or("")}),
            };
            choice["finish_reason"] = json!(finish);
            choice["logprobs"] = lp.unwrap_or(Value::Null);
            c["choices"] = json!([choice]);
            format!("data: {c}\n\n")
        };
        let mut tokens = 0;
        let produce = async {
            let mut g = Generation::start(&s, &job)?;
            let mut offset = 0;
            loop {
                let step = g.next().await;
                tokens = g.tokens;
                match step? {
                    Step::Piece(text, lps) => {
                        let lp = job.plan.params.logprobs.map(|_| {
                            if job.plan.chat {
                                chat_logprobs(tok, &lps)
                            } else {
                                completion_logprobs(tok, &lps, offset)
                            }
                        });
                        offset += text.len();
                        if tx.send(chunk(Some(&text), None, lp)).await.is_err() {
                            return Ok::<_, ApiError>(None);
                        }
                    }
                    Step::Finished(reason) => return Ok(Some(reason)),
                }
            }
        };
        let end = timeout_at(deadline, produce).await;
        count_tokens(&s, &job, tokens);
        let last = match end {
            Ok(Ok(None)) => return,
            Ok(Ok(Some(reason))) => chunk(None, Some(reason), None),
            Ok(Err(e)) => {
                s.metrics.errors.inc();
                format!("data: {}\n\n", e.body())
            }
            Err(_) => format!("data: {}\n\n", deadline_error(&s).body()),
        };
        // A client that stopped reading gets no more than its buffer: never wait on it.
        let _ = tx.try_send(last);
        let _ = tx.try_send("data: [DONE]\n\n".to_string());
    });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}
