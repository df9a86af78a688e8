//! `s2lc router build | eval`: the Context Router's centroids (mean MiniLM embedding of each
//! adapter's training text) and its accuracy on held-out paragraphs of each domain.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use s2lc_model::encoder::SentenceEncoder;
use s2lc_model::tokenizer::read_text_file;
use s2lc_serve::router::{pieces, RouteTable};

use crate::s2lc_home;

/// Router subcommands.
#[derive(Subcommand)]
pub enum RouterCommand {
    /// Build the centroids: `ADAPTER=TEXT` pairs (default: every domain of the assets, as
    /// DOMAIN-r8), each from the first (1 − heldout) of its text.
    Build(BuildArgs),
    /// Routing accuracy on held-out paragraphs (the last `heldout` of each text).
    Eval(EvalArgs),
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
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
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

    /// `(adapter, text)` pairs, split into (training part, held-out part).
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
                let mut cut = ((1.0 - self.heldout) * text.len() as f64) as usize;
                while !text.is_char_boundary(cut) {
                    cut += 1;
                }
                Ok((a, text[..cut].to_string(), text[cut..].to_string()))
            })
            .collect()
    }
}

/// Runs a router subcommand.
pub fn run(cmd: &RouterCommand) -> Result<()> {
    match cmd {
        RouterCommand::Build(args) => build(args),
        RouterCommand::Eval(args) => eval(args),
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
    let names: Vec<&str> = table.routes.iter().map(|r| r.adapter.as_str()).collect();
    let mut confusion = vec![vec![0usize; names.len()]; texts.len()];
    let (mut right, mut total) = (0, 0);
    let mut rows = Vec::new();
    let t = std::time::Instant::now();
    for (i, (adapter, _, held)) in texts.iter().enumerate() {
        let Some(want) = names.iter().position(|n| n == adapter) else {
            bail!("{adapter} has no route in {}", args.table.display());
        };
        let ps = pieces(held, args.chars, args.pieces);
        let embs = enc.embed_all(&ps)?;
        let mut ok = 0;
        for e in &embs {
            let d = table.decide(e);
            confusion[i][d.index] += 1;
            ok += usize::from(d.index == want);
        }
        right += ok;
        total += ps.len();
        println!(
            "{adapter:>20}: {ok:>3} / {:>3} routed right ({:.1} %)",
            ps.len(),
            100.0 * ok as f64 / ps.len().max(1) as f64
        );
        rows.push(
            json!({"adapter": adapter, "paragraphs": ps.len(), "right": ok,
                         "routed_to": confusion[i]}),
        );
    }
    println!(
        "{:>20}: {right:>3} / {total:>3} ({:.1} %), {:.1} ms per paragraph",
        "all",
        100.0 * right as f64 / total.max(1) as f64,
        t.elapsed().as_secs_f64() * 1e3 / total.max(1) as f64
    );
    println!(
        "confusion (rows: true domain, columns: routed to {})",
        names.join(", ")
    );
    for (row, (a, _, _)) in confusion.iter().zip(&texts) {
        println!("{a:>20}: {row:?}");
    }
    if let Some(path) = &args.json {
        write_json(
            path,
            &json!({"routes": names, "chars": args.chars, "heldout": args.text.heldout,
            "accuracy": right as f64 / total.max(1) as f64, "domains": rows}),
        )?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}
