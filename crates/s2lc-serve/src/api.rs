//! The HTTP API: OpenAI-style completions over one base model and the store's adapters.
//!
//! `model` is the base's id (`smollm2`) or `base:adapter@requirement` (`smollm2:legal@^1.2`); the
//! S2LC field `adapter` does the same (`auto`: routed by the prompt's embedding). S2LC's `route`
//! field carries tags (`"domain=python"` or `{"domain": "python"}`) that pick the adapter by the
//! server's tag rules, and `morph` (`{"python": 0.7, "linux": 0.3}`) blends members of the pack
//! the adapter names into one hybrid in their shared basis. Every error is a JSON body
//! `{"error": {"message", "type", "code"}}` with a 4xx/5xx status, and the server keeps serving.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use s2lc_model::generate::SamplingParams;
use s2lc_model::llama::LlamaModel;
use s2lc_model::lora::LoraAdapter;
use s2lc_model::tokenizer::Tokenizer;

use crate::batch::{Batcher, Event, Submission};
use crate::cache::{CacheError, JitCache};
use crate::router::{first_match, parse_tags, SemanticRouter, TagRule};
use crate::source::{AdapterSource, SourceError};

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
}

/// The base model and what generation needs: concurrent requests decode together in batches of
/// up to `max_batch` sequences ([`crate::batch`]).
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
    /// An engine over a loaded model, its tokenizer and its chat template (if any), decoding up
    /// to `max_batch` requests at once (1: one at a time; 0 is taken as 1).
    pub fn new(
        model: LlamaModel,
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        max_batch: usize,
    ) -> Self {
        let stop = tokenizer.stop_ids();
        let max_seq_len = model.config().max_seq_len;
        let max_batch = max_batch.max(1);
        Engine {
            batcher: Batcher::start(model, stop.clone(), max_batch),
            tokenizer,
            chat_template,
            stop,
            max_seq_len,
            max_batch,
        }
    }
}

/// An API error: status, OpenAI-style type, and a message naming the problem.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<SourceError> for ApiError {
    fn from(e: SourceError) -> Self {
        let status = match e {
            SourceError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SourceError::NotFound(_) => StatusCode::NOT_FOUND,
            SourceError::Unusable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            SourceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<CacheError<SourceError>> for ApiError {
    fn from(e: CacheError<SourceError>) -> Self {
        match e {
            CacheError::Load(e) => e.into(),
            e @ CacheError::OverBudget { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            e @ CacheError::Panicked(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "code": self.status.as_u16(),
        }});
        (self.status, Json(body)).into_response()
    }
}

/// A counting semaphore on the requests that may hold an unpacked adapter at once: one per
/// batch row and one more, loading. Requests queued behind the batch wait here before they
/// touch the cache, so they do not keep adapters the cache has evicted alive (each is ~10 MB
/// for rank 8).
#[derive(Debug)]
struct Permits {
    free: Mutex<usize>,
    returned: std::sync::Condvar,
}

/// One held permit, returned on drop.
struct Permit(Arc<Permits>);

impl Permits {
    fn acquire(self: &Arc<Self>) -> Permit {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self.clone())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.returned.notify_one();
    }
}

/// Counters behind `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// Everything a request handler needs.
struct AppState {
    engine: Engine,
    source: Box<dyn AdapterSource>,
    cache: JitCache<LoraAdapter, SourceError>,
    router: Option<SemanticRouter>,
    permits: Arc<Permits>,
    /// The last version each adapter spec resolved to, so resident adapters keep serving while
    /// the store is unreachable.
    resolved: Mutex<HashMap<String, String>>,
    config: ServeConfig,
    metrics: Metrics,
}

/// One chat message.
#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// The fields of `/v1/completions` and `/v1/chat/completions` the server reads (others, such
/// as `user` or `n`, are ignored as OpenAI's server ignores what it does not know).
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Vec<Message>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stream: Option<bool>,
    /// S2LC: the adapter, `name@requirement`, or `auto` to route by the prompt.
    adapter: Option<String>,
    /// S2LC: tags for the tag rules, `"key=value,…"` or `{"key": "value"}`.
    route: Option<Value>,
    /// S2LC: member weights of the pack named by the adapter, `{"member": weight}`.
    morph: Option<Value>,
}

