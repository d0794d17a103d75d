//! Stream, subject, consumer and bucket names, in one place: all of them are NATS's business,
//! so no code outside this crate builds one. A namespace prefixes all of them, so several
//! deployments (or tests) can share one NATS server.

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
        }
    }

    /// The namespace every name starts with.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn upper(&self) -> String {
        self.namespace.to_uppercase().replace('-', "_")
    }

    /// The work-queue stream a stage consumes.
    pub fn stream(&self, stage: Stage) -> String {
        format!("{}_{}", self.upper(), stream_base(stage))
    }

    /// The subjects of a stage's stream: `<ns>.<base>.>`.
    pub fn stream_subjects(&self, stage: Stage) -> String {
        format!("{}.{}.>", self.namespace, subject_base(stage))
    }

    /// The subject of one message for `stage` about `sync`.
    pub fn subject(&self, stage: Stage, sync: &str) -> String {
        format!("{}.{}.{sync}", self.namespace, subject_base(stage))
    }

    /// The stage whose stream holds `subject`.
    pub fn stage_of(&self, subject: &str) -> Option<Stage> {
        let rest = subject.strip_prefix(&self.namespace)?.strip_prefix('.')?;
        let base = rest.split('.').next()?;
        Stage::ALL.into_iter().find(|s| subject_base(*s) == base)
    }

    /// The dead-letter stream (limits retention: replaying does not consume it).
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.upper())
    }

    /// The subjects of the dead-letter stream: `<ns>.dlq.>`.
    pub fn dlq_subjects(&self) -> String {
        format!("{}.dlq.>", self.namespace)
    }

    /// The subject of a dead letter from `stage` about `sync`.
    pub fn dlq_subject(&self, stage: Stage, sync: &str) -> String {
        format!("{}.dlq.{}.{sync}", self.namespace, stage.name())
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
}
