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

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::memory::IdleTrimmer;
use crate::metrics::METRICS;

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
        let activity = self.activity;
        if activity.in_server.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(t) = &activity.trimmer {
                // Checked again under the trimmer's lock: a request may have come in since.
                t.quiet(|| activity.in_server.load(Ordering::Acquire) == 0);
            }
        }
    }
}

/// The line of one model's requests, and the rate it moves at.
#[derive(Default)]
pub struct Line {
    state: Mutex<LineState>,
}

#[derive(Default)]
struct LineState {
    /// Requests let in and not yet answered.
    in_line: usize,
    /// Of those, the ones that got their ring slots (being served).
    started: usize,
    /// The ones whose request is whole and waits for its ring slots (the model's backlog;
    /// the rest are still arriving: their bodies uploading, their images fetched).
    queued: usize,
    /// The rest, in arrival order, with their deadlines: re-checked as the rate is learnt.
    waiting: BTreeMap<u64, Waiter>,
    next_seq: u64,
    /// When the last answers were served while others waited behind them (the model busy).
    recent: VecDeque<Instant>,
    /// The rate of the last busy period, for the start of the next one.
    previous_rate: Option<f64>,
}

struct Waiter {
    deadline: Instant,
    turned_away: Arc<TurnedAway>,
}

/// Set when a waiting request can no longer be served in time: it leaves with this answer.
#[derive(Default)]
pub struct TurnedAway {
    refusal: Mutex<Option<Refusal>>,
    notify: tokio::sync::Notify,
}

/// Share of the time left to its deadline that a request's predicted wait may take when it
/// arrives (later, while it waits, the whole of it).
const ADMIT_MARGIN: f64 = 0.8;

/// Answers remembered for the rate: enough to smooth a batch's burst of answers.
const RATE_WINDOW: usize = 32;
/// Fewest answers of a busy period before its own rate replaces the last period's.
const RATE_MIN_SAMPLES: usize = 8;

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
        // A margin at the door: a rate measured before the request's burst arrived is often
        // a little better than the rate while it is served.
        let door = now
            + deadline
                .saturating_duration_since(now)
                .mul_f64(ADMIT_MARGIN);
        if let Some(refusal) = line.refusal(ahead, now, door) {
            return Err(refusal);
        }
        line.in_line += 1;
        METRICS.requests_in_line.inc();
        let seq = line.next_seq;
        line.next_seq += 1;
        let turned_away = Arc::new(TurnedAway::default());
        line.waiting.insert(
            seq,
            Waiter {
                deadline,
                turned_away: Arc::clone(&turned_away),
            },
        );
        Ok(Ticket {
            line: Arc::clone(self),
            seq,
            turned_away,
            started: None,
            ready: false,
            served: false,
        })
    }

    /// A line whose first prediction uses `rate` answers per second (measured at the
    /// model's warm-up) until it has measured its own under load.
    pub fn starting_at(rate: Option<f64>) -> Self {
        let line = Self::default();
        line.state.lock().previous_rate = rate.filter(|r| r.is_finite() && *r > 0.0);
        line
    }

    /// Requests of the model in the server now.
    pub fn in_line(&self) -> usize {
        self.state.lock().in_line
    }

    /// The measured rate, answers per second while busy (`None` before it is known).
    pub fn rate(&self) -> Option<f64> {
        self.state.lock().rate()
    }

    fn leave(&self, seq: u64, started_at: Option<Instant>, ready: bool, served: bool) {
        let started = started_at.is_some();
        let now = Instant::now();
        let mut line = self.state.lock();
        if started {
            line.started -= 1;
        } else {
            line.waiting.remove(&seq);
            if ready {
                line.queued -= 1;
            }
        }
        line.in_line -= 1;
        METRICS.requests_in_line.dec();
        // The model still has work: others hold their slots or wait for them, not merely
        // arriving (slow uploads would teach the arrival rate, not the model's).
        let busy = line.started + line.queued > 0;
        if let (true, false, Some(began)) = (served, busy, started_at) {
            // Served alone: the model answers at least one request per service time, so a
            // rate learnt under heavier contention cannot keep it refusing for good.
            let service = now.saturating_duration_since(began).as_secs_f64();
            if service > 0.0 && line.recent.len() < RATE_MIN_SAMPLES {
                let alone = 1.0 / service;
                line.previous_rate = Some(line.previous_rate.map_or(alone, |r| r.max(alone)));
            }
        }
        if served && busy {
            // This answer measures the model's rate under load.
            if line.recent.len() == RATE_WINDOW {
                line.recent.pop_front();
            }
            line.recent.push_back(now);
            line.turn_away_the_late(now);
        }
        if !busy {
            // The busy period is over: keep its rate, forget its instants (the idle gap
            // that follows must not count).
            line.previous_rate = line.rate();
            line.recent.clear();
        }
    }

    fn ready(&self) {
        self.state.lock().queued += 1;
    }

    fn start(&self, seq: u64, ready: bool) {
        let mut line = self.state.lock();
        if line.waiting.remove(&seq).is_some() {
            line.started += 1;
            if ready {
                line.queued -= 1;
            }
        }
    }
}