/// The router over a state; see the module docs for the routes.
fn routes(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The cache key (`name@version`) of an adapter spec. When the store is unreachable, a spec that
/// resolved before and whose adapter is still resident is served from the cache; a cold one gets
/// 503.
fn resolve(s: &AppState, spec: &str) -> Result<String, ApiError> {
    // The store is asked without the lock held: a slow store delays only this request.
    let result = s.source.resolve(spec);
    let mut resolved = s.resolved.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(key) => {
            resolved.insert(spec.to_string(), key.clone());
            Ok(key)
        }
        Err(SourceError::Unavailable(msg)) => resolved
            .get(spec)
            .filter(|key| s.cache.contains(key))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the adapter store is unreachable and {spec} is not resident: {msg}"),
                )
            }),
        Err(e) => Err(e.into()),
    }
}

/// An adapter (a morph of a pack's members when `morph` is not empty) and the bytes it holds
/// resident (f32 factors).
fn load_sized(
    source: &dyn AdapterSource,
    key: &str,
    morph: &[(String, f32)],
) -> Result<(LoraAdapter, usize), SourceError> {
    let a = source.load(key, morph)?;
    let bytes = 4 * a.n_params();
    Ok((a, bytes))
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
    /// Listening or the runtime failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves the API on `listener` until the process ends (blocking; runs its own tokio runtime).
/// The pinned adapters are loaded first; the server refuses to start if one fails. With a
/// router, requests for the adapter `auto` are routed by their prompt's embedding.
pub fn serve(
    listener: TcpListener,
    engine: Engine,
    source: Box<dyn AdapterSource>,
    router: Option<SemanticRouter>,
    config: ServeConfig,
) -> Result<(), ServeError> {
    let holders = engine.max_batch + 1;
    let state = Arc::new(AppState {
        engine,
        source,
        cache: JitCache::new(config.adapter_budget),
        router,
        permits: Arc::new(Permits {
            free: Mutex::new(holders),
            returned: std::sync::Condvar::new(),
        }),
        resolved: Mutex::new(HashMap::new()),
        config,
        metrics: Metrics::default(),
    });
    for spec in &state.config.pinned {
        let pin = |message: String| ServeError::Pin {
            spec: spec.clone(),
            message,
        };
        // Through `resolve`, so the mapping is remembered: a pinned adapter keeps serving even if
        // the store is unreachable before any request has named it.
        let key = resolve(&state, spec).map_err(|e| pin(e.message))?;
        state
            .cache
            .get_or_load(&key, || load_sized(state.source.as_ref(), &key, &[]))
            .map_err(|e| pin(e.to_string()))?;
        state.cache.set_pinned(&key, true);
    }
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, routes(state)).await
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

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let c = s.cache.stats();
    let m = &s.metrics;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let series = [
        (
            "s2lc_requests_total",
            "Completion requests received.",
            "counter",
            get(&m.requests),
        ),
        (
            "s2lc_request_errors_total",
            "Completion requests answered with an error.",
            "counter",
            get(&m.errors),
        ),
        (
            "s2lc_prompt_tokens_total",
            "Prompt tokens processed.",
            "counter",
            get(&m.prompt_tokens),
        ),
        (
            "s2lc_completion_tokens_total",
            "Tokens generated.",
            "counter",
            get(&m.completion_tokens),
        ),
        (
            "s2lc_adapter_cache_hits_total",
            "Adapter requests served from the cache.",
            "counter",
            (c.hits + c.coalesced) as f64,
        ),
        (
            "s2lc_adapter_cache_misses_total",
            "Adapter requests that loaded the adapter.",
            "counter",
            c.misses as f64,
        ),
        (
            "s2lc_adapter_cache_evictions_total",
            "Adapters evicted to stay within the budget.",
            "counter",
            c.evictions as f64,
        ),
        (
            "s2lc_adapter_cache_resident_bytes",
            "Bytes of unpacked adapters resident.",
            "gauge",
            c.resident_bytes as f64,
        ),
        (
            "s2lc_adapter_cache_budget_bytes",
            "The adapter cache's byte budget.",
            "gauge",
            s.cache.budget() as f64,
        ),
    ];
    let mut out = String::new();
    for (name, help, kind, v) in series {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    let bounds = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
    let (counts, n, sum) = s.cache.load_histogram(&bounds);
    out.push_str("# HELP s2lc_adapter_load_seconds Time to pull and unpack an adapter.\n");
    out.push_str("# TYPE s2lc_adapter_load_seconds histogram\n");
    for (b, c) in bounds.iter().zip(counts) {
        out.push_str(&format!(
            "s2lc_adapter_load_seconds_bucket{{le=\"{b}\"}} {c}\n"
        ));
    }
    out.push_str(&format!(
        "s2lc_adapter_load_seconds_bucket{{le=\"+Inf\"}} {n}\ns2lc_adapter_load_seconds_sum {sum}\ns2lc_adapter_load_seconds_count {n}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(s, body, false).await
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(s, body, true).await
}

async fn respond(s: Arc<AppState>, body: Result<Bytes, BytesRejection>, chat: bool) -> Response {
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
        let req: CompletionRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("malformed JSON body: {e}")))?;
        let st = s.clone();
        let job = blocking(move || prepare(&st, req, chat)).await?;
        if job.stream {
            return Ok(stream(s.clone(), job));
        }
        let st = s.clone();
        let (job, c) = blocking(move || run(&st, &job, |_| true).map(|c| (job, c))).await?;
        let choice = if chat {
            json!({"index": 0, "finish_reason": c.finish_reason,
                   "message": {"role": "assistant", "content": c.text}})
        } else {
            json!({"index": 0, "finish_reason": c.finish_reason, "text": c.text})
        };
        let mut body = envelope(&s, &job, if chat { "chat.completion" } else { "text_completion" });
        body["choices"] = json!([choice]);
        body["usage"] = json!({"prompt_tokens": job.prompt.len(), "completion_tokens": c.completion_tokens,
                               "total_tokens": job.prompt.len() + c.completion_tokens});
        Ok(Json(body).into_response())
    }
    .await;
    result.unwrap_or_else(|e: ApiError| {
        s.metrics.errors.fetch_add(1, Ordering::Relaxed);
        e.into_response()
    })
}

