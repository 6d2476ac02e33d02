//! The waiting room: whether an inference request may come in, decided as soon as its model
//! is known: from the path for `/{dataset}/{version}`, from the first bytes of the body for
//! the JSON routes (its `model_id`; clients such as `inference_sdk` send it before the image),
//! before the image is read, parsed or decoded. A request that can be served before its
//! deadline comes in and waits its turn (for ring slots of its model, in arrival order); one
//! that cannot is refused at once with a `Retry-After` saying when a retry could be served.
//!
//! The prediction is per model ([`Line`]): the model's requests ahead of it (in the server,
//! waiting or being served) divided by the rate at which the model answers them, measured
//! while it has work (an idle gap does not lower the rate). Until the first answers give a
//! rate, every request comes in (and waits at most until its deadline).
//!
//! [`Activity`] counts every inference request in the server (at most MAX_INFLIGHT_REQUESTS):
//! the last one out wakes the memory trimmer (`crate::memory`), which returns freed memory
//! once the server has been idle a while, instead of paying for it on every request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::memory::IdleTrimmer;

/// Every inference request in the server, over all models.
pub struct Activity {
    in_server: AtomicUsize,
    /// Most inference requests in the server at once (MAX_INFLIGHT_REQUESTS).
    capacity: usize,
    trimmer: Option<IdleTrimmer>,
}

/// One request's presence in the server; dropping it leaves.
pub struct Presence<'a> {
    activity: &'a Activity,
}

impl Activity {
    /// At most `capacity` requests; `trimmer` is told when the server empties and fills.
    pub fn new(capacity: usize, trimmer: Option<IdleTrimmer>) -> Self {
        Self {
            in_server: AtomicUsize::new(0),
            capacity: capacity.max(1),
            trimmer,
        }
    }

    /// Counts a request in; `None` when the server holds MAX_INFLIGHT_REQUESTS already.
    pub fn enter(&self) -> Option<Presence<'_>> {
        let before = self
            .in_server
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .ok()?;
        if before == 0 {
            if let Some(t) = &self.trimmer {
                t.busy();
            }
        }
        Some(Presence { activity: self })
    }

    /// Inference requests in the server now.
    pub fn in_server(&self) -> usize {
        self.in_server.load(Ordering::Acquire)
    }
}

impl Drop for Presence<'_> {
    fn drop(&mut self) {
        if self.activity.in_server.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(t) = &self.activity.trimmer {
                t.quiet();
            }
        }
    }
}

/// The line of one model's requests, and the rate it moves at.
#[derive(Debug, Default)]
pub struct Line {
    state: Mutex<LineState>,
}

#[derive(Debug, Default)]
struct LineState {
    /// Requests let in and not yet answered.
    in_line: usize,
    /// When `in_line` last went from 0 to 1.
    busy_since: Option<Instant>,
    /// The last answer served while the model had work.
    last_served: Option<Instant>,
    /// Moving average of the time between answers while busy (seconds per request).
    seconds_per_request: Option<f64>,
}

/// Weight of the newest interval in the moving average: about the last 20 answers count.
const SMOOTHING: f64 = 0.05;

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// When a retry could be served in time.
    pub retry_after: Duration,
    /// The predicted wait that did not fit.
    pub predicted: Duration,
    /// Requests of the model ahead of it.
    pub ahead: usize,
}

impl Line {
    /// Lets a request in if, by the prediction, it can be answered before `deadline`; its
    /// [`Ticket`] holds its place until dropped.
    pub fn enter(self: &Arc<Self>, now: Instant, deadline: Instant) -> Result<Ticket, Refusal> {
        let mut line = self.state.lock();
        let ahead = line.in_line;
        let predicted = line.drain_time(ahead + 1);
        let left = deadline.saturating_duration_since(now);
        if ahead > 0 && predicted > left {
            return Err(Refusal {
                // By then enough of the line ahead has been answered for a retry to fit.
                retry_after: round_up_to_seconds(predicted - left),
                predicted,
                ahead,
            });
        }
        if line.in_line == 0 {
            line.busy_since = Some(now);
        }
        line.in_line += 1;
        Ok(Ticket {
            line: Arc::clone(self),
            served: false,
        })
    }

    /// Requests of the model in the server now.
    pub fn in_line(&self) -> usize {
        self.state.lock().in_line
    }

