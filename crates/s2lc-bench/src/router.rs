//! `s2lc router build | eval`: the Context Router's centroids (mean MiniLM embedding of each
//! adapter's training text) and its accuracy on held-out paragraphs of each domain; and
//! `s2lc bench encoder`: what low-rank compression of the encoder does to both.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use s2lc_model::compress::{Method, RankPolicy};
use s2lc_model::encoder::SentenceEncoder;
use s2lc_model::lora::LoraAdapter;
use s2lc_model::tokenizer::read_text_file;
use s2lc_serve::router::{pieces, RouteTable};

use crate::common::{s2lc_home, write_json, BaseModelArgs, JsonArg};
use s2lc_model::heldout::split_chars;

/// Router subcommands.
#[derive(Subcommand)]
pub enum RouterCommand {
    /// Build the centroids: `ADAPTER=TEXT` pairs (default: every domain of the assets, as
    /// DOMAIN-r8), each from the first (1 − heldout) of its text.
    Build(BuildArgs),
    /// Routing accuracy on held-out paragraphs (the last `heldout` of each text).
    Eval(EvalArgs),
    /// Perplexity of held-out paragraphs of every domain under the router's per-paragraph blend
    /// of a pack's members (`"morph": "auto"` in the server), against the base, each member
    /// alone and an equal blend. Routes must be named like the pack's members.
    Morph(MorphEvalArgs),
}

/// `s2lc router morph`.
#[derive(Args)]
pub struct MorphEvalArgs {
    /// A table from `s2lc router build`.
    table: PathBuf,
    /// An S2LC pack (`s2lc adapters pack`) whose members are named like the routes.
    pack: PathBuf,
    #[command(flatten)]
    text: RouterText,
    #[command(flatten)]
    base: BaseModelArgs,
    /// Characters per held-out paragraph.
    #[arg(long, default_value_t = 1000)]
    chars: usize,
    /// Paragraphs per domain.
    #[arg(long, default_value_t = 12)]
    pieces: usize,
    /// Temperature of the router's weights, in cosine-score units (the server uses 0.05).
    #[arg(long, default_value_t = 0.05)]
    temperature: f32,
    #[command(flatten)]
    json: JsonArg,
}

/// Options shared by build and eval.
#[derive(Args)]
pub struct RouterText {
    /// `ADAPTER=TEXT` pairs (adapter as the server resolves it, e.g. python-r8@^1).
    pairs: Vec<String>,
    /// The sentence encoder [default: $S2LC_HOME/models/all-MiniLM-L6-v2].
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// Share of each text (its end) held out: centroids never see it, eval reads only it.
    #[arg(long, default_value_t = 0.1)]
    heldout: f64,
}

/// `s2lc router build`.
#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    text: RouterText,
    /// Characters per piece of training text.
    #[arg(long, default_value_t = 1000)]
    chars: usize,
    /// Pieces per adapter (spread over the text).
    #[arg(long, default_value_t = 64)]
    pieces: usize,
    /// Output file.
    #[arg(short, long)]
    out: PathBuf,
}

/// `s2lc router eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// A table from `s2lc router build`.
    table: PathBuf,
    #[command(flatten)]
    text: RouterText,
    /// Characters per held-out paragraph (about a prompt's length).
    #[arg(long, default_value_t = 500)]
    chars: usize,
    /// Paragraphs per domain.
    #[arg(long, default_value_t = 50)]
    pieces: usize,
    #[command(flatten)]
    json: JsonArg,
}

/// Loads the sentence encoder at `dir` (default: the MiniLM asset); returns it with its
/// directory's name.
pub fn load_encoder(dir: Option<&Path>) -> Result<(SentenceEncoder, String)> {
    let dir = dir.map_or_else(s2lc_model::assets::minilm, Path::to_path_buf);
    let enc = SentenceEncoder::load(&dir)
        .with_context(|| format!("loading the sentence encoder {}", dir.display()))?;
    let name = dir
        .file_name()
        .map_or("encoder".into(), |n| n.to_string_lossy().into_owned());
    Ok((enc, name))
}

impl RouterText {
    fn encoder(&self) -> Result<(SentenceEncoder, String)> {
        load_encoder(self.encoder.as_deref())
    }

