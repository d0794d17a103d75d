//! Log lines on stderr, and what may reach them: loopsync's own lines as `LOOPSYNC_LOG` says,
//! every other crate's (the drivers) at `warn` at most unless `LOOPSYNC_LOG_PERSONAL_DATA=1`.
//! And the lines the commands say to the person at the terminal ([`info`], [`warn`],
//! [`error`]: notices, progress, errors): plain text, or under `--log-format json` JSON objects
//! like every log line, so that stderr is one JSON object per line.
//!
//! A driver logs what passes through it at `debug` and `trace`: tokio-postgres a statement's
//! bound parameters, the HTTP and NATS clients bodies and headers — emails, names, whatever the
//! model maps. loopsync's own lines never carry a record's values, and name a record by
//! [`loopsync_core::keys::log_key`], not its key.

use std::sync::OnceLock;

use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The switch that lets other crates' lines through at any level `LOOPSYNC_LOG` asks for.
pub const PERSONAL_DATA: &str = "LOOPSYNC_LOG_PERSONAL_DATA";

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The format chosen by `--log-format` ([`init`]).
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The target of the lines said to the user under `--log-format json` ([`say`]): never
/// filtered out (they are what the text format prints whatever `LOOPSYNC_LOG` says).
const NOTICE: &str = "loopsync::notice";

/// Log lines on stderr, filtered by `LOOPSYNC_LOG` (default `warn`) and [`keeps`]: text,
/// coloured only on a terminal, or JSON (one object per line).
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let _ = FORMAT.set(format);
    let mut unreadable = None;
    let filter = match std::env::var("LOOPSYNC_LOG") {
        Ok(text) => EnvFilter::try_new(&text).unwrap_or_else(|e| {
            unreadable = Some(format!(
                "LOOPSYNC_LOG=\"{text}\" is not a filter ({e}); using `warn`"
            ));
            EnvFilter::new("warn")
        }),
        Err(_) => EnvFilter::new("warn"),
    };
    let personal_data = std::env::var(PERSONAL_DATA).is_ok_and(|v| switched_on(&v));
    let drivers = filter_fn(move |meta| keeps(meta.target(), meta.level(), personal_data));
    let notices = filter_fn(|meta| meta.target() == NOTICE);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Json => layer.json().with_current_span(false).boxed(),
        LogFormat::Text => layer.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    // `init` also bridges the `log` crate (tokio-postgres, rustls, mysql_async log through it),
    // so the same filter judges its records.
    tracing_subscriber::registry()
        .with(layer.with_filter(filter.and(drivers).or(notices)))
        .init();
    if let Some(line) = unreadable {
        warn(&line);
    }
}

/// Whether stderr takes JSON lines only (`--log-format json`): no progress bar, no spinner.
pub fn is_json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// What a line said to the user is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    Info,
    Warning,
    Error,
}

/// A line for the user on stderr: a notice, a progress line, a warning, an error. Under
/// `--log-format text`, the text itself (`warning: ` or `error: ` before it); under `json`, a
/// JSON object like every log line (level, and the text as `fields.message`), whatever
/// `LOOPSYNC_LOG` says. Never a record's values (the callers say keys escaped, or none).
pub fn say(said: Said, text: &str) {
    if !is_json() {
        match said {
            Said::Info => eprintln!("{text}"),
            Said::Warning => eprintln!("warning: {text}"),
            Said::Error => eprintln!("error: {text}"),
        }
        return;
    }
    match said {
        Said::Info => tracing::info!(target: "loopsync::notice", "{text}"),
        Said::Warning => tracing::warn!(target: "loopsync::notice", "{text}"),
        Said::Error => tracing::error!(target: "loopsync::notice", "{text}"),
    }
}

/// [`say`] a notice.
pub fn info(text: &str) {
    say(Said::Info, text);
}

/// [`say`] a warning.
pub fn warn(text: &str) {
    say(Said::Warning, text);
}

/// [`say`] an error.
pub fn error(text: &str) {
    say(Said::Error, text);
}

/// A line an engine hands over whole (`error: …` included): said at its level.
pub fn line(text: &str) {
    match (text.strip_prefix("error: "), text.strip_prefix("warning: ")) {
        (Some(rest), _) => error(rest),
        (_, Some(rest)) => warn(rest),
        _ => info(text),
    }
}

/// Whether a line of `target` at `level` may be written: loopsync's own always (as far as
/// `LOOPSYNC_LOG` goes), another crate's at `warn` or above, or at any level with the switch.
fn keeps(target: &str, level: &Level, personal_data: bool) -> bool {
    personal_data || target.starts_with("loopsync") || *level <= Level::WARN
}

/// `1`, `true` or `yes` turn [`PERSONAL_DATA`] on; anything else leaves it off.
fn switched_on(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver's debug and trace lines (bound parameters, bodies) are dropped whatever the
    /// filter says, its warnings kept; loopsync's own lines are the filter's to judge; the
    /// switch lets everything through.
    #[test]
    fn drivers_say_no_more_than_warnings_unless_switched_on() {
        for driver in [
            "tokio_postgres::query",
            "async_nats",
            "reqwest::connect",
            "rustls",
        ] {
            assert!(!keeps(driver, &Level::DEBUG, false), "{driver}");
            assert!(!keeps(driver, &Level::TRACE, false), "{driver}");
            assert!(!keeps(driver, &Level::INFO, false), "{driver}");
            assert!(keeps(driver, &Level::WARN, false), "{driver}");
            assert!(keeps(driver, &Level::ERROR, false), "{driver}");
            assert!(keeps(driver, &Level::TRACE, true), "{driver}");
        }
        for ours in ["loopsync", "loopsync_bus::worker", "loopsync_engine::runs"] {
            assert!(keeps(ours, &Level::TRACE, false), "{ours}");
        }
        assert!(switched_on("1") && switched_on("true") && switched_on(" YES "));
        assert!(!switched_on("0") && !switched_on("") && !switched_on("no"));
    }
}
