//! `kiln bench --plot FILE.svg`: the latency CDF of every series, one
//! line per scenario and VMM, on a log time axis (restores and clones are
//! an order of magnitude or more faster than boots). SVG only: text is
//! left to the viewer's fonts, so nothing is rasterised and no font is read.
use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;

use crate::report::Report;
use crate::stats::sorted;

const SIZE: (u32, u32) = (960, 560);
/// One per series, in order (matplotlib's first six: tell-apart colours).
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Why the plot could not be drawn: the cause of
/// [`BenchError::Plot`](crate::BenchError::Plot).
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Every series is empty (or holds no positive, finite time): a log
    /// axis has no range to show.
    #[error("the report has no samples to plot")]
    NoSamples,
    /// plotters failed to lay out or render the chart.
    #[error("plotters could not draw the chart")]
    Draw(#[source] DrawingAreaErrorKind<std::io::Error>),
}

/// The SVG document for `report`; an error when it has no samples.
pub fn svg(report: &Report) -> Result<String, PlotError> {
    let lines: Vec<Line<'_>> = report
        .series
        .iter()
        .map(|s| (s.label(), s.samples_ms.as_slice()))
        .collect();
    cdf_svg(
        "kiln bench: startup latency, CDF per scenario",
        &subtitle(report),
        &lines,
    )
}

/// One CDF to draw: its legend label and its samples in ms.
pub type Line<'a> = (String, &'a [f64]);

/// An SVG of the empirical CDFs of `lines`, under `title` and the lines
/// of `subtitle` (wrapped already); an error when no line has a sample.
pub fn cdf_svg(title: &str, subtitle: &[String], lines: &[Line<'_>]) -> Result<String, PlotError> {
    let all: Vec<f64> = lines
        .iter()
        .flat_map(|(_, samples)| samples.iter().copied())
        .filter(|ms| ms.is_finite() && *ms > 0.0)
        .collect();
    let (Some(lo), Some(hi)) = (
        all.iter().copied().reduce(f64::min),
        all.iter().copied().reduce(f64::max),
    ) else {
        return Err(PlotError::NoSamples);
    };
    let mut out = String::new();
    draw(title, subtitle, lines, lo * 0.8, hi * 1.25, &mut out).map_err(PlotError::Draw)?;
    Ok(out)
}

fn draw(
    title: &str,
    subtitle: &[String],
    lines: &[Line<'_>],
    lo: f64,
    hi: f64,
    out: &mut String,
) -> Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>> {
    let root = SVGBackend::with_string(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(44 + 22 * subtitle.len() as u32);
    head.draw(&Text::new(
        title,
        (16, 10),
        ("sans-serif", 26).into_font().color(&BLACK),
    ))?;
    for (i, line) in subtitle.iter().enumerate() {
        head.draw(&Text::new(
            line.as_str(),
            (16, 44 + 22 * i as i32),
            ("sans-serif", 17).into_font().color(&BLACK.mix(0.7)),
        ))?;
    }
    let mut chart = ChartBuilder::on(&body)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(ticks(lo, hi)),
            0f64..1.0,
        )?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of runs at or below")
        .x_label_formatter(&|ms| format!("{ms:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, (label, samples)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(steps(samples), color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()
}

/// The lines under the title: what ran, the ratios, where (wrapped).
fn subtitle(report: &Report) -> Vec<String> {
    let mut first = format!(
        "{}, {} runs per line, {} at a time, {} MiB guests",
        report.image, report.runs, report.concurrency, report.memory_mib
    );
    for r in &report.ratios {
        first.push_str(&format!(
            "; {} kiln/{} p50 = {:.2}",
            r.scenario, r.peer, r.ratio
        ));
    }
    let mut lines = vec![first];
    lines.extend(wrap(&report.environment.label));
    lines
}

/// `text` in lines that fit under the plot's title (fewer than 115
/// characters), split at spaces.
pub fn wrap(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + word.len() >= WRAP {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

/// Characters per subtitle line, about the plot's width at 17 px.
const WRAP: usize = 115;

/// Tick values between `lo` and `hi` on the log axis: 1-2-5 per decade
/// over two decades or more, 1-1.5-2-3-5-7 over fewer.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let steps: &[f64] = if hi / lo >= 100.0 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]
    };
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    (first..=last)
        .flat_map(|decade| steps.iter().map(move |m| m * 10f64.powi(decade)))
        .filter(|t| (lo..=hi).contains(t))
        .collect()
}

/// The empirical CDF as a staircase: at each sample the fraction of runs
/// at or below it steps up by 1/n.
fn steps(samples: &[f64]) -> Vec<(f64, f64)> {
    let samples = sorted(samples);
    let n = samples.len() as f64;
    let mut points = Vec::with_capacity(samples.len() * 2);
    for (i, &ms) in samples.iter().enumerate() {
        points.push((ms, i as f64 / n));
        points.push((ms, (i + 1) as f64 / n));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Scenario;
    use crate::report::fixtures::series;
    use crate::report::{Series, Vmm};

    fn report(series: Vec<Series>) -> Report {
        crate::report::fixtures::report(series, vec![])
    }

    #[test]
    fn the_cdf_steps_up_by_one_over_n_at_each_sample() {
        let s = series(Scenario::Cold, Vmm::Kiln, &[30.0, 10.0, 20.0, 40.0]);
        assert_eq!(
            steps(&s.samples_ms),
            [
                (10.0, 0.0),
                (10.0, 0.25),
                (20.0, 0.25),
                (20.0, 0.5),
                (30.0, 0.5),
                (30.0, 0.75),
                (40.0, 0.75),
                (40.0, 1.0)
            ]
        );
    }

    #[test]
    fn every_series_has_a_line_and_a_legend_entry() {
        let svg = svg(&report(vec![
            series(Scenario::Cold, Vmm::Kiln, &[100.0, 120.0, 110.0]),
            series(Scenario::Cold, Vmm::Qemu, &[200.0, 260.0, 220.0]),
            series(Scenario::Clone, Vmm::Kiln, &[5.0, 6.0, 7.0]),
        ]))
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for label in [
            "cold (kiln)",
            "cold (qemu)",
            "clone (kiln)",
            "latency (ms, log scale)",
        ] {
            assert!(svg.contains(label), "no {label:?}");
        }
        // One polyline per series, and one per legend sample.
        assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 6, "{svg}");
    }

    #[test]
    fn ticks_fall_inside_the_range() {
        assert_eq!(ticks(1400.0, 4500.0), [1500.0, 2000.0, 3000.0]);
        assert_eq!(
            ticks(8.0, 4000.0),
            [10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]
        );
    }

    #[test]
    fn the_label_is_wrapped_under_the_title() {
        let mut r = report(vec![]);
        r.environment.label = "word ".repeat(50);
        let lines = subtitle(&r);
        assert_eq!(
            lines[0],
            "hello:1.0.0, 3 runs per line, 1 at a time, 128 MiB guests"
        );
        assert!(lines.len() >= 3, "{lines:?}");
        assert!(lines.iter().all(|l| l.len() <= WRAP), "{lines:?}");
    }

    #[test]
    fn a_report_without_samples_is_not_plotted() {
        assert!(svg(&report(vec![])).is_err());
    }
}
