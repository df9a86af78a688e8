//! `s2lc serve`: the OpenAI-style HTTP server over the base model and the Adapter Store.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use s2lc_serve::router::TagRule;
use s2lc_serve::{BatchConfig, Engine, RouteTable, SemanticRouter, ServeConfig, StoreSource};
use std::time::Duration;

use crate::{load_model, parse_weights};
use s2lc_bench::common::parse_bytes;
use s2lc_model::kv::KvSpec;
use s2lc_model::lora::{AdapterDtype, AdapterLimits};
use s2lc_model::source::WeightStorage;

/// Options of `s2lc serve`. Every setting can also come from a TOML file (`--config`), under
/// the flag's name (`adapter-memory = "256MiB"`, `pin = ["legal@^1"]`, and `[[rule]]` tables with
/// `when = { domain = "python" }` and `adapter = "python-r8@^1"`); a flag overrides the file.
#[derive(Args)]
pub struct ServeArgs {
    /// A TOML file of settings (see above).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A .gguf file or a Hugging Face directory [default: SmolLM2-135M-Instruct in $S2LC_HOME].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Weight storage of the base model [default: native].
    #[arg(long, value_parser = parse_weights)]
    weights: Option<WeightStorage>,
    /// The Adapter Store: a directory or s3://bucket/prefix [default: $S2LC_STORE, else
    /// $S2LC_HOME/store].
    #[arg(long)]
    store: Option<String>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// Port (0 picks a free one; the address is printed) [default: 8080].
    #[arg(long)]
    port: Option<u16>,
    /// Bytes of adapters kept resident, counted in their resident form (e.g. 256MiB, 1GiB,
    /// 1000000) [default: 256MiB].
    #[arg(long, value_parser = parse_bytes)]
    adapter_memory: Option<usize>,
    /// How loaded adapters are held: f32, f16, int8 or int4 factors (Q8_0 or Q4_0 blocks, run
    /// by the block kernels) [default: f16].
    #[arg(long)]
    adapter_dtype: Option<AdapterDtype>,
    /// Largest max_tokens a request may ask for [default: 512].
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Requests decoded together, one batched forward pass per token (1: one at a time)
    /// [default: 8].
    #[arg(long)]
    max_batch: Option<usize>,
    /// Largest request body [default: 1MiB].
    #[arg(long, value_parser = parse_bytes)]
    max_body: Option<usize>,
    /// The id clients name the base model by [default: the model file's name without extension].
    #[arg(long)]
    model_id: Option<String>,
    /// Load this adapter (`name@requirement`) at start and never evict it; repeatable (added to
    /// the file's).
    #[arg(long = "pin")]
    pinned: Vec<String>,
    /// Route requests for the adapter `auto` (and tagged requests no rule matches) by their
    /// prompt with this table (`s2lc router build`).
    #[arg(long)]
    router: Option<PathBuf>,
    /// The router's sentence encoder [default: $S2LC_HOME/models/all-MiniLM-L6-v2].
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// A tag rule `key=value[,key=value...]:adapter` (e.g. `domain=python:python-r8@^1`):
    /// requests whose `route` tags meet it get that adapter; repeatable, tried after the file's
    /// rules, first match wins.
    #[arg(long = "rule")]
    rules: Vec<String>,
    /// Require this API key (`Authorization: Bearer KEY`) on every route but /health;
    /// repeatable. Also read from $S2LC_API_KEY.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// A file of API keys, one per line (blank lines and `#` comments skipped).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// An origin browsers may call from (CORS; `*` for any); repeatable [default: none, no CORS
    /// headers].
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Completion requests admitted beyond those decoding; more are answered 429 with
    /// Retry-After [default: 64].
    #[arg(long)]
    max_queue: Option<usize>,
    /// Seconds a request may take from arrival to its last token; past it, 504 (or an error
    /// event in a stream) and its generation stops [default: 300].
    #[arg(long, value_parser = parse_seconds)]
    request_timeout: Option<Duration>,
    /// Seconds a client has to send its request headers; also how long an idle keep-alive
    /// connection stays open [default: 10].
    #[arg(long, value_parser = parse_seconds)]
    header_timeout: Option<Duration>,
    /// Seconds a client has to send its request body [default: 10].
    #[arg(long, value_parser = parse_seconds)]
    body_timeout: Option<Duration>,
    /// Connections open at once; more get 503 and are closed [default: 4096].
    #[arg(long)]
    max_connections: Option<usize>,
    /// The KV cache of every sequence: dense, q8, q4, spectral[:...] (the specs of `s2lc bench
    /// kv`) [default: q8, +0.01 % perplexity over dense in `bench kv` at 3.76x fewer bytes].
    #[arg(long, value_parser = crate::parse_kv)]
    kv: Option<KvSpec>,
    /// Bytes the sequences' KV caches may reserve together (e.g. 1GiB); a request is admitted
    /// when its cache's bound at prompt + max_tokens fits [default: 1GiB].
    #[arg(long, value_parser = parse_bytes)]
    kv_memory: Option<usize>,
    /// Most prompt tokens prefilled between two decode steps, so a long prompt delays the other
    /// streams by one chunk at a time [default: 128].
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Seconds an adapter spec's resolution to a version is reused before the store is listed
    /// again [default: 5].
    #[arg(long, value_parser = parse_seconds)]
    resolve_ttl: Option<Duration>,
}

