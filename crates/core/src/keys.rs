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

/// A short stable name for one record of one sync, safe as a NATS subject token or KV key.
pub fn record_id(sync: &str, key: &str) -> String {
    digest(&[sync, key])[..32].to_owned()
}

/// The Loops `Idempotency-Key` of one effect: (sync, key, fingerprint, purpose) → 68 characters
/// (Loops allows 100). `purpose` tells apart two effects of one record version.
pub fn idempotency_key(sync: &str, key: &str, fingerprint: &str, purpose: &str) -> String {
    format!("ls1-{}", digest(&[sync, key, fingerprint, purpose]))
}

/// The `Nats-Msg-Id` of a message on `hop` about one record version in one run.
///
/// It carries the run id as well as (sync, key, fingerprint): a record that failed is sent
/// again by the next run with the same fingerprint, and JetStream would otherwise drop that
/// message as a duplicate if the next run starts within the duplicate window. Within one run
/// the id is stable, so a stage that crashes between publishing and acking republishes harmlessly.
pub fn message_id(hop: &str, run_id: i64, sync: &str, key: &str, fingerprint: &str) -> String {
    format!(
        "{hop}:{run_id}:{}",
        &digest(&[sync, key, fingerprint])[..40]
    )
}

/// A fingerprint over already-normalised parts.
pub fn fingerprint(parts: &[&str]) -> String {
    digest(parts)[..40].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_deterministic_and_distinct() {
        let a = idempotency_key("users", "42", "fp1", "upsert");
        assert_eq!(a, idempotency_key("users", "42", "fp1", "upsert"));
        assert_ne!(a, idempotency_key("users", "42", "fp2", "upsert"));
        assert_ne!(a, idempotency_key("users", "43", "fp1", "upsert"));
        assert_ne!(a, idempotency_key("users", "42", "fp1", "event"));
        assert!(a.len() <= 100);
        assert_eq!(a.len(), 68);
    }

    #[test]
    fn separators_matter() {
        assert_ne!(record_id("ab", "c"), record_id("a", "bc"));
    }

    #[test]
    fn message_ids_differ_per_run_and_hop() {
        let m = message_id("chg", 1, "users", "42", "fp");
        assert_eq!(m, message_id("chg", 1, "users", "42", "fp"));
        assert_ne!(m, message_id("chg", 2, "users", "42", "fp"));
        assert_ne!(m, message_id("op", 1, "users", "42", "fp"));
        assert!(record_id("s", "k").chars().all(|c| c.is_ascii_hexdigit()));
    }
}
