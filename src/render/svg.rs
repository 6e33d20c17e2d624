//! The few chart kinds the HTML report draws, as small functions that return inline SVG.
//!
//! Why our own and not `plotters`: these six chart kinds are a few hundred lines, the
//! output is byte-stable (every coordinate is printed with fixed decimals, nothing depends
//! on the machine, the time or a font file: text is measured by an estimate and drawn by
//! the browser in its own sans-serif), and the crate gains no dependency. plotters' SVG
//! backend would also need its text layout, which wants a font to measure with.
//!
//! Every chart is one `<svg>` with a `<title>` (the chart's title), a visible title, and
//! `class="axis-label"` texts naming its axes, so a test can find them.

use std::fmt::Write as _;

/// Colours of series, in order (Okabe-Ito-like, readable by colour-blind people).
pub const PALETTE: [&str; 8] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#7f7f7f", "#332288",
];

/// Lines between heat-map cells.
const GRID: &str = "#dddddd";

/// Width of every chart in pixels (two fit side by side on a 1280 px page).
pub const WIDTH: f64 = 600.0;

/// What every chart has: a title and the names of its axes.
#[derive(Debug, Clone)]
pub struct Axes {
    /// Shown above the chart and as the SVG's `<title>`.
    pub title: String,
    /// The horizontal axis' name (with its unit).
    pub x_label: String,
    /// The vertical axis' name (with its unit).
    pub y_label: String,
}

impl Axes {
    /// Axes from three strings.
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Axes {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
        }
    }
}

/// A line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points in drawing order; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (few points, e.g. one per epoch).
    pub dots: bool,
    /// Dashed line.
    pub dashed: bool,
}

/// A highlighted point of a series (p50 / p99 on a latency CDF).
#[derive(Debug, Clone)]
pub struct Marker {
    /// Index of the series it belongs to (its colour).
    pub series: usize,
    /// Where.
    pub x: f64,
    /// Where.
    pub y: f64,
    /// Short text beside it (`p50`).
    pub label: String,
}

/// Escapes text for SVG and HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for an axis tick or a label: few digits, no `-0`.
pub fn short(v: f64) -> String {
    let a = v.abs();
    let text = if v == 0.0 {
        "0".to_string()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    let trimmed = if text.contains('.') && !text.contains('e') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    if trimmed == "-0" {
        "0".into()
    } else {
        trimmed
    }
}

/// Tick positions covering `[lo, hi]` at a 1-2-5 step, about `count` of them, and the
/// range widened to the outer ticks.
fn ticks(lo: f64, hi: f64, count: usize) -> (Vec<f64>, f64, f64) {
    let (lo, hi) = if (hi - lo).abs() < 1e-12 {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / count.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor() * step;
    let last = (hi / step).ceil() * step;
    let n = ((last - first) / step).round() as usize;
    let values = (0..=n).map(|i| first + i as f64 * step).collect();
    (values, first, last)
}

/// The frame of a chart: plot area and the mapping of data to pixels.
struct Frame {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        self.left + (x - self.x.0) / (self.x.1 - self.x.0) * self.width
    }
    fn py(&self, y: f64) -> f64 {
        self.top + self.height - (y - self.y.0) / (self.y.1 - self.y.0) * self.height
    }
}

/// Opens an `<svg>` of `height` with its title and axis names.
fn open(out: &mut String, axes: &Axes, height: f64, kind: &str) {
    let _ = write!(
        out,
        r#"<svg class="chart {kind}" width="{WIDTH:.0}" height="{height:.0}" viewBox="0 0 {WIDTH:.0} {height:.0}" role="img"><title>{t}</title><text class="chart-title" x="{cx:.1}" y="18" text-anchor="middle">{t}</text>"#,
        t = escape(&axes.title),
        cx = WIDTH / 2.0,
    );
}

/// Axis names: x below the plot, y rotated at the left.
fn axis_names(out: &mut String, axes: &Axes, frame: &Frame) {
    let _ = write!(
        out,
        r#"<text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text class="axis-label" transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        frame.left + frame.width / 2.0,
        frame.top + frame.height + 34.0,
        escape(&axes.x_label),
        frame.top + frame.height / 2.0,
        escape(&axes.y_label),
    );
}

/// Grid lines and tick labels for numeric axes (`x_ticks` empty: none on x).
fn grid(out: &mut String, frame: &Frame, x_ticks: &[f64], y_ticks: &[f64]) {
    for &t in y_ticks {
        let y = frame.py(t);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            frame.left,
            frame.left + frame.width,
            frame.left - 4.0,
            y + 4.0,
            short(t)
        );
    }
    for &t in x_ticks {
        let x = frame.px(t);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}"/><text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            frame.top,
            frame.top + frame.height,
            frame.top + frame.height + 15.0,
            short(t)
        );
    }
    let _ = write!(
        out,
        r#"<rect class="frame" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/>"#,
        frame.left, frame.top, frame.width, frame.height
    );
}

