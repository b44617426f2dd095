//! The loss-curve PNG: train loss per step (and eval loss where measured) drawn with plotters
//! into an RGB buffer, encoded as PNG and written atomically.
//!
//! Text needs a font and a machine may have none installed, so the crate embeds one: DejaVu
//! Sans Mono (Bitstream Vera license, permissive; `crates/flare/assets/fonts/`), registered
//! with plotters' `ab_glyph` backend on first use.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::{Error, Result};

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is valid; should registration fail anyway, plotting reports an
        // error below instead of panicking.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument {
        op: "loss plot",
        msg: e.to_string(),
    }
}

/// Draws `train` (step, loss) as a line and `eval` (step, loss) as points with a line, titled
/// `title`, into a `width x height` PNG at `path` (written atomically). Non-finite losses are
/// left out. Nothing to draw (no finite point) is not an error: the axes are drawn empty.
pub fn write_loss_png(
    path: &Path,
    title: &str,
    train: &[(u64, f64)],
    eval: &[(u64, f64)],
) -> Result<()> {
    register_font();
    let (w, h) = (900u32, 540u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let finite = |v: &[(u64, f64)]| -> Vec<(f64, f64)> {
            v.iter()
                .filter(|(_, l)| l.is_finite())
                .map(|&(s, l)| (s as f64, l))
                .collect()
        };
        let (tr, ev) = (finite(train), finite(eval));
        let all = tr.iter().chain(ev.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1.0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        let (y0, y1) = ((y0 - pad).max(0.0), y1 + pad);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(tr.iter().copied(), BLUE.stroke_width(2)))
            .map_err(plot_err)?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !ev.is_empty() {
            chart
                .draw_series(LineSeries::new(ev.iter().copied(), RED.stroke_width(2)))
                .map_err(plot_err)?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart
                .draw_series(ev.iter().map(|&p| Circle::new(p, 4, RED.filled())))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    crate::io::write_atomic_with(path, |out| {
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new(out)
            .write_image(&buf, w, h, image::ColorType::Rgb8)
            .map_err(std::io::Error::other)
    })
}
