//! `kiln bench --plot FILE.svg`: the latency CDF of every series, one
//! line per scenario and VMM, on a log time axis (restores and clones are
//! an order of magnitude or more faster than boots). SVG only: text is
//! left to the viewer's fonts, so nothing is rasterised and no font is read.
use plotters::prelude::*;

use super::report::{Report, Series};
use super::stats::sorted;

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

/// The SVG document for `report`; an error when it has no samples.
pub fn svg(report: &Report) -> Result<String, String> {
    let all: Vec<f64> = report
        .series
        .iter()
        .flat_map(|s| s.samples_ms.iter().copied())
        .filter(|ms| ms.is_finite() && *ms > 0.0)
        .collect();
    let (Some(lo), Some(hi)) = (
        all.iter().copied().reduce(f64::min),
        all.iter().copied().reduce(f64::max),
    ) else {
        return Err("the report has no samples to plot".into());
    };
    let mut out = String::new();
    draw(report, lo * 0.8, hi * 1.25, &mut out).map_err(|err| err.to_string())?;
    Ok(out)
}

fn draw(
    report: &Report,
    lo: f64,
    hi: f64,
    out: &mut String,
) -> Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>> {
    let root = SVGBackend::with_string(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(64);
    head.draw(&Text::new(
        "kiln bench: startup latency, CDF per scenario",
        (16, 10),
        ("sans-serif", 26).into_font().color(&BLACK),
    ))?;
    head.draw(&Text::new(
        subtitle(report),
        (16, 40),
        ("sans-serif", 17).into_font().color(&BLACK.mix(0.7)),
    ))?;
    let mut chart = ChartBuilder::on(&body)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of runs at or below")
        .x_label_formatter(&|ms| format!("{ms:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, series) in report.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(steps(series), color.stroke_width(2)))?
            .label(series.label())
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

fn subtitle(report: &Report) -> String {
    let ratios: Vec<String> = report
        .ratios
        .iter()
        .map(|r| format!("{} kiln/{} p50 {:.2}", r.scenario, r.peer, r.ratio))
        .collect();
    let mut line = format!(
        "{}, {} runs per line, {} at a time, {} MiB; {}",
        report.image, report.runs, report.concurrency, report.memory_mib, report.environment.label
    );
    if !ratios.is_empty() {
        line.push_str("; ");
        line.push_str(&ratios.join(", "));
    }
    line
}

/// The empirical CDF as a staircase: at each sample the fraction of runs
/// at or below it steps up by 1/n.
fn steps(series: &Series) -> Vec<(f64, f64)> {
    let samples = sorted(&series.samples_ms);
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
    use super::super::Scenario;
    use super::super::report::Vmm;
    use super::super::report::fixtures::series;
    use super::*;

    fn report(series: Vec<Series>) -> Report {
        super::super::report::fixtures::report(series, vec![])
    }

    #[test]
    fn the_cdf_steps_up_by_one_over_n_at_each_sample() {
        let s = series(Scenario::Cold, Vmm::Kiln, &[30.0, 10.0, 20.0, 40.0]);
        assert_eq!(
            steps(&s),
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
    fn a_report_without_samples_is_not_plotted() {
        assert!(svg(&report(vec![])).is_err());
    }
}