/// Runs blocking work (tokenizing, loading adapters, generating) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
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
        "s2lc": {"adapter": job.key, "adapter_cache": job.cache, "route": job.route,
                 "morph": job.morph},
    })
}

/// A streamed response: server-sent events, one chunk per decoded piece of text, then one with
/// the finish reason, then `data: [DONE]`. Generation stops when the client goes away.
fn stream(s: Arc<AppState>, job: Job) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let object = if job.chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    tokio::task::spawn_blocking(move || {
        let chunk = |text: Option<&str>, finish: Option<&str>| {
            let mut c = envelope(&s, &job, object);
            let delta = match (job.chat, text) {
                (true, Some(t)) => {
                    json!({"index": 0, "delta": {"content": t}, "finish_reason": finish})
                }
                (true, None) => json!({"index": 0, "delta": {}, "finish_reason": finish}),
                (false, t) => json!({"index": 0, "text": t.unwrap_or(""), "finish_reason": finish}),
            };
            c["choices"] = json!([delta]);
            format!("data: {c}\n\n")
        };
        let result = run(&s, &job, |piece| {
            tx.blocking_send(chunk(Some(piece), None)).is_ok()
        });
        let last = match result {
            Ok(c) => chunk(None, Some(c.finish_reason)),
            Err(e) => {
                s.metrics.errors.fetch_add(1, Ordering::Relaxed);
                format!(
                    "data: {}\n\n",
                    json!({"error": {"message": e.message, "code": e.status.as_u16()}})
                )
            }
        };
        let _ = tx.blocking_send(last);
        let _ = tx.blocking_send("data: [DONE]\n\n".to_string());
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
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

/// A validated request, its prompt tokens and its adapter.
struct Job {
    id: u64,
    chat: bool,
    stream: bool,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    adapter: Option<Arc<LoraAdapter>>,
    /// `name@version` of the adapter.
    key: Option<String>,
    /// `none`, `hit` or `miss`.
    cache: &'static str,
    /// How the router chose the adapter, if it did.
    route: Option<Value>,
    /// The member weights of a morphed adapter.
    morph: Option<Value>,
    /// Held while the job holds its adapter.
    _permit: Option<Permit>,
}

/// What a generation produced.
struct Completion {
    text: String,
    completion_tokens: usize,
    finish_reason: &'static str,
}

/// Validates a request and finds its adapter (through the cache). Blocking.
fn prepare(s: &AppState, req: CompletionRequest, chat: bool) -> Result<Job, ApiError> {
    let base = &s.config.model_id;
    let (model_base, model_adapter) = match req.model.as_deref() {
        None => (base.as_str(), None),
        Some(m) => match m.split_once(':') {
            Some((b, a)) => (b, Some(a)),
            None => (m, None),
        },
    };
    if model_base != base {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model '{model_base}' is not served here (the base is '{base}')"),
        ));
    }
    let spec = match (model_adapter, req.adapter.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::bad(format!(
                "the model names adapter '{a}' but the adapter field names '{b}'"
            )))
        }
        (a, b) => a.or(b),
    };
    let max_tokens = req.max_tokens.unwrap_or(16);
    if max_tokens > s.config.max_tokens {
        return Err(ApiError::bad(format!(
            "max_tokens {max_tokens} is over this server's limit of {}",
            s.config.max_tokens
        )));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    let top_p = req.top_p.unwrap_or(1.0);
    if !((0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!(
            "temperature must be in [0, 2] and top_p in (0, 1] (got {temperature}, {top_p})"
        )));
    }
    let e = &s.engine;
    let text = if chat {
        chat_prompt(e.chat_template.as_deref(), req.messages.as_deref())?
    } else {
        match &req.prompt {
            Some(Value::String(p)) => p.clone(),
            Some(_) => return Err(ApiError::bad("prompt must be one string")),
            None => return Err(ApiError::bad("prompt is missing")),
        }
    };
    let prompt = e
        .tokenizer
        .encode(&text, true)
        .map_err(|err| ApiError::bad(format!("tokenizing the prompt: {err}")))?;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    if prompt.len() + max_tokens > e.max_seq_len {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens; with max_tokens {max_tokens} that is over the context of {} tokens",
            prompt.len(),
            e.max_seq_len
        )));
    }
    // For chat, the router reads the last user message.
    let query = match (chat, req.messages.as_deref()) {
        (true, Some(m)) => m
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or(text.as_str(), |m| m.content.as_str()),
        _ => text.as_str(),
    };
    // Cheap checks first: routing may embed the prompt.
    let auto_morph = req.morph.as_ref().and_then(Value::as_str) == Some("auto");
    let mut morph = if auto_morph {
        Vec::new()
    } else {
        morph_weights(req.morph.as_ref())?
    };
    let (spec, mut route) = choose_adapter(s, spec, req.route.as_ref(), query)?;
    if auto_morph {
        if spec.is_none() {
            return Err(ApiError::bad(
                "morph 'auto' needs an adapter that names a pack (adapter or model base:pack@version)",
            ));
        }
        let router = router_for(s, "morph 'auto'")?;
        let (weights, scores) = router
            .morph(query, MORPH_TEMPERATURE)
            .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
        let scores: serde_json::Map<String, Value> =
            scores.into_iter().map(|(m, v)| (m, json!(v))).collect();
        route = Some(json!({"by": "embedding", "morph": "auto", "scores": scores}));
        morph = weights;
    }
    if !morph.is_empty() && spec.is_none() {
        return Err(ApiError::bad(
            "morph needs an adapter that names a pack (adapter or model base:pack@version)",
        ));
    }
    // The adapter: resolved to one version, then from the cache or loaded into it. A morph is
    // cached under its pack's key and its weights.
    let permit = spec.as_ref().map(|_| s.permits.acquire());
    let (adapter, key, cache) = match spec {
        None => (None, None, "none"),
        Some(spec) => {
            let key = resolve(s, &spec)?;
            let cache_key = if morph.is_empty() {
                key.clone()
            } else {
                let w: Vec<String> = morph.iter().map(|(m, w)| format!("{m}={w}")).collect();
                format!("{key}#morph({})", w.join(","))
            };
            let mut loaded = false;
            let a = s.cache.get_or_load(&cache_key, || {
                loaded = true;
                load_sized(s.source.as_ref(), &key, &morph)
            })?;
            (Some(a), Some(key), if loaded { "miss" } else { "hit" })
        }
    };
    Ok(Job {
        id: s.metrics.requests.load(Ordering::Relaxed),
        chat,
        stream: req.stream.unwrap_or(false),
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: req.seed.unwrap_or(0),
        },
        adapter,
        key,
        cache,
        route,
        // Router-chosen weights are tenths; shown as such, not as their f32 approximations.
        morph: if auto_morph {
            let tenths = |w: f32| json!((f64::from(w) * 10.0).round() / 10.0);
            Some(Value::Object(
                morph.iter().map(|(m, w)| (m.clone(), tenths(*w))).collect(),
            ))
        } else {
            req.morph.filter(|_| !morph.is_empty())
        },
        _permit: permit,
    })
}