/// Legend entries laid out in rows above the plot area: `(series index, x offset, row)`.
fn legend_layout(names: &[String], width: f64) -> Vec<(usize, f64, usize)> {
    // ~6.2 px per character at the legend's 11 px, plus the swatch and a gap.
    let (mut x, mut row) = (0.0, 0);
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let w = 6.2 * name.chars().count() as f64 + 24.0;
        if x > 0.0 && x + w > width {
            (x, row) = (0.0, row + 1);
        }
        out.push((i, x, row));
        x += w;
    }
    out
}

/// Extra rows a legend of `names` needs above the plot (0 when it fits on one).
fn legend_extra_rows(names: &[String], width: f64) -> usize {
    legend_layout(names, width)
        .last()
        .map_or(0, |&(_, _, row)| row)
}

/// The legend in rows from the top left of the plot area up.
fn legend(out: &mut String, names: &[String], frame: &Frame) {
    let layout = legend_layout(names, frame.width);
    let rows = layout.last().map_or(0, |l| l.2);
    for (i, dx, row) in layout {
        let y = frame.top - 14.0 - 14.0 * (rows - row) as f64;
        let _ = write!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text class="legend" x="{:.1}" y="{:.1}">{}</text>"#,
            frame.left + dx,
            y,
            PALETTE[i % PALETTE.len()],
            frame.left + dx + 13.0,
            y + 9.0,
            escape(&names[i])
        );
    }
}

