//! Sweep plots, each as PNG and SVG: output throughput against concurrency, TPOT against
//! throughput (the latency/throughput trade-off curve), and TTFT statistics against concurrency.
//!
//! Text is rendered with DejaVu Sans embedded in the binary, so no system font configuration is
//! needed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One sweep point as the plots need it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotPoint {
    /// Concurrency of the point.
    pub concurrency: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Mean TPOT in ms.
    pub mean_tpot_ms: f64,
    /// TTFT statistics in ms: (label, value), e.g. ("mean", ..), ("p99", ..).
    pub ttft_ms: Vec<(String, f64)>,
}

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {detail}")]
pub struct PlotError {
    /// The file being drawn.
    pub path: String,
    /// What failed.
    pub detail: String,
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_err()
        {
            tracing::warn!("embedded font rejected; plots will lack text");
        }
    });
}

const SIZE: (u32, u32) = (960, 600);

struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    /// Text drawn beside each point (e.g. its concurrency); empty for none.
    notes: Vec<String>,
}

struct Chart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    log_x: bool,
    series: Vec<Series>,
}

fn draw_on<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let all = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (1.0, 2.0);
    }
    if x0 == x1 {
        (x0, x1) = (x0 * 0.5, x1 * 1.5 + 1.0);
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! draw_series {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            let y_fmt = |v: &f64| {
                if y1 >= 10.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            };
            let x_fmt = |v: &f64| {
                if chart.log_x || x1 - x0 >= 10.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            };
            ctx.configure_mesh()
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .x_desc(chart.x_label)
                .y_desc(chart.y_label)
                .label_style(("sans-serif", 16))
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, s) in chart.series.iter().enumerate() {
                let color = colors[i % colors.len()];
                ctx.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(s.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
                ctx.draw_series(
                    s.points
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                )
                .map_err(|e| e.to_string())?;
                ctx.draw_series(s.notes.iter().zip(&s.points).map(|(note, &(x, y))| {
                    Text::new(note.clone(), (x, y), ("sans-serif", 15).into_font())
                }))
                .map_err(|e| e.to_string())?;
            }
            ctx.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(|e| e.to_string())?;
        }};
    }
    if chart.log_x && x0 > 0.0 {
        // Ticks at the measured concurrency levels, not at log-scale defaults like 9, 10.
        let mut ticks: Vec<f64> = chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        draw_series!(
            builder
                .build_cartesian_2d(
                    (x0 / 1.3..x1 * 1.3).log_scale().with_key_points(ticks),
                    0.0..y1
                )
                .map_err(|e| e.to_string())?
        );
    } else {
        let pad = (x1 - x0) * 0.05;
        draw_series!(
            builder
                .build_cartesian_2d(x0 - pad..x1 + pad, 0.0..y1)
                .map_err(|e| e.to_string())?
        );
    }
    root.present().map_err(|e| e.to_string())
}

fn draw_both(dir: &Path, stem: &str, chart: &Chart) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let fail = |p: &Path, detail: String| PlotError {
        path: p.display().to_string(),
        detail,
    };
    draw_on(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)
        .map_err(|e| fail(&png, e))?;
    draw_on(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart).map_err(|e| fail(&svg, e))?;
    Ok(vec![png, svg])
}

/// Draws the three sweep plots into `dir` and returns the files written.
pub fn draw_sweep(dir: &Path, points: &[PlotPoint]) -> Result<Vec<PathBuf>, PlotError> {
    let mut files = Vec::new();
    let throughput = Chart {
        title: "Output throughput vs concurrency",
        x_label: "max concurrency",
        y_label: "output tokens/s",
        log_x: true,
        series: vec![Series {
            label: "output tok/s".into(),
            points: points
                .iter()
                .map(|p| (p.concurrency, p.output_throughput))
                .collect(),
            notes: Vec::new(),
        }],
    };
    files.extend(draw_both(dir, "throughput_vs_concurrency", &throughput)?);
    let tpot = Chart {
        title: "TPOT vs output throughput",
        x_label: "output tokens/s",
        y_label: "mean TPOT (ms)",
        log_x: false,
        series: vec![Series {
            label: "mean TPOT".into(),
            points: points
                .iter()
                .map(|p| (p.output_throughput, p.mean_tpot_ms))
                .collect(),
            notes: points
                .iter()
                .map(|p| format!("  c={}", p.concurrency))
                .collect(),
        }],
    };
    files.extend(draw_both(dir, "tpot_vs_throughput", &tpot)?);
    let labels: Vec<String> = points
        .first()
        .map(|p| p.ttft_ms.iter().map(|(l, _)| l.clone()).collect())
        .unwrap_or_default();
    let ttft = Chart {
        title: "TTFT vs concurrency",
        x_label: "max concurrency",
        y_label: "TTFT (ms)",
        log_x: true,
        series: labels
            .iter()
            .enumerate()
            .map(|(i, label)| Series {
                label: format!("{label} TTFT"),
                points: points
                    .iter()
                    .filter_map(|p| p.ttft_ms.get(i).map(|(_, v)| (p.concurrency, *v)))
                    .collect(),
                notes: Vec::new(),
            })
            .collect(),
    };
    files.extend(draw_both(dir, "ttft_percentiles", &ttft)?);
    Ok(files)
}