/// The server's semantic router, or a 400 saying that `what` needs one.
fn router_for<'a>(s: &'a AppState, what: &str) -> Result<&'a SemanticRouter, ApiError> {
    s.router
        .as_ref()
        .ok_or_else(|| ApiError::bad(format!("{what} needs a server started with --router")))
}

/// The adapter spec of a request and how it was chosen: named explicitly; by the first tag rule
/// its `route` tags meet (or, if none does and the server has a router, by embedding); or, for
/// `auto`, by the embedding of `query`.
fn choose_adapter(
    s: &AppState,
    named: Option<&str>,
    route: Option<&Value>,
    query: &str,
) -> Result<(Option<String>, Option<Value>), ApiError> {
    let tags = match route {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => {
            Some(parse_tags(t).map_err(|e| ApiError::bad(format!("route: {e}")))?)
        }
        Some(Value::Object(o)) => Some(
            o.iter()
                .map(|(k, v)| match v {
                    Value::String(v) => Ok((k.clone(), v.clone())),
                    other => Err(ApiError::bad(format!(
                        "route: the value of '{k}' must be a string, not {other}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(other) => {
            return Err(ApiError::bad(format!(
                "route must be \"key=value,...\" or an object of strings, not {other}"
            )))
        }
    };
    // By embedding: for `auto`, or for tags no rule matched (then recorded in the answer).
    let by_embedding = |tags: Option<Value>| -> Result<(Option<String>, Option<Value>), ApiError> {
        let router = router_for(s, "adapter 'auto'")?;
        let (adapter, d) = router
            .route(query)
            .map_err(|err| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
        let mut info = json!({"by": "embedding", "score": d.score, "margin": d.margin});
        if let Some(tags) = tags {
            info["tags"] = tags;
        }
        Ok((Some(adapter.to_string()), Some(info)))
    };
    match (named, tags) {
        (Some(a), Some(_)) if a != "auto" => Err(ApiError::bad(format!(
            "the request names adapter '{a}' and route tags: give one of them"
        ))),
        (_, Some(tags)) => match first_match(&s.config.rules, &tags) {
            Some((i, rule)) => Ok((
                Some(rule.adapter.clone()),
                Some(json!({"by": "rule", "rule": i, "when": rule.when})),
            )),
            None if s.router.is_some() => by_embedding(Some(json!(tags))),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no tag rule matches {} and the server has no router to fall back on ({} rules)",
                    serde_json::to_string(&tags).unwrap_or_default(),
                    s.config.rules.len()
                ),
            )),
        },
        (Some("auto"), None) => by_embedding(None),
        (named, None) => Ok((named.map(str::to_string), None)),
    }
}

/// Temperature of router-chosen morph weights (`"morph": "auto"`), in cosine-score units: a
/// route 0.05 behind the best gets e⁻¹ of its weight.
const MORPH_TEMPERATURE: f32 = 0.05;

/// Morph weights from the request: an object of finite numbers summing to a positive number,
/// sorted by member (so equal blends share one cache entry). Absent or `null`: none.
fn morph_weights(morph: Option<&Value>) -> Result<Vec<(String, f32)>, ApiError> {
    let o = match morph {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(o)) if !o.is_empty() => o,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "morph must be a non-empty object of member weights or \"auto\", not {other}"
            )))
        }
    };
    let mut weights = Vec::with_capacity(o.len());
    for (m, w) in o {
        let w = w.as_f64().filter(|w| w.is_finite()).ok_or_else(|| {
            ApiError::bad(format!(
                "morph: the weight of '{m}' must be a finite number, not {w}"
            ))
        })?;
        weights.push((m.clone(), w as f32));
    }
    let sum: f32 = weights.iter().map(|(_, w)| w).sum();
    if sum <= 0.0 || !sum.is_finite() {
        return Err(ApiError::bad(format!(
            "morph weights must sum to a positive number (they sum to {sum})"
        )));
    }
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(weights)
}

