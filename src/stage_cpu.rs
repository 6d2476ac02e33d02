//! CPU time by stage of a request, measured where the work runs: each stage's code runs in a
//! [`span`] that reads the thread's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`) as it enters
//! and leaves and adds the difference to the stage's counter. The HTTP threads are metered
//! whole: from each wake-up to each park (tokio's hooks, [`resume_http`] and [`pause`]) their
//! CPU is the `http` stage (hyper, routing, the body's frames, multipart) but for the spans
//! inside (`json`, `answer`), which are counted once, in their own stage. Spans nest: a span
//! inside another takes its time out of the outer one.
//!
//! Exported as `cvserve_stage_cpu_seconds_total{stage}` (metrics.rs); `cvserve bench` turns
//! its growth into CPU per image and stage.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// A stage of a request's way through the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The HTTP threads outside the spans below: hyper, routing, reading the body.
    Http,
    /// Parsing a JSON request body.
    Json,
    /// Base64 text to image bytes.
    Base64,
    /// Image bytes to RGB pixels in a ring slot (libjpeg-turbo, png, image).
    Decode,
    /// Orient, resize, normalise into the batch tensor.
    Preprocess,
    /// Model outputs to predictions (boxes, NMS, masks, keypoints, classes).
    Postprocess,
    /// Predictions to the JSON answer.
    Answer,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Http,
        Stage::Json,
        Stage::Base64,
        Stage::Decode,
        Stage::Preprocess,
        Stage::Postprocess,
        Stage::Answer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Http => "http",
            Stage::Json => "json",
            Stage::Base64 => "base64",
            Stage::Decode => "decode",
            Stage::Preprocess => "preprocess",
            Stage::Postprocess => "postprocess",
            Stage::Answer => "answer",
        }
    }
}

/// Nanoseconds of CPU by stage, since the last [`take`].
static TOTALS: [AtomicU64; Stage::ALL.len()] = [const { AtomicU64::new(0) }; Stage::ALL.len()];

thread_local! {
    /// The stage this thread's CPU goes to now (none: not metered outside spans) and the
    /// thread clock when it last changed.
    static METER: Cell<(Option<Stage>, u64)> = const { Cell::new((None, 0)) };
}

/// This thread's CPU clock, in nanoseconds.
pub fn thread_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn add(stage: Stage, ns: u64) {
    #[cfg(test)]
    if tests::LOCAL
        .with_borrow_mut(|l| l.as_mut().map(|l| l[stage as usize] += ns))
        .is_some()
    {
        return;
    }
    TOTALS[stage as usize].fetch_add(ns, Ordering::Relaxed);
}

/// Runs `f`, its thread CPU counted in `stage` (and not in the stage around it).
pub fn span<R>(stage: Stage, f: impl FnOnce() -> R) -> R {
    let (outer, mark) = METER.get();
    let start = thread_ns();
    if let Some(outer) = outer {
        add(outer, start.saturating_sub(mark));
    }
    METER.set((Some(stage), start));
    // Closed when `f` returns or unwinds: the thread goes back to the outer stage either way.
    let _close = Close { stage, outer };
    f()
}

/// Ends a span: its time since the last mark to its stage, the thread back to `outer`.
struct Close {
    stage: Stage,
    outer: Option<Stage>,
}

impl Drop for Close {
    fn drop(&mut self) {
        let end = thread_ns();
        let (_, mark) = METER.get();
        add(self.stage, end.saturating_sub(mark));
        METER.set((self.outer, end));
    }
}

/// An HTTP thread starts running: its CPU is the `http` stage until [`pause`].
pub fn resume_http() {
    METER.set((Some(Stage::Http), thread_ns()));
}

/// The thread parks (or stops): what it ran since the last mark goes to its stage.
pub fn pause() {
    let (stage, mark) = METER.get();
    if let Some(stage) = stage {
        add(stage, thread_ns().saturating_sub(mark));
    }
    METER.set((None, 0));
}

/// Seconds of CPU by stage since the last call (each count taken once, however many
/// scrapes run at the same time).
pub fn take() -> Vec<(&'static str, f64)> {
    Stage::ALL
        .iter()
        .map(|&s| {
            let ns = TOTALS[s as usize].swap(0, Ordering::Relaxed);
            (s.name(), ns as f64 / 1e9)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// When set, this thread's counts go here instead of the process's (other tests
        /// decode and answer at the same time).
        pub(super) static LOCAL: RefCell<Option<[u64; Stage::ALL.len()]>> = const { RefCell::new(None) };
    }

    fn burn(ms: u64) {
        let start = thread_ns();
        let mut x = 0u64;
        while thread_ns() - start < ms * 1_000_000 {
            for _ in 0..1000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
    }

    fn ms(stage: Stage) -> f64 {
        LOCAL.with_borrow(|l| l.unwrap()[stage as usize]) as f64 / 1e6
    }

    /// A span counts its own CPU; a span inside it takes its share out of the outer one; a
    /// metered thread's CPU outside spans goes to `http` when it parks, and a thread that is
    /// not metered counts only its spans.
    #[test]
    fn spans_nest_and_the_metered_thread_counts_the_rest() {
        LOCAL.set(Some([0; Stage::ALL.len()]));
        resume_http();
        burn(30);
        span(Stage::Answer, || {
            burn(40);
            span(Stage::Base64, || burn(50));
            burn(40);
        });
        burn(30);
        pause();
        assert!(
            (80.0..90.0).contains(&ms(Stage::Answer)),
            "answer {}",
            ms(Stage::Answer)
        );
        assert!(
            (50.0..55.0).contains(&ms(Stage::Base64)),
            "base64 {}",
            ms(Stage::Base64)
        );
        assert!(
            (60.0..65.0).contains(&ms(Stage::Http)),
            "http {}",
            ms(Stage::Http)
        );
        let http = ms(Stage::Http);
        span(Stage::Decode, || burn(10));
        burn(20);
        assert!(
            (10.0..12.0).contains(&ms(Stage::Decode)),
            "decode {}",
            ms(Stage::Decode)
        );
        assert_eq!(
            ms(Stage::Http),
            http,
            "a paused thread adds nothing to http"
        );
        LOCAL.set(None);
    }

    /// A span whose code panics still closes: the thread's CPU after it goes back to the
    /// stage around it, not to the span's.
    #[test]
    fn a_panicking_span_closes() {
        LOCAL.set(Some([0; Stage::ALL.len()]));
        resume_http();
        let caught = std::panic::catch_unwind(|| span(Stage::Answer, || panic!("bad answer")));
        assert!(caught.is_err());
        let answer = ms(Stage::Answer);
        burn(20);
        pause();
        assert_eq!(ms(Stage::Answer), answer, "nothing more after the panic");
        assert!(ms(Stage::Http) >= 20.0, "http {}", ms(Stage::Http));
        LOCAL.set(None);
    }
}