    /// `(adapter, text)` pairs, split into (training part, held-out part) by characters: the
    /// router's protocol ([`s2lc_model::heldout`] says why it is not the benches' token split).
    fn texts(&self) -> Result<Vec<(String, String, String)>> {
        if !(0.0..1.0).contains(&self.heldout) {
            bail!("--heldout {} is outside [0, 1)", self.heldout);
        }
        let pairs: Vec<(String, PathBuf)> = if self.pairs.is_empty() {
            s2lc_model::assets::DOMAINS
                .iter()
                .map(|(d, t)| (format!("{d}-r8"), s2lc_home().join(t)))
                .collect()
        } else {
            self.pairs
                .iter()
                .map(|p| {
                    let (a, t) = p
                        .split_once('=')
                        .with_context(|| format!("'{p}' is not ADAPTER=TEXT"))?;
                    Ok((a.to_string(), PathBuf::from(t)))
                })
                .collect::<Result<_>>()?
        };
        pairs
            .into_iter()
            .map(|(a, path)| {
                let text =
                    read_text_file(&path).with_context(|| format!("reading {}", path.display()))?;
                let (train, held) = split_chars(&text, self.heldout);
                Ok((a, train.to_string(), held.to_string()))
            })
            .collect()
    }
}

/// Runs a router subcommand.
pub fn run(cmd: &RouterCommand) -> Result<()> {
    match cmd {
        RouterCommand::Build(args) => build(args),
        RouterCommand::Eval(args) => eval(args),
        RouterCommand::Morph(args) => morph_eval(args),
    }
}

fn build(args: &BuildArgs) -> Result<()> {
    let (enc, name) = args.text.encoder()?;
    let texts = args.text.texts()?;
    let t = std::time::Instant::now();
    let input: Vec<(String, &str)> = texts
        .iter()
        .map(|(a, tr, _)| (a.clone(), tr.as_str()))
        .collect();
    let table = RouteTable::build(&enc, &name, &input, args.chars, args.pieces)
        .context("building the centroids")?;
    table
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{} routes from {} pieces of {} characters each, in {:.1} s; written: {}",
        table.routes.len(),
        table.routes.iter().map(|r| r.pieces).sum::<usize>(),
        args.chars,
        t.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

fn eval(args: &EvalArgs) -> Result<()> {
    let (enc, _) = args.text.encoder()?;
    let table = RouteTable::load(&args.table, enc.dim()).context("reading the route table")?;
    let texts = args.text.texts()?;
    let held = held_out(&texts, args.chars, args.pieces);
    let t = std::time::Instant::now();
    let embs = held
        .iter()
        .map(|ps| enc.embed_all(ps))
        .collect::<Result<Vec<_>, _>>()?;
    let per_paragraph =
        t.elapsed().as_secs_f64() * 1e3 / held.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    let routed = route_all(&table, &texts, &embs)
        .with_context(|| format!("routing with {}", args.table.display()))?;
    let names: Vec<&str> = table.routes.iter().map(|r| r.adapter.as_str()).collect();
    let (mut right, mut total) = (0, 0);
    let mut rows = Vec::new();
    for (i, (adapter, _, _)) in texts.iter().enumerate() {
        let n = held[i].len();
        let ok = routed[i].right;
        right += ok;
        total += n;
        println!(
            "{adapter:>20}: {ok:>3} / {n:>3} routed right ({:.1} %)",
            100.0 * ok as f64 / n.max(1) as f64
        );
        rows.push(json!({"adapter": adapter, "paragraphs": n, "right": ok,
                         "routed_to": routed[i].to}));
    }
    println!(
        "{:>20}: {right:>3} / {total:>3} ({:.1} %), {per_paragraph:.1} ms per paragraph",
        "all",
        100.0 * right as f64 / total.max(1) as f64,
    );
    println!(
        "confusion (rows: true domain, columns: routed to {})",
        names.join(", ")
    );
    for (r, (a, _, _)) in routed.iter().zip(&texts) {
        println!("{a:>20}: {:?}", r.to);
    }
    if let Some(path) = &args.json.path {
        write_json(
            path,
            &json!({"routes": names, "chars": args.chars, "heldout": args.text.heldout,
            "accuracy": right as f64 / total.max(1) as f64, "domains": rows}),
        )?;
    }
    Ok(())
}

/// Summed NLL and predictions of each paragraph under one adapter (or the base), attached for
/// the call and detached after.
fn score_paragraphs<'a>(
    model: &mut s2lc_model::llama::LlamaModel,
    paragraphs: &[Vec<u32>],
    adapter: impl Fn(usize) -> Result<Option<Cow<'a, LoraAdapter>>>,
) -> Result<(f64, usize)> {
    let (mut nll, mut n) = (0.0, 0);
    for (i, tokens) in paragraphs.iter().enumerate() {
        if let Some(a) = adapter(i)? {
            model.attach_adapter(&a)?;
        }
        let r = s2lc_model::eval::perplexity(model, tokens, tokens.len(), tokens.len(), |_, _| {});
        model.detach_adapters();
        let r = r?;
        nll += r.window_nll.iter().sum::<f64>();
        n += r.predictions;
    }
    Ok((nll, n))
}