/// A line chart of `series` (and `markers`), both axes numeric; `y_from_zero` starts the
/// y axis at 0.
pub fn line_chart(axes: &Axes, series: &[Series], markers: &[Marker], y_from_zero: bool) -> String {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .chain(markers.iter().map(|m| (m.x, m.y)))
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let names: Vec<String> = series.iter().map(|s| s.name.clone()).collect();
    let extra = 14.0 * legend_extra_rows(&names, WIDTH - 80.0) as f64;
    let mut out = String::new();
    let height = 300.0 + extra;
    open(&mut out, axes, height, "line");
    if all.is_empty() {
        let _ = write!(
            out,
            r#"<text class="empty" x="{:.1}" y="150" text-anchor="middle">no data points</text></svg>"#,
            WIDTH / 2.0
        );
        return out;
    }
    let fold = |f: fn(&(f64, f64)) -> f64| {
        all.iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
    };
    let (x_lo, x_hi) = fold(|p| p.0);
    let (mut y_lo, y_hi) = fold(|p| p.1);
    if y_from_zero {
        y_lo = y_lo.min(0.0);
    }
    let (xt, x0, x1) = ticks(x_lo, x_hi, 6);
    let (yt, y0, y1) = ticks(y_lo, y_hi, 5);
    let frame = Frame {
        left: 62.0,
        top: 42.0 + extra,
        width: WIDTH - 80.0,
        height: height - 92.0 - extra,
        x: (x0, x1),
        y: (y0, y1),
    };
    grid(&mut out, &frame, &xt, &yt);
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .filter(finite)
            .map(|&(x, y)| format!("{:.1},{:.1}", frame.px(x), frame.py(y)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.6"{dash} points="{}"/>"#,
            points.join(" ")
        );
        if s.dots {
            for p in &points {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = write!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
            }
        }
    }
    // Markers: the first label of a series (p50) a hollow circle, others (p99) a filled
    // square; their text only while few enough to stay readable.
    let labelled = markers.len() <= 6;
    for (k, m) in markers.iter().enumerate() {
        let colour = PALETTE[m.series % PALETTE.len()];
        let (x, y) = (frame.px(m.x), frame.py(m.y));
        let first = markers[..k].iter().all(|o| o.series != m.series);
        if first {
            let _ = write!(
                out,
                r#"<circle class="marker" cx="{x:.1}" cy="{y:.1}" r="4" fill="white" stroke="{colour}" stroke-width="2"><title>{}</title></circle>"#,
                escape(&m.label)
            );
        } else {
            let _ = write!(
                out,
                r#"<rect class="marker" x="{:.1}" y="{:.1}" width="7" height="7" fill="{colour}"><title>{}</title></rect>"#,
                x - 3.5,
                y - 3.5,
                escape(&m.label)
            );
        }
        if labelled {
            let _ = write!(
                out,
                r#"<text class="marker-label" x="{:.1}" y="{:.1}" fill="{colour}">{}</text>"#,
                x + 5.0,
                y - 5.0,
                escape(&m.label)
            );
        }
    }
    legend(&mut out, &names, &frame);
    axis_names(&mut out, axes, &frame);
    out.push_str("</svg>");
    out
}

/// Horizontal bars: a group per category, a bar per series (`None`: drawn as `n/a`).
/// Values are printed at the bars' ends with `label`.
pub fn bar_chart(
    axes: &Axes,
    categories: &[String],
    series: &[(String, Vec<Option<f64>>)],
    label: &dyn Fn(f64) -> String,
) -> String {
    let per_group = series.len().max(1);
    let bar = if per_group > 2 { 11.0 } else { 15.0 };
    let group = bar * per_group as f64 + 10.0;
    let longest = categories
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(0);
    let left = (6.2 * longest as f64 + 12.0).clamp(50.0, 260.0);
    let names: Vec<String> = series.iter().map(|s| s.0.clone()).collect();
    let extra = if series.len() > 1 {
        14.0 * legend_extra_rows(&names, WIDTH - left - 70.0) as f64
    } else {
        0.0
    };
    let height = 92.0 + extra + group * categories.len().max(1) as f64;
    let values: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .filter(|v| v.is_finite())
        .collect();
    let lo = values.iter().copied().fold(0.0f64, f64::min);
    let hi = values.iter().copied().fold(0.0f64, f64::max);
    let (xt, x0, x1) = ticks(lo, if hi > lo { hi } else { lo + 1.0 }, 5);
    let frame = Frame {
        left,
        top: 42.0 + extra,
        width: WIDTH - left - 70.0,
        height: height - 92.0 - extra,
        x: (x0, x1),
        y: (0.0, 1.0),
    };
    let mut out = String::new();
    open(&mut out, axes, height, "bars");
    grid(&mut out, &frame, &xt, &[]);
    for (c, name) in categories.iter().enumerate() {
        let top = frame.top + c as f64 * group + 5.0;
        let _ = write!(
            out,
            r#"<text class="category" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 5.0,
            top + bar * per_group as f64 / 2.0 + 4.0,
            escape(name)
        );
        for (s, (_, v)) in series.iter().enumerate() {
            let y = top + s as f64 * bar;
            match v.get(c).copied().flatten().filter(|v| v.is_finite()) {
                Some(value) => {
                    let (a, b) = (frame.px(0.0f64.max(x0)), frame.px(value));
                    let _ = write!(
                        out,
                        r#"<rect class="bar" x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}</title></rect><text class="value" x="{:.1}" y="{:.1}">{}</text>"#,
                        a.min(b),
                        (b - a).abs(),
                        bar - 2.0,
                        PALETTE[s % PALETTE.len()],
                        escape(&label(value)),
                        a.max(b) + 3.0,
                        y + bar - 4.0,
                        escape(&label(value))
                    );
                }
                None => {
                    let _ = write!(
                        out,
                        r#"<text class="value" x="{:.1}" y="{:.1}">n/a</text>"#,
                        frame.left + 3.0,
                        y + bar - 4.0
                    );
                }
            }
        }
    }
    if series.len() > 1 {
        legend(&mut out, &names, &frame);
    }
    axis_names(&mut out, axes, &frame);
    out.push_str("</svg>");
    out
}

