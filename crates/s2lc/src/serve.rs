//! `s2lc serve`: the OpenAI-style HTTP server over the base model and the Adapter Store.

use std::net::TcpListener;

use anyhow::{bail, Context, Result};
use clap::Args;

use s2lc_serve::{Engine, RouteTable, SemanticRouter, ServeConfig, StoreSource};

use crate::{load_model, parse_weights, ModelArg};
use s2lc_model::source::WeightStorage;

/// Options of `s2lc serve`.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Weight storage of the base model.
    #[arg(long, default_value = "native", value_parser = parse_weights)]
    weights: WeightStorage,
    /// The Adapter Store: a directory or s3://bucket/prefix [default: $S2LC_STORE, else
    /// $S2LC_HOME/store].
    #[arg(long)]
    store: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Bytes of unpacked adapters kept resident (e.g. 256MiB, 1GiB, 1000000).
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    adapter_memory: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Largest request body.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    max_body: usize,
    /// The id clients name the base model by [default: the model file's name without extension].
    #[arg(long)]
    model_id: Option<String>,
    /// Load this adapter (`name@requirement`) at start and never evict it; repeatable.
    #[arg(long = "pin")]
    pinned: Vec<String>,
    /// Route requests for the adapter `auto` by their prompt with this table (`s2lc router
    /// build`).
    #[arg(long)]
    router: Option<std::path::PathBuf>,
    /// The router's sentence encoder [default: $S2LC_HOME/models/all-MiniLM-L6-v2].
    #[arg(long, requires = "router")]
    encoder: Option<std::path::PathBuf>,
}

/// Parses `256MiB`, `1GiB`, `64KiB`, `1MB` or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown unit '{u}' in '{s}' (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 256MiB)"))?;
    Ok((n * scale) as usize)
}

/// Runs `s2lc serve` until the process is stopped.
pub fn run(args: &ServeArgs) -> Result<()> {
    let path = args.model.path();
    let model_id = match &args.model_id {
        Some(id) => id.clone(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "base".into()),
    };
    if model_id.contains(':') || model_id.is_empty() {
        bail!("model id '{model_id}' must be non-empty and free of ':' (it separates the adapter)");
    }
    let store = crate::store::open_store(args.store.as_deref())?;
    let location = store.location().to_string();
    let digest = crate::store::model_digest(&path)?;
    let router = match &args.router {
        None => None,
        Some(table) => {
            let (encoder, _) = crate::router::load_encoder(args.encoder.as_deref())?;
            let table =
                RouteTable::load(table, encoder.dim()).context("reading the route table")?;
            Some(SemanticRouter { encoder, table })
        }
    };
    let (source, model, tokenizer) = load_model(&path, args.weights)?;
    let engine = Engine::new(model, tokenizer, source.chat_template());
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    eprintln!(
        "s2lc serve: {model_id} ({}), adapters from {location}, {} MiB adapter budget",
        args.weights.name(),
        args.adapter_memory >> 20
    );
    // Tests and scripts wait for this line.
    eprintln!("listening on http://{addr}");
    s2lc_serve::serve(
        listener,
        engine,
        Box::new(StoreSource::new(store, Some(digest))),
        router,
        ServeConfig {
            model_id,
            adapter_budget: args.adapter_memory,
            max_tokens: args.max_tokens,
            max_body_bytes: args.max_body,
            pinned: args.pinned.clone(),
        },
    )
    .context("serving")
}
