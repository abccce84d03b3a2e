//! An SVG chart of one or more runs over time: throughput on top (offered,
//! acked and delivered messages per second), latency below (p99 of ack and
//! end-to-end latency, from the intended send time).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::stats::Point;

/// A run to draw: its name and its time series.
pub struct Run<'a> {
    pub label: &'a str,
    pub series: &'a [Point],
}

/// A line of the chart: its name, what it plots, how it looks.
type Line = (&'static str, fn(&Point) -> f64, ShapeStyle);

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn max_of(runs: &[Run], f: impl Fn(&Point) -> f64) -> f64 {
    runs.iter()
        .flat_map(|r| r.series.iter().map(&f))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
}

/// Writes the chart of `runs` to `path`.
pub fn write_svg(path: &Path, title: &str, runs: &[Run]) -> anyhow::Result<()> {
    draw(path, title, runs).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    std::fs::metadata(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw(path: &Path, title: &str, runs: &[Run]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (upper, lower) = root.split_vertically(360);
    let t_max = max_of(runs, |p| p.t_s).max(1.0);

    let rate_max = max_of(runs, |p| {
        p.offered_per_s.max(p.acks_per_s).max(p.deliveries_per_s)
    })
    .max(1.0)
        * 1.1;
    let mut chart = ChartBuilder::on(&upper)
        .caption("throughput (msgs/s)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..rate_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("msgs/s")
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let lines: [Line; 3] = [
            (
                "offered",
                |p| p.offered_per_s,
                color.mix(0.35).stroke_width(1),
            ),
            ("acked", |p| p.acks_per_s, color.stroke_width(2)),
            (
                "delivered",
                |p| p.deliveries_per_s,
                color.mix(0.7).stroke_width(1),
            ),
        ];
        for (name, f, style) in lines {
            chart
                .draw_series(LineSeries::new(
                    run.series.iter().map(|p| (p.t_s, f(p))),
                    style,
                ))?
                .label(format!("{} {name}", run.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let latency_max = max_of(runs, |p| p.ack_p99_ms.max(p.e2e_p99_ms)).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(&lower)
        .caption(
            "latency from the intended send time, p99 per interval (ms)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..latency_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let lines: [Line; 2] = [
            ("ack p99", |p| p.ack_p99_ms, color.stroke_width(2)),
            ("e2e p99", |p| p.e2e_p99_ms, color.mix(0.5).stroke_width(1)),
        ];
        for (name, f, style) in lines {
            chart
                .draw_series(LineSeries::new(
                    run.series.iter().map(|p| (p.t_s, f(p))),
                    style,
                ))?
                .label(format!("{} {name}", run.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_every_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let series: Vec<Point> = (1..20)
            .map(|i| Point {
                t_s: i as f64 * 0.5,
                offered_per_s: 1000.0,
                acks_per_s: 990.0,
                deliveries_per_s: 990.0,
                ack_p99_ms: 3.0 + i as f64,
                e2e_p99_ms: 4.0 + i as f64,
                ..Default::default()
            })
            .collect();
        write_svg(
            &path,
            "ingest-max",
            &[
                Run {
                    label: "bare",
                    series: &series,
                },
                Run {
                    label: "chat",
                    series: &[],
                },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("bare acked") && svg.contains("chat e2e p99"));
    }
}