/// Horizontal `[low, high]` segments per category on a log10 axis (weight scale ranges);
/// `None` or a non-positive bound is drawn as `n/a`.
pub fn range_chart(axes: &Axes, categories: &[String], ranges: &[Option<(f64, f64)>]) -> String {
    let valid = |r: &Option<(f64, f64)>| r.filter(|(a, b)| *a > 0.0 && *b > 0.0 && b.is_finite());
    let logs: Vec<f64> = ranges
        .iter()
        .filter_map(valid)
        .flat_map(|(a, b)| [a.log10(), b.log10()])
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min).floor();
    let hi = logs
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil();
    let (lo, hi) = if logs.is_empty() {
        (-3.0, 0.0)
    } else if hi <= lo {
        (lo, lo + 1.0)
    } else {
        (lo, hi)
    };
    let longest = categories
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(0);
    let left = (6.2 * longest as f64 + 12.0).clamp(50.0, 260.0);
    let row = 22.0;
    let height = 92.0 + row * categories.len().max(1) as f64;
    let frame = Frame {
        left,
        top: 42.0,
        width: WIDTH - left - 30.0,
        height: height - 92.0,
        x: (lo, hi),
        y: (0.0, 1.0),
    };
    let mut out = String::new();
    open(&mut out, axes, height, "ranges");
    for d in (lo as i64)..=(hi as i64) {
        let x = frame.px(d as f64);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}"/><text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">1e{d}</text>"#,
            frame.top,
            frame.top + frame.height,
            frame.top + frame.height + 15.0,
        );
    }
    let _ = write!(
        out,
        r#"<rect class="frame" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/>"#,
        frame.left, frame.top, frame.width, frame.height
    );
    for (c, name) in categories.iter().enumerate() {
        let y = frame.top + c as f64 * row + row / 2.0;
        let _ = write!(
            out,
            r#"<text class="category" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 5.0,
            y + 4.0,
            escape(name)
        );
        match ranges.get(c).and_then(valid) {
            Some((a, b)) => {
                let (xa, xb) = (frame.px(a.log10()), frame.px(b.log10()));
                let _ = write!(
                    out,
                    r#"<line class="range" x1="{xa:.1}" y1="{y:.1}" x2="{xb:.1}" y2="{y:.1}" stroke="{c0}" stroke-width="6"><title>{} .. {}</title></line><circle cx="{xa:.1}" cy="{y:.1}" r="3" fill="{c0}"/><circle cx="{xb:.1}" cy="{y:.1}" r="3" fill="{c0}"/>"#,
                    short(a),
                    short(b),
                    c0 = PALETTE[0]
                );
            }
            None => {
                let _ = write!(
                    out,
                    r#"<text class="value" x="{:.1}" y="{:.1}">n/a</text>"#,
                    frame.left + 3.0,
                    y + 4.0
                );
            }
        }
    }
    axis_names(&mut out, axes, &frame);
    out.push_str("</svg>");
    out
}

