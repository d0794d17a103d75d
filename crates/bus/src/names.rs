//! Stream, subject, consumer and bucket names, in one place: all of them are NATS's business,
//! so no code outside this crate builds one. A namespace prefixes all of them, so several
//! deployments (or tests) can share one NATS server.
//!
//! The messages of a deployment are also scoped by its *installation* (the state's random id):
//! its work queues, dead letters and advisories are streams of their own, so two deployments
//! that share a namespace (staging and production on the default one) never take each other's
//! messages — a loader of one would otherwise send the other's contacts to its own Loops. What
//! the deployments do share on purpose stays per namespace: the rate budgets (one per Loops
//! team) and the ledger (its keys carry the installation).

use loopsync_core::stage::Stage;

/// The work-queue stream a stage consumes (without namespace).
fn stream_base(stage: Stage) -> &'static str {
    match stage {
        Stage::Extractor => "RUNS",
        Stage::Transformer => "CHANGES",
        Stage::Loader => "OPS",
        Stage::Checkpointer => "OUTCOMES",
    }
}

/// The subject token of a stage's messages (without namespace).
fn subject_base(stage: Stage) -> &'static str {
    match stage {
        Stage::Extractor => "runs",
        Stage::Transformer => "changes",
        Stage::Loader => "ops",
        Stage::Checkpointer => "outcomes",
    }
}

/// All names of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
    /// The installation's token ([`Names::scoped`]), if the names are scoped by one.
    scope: Option<String>,
}

impl Default for Names {
    fn default() -> Self {
        Names::new("loopsync")
    }
}

impl Names {
    /// `namespace` must be a valid subject token and stream-name part: letters, digits, `_`, `-`.
    pub fn new(namespace: &str) -> Names {
        Names {
            namespace: namespace.to_owned(),
            scope: None,
        }
    }

    /// The names of one installation (the state's id) in `namespace`: its streams and subjects
    /// are its own (`<ns>.i<id>.ops.<sync>`, `<NS>_I<ID>_OPS`), its buckets the namespace's.
    /// The first 12 letters and digits of the id name it: the id is 32 random hex digits.
    pub fn scoped(namespace: &str, installation: &str) -> Names {
        let token: String = installation
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect::<String>()
            .to_lowercase();
        Names {
            namespace: namespace.to_owned(),
            scope: (!token.is_empty()).then(|| format!("i{token}")),
        }
    }

    /// The namespace every name starts with.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// What every subject starts with: the namespace, and the installation's token.
    fn prefix(&self) -> String {
        match &self.scope {
            Some(scope) => format!("{}.{scope}", self.namespace),
            None => self.namespace.clone(),
        }
    }

    /// What every stream name starts with: [`Names::prefix`] in upper case.
    fn upper(&self) -> String {
        self.prefix().to_uppercase().replace(['-', '.'], "_")
    }

    /// The work-queue stream a stage consumes.
    pub fn stream(&self, stage: Stage) -> String {
        format!("{}_{}", self.upper(), stream_base(stage))
    }

    /// The subjects of a stage's stream: `<ns>.<base>.>`.
    pub fn stream_subjects(&self, stage: Stage) -> String {
        format!("{}.{}.>", self.prefix(), subject_base(stage))
    }

    /// The subject of one message for `stage` about `sync`.
    pub fn subject(&self, stage: Stage, sync: &str) -> String {
        format!("{}.{}.{sync}", self.prefix(), subject_base(stage))
    }

    /// The stage whose stream holds `subject`.
    pub fn stage_of(&self, subject: &str) -> Option<Stage> {
        let rest = subject.strip_prefix(&self.prefix())?.strip_prefix('.')?;
        let base = rest.split('.').next()?;
        Stage::ALL.into_iter().find(|s| subject_base(*s) == base)
    }

