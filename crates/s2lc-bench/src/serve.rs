//! `s2lc bench serve`: a bounded load test of the server on loopback, in one process and one
//! sitting, for each workload asked for: the base model alone; many distinct PEFT adapters
//! (copies of the real adapters pushed into a fresh store under many names, each copy's delta
//! scaled by its own factor so that no two are the same content); many distinct morphs of one
//! real pack (weights drawn per name from a flat Dirichlet). Names are drawn with Zipf
//! popularity. Prompts are windows of `--prompt-tokens` tokens of the real texts' held-out
//! parts (`--prompt-tokens 0`: one short fixed prompt, the form of the first measurements), and
//! every request streams, so the clients time the first token and the gaps between tokens.
//! Reports throughput and its ratio to the first run, request latency, time to first token and
//! inter-token latency percentiles, the cache hit rate, the largest resident adapter and KV bytes
//! seen (against the budget) and the process's peak RSS.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use semver::Version;
use serde_json::json;

use s2lc_model::heldout::{default_texts, HeldoutSplit};
use s2lc_model::kv::KvSpec;
use s2lc_model::lora::AdapterDtype;
use s2lc_model::tokenizer::Tokenizer;
use s2lc_serve::client::{metric_value, request, request_timed};
use s2lc_serve::{BatchConfig, Engine, ServeConfig, StoreSource};
use s2lc_spectral::rng::SplitMix64;
use s2lc_store::Store;

use crate::common::{
    load_model, parse_bytes, parse_kv, progress_bar, write_json, AdapterSetArgs, BaseModelArgs,
    JsonArg,
};

/// Options of `s2lc bench serve`.
#[derive(Args)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    base: BaseModelArgs,
    #[command(flatten)]
    adapters: AdapterSetArgs,
    /// Adapter names in the store (copies of the sources, cycled).
    #[arg(long, default_value_t = 1000)]
    n_adapters: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Requests in all (the run also stops at --seconds).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Time limit of the request phase.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// The server's adapter budget.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    adapter_memory: usize,
    /// How the server holds loaded adapters: f32, f16, int8 or int4 factors.
    #[arg(long, default_value_t = AdapterDtype::F16)]
    adapter_dtype: AdapterDtype,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Tokens per prompt: windows of the held-out tenth of the six real texts, decoded to text
    /// (the server re-tokenizes them, within a token or two of this). 0: every request sends
    /// the short fixed prompt "The quick brown fox".
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// The server's KV cache (`s2lc serve --kv`; the same default).
    #[arg(long = "kv", default_value = "q8", value_parser = parse_kv)]
    kv: KvSpec,
    /// The server's KV byte budget (`s2lc serve --kv-memory`; the same default).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    kv_memory: usize,
    /// Zipf exponent of adapter popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// The server's batch sizes to measure, one server and one load test each (the ratios to
    /// the first are printed).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    max_batch: Vec<usize>,
    /// What the clients ask for, one load test each: `base` (no adapter), `peft` (the
    /// --n-adapters copies of the adapters), `morph` (--n-adapters distinct blends of --pack).
    #[arg(long, value_delimiter = ',', default_value = "peft")]
    workload: Vec<Workload>,
    /// Times the whole list of load tests runs, one round after another; each run's throughput
    /// is compared with the first run of its own round and the median ratio printed, so a
    /// machine whose speed drifts over the sitting does not skew the ratios.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The pack whose members the `morph` workload blends (a directory written by `s2lc
    /// adapters pack`).
    #[arg(long)]
    pack: Option<PathBuf>,
    #[command(flatten)]
    json: JsonArg,
}

/// What the clients of one load test ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// The base model, no adapter.
    Base,
    /// Distinct PEFT adapters.
    Peft,
    /// Distinct morphs of one pack.
    Morph,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Base => "base",
            Workload::Peft => "peft",
            Workload::Morph => "morph",
        }
    }
}