/// The settings file of `s2lc serve --config`: the flags' names and values.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServeFile {
    model: Option<PathBuf>,
    weights: Option<String>,
    store: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    adapter_memory: Option<Size>,
    adapter_dtype: Option<String>,
    max_tokens: Option<usize>,
    max_batch: Option<usize>,
    max_body: Option<Size>,
    model_id: Option<String>,
    #[serde(default)]
    pin: Vec<String>,
    router: Option<PathBuf>,
    encoder: Option<PathBuf>,
    #[serde(default)]
    rule: Vec<TagRule>,
    #[serde(default)]
    api_key: Vec<String>,
    api_key_file: Option<PathBuf>,
    #[serde(default)]
    cors_origin: Vec<String>,
    max_queue: Option<usize>,
    request_timeout: Option<f64>,
    header_timeout: Option<f64>,
    body_timeout: Option<f64>,
    max_connections: Option<usize>,
    prefill_chunk: Option<usize>,
    resolve_ttl: Option<f64>,
    kv: Option<String>,
    kv_memory: Option<Size>,
}

/// A size in a settings file: a byte count or a string such as "256MiB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(usize),
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> Result<usize> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_bytes(t).map_err(|e| anyhow::anyhow!("{key}: {e}")),
        }
    }
}

/// The settings of a server, flags over the file over the defaults.
struct Settings {
    model: PathBuf,
    weights: WeightStorage,
    store: Option<String>,
    host: String,
    port: u16,
    adapter_memory: usize,
    adapter_dtype: AdapterDtype,
    max_tokens: usize,
    max_batch: usize,
    max_body: usize,
    model_id: Option<String>,
    pinned: Vec<String>,
    router: Option<PathBuf>,
    encoder: Option<PathBuf>,
    rules: Vec<TagRule>,
    api_keys: Vec<String>,
    cors_origins: Vec<String>,
    max_queue: usize,
    request_timeout: Duration,
    header_timeout: Duration,
    body_timeout: Duration,
    max_connections: usize,
    prefill_chunk: usize,
    resolve_ttl: Duration,
    kv: KvSpec,
    kv_memory: usize,
}

/// A duration in seconds from a flag (`--request-timeout 30`, `0.5`).
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    seconds(v)
}

/// A positive, finite number of seconds as a duration.
fn seconds(v: f64) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("{v} is not a positive number of seconds"))
    }
}

/// API keys from a file: one per line, blank lines and `#` comments skipped.
fn read_keys(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading API keys from {}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        bail!("{} holds no API key", path.display());
    }
    Ok(keys)
}

