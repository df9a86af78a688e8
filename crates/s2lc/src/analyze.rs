//! `s2lc analyze`: the singular values of every linear weight of a model, the rank each needs per
//! energy threshold, and what that would keep of the parameters — as a table, a JSON report and
//! an SVG/PNG plot of the spectra per layer type.
//!
//! The math and the report live in [`s2lc_spectral::analysis`]; this module loads the model,
//! runs the decompositions in parallel, prints, draws and writes files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use faer::{MatRef, Par};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use rayon::prelude::*;
use s2lc_model::atomic::{write_atomic_with, write_file_atomic};
use s2lc_model::linear::Linear;
use s2lc_spectral::analysis::{
    singular_values, MatrixSpectrum, SpectralReport, DEFAULT_THRESHOLDS,
};

use s2lc_model::source::WeightStorage;

use crate::{load_model, progress_bar, ModelArg};

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
    let (_source, model, _tokenizer) = load_model(&path, WeightStorage::F32)?;
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
                .into_iter()
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

/// Singular values of a layer's `out × in` weight (of `u·vs` for a low-rank layer).
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
    };
    Ok(values)
}

/// Short label of a layer type: `self_attn.q_proj` → `q_proj`.
fn short(kind: &str) -> &str {
    kind.rsplit('.').next().unwrap_or(kind)
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

/// Runs `draw` on a temporary sibling of `path` (with the same extension), then puts it in
/// place crash-safely.
fn draw_atomically(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_atomic_with(path, |tmp| draw(tmp)).with_context(|| format!("drawing {}", path.display()))
}

const PLOT_SIZE: (u32, u32) = (1800, 1000);

fn plot_svg(report: &SpectralReport, path: &Path, text: bool) -> Result<()> {
    draw_atomically(path, |tmp| {
        let root = SVGBackend::new(tmp, PLOT_SIZE).into_drawing_area();
        draw(&root, report, text)?;
        root.present().map_err(|e| anyhow!("{e}"))
    })
}

fn plot_png(report: &SpectralReport, path: &Path, text: bool) -> Result<()> {
    draw_atomically(path, |tmp| {
        let root = BitMapBackend::new(tmp, PLOT_SIZE).into_drawing_area();
        draw(&root, report, text)?;
        root.present().map_err(|e| anyhow!("{e}"))
    })
}

/// Font files tried for plot text, after `$S2LC_FONT`. plotters' pure-Rust text rendering
/// (`ab_glyph`) does not search the system, so we look in the usual places.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers the first loadable font as plotters' `sans-serif`; false when there is none, in
/// which case the plots are drawn without text rather than not at all.
fn plot_font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let from_env = std::env::var_os("S2LC_FONT").map(PathBuf::from);
        from_env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
            .any(|path| {
                let Ok(bytes) = std::fs::read(&path) else {
                    return false;
                };
                // plotters keeps fonts for the life of the process; this runs once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
    })
}

/// Tableau-10 colours, one per layer type.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// `c` mixed with white: `t = 0` is white, `t = 1` is `c`.
fn tint(c: RGBColor, t: f64) -> RGBColor {
    let mix = |v: u8| (255.0 - (255.0 - v as f64) * t).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// The per-index mean of `curves` (shorter curves stop contributing past their end).
fn mean_curve(curves: &[Vec<f64>]) -> Vec<f64> {
    let len = curves.iter().map(Vec::len).max().unwrap_or(0);
    (0..len)
        .map(|i| {
            let (sum, n) = curves
                .iter()
                .filter_map(|c| c.get(i))
                .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
            sum / n.max(1) as f64
        })
        .collect()
}

/// Points `(rank / full rank, value)` for ranks `1..=len`.
fn by_rank_fraction(values: &[f64]) -> impl Iterator<Item = (f64, f64)> + '_ {
    let k = values.len() as f64;
    values
        .iter()
        .enumerate()
        .map(move |(i, &v)| ((i + 1) as f64 / k, v))
}

