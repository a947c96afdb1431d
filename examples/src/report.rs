//! Small reporting helpers for the CLI: progress lines with an ETA, markdown tables, and an
//! SVG line plot drawn with `plotters` (SVG backend only: text stays SVG `<text>`, so no font
//! files are read).

use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Instant;

/// Prints `label: done/total (pct) elapsed, ETA` to stderr, at most a few times a second.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: usize,
    start: Instant,
    last: Option<Instant>,
}

impl Progress {
    /// Starts a progress line for `total` steps.
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Self {
            label: label.into(),
            total: total.max(1),
            start: Instant::now(),
            last: None,
        }
    }
    /// Reports that `done` steps are finished.
    pub fn update(&mut self, done: usize) {
        let now = Instant::now();
        if done < self.total {
            if let Some(last) = self.last {
                if now.duration_since(last).as_millis() < 500 {
                    return;
                }
            }
        }
        self.last = Some(now);
        let el = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 {
            el / done as f64 * (self.total.saturating_sub(done)) as f64
        } else {
            f64::NAN
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{}: {done}/{} ({:.0}%) {:.1}s elapsed, ETA {:.1}s   ",
            self.label,
            self.total,
            100.0 * done as f64 / self.total as f64,
            el,
            eta
        );
        if done >= self.total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// A markdown table from a header and rows of cells.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(
        s,
        "|{}|",
        header.iter().map(|_| " --- ").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// One line of a plot.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points (x, y).
    pub points: Vec<(f64, f64)>,
}

/// A plot that could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The plotting library failed while laying out or drawing the picture (drawing goes into
    /// a string, so this is a layout or backend failure, not a file error).
    #[error("drawing the plot {title:?}: {source}")]
    Draw {
        /// The plot's title.
        title: String,
        /// What plotters reported.
        source: DrawingAreaErrorKind<std::io::Error>,
    },
}

/// Colours of the series, in order (the matplotlib "tab10" palette, readable on white).
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// An SVG line plot (drawn with `plotters`' SVG backend, in memory) with a linear x axis and a
/// logarithmic y axis (perplexity spans orders of magnitude), optional dashed horizontal
/// reference lines (e.g. the original model), and the legend inside the plot area.
///
/// Points that cannot be placed on a log axis (non-finite, or y <= 0) are left out. The y
/// ticks are plain numbers on a 1-2-5 sequence (10, 20, 50, 100, ...), or finer when the
/// range is narrow, never `1e1`-style labels.
pub fn svg_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hlines: &[(String, f64)],
) -> Result<String, PlotError> {
    let mut buf = String::new();
    draw_plot(&mut buf, title, x_label, y_label, series, hlines).map_err(|source| {
        PlotError::Draw {
            title: title.to_owned(),
            source,
        }
    })?;
    Ok(buf)
}

fn drawable(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite() && p.1 > 0.0
}

fn draw_plot(
    buf: &mut String,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hlines: &[(String, f64)],
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series
        .iter()
        .flat_map(|s| &s.points)
        .filter(|p| drawable(p))
    {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let hlines: Vec<(&str, f64)> = hlines
        .iter()
        .filter(|(_, y)| y.is_finite() && *y > 0.0)
        .map(|(n, y)| (n.as_str(), *y))
        .collect();
    for &(_, y) in &hlines {
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        // No drawable point: an empty frame with a sensible range rather than a layout error.
        (x0, x1) = (0.0, 1.0);
    }
    if y0 > y1 {
        (y0, y1) = (1.0, 10.0);
    }
    // Margins so that end points and markers are not drawn on the frame.
    let pad = if x1 - x0 < 1e-9 {
        (x0.abs() * 0.1).max(1.0)
    } else {
        (x1 - x0) * 0.05
    };
    let (mut xa, xb) = (x0 - pad, x1 + pad);
    if x0 >= 0.0 {
        // Memory is never negative: do not show a negative axis part.
        xa = xa.max(0.0);
    }
    let (ya, yb) = (y0 / 1.15, y1 * 1.15);
    let (bold, light) = log_ticks(ya, yb);

    // plotters writes SVG font sizes as the given size / 1.24, hence the sizes below: about
    // 12 px tick labels, 13 px axis titles and 16 px for the title.
    let root = SVGBackend::with_string(buf, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            xa..xb,
            (ya..yb)
                .log_scale()
                .with_key_points(bold)
                .with_light_points(light),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(8)
        .max_light_lines(4)
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .bold_line_style(RGBColor(205, 205, 205))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    let grey = RGBColor(85, 85, 85);
    for &(name, y) in &hlines {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(xa, y), (xb, y)],
                6,
                4,
                grey.stroke_width(1),
            ))?
            .label(format!("{name} ({})", tick_label(y)))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (8, 0)], grey.stroke_width(1))
                    + PathElement::new(vec![(12, 0), (20, 0)], grey.stroke_width(1))
            });
    }
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = se.points.iter().copied().filter(drawable).collect();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(se.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
    }
    // Perplexity falls as memory grows, so the curves run from the upper left to the lower
    // right and the upper right corner is the emptiest place for the legend.
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .margin(10)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(150, 150, 150))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Tick positions for a log axis over `lo..hi`: the bold (labelled) ticks and the light grid
/// lines. The first mantissa set that gives at least three labels wins (1, then 1-2-5, then
/// 1-1.5-2-3-...-9); a range too narrow for those falls back to evenly spaced round numbers.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let in_range = |m: &[f64]| -> Vec<f64> {
        let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        let mut v = Vec::new();
        for e in e0..=e1 {
            for &k in m {
                // Dividing by 10^-e keeps 0.2, 0.05 ... exact to printing precision.
                let t = if e >= 0 {
                    k * 10f64.powi(e)
                } else {
                    k / 10f64.powi(-e)
                };
                if t >= lo && t <= hi {
                    v.push(t);
                }
            }
        }
        v
    };
    let all = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    for m in [
        &[1.0][..],
        &[1.0, 2.0, 5.0],
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ] {
        let bold = in_range(m);
        if bold.len() >= 3 {
            let light = in_range(&all)
                .into_iter()
                .filter(|t| !bold.contains(t))
                .collect();
            return (bold, light);
        }
    }
    let step = nice_step((hi - lo) / 5.0);
    let mut bold = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi && bold.len() < 20 {
        bold.push(t);
        t += step;
    }
    (bold, Vec::new())
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let k = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    k * mag
}

