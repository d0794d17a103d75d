//! Calls to Loops outside the pipeline (the preflight, `check`, `verify`), retried by the same
//! rule as a worker's messages ([`loopsync_bus::worker::retry_delay`]).

use loopsync_bus::RateBudget;
use loopsync_bus::worker::{Backoff, RetryPolicy, retry_delay};
use loopsync_core::Classified;
use loopsync_core::envelope::{RequestCounts, RequestKind};
use loopsync_loops_client::LoopsError;

use crate::EngineError;

/// The policy of a call outside the pipeline: `attempts` (`loops.max_attempts`, as the
/// loader's), the workers' default backoff.
pub fn policy(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        backoff: Backoff::default(),
    }
}

/// A call to Loops outside the pipeline, paced by `budget`, and retried like the loader's: a
/// retryable answer waits (the server's delay, capped, or the worker's backoff) and tries again,
/// up to `attempts` (`loops.max_attempts`, as the loader). Every request sent is counted in
/// `counts` (kind preflight). The Loops error that ended it is [`EngineError::LoopsClient`]
/// (see [`with_retries_for`] to say what the call was for); the budget's bus failing is
/// [`EngineError::Bus`].
pub async fn with_retries<T, F, Fut>(
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
    call: F,
) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LoopsError>>,
{
    retried(budget, attempts, counts, call)
        .await?
        .map_err(EngineError::LoopsClient)
}

/// The loop of [`with_retries`]: the outer error is the budget's, the inner the last answer.
async fn retried<T, F, Fut>(
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
    mut call: F,
) -> Result<Result<T, LoopsError>, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LoopsError>>,
{
    let policy = policy(attempts);
    let mut attempt = 1;
    loop {
        budget.ready().await?;
        let result = call().await;
        match &result {
            Err(error) if !error.was_sent() => {}
            Err(error) => {
                counts.count(RequestKind::Preflight, attempt > 1, error.is_rate_limited())
            }
            Ok(_) => counts.count(RequestKind::Preflight, attempt > 1, false),
        }
        match result {
            Err(error) => match retry_delay(error.class(), attempt, &policy) {
                Some(delay) => {
                    let next = format!(
                        "{error}: retrying (attempt {} of {attempts}, next in {:.1} s)",
                        attempt + 1,
                        delay.as_secs_f64()
                    );
                    // A Loops that cannot be reached, or fails, is said at once: the user sees
                    // what is waited for. A 429 is the budget's business (shared by every
                    // process of the deployment): a line at info.
                    if error.is_rate_limited() {
                        tracing::info!("{next}");
                    } else {
                        tracing::warn!("{next}");
                    }
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                None => return Ok(Err(error)),
            },
            Ok(value) => return Ok(Ok(value)),
        }
    }
}

/// [`with_retries`], its Loops error wrapped with what the call was for.
pub async fn with_retries_for<T, F, Fut>(
    what: &str,
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
    call: F,
) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LoopsError>>,
{
    retried(budget, attempts, counts, call)
        .await?
        .map_err(EngineError::loops(what))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use loopsync_bus::worker::{Settle, WorkerOptions, settle};
    use loopsync_core::ErrorClass;

    use super::*;

    /// The errors of the comparison: retryable with and without the server's delay (one far
    /// above the cap), refused for good.
    fn errors() -> Vec<LoopsError> {
        vec![
            LoopsError::Server {
                status: 503,
                body: String::new(),
            },
            LoopsError::RateLimited {
                limit: Some(10),
                remaining: Some(0),
                retry_after: Some(Duration::from_secs(2)),
            },
            LoopsError::RateLimited {
                limit: None,
                remaining: None,
                retry_after: Some(Duration::from_secs(3600)),
            },
            LoopsError::Invalid {
                message: "no".into(),
            },
        ]
    }

    /// For the same error and attempts, `with_retries` tries again exactly when a worker's
    /// `settle` would nak the message, and after the same server delay (capped the same way);
    /// it gives up where the worker would reject or dead-letter.
    #[tokio::test(start_paused = true)]
    async fn with_retries_decides_as_a_worker_settles() {
        let budget = RateBudget::local(1000);
        for max_attempts in [1, 3] {
            for error in errors() {
                let options = WorkerOptions {
                    max_attempts,
                    ..WorkerOptions::default()
                };
                let mut calls: Vec<tokio::time::Instant> = Vec::new();
                let mut counts = RequestCounts::default();
                let result = with_retries(&budget, max_attempts, &mut counts, || {
                    calls.push(tokio::time::Instant::now());
                    let error = errors()
                        .into_iter()
                        .find(|e| e.to_string() == error.to_string())
                        .unwrap();
                    async move { Err::<(), _>(error) }
                })
                .await;
                assert!(matches!(result, Err(EngineError::LoopsClient(_))));
                // Attempt n was retried iff settle naks it, after the delay it names.
                let mut expected_calls = 1;
                for attempt in 1..=max_attempts {
                    let settled =
                        settle(Err((error.class(), error.to_string())), attempt, &options);
                    match settled {
                        Settle::Nak(delay) => {
                            expected_calls += 1;
                            let waited = calls[attempt as usize] - calls[attempt as usize - 1];
                            if let ErrorClass::Retryable { after: Some(_) } = error.class() {
                                assert!(waited >= delay, "{error}: {waited:?} < {delay:?}");
                                assert!(waited < delay + Duration::from_secs(1));
                            }
                        }
                        _ => break,
                    }
                }
                assert_eq!(
                    calls.len(),
                    expected_calls,
                    "{error}, {max_attempts} attempts"
                );
            }
        }
    }

    /// A success after retryable failures returns the value; each request is counted, the
    /// retries and the 429s among them.
    #[tokio::test(start_paused = true)]
    async fn every_request_sent_is_counted() {
        let budget = RateBudget::local(1000);
        let mut counts = RequestCounts::default();
        let mut left = 2;
        let value = with_retries_for("asking", &budget, 5, &mut counts, || {
            let answer = if left > 0 {
                left -= 1;
                Err(errors().swap_remove(1))
            } else {
                Ok(7)
            };
            async move { answer }
        })
        .await
        .unwrap();
        assert_eq!(value, 7);
        assert_eq!(
            (counts.preflight, counts.retries, counts.rate_limited),
            (3, 2, 2)
        );
        let error = with_retries_for("asking Loops", &budget, 1, &mut counts, || async {
            Err::<(), _>(errors().swap_remove(3))
        })
        .await
        .unwrap_err();
        assert_eq!(error.to_string(), "asking Loops");
        assert!(matches!(error, EngineError::Loops { .. }));
    }
}
