//! CPU time by pool, from the kernel's own per-thread accounting: each thread of the
//! process is named for its pool (`http`, `decode-N`, `preprocess-N`, `infer-<model>-N`,
//! `postprocess-N`, `batcher-<model>`), and `/proc/self/task/<tid>/schedstat` counts the
//! nanoseconds each ran. At every scrape the growth of each live thread's count is added to
//! its pool's counter, so the counters only grow (a thread that ended takes with it only
//! what it ran since the last scrape). Threads that ONNX Runtime starts for an instance
//! inherit the instance thread's name, so inference counts them.

use std::collections::HashMap;

use parking_lot::Mutex;

/// The pool a thread's name says it belongs to.
pub fn pool_of(comm: &str) -> &'static str {
    let comm = comm.trim();
    if comm == "http" {
        "http"
    } else if comm.starts_with("decode-") {
        "decode"
    } else if comm.starts_with("preprocess-") {
        "preprocess"
    } else if comm.starts_with("postprocess-") {
        "postprocess"
    } else if comm.starts_with("infer-") {
        "inference"
    } else if comm.starts_with("batcher-") {
        "batcher"
    } else {
        "other"
    }
}

/// Each live thread's last count (ns), by thread id.
static SEEN: Mutex<Option<HashMap<u32, u64>>> = Mutex::new(None);

/// The CPU each pool ran since the last call (seconds), read from /proc (empty elsewhere).
pub fn take_growth() -> Vec<(&'static str, f64)> {
    let mut seen = SEEN.lock();
    growth_since(seen.get_or_insert_with(HashMap::new))
}

/// The CPU each pool ran since the counts in `seen`, which it brings up to date.
fn growth_since(seen: &mut HashMap<u32, u64>) -> Vec<(&'static str, f64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut now: HashMap<u32, u64> = HashMap::with_capacity(seen.len());
    let mut growth: HashMap<&'static str, u64> = HashMap::new();
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let path = t.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
        else {
            continue;
        };
        let before = seen.get(&tid).copied().unwrap_or(0);
        *growth.entry(pool_of(&comm)).or_default() += ns.saturating_sub(before);
        now.insert(tid, ns);
    }
    *seen = now;
    growth
        .into_iter()
        .map(|(k, ns)| (k, ns as f64 / 1e9))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_by_thread_name() {
        assert_eq!(pool_of("http\n"), "http");
        assert_eq!(pool_of("decode-0"), "decode");
        assert_eq!(pool_of("preprocess-1"), "preprocess");
        assert_eq!(pool_of("postprocess-0"), "postprocess");
        assert_eq!(pool_of("infer-coco/1-0"), "inference");
        assert_eq!(pool_of("batcher-coco/1"), "batcher");
        assert_eq!(pool_of("start-coco/1"), "other");
        assert_eq!(pool_of("cvserve"), "other");
    }

    /// A thread named for a pool that burns CPU shows up in that pool's growth, once: the
    /// next reading counts only what ran since.
    #[test]
    fn a_busy_thread_counts_in_its_pool() {
        let mut seen = HashMap::new();
        let _ = growth_since(&mut seen);
        let again = std::thread::Builder::new()
            .name("decode-99".into())
            .spawn(move || {
                // Busy until this thread has run 150 ms of CPU (by its own clock).
                let own = || crate::stage_cpu::thread_ns() as f64 / 1e9;
                let (start, wall) = (own(), std::time::Instant::now());
                let mut x = 0u64;
                while own() - start < 0.15 && wall.elapsed().as_secs() < 20 {
                    for _ in 0..10_000 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                }
                std::hint::black_box(x);
                // Read while this thread is alive, so its time is seen.
                (growth_since(&mut seen), seen)
            })
            .unwrap()
            .join()
            .map(|(g, seen)| {
                let decode = g.iter().find(|(p, _)| *p == "decode").map_or(0.0, |x| x.1);
                assert!(decode >= 0.14, "decode pool ran {decode} s: {g:?}");
                seen
            })
            .map(|mut seen| growth_since(&mut seen))
            .unwrap();
        let decode = again
            .iter()
            .find(|(p, _)| *p == "decode")
            .map_or(0.0, |x| x.1);
        assert!(decode < 0.05, "counted twice: {again:?}");
    }
}