fn morph_eval(args: &MorphEvalArgs) -> Result<()> {
    let (enc, _) = args.text.encoder()?;
    let router = s2lc_serve::SemanticRouter {
        table: RouteTable::load(&args.table, enc.dim()).context("reading the route table")?,
        encoder: enc,
    };
    let set = s2lc_adapters::format::load(&args.pack)
        .with_context(|| format!("reading the pack {}", args.pack.display()))?;
    let members: Vec<String> = set.members.iter().map(|m| m.name.clone()).collect();
    let texts = args.text.texts()?;
    let held = held_out(&texts, args.chars, args.pieces);
    let (_source, mut model, tokenizer) = args.base.load()?;
    // Every paragraph of every domain, with its domain's index.
    let mut paragraphs = Vec::new();
    let mut blends = Vec::new();
    for (d, ps) in held.iter().enumerate() {
        for p in ps {
            let tokens = tokenizer
                .encode(p, false)
                .context("tokenizing a paragraph")?;
            let (weights, _) = router
                .morph(p, args.temperature)
                .context("routing a paragraph")?;
            if let Some((m, _)) = weights.iter().find(|(m, _)| !members.contains(m)) {
                bail!(
                    "the route '{m}' is not a member of the pack (members: {})",
                    members.join(", ")
                );
            }
            paragraphs.push((d, tokens));
            blends.push(weights);
        }
    }
    let tokens: Vec<Vec<u32>> = paragraphs.iter().map(|(_, t)| t.clone()).collect();
    let morph = |w: &[(String, f32)]| -> Result<LoraAdapter> {
        let w: Vec<(&str, f32)> = w.iter().map(|(m, x)| (m.as_str(), *x)).collect();
        set.morph_lora("blend", &w).context("morphing")
    };
    // Each member unpacked once: scored alone, and as its own domain's choice.
    let unpacked = members
        .iter()
        .map(|m| set.unpack_lora(m).with_context(|| format!("unpacking {m}")))
        .collect::<Result<Vec<_>>>()?;
    let mut rows: Vec<(String, f64, usize)> = Vec::new();
    let t = std::time::Instant::now();
    let (nll, n) = score_paragraphs(&mut model, &tokens, |_| Ok(None))?;
    rows.push(("base".into(), nll, n));
    for (m, a) in members.iter().zip(&unpacked) {
        let (nll, n) = score_paragraphs(&mut model, &tokens, |_| Ok(Some(Cow::Borrowed(a))))?;
        rows.push((format!("{m} alone"), nll, n));
    }
    // Morph weights are not normalized (1 + 1 sums two adapters): an equal blend is 1/k each.
    let share = 1.0 / members.len().max(1) as f32;
    let equal: Vec<(String, f32)> = members.iter().map(|m| (m.clone(), share)).collect();
    let equal_blend = morph(&equal)?;
    let (nll, n) = score_paragraphs(&mut model, &tokens, |_| {
        Ok(Some(Cow::Borrowed(&equal_blend)))
    })?;
    rows.push(("equal blend".into(), nll, n));
    // The domain's own member for every paragraph: what a perfect router would pick.
    let own = texts
        .iter()
        .map(|(a, _, _)| {
            let name = a.split('@').next().unwrap_or(a);
            members
                .iter()
                .position(|m| m == name)
                .map(|i| &unpacked[i])
                .with_context(|| format!("the domain '{name}' is not a member of the pack"))
        })
        .collect::<Result<Vec<_>>>()?;
    let (nll, n) = score_paragraphs(&mut model, &tokens, |i| {
        Ok(Some(Cow::Borrowed(own[paragraphs[i].0])))
    })?;
    rows.push(("own domain's member".into(), nll, n));
    let (nll, n) = score_paragraphs(&mut model, &tokens, |i| {
        Ok(Some(Cow::Owned(morph(&blends[i])?)))
    })?;
    rows.push(("router blend per paragraph".into(), nll, n));
    let mixed = blends.iter().filter(|b| b.len() > 1).count();
    println!(
        "{} paragraphs of {} characters from {} domains ({} tokens scored), {} blended (the rest one-hot), in {:.1} s\n",
        paragraphs.len(),
        args.chars,
        texts.len(),
        rows[0].2,
        mixed,
        t.elapsed().as_secs_f64()
    );
    println!("| adapter | perplexity | vs base |");
    println!("|---|---|---|");
    let base = (rows[0].1 / rows[0].2.max(1) as f64).exp();
    for (name, nll, n) in &rows {
        let ppl = (nll / (*n).max(1) as f64).exp();
        println!(
            "| {name} | {ppl:.3} | {:+.1} % |",
            100.0 * (ppl / base - 1.0)
        );
    }
    if let Some(path) = &args.json.path {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, nll, n)| json!({"adapter": name, "perplexity": (nll / (*n).max(1) as f64).exp(), "tokens": n}))
            .collect();
        let blends: Vec<serde_json::Value> = blends
            .iter()
            .zip(&paragraphs)
            .map(|(b, (d, _))| json!({"domain": texts[*d].0, "weights": b}))
            .collect();
        write_json(
            path,
            &json!({"chars": args.chars, "temperature": args.temperature, "rows": out,
                    "blends": blends}),
        )?;
    }
    Ok(())
}

