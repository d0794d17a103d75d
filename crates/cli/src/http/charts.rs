//! The status page's charts, as inline SVG written on the server: no script. A bar chart is
//! small multiples, one row of bars per series and one bar per run (oldest left), each row on
//! its own scale, so a series of a few records is not flattened by one of thousands; every bar
//! carries its value in a `<title>` (shown on hover). A line chart has one point per run.

use super::html::Html;

/// One row of a bar chart.
pub struct Series {
    /// Its name, shown at the row's left.
    pub label: String,
    /// The bars' colour: a class of the style sheet (`s-added`, …).
    pub class: &'static str,
    /// One value per run, in the order of the runs.
    pub values: Vec<i64>,
}

const LABEL_WIDTH: i64 = 170;
const CELL: i64 = 14;
const BAR: i64 = 10;
const ROW: i64 = 34;
const BAR_HEIGHT: f64 = 24.0;
/// The longest label shown, in characters (the whole one is in the bars' titles).
const LABEL_CHARS: usize = 28;

fn width(runs: usize) -> i64 {
    LABEL_WIDTH + (runs.max(1) as i64) * CELL + 60
}

/// A bar chart of class `kind` (`records`, `requests`, `reasons`): `series` over `runs` (their
/// ids), each value said with `unit`.
pub fn bars(h: &mut Html, kind: &'static str, runs: &[i64], series: &[Series], unit: &'static str) {
    let height = (series.len().max(1) as i64) * ROW + 16;
    let width = width(runs.len());
    h.raw("<svg class=\"chart ")
        .raw(kind)
        .raw("\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\" width=\"")
        .num(width)
        .raw("\" height=\"")
        .num(height)
        .raw("\" viewBox=\"0 0 ")
        .num(width)
        .raw(" ")
        .num(height)
        .raw("\">");
    if series.is_empty() {
        h.raw("<text x=\"0\" y=\"20\">none</text>");
    }
    for (row, s) in series.iter().enumerate() {
        let top = row as i64 * ROW;
        let base = top as f64 + 4.0 + BAR_HEIGHT;
        let max = s.values.iter().copied().max().unwrap_or(0).max(0);
        // The scale: a row of zeros is flat, not divided by zero.
        let scale = max.max(1);
        let label: String = s.label.chars().take(LABEL_CHARS).collect();
        h.raw("<g class=\"series\"><text x=\"0\" y=\"")
            .dec(base)
            .raw("\">")
            .text(&label);
        if s.label.chars().count() > LABEL_CHARS {
            h.raw("…");
        }
        h.raw("</text>");
        h.raw("<line class=\"axis\" x1=\"")
            .num(LABEL_WIDTH)
            .raw("\" x2=\"")
            .num(LABEL_WIDTH + runs.len() as i64 * CELL)
            .raw("\" y1=\"")
            .dec(base)
            .raw("\" y2=\"")
            .dec(base)
            .raw("\"/>");
        for (i, (run, value)) in runs.iter().zip(&s.values).enumerate() {
            let tall = (*value).max(0) as f64 / scale as f64 * BAR_HEIGHT;
            h.raw("<rect class=\"bar ")
                .raw(s.class)
                .raw("\" x=\"")
                .num(LABEL_WIDTH + i as i64 * CELL)
                .raw("\" y=\"")
                .dec(base - tall)
                .raw("\" width=\"")
                .num(BAR)
                .raw("\" height=\"")
                .dec(tall)
                .raw("\"><title>run ")
                .num(*run)
                .raw(": ")
                .num(*value)
                .raw(" ")
                .raw(unit)
                .raw(" · ")
                .text(&s.label)
                .raw("</title></rect>");
        }
        h.raw("<text class=\"max\" x=\"")
            .num(LABEL_WIDTH + runs.len() as i64 * CELL + 6)
            .raw("\" y=\"")
            .dec(top as f64 + 14.0)
            .raw("\">")
            .num(max)
            .raw("</text></g>");
    }
    run_ids(h, runs, height - 2);
    h.raw("</svg>");
}

