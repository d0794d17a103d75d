//! Fault injection (`POST /_sim/faults`): server errors with the bodies a load balancer sends,
//! extra 429s, dropped connections, added latency.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Probabilities are per API request, between 0 and 1; they add up to at most 1.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// 500 with an empty body.
    pub error_500: f64,
    /// 502 with an HTML body, as a load balancer sends.
    pub error_502: f64,
    /// 503 with a plain-text body.
    pub error_503: f64,
    /// 429 although the rate limit was not reached.
    pub rate_limit_429: f64,
    /// The connection is closed without an answer.
    pub drop_connection: f64,
    /// Of the 5xx and dropped connections above, the share that happens after the request took
    /// effect (the answer was lost, not the request). 0 by default.
    pub after_effect: f64,
    /// Added to every API answer, after the request took effect.
    pub latency_ms: u64,
    /// Makes the dice repeatable.
    pub seed: Option<u64>,
    /// Only these endpoints (`"PUT /v1/contacts/update"`); empty: every endpoint.
    pub endpoints: Vec<String>,
}

/// What the dice chose for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status500,
    Status502,
    Status503,
    Status429,
    Drop,
}

/// When a chosen fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    BeforeEffect,
    AfterEffect,
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        let probabilities = [
            ("error_500", self.error_500),
            ("error_502", self.error_502),
            ("error_503", self.error_503),
            ("rate_limit_429", self.rate_limit_429),
            ("drop_connection", self.drop_connection),
            ("after_effect", self.after_effect),
        ];
        for (name, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be between 0 and 1, not {p}"));
            }
        }
        let total = self.error_500
            + self.error_502
            + self.error_503
            + self.rate_limit_429
            + self.drop_connection;
        if total > 1.0 + 1e-9 {
            return Err(format!(
                "the fault probabilities add up to {total}, more than 1"
            ));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.error_500 == 0.0
            && self.error_502 == 0.0
            && self.error_503 == 0.0
            && self.rate_limit_429 == 0.0
            && self.drop_connection == 0.0
            && self.latency_ms == 0
    }
}

/// The active faults and their dice.
#[derive(Debug)]
pub struct FaultDice {
    pub faults: Faults,
    rng: StdRng,
}

impl Default for FaultDice {
    fn default() -> Self {
        FaultDice::new(Faults::default())
    }
}

impl FaultDice {
    pub fn new(faults: Faults) -> FaultDice {
        let rng = match faults.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        FaultDice { faults, rng }
    }

    /// Rolls for one request to `endpoint`.
    pub fn roll(&mut self, endpoint: &str) -> Option<(Fault, When)> {
        let f = &self.faults;
        if f.is_empty() || (!f.endpoints.is_empty() && !f.endpoints.iter().any(|e| e == endpoint)) {
            return None;
        }
        let x: f64 = self.rng.random();
        let table = [
            (Fault::Status500, f.error_500),
            (Fault::Status502, f.error_502),
            (Fault::Status503, f.error_503),
            (Fault::Status429, f.rate_limit_429),
            (Fault::Drop, f.drop_connection),
        ];
        let mut edge = 0.0;
        let mut chosen = None;
        for (fault, p) in table {
            edge += p;
            if x < edge {
                chosen = Some(fault);
                break;
            }
        }
        let fault = chosen?;
        // A 429 always means "not done".
        let after = fault != Fault::Status429 && self.rng.random::<f64>() < f.after_effect;
        Some((
            fault,
            if after {
                When::AfterEffect
            } else {
                When::BeforeEffect
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_can_target_endpoints() {
        let mut dice = FaultDice::new(Faults {
            error_500: 1.0,
            endpoints: vec!["PUT /v1/contacts/update".into()],
            ..Default::default()
        });
        assert!(dice.roll("PUT /v1/contacts/update").is_some());
        assert!(dice.roll("GET /v1/api-key").is_none());
    }

    #[test]
    fn no_faults_never_fire() {
        let mut dice = FaultDice::default();
        assert!((0..1000).all(|_| dice.roll("PUT /v1/contacts/update").is_none()));
    }

    #[test]
    fn certain_fault_always_fires_before_effect_by_default() {
        let mut dice = FaultDice::new(Faults {
            error_502: 1.0,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..100).all(|_| dice.roll("PUT /v1/contacts/update")
            == Some((Fault::Status502, When::BeforeEffect))));
    }

    #[test]
    fn probabilities_are_roughly_honoured_and_seeded() {
        let faults = Faults {
            error_500: 0.2,
            drop_connection: 0.1,
            after_effect: 0.5,
            seed: Some(7),
            ..Default::default()
        };
        let rolls = |faults: &Faults| {
            let mut dice = FaultDice::new(faults.clone());
            (0..10_000)
                .map(|_| dice.roll("PUT /v1/contacts/update"))
                .collect::<Vec<_>>()
        };
        let a = rolls(&faults);
        assert_eq!(a, rolls(&faults), "same seed, same dice");
        let n500 = a
            .iter()
            .filter(|r| matches!(r, Some((Fault::Status500, _))))
            .count();
        let after = a
            .iter()
            .filter(|r| matches!(r, Some((_, When::AfterEffect))))
            .count();
        assert!((1700..2300).contains(&n500), "{n500}");
        assert!((1200..1800).contains(&after), "{after}");
    }

    #[test]
    fn validation() {
        assert!(
            Faults {
                error_500: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Faults {
                error_500: 0.6,
                error_503: 0.6,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Faults {
                error_500: 0.5,
                error_503: 0.5,
                ..Default::default()
            }
            .validate()
            .is_ok()
        );
    }
}