/// Weights of morph `i` over `members`: a draw from the flat Dirichlet (normalized
/// exponentials), seeded by `i`, so every name has its own blend.
fn dirichlet(members: &[String], i: usize) -> serde_json::Value {
    let mut rng = SplitMix64::new(0x5eed ^ i as u64);
    let e: Vec<f64> = members
        .iter()
        .map(|_| -(1.0 - rng.unit_f64()).ln())
        .collect();
    let sum: f64 = e.iter().sum();
    let w: serde_json::Map<String, serde_json::Value> = members
        .iter()
        .zip(&e)
        .map(|(m, x)| (m.clone(), json!((x / sum * 100.0).round() / 100.0)))
        .collect();
    serde_json::Value::Object(w)
}

/// A copy of the PEFT adapter `src` in `staging` whose delta is scaled by `scale` (its
/// `lora_alpha` multiplied), so that no two copies are the same content and the server's
/// content-keyed cache cannot share them; `src` itself when it is not a PEFT adapter.
pub fn scaled_copy(src: &Path, staging: &Path, scale: f64) -> Result<PathBuf> {
    let config_path = src.join("adapter_config.json");
    if !config_path.is_file() {
        return Ok(src.to_path_buf());
    }
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let alpha = config["lora_alpha"]
        .as_f64()
        .with_context(|| format!("{} has no numeric lora_alpha", config_path.display()))?;
    config["lora_alpha"] = json!(alpha * scale);
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging).with_context(|| format!("creating {}", staging.display()))?;
    let weights = "adapter_model.safetensors";
    std::fs::copy(src.join(weights), staging.join(weights))
        .with_context(|| format!("copying {}", src.join(weights).display()))?;
    std::fs::write(staging.join("adapter_config.json"), config.to_string())
        .with_context(|| format!("writing {}", staging.display()))?;
    Ok(staging.to_path_buf())
}

/// Pushes `--n-adapters` scaled copies of `sources` as `bench-0000@1.0.0`, ….
fn push_copies(
    args: &ServeBenchArgs,
    store: &Store,
    sources: &[PathBuf],
    digest: &str,
    dir: &Path,
) -> Result<()> {
    let t = Instant::now();
    let bar = progress_bar(args.n_adapters as u64, "pushing adapters");
    let v1 = Version::new(1, 0, 0);
    let staging = dir.with_extension("copy");
    for i in 0..args.n_adapters {
        let src = &sources[i % sources.len()];
        let scale = 1.0 + (i / sources.len()) as f64 * 1e-3;
        let copy = scaled_copy(src, &staging, scale)?;
        store
            .push(
                &format!("bench-{i:04}"),
                &v1,
                &copy,
                Some(digest.to_string()),
                json!({"copy_of": src, "scale": scale}),
                &mut |_| Ok(()),
            )
            .with_context(|| format!("pushing copy {i} of {}", src.display()))?;
        bar.inc(1);
    }
    let _ = std::fs::remove_dir_all(&staging);
    bar.finish_and_clear();
    let (logical, physical) = store.usage()?;
    eprintln!(
        "store: {} adapters ({} sources) pushed in {:.1} s; {:.1} MB logical, {:.1} MB stored",
        args.n_adapters,
        sources.len(),
        t.elapsed().as_secs_f64(),
        logical as f64 / 1e6,
        physical as f64 / 1e6
    );
    Ok(())
}

/// `VmHWM` of this process in bytes (peak resident set).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A value of the server's `/metrics` text (NaN if absent).
fn metric(text: &str, name: &str) -> f64 {
    metric_value(text, name).unwrap_or(f64::NAN)
}