    /// The dead-letter stream (limits retention: replaying does not consume it).
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.upper())
    }

    /// The subjects of the dead-letter stream: `<ns>.dlq.>`.
    pub fn dlq_subjects(&self) -> String {
        format!("{}.dlq.>", self.prefix())
    }

    /// The subject of a dead letter from `stage` about `sync`.
    pub fn dlq_subject(&self, stage: Stage, sync: &str) -> String {
        format!("{}.dlq.{}.{sync}", self.prefix(), stage.name())
    }

    /// The stream that captures the max-deliveries and terminated advisories of our streams.
    pub fn advisory_stream(&self) -> String {
        format!("{}_ADVISORIES", self.upper())
    }

    /// The advisory subjects captured: for each work-queue stream, both kinds.
    pub fn advisory_subjects(&self) -> Vec<String> {
        let mut subjects = Vec::new();
        for stage in Stage::ALL {
            for kind in ["MAX_DELIVERIES", "MSG_TERMINATED"] {
                subjects.push(format!(
                    "$JS.EVENT.ADVISORY.CONSUMER.{kind}.{}.*",
                    self.stream(stage)
                ));
            }
        }
        subjects
    }

    /// The subject of the advisories the server sends when a message of `stage` reaches its
    /// maximum of deliveries (the last token is the consumer's name).
    pub fn max_deliveries_subject(&self, stage: Stage) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
            self.stream(stage)
        )
    }

    /// The durable consumer of a stage's max-deliveries advisories, shared by the processes
    /// that run the stage.
    pub fn exhausted_consumer(&self, stage: Stage) -> String {
        format!("{}-exhausted", stage.name())
    }

    /// The key-value bucket of the loader's ledger (last confirmed version per record).
    pub fn ledger_bucket(&self) -> String {
        format!("{}_ledger", self.namespace.replace('-', "_"))
    }

    /// The key-value bucket of the shared rate budgets (one key per Loops team).
    pub fn budget_bucket(&self) -> String {
        format!("{}_budget", self.namespace.replace('-', "_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_namespaced() {
        let n = Names::new("t-1");
        assert_eq!(n.stream(Stage::Loader), "T_1_OPS");
        assert_eq!(n.subject(Stage::Loader, "users"), "t-1.ops.users");
        assert_eq!(n.stream_subjects(Stage::Loader), "t-1.ops.>");
        assert_eq!(n.stage_of("t-1.ops.users"), Some(Stage::Loader));
        assert_eq!(n.stage_of("t-1.changes.users"), Some(Stage::Transformer));
        assert_eq!(n.stage_of("other.ops.users"), None);
        assert_eq!(
            n.dlq_subject(Stage::Loader, "users"),
            "t-1.dlq.loader.users"
        );
        assert_eq!(n.advisory_subjects().len(), 8);
        assert!(
            n.advisory_subjects()[0].starts_with("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.T_1_")
        );
    }

    /// Two installations on one namespace share no stream, subject or consumer of messages
    /// (so neither takes the other's), and do share the buckets.
    #[test]
    fn installations_on_one_namespace_share_no_message() {
        let a = Names::scoped("loopsync", "3f2a9c1b4d5e6f708192a3b4c5d6e7f8");
        let b = Names::scoped("loopsync", "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b");
        assert_eq!(a.stream(Stage::Loader), "LOOPSYNC_I3F2A9C1B4D5E_OPS");
        assert_eq!(
            a.subject(Stage::Loader, "users"),
            "loopsync.i3f2a9c1b4d5e.ops.users"
        );
        assert_eq!(
            a.stage_of("loopsync.i3f2a9c1b4d5e.ops.users"),
            Some(Stage::Loader)
        );
        assert_eq!(b.stage_of("loopsync.i3f2a9c1b4d5e.ops.users"), None);
        assert_eq!(crate::sync_of(&a.subject(Stage::Loader, "users")), "users");
        for stage in Stage::ALL {
            assert_ne!(a.stream(stage), b.stream(stage));
            assert_ne!(a.stream_subjects(stage), b.stream_subjects(stage));
            // A stream's subjects must not overlap another's: neither is a prefix.
            assert!(!a.stream_subjects(stage).starts_with(b.prefix().as_str()));
            assert_ne!(a.subject(stage, "users"), b.subject(stage, "users"));
            assert_ne!(
                a.max_deliveries_subject(stage),
                b.max_deliveries_subject(stage)
            );
        }
        assert_ne!(a.dlq_stream(), b.dlq_stream());
        assert_ne!(a.dlq_subjects(), b.dlq_subjects());
        assert_ne!(a.advisory_stream(), b.advisory_stream());
        assert_eq!(a.ledger_bucket(), b.ledger_bucket());
        assert_eq!(a.budget_bucket(), b.budget_bucket());
        // The unscoped names of the same namespace overlap neither.
        let plain = Names::new("loopsync");
        assert!(!a.stream_subjects(Stage::Loader).starts_with("loopsync.ops"));
        assert_ne!(plain.stream(Stage::Loader), a.stream(Stage::Loader));
    }
}