impl LineState {
    /// Answers per second: over the last answers of this busy period, else the last one's.
    fn rate(&self) -> Option<f64> {
        let own = (self.recent.len() >= RATE_MIN_SAMPLES)
            .then(|| {
                let span = self.recent.back()?.duration_since(*self.recent.front()?);
                (!span.is_zero()).then(|| (self.recent.len() - 1) as f64 / span.as_secs_f64())
            })
            .flatten();
        own.or(self.previous_rate)
    }

    /// Why a request with `ahead` requests before it cannot be answered by `deadline`, if
    /// it cannot (no rate yet: it can, as far as anyone knows).
    fn refusal(&self, ahead: usize, now: Instant, deadline: Instant) -> Option<Refusal> {
        let rate = self.rate()?;
        let predicted = Duration::try_from_secs_f64((ahead + 1) as f64 / rate).ok()?;
        let left = deadline.saturating_duration_since(now);
        (ahead > 0 && predicted > left).then(|| Refusal {
            // By then enough of the line ahead has been answered for a retry to fit.
            retry_after: round_up_to_seconds(predicted - left),
            predicted,
            ahead,
        })
    }

    /// Turns away every waiting request that can no longer be answered in time at the
    /// current rate, so that it hears so now rather than at its deadline.
    fn turn_away_the_late(&mut self, now: Instant) {
        let started = self.started;
        let late: Vec<(u64, Refusal)> = self
            .waiting
            .iter()
            .enumerate()
            .filter_map(|(i, (seq, w))| Some((*seq, self.refusal(started + i, now, w.deadline)?)))
            .collect();
        for (seq, refusal) in late {
            if let Some(w) = self.waiting.get(&seq) {
                *w.turned_away.refusal.lock() = Some(refusal);
                w.turned_away.notify.notify_one();
            }
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
    seq: u64,
    turned_away: Arc<TurnedAway>,
    /// When its turn came (it got its ring slots).
    started: Option<Instant>,
    /// Its request is whole: it waits only for its ring slots.
    ready: bool,
    served: bool,
}

impl Ticket {
    /// Its turn came (it holds its ring slots): it is being served.
    pub fn start(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
            self.line.start(self.seq, self.ready);
        }
    }

    /// Its request is whole (body read, images fetched): from now on it waits only for
    /// the model, and counts in the model's backlog.
    pub fn ready(&mut self) {
        if !self.ready && self.started.is_none() {
            self.ready = true;
            self.line.ready();
        }
    }

    /// The request was answered by the model (its time counts towards the rate).
    pub fn served(&mut self) {
        self.served = true;
    }

    /// Resolves when the request, still waiting, can no longer be served in time.
    pub async fn turned_away(&self) -> Refusal {
        loop {
            let notified = self.turned_away.notify.notified();
            if let Some(r) = self.turned_away.refusal.lock().clone() {
                return r;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.line
            .leave(self.seq, self.started, self.ready, self.served);
    }
}

/// A call's places in its models' lines, one per model: one for a model route, one per
/// model a workflow's steps reach. Dropping them leaves every line.
#[derive(Default)]
pub struct Tickets(Vec<(String, Ticket)>);

impl Tickets {
    /// Keeps `ticket` as the place in `model`'s line (a second place in one line is dropped).
    pub fn keep(&mut self, model: &str, ticket: Ticket) {
        if !self.holds(model) {
            self.0.push((model.to_owned(), ticket));
        }
    }

    /// Whether it holds a place in `model`'s line.
    pub fn holds(&self, model: &str) -> bool {
        self.0.iter().any(|(m, _)| m == model)
    }

    /// Leaves every line but `model`'s.
    pub fn keep_only(&mut self, model: &str) {
        self.0.retain(|(m, _)| m == model);
    }

    /// Its place in `model`'s line.
    pub fn get(&mut self, model: &str) -> Option<&mut Ticket> {
        self.0.iter_mut().find(|(m, _)| m == model).map(|(_, t)| t)
    }

    /// Its places, by model.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Ticket)> {
        self.0.iter_mut().map(|(m, t)| (m.as_str(), t))
    }

    /// One place per entry of `models` (`None` where the model has no line, is not given,
    /// or came earlier in the list): what concurrent calls of one wave each hold.
    pub fn split(&mut self, models: &[Option<String>]) -> Vec<Option<&mut Ticket>> {
        let mut free: Vec<Option<(&str, &mut Ticket)>> = self
            .0
            .iter_mut()
            .map(|(m, t)| Some((m.as_str(), t)))
            .collect();
        models
            .iter()
            .map(|want| {
                let want = want.as_deref()?;
                free.iter_mut()
                    .find(|e| e.as_ref().is_some_and(|(m, _)| *m == want))
                    .and_then(Option::take)
                    .map(|(_, t)| t)
            })
            .collect()
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
            .map(|_| line.enter(now, now + SECOND).expect("in"))
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

    /// A line that has learnt `rate` answers per second.
    fn line_at(rate: f64) -> Arc<Line> {
        let line = Arc::new(Line::default());
        line.state.lock().previous_rate = Some(rate);
        line
    }

    #[test]
    fn a_request_that_cannot_finish_in_time_is_refused_with_a_retry_after_that_fits() {
        let line = line_at(10.0);
        let now = Instant::now();
        let mut held = Vec::new();
        // With a 1 s deadline, 8 fit (0.8 s of it may be predicted at the door).
        for _ in 0..8 {
            held.push(line.enter(now, now + SECOND).expect("fits"));
        }
        let r = line.enter(now, now + SECOND).err().expect("refused");
        assert_eq!(r.ahead, 8);
        assert!((r.predicted.as_secs_f64() - 0.9).abs() < 1e-9);
        assert_eq!(r.retry_after, SECOND);
        // A longer deadline fits behind the same line.
        assert!(line.enter(now, now + 2 * SECOND).is_ok());
    }

    #[test]
    fn the_rate_is_the_answers_served_while_others_wait_and_idle_gaps_do_not_count() {
        let line = Arc::new(Line::default());
        let far = Instant::now() + Duration::from_secs(60);
        // Served one at a time, 20 ms each: at least 50 per second, a floor.
        for _ in 0..3 {
            let mut t = line.enter(Instant::now(), far).ok().unwrap();
            t.start();
            std::thread::sleep(Duration::from_millis(20));
            t.served();
        }
        let alone = line.rate().expect("a floor");
        assert!(alone > 20.0 && alone <= 50.0, "{alone}/s");
        // Twenty in line, whole and waiting for the model, answered 10 ms apart: about 100
        // per second.
        let mut tickets: Vec<_> = (0..20)
            .map(|_| line.enter(Instant::now(), far).ok().unwrap())
            .collect();
        tickets.iter_mut().for_each(Ticket::ready);
        for mut t in tickets {
            std::thread::sleep(Duration::from_millis(10));
            t.start();
            t.served();
        }
        let rate = line.rate().expect("a rate");
        assert!(rate > 40.0 && rate < 110.0, "{rate}/s");
        // After an idle second, the next busy period starts from the same rate.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(line.rate(), Some(rate));
    }

    #[tokio::test]
    async fn a_waiting_request_that_can_no_longer_make_it_is_turned_away_at_once() {
        // No rate yet: every request comes in.
        let line = Arc::new(Line::default());
        let now = Instant::now();
        let soon = now + Duration::from_millis(500);
        let far = now + Duration::from_secs(600);
        let mut front: Vec<_> = (0..40)
            .map(|_| line.enter(now, far).ok().unwrap())
            .collect();
        front.iter_mut().for_each(Ticket::ready);
        let mut patient = line.enter(now, far).ok().unwrap();
        let mut hurried = line.enter(now, soon).ok().unwrap();
        patient.ready();
        hurried.ready();
        // Answers 20 ms apart (50 per second) while others wait: after ten, 30 are still
        // ahead (0.6 s at that rate), so the 500 ms request cannot be served in time.
        for mut t in front.drain(..10) {
            std::thread::sleep(Duration::from_millis(20));
            t.start();
            t.served();
        }
        let refusal = tokio::time::timeout(Duration::from_millis(100), hurried.turned_away())
            .await
            .expect("turned away before its deadline");
        assert!(refusal.predicted > Duration::ZERO);
        // The patient one stays.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), patient.turned_away())
                .await
                .is_err()
        );
        drop(front);
    }

    #[test]
    fn answers_while_the_others_are_still_arriving_do_not_teach_the_rate() {
        let line = Arc::new(Line::default());
        let far = Instant::now() + Duration::from_secs(60);
        // Twenty let in whose bodies are still uploading (never whole), while one request
        // at a time is served, 10 ms apart: the model is not busy, so no rate of 100 per
        // second is learnt from the uploads' pace.
        let uploading: Vec<_> = (0..20)
            .map(|_| line.enter(Instant::now(), far).ok().unwrap())
            .collect();
        for _ in 0..12 {
            let mut t = line.enter(Instant::now(), far).ok().unwrap();
            t.ready();
            t.start();
            std::thread::sleep(Duration::from_millis(10));
            t.served();
        }
        // Only the floor of requests served alone (each took at least 10 ms).
        let rate = line.rate().expect("a floor");
        assert!(rate <= 100.0, "{rate}/s");
        assert!(line.state.lock().recent.is_empty());
        drop(uploading);
    }

    #[test]
    fn a_line_starts_from_the_warm_up_rate() {
        let line = Arc::new(Line::starting_at(Some(10.0)));
        let now = Instant::now();
        let held: Vec<_> = (0..8)
            .map(|_| line.enter(now, now + SECOND).expect("fits"))
            .collect();
        assert!(line.enter(now, now + SECOND).is_err(), "refused at once");
        drop(held);
        assert_eq!(Line::starting_at(Some(f64::NAN)).rate(), None);
    }
}
