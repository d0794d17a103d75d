//! Which Loops a sync's state belongs to (`loopsync_core::destination`). A sync's state is what
//! one Loops confirmed; sent to another, a run would find every row "unchanged" and send
//! nothing. So before a run of a sync is requested (`run`, `dlq replay`), the destination the
//! config points at — the API key's team (`GET /v1/api-key`) at the base URL — is compared
//! with the one the sync's state is bound to (`loopsync.destinations`):
//!
//! * none recorded: the sync is bound to this one (state from before bindings existed is bound
//!   to the first destination it meets);
//! * the same: the run goes on;
//! * another: the sync is refused (exit 2) until `loopsync adopt` (the new destination already
//!   holds these contacts) or `loopsync reset` (forget the state, send everything again).

use std::fmt;

use loopsync_bus::RateBudget;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::RequestCounts;
use loopsync_loops_client::LoopsClient;
use loopsync_warehouse::{DestinationBinding, Warehouse};

use crate::EngineError;
use crate::retry::with_retries_for;

/// The destination the config points at: the team of the API key (`GET /v1/api-key`, paced by
/// `budget`, each request counted in `counts` as preflight) at the client's base URL.
pub async fn configured(
    client: &LoopsClient,
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
) -> Result<Destination, EngineError> {
    let info = with_retries_for(
        "asking Loops which team the API key belongs to (GET /v1/api-key)",
        budget,
        attempts,
        counts,
        || client.test_api_key(),
    )
    .await?;
    Ok(Destination::new(info.team_name, client.base_url()))
}

/// Whether `sync`'s state belongs to `configured`; binds it there if it is bound to none.
/// Returns the refusal when it is bound to another destination (nothing changed then). A new
/// binding is told to `notice` (a line for the user: it happens once in a sync's life).
pub async fn check(
    warehouse: &dyn Warehouse,
    sync: &str,
    configured: &Destination,
    mut notice: impl FnMut(String),
) -> Result<Option<Refused>, EngineError> {
    match warehouse.bind_destination(sync, configured).await? {
        None => {
            notice(format!(
                "sync {sync}: its state is bound to {configured} from now on"
            ));
            Ok(None)
        }
        Some(bound) if bound.destination == *configured => Ok(None),
        Some(bound) => Ok(Some(Refused {
            sync: sync.to_owned(),
            bound,
            configured: configured.clone(),
        })),
    }
}

/// A sync whose state belongs to another destination than the configured one: exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The sync refused.
    pub sync: String,
    /// Where its state belongs, since when.
    pub bound: DestinationBinding,
    /// Where the config points.
    pub configured: Destination,
}

impl std::error::Error for Refused {}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Refused {
            sync,
            bound,
            configured,
        } = self;
        write!(
            f,
            "sync {sync}: its state belongs to another Loops, so nothing was sent.\n  \
             state confirmed against: {} (since {})\n  \
             the config points at:    {configured}\n\
             To sync to the new destination, either\n  \
             loopsync adopt --sync {sync}   it already holds these contacts: record the model as confirmed there, sending nothing\n  \
             loopsync reset --sync {sync}   forget the sync's state: the next run sends every row to it\n\
             or point loops.base_url and loops.api_key back at {}.",
            bound.destination, bound.bound_at, bound.destination.base_url
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_both_destinations_and_the_ways_forward() {
        let refused = Refused {
            sync: "users".into(),
            bound: DestinationBinding {
                destination: Destination::new(
                    Some("Simulated Team".into()),
                    "http://127.0.0.1:4001/api",
                ),
                bound_at: "2026-01-02T03:04:05.000Z".into(),
            },
            configured: Destination::new(Some("Acme".into()), "https://app.loops.so/api/"),
        };
        let text = refused.to_string();
        for part in [
            "sync users: its state belongs to another Loops, so nothing was sent",
            "state confirmed against: team \"Simulated Team\" at http://127.0.0.1:4001/api (since 2026-01-02T03:04:05.000Z)",
            "the config points at:    team \"Acme\" at https://app.loops.so/api\n",
            "loopsync adopt --sync users",
            "loopsync reset --sync users",
            "back at http://127.0.0.1:4001/api.",
        ] {
            assert!(text.contains(part), "{part:?} in:\n{text}");
        }
    }
}