/// A confusion matrix (`matrix[true][predicted]`) as a heat map with the counts: the
/// diagonal in blue by the row's share, the rest in red by the largest off-diagonal count
/// (so the few mistakes stay visible beside thousands of hits).
pub fn heat_map(axes: &Axes, matrix: &[Vec<u64>]) -> String {
    let n = matrix.len().max(1);
    let cell = ((WIDTH - 120.0) / n as f64).min(44.0);
    let left = 70.0;
    let top = 42.0;
    let height = top + cell * n as f64 + 50.0;
    let max_off = matrix
        .iter()
        .enumerate()
        .flat_map(|(i, row)| {
            row.iter()
                .enumerate()
                .filter(move |(j, _)| *j != i)
                .map(|(_, v)| *v)
        })
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = String::new();
    open(&mut out, axes, height, "heatmap");
    for (i, row) in matrix.iter().enumerate() {
        let total = row.iter().sum::<u64>().max(1);
        let y = top + i as f64 * cell;
        let _ = write!(
            out,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{i}</text>"#,
            left - 4.0,
            y + cell / 2.0 + 4.0
        );
        for (j, &count) in row.iter().enumerate() {
            let x = left + j as f64 * cell;
            let (fill, strength) = if i == j {
                ("#0072b2", count as f64 / total as f64)
            } else {
                ("#d55e00", (count as f64 / max_off as f64).sqrt())
            };
            let opacity = if count == 0 {
                0.0
            } else {
                0.08 + 0.92 * strength
            };
            let text_class = if opacity > 0.55 {
                "count light"
            } else {
                "count"
            };
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{cell:.1}" height="{cell:.1}" fill="{fill}" fill-opacity="{opacity:.3}" stroke="{GRID}"><title>true {i}, predicted {j}: {count}</title></rect><text class="{text_class}" x="{:.1}" y="{:.1}" text-anchor="middle">{count}</text>"#,
                x + cell / 2.0,
                y + cell / 2.0 + 4.0,
            );
        }
    }
    for j in 0..n {
        let _ = write!(
            out,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">{j}</text>"#,
            left + j as f64 * cell + cell / 2.0,
            top + cell * n as f64 + 15.0
        );
    }
    let frame = Frame {
        left,
        top,
        width: cell * n as f64,
        height: cell * n as f64,
        x: (0.0, 1.0),
        y: (0.0, 1.0),
    };
    axis_names(&mut out, axes, &frame);
    out.push_str("</svg>");
    out
}

/// One artifact on the summary chart.
#[derive(Debug, Clone)]
pub struct Bubble {
    /// Printed beside it.
    pub label: String,
    /// Horizontal position.
    pub x: f64,
    /// Vertical position.
    pub y: f64,
    /// Drawn as the circle's area (relative to the largest); `None`: a small hollow ring.
    pub size: Option<f64>,
}

