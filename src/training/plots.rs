//! PNG plots of a training run: the loss curves and per-tissue R². Drawn with plotters into an RGB buffer
//! with DejaVu Sans embedded in the binary (no system font library), encoded as PNG and written through the
//! atomic writer.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::runtime::output::write_atomically;
use crate::{Error, Result};

const FONT: &str = "sans-serif";

fn ensure_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are a valid TrueType font shipped by the dejavu crate.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn plot_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid("plot", format!("{what}: {e}"))
}

fn encode_png(path: &Path, rgb: &[u8], (w, h): (u32, u32)) -> Result<()> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgb, w, h, image::ColorType::Rgb8)
        .map_err(|e| plot_error("png encoding", e))?;
    write_atomically(path, &png)
}

use image::ImageEncoder as _;

/// Training loss per optimiser step (with a moving average) and validation loss per evaluation.
pub fn loss_curves(path: &Path, train: &[f32], validation: &[(usize, f64)]) -> Result<()> {
    ensure_font();
    let size = (960u32, 540u32);
    let mut rgb = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error("fill", e))?;
        let steps = train.len().max(1);
        let finite = |v: f64| if v.is_finite() { Some(v) } else { None };
        let top = train
            .iter()
            .map(|&v| v as f64)
            .chain(validation.iter().map(|v| v.1))
            .filter_map(finite)
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption("Loss (MSE on z-scored targets)", (FONT, 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0usize..steps, 0.0f64..top)
            .map_err(|e| plot_error("axes", e))?;
        chart
            .configure_mesh()
            .x_desc("optimiser step")
            .y_desc("loss")
            .label_style((FONT, 14))
            .draw()
            .map_err(|e| plot_error("mesh", e))?;
        let window = (train.len() / 50).max(1);
        let smoothed: Vec<(usize, f64)> = (0..train.len())
            .map(|i| {
                let lo = i.saturating_sub(window - 1);
                let s: f64 = train[lo..=i].iter().map(|&v| v as f64).sum();
                (i + 1, s / (i + 1 - lo) as f64)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                train.iter().enumerate().map(|(i, &v)| (i + 1, v as f64)),
                RGBColor(170, 190, 230),
            ))
            .map_err(|e| plot_error("train loss", e))?;
        chart
            .draw_series(LineSeries::new(smoothed, BLUE.stroke_width(2)))
            .map_err(|e| plot_error("train loss", e))?
            .label("training (moving average)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                validation.iter().copied(),
                RED.stroke_width(2),
            ))
            .map_err(|e| plot_error("validation loss", e))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(validation.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| plot_error("validation points", e))?;
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()
            .map_err(|e| plot_error("legend", e))?;
        root.present().map_err(|e| plot_error("present", e))?;
    }
    encode_png(path, &rgb, size)
}

/// Per-tissue R² as horizontal bars (tissue names on the left), with the mean of the defined values as a
/// line; a tissue without an R² (its targets all equal) has no bar.
pub fn r2_bars(path: &Path, title: &str, r2: &[(String, Option<f64>)]) -> Result<()> {
    ensure_font();
    let n = r2.len().max(1);
    let size = (900u32, (120 + 22 * n as u32).min(4000));
    let mut rgb = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error("fill", e))?;
        let finite = || r2.iter().filter_map(|v| v.1).filter(|v| v.is_finite());
        let lo = finite().fold(0.0f64, f64::min).max(-1.0);
        let hi = finite().fold(0.0f64, f64::max).max(0.1) * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(150)
            .build_cartesian_2d(lo..hi, (0usize..n - 1).into_segmented())
            .map_err(|e| plot_error("axes", e))?;
        let names: Vec<String> = r2.iter().map(|v| v.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if *i < n => names[n - 1 - i].clone(),
                _ => String::new(),
            })
            .x_desc("R²")
            .label_style((FONT, 13))
            .draw()
            .map_err(|e| plot_error("mesh", e))?;
        // Row i (from the top) is drawn at y = n − 1 − i, so the list reads top-down in tissue order.
        chart
            .draw_series(r2.iter().enumerate().map(|(i, (_, v))| {
                let v = v.filter(|v| v.is_finite()).map_or(0.0, |v| v.clamp(lo, hi));
                let y = n - 1 - i;
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(y)),
                        (v, SegmentValue::Exact(y + 1)),
                    ],
                    RGBColor(70, 120, 190).filled(),
                );
                bar.set_margin(2, 2, 0, 0);
                bar
            }))
            .map_err(|e| plot_error("bars", e))?;
        let mean = finite().sum::<f64>() / finite().count().max(1) as f64;
        chart
            .draw_series(LineSeries::new(
                vec![(mean, SegmentValue::Exact(0)), (mean, SegmentValue::Last)],
                RED.stroke_width(2),
            ))
            .map_err(|e| plot_error("mean", e))?;
        root.present().map_err(|e| plot_error("present", e))?;
    }
    encode_png(path, &rgb, size)
}