/// Generates for a job (decoded in a batch with the other requests), passing each decoded piece
/// of text to `on_piece` (which returns `false` to stop: the job leaves the batch). Blocking.
fn run(
    s: &AppState,
    job: &Job,
    mut on_piece: impl FnMut(&str) -> bool,
) -> Result<Completion, ApiError> {
    let e = &s.engine;
    let internal = |err: &dyn std::fmt::Display| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let submitted = e.batcher.submit(Submission {
        prompt: job.prompt.clone(),
        max_tokens: job.max_tokens,
        sampling: job.sampling,
        adapter: job.adapter.clone(),
        events: tx,
    });
    if !submitted {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the decode loop has stopped",
        ));
    }
    let mut text = String::new();
    let mut decoder = e.tokenizer.stream_decoder();
    let mut ids = Vec::new();
    let mut stopped = false;
    // Ends when the sequence does (`Done`), or early when the client goes away: dropping `rx`
    // takes the sequence out of the batch at the next step.
    for event in rx {
        let id = match event {
            Event::Token(id) => id,
            Event::Done(Ok(())) => break,
            Event::Done(Err(message)) => return Err(internal(&message)),
        };
        ids.push(id);
        if e.stop.contains(&id) {
            stopped = true;
            continue;
        }
        let piece = decoder.push(id).map_err(|err| internal(&err))?;
        if let Some(piece) = piece {
            text.push_str(&piece);
            if !on_piece(&piece) {
                break;
            }
        }
    }
    if let Some(rest) = decoder.flush().map_err(|err| internal(&err))? {
        text.push_str(&rest);
        on_piece(&rest);
    }
    s.metrics
        .prompt_tokens
        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    s.metrics
        .completion_tokens
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    Ok(Completion {
        text,
        completion_tokens: ids.len(),
        finish_reason: if stopped { "stop" } else { "length" },
    })
}

/// The prompt of a chat request: every message in ChatML when the model's template uses it
/// (SmolLM2, Qwen2), else the single user message as is.
fn chat_prompt(template: Option<&str>, messages: Option<&[Message]>) -> Result<String, ApiError> {
    let messages = messages
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("messages is missing or empty"))?;
    for m in messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::bad(format!(
                "unknown message role '{}' (system, user, assistant)",
                m.role
            )));
        }
    }
    if template.is_some_and(|t| t.contains("<|im_start|>")) {
        let mut out = String::new();
        for m in messages {
            out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        out.push_str("<|im_start|>assistant\n");
        Ok(out)
    } else {
        match messages {
            [m] if m.role == "user" => Ok(m.content.clone()),
            _ => Err(ApiError::bad(
                "this model has no chat template: send one user message",
            )),
        }
    }
}
