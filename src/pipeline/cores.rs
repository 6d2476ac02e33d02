//! The cores inference runs share, over every model: a run takes as many cores as its
//! session has intra-op threads before it starts and gives them back when it ends, so that
//! however many models and instances are busy at once, no more ONNX Runtime threads are
//! runnable than there are cores. A run waits (blocked, not spinning) for its cores.

use parking_lot::{Condvar, Mutex};

/// A count of cores, taken and given back by inference runs.
pub struct CoreBudget {
    free: Mutex<usize>,
    freed: Condvar,
    total: usize,
}

/// Cores held by one run; given back when dropped.
pub struct CoreLease<'a> {
    budget: &'a CoreBudget,
    cores: usize,
}

impl CoreBudget {
    /// A budget of `cores` cores (at least one).
    pub fn new(cores: usize) -> Self {
        let total = cores.max(1);
        Self {
            free: Mutex::new(total),
            freed: Condvar::new(),
            total,
        }
    }

    /// No limit: for runs that do not compute on the cores (a GPU session).
    pub fn unlimited() -> Self {
        Self::new(usize::MAX / 2)
    }

    /// Cores in the budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Cores no run holds now.
    pub fn available(&self) -> usize {
        *self.free.lock()
    }

    /// Takes `cores` (at most the whole budget), waiting until they are free.
    pub fn acquire(&self, cores: usize) -> CoreLease<'_> {
        let cores = cores.clamp(1, self.total);
        let mut free = self.free.lock();
        while *free < cores {
            self.freed.wait(&mut free);
        }
        *free -= cores;
        CoreLease {
            budget: self,
            cores,
        }
    }

    /// Takes `cores` if they are free now.
    pub fn try_acquire(&self, cores: usize) -> Option<CoreLease<'_>> {
        let cores = cores.clamp(1, self.total);
        let mut free = self.free.lock();
        if *free < cores {
            return None;
        }
        *free -= cores;
        Some(CoreLease {
            budget: self,
            cores,
        })
    }
}

impl Drop for CoreLease<'_> {
    fn drop(&mut self) {
        *self.budget.free.lock() += self.cores;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn runs_wait_for_their_cores_and_never_exceed_the_budget() {
        let budget = Arc::new(CoreBudget::new(2));
        let a = budget.acquire(1);
        let b = budget.acquire(1);
        assert_eq!(budget.available(), 0);
        assert!(budget.try_acquire(1).is_none());
        let waiter = {
            let budget = Arc::clone(&budget);
            std::thread::spawn(move || {
                let _c = budget.acquire(1);
                budget.available()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "waits while every core is held");
        drop(a);
        assert_eq!(waiter.join().unwrap(), 0);
        drop(b);
        assert_eq!(budget.available(), 2);
        // A wide run takes the whole budget, never more.
        let wide = budget.try_acquire(8).expect("all cores");
        assert_eq!(budget.available(), 0);
        drop(wide);
        assert_eq!(budget.available(), 2);
    }
}
