//! The per-team rate limit, and the measurement of what it let through.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::RateWindow;

const SECOND: Duration = Duration::from_secs(1);

/// Decides whether a request is accepted, and measures the most requests accepted in any one
/// second whatever the window, so that a test can check the strict bound.
#[derive(Debug)]
pub struct RateLimiter {
    /// Accepted requests of the last second, oldest first.
    recent: VecDeque<Instant>,
    max_in_one_second: u32,
    started: Instant,
    fixed_window: u64,
    fixed_count: u32,
    tokens: f64,
    refilled_at: Instant,
}

/// The answer of [`RateLimiter::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub accepted: bool,
    /// For `x-ratelimit-remaining`, after this request.
    pub remaining: u32,
    /// When a slot frees, for a `Retry-After`.
    pub retry_in: Duration,
}

impl RateLimiter {
    pub fn new(now: Instant, limit: u32) -> RateLimiter {
        RateLimiter {
            recent: VecDeque::new(),
            max_in_one_second: 0,
            started: now,
            fixed_window: 0,
            fixed_count: 0,
            tokens: f64::from(limit),
            refilled_at: now,
        }
    }

    /// The most requests accepted within any one second so far.
    pub fn max_in_one_second(&self) -> u32 {
        self.max_in_one_second
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&oldest) = self.recent.front() {
            if now.duration_since(oldest) >= SECOND {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    fn refill(&mut self, now: Instant, limit: u32) {
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(limit)).min(f64::from(limit));
        self.refilled_at = now;
    }

    fn roll_fixed(&mut self, now: Instant) {
        let window = now.duration_since(self.started).as_secs();
        if window != self.fixed_window {
            self.fixed_window = window;
            self.fixed_count = 0;
        }
    }

    /// Requests left in the current window, without taking one.
    pub fn remaining(&mut self, now: Instant, limit: u32, window: RateWindow) -> u32 {
        self.prune(now);
        match window {
            RateWindow::Sliding => limit.saturating_sub(self.recent.len() as u32),
            RateWindow::Fixed => {
                self.roll_fixed(now);
                limit.saturating_sub(self.fixed_count)
            }
            RateWindow::TokenBucket => {
                self.refill(now, limit);
                self.tokens.floor().max(0.0) as u32
            }
        }
    }

    /// Takes one request slot if there is one.
    pub fn acquire(&mut self, now: Instant, limit: u32, window: RateWindow) -> Decision {
        self.prune(now);
        let (accepted, retry_in) = match window {
            RateWindow::Sliding => {
                let ok = (self.recent.len() as u32) < limit;
                let wait = self.recent.front().map_or(Duration::ZERO, |t| {
                    SECOND.saturating_sub(now.duration_since(*t))
                });
                (ok, wait)
            }
            RateWindow::Fixed => {
                self.roll_fixed(now);
                let ok = self.fixed_count < limit;
                if ok {
                    self.fixed_count += 1;
                }
                let into = now.duration_since(self.started).as_secs_f64().fract();
                (ok, Duration::from_secs_f64(1.0 - into))
            }
            RateWindow::TokenBucket => {
                self.refill(now, limit);
                let ok = self.tokens >= 1.0;
                if ok {
                    self.tokens -= 1.0;
                }
                let wait = if limit == 0 {
                    SECOND
                } else {
                    Duration::from_secs_f64(((1.0 - self.tokens) / f64::from(limit)).max(0.0))
                };
                (ok, wait)
            }
        };
        if accepted {
            self.recent.push_back(now);
            self.max_in_one_second = self.max_in_one_second.max(self.recent.len() as u32);
        }
        let remaining = self.remaining(now, limit, window);
        Decision {
            accepted,
            remaining,
            retry_in,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burst(window: RateWindow, limit: u32, n: u32, now: Instant, l: &mut RateLimiter) -> u32 {
        (0..n)
            .filter(|_| l.acquire(now, limit, window).accepted)
            .count() as u32
    }

    #[test]
    fn sliding_accepts_limit_per_any_second() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(t0, 10);
        assert_eq!(burst(RateWindow::Sliding, 10, 50, t0, &mut l), 10);
        // 0.9 s later the window still holds the 10.
        let t1 = t0 + Duration::from_millis(900);
        assert_eq!(burst(RateWindow::Sliding, 10, 5, t1, &mut l), 0);
        // At exactly 1 s they leave it.
        let t2 = t0 + SECOND;
        assert_eq!(burst(RateWindow::Sliding, 10, 50, t2, &mut l), 10);
        assert_eq!(l.max_in_one_second(), 10);
    }

    #[test]
    fn sliding_reports_remaining_and_retry() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(t0, 3);
        let d = l.acquire(t0, 3, RateWindow::Sliding);
        assert_eq!((d.accepted, d.remaining), (true, 2));
        l.acquire(t0, 3, RateWindow::Sliding);
        l.acquire(t0, 3, RateWindow::Sliding);
        let d = l.acquire(t0 + Duration::from_millis(300), 3, RateWindow::Sliding);
        assert!(!d.accepted);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.retry_in, Duration::from_millis(700));
    }

    #[test]
    fn fixed_window_allows_double_across_a_boundary_and_the_metric_sees_it() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(t0, 10);
        let late = t0 + Duration::from_millis(990);
        assert_eq!(burst(RateWindow::Fixed, 10, 20, late, &mut l), 10);
        let early = t0 + Duration::from_millis(1010);
        assert_eq!(burst(RateWindow::Fixed, 10, 20, early, &mut l), 10);
        // 20 accepted within 20 ms: the strict measurement reports it.
        assert_eq!(l.max_in_one_second(), 20);
    }

    #[test]
    fn token_bucket_refills_gradually() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(t0, 10);
        assert_eq!(burst(RateWindow::TokenBucket, 10, 20, t0, &mut l), 10);
        let t1 = t0 + Duration::from_millis(350);
        assert_eq!(burst(RateWindow::TokenBucket, 10, 20, t1, &mut l), 3);
    }
}
