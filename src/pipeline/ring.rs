//! The shared-memory ring: a fixed number of fixed-size slots in one memory-mapped file on
//! tmpfs. Decode writes an image's RGB pixels into a slot; preprocessing reads them straight
//! into the batch tensor. Between the stages only a [`SlotHandle`] (an index) travels.
//!
//! A slot is free again when its handle is dropped, on every path (success, error, cancelled
//! request, panic unwinding), so a slot cannot leak.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use memmap2::MmapMut;

/// A ring of `slots` slots of `slot_bytes` bytes each, backed by a file on tmpfs.
pub struct Ring {
    /// Keeps the mapping alive; all access goes through `base`.
    _mmap: MmapMut,
    base: *mut u8,
    slot_bytes: usize,
    slots: usize,
    free: ArrayQueue<u32>,
    in_use: AtomicUsize,
    path: PathBuf,
}

// SAFETY: the mapping is only written through a `SlotHandle`, and each slot index is owned by
// exactly one handle at a time (the free queue hands every index out once until it comes back).
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Creates the backing file `<dir>/cvserve-ring-<pid>` (`-<n>` for the n-th further ring
    /// of the process, e.g. in tests) and maps it.
    ///
    /// Fails with a clear message when `dir` has less free space than the ring needs, rather
    /// than dying later with SIGBUS when a page of a full tmpfs is first touched.
    pub fn create(dir: &Path, slots: usize, slot_bytes: usize) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(
            slots > 0 && slot_bytes > 0,
            "ring needs at least one non-empty slot"
        );
        let total = slots
            .checked_mul(slot_bytes)
            .ok_or_else(|| anyhow::anyhow!("ring size overflows"))?;
        check_free_space(dir, total)?;
        static RINGS: AtomicUsize = AtomicUsize::new(0);
        let name = match RINGS.fetch_add(1, Ordering::Relaxed) {
            0 => format!("cvserve-ring-{}", std::process::id()),
            n => format!("cvserve-ring-{}-{n}", std::process::id()),
        };
        let path = dir.join(name);
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot create ring file {}: {e}", path.display()))?;
        file.set_len(total as u64)?;
        // SAFETY: the file is ours (pid-named, truncated); nobody else resizes it.
        let mut mmap = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| anyhow::anyhow!("cannot map ring file {}: {e}", path.display()))?;
        let base = mmap.as_mut_ptr();
        let free = ArrayQueue::new(slots);
        for i in 0..slots {
            // The queue has exactly `slots` capacity, so this cannot fail.
            let _ = free.push(i as u32);
        }
        Ok(Arc::new(Self {
            _mmap: mmap,
            base,
            slot_bytes,
            slots,
            free,
            in_use: AtomicUsize::new(0),
            path,
        }))
    }

    /// Takes a free slot, or `None` at once when every slot is in use (the caller answers 429).
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotHandle> {
        let index = self.free.pop()?;
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Some(SlotHandle {
            ring: Arc::clone(self),
            index,
        })
    }

    /// Bytes one slot holds.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Slots currently held by a request.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Path of the backing file (removed when the ring is dropped).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn release(&self, index: u32) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        // Only indices handed out by `try_acquire` come back, so the queue has room.
        let _ = self.free.push(index);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn check_free_space(dir: &Path, needed: usize) -> anyhow::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs only writes into the struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    anyhow::ensure!(
        rc == 0,
        "ring directory {} is not usable: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    let available = st.f_bavail as u128 * st.f_frsize as u128;
    anyhow::ensure!(
        available >= needed as u128,
        "ring directory {} has {} MiB free but the ring needs {} MiB \
         (RING_SLOTS x RING_SLOT_PIXELS x 3); lower them or give it more room (docker --shm-size)",
        dir.display(),
        available / (1 << 20),
        needed / (1 << 20)
    );
    Ok(())
}

/// Exclusive ownership of one ring slot; the slot returns to the ring when this is dropped.
pub struct SlotHandle {
    ring: Arc<Ring>,
    index: u32,
}

impl SlotHandle {
    /// Index of the slot in the ring.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The slot's bytes, for reading.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `index < slots` and this handle is the slot's only owner.
        unsafe {
            std::slice::from_raw_parts(
                self.ring
                    .base
                    .add(self.index as usize * self.ring.slot_bytes),
                self.ring.slot_bytes,
            )
        }
    }

    /// The slot's bytes, for writing.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the borrow exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ring
                    .base
                    .add(self.index as usize * self.ring.slot_bytes),
                self.ring.slot_bytes,
            )
        }
    }
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        self.ring.release(self.index);
    }
}

impl std::fmt::Debug for SlotHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotHandle({})", self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_ring(slots: usize, bytes: usize) -> Arc<Ring> {
        Ring::create(&std::env::temp_dir(), slots, bytes).expect("ring")
    }

    #[test]
    fn hands_out_each_slot_once_and_refuses_when_full() {
        let ring = tmp_ring(3, 16);
        let a = ring.try_acquire().unwrap();
        let b = ring.try_acquire().unwrap();
        let c = ring.try_acquire().unwrap();
        let mut idx = [a.index(), b.index(), c.index()];
        idx.sort();
        assert_eq!(idx, [0, 1, 2]);
        assert!(ring.try_acquire().is_none());
        assert_eq!(ring.in_use(), 3);
        drop(b);
        assert_eq!(ring.in_use(), 2);
        assert!(ring.try_acquire().is_some());
    }

    #[test]
    fn slots_do_not_overlap() {
        let ring = tmp_ring(2, 8);
        let mut a = ring.try_acquire().unwrap();
        let mut b = ring.try_acquire().unwrap();
        a.bytes_mut().fill(1);
        b.bytes_mut().fill(2);
        assert!(a.bytes().iter().all(|&v| v == 1));
        assert!(b.bytes().iter().all(|&v| v == 2));
    }

    #[test]
    fn backing_file_is_removed_with_the_ring() {
        let dir = std::env::temp_dir().join(format!("cvserve-ring-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ring = Ring::create(&dir, 1, 8).unwrap();
        let path = ring.path().to_path_buf();
        assert!(path.exists());
        drop(ring);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_ring_larger_than_the_filesystem() {
        let err = Ring::create(&std::env::temp_dir(), 1 << 20, 1 << 30)
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("free"), "{err}");
    }
}
