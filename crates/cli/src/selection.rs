//! The flags that choose failed records — `--sync`, `--reason`, `--since`, `--key`, and
//! `--json` — shared by `dlq list|replay|park|unpark` and `rejections accept|unaccept`, read
//! into the engine's one filter (`loopsync_engine::selection::Filter`).

use clap::Args;
use loopsync_engine::selection;

use crate::common::UsageError;

/// Which records.
#[derive(Debug, Clone, Args)]
pub struct Filter {
    /// Only this sync's.
    #[arg(long)]
    pub sync: Option<String>,
    /// Only those whose reason contains this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only those whose outcome was recorded at or after this time (RFC 3339, or a date:
    /// 2026-11-28).
    #[arg(long)]
    pub since: Option<String>,
    /// Only this record (repeatable).
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// Print JSON on stdout (docs/json.md).
    #[arg(long)]
    pub json: bool,
}

impl Filter {
    /// The engine's filter; a `--since` that is not a time is a usage error.
    pub fn selection(&self) -> Result<selection::Filter, UsageError> {
        let since = match self.since.as_deref() {
            None => None,
            Some(text) => Some(selection::parse_since(text).ok_or_else(|| {
                UsageError(format!(
                    "--since \"{text}\": not a time (2026-11-28 or 2026-11-28T10:00:00Z)"
                ))
            })?),
        };
        Ok(selection::Filter {
            sync: self.sync.clone(),
            reason: self.reason.clone(),
            since,
            keys: self.keys.clone(),
        })
    }

    /// The flags given, as typed (for a message that says nothing matched them).
    pub fn described(&self) -> String {
        let mut flags = Vec::new();
        if let Some(sync) = &self.sync {
            flags.push(format!("--sync {sync}"));
        }
        if let Some(reason) = &self.reason {
            flags.push(format!("--reason {reason:?}"));
        }
        if let Some(since) = &self.since {
            flags.push(format!("--since {since}"));
        }
        for key in &self.keys {
            flags.push(format!("--key {key}"));
        }
        if flags.is_empty() {
            "no filter".to_owned()
        } else {
            flags.join(" ")
        }
    }
}
