//! What the commands print on stdout. Every write goes through here, so that a reader that
//! stops early (`loopsync plan | head -1`) ends the printing, not the command: the rest of the
//! output is dropped and the command finishes its work (a run is not abandoned because its
//! report has no reader). And every `--json` document has one envelope (docs/json.md):
//! `{"version": 1, "command": "…", "data": …}`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// The version of every `--json` document's schema (docs/json.md). A field added keeps it; a
/// field removed or changed in meaning bumps it.
pub const VERSION: u32 = 1;

/// Set when stdout's reader went away: nothing more is written.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Standard output that drops what its reader no longer reads.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if CLOSED.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        match io::stdout().lock().write(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                CLOSED.store(true, Ordering::Relaxed);
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if CLOSED.load(Ordering::Relaxed) {
            return Ok(());
        }
        match io::stdout().lock().flush() {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                CLOSED.store(true, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }
}

/// Writes `text` to stdout (see [`Stdout`]); another failure to write is said on stderr once.
pub fn write(text: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let mut out = Stdout;
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        crate::logs::error(&format!("cannot write to stdout: {e}"));
    }
}

/// `println!` through [`write`].
#[macro_export]
macro_rules! say {
    () => {
        $crate::output::write("\n")
    };
    ($($arg:tt)*) => {
        $crate::output::write(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`write`].
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => {
        $crate::output::write(&format!($($arg)*))
    };
}

/// The envelope of every `--json` document.
#[derive(Debug, Serialize)]
pub struct Versioned<'a, T: Serialize> {
    /// [`VERSION`].
    pub version: u32,
    /// The command, as typed: `run`, `dlq list`, ….
    pub command: &'a str,
    /// What the command reports (docs/json.md, per command).
    pub data: T,
}

impl<'a, T: Serialize> Versioned<'a, T> {
    pub fn new(command: &'a str, data: T) -> Versioned<'a, T> {
        Versioned {
            version: VERSION,
            command,
            data,
        }
    }
}

/// Prints `data` as the one JSON document of `command` (indented).
pub fn json<T: Serialize>(command: &str, data: &T) -> serde_json::Result<()> {
    let text = serde_json::to_string_pretty(&Versioned::new(command, data))?;
    write(&format!("{text}\n"));
    Ok(())
}

/// Prints `data` as one line of JSON Lines (`run` following its schedules: one per run).
pub fn json_line<T: Serialize>(command: &str, data: &T) -> serde_json::Result<()> {
    let text = serde_json::to_string(&Versioned::new(command, data))?;
    write(&format!("{text}\n"));
    Ok(())
}

/// How records are listed: keys that are whole numbers by their value (2 before 10), then the
/// others by their text. (The state orders keys by their bytes, as the diff merges them.)
pub fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    let number = |k: &str| k.parse::<i128>().ok();
    match (number(a), number(b)) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_keys_are_listed_by_value() {
        let mut keys = vec!["10", "b", "2", "-1", "a", "1", "02"];
        keys.sort_by(|a, b| key_order(a, b));
        assert_eq!(keys, ["-1", "1", "02", "2", "10", "a", "b"]);
    }

    #[test]
    fn every_document_has_the_envelope() {
        let text = serde_json::to_string(&Versioned::new("runs", vec![1, 2])).unwrap();
        assert_eq!(text, r#"{"version":1,"command":"runs","data":[1,2]}"#);
    }
}
