//! Data printed as text (keys, reasons, values Loops sent, error messages) goes through
//! [`printable`], so that none of it can drive the terminal: a key holding `ESC [ 2 J` or a
//! carriage return is shown escaped, not obeyed. (`--json` needs none of this: JSON escapes
//! control characters itself.) Data written into the status page's HTML goes through [`html`]:
//! made printable the same way, then with HTML's special characters as entities, so that none
//! of it is markup.

use std::borrow::Cow;

/// `text` with every control character (C0, DEL, C1) and every bidirectional-text control
/// escaped as Rust writes it (`\u{1b}`, `\n`, `\r`, `\t`); other text is unchanged (and not
/// copied).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` as HTML text or a quoted attribute's value: [`printable`], then `&`, `<`, `>`, `"` and
/// `'` as entities.
pub fn html(text: &str) -> Cow<'_, str> {
    let shown = printable(text);
    if !shown.contains(['&', '<', '>', '"', '\'']) {
        return shown;
    }
    let mut out = String::with_capacity(shown.len() + 16);
    for c in shown.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A character that moves the cursor, changes the terminal's state, or reorders the text
/// around it.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_text_never_markup() {
        assert_eq!(
            html("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(html("a\u{202e}b\u{1b}"), "a\\u{202e}b\\u{1b}");
        assert!(matches!(
            html("ann@x.co 日本"),
            Cow::Borrowed("ann@x.co 日本")
        ));
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            printable("\u{1b}[31mred\u{1b}[0m"),
            "\\u{1b}[31mred\\u{1b}[0m"
        );
        assert_eq!(printable("a\rb\nc\td"), "a\\rb\\nc\\td");
        assert_eq!(
            printable("bell\u{7}del\u{7f}csi\u{9b}"),
            "bell\\u{7}del\\u{7f}csi\\u{9b}"
        );
        assert_eq!(printable("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        for kept in ["ann@x.co", "Zoë «quoted» \"x\" 'y' \\ 日本", ""] {
            assert!(
                matches!(printable(kept), Cow::Borrowed(t) if t == kept),
                "{kept}"
            );
        }
    }
}