/// Held-out paragraphs of each text: `count` pieces of `chars` characters.
fn held_out(texts: &[(String, String, String)], chars: usize, count: usize) -> Vec<Vec<&str>> {
    texts
        .iter()
        .map(|(_, _, held)| pieces(held, chars, count))
        .collect()
}

/// How one text's paragraphs were routed.
struct Routed {
    /// Paragraphs sent to each route of the table.
    to: Vec<usize>,
    /// Paragraphs sent to the text's own route.
    right: usize,
}

/// Routes each text's embedded paragraphs (`embs[i]` for text `i`); every text's adapter must
/// have a route in the table.
fn route_all(
    table: &RouteTable,
    texts: &[(String, String, String)],
    embs: &[Vec<Vec<f32>>],
) -> Result<Vec<Routed>> {
    texts
        .iter()
        .zip(embs)
        .map(|((adapter, _, _), embs)| {
            let Some(want) = table.routes.iter().position(|r| &r.adapter == adapter) else {
                bail!("{adapter} has no route in the table");
            };
            let mut to = vec![0usize; table.routes.len()];
            for e in embs {
                to[table.decide(e).index] += 1;
            }
            Ok(Routed {
                right: to[want],
                to,
            })
        })
        .collect()
}

/// Options of `s2lc bench encoder`.
#[derive(Args)]
pub struct EncoderBenchArgs {
    #[command(flatten)]
    text: RouterText,
    /// Calibration paragraphs per domain (from the training part) for whitening.
    #[arg(long, default_value_t = 8)]
    calibration: usize,
    /// Pieces of 1000 characters per domain for each variant's route centroids.
    #[arg(long, default_value_t = 16)]
    route_pieces: usize,
    /// Held-out paragraphs per domain (500 characters each).
    #[arg(long, default_value_t = 50)]
    pieces: usize,
    #[command(flatten)]
    json: JsonArg,
}