impl ServeArgs {
    fn settings(&self) -> Result<Settings> {
        let file = match &self.config {
            None => ServeFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))?
            }
        };
        let size = |flag: Option<usize>, key: &str, from_file: &Option<Size>, default: &str| match (
            flag, from_file,
        ) {
            (Some(n), _) => Ok(n),
            (None, Some(s)) => s.bytes(key),
            (None, None) => parse_bytes(default).map_err(anyhow::Error::msg),
        };
        let weights = match (self.weights, &file.weights) {
            (Some(w), _) => w,
            (None, Some(w)) => parse_weights(w).map_err(|e| anyhow::anyhow!("weights: {e}"))?,
            (None, None) => WeightStorage::Native,
        };
        let mut rules = file.rule;
        for r in &self.rules {
            rules.push(TagRule::parse(r)?);
        }
        let mut api_keys: Vec<String> = file
            .api_key
            .into_iter()
            .chain(self.api_keys.clone())
            .collect();
        for path in [&file.api_key_file, &self.api_key_file]
            .into_iter()
            .flatten()
        {
            api_keys.extend(read_keys(path)?);
        }
        if let Ok(key) = std::env::var("S2LC_API_KEY") {
            if !key.trim().is_empty() {
                api_keys.push(key.trim().to_string());
            }
        }
        let secs = |flag: Option<Duration>, key: &str, from_file: Option<f64>, default: f64| match (
            flag, from_file,
        ) {
            (Some(d), _) => Ok(d),
            (None, Some(v)) => seconds(v).map_err(|e| anyhow::anyhow!("{key}: {e}")),
            (None, None) => Ok(Duration::from_secs_f64(default)),
        };
        let router = self.router.clone().or(file.router);
        let encoder = self.encoder.clone().or(file.encoder);
        if encoder.is_some() && router.is_none() {
            bail!("an encoder is set but no router table: the encoder is only used by the router");
        }
        Ok(Settings {
            model: self
                .model
                .clone()
                .or(file.model)
                .unwrap_or_else(s2lc_model::assets::smollm2),
            weights,
            store: self.store.clone().or(file.store),
            host: self
                .host
                .clone()
                .or(file.host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: self.port.or(file.port).unwrap_or(8080),
            adapter_memory: size(
                self.adapter_memory,
                "adapter-memory",
                &file.adapter_memory,
                "256MiB",
            )?,
            adapter_dtype: match (self.adapter_dtype, &file.adapter_dtype) {
                (Some(d), _) => d,
                (None, Some(d)) => d
                    .parse()
                    .map_err(|e| anyhow::anyhow!("adapter-dtype: {e}"))?,
                (None, None) => AdapterDtype::default(),
            },
            max_tokens: self.max_tokens.or(file.max_tokens).unwrap_or(512),
            max_batch: self.max_batch.or(file.max_batch).unwrap_or(8),
            max_body: size(self.max_body, "max-body", &file.max_body, "1MiB")?,
            model_id: self.model_id.clone().or(file.model_id),
            pinned: file.pin.into_iter().chain(self.pinned.clone()).collect(),
            router,
            encoder,
            rules,
            api_keys,
            cors_origins: file
                .cors_origin
                .into_iter()
                .chain(self.cors_origins.clone())
                .collect(),
            max_queue: self.max_queue.or(file.max_queue).unwrap_or(64),
            request_timeout: secs(
                self.request_timeout,
                "request-timeout",
                file.request_timeout,
                300.0,
            )?,
            header_timeout: secs(
                self.header_timeout,
                "header-timeout",
                file.header_timeout,
                10.0,
            )?,
            body_timeout: secs(self.body_timeout, "body-timeout", file.body_timeout, 10.0)?,
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(4096),
            prefill_chunk: self.prefill_chunk.or(file.prefill_chunk).unwrap_or(128),
            resolve_ttl: secs(self.resolve_ttl, "resolve-ttl", file.resolve_ttl, 5.0)?,
            kv: match (&self.kv, &file.kv) {
                (Some(k), _) => k.clone(),
                (None, Some(k)) => crate::parse_kv(k).map_err(|e| anyhow::anyhow!("kv: {e}"))?,
                (None, None) => KvSpec::parse("q8")?,
            },
            kv_memory: size(self.kv_memory, "kv-memory", &file.kv_memory, "1GiB")?,
        })
    }
}

