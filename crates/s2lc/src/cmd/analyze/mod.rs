//! `s2lc analyze`: the singular values of every linear weight of a model, the rank each needs per
//! energy threshold, and what that would keep of the parameters — as a table, a JSON report and
//! an SVG/PNG plot of the spectra per layer type.
//!
//! The math and the report live in [`s2lc_spectral::analysis`]; this module loads the model,
//! runs the decompositions in parallel, prints and writes files; [`draw`] draws the plots.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use faer::{MatRef, Par};
use rayon::prelude::*;
use s2lc_model::atomic::write_file_atomic;
use s2lc_model::linear::Linear;
use s2lc_spectral::analysis::{
    singular_values, MatrixSpectrum, SpectralReport, DEFAULT_THRESHOLDS,
};

use s2lc_model::source::WeightStorage;

use crate::{load_weights, progress_bar, ModelArg};

mod draw;

use draw::{plot_font_available, plot_png, plot_svg};

/// Arguments of `s2lc analyze`.
#[derive(Args)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output directory for spectra.json, spectra.svg and spectra.png (created if needed).
    #[arg(short = 'o', long = "out", default_value = "s2lc-analysis")]
    out: PathBuf,
    /// Write the JSON report to this file instead of DIR/spectra.json.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the plots to PREFIX.svg and PREFIX.png instead of DIR/spectra.{svg,png}.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Which energy threshold the "parameters at" column of the table uses.
const TABLE_ENERGY: f64 = 0.90;

/// Runs `s2lc analyze`.
pub fn run(args: &AnalyzeArgs) -> Result<()> {
    let path = args.model.path();
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| args.out.join("spectra.json"));
    let plot_prefix = args
        .plot
        .clone()
        .unwrap_or_else(|| args.out.join("spectra"));

    let start = Instant::now();
    // The spectra need the weights only: a directory without a tokenizer is analyzed too.
    let (_source, model) = load_weights(&path, WeightStorage::F32)?;
    let loaded = start.elapsed();

    // One job per linear weight, in model order; the decompositions run in parallel, each one
    // single-threaded (many independent matrices keep every core busy with no sync inside).
    let jobs: Vec<(usize, &'static str, &Linear)> = model
        .blocks()
        .iter()
        .enumerate()
        .flat_map(|(layer, block)| {
            block
                .linears()
                .map(move |(kind, linear)| (layer, kind, linear))
        })
        .collect();
    if jobs.is_empty() {
        bail!("{} has no linear layers to analyze", path.display());
    }
    let svd_start = Instant::now();
    let bar = progress_bar(jobs.len() as u64, "singular values");
    let matrices = jobs
        .par_iter()
        .map(|&(layer, kind, linear)| {
            let name = format!("model.layers.{layer}.{kind}");
            let values =
                linear_singular_values(linear).with_context(|| format!("decomposing {name}"))?;
            let spectrum = MatrixSpectrum::new(
                name,
                layer,
                kind,
                linear.out_dim(),
                linear.in_dim(),
                values,
                &DEFAULT_THRESHOLDS,
            )?;
            bar.inc(1);
            Ok(spectrum)
        })
        .collect::<Result<Vec<_>>>()?;
    bar.finish_and_clear();
    let svd_time = svd_start.elapsed();

    let report = SpectralReport::new(
        "s2lc",
        env!("CARGO_PKG_VERSION"),
        path.display().to_string(),
        &DEFAULT_THRESHOLDS,
        matrices,
    )?;

    let mut out = std::io::stdout().lock();
    print_tables(&mut out, &report)?;

    let json = serde_json::to_vec(&report).context("serializing the report")?;
    write_file_atomic(&json_path, &json)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = with_suffix(&plot_prefix, ".svg");
    let png_path = with_suffix(&plot_prefix, ".png");
    let text = plot_font_available();
    plot_svg(&report, &svg_path, text)?;
    plot_png(&report, &png_path, text)?;

    writeln!(
        out,
        "\n{} matrices: load {:.1} s, singular values {:.1} s (threads: {}), total {:.1} s",
        report.matrices.len(),
        loaded.as_secs_f64(),
        svd_time.as_secs_f64(),
        rayon::current_num_threads(),
        start.elapsed().as_secs_f64()
    )?;
    writeln!(out, "wrote {}", json_path.display())?;
    writeln!(out, "wrote {}", svg_path.display())?;
    writeln!(out, "wrote {}", png_path.display())?;
    if !text {
        writeln!(
            out,
            "note: no font found (set S2LC_FONT to a .ttf file); the plots have no text"
        )?;
    }
    Ok(())
}

