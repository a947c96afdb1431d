//! Small reporting helpers for the CLI: progress lines with an ETA, markdown tables, and an
//! SVG line plot (hand-written so the tool needs no plotting dependency).

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

/// An SVG line plot with a logarithmic y axis (perplexity spans orders of magnitude) and
/// optional horizontal reference lines (e.g. the original model).
pub fn svg_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hlines: &[(String, f64)],
) -> String {
    let (w, h, ml, mr, mt, mb) = (760.0, 480.0, 70.0, 180.0, 40.0, 50.0);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    for (_, y) in hlines {
        if *y > 0.0 && y.is_finite() {
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 1.0, 10.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let (ly0, ly1) = (y0.ln() - 0.05, (y1.ln() + 0.05).max(y0.ln() + 0.1));
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let py = |y: f64| mt + (ly1 - y.ln()) / (ly1 - ly0) * (h - mt - mb);
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (w - mr + ml) / 2.0,
        xml(title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        w - ml - mr,
        h - mt - mb
    );
    for i in 0..=5 {
        let x = x0 + (x1 - x0) * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#,
            px(x),
            h - mb + 16.0,
            x
        );
        let ly = ly0 + (ly1 - ly0) * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{:.1}</text><line x1="{ml}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            ml - 6.0,
            py(ly.exp()) + 4.0,
            ly.exp(),
            w - mr,
            py(ly.exp()),
            py(ly.exp())
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (w - mr + ml) / 2.0,
        h - 12.0,
        xml(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        h / 2.0,
        h / 2.0,
        xml(y_label)
    );
    let mut legend_y = mt + 10.0;
    for (name, y) in hlines {
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#555" stroke-dasharray="6 4"/>"##,
            w - mr,
            py(*y),
            py(*y)
        );
        let _ = writeln!(
            s,
            r##"<line x1="{}" x2="{}" y1="{legend_y}" y2="{legend_y}" stroke="#555" stroke-dasharray="6 4"/><text x="{}" y="{}">{}</text>"##,
            w - mr + 10.0,
            w - mr + 34.0,
            w - mr + 40.0,
            legend_y + 4.0,
            xml(name)
        );
        legend_y += 18.0;
    }
    for (i, se) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = se
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for p in &path {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{legend_y}" y2="{legend_y}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            w - mr + 10.0,
            w - mr + 34.0,
            w - mr + 40.0,
            legend_y + 4.0,
            xml(&se.name)
        );
        legend_y += 18.0;
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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

    #[test]
    fn plot_and_table_render() {
        let svg = svg_plot(
            "t",
            "MB",
            "ppl",
            &[Series {
                name: "a<b".into(),
                points: vec![(1.0, 100.0), (2.0, 20.0), (3.0, f64::NAN)],
            }],
            &[("orig".into(), 15.0)],
        );
        assert!(svg.starts_with("<svg") && svg.contains("a&lt;b") && svg.contains("polyline"));
        let t = markdown_table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t.lines().count(), 3);
    }
}