/// `s2lc bench encoder`: the encoder dense and compressed (plain and whitened SVD, energy
/// thresholds and parameter budgets), each scored by the cosine of its held-out embeddings to the
/// dense ones and by routing accuracy with centroids it built itself.
pub fn bench_encoder(args: &EncoderBenchArgs) -> Result<()> {
    let dir = args
        .text
        .encoder
        .clone()
        .unwrap_or_else(s2lc_model::assets::minilm);
    let texts = args.text.texts()?;
    let held = held_out(&texts, 500, args.pieces);
    let calibration: Vec<&str> = texts
        .iter()
        .flat_map(|(_, train, _)| pieces(train, 500, args.calibration))
        .collect();
    let routes: Vec<(String, &str)> = texts
        .iter()
        .map(|(a, train, _)| (a.clone(), train.as_str()))
        .collect();
    let load = || {
        SentenceEncoder::load(&dir)
            .with_context(|| format!("loading the sentence encoder {}", dir.display()))
    };
    let dense = load()?;
    let paragraphs: usize = held.iter().map(Vec::len).sum();
    let want = held
        .iter()
        .map(|ps| dense.embed_all(ps))
        .collect::<Result<Vec<_>, _>>()?;
    let mut variants = vec![("dense".to_string(), None)];
    for e in [0.9, 0.95, 0.99] {
        variants.push((
            format!("svd {:.0}% energy", e * 100.0),
            Some((Method::Svd, RankPolicy::Energy(e))),
        ));
    }
    for method in [Method::Svd, Method::Whitened] {
        for keep in [0.9, 0.8, 0.7, 0.5] {
            variants.push((
                format!("{} −{:.0}% params", method.name(), (1.0 - keep) * 100.0),
                Some((method, RankPolicy::KeepParams(keep))),
            ));
        }
    }
    println!(
        "{} held-out paragraphs of 500 characters from {} domains; whitening: {} calibration \
         paragraphs (sequential); routes from {} pieces per domain\n",
        paragraphs,
        texts.len(),
        calibration.len(),
        args.route_pieces
    );
    println!("| variant | linear params | cosine to dense: mean | worst | routing accuracy | ms per paragraph | compress s |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, how) in &variants {
        let mut enc = load()?;
        let t = std::time::Instant::now();
        if let Some((method, policy)) = how {
            enc.compress(*policy, *method, true, &calibration)
                .with_context(|| format!("compressing the encoder ({name})"))?;
        }
        let compress_s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let embs = held
            .iter()
            .map(|ps| enc.embed_all(ps))
            .collect::<Result<Vec<_>, _>>()?;
        let ms = t.elapsed().as_secs_f64() * 1e3 / paragraphs.max(1) as f64;
        let cos: Vec<f32> = embs
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
            .collect();
        let mean = cos.iter().sum::<f32>() / cos.len().max(1) as f32;
        let worst = cos.iter().copied().fold(f32::INFINITY, f32::min);
        let table = RouteTable::build(&enc, name, &routes, 1000, args.route_pieces)
            .context("building the centroids")?;
        let right: usize = route_all(&table, &texts, &embs)?
            .iter()
            .map(|r| r.right)
            .sum();
        let accuracy = right as f64 / paragraphs.max(1) as f64;
        let params = (enc.linear_params(), dense.linear_params());
        println!(
            "| {name} | {:.2} M ({:.2}x) | {mean:.4} | {worst:.4} | {:.1} % | {ms:.1} | {compress_s:.1} |",
            params.0 as f64 / 1e6,
            params.0 as f64 / params.1 as f64,
            100.0 * accuracy
        );
        rows.push(
            json!({"variant": name, "linear_params": params.0, "dense_params": params.1,
            "cosine_mean": mean, "cosine_worst": worst, "routing_accuracy": accuracy,
            "ms_per_paragraph": ms, "compress_seconds": compress_s}),
        );
    }
    if let Some(path) = &args.json.path {
        write_json(
            path,
            &json!({"encoder": dir.display().to_string(), "paragraphs": paragraphs,
                "calibration_paragraphs": calibration.len(), "route_pieces": args.route_pieces,
                "variants": rows}),
        )?;
    }
    Ok(())
}
