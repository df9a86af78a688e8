//! The plots of `s2lc analyze`: the spectra per layer type drawn to SVG and PNG with plotters,
//! with text when a font is found.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use s2lc_model::atomic::write_atomic_with;
use s2lc_spectral::analysis::{MatrixSpectrum, SpectralReport};

use super::TABLE_ENERGY;

/// Short label of a layer type: `self_attn.q_proj` → `q_proj`.
fn short(kind: &str) -> &str {
    kind.rsplit('.').next().unwrap_or(kind)
}

/// Runs `draw` on a temporary sibling of `path` (with the same extension), then puts it in
/// place crash-safely.
fn draw_atomically(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_atomic_with(path, |tmp| draw(tmp)).with_context(|| format!("drawing {}", path.display()))
}

const PLOT_SIZE: (u32, u32) = (1800, 1000);

pub(super) fn plot_svg(report: &SpectralReport, path: &Path, text: bool) -> Result<()> {
    draw_atomically(path, |tmp| {
        let root = SVGBackend::new(tmp, PLOT_SIZE).into_drawing_area();
        draw(&root, report, text)?;
        root.present().map_err(|e| anyhow!("{e}"))
    })
}

pub(super) fn plot_png(report: &SpectralReport, path: &Path, text: bool) -> Result<()> {
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
pub(super) fn plot_font_available() -> bool {
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