/// Singular values of a layer's `out × in` weight (of `u·vs` for a low-rank layer, of `Q + L·R`
/// for a corrected one).
fn linear_singular_values(linear: &Linear) -> Result<Vec<f32>> {
    let (rows, cols) = (linear.out_dim(), linear.in_dim());
    let values = match linear {
        Linear::Dense(d) => singular_values(
            MatRef::from_row_major_slice(&d.weight(), rows, cols),
            Par::Seq,
        )?,
        Linear::LowRank(l) => {
            let r = l.rank();
            let (u, vs) = (l.u(), l.vs());
            let u = MatRef::from_row_major_slice(&u, rows, r);
            let vs = MatRef::from_row_major_slice(&vs, r, cols);
            singular_values((u * vs).as_ref(), Par::Seq)?
        }
        Linear::Corrected(c) => singular_values(
            MatRef::from_row_major_slice(&c.effective_weight(), rows, cols),
            Par::Seq,
        )?,
    };
    Ok(values)
}

/// `12345678` → `12,345,678`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_tables(out: &mut impl Write, report: &SpectralReport) -> Result<()> {
    let percent = |e: f64| format!("{:.0}%", e * 100.0);
    let energies: Vec<String> = report
        .thresholds
        .iter()
        .map(|&e| format!("r@{}", percent(e)))
        .collect();

    write!(out, "{:<34} {:>10}", "matrix", "shape")?;
    for e in &energies {
        write!(out, " {e:>6}")?;
    }
    writeln!(
        out,
        " {:>10} {:>12}",
        "break-even",
        format!("params@{}", percent(TABLE_ENERGY))
    )?;
    for m in &report.matrices {
        write!(
            out,
            "{:<34} {:>10}",
            m.name,
            format!("{}×{}", m.rows, m.cols)
        )?;
        for r in &m.ranks {
            write!(out, " {:>6}", r.rank)?;
        }
        let kept = match m.rank_at(TABLE_ENERGY) {
            Some(r) if m.shrinks_at_rank(r) => thousands(m.params_at_rank(r)),
            Some(_) => "dense".to_string(),
            None => "-".to_string(),
        };
        writeln!(out, " {:>10} {:>12}", m.break_even_rank, kept)?;
    }

    writeln!(
        out,
        "\nper layer type: mean rank / full rank (min(out, in)) over {} layers",
        report.kinds.first().map_or(0, |k| k.count)
    )?;
    write!(out, "{:<18} {:>10} {:>6}", "layer type", "shape", "count")?;
    for e in &energies {
        write!(out, " {e:>6}")?;
    }
    writeln!(out, " {:>10}", "break-even")?;
    for k in &report.kinds {
        write!(
            out,
            "{:<18} {:>10} {:>6}",
            k.kind,
            format!("{}×{}", k.rows, k.cols),
            k.count
        )?;
        for f in &k.mean_rank_fraction {
            write!(out, " {:>6.3}", f.fraction)?;
        }
        writeln!(out, " {:>10.3}", k.break_even_fraction)?;
    }

    let dense = report.totals.first().map_or(0, |t| t.dense_params);
    writeln!(
        out,
        "\nwhole model: {} parameters in {} linear weights (dense); a matrix whose rank is above break-even stays dense",
        thousands(dense),
        report.matrices.len()
    )?;
    writeln!(
        out,
        "{:>7} {:>15} {:>9} {:>16}",
        "energy", "parameters", "of dense", "matrices shrunk"
    )?;
    for t in &report.totals {
        writeln!(
            out,
            "{:>7} {:>15} {:>8.1}% {:>16}",
            percent(t.energy),
            thousands(t.params),
            100.0 * t.ratio(),
            format!("{}/{}", t.matrices_shrunk, t.matrices)
        )?;
    }
    Ok(())
}

/// `prefix` with `suffix` appended to its file name (`out/spectra` + `.svg`).
fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