/// A tick label as a plain number without trailing zeros: `20`, `1.5`, `0.05`, `12000`.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// The exit status of a helper binary's `main`: success, or failure after printing the error
/// to stderr as `prefix: error` (one definition for the measurement binaries).
pub fn exit_status(
    prefix: &str,
    result: Result<(), Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prefix}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A progress callback for [`crate::perplexity::perplexity`] that prints
/// `label: window i/n running ppl …, elapsed, ETA` on one stderr line.
pub fn perplexity_progress(label: String) -> impl FnMut(&crate::perplexity::PerplexityProgress) {
    move |p| {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{label}: window {}/{} running ppl {:.3}, {:.0}s elapsed, ETA {:.0}s   ",
            p.windows_done,
            p.windows_total,
            p.running_ppl,
            p.elapsed.as_secs_f64(),
            p.eta.as_secs_f64()
        );
        if p.windows_done == p.windows_total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contents of the SVG's `<text>` elements (plotters writes each on its own line).
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..t.find("</text>")?];
                Some(body.trim().to_owned())
            })
            .collect()
    }

    #[test]
    fn plot_is_well_formed_svg_with_every_series_and_plain_log_ticks() {
        let svg = svg_plot(
            "t",
            "memory (MB = 10^6 bytes)",
            "perplexity (log scale)",
            &[
                Series {
                    name: "a<b".into(),
                    points: vec![(100.0, 400.0), (200.0, 20.0), (300.0, f64::NAN)],
                },
                Series {
                    name: "BitStack".into(),
                    points: vec![(120.0, 300.0), (250.0, 18.0), (260.0, -1.0)],
                },
            ],
            &[("orig".into(), 15.0)],
        )
        .expect("plot");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        let texts = texts(&svg);
        // Series names are escaped XML text; both series and the reference line are in the
        // legend, and the title and axis titles are drawn.
        for want in [
            "a&lt;b",
            "BitStack",
            "orig (15)",
            "t",
            "memory (MB = 10^6 bytes)",
            "perplexity (log scale)",
        ] {
            assert!(
                texts.iter().any(|t| t == want),
                "missing {want:?} in {texts:?}"
            );
        }
        // y spans 13..460: 1-2-5 ticks, written as plain numbers (no 1e2-style labels).
        for tick in ["20", "50", "100", "200"] {
            assert!(
                texts.iter().any(|t| t == tick),
                "missing y tick {tick} in {texts:?}"
            );
        }
        assert!(texts.iter().all(|t| !t.contains("e+") && !t.contains("e1")));
        // The legend's box (the translucent white rect) lies inside the 820 x 500 picture.
        let legend = svg
            .lines()
            .find(|l| l.starts_with("<rect") && l.contains(r#"opacity="0.85""#))
            .expect("legend box");
        let attr = |name: &str| -> f64 {
            let at = legend.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
            legend[at..]
                .split('"')
                .next()
                .and_then(|v| v.parse().ok())
                .expect(name)
        };
        assert!(
            attr("x") > 0.0 && attr("x") + attr("width") < 820.0,
            "{legend}"
        );
        assert!(
            attr("y") > 0.0 && attr("y") + attr("height") < 500.0,
            "{legend}"
        );
        // Two series drawn as polylines (plus the legend samples) with circle markers.
        assert!(svg.matches("<polyline").count() >= 2);
        assert_eq!(svg.matches("<circle").count(), 4);
    }

    #[test]
    fn plot_without_points_still_draws() {
        let svg = svg_plot("empty", "x", "y", &[], &[]).expect("plot");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let one = Series {
            name: "one".into(),
            points: vec![(5.0, 16.0)],
        };
        let svg = svg_plot("one point", "x", "y", &[one], &[]).expect("plot");
        assert!(texts(&svg).iter().any(|t| t == "one") && svg.contains("<circle"));
    }

    #[test]
    fn log_ticks_are_round_and_inside_the_range() {
        let (bold, light) = log_ticks(8.0, 1200.0);
        assert_eq!(bold, vec![10.0, 100.0, 1000.0]);
        assert!(light.contains(&20.0) && light.contains(&900.0) && !light.contains(&10.0));
        let (bold, _) = log_ticks(13.0, 70.0);
        // 1-2-5 gives only 20 and 50 here, so the finer set is used.
        assert_eq!(bold, vec![15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]);
        // Too narrow for any mantissa set: evenly spaced round numbers.
        let (bold, light) = log_ticks(15.1, 15.9);
        assert!(bold.len() >= 3 && light.is_empty());
        assert!(bold.iter().all(|t| (15.1..=15.9).contains(t)));
        let labels: Vec<String> = bold.iter().map(|t| tick_label(*t)).collect();
        assert!(labels.iter().all(|l| l.len() <= 5), "{labels:?}");
        assert_eq!(tick_label(0.05), "0.05");
        assert_eq!(tick_label(12000.0), "12000");
        assert_eq!(tick_label(1.5), "1.5");
    }

    #[test]
    fn table_renders() {
        let t = markdown_table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t.lines().count(), 3);
    }
}