    /// The measured rate, answers per second while busy (`None` before the first answers).
    pub fn rate(&self) -> Option<f64> {
        self.state
            .lock()
            .seconds_per_request
            .filter(|s| *s > 0.0)
            .map(|s| 1.0 / s)
    }

    fn leave(&self, served: bool) {
        let now = Instant::now();
        let mut line = self.state.lock();
        if served {
            let since = match (line.last_served, line.busy_since) {
                (Some(l), Some(b)) => l.max(b),
                (None, Some(b)) => b,
                (l, None) => l.unwrap_or(now),
            };
            let interval = now.saturating_duration_since(since).as_secs_f64();
            line.seconds_per_request = Some(match line.seconds_per_request {
                Some(avg) => avg + SMOOTHING * (interval - avg),
                None => interval,
            });
            line.last_served = Some(now);
        }
        line.in_line = line.in_line.saturating_sub(1);
        if line.in_line == 0 {
            line.busy_since = None;
            line.last_served = None;
        }
    }
}

impl LineState {
    /// Time for `count` more answers at the measured rate (zero before there is one).
    fn drain_time(&self, count: usize) -> Duration {
        match self.seconds_per_request {
            Some(s) if s.is_finite() && s > 0.0 => {
                Duration::try_from_secs_f64(s * count as f64).unwrap_or(Duration::MAX)
            }
            _ => Duration::ZERO,
        }
    }
}

fn round_up_to_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64)
}

/// A request's place in its model's line; dropping it leaves. Mark it [`Ticket::served`]
/// when the model answered it, so that its answer counts towards the measured rate.
pub struct Ticket {
    line: Arc<Line>,
    served: bool,
}

impl Ticket {
    /// The request was answered by the model (its time counts towards the rate).
    pub fn served(&mut self) {
        self.served = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.line.leave(self.served);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn everyone_comes_in_until_a_rate_is_known() {
        let line = Arc::new(Line::default());
        let now = Instant::now();
        let tickets: Vec<_> = (0..50)
            .map(|_| line.enter(now, now + SECOND).ok().expect("in"))
            .collect();
        assert_eq!(line.in_line(), 50);
        drop(tickets);
        assert_eq!(line.in_line(), 0);
    }

    #[test]
    fn the_count_caps_the_server_and_the_last_one_out_says_so() {
        let a = Activity::new(2, None);
        let first = a.enter().expect("in");
        let second = a.enter().expect("in");
        assert!(a.enter().is_none());
        drop(first);
        assert!(a.enter().is_some());
        drop(second);
        assert_eq!(a.in_server(), 0);
    }

    #[test]
    fn a_request_that_cannot_finish_in_time_is_refused_with_a_retry_after_that_fits() {
        let line = Arc::new(Line::default());
        // 10 answers per second.
        line.state.lock().seconds_per_request = Some(0.1);
        let now = Instant::now();
        let mut held = Vec::new();
        // With a 1 s deadline, 10 fit: the one that would finish at 1.0 s included.
        for _ in 0..10 {
            held.push(line.enter(now, now + SECOND).ok().expect("fits"));
        }
        let r = line.enter(now, now + SECOND).err().expect("refused");
        assert_eq!(r.ahead, 10);
        assert!((r.predicted.as_secs_f64() - 1.1).abs() < 1e-9);
        assert_eq!(r.retry_after, SECOND);
        // A longer deadline fits behind the same line.
        assert!(line.enter(now, now + 2 * SECOND).is_ok());
    }

    #[test]
    fn the_rate_is_measured_while_busy_and_idle_gaps_do_not_lower_it() {
        let line = Arc::new(Line::default());
        let far = Instant::now() + Duration::from_secs(60);
        for _ in 0..3 {
            let mut t = line.enter(Instant::now(), far).ok().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            t.served();
            drop(t);
            // Idle between requests: not counted.
            std::thread::sleep(Duration::from_millis(100));
        }
        let rate = line.rate().expect("a rate");
        assert!(rate > 20.0 && rate < 55.0, "{rate}/s");
        // Requests that were not served (refused later, client gone) do not count.
        let before = line.rate();
        drop(line.enter(Instant::now(), far).ok().unwrap());
        assert_eq!(line.rate(), before);
    }
}
