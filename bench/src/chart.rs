//! The e2e chart (SVG, plotters): forwarded Mpps per mode, established
//! flows and all-new flows side by side.

use plotters::prelude::*;
use std::path::Path;

/// Draws grouped bars: (mode, established Mpps, new-flow Mpps).
pub fn bars(path: &Path, rows: &[(String, f64, f64)]) -> Result<(), String> {
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max = rows.iter().map(|r| r.1.max(r.2)).fold(0.0f64, f64::max).max(0.01) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("forwarded Mpps per mode (one run, same veth topology)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..rows.len() as f64, 0f64..max)
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| names.get(x.floor() as usize).cloned().unwrap_or_default())
        .y_desc("Mpps")
        .draw()
        .map_err(|e| e.to_string())?;
    // Two bars per mode: established (left half) and new flows (right half).
    let series = [(0.1, BLUE.mix(0.7), "established"), (0.5, RED.mix(0.6), "every packet a new flow")];
    for (k, (left, color, label)) in series.into_iter().enumerate() {
        let bars = rows.iter().enumerate().map(|(i, r)| {
            let value = if k == 0 { r.1 } else { r.2 };
            Rectangle::new([(i as f64 + left, 0.0), (i as f64 + left + 0.4, value)], color.filled())
        });
        chart
            .draw_series(bars)
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
