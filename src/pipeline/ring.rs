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

/// The first bytes of every ring file: what marks it as a cvserve ring.
pub const RING_MAGIC: &[u8; 16] = b"cvserve-ring\0v1\0";

/// Bytes before the first slot (the mark, in a page of its own).
const RING_HEADER: usize = 4096;

/// A ring of `slots` slots of `slot_bytes` bytes each, backed by a file on tmpfs.
pub struct Ring {
    /// Keeps the mapping alive; all access goes through `base`.
    _mmap: MmapMut,
    /// The backing file, held open with an exclusive `flock` for the ring's life: a ring
    /// file whose lock can be taken belongs to no live server (see [`remove_stale_rings`]).
    _file: File,
    base: *mut u8,
    slot_bytes: usize,
    slots: usize,
    free: ArrayQueue<u32>,
    in_use: AtomicUsize,
    path: PathBuf,
    /// Woken whenever a slot comes back: requests waiting for one try again.
    released: tokio::sync::Notify,
}

// SAFETY: `base` points into the mapping `_mmap` keeps alive and in place for the ring's
// life. It is only read or written through a `SlotHandle`, and each slot index is owned by
// exactly one handle at a time (the free queue hands every index out once until it comes back).
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Like [`Ring::create`], but when `dir` is too small for `slots` slots (Docker's default
    /// `/dev/shm` is 64 MiB) it creates as many as fit, at least [`MIN_FITTED_SLOTS`], and
    /// says so in the log; below that it fails with what to do. Stale ring files of dead
    /// processes are removed first.
    pub fn create_fitting(
        dir: &Path,
        slots: usize,
        slot_bytes: usize,
    ) -> anyhow::Result<Arc<Self>> {
        let stale = remove_stale_rings(dir);
        if stale > 0 {
            tracing::warn!(dir = %dir.display(), files = stale, "removed ring files of dead processes");
        }
        let available = free_space(dir)?;
        let fitted = fitted_slots(slots, slot_bytes, available).ok_or_else(|| {
            anyhow::anyhow!(
                "ring directory {} has {} MiB free: not even {MIN_FITTED_SLOTS} ring slots of {} MiB fit (RING_SLOT_PIXELS x 3). Give it more room (docker run --shm-size=512m, or a Kubernetes emptyDir with medium: Memory on /dev/shm) or lower RING_SLOT_PIXELS",
                dir.display(),
                available >> 20,
                slot_bytes >> 20
            )
        })?;
        if fitted < slots {
            tracing::warn!(
                dir = %dir.display(),
                free_mib = available >> 20,
                slots = fitted,
                asked = slots,
                "the ring was shrunk to fit its directory: fewer images can be in flight (more 429s under load); give it {} MiB for all RING_SLOTS (docker --shm-size)",
                (slots * slot_bytes) >> 20
            );
        }
        Self::create(dir, fitted, slot_bytes)
    }

    /// Creates the backing file `<dir>/cvserve-ring-<pid>-<random>` (created new, mode 0600:
    /// no other process can have planted or opened it) and maps it. Its whole size is
    /// allocated now (`posix_fallocate`): a tmpfs that fills up later cannot make a first
    /// touch of a slot kill the server with SIGBUS, and a directory without the room fails
    /// here with a clear message.
    pub fn create(dir: &Path, slots: usize, slot_bytes: usize) -> anyhow::Result<Arc<Self>> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        anyhow::ensure!(
            slots > 0 && slot_bytes > 0,
            "ring needs at least one non-empty slot"
        );
        let total = slots
            .checked_mul(slot_bytes)
            .and_then(|t| t.checked_add(RING_HEADER))
            .ok_or_else(|| anyhow::anyhow!("ring size overflows"))?;
        check_free_space(dir, total)?;
        let name = format!(
            "cvserve-ring-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let path = dir.join(name);
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot create ring file {}: {e}", path.display()))?;
        // From here on the file is removed again on every error (and when the ring drops).
        let remove = RemoveOnError(&path);
        // SAFETY: `file` is an open descriptor for the duration of the call.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        anyhow::ensure!(
            locked == 0,
            "cannot lock ring file {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        // SAFETY: `file` is an open descriptor for the duration of the call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
        anyhow::ensure!(
            rc == 0,
            "cannot allocate the {} MiB ring in {}: {} (RING_SLOTS x RING_SLOT_PIXELS x 3; give it more room, e.g. docker --shm-size)",
            total >> 20,
            dir.display(),
            std::io::Error::from_raw_os_error(rc)
        );
        // SAFETY: the file was created new by this call, mode 0600, under a random name, and
        // is locked: another cvserve only ever removes a file it can lock, and nothing here
        // resizes it. Its blocks are allocated, so no access within `total` bytes can fault
        // with SIGBUS (an unlink by someone else keeps the pages while they are mapped).
        let mut mmap = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| anyhow::anyhow!("cannot map ring file {}: {e}", path.display()))?;
        std::mem::forget(remove);
        // The mark before the slots: a hard link to this file or a copy of it is known for a
        // ring by any cvserve, which never takes it for a client's region.
        mmap[..RING_MAGIC.len()].copy_from_slice(RING_MAGIC);
        // SAFETY: the mapping is `total` bytes, RING_HEADER of them before the slots.
        let base = unsafe { mmap.as_mut_ptr().add(RING_HEADER) };
        let free = ArrayQueue::new(slots);
        for i in 0..slots {
            // The queue has exactly `slots` capacity, so this cannot fail.
            let _ = free.push(i as u32);
        }
        Ok(Arc::new(Self {
            _mmap: mmap,
            _file: file,
            base,
            slot_bytes,
            slots,
            free,
            in_use: AtomicUsize::new(0),
            path,
            released: tokio::sync::Notify::new(),
        }))
    }

    /// Takes a free slot, or `None` at once when every slot is in use (the caller answers 429).
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotHandle> {
        let index = self.free.pop()?;
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Some(SlotHandle {
            ring: Arc::clone(self),
            index,
            share: None,
        })
    }

    /// Takes a free slot charged to `share` (one model's count), or `None` when `share`
    /// already holds `limit` slots or none is free: one model's backlog cannot take every
    /// slot from the others.
    pub fn try_acquire_shared(
        self: &Arc<Self>,
        share: &Arc<AtomicUsize>,
        limit: usize,
    ) -> Option<SlotHandle> {
        if share.fetch_add(1, Ordering::AcqRel) >= limit {
            share.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        match self.try_acquire() {
            Some(mut slot) => {
                slot.share = Some(Arc::clone(share));
                Some(slot)
            }
            None => {
                share.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
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
        self.released.notify_waiters();
    }

    /// Notified whenever a slot comes back (register with `notified()` before trying, so a
    /// slot freed in between is not missed).
    pub fn released(&self) -> &tokio::sync::Notify {
        &self.released
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes a half-made ring file unless forgotten.
struct RemoveOnError<'a>(&'a Path);

impl Drop for RemoveOnError<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Fewest slots a ring shrunk to fit its directory may have.
pub const MIN_FITTED_SLOTS: usize = 4;

/// How many slots of `slot_bytes` to create when `available` bytes are free and `wanted`
/// slots were asked for: all of them if they fit; else as many as fit in 90 % of the room
/// (tmpfs is shared with others), if that is at least [`MIN_FITTED_SLOTS`]; else `None`.
pub fn fitted_slots(wanted: usize, slot_bytes: usize, available: u64) -> Option<usize> {
    let needed = wanted as u128 * slot_bytes as u128;
    if available as u128 >= needed {
        return Some(wanted);
    }
    let fit = (available as u128 * 9 / 10 / slot_bytes.max(1) as u128) as usize;
    (fit >= MIN_FITTED_SLOTS.min(wanted)).then_some(fit.min(wanted))
}

/// Free bytes in `dir`'s file system.
pub fn free_space(dir: &Path) -> anyhow::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `statvfs` is plain integers, for which all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and statvfs only writes into `st`; both outlive
    // the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    anyhow::ensure!(
        rc == 0,
        "ring directory {} is not usable: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Removes the ring files no live server holds (a SIGKILLed server leaves its file; in a
/// container's `/dev/shm`, which outlives restarts, it would hold the room the restarted
/// server needs). A live ring holds an exclusive `flock` on its file, so a file whose lock
/// can be taken is stale, whatever its pid (a restarted container's server often has the
/// same pid as the one it replaces). Returns how many were removed.
pub fn remove_stale_rings(dir: &Path) -> usize {
    use std::os::unix::io::AsRawFd;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.starts_with("cvserve-ring-"))
        {
            continue;
        }
        let Ok(file) = File::open(entry.path()) else {
            continue;
        };
        // SAFETY: `file` is an open descriptor for the duration of the call; the lock is
        // released when `file` is closed, after the removal.
        let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if free && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn check_free_space(dir: &Path, needed: usize) -> anyhow::Result<()> {
    let available = free_space(dir)? as u128;
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
    /// The count this slot is charged to, if any.
    share: Option<Arc<AtomicUsize>>,
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
        if let Some(share) = &self.share {
            share.fetch_sub(1, Ordering::AcqRel);
        }
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
    fn a_share_caps_its_slots_and_gets_them_back_on_drop() {
        let ring = tmp_ring(4, 16);
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let a1 = ring.try_acquire_shared(&a, 2).unwrap();
        let _a2 = ring.try_acquire_shared(&a, 2).unwrap();
        assert!(
            ring.try_acquire_shared(&a, 2).is_none(),
            "share of 2 exceeded"
        );
        let _b1 = ring.try_acquire_shared(&b, 2).unwrap();
        let _b2 = ring.try_acquire_shared(&b, 2).unwrap();
        assert_eq!(a.load(Ordering::Relaxed), 2);
        drop(a1);
        assert_eq!(a.load(Ordering::Relaxed), 1);
        assert_eq!(ring.in_use(), 3);
        assert!(ring.try_acquire_shared(&a, 2).is_some());
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

    /// The ring's file is fully allocated (not sparse: no SIGBUS when its tmpfs fills up
    /// later), private to its owner, and named unpredictably.
    #[test]
    fn the_backing_file_is_allocated_private_and_unpredictable() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("cvserve-ring-alloc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (
            Ring::create(&dir, 4, 1 << 20).unwrap(),
            Ring::create(&dir, 1, 4096).unwrap(),
        );
        let meta = std::fs::metadata(a.path()).unwrap();
        assert_eq!(meta.len(), (4 << 20) + RING_HEADER as u64);
        assert!(
            meta.blocks() * 512 >= 4 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_str().unwrap().to_owned();
        let pid = std::process::id().to_string();
        let random = name.strip_prefix(&format!("cvserve-ring-{pid}-")).unwrap();
        assert_eq!(random.len(), 32, "{name}");
        drop((a, b));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_ring_larger_than_the_filesystem() {
        let err = Ring::create(&std::env::temp_dir(), 1 << 20, 1 << 30)
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("free"), "{err}");
    }

    #[test]
    fn a_ring_too_large_for_its_directory_is_shrunk_to_fit_or_refused() {
        let slot = 12 << 20; // the default 4 MP slot
                             // Docker's default /dev/shm (64 MiB) fits 4 of the 32 default slots.
        assert_eq!(fitted_slots(32, slot, 64 << 20), Some(4));
        assert_eq!(fitted_slots(32, slot, 512 << 20), Some(32));
        assert_eq!(fitted_slots(32, slot, 32 << 20), None);
        assert_eq!(fitted_slots(2, slot, 20 << 20), None);
        assert_eq!(fitted_slots(2, 1 << 20, 20 << 20), Some(2));
    }

    #[test]
    fn ring_files_no_live_ring_holds_are_removed_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("cvserve-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Left by a killed server: its own pid's name included (a restarted container's
        // server often gets the same pid).
        let dead = dir.join(format!("cvserve-ring-{}-0123", std::process::id()));
        let dead_other = dir.join("cvserve-ring-4194305");
        let other = dir.join("something-else");
        for f in [&dead, &dead_other, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        let live = Ring::create(&dir, 1, 4096).unwrap();
        assert_eq!(remove_stale_rings(&dir), 2);
        assert!(!dead.exists() && !dead_other.exists());
        assert!(live.path().exists() && other.exists());
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