/// Top: mean normalised singular-value decay (log) and mean cumulative energy per layer type.
/// Bottom: one small panel per layer type with the cumulative energy of every layer, light to dark
/// by depth, the 90 % line and the break-even rank.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &SpectralReport,
    text: bool,
) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(e)?;
    let root = if text {
        root.titled(
            &format!(
                "Singular-value spectra of {} ({} linear weights)",
                Path::new(&report.model).file_name().map_or_else(
                    || report.model.clone(),
                    |n| n.to_string_lossy().into_owned()
                ),
                report.matrices.len()
            ),
            ("sans-serif", 26),
        )
        .map_err(e)?
    } else {
        root.clone()
    };
    // A strip at the bottom for the key of the small panels.
    let height = root.dim_in_pixel().1;
    let (body, footer) = root.split_vertically(height.saturating_sub(if text { 28 } else { 0 }));
    let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 * 11 / 20);
    let top_panels = top.split_evenly((1, 2));
    let bottom_panels = bottom.split_evenly((1, report.kinds.len().max(1)));

    let kinds: Vec<(&str, RGBColor, Vec<&MatrixSpectrum>)> = report
        .kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let of_kind = report
                .matrices
                .iter()
                .filter(|m| m.kind == k.kind)
                .collect();
            (k.kind.as_str(), PALETTE[i % PALETTE.len()], of_kind)
        })
        .collect();
    let decays: Vec<Vec<f64>> = kinds
        .iter()
        .map(|(_, _, ms)| mean_curve(&ms.iter().map(|m| m.normalised_decay()).collect::<Vec<_>>()))
        .collect();
    let energies: Vec<Vec<f64>> = kinds
        .iter()
        .map(|(_, _, ms)| mean_curve(&ms.iter().map(|m| m.cumulative_energy()).collect::<Vec<_>>()))
        .collect();

    // Log axis from the smallest positive mean ratio, rounded down to a power of ten.
    let smallest = decays
        .iter()
        .flatten()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(1.0f64, f64::min);
    let floor = 10f64.powf(smallest.log10().floor()).max(1e-6);

    let label_font = ("sans-serif", 16);
    let mut decay = ChartBuilder::on(&top_panels[0]);
    decay.margin(12);
    if text {
        decay
            .caption("σᵢ / σ₀, mean over layers", ("sans-serif", 20))
            .x_label_area_size(44)
            .y_label_area_size(64);
    }
    let mut decay = decay
        .build_cartesian_2d(0f64..1f64, (floor..1f64).log_scale())
        .map_err(e)?;
    let mut mesh = decay.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235));
    if text {
        mesh.x_desc("rank / full rank")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(label_font);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(e)?;
    for ((kind, colour, _), curve) in kinds.iter().zip(&decays) {
        let points = by_rank_fraction(curve).filter(|&(_, v)| v > 0.0);
        let series = decay
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(e)?;
        if text {
            let colour = *colour;
            series.label(short(kind)).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        }
    }
    if text {
        decay
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(label_font)
            .draw()
            .map_err(e)?;
    }

    let mut energy = ChartBuilder::on(&top_panels[1]);
    energy.margin(12);
    if text {
        energy
            .caption(
                "cumulative energy Σᵢ≤ᵣ σᵢ² / Σ σᵢ², mean over layers",
                ("sans-serif", 20),
            )
            .x_label_area_size(44)
            .y_label_area_size(64);
    }
    let mut energy = energy
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(e)?;
    let mut mesh = energy.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235));
    if text {
        mesh.x_desc("rank / full rank")
            .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
            .label_style(label_font);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(e)?;
    draw_threshold(&mut energy, TABLE_ENERGY).map_err(e)?;
    for ((kind, colour, _), curve) in kinds.iter().zip(&energies) {
        let series = energy
            .draw_series(LineSeries::new(
                std::iter::once((0.0, 0.0)).chain(by_rank_fraction(curve)),
                colour.stroke_width(2),
            ))
            .map_err(e)?;
        if text {
            let colour = *colour;
            series.label(short(kind)).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        }
    }
    if text {
        energy
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(label_font)
            .draw()
            .map_err(e)?;
    }

    let layers = report.matrices.iter().map(|m| m.layer).max().unwrap_or(0);
    for (panel, ((kind, colour, ms), summary)) in
        bottom_panels.iter().zip(kinds.iter().zip(&report.kinds))
    {
        let mut chart = ChartBuilder::on(panel);
        chart.margin(8);
        if text {
            chart
                .caption(
                    format!("{} {}×{}", short(kind), summary.rows, summary.cols),
                    ("sans-serif", 17),
                )
                .x_label_area_size(30)
                .y_label_area_size(40);
        }
        let mut chart = chart
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(e)?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(240, 240, 240));
        if text {
            mesh.x_labels(3)
                .y_labels(5)
                .x_label_formatter(&|v| format!("{v:.1}"))
                .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
                .label_style(("sans-serif", 12));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(e)?;
        draw_threshold(&mut chart, TABLE_ENERGY).map_err(e)?;
        let be = summary.break_even_fraction;
        chart
            .draw_series(LineSeries::new(
                [(be, 0.0), (be, 1.0)],
                BLACK.mix(0.45).stroke_width(1),
            ))
            .map_err(e)?;
        for m in ms {
            let depth = if layers == 0 {
                1.0
            } else {
                m.layer as f64 / layers as f64
            };
            let curve = m.cumulative_energy();
            chart
                .draw_series(LineSeries::new(
                    std::iter::once((0.0, 0.0)).chain(by_rank_fraction(&curve)),
                    tint(*colour, 0.2 + 0.8 * depth).stroke_width(1),
                ))
                .map_err(e)?;
        }
    }
    if text {
        footer
            .draw_text(
                &format!(
                    "bottom row: cumulative energy of each layer, light = layer 0 … dark = layer {layers}; \
                     grey horizontal line: {:.0}% energy; grey vertical line: break-even rank",
                    TABLE_ENERGY * 100.0
                ),
                &("sans-serif", 15).into_text_style(&footer),
                (16, 4),
            )
            .map_err(e)?;
    }
    Ok(())
}

/// A grey horizontal line at `energy`.
fn draw_threshold<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    energy: f64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart.draw_series(LineSeries::new(
        [(0.0, energy), (1.0, energy)],
        BLACK.mix(0.3).stroke_width(1),
    ))?;
    Ok(())
}
