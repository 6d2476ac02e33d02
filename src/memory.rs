//! Memory between bursts. On the request path the allocators keep what they freed, so the
//! next request reuses it instead of faulting fresh pages in (glibc's dynamic mmap threshold
//! for ONNX Runtime's buffers, mimalloc's default purge delay for ours). Once the server has
//! been quiet for a while, [`IdleTrimmer`] hands free memory back to the OS, once: the cost
//! of returning memory is paid when nobody waits, never per inference.
//!
//! The trimmer's thread sleeps on a condition variable while the server is busy or already
//! trimmed: an idle server wakes no thread.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// What the trimmer's thread waits on.
#[derive(Default)]
struct Quiet {
    /// The server has no request in it.
    quiet: bool,
    /// Work ran since the last trim.
    dirty: bool,
    /// Bumped on every change, so a wait can tell that something happened.
    generation: u64,
}

/// Returns free memory to the OS once the server has been idle for `after`.
#[derive(Clone)]
pub struct IdleTrimmer {
    shared: Arc<(Mutex<Quiet>, Condvar)>,
}

impl IdleTrimmer {
    /// Starts the trimmer's thread; `trim` does the returning (it runs on that thread).
    pub fn start(after: Duration, trim: impl Fn() + Send + 'static) -> std::io::Result<Self> {
        let shared: Arc<(Mutex<Quiet>, Condvar)> = Arc::default();
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("memory-trim".into())
            .spawn(move || run(&theirs, after, trim))?;
        Ok(Self { shared })
    }

    /// The server has work: a trim pending is called off.
    pub fn busy(&self) {
        let (lock, cond) = &*self.shared;
        let mut q = lock.lock();
        q.quiet = false;
        q.dirty = true;
        q.generation += 1;
        cond.notify_one();
    }

    /// The server has no request any more: trim after the idle time unless work comes.
    /// `still_quiet` is asked under the trimmer's lock (which `busy` takes too), so a request
    /// that came in meanwhile is never mistaken for quiet.
    pub fn quiet(&self, still_quiet: impl FnOnce() -> bool) {
        let (lock, cond) = &*self.shared;
        let mut q = lock.lock();
        if !still_quiet() {
            return;
        }
        q.quiet = true;
        q.generation += 1;
        cond.notify_one();
    }
}

fn run(shared: &(Mutex<Quiet>, Condvar), after: Duration, trim: impl Fn()) {
    let (lock, cond) = shared;
    let mut q = lock.lock();
    loop {
        // Blocks with no timeout until there is something to trim and the server is quiet.
        while !(q.quiet && q.dirty) {
            cond.wait(&mut q);
        }
        let seen = q.generation;
        let until = std::time::Instant::now() + after;
        while q.generation == seen && !cond.wait_until(&mut q, until).timed_out() {}
        if q.generation != seen {
            continue; // work came (or went again): wait for the next quiet moment
        }
        q.dirty = false;
        drop(q);
        let started = std::time::Instant::now();
        trim();
        crate::metrics::METRICS.memory_trims.inc();
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "idle: freed memory returned to the OS"
        );
        q = lock.lock();
    }
}

/// glibc's malloc (ONNX Runtime's buffers) keeps what it frees for reuse: blocks up to
/// [`MMAP_THRESHOLD`] come from its heaps instead of a fresh `mmap` each, and free memory at
/// the top of a heap is not given back on every `free` (that happens in [`IdleTrimmer`]'s
/// `malloc_trim`). Both settings are fixed rather than glibc's dynamic ones, which start at
/// 128 KiB and trim the top of the heap on every free past twice the threshold: activations
/// of a few MiB were then faulted in again on every inference. And one arena for every
/// thread: glibc gives each thread's arena heaps of at most 64 MiB and unmaps a heap as soon
/// as it is wholly free, so a model whose run needs more than one heap (shapes-seg/1) mapped
/// and faulted a fresh one on every inference; the main arena grows without that limit.
/// ONNX Runtime allocates a few hundred blocks per run: one lock is no contention. Call
/// before other threads start.
pub fn keep_freed_memory_for_reuse() {
    // SAFETY: option setters of glibc's malloc, called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Largest block glibc serves from its heaps (its maximum on 64-bit): larger ones are
/// mapped and unmapped each time.
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of a glibc heap before a `free` gives it back on its own.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// Returns the free memory of the calling thread's mimalloc heap and of glibc's heaps (which
/// ONNX Runtime allocates from) to the OS.
pub fn return_free_memory() {
    // SAFETY: both are thread-safe calls of the allocators with no arguments to uphold.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(after: Duration) -> (IdleTrimmer, Arc<AtomicUsize>) {
        let trims = Arc::new(AtomicUsize::new(0));
        let t = Arc::clone(&trims);
        let trimmer = IdleTrimmer::start(after, move || {
            t.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        (trimmer, trims)
    }

    #[test]
    fn trims_once_after_a_quiet_period_and_not_while_busy() {
        let (t, trims) = counting(Duration::from_millis(100));
        // Nothing ran yet: nothing to trim.
        t.quiet(|| true);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(trims.load(Ordering::SeqCst), 0);
        // Busy, quiet for less than the period, busy again: no trim.
        t.busy();
        t.quiet(|| true);
        std::thread::sleep(Duration::from_millis(30));
        t.busy();
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(trims.load(Ordering::SeqCst), 0);
        // Quiet for longer: exactly one trim, however long it stays quiet.
        t.quiet(|| true);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(trims.load(Ordering::SeqCst), 1);
        // The next burst earns the next trim.
        t.busy();
        t.quiet(|| true);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(trims.load(Ordering::SeqCst), 2);
    }
}
