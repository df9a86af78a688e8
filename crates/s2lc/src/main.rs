//! `s2lc`: the S2LC command line.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod cmd;

// The plumbing every command shares, and the commands that live with the benches (they share
// the held-out protocol and the reports): reachable as `crate::...` from the command modules.
pub use s2lc_bench::common::{
    load_model, load_weights, parse_kv, parse_weights, progress_bar, ModelArg,
};
use s2lc_bench::{experts, router, BenchCommand};

/// S2LC: spectral low-rank compression and serving of language models.
#[derive(Parser)]
#[command(name = "s2lc", version, about)]
struct Cli {
    /// Worker threads for the math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(cmd::generate::GenerateArgs),
    /// Perplexity on a text file, plus prefill and decode speed.
    Eval(cmd::eval::EvalArgs),
    /// Architecture, tensor table, dtypes and parameter counts of a model.
    Info(ModelArg),
    /// Singular values of every linear weight: ranks per energy threshold, JSON report and plots.
    Analyze(cmd::analyze::AnalyzeArgs),
    /// Replace linear layers by low-rank factors and save the model.
    Compress(cmd::compress::CompressArgs),
    /// Inspect LoRA adapters (PEFT layout) and re-rank them by their spectra.
    #[command(subcommand)]
    Adapters(cmd::adapters::AdaptersCommand),
    /// Domain FFN expert sets (MoE residuals built from the dense model).
    #[command(subcommand)]
    Experts(experts::ExpertsCommand),
    /// The Adapter Store: content-addressed blobs, semantic versions, local or S3.
    Store(cmd::store::StoreArgs),
    /// Serve the base model and the store's adapters over an OpenAI-style HTTP API
    /// (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).
    Serve(cmd::serve::ServeArgs),
    /// The Context Router's centroids (`build`) and routing accuracy on held-out text (`eval`).
    #[command(subcommand)]
    Router(router::RouterCommand),
    /// Write the last-position logits of a prompt (raw little-endian f32, vocabulary order) and
    /// print the top tokens: for cross-checks against other runtimes.
    Logits(cmd::logits::LogitsArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Output piped into a reader that stopped early (`s2lc info ... | head`) is not an error: a
/// write to stdout failed with a broken pipe and came back through `?` as the error itself. A
/// broken pipe among an error's causes (a store server closing a connection mid-request) is a
/// real failure and is reported.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting the thread count")?;
        s2lc_model::kernels::pool::init_global(n);
    }
    match cli.command {
        Command::Generate(args) => cmd::generate::run(&args),
        Command::Eval(args) => cmd::eval::run(&args),
        Command::Info(model) => cmd::info::run(&model.path()),
        Command::Compress(args) => cmd::compress::run(&args),
        Command::Analyze(args) => cmd::analyze::run(&args),
        Command::Adapters(cmd) => cmd::adapters::run(&cmd),
        Command::Experts(cmd) => experts::run(&cmd),
        Command::Store(args) => cmd::store::run(&args),
        Command::Serve(args) => cmd::serve::run(&args),
        Command::Router(cmd) => router::run(&cmd),
        Command::Logits(args) => cmd::logits::run(&args),
        Command::Bench(cmd) => s2lc_bench::run(&cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::{is_broken_pipe, Cli};
    use clap::CommandFactory;

    /// Every subcommand's flags are consistent (ids, conflicts, requirements, shared `Args`
    /// structs flattened without clashes): clap checks it here instead of at first use.
    #[test]
    fn the_command_line_grammar_is_consistent() {
        Cli::command().debug_assert();
        let bench = Cli::command();
        let pack = bench
            .find_subcommand("bench")
            .and_then(|b| b.find_subcommand("pack"))
            .expect("bench pack");
        for flag in [
            "model",
            "weights",
            "adapter",
            "experts",
            "no-experts",
            "json",
        ] {
            assert!(
                pack.get_arguments().any(|a| a.get_long() == Some(flag)),
                "bench pack --{flag}"
            );
        }
    }
    use std::io::{Error, ErrorKind};

    #[test]
    fn only_a_closed_stdout_counts_as_a_broken_pipe() {
        let pipe = || Error::new(ErrorKind::BrokenPipe, "broken pipe");
        // `writeln!(out, ...)?` into a closed pipe.
        assert!(is_broken_pipe(&anyhow::Error::from(pipe())));
        // A store request whose connection broke: a failure, whatever the context says.
        let store = s2lc_store::StoreError::Io {
            path: "s3://fleet/blobs/x".into(),
            source: pipe(),
        };
        assert!(!is_broken_pipe(
            &anyhow::Error::from(store).context("pushing alice@1.0.0")
        ));
    }
}
