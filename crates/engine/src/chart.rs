//! Stacked bar charts as SVG, rendered on the server: the status page's rows deleted per task
//! and hour or day. No script; each bar carries its numbers as a tooltip (`<title>`) and as
//! `data-*` attributes.

use std::fmt::Write;

use retention_controller::human::thousands;

/// One bar: its label and the rows of each series (in the chart's series order).
pub struct Bar {
    /// Shown under the bar (every few bars) and in its tooltip.
    pub label: String,
    /// What `data-bucket` says: the bucket's start, RFC 3339.
    pub bucket: String,
    pub rows: Vec<u64>,
}

/// A series' colour, by its position: distinguishable, and readable on white.
pub const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 64.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 8.0;

/// A stacked bar chart of `bars`, one colour per name of `series`; `label_every` bars get
/// their label written under them.
pub fn stacked_bars(
    id: &str,
    title: &str,
    series: &[&str],
    bars: &[Bar],
    label_every: usize,
) -> String {
    let total = |bar: &Bar| bar.rows.iter().sum::<u64>();
    let max = bars.iter().map(total).max().unwrap_or(0);
    let top = nice_ceiling(max);
    let plot_height = HEIGHT - BOTTOM - TOP;
    let slot = (WIDTH - LEFT) / bars.len().max(1) as f64;
    let bar_width = (slot * 0.8).max(1.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg id="{id}" class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{title}"><title>{title}</title>"#
    );
    // Gridlines at 0, a half and the top, labelled.
    for step in 0..=2u64 {
        let value = top * step / 2;
        let y = TOP + plot_height - plot_height * step as f64 / 2.0;
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{WIDTH}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#555">{}</text>"##,
            LEFT - 6.0,
            y + 4.0,
            thousands(value)
        );
    }
    for (i, bar) in bars.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar_width) / 2.0;
        let mut base = TOP + plot_height;
        for (s, rows) in bar.rows.iter().enumerate().filter(|(_, rows)| **rows > 0) {
            let height = if top == 0 {
                0.0
            } else {
                plot_height * *rows as f64 / top as f64
            }
            .max(1.0);
            base -= height;
            let name = series.get(s).copied().unwrap_or("?");
            let _ = write!(
                svg,
                r#"<rect class="bar" x="{x:.1}" y="{base:.1}" width="{bar_width:.1}" height="{height:.1}" fill="{}" data-series="{name}" data-bucket="{}" data-rows="{rows}"><title>{}: {name}, {} rows</title></rect>"#,
                COLOURS[s % COLOURS.len()],
                bar.bucket,
                bar.label,
                thousands(*rows)
            );
        }
        if label_every > 0 && i % label_every == 0 {
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#555">{}</text>"##,
                x + bar_width / 2.0,
                HEIGHT - 6.0,
                bar.label
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The smallest of 1, 2 or 5 times a power of ten at or above `n` (0 stays 0).
fn nice_ceiling(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let mut power = 1u64;
    loop {
        for step in [1, 2, 5] {
            if step * power >= n {
                return step * power;
            }
        }
        power = power.saturating_mul(10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_at_a_round_number() {
        assert_eq!(nice_ceiling(0), 0);
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(1_234), 2_000);
        assert_eq!(nice_ceiling(2_598_000), 5_000_000);
    }

    #[test]
    fn bars_stack_their_series_and_skip_empty_ones() {
        let bars = vec![
            Bar {
                label: "10h".into(),
                bucket: "2026-11-29T10:00:00Z".into(),
                rows: vec![600, 0, 400],
            },
            Bar {
                label: "11h".into(),
                bucket: "2026-11-29T11:00:00Z".into(),
                rows: vec![0, 0, 0],
            },
        ];
        let svg = stacked_bars("c", "Rows", &["a", "b", "c"], &bars, 1);
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(
            svg.contains(r#"data-series="a" data-bucket="2026-11-29T10:00:00Z" data-rows="600""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"data-series="c" data-bucket="2026-11-29T10:00:00Z" data-rows="400""#),
            "{svg}"
        );
        // 1,000 rows fill the plot: 600 take 0.6 of its 150 px, 400 the rest above them.
        assert!(
            svg.contains(r#"y="68.0" width="262.4" height="90.0""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"y="8.0" width="262.4" height="60.0""#),
            "{svg}"
        );
        assert!(
            svg.contains(">1,000</text>") && svg.contains(">11h</text>"),
            "{svg}"
        );
    }
}
