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
    let est = rows
        .iter()
        .enumerate()
        .map(|(i, r)| Rectangle::new([(i as f64 + 0.1, 0.0), (i as f64 + 0.5, r.1)], BLUE.mix(0.7).filled()));
    chart
        .draw_series(est)
        .map_err(|e| e.to_string())?
        .label("established")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], BLUE.mix(0.7).filled()));
    let new = rows
        .iter()
        .enumerate()
        .map(|(i, r)| Rectangle::new([(i as f64 + 0.5, 0.0), (i as f64 + 0.9, r.2)], RED.mix(0.6).filled()));
    chart
        .draw_series(new)
        .map_err(|e| e.to_string())?
        .label("every packet a new flow")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], RED.mix(0.6).filled()));
    chart.configure_series_labels().border_style(BLACK).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
