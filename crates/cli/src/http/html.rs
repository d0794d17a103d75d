//! The status page's HTML, written by one small builder, [`Html`], so that nothing read from the
//! state can become markup: markup is only ever a `&'static str` of this binary, every other
//! text is escaped ([`crate::escape::html`]), and numbers are written as numbers. The page's
//! frame (head, style sheet, header) and its style sheet are here too.

use std::fmt::Display;

use crate::escape;

/// HTML being written.
#[derive(Debug, Default)]
pub struct Html(String);

/// What [`Html::num`] writes: numbers only.
pub trait Number: Display {}
impl Number for i64 {}
impl Number for u64 {}
impl Number for usize {}
impl Number for u16 {}
impl Number for i32 {}

impl Html {
    /// Markup of this binary's own.
    pub fn raw(&mut self, markup: &'static str) -> &mut Html {
        self.0.push_str(markup);
        self
    }

    /// Text (or a quoted attribute's value), escaped.
    pub fn text(&mut self, text: &str) -> &mut Html {
        self.0.push_str(&escape::html(text));
        self
    }

    /// A whole number.
    pub fn num(&mut self, n: impl Number) -> &mut Html {
        self.0.push_str(&n.to_string());
        self
    }

    /// A number with one decimal (a coordinate, seconds).
    pub fn dec(&mut self, x: f64) -> &mut Html {
        let x = if x.is_finite() { x } else { 0.0 };
        self.0.push_str(&format!("{x:.1}"));
        self
    }

    /// `text`, or `-` when there is none.
    pub fn opt(&mut self, text: Option<&str>) -> &mut Html {
        self.text(text.unwrap_or("-"))
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// The page's frame: `title` in the head, the header with the sign-in state, then `body`.
pub fn page(title: &str, signed_in: bool, refresh: bool, body: Html) -> String {
    let mut h = Html::default();
    h.raw("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    if refresh {
        h.raw("<meta http-equiv=\"refresh\" content=\"30\">");
    }
    h.raw("<title>")
        .text(title)
        .raw(" · loopsync</title><link rel=\"stylesheet\" href=\"/style.css\"></head><body>")
        .raw("<header><a class=\"home\" href=\"/\">loopsync</a>");
    if signed_in {
        h.raw(
            "<form class=\"signout\" method=\"post\" action=\"/logout\">\
             <button type=\"submit\">sign out</button></form>",
        );
    }
    h.raw("</header><main>")
        .raw_owned(body)
        .raw("</main></body></html>\n");
    h.into_string()
}

impl Html {
    /// Another builder's HTML (built by the same rules).
    pub fn raw_owned(&mut self, other: Html) -> &mut Html {
        self.0.push_str(&other.0);
        self
    }
}

/// The style sheet (`/style.css`): the page has no inline style, so its Content-Security-Policy
/// allows styles from this one file only.
pub const STYLE: &str = "\
:root { --ok: #2e7d32; --warn: #b26a00; --bad: #c62828; --muted: #666; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { display: flex; justify-content: space-between; align-items: center;
  padding: .6em 1.5em; background: #263238; }
header a.home { color: #fff; font-weight: 600; text-decoration: none; }
header button { font: inherit; }
main { padding: 1em 1.5em; max-width: 1100px; }
section.sync { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5em 1.2em 1em;
  margin-bottom: 1.5em; }
dl.status { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1.2em; }
dl.status dt { color: var(--muted); }
dl.status dd { margin: 0; }
.st-succeeded, .st-adopted { color: var(--ok); font-weight: 600; }
.st-degraded, .st-interrupted { color: var(--warn); font-weight: 600; }
.st-failed { color: var(--bad); font-weight: 600; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: .25em .8em .25em 0; border-bottom: 1px solid #eee; vertical-align: top; }
.error { color: var(--bad); }
.muted { color: var(--muted); }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1em; }
svg.chart { background: #fff; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #444; }
svg.chart line.axis { stroke: #bbb; }
rect.bar { fill: #90a4ae; }
rect.s-added { fill: #43a047; } rect.s-changed { fill: #1e88e5; } rect.s-removed { fill: #8e24aa; }
rect.s-unchanged { fill: #b0bec5; } rect.s-invalid { fill: #fb8c00; } rect.s-rejected { fill: #e53935; }
rect.s-dead_lettered { fill: #6d4c41; } rect.s-requests { fill: #3949ab; } rect.s-retries { fill: #00897b; }
rect.s-rate_limited { fill: #d81b60; } rect.s-reason { fill: #f4511e; }
polyline.line { fill: none; stroke: #3949ab; stroke-width: 1.5; }
circle.point { fill: #3949ab; }
form.token input { font: inherit; padding: .3em; width: 22em; }
form.lookup { margin: 1em 0; }
";