/// A scatter of labelled bubbles whose area shows a third figure (`size_name`).
pub fn bubble_chart(axes: &Axes, bubbles: &[Bubble], size_name: &str) -> String {
    let height = 380.0;
    let mut out = String::new();
    open(&mut out, axes, height, "bubbles");
    let points: Vec<&Bubble> = bubbles
        .iter()
        .filter(|b| b.x.is_finite() && b.y.is_finite())
        .collect();
    if points.is_empty() {
        let _ = write!(
            out,
            r#"<text class="empty" x="{:.1}" y="150" text-anchor="middle">no data points</text></svg>"#,
            WIDTH / 2.0
        );
        return out;
    }
    let fold = |f: fn(&Bubble) -> f64| {
        points
            .iter()
            .map(|b| f(b))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
    };
    let (x_lo, x_hi) = fold(|b| b.x);
    let (y_lo, y_hi) = fold(|b| b.y);
    let (xt, x0, x1) = ticks(0.0f64.min(x_lo), x_hi * 1.08, 6);
    let pad = ((y_hi - y_lo) * 0.15).max(0.05);
    let (yt, y0, y1) = ticks(y_lo - pad, y_hi + pad, 5);
    let frame = Frame {
        left: 62.0,
        top: 42.0,
        width: WIDTH - 80.0,
        height: height - 92.0,
        x: (x0, x1),
        y: (y0, y1),
    };
    grid(&mut out, &frame, &xt, &yt);
    let biggest = points.iter().filter_map(|b| b.size).fold(0.0f64, f64::max);
    let mut placed: Vec<(f64, f64, f64)> = Vec::new();
    for (i, b) in points.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let (x, y) = (frame.px(b.x), frame.py(b.y));
        let r = match b.size.filter(|_| biggest > 0.0) {
            Some(s) => 4.0 + 18.0 * (s / biggest).max(0.0).sqrt(),
            None => 4.0,
        };
        match b.size.filter(|_| biggest > 0.0) {
            Some(_) => {
                let _ = write!(
                    out,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r:.1}" fill="{colour}" fill-opacity="0.45" stroke="{colour}"/>"#
                );
            }
            None => {
                let _ = write!(
                    out,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="none" stroke="{colour}" stroke-width="2"/>"#
                );
            }
        }
        // The label right of the circle (left of it near the right edge), moved down a
        // line at a time while it would overlap one already placed.
        let w = 6.2 * b.label.chars().count() as f64;
        let right = x + r + 3.0 + w <= frame.left + frame.width;
        let x0 = if right { x + r + 3.0 } else { x - r - 3.0 - w };
        let mut ly = y + 4.0;
        for _ in 0..12 {
            let clash = placed
                .iter()
                .any(|&(px, py, pw)| (ly - py).abs() < 12.0 && x0 < px + pw && px < x0 + w);
            if !clash {
                break;
            }
            ly += 12.0;
        }
        placed.push((x0, ly, w));
        let _ = write!(
            out,
            r#"<text class="point-label" x="{x0:.1}" y="{ly:.1}" fill="{colour}">{}</text>"#,
            escape(&b.label)
        );
    }
    let _ = write!(
        out,
        r#"<text class="legend" x="{:.1}" y="{:.1}" text-anchor="end">circle area: {}</text>"#,
        frame.left + frame.width,
        frame.top - 5.0,
        escape(size_name)
    );
    axis_names(&mut out, axes, &frame);
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range_at_round_steps() {
        let (t, lo, hi) = ticks(0.13, 0.97, 5);
        assert_eq!((lo, hi), (0.0, 1.0));
        assert!((t[1] - 0.2).abs() < 1e-12, "{t:?}");
        let (t, lo, hi) = ticks(5.0, 5.0, 5);
        assert!(lo < 5.0 && hi > 5.0 && t.len() >= 2);
    }

    #[test]
    fn charts_are_byte_stable_and_escape_text() {
        let axes = Axes::new("a <b>", "x", "y");
        let series = [Series {
            name: "s&t".into(),
            points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0)],
            dots: true,
            dashed: false,
        }];
        let one = line_chart(&axes, &series, &[], true);
        assert_eq!(one, line_chart(&axes, &series, &[], true));
        assert!(one.contains("<title>a &lt;b&gt;</title>") && one.contains("s&amp;t"));
        assert!(!one.contains("NaN"));
        let bars = bar_chart(
            &axes,
            &["l1".into(), "l2".into()],
            &[("v".into(), vec![Some(2.0), None])],
            &|v| format!("{v:.1}"),
        );
        assert!(bars.contains(">2.0</text>") && bars.contains(">n/a</text>"));
    }

    #[test]
    fn short_numbers_drop_trailing_zeros() {
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(20.0), "20");
        assert_eq!(short(12345.0), "12345");
        assert_eq!(short(-0.0), "0");
        assert_eq!(short(2e-5), "2.0e-5");
    }
}