/// Which runs the chart shows, under the labels: `runs 12 to 41`, oldest left.
fn run_ids(h: &mut Html, runs: &[i64], y: i64) {
    if let (Some(first), Some(last)) = (runs.first(), runs.last()) {
        h.raw("<text class=\"runs\" x=\"0\" y=\"").num(y);
        if first == last {
            h.raw("\">run ").num(*first);
        } else {
            h.raw("\">runs ")
                .num(*first)
                .raw(" to ")
                .num(*last)
                .raw(", oldest left");
        }
        h.raw("</text>");
    }
}

/// A line chart of class `kind` (`durations`): one point per run that has a value, in seconds.
pub fn line(h: &mut Html, kind: &'static str, runs: &[i64], seconds: &[Option<f64>]) {
    const HEIGHT: f64 = 90.0;
    let width = width(runs.len());
    let max = seconds
        .iter()
        .flatten()
        .copied()
        .fold(0.0_f64, f64::max)
        .max(0.001);
    let point = |i: usize, s: f64| {
        (
            (LABEL_WIDTH + i as i64 * CELL + BAR / 2) as f64,
            8.0 + (1.0 - s / max) * (HEIGHT - 24.0),
        )
    };
    h.raw("<svg class=\"chart ")
        .raw(kind)
        .raw("\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\" width=\"")
        .num(width)
        .raw("\" height=\"")
        .dec(HEIGHT)
        .raw("\" viewBox=\"0 0 ")
        .num(width)
        .raw(" ")
        .dec(HEIGHT)
        .raw("\"><text x=\"0\" y=\"20\">seconds</text><text class=\"max\" x=\"")
        .num(LABEL_WIDTH + runs.len() as i64 * CELL + 6)
        .raw("\" y=\"14\">")
        .dec(max)
        .raw("</text><polyline class=\"line\" points=\"");
    for (i, s) in seconds.iter().enumerate() {
        if let Some(s) = s {
            let (x, y) = point(i, *s);
            h.dec(x).raw(",").dec(y).raw(" ");
        }
    }
    h.raw("\"/>");
    for (i, (run, s)) in runs.iter().zip(seconds).enumerate() {
        if let Some(s) = s {
            let (x, y) = point(i, *s);
            h.raw("<circle class=\"point\" cx=\"")
                .dec(x)
                .raw("\" cy=\"")
                .dec(y)
                .raw("\" r=\"3\"><title>run ")
                .num(*run)
                .raw(": ")
                .dec(*s)
                .raw(" s</title></circle>");
        }
    }
    run_ids(h, runs, HEIGHT as i64 - 2);
    h.raw("</svg>");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One bar per series and run, the tallest of a row at full height; a label is text, never
    /// markup.
    #[test]
    fn bars_are_one_per_series_and_run() {
        let mut h = Html::default();
        let series = [
            Series {
                label: "added".into(),
                class: "s-added",
                values: vec![0, 4, 2],
            },
            Series {
                label: "<b>invalid</b>".into(),
                class: "s-invalid",
                values: vec![1, 0, 0],
            },
        ];
        bars(&mut h, "records", &[7, 8, 9], &series, "records");
        let svg = h.into_string();
        assert_eq!(svg.matches("<rect class=\"bar").count(), 6, "{svg}");
        assert!(
            svg.contains("height=\"24.0\"><title>run 8: 4 records · added</title>"),
            "{svg}"
        );
        assert!(
            svg.contains("&lt;b&gt;invalid&lt;/b&gt;") && !svg.contains("<b>"),
            "{svg}"
        );
    }

    /// One point per run with a duration.
    #[test]
    fn a_line_has_a_point_per_run_with_a_value() {
        let mut h = Html::default();
        line(
            &mut h,
            "durations",
            &[1, 2, 3],
            &[Some(1.5), None, Some(3.0)],
        );
        let svg = h.into_string();
        assert_eq!(svg.matches("<circle class=\"point\"").count(), 2, "{svg}");
        assert!(svg.contains("<title>run 3: 3.0 s</title>"), "{svg}");
    }
}