/// Runs `s2lc serve` until the process is stopped.
pub fn run(args: &ServeArgs) -> Result<()> {
    let cfg = args.settings()?;
    let path = cfg.model.clone();
    let model_id = match &cfg.model_id {
        Some(id) => id.clone(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "base".into()),
    };
    if model_id.contains(':') || model_id.is_empty() {
        bail!("model id '{model_id}' must be non-empty and free of ':' (it separates the adapter)");
    }
    let store = super::store::open_store(cfg.store.as_deref())?;
    let location = store.location().to_string();
    let digest = super::store::model_digest(&path)?;
    let router = match &cfg.router {
        None => None,
        Some(table) => {
            let (encoder, _) = crate::router::load_encoder(cfg.encoder.as_deref())?;
            let table =
                RouteTable::load(table, encoder.dim()).context("reading the route table")?;
            Some(SemanticRouter { encoder, table })
        }
    };
    let (source, model, tokenizer) = load_model(&path, cfg.weights)?;
    if cfg.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if cfg.prefill_chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    if cfg.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    cfg.kv
        .check(model.attn_shape())
        .context("the KV cache spec (--kv)")?;
    let batch = BatchConfig {
        max_batch: cfg.max_batch,
        prefill_chunk: cfg.prefill_chunk,
        kv: cfg.kv.clone(),
        kv_memory: cfg.kv_memory,
    };
    // A store entry is untrusted: read within the base model's shapes, and with no more values
    // than the adapter budget has bytes (no resident form holds a value in less than a byte, so
    // a larger adapter could never be cached).
    let limits = AdapterLimits::for_model(model.config()).with_max_values(cfg.adapter_memory);
    let engine = Engine::new(model, tokenizer, source.chat_template(), batch);
    let listener = s2lc_serve::api::listen::bind(&cfg.host, cfg.port)
        .with_context(|| format!("listening on {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    eprintln!(
        "s2lc serve: {model_id} ({}), adapters from {location}, {} MiB adapter budget ({} \
         factors), batches \
         of up to {} (+{} queued), KV cache {} within {} MiB, {} tag rules{}{}",
        cfg.weights.name(),
        cfg.adapter_memory >> 20,
        cfg.adapter_dtype,
        cfg.max_batch,
        cfg.max_queue,
        cfg.kv.name(),
        cfg.kv_memory >> 20,
        cfg.rules.len(),
        if router.is_some() {
            ", semantic router"
        } else {
            ""
        },
        if cfg.api_keys.is_empty() {
            ", no API key (open to anyone who can connect)"
        } else {
            ", API key required"
        }
    );
    // Tests and scripts wait for this line.
    eprintln!("listening on http://{addr}");
    s2lc_serve::serve(
        listener,
        engine,
        Box::new(
            StoreSource::new(store, Some(digest))
                .with_limits(limits)
                .with_dtype(cfg.adapter_dtype),
        ),
        router,
        ServeConfig {
            adapter_budget: cfg.adapter_memory,
            max_tokens: cfg.max_tokens,
            max_body_bytes: cfg.max_body,
            pinned: cfg.pinned,
            rules: cfg.rules,
            api_keys: cfg.api_keys,
            cors_origins: cfg.cors_origins,
            max_queue: cfg.max_queue,
            request_timeout: cfg.request_timeout,
            body_timeout: cfg.body_timeout,
            header_timeout: cfg.header_timeout,
            max_connections: cfg.max_connections,
            resolve_ttl: cfg.resolve_ttl,
            ..ServeConfig::new(model_id)
        },
    )
    .context("serving")
}
