//! Deterministic keys. Never random, never a clock, never an attempt number: a redelivered
//! message, a retry and another replica all derive the same key from the same record.

use sha2::{Digest, Sha256};

fn digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        // A separator that cannot occur in text, so ("ab","c") ≠ ("a","bc").
        hasher.update([0u8]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 64 bits of the digest of `text`, as a signed integer (an SQL `bigint`).
pub fn seed(text: &str) -> i64 {
    let hex = &digest(&[text])[..16];
    u64::from_str_radix(hex, 16).expect("hex digits") as i64
}

/// A short stable name for one record of one sync, safe as a NATS subject token or KV key.
pub fn record_id(sync: &str, key: &str) -> String {
    digest(&[sync, key])[..32].to_owned()
}

/// A record as a log line names it: 12 hex digits of its [`record_id`], never the key itself
/// (often an email or a user id). The same for every process and run, so the lines about one
/// record can be found together, and matched with a record whose sync and key are known.
pub fn log_key(sync: &str, key: &str) -> String {
    record_id(sync, key)[..12].to_owned()
}

/// The Loops `Idempotency-Key` of one change of a record → 68 characters (Loops allows 100).
///
/// A change is the step from the record's confirmed *generation* (how many changes Loops has
/// confirmed for it, removals included) to a new fingerprint. Every retry and redelivery of the
/// change, and a later run that sends it again because it was never confirmed, derive the same
/// key; every later change — a value that goes back, a row that returns after a removal — has
/// another generation, so another key. `installation` scopes the key to one state (a dropped and
/// re-created state starts again at generation 0 with a new installation). `purpose` tells apart
/// two effects of one change.
pub fn idempotency_key(
    installation: &str,
    sync: &str,
    key: &str,
    generation: i64,
    fingerprint: &str,
    purpose: &str,
) -> String {
    let generation = generation.to_string();
    format!(
        "ls2-{}",
        digest(&[installation, sync, key, &generation, fingerprint, purpose])
    )
}

/// The Loops `Idempotency-Key` of one event of an event sync (`behavior = "append"`) → 68
/// characters. Derived from the sync and the event's id alone: every retry, redelivery,
/// re-extraction — and a later run after the state was reset — derives the same key, so Loops
/// takes the event once (within its 24 hours of keys; beyond them, the sync's state does).
pub fn event_key(sync: &str, event_id: &str) -> String {
    format!("ev1-{}", digest(&[sync, event_id]))
}

/// Whether `key` is an event sync's ([`event_key`]): the same for the life of the sync, even
/// after a `reset`, which sends the events again on purpose (Loops refuses those of its last 24
/// hours).
pub fn is_event_key(key: &str) -> bool {
    key.starts_with("ev1-")
}

/// The loader's ledger key of one record of one sync of one installation.
pub fn ledger_key(installation: &str, sync: &str, key: &str) -> String {
    digest(&[installation, sync, key])[..40].to_owned()
}

/// The `Nats-Msg-Id` of a message on `hop` about one record version in one run.
///
/// It carries the run id as well as (sync, key, fingerprint): a record that failed is sent
/// again by the next run with the same fingerprint, and JetStream would otherwise drop that
/// message as a duplicate if the next run starts within the duplicate window. Within one run
/// the id is stable, so a stage that crashes between publishing and acking republishes harmlessly.
///
/// Run ids are per state: `installation` (the state's random id) keeps two states that share a
/// NATS server and namespace — another warehouse, a dropped and re-created schema — apart.
pub fn message_id(
    hop: &str,
    installation: &str,
    run_id: i64,
    sync: &str,
    key: &str,
    fingerprint: &str,
) -> String {
    format!(
        "{hop}:{run_id}:{}",
        &digest(&[installation, sync, key, fingerprint])[..40]
    )
}

/// The `Nats-Msg-Id` of the request for one run.
pub fn run_message_id(installation: &str, run_id: i64) -> String {
    format!("run:{installation}:{run_id}")
}

/// The fingerprint of a Loops API key, as a sync's destination binding keeps it: 16 hex digits
/// (64 bits) of SHA-256 over a context of its own, the state's `installation` and the key.
/// Salted by the installation, the same key has another fingerprint in another state; under its
/// own context, it is no other digest loopsync makes of the key (the rate budget's name).
/// One-way: the key cannot be read back from it, and a Loops key is random enough that trying
/// keys until one matches is out of reach (docs/security.md). Call it through
/// [`crate::secret::ApiKey::fingerprint`].
pub fn api_key_fingerprint(installation: &str, key: &str) -> String {
    digest(&["loopsync api-key fingerprint v1", installation, key])[..16].to_owned()
}

/// A fingerprint over already-normalised parts.
pub fn fingerprint(parts: &[&str]) -> String {
    digest(parts)[..40].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twelve hex digits of the record's id: stable, apart for two keys or two syncs, and
    /// nothing of the key in it.
    #[test]
    fn a_log_key_names_a_record_without_its_key() {
        let logged = log_key("users", "ada@example.com");
        assert_eq!(logged, record_id("users", "ada@example.com")[..12]);
        assert_eq!(logged.len(), 12);
        assert!(logged.chars().all(|c| c.is_ascii_hexdigit()), "{logged}");
        assert_ne!(logged, log_key("users", "bob@example.com"));
        assert_ne!(logged, log_key("leads", "ada@example.com"));
    }

    #[test]
    fn keys_are_deterministic_and_distinct() {
        let a = idempotency_key("i", "users", "42", 0, "fp1", "upsert");
        assert_eq!(a, idempotency_key("i", "users", "42", 0, "fp1", "upsert"));
        assert_ne!(a, idempotency_key("i", "users", "42", 0, "fp2", "upsert"));
        assert_ne!(a, idempotency_key("i", "users", "43", 0, "fp1", "upsert"));
        assert_ne!(a, idempotency_key("i", "users", "42", 0, "fp1", "event"));
        assert!(a.len() <= 100);
        assert_eq!(a.len(), 68);
    }

    /// free → gold → free: the third change has the first one's fingerprint, not its key.
    /// A row that leaves and comes back unchanged: likewise. A new state: likewise.
    #[test]
    fn a_change_that_goes_back_has_a_new_key() {
        let first = idempotency_key("i", "users", "42", 0, "free", "event");
        let back = idempotency_key("i", "users", "42", 2, "free", "event");
        assert_ne!(first, back);
        let returned = idempotency_key("i", "users", "42", 3, "free", "event");
        assert_ne!(returned, first);
        assert_ne!(returned, back);
        assert_ne!(
            first,
            idempotency_key("j", "users", "42", 0, "free", "event"),
            "another installation"
        );
        assert_ne!(ledger_key("i", "s", "k"), ledger_key("j", "s", "k"));
    }

    /// An event's key depends on the sync and the event id only: not on the row's values, the
    /// state or anything else of the run.
    #[test]
    fn an_event_key_is_the_sync_and_the_event_id() {
        let k = event_key("events", "e-1");
        assert_eq!(k, event_key("events", "e-1"));
        assert_ne!(k, event_key("events", "e-2"));
        assert_ne!(k, event_key("other", "e-1"));
        assert_eq!(k.len(), 68);
        assert!(is_event_key(&k));
        assert!(!is_event_key(&idempotency_key(
            "i", "s", "k", 0, "fp", "event"
        )));
    }

    /// A key's fingerprint: short, hex, stable, another for another key or another state, and
    /// neither the key nor the rate budget's digest of it.
    #[test]
    fn an_api_key_fingerprint_is_salted_and_one_way() {
        let fp = api_key_fingerprint("i1", "test-key");
        assert_eq!(fp, api_key_fingerprint("i1", "test-key"));
        assert_eq!(
            fp, "13c218fbad249b8c",
            "stored in states: it must not change"
        );
        assert_eq!(fp.len(), 16);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()), "{fp}");
        assert_ne!(fp, api_key_fingerprint("i1", "other-key"));
        assert_ne!(fp, api_key_fingerprint("i2", "test-key"), "salted");
        assert!(!fp.contains("test-key"));
        assert!(!record_id("loops-api-key", "test-key").contains(&fp));
    }

    #[test]
    fn separators_matter() {
        assert_ne!(record_id("ab", "c"), record_id("a", "bc"));
    }

    #[test]
    fn message_ids_differ_per_run_and_hop() {
        let m = message_id("chg", "i", 1, "users", "42", "fp");
        assert_eq!(m, message_id("chg", "i", 1, "users", "42", "fp"));
        assert_ne!(m, message_id("chg", "i", 2, "users", "42", "fp"));
        assert_ne!(m, message_id("op", "i", 1, "users", "42", "fp"));
        assert_ne!(m, message_id("chg", "j", 1, "users", "42", "fp"));
        assert_ne!(run_message_id("i", 1), run_message_id("j", 1));
        assert!(record_id("s", "k").chars().all(|c| c.is_ascii_hexdigit()));
    }
}
