//! The pipeline's own threads (batchers, inference instances, sessions being made, model
//! loads), counted so that shutdown can wait for them: the process must not return from
//! `main` while one is inside a session run, with its tensors alive, as ONNX Runtime's and
//! CUDA's static destructors run.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

static LIVE: Mutex<usize> = Mutex::new(0);
static ENDED: Condvar = Condvar::new();

/// One thread counted as live until dropped (move it into the thread when spawning it).
pub struct Live(());

impl Drop for Live {
    fn drop(&mut self) {
        let mut live = LIVE.lock();
        *live -= 1;
        ENDED.notify_all();
    }
}

/// Counts a thread about to be spawned.
pub fn live() -> Live {
    *LIVE.lock() += 1;
    Live(())
}

/// Pipeline threads running now.
pub fn running() -> usize {
    *LIVE.lock()
}

/// Waits until every pipeline thread has ended, at most `limit`; `false` when some still
/// run then.
pub fn wait_all(limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut live = LIVE.lock();
    while *live > 0 {
        if ENDED.wait_until(&mut live, until).timed_out() {
            return *live == 0;
        }
    }
    true
}

/// Spawns a named pipeline thread, counted while it runs.
pub fn spawn<F>(name: String, work: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let counted = live();
    std::thread::Builder::new().name(name).spawn(move || {
        let _counted = counted;
        work()
    })
}