/// Runs `s2lc bench serve`.
pub fn run(args: &ServeBenchArgs) -> Result<()> {
    if args.clients == 0 || args.n_adapters == 0 {
        bail!("--clients and --n-adapters must be positive");
    }
    let model_path = args.base.path();
    let digest = s2lc_model::digest::model_digest(&model_path).context("hashing the base model")?;
    let dir = std::env::temp_dir().join(format!("s2lc-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(dir.to_str().context("temp dir is not UTF-8")?)?;
    let v1 = Version::new(1, 0, 0);
    let mut sources = Vec::new();
    if args.workload.contains(&Workload::Peft) {
        sources = args
            .adapters
            .dirs_or(|| Ok(crate::adapter_io::domain_adapters()))?;
        if sources.is_empty() {
            bail!("no adapters to serve: pass --adapter DIR or train the set (scripts/reference/train_adapter_set.sh)");
        }
        push_copies(args, &store, &sources, &digest, &dir)?;
    }
    let mut members = Vec::new();
    if args.workload.contains(&Workload::Morph) {
        let pack = args
            .pack
            .as_ref()
            .context("the morph workload needs --pack DIR (a pack of several members)")?;
        let set = s2lc_adapters::format::load(pack)
            .with_context(|| format!("reading the pack {}", pack.display()))?;
        members = set.members.iter().map(|m| m.name.clone()).collect();
        if members.len() < 2 {
            bail!(
                "{} has {} member(s): a morph blends several",
                pack.display(),
                members.len()
            );
        }
        store
            .push(
                "bench-pack",
                &v1,
                pack,
                Some(digest.clone()),
                json!({}),
                &mut |_| Ok(()),
            )
            .with_context(|| format!("pushing {}", pack.display()))?;
        eprintln!(
            "store: the pack {} ({} members: {})",
            pack.display(),
            members.len(),
            members.join(", ")
        );
    }

    // Zipf popularity: adapter i drawn with weight 1/(i+1)^s.
    let weights: Vec<f64> = (0..args.n_adapters)
        .map(|i| 1.0 / ((i + 1) as f64).powf(args.zipf))
        .collect();
    let total: f64 = weights.iter().sum();
    let cdf: Vec<f64> = weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect();
    let prompts = prompts(&model_path, args.prompt_tokens)?;
    println!(
        "{} clients, {} adapter names (Zipf {}), budget {:.0} MiB (PEFT as {} factors), {} prompts of {} tokens, {} tokens per request, KV cache {} within {:.0} MiB",
        args.clients,
        args.n_adapters,
        args.zipf,
        args.adapter_memory as f64 / (1 << 20) as f64,
        args.adapter_dtype,
        prompts.len(),
        args.prompt_tokens,
        args.max_tokens,
        args.kv.name(),
        args.kv_memory as f64 / (1 << 20) as f64
    );
    let mut runs = Vec::new();
    for round in 0..args.rounds.max(1) {
        let round_start = runs.len();
        for (&workload, &max_batch) in args
            .workload
            .iter()
            .flat_map(|w| args.max_batch.iter().map(move |b| (w, b)))
        {
            if max_batch == 0 {
                bail!("--max-batch values must be at least 1");
            }
            // Request `n` for adapter name `i`.
            let body = |i: usize, n: usize| {
                let mut body = match workload {
                    Workload::Base => json!({"model": "base"}),
                    Workload::Peft => json!({"model": format!("base:bench-{i:04}@^1")}),
                    Workload::Morph => {
                        json!({"model": "base:bench-pack@^1", "morph": dirichlet(&members, i)})
                    }
                };
                body["prompt"] = json!(prompts[n % prompts.len()]);
                body["max_tokens"] = json!(args.max_tokens);
                body["stream"] = json!(true);
                body
            };
            let mut run = load_test(args, &model_path, &dir, &digest, max_batch, &cdf, &body)?;
            run.workload = workload;
            run.round = round;
            run.print(runs.get(round_start));
            runs.push(run);
        }
    }
    let summary = ratios(&runs);
    if let Some(path) = &args.json.path {
        let out = json!({
            "clients": args.clients, "adapters": args.n_adapters, "zipf": args.zipf,
            "budget_bytes": args.adapter_memory, "adapter_dtype": args.adapter_dtype.name(),
            "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
            "kv": args.kv.name(), "kv_memory_bytes": args.kv_memory,
            "prompts": prompts.len(), "pack": args.pack, "members": members,
            "sources": sources, "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
            "ratios": summary,
        });
        write_json(path, &out)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    for run in &runs {
        if run.ok < run.sent {
            bail!(
                "{} batch {}: {} requests failed",
                run.workload.name(),
                run.max_batch,
                run.sent - run.ok
            );
        }
        if run.max_resident > args.adapter_memory as f64 {
            bail!(
                "{} batch {}: resident adapter bytes {} exceeded the budget",
                run.workload.name(),
                run.max_batch,
                run.max_resident
            );
        }
    }
    Ok(())
}

/// The prompts of the load test: every `n_tokens`-token window of the held-out tenth of the six
/// real texts (the token protocol of `bench adapters`, so no adapter was trained on them),
/// decoded to text; `n_tokens == 0` gives the one short fixed prompt.
fn prompts(model_path: &Path, n_tokens: usize) -> Result<Vec<String>> {
    if n_tokens == 0 {
        return Ok(vec!["The quick brown fox".to_string()]);
    }
    let source = s2lc_model::ModelSource::open(model_path).context("opening the model")?;
    let tokenizer: Tokenizer = source.tokenizer().context("building the tokenizer")?;
    let split = HeldoutSplit {
        fraction: 0.1,
        seq: n_tokens,
        max_windows: usize::MAX,
    };
    let domains = split
        .load(&tokenizer, &default_texts())
        .context("the prompts' held-out text")?;
    let mut out = Vec::new();
    for d in &domains {
        for w in d.tokens.chunks_exact(n_tokens) {
            out.push(tokenizer.decode(w, true).context("decoding a prompt")?);
        }
    }
    Ok(out)
}

/// Percentiles `ps` of `values` (sorted in place); NaN when empty.
fn percentiles<const N: usize>(values: &mut [f64], ps: [f64; N]) -> [f64; N] {
    values.sort_by(f64::total_cmp);
    ps.map(|p| {
        values
            .get(((values.len() as f64 * p) as usize).min(values.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    })
}

/// Each workload's throughput (req/s) as a ratio to the first load test of the same round,
/// per round and their median, printed when there are several rounds: interleaved rounds keep
/// a change in the machine's speed over the sitting out of the ratios.
fn ratios(runs: &[Run]) -> serde_json::Value {
    let rate = |r: &Run| r.ok as f64 / r.wall;
    let mut out = Vec::new();
    let rounds = runs.last().map_or(0, |r| r.round + 1);
    let first = |round: usize| runs.iter().find(|r| r.round == round);
    for key in runs.iter().filter(|r| r.round == 0) {
        let mut each: Vec<f64> = runs
            .iter()
            .filter(|r| r.workload == key.workload && r.max_batch == key.max_batch)
            .filter_map(|r| first(r.round).map(|f| rate(r) / rate(f)))
            .collect();
        let shown: Vec<String> = each.iter().map(|x| format!("{x:.2}")).collect();
        let [median] = percentiles(&mut each, [0.5]);
        if rounds > 1 {
            println!(
                "{} batch {}: req/s vs the first run of its round, median of {rounds} rounds {median:.2}x ({})",
                key.workload.name(),
                key.max_batch,
                shown.join(", ")
            );
        }
        out.push(
            json!({"workload": key.workload.name(), "max_batch": key.max_batch,
                        "median": median, "rounds": each}),
        );
    }
    json!(out)
}

/// What one load test measured.
struct Run {
    workload: Workload,
    /// Which round of `--rounds` it belongs to.
    round: usize,
    max_batch: usize,
    sent: usize,
    ok: usize,
    wall: f64,
    tokens: f64,
    /// Latency percentiles p50, p90, p99 and the maximum, ms.
    latency: [f64; 4],
    /// Time to first token p50 and p99, ms.
    ttft: [f64; 2],
    /// Inter-token latency (gaps between streamed pieces of one request) p50 and p99, ms.
    itl: [f64; 2],
    hits: f64,
    misses: f64,
    evictions: f64,
    max_resident: f64,
    max_kv: f64,
    rss: u64,
}

impl Run {
    fn print(&self, first: Option<&Run>) {
        let rate = self.ok as f64 / self.wall;
        let ratio = first
            .map(|f| {
                format!(
                    " ({:.2}x {} batch {})",
                    rate / (f.ok as f64 / f.wall),
                    f.workload.name(),
                    f.max_batch
                )
            })
            .unwrap_or_default();
        let [p50, p90, p99, max] = self.latency;
        println!(
            "\n{} batch {}: {} sent, {} answered 200, {} failed, in {:.1} s: {rate:.2} req/s{ratio}, {:.1} generated tok/s",
            self.workload.name(),
            self.max_batch,
            self.sent,
            self.ok,
            self.sent - self.ok,
            self.wall,
            self.tokens / self.wall
        );
        println!(
            "latency ms: p50 {p50:.0}, p90 {p90:.0}, p99 {p99:.0}, max {max:.0}; time to first token p50 {:.0}, p99 {:.0}; inter-token p50 {:.1}, p99 {:.1}",
            self.ttft[0], self.ttft[1], self.itl[0], self.itl[1]
        );
        println!(
            "adapter cache: hit rate {:.1} % ({} hits, {} loads, {} evictions); resident at most {:.2} MiB; KV at most {:.1} MiB; peak RSS so far {:.0} MiB",
            100.0 * self.hits / (self.hits + self.misses).max(1.0),
            self.hits,
            self.misses,
            self.evictions,
            self.max_resident / (1 << 20) as f64,
            self.max_kv / (1 << 20) as f64,
            self.rss as f64 / (1 << 20) as f64
        );
    }

    fn json(&self) -> serde_json::Value {
        let [p50, p90, p99, max] = self.latency;
        json!({
            "workload": self.workload.name(), "max_batch": self.max_batch, "round": self.round,
            "requests": self.sent, "ok": self.ok,
            "seconds": self.wall, "req_per_s": self.ok as f64 / self.wall,
            "generated_tok_per_s": self.tokens / self.wall,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "max": max},
            "ttft_ms": {"p50": self.ttft[0], "p99": self.ttft[1]},
            "itl_ms": {"p50": self.itl[0], "p99": self.itl[1]},
            "cache": {"hits": self.hits, "loads": self.misses, "evictions": self.evictions,
                      "max_resident_bytes": self.max_resident},
            "max_kv_bytes": self.max_kv,
            "peak_rss_bytes_so_far": self.rss,
        })
    }
}

/// Starts a server over the store in `dir` decoding up to `max_batch` requests at once, and runs
/// the clients against it until `--requests` or `--seconds`.
fn load_test(
    args: &ServeBenchArgs,
    model_path: &std::path::Path,
    dir: &std::path::Path,
    digest: &str,
    max_batch: usize,
    cdf: &[f64],
    body_of: &(dyn Fn(usize, usize) -> serde_json::Value + Sync),
) -> Result<Run> {
    let (source, model, tokenizer) = load_model(model_path, args.base.weights)?;
    let batch = BatchConfig {
        max_batch,
        kv: args.kv.clone(),
        kv_memory: args.kv_memory,
        ..BatchConfig::default()
    };
    let engine = Engine::new(model, tokenizer, source.chat_template(), batch);
    let listener =
        s2lc_serve::api::listen::bind("127.0.0.1", 0).context("binding a loopback port")?;
    let addr = listener.local_addr()?.to_string();
    // Every client's request is admitted: the bench measures decoding, not 429s.
    let config = ServeConfig {
        adapter_budget: args.adapter_memory,
        max_tokens: args.max_tokens.max(1),
        max_queue: args.clients,
        ..ServeConfig::new("base")
    };
    let server_store = Store::open(dir.to_str().context("temp dir is not UTF-8")?)?;
    let digest = digest.to_string();
    let dtype = args.adapter_dtype;
    std::thread::spawn(move || {
        let src = Box::new(StoreSource::new(server_store, Some(digest)).with_dtype(dtype));
        if let Err(e) = s2lc_serve::serve(listener, engine, src, None, config) {
            eprintln!("error: the server stopped: {e}");
            std::process::exit(1);
        }
    });
    let up = Instant::now();
    while request(&addr, "GET", "/health", b"").map_or(true, |r| r.status != 200) {
        if up.elapsed() > Duration::from_secs(30) {
            bail!("the server did not come up on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let issued = AtomicUsize::new(0);
    // Per request: latency (ms), status, time to first token (ms), inter-token gaps (ms).
    type Timing = (f64, u16, f64, Vec<f64>);
    let results = Mutex::new(Vec::<Timing>::with_capacity(args.requests));
    let max_resident = Mutex::new(0f64);
    let max_kv = Mutex::new(0f64);
    let done = std::sync::atomic::AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    std::thread::scope(|s| {
        // Watch the resident bytes while the clients run.
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok(r) = request(&addr, "GET", "/metrics", b"") {
                    for (name, max) in [
                        ("s2lc_adapter_cache_resident_bytes", &max_resident),
                        ("s2lc_kv_cache_resident_bytes", &max_kv),
                    ] {
                        let v = metric(&r.body, name);
                        let mut m = max.lock().unwrap_or_else(|p| p.into_inner());
                        *m = m.max(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let clients: Vec<_> = (0..args.clients)
            .map(|c| {
                let (cdf, issued, results, addr) = (&cdf, &issued, &results, &addr);
                s.spawn(move || {
                    let mut rng = SplitMix64::new(c as u64 + 1);
                    loop {
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        if n >= args.requests || Instant::now() >= deadline {
                            break;
                        }
                        let u = rng.unit_f64();
                        let i = cdf.partition_point(|&p| p < u).min(cdf.len() - 1);
                        let body = body_of(i, n);
                        let t = Instant::now();
                        let timed =
                            request_timed(addr, "/v1/completions", body.to_string().as_bytes());
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        // A stream without text or with an error event failed (status 0).
                        let timing = match timed {
                            Ok(r)
                                if r.response.status == 200
                                    && !r.pieces.is_empty()
                                    && !r.response.body.contains("data: {\"error\"") =>
                            {
                                let gaps = r.pieces.windows(2).map(|w| (w[1] - w[0]) * 1e3);
                                (ms, 200, r.pieces[0] * 1e3, gaps.collect())
                            }
                            Ok(r) if r.response.status != 200 => {
                                (ms, r.response.status, f64::NAN, Vec::new())
                            }
                            _ => (ms, 0, f64::NAN, Vec::new()),
                        };
                        results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(timing);
                    }
                })
            })
            .collect();
        for c in clients {
            let _ = c.join();
        }
        done.store(true, Ordering::Relaxed);
    });
    let wall = start.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let metrics = request(&addr, "GET", "/metrics", b"")?.body;
    let ok = results.iter().filter(|r| r.1 == 200).count();
    let mut lat: Vec<f64> = results.iter().map(|r| r.0).collect();
    let latency = percentiles(&mut lat, [0.5, 0.9, 0.99, 1.0]);
    let mut ttft: Vec<f64> = results.iter().filter(|r| r.1 == 200).map(|r| r.2).collect();
    let mut itl: Vec<f64> = results.iter().flat_map(|r| r.3.iter().copied()).collect();
    let hits = metric(&metrics, "s2lc_adapter_cache_hits_total");
    let misses = metric(&metrics, "s2lc_adapter_cache_misses_total");
    let evictions = metric(&metrics, "s2lc_adapter_cache_evictions_total");
    let max_resident = max_resident.into_inner().unwrap_or_else(|p| p.into_inner());
    let max_kv = max_kv.into_inner().unwrap_or_else(|p| p.into_inner());
    let rss = peak_rss().unwrap_or(0);
    let tokens = metric(&metrics, "s2lc_completion_tokens_total");
    Ok(Run {
        max_batch,
        sent: results.len(),
        ok,
        wall,
        tokens,
        latency,
        ttft: percentiles(&mut ttft, [0.5, 0.99]),
        itl: percentiles(&mut itl, [0.5, 0.99]),
        hits,
        misses,
        evictions,
        max_resident,
        max_kv,
        rss,
        workload: Workload::Base,
        round: 0,
    })
}
