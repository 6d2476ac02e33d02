//! Client shared-memory regions (the Open Inference Protocol's system shared-memory
//! extension): a client on the same machine creates a POSIX shared-memory object (`/name`,
//! the file `/dev/shm/name`), registers a window of it here, and then names the window in
//! its requests instead of sending the bytes.
//!
//! A region is never mapped. It is read and written through its file descriptor (`pread`,
//! `pwrite`): a client that truncates or unlinks its object while a request reads it makes
//! that read come up short (an error for that request), where a mapping would raise SIGBUS
//! and kill the server. Reading a frame this way is the one copy a frame makes: straight into
//! its ring slot, where decoded images go (see `pipeline::frame`).
//!
//! Hazards handled here: keys are plain names in the shm directory (no `/` after the first,
//! no `..`, no symlink followed, only regular files, never a cvserve ring); a window must lie
//! inside the object at register and at every use; only local clients may register
//! (ALLOW_CLIENT_SHM); unregister waits for the requests using the region; a region whose
//! object its client has unlinked is dropped (its descriptor closed) when next looked at.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::metrics::METRICS;
use crate::pipeline::ring::RING_MAGIC;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests that may use one region at once (unregister takes them all to wait for them).
const MAX_USERS: u32 = 1 << 20;

/// Who may register regions (ALLOW_CLIENT_SHM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientShm {
    /// Clients connecting from a loopback address (the same machine, or the same pod).
    Local,
    /// Nobody: the extension answers every register with an error.
    Off,
    /// Any client (it still needs the object to exist on this machine).
    Any,
}

/// Why a region could not be registered, used or unregistered (each a 400, except
/// `NotFound`: 404 by Triton's mapping, and `Refused`: 403).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegionError {
    #[error("Unable to find system shared memory region: '{0}'")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
}

/// What `status` reports of a region.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// One registered window of a client's shared-memory object.
#[derive(Debug)]
pub struct Region {
    status: RegionStatus,
    file: File,
    users: Arc<Semaphore>,
}

/// A request's use of a region: unregister waits until it is dropped.
#[derive(Debug)]
pub struct RegionUse {
    region: Arc<Region>,
    _permit: OwnedSemaphorePermit,
}

impl RegionUse {
    pub fn name(&self) -> &str {
        &self.region.status.name
    }

    /// Checks that `len` bytes at `offset` (from the window's start) lie inside the window.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        let size = self.region.status.byte_size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(RegionError::Invalid(format!(
                "{len} bytes at offset {offset} do not fit in shared memory region '{}' of {size} bytes",
                self.name()
            )));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` in the window. A truncated object reads short:
    /// an error, never a signal.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RegionError> {
        self.check(offset, buf.len() as u64)?;
        let at = self.region.status.offset + offset;
        self.region.file.read_exact_at(buf, at).map_err(|e| {
            RegionError::Invalid(format!(
                "reading shared memory region '{}' failed: {}",
                self.name(),
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "its object is smaller than registered (truncated by its owner)".to_string()
                } else {
                    e.to_string()
                }
            ))
        })
    }

    /// Writes `data` at `offset` in the window, only while the object still holds the whole
    /// window (checked just before writing: a truncation racing the write itself can leave
    /// the object sparse up to the window's end, never beyond it).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RegionError> {
        self.check(offset, data.len() as u64)?;
        let at = self.region.status.offset + offset;
        let fail = |why: String| {
            RegionError::Invalid(format!(
                "writing shared memory region '{}' failed: {why}",
                self.name()
            ))
        };
        let size = self
            .region
            .file
            .metadata()
            .map_err(|e| fail(e.to_string()))?
            .len();
        if at + data.len() as u64 > size {
            return Err(fail(
                "its object is smaller than registered (truncated by its owner)".into(),
            ));
        }
        self.region
            .file
            .write_all_at(data, at)
            .map_err(|e| fail(e.to_string()))
    }
}

/// The registered regions, by name.
pub struct Regions {
    dir: PathBuf,
    policy: ClientShm,
    max_regions: usize,
    /// Files that are never a region, by identity (device, inode): the server's ring.
    protected: Vec<(u64, u64)>,
    /// Whose files may be regions: the server's own user, and SHM_ALLOWED_UIDS.
    owners: Vec<u32>,
    map: Mutex<HashMap<String, Arc<Region>>>,
}

impl Regions {
    /// Regions of objects in `dir` (`/dev/shm` on Linux), registered by whom `policy` allows,
    /// at most `max_regions` at once (each holds a file descriptor).
    pub fn new(dir: PathBuf, policy: ClientShm, max_regions: usize) -> Self {
        Self {
            dir,
            policy,
            max_regions,
            protected: Vec::new(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            owners: vec![unsafe { libc::geteuid() }],
            map: Mutex::default(),
        }
    }

    /// Lets the files of `uids` be regions too (besides the server's own user's).
    pub fn owned_by(mut self, uids: &[u32]) -> Self {
        self.owners.extend_from_slice(uids);
        self
    }

    /// Never lets `path` (the server's own ring) be registered, under any name or link.
    pub fn protect(mut self, path: &std::path::Path) -> Self {
        if let Ok(m) = std::fs::metadata(path) {
            self.protected.push((m.dev(), m.ino()));
        }
        self
    }

    /// Whether a client at `peer` may use the extension at all (register, status,
    /// unregister, and name a region in a request): ALLOW_CLIENT_SHM.
    pub fn allowed(&self, peer: Option<IpAddr>) -> Result<(), RegionError> {
        match (self.policy, peer) {
            (ClientShm::Off, _) => Err(RegionError::Refused(
                "System shared memory is disabled on this server (ALLOW_CLIENT_SHM=off)".into(),
            )),
            (ClientShm::Local, Some(ip)) if ip.to_canonical().is_loopback() => Ok(()),
            (ClientShm::Local, _) => Err(RegionError::Refused(
                "System shared memory may only be used by clients on this machine (a loopback address; ALLOW_CLIENT_SHM=local)".into(),
            )),
            (ClientShm::Any, _) => Ok(()),
        }
    }

    /// Registers `byte_size` bytes at `offset` of the object `key` as `name`, for a client
    /// at `peer`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
        peer: Option<IpAddr>,
    ) -> Result<(), RegionError> {
        self.allowed(peer)?;
        if name.is_empty() || name.len() > 256 {
            return Err(RegionError::Invalid(
                "a region name must have 1 to 256 characters".into(),
            ));
        }
        if byte_size == 0 {
            return Err(RegionError::Invalid(format!(
                "shared memory region '{name}' must have a byte_size above 0"
            )));
        }
        let file = self.open(key)?;
        let meta = file
            .metadata()
            .map_err(|e| RegionError::Invalid(format!("cannot read '{key}': {e}")))?;
        if offset
            .checked_add(byte_size)
            .is_none_or(|end| end > meta.len())
        {
            return Err(RegionError::Invalid(format!(
                "shared memory region '{name}': {byte_size} bytes at offset {offset} do not fit in '{key}' ({} bytes)",
                meta.len()
            )));
        }
        let mut map = self.map.lock();
        sweep(&mut map);
        if map.contains_key(name) {
            return Err(RegionError::Invalid(format!(
                "shared memory region '{name}' is already registered"
            )));
        }
        if map.len() >= self.max_regions {
            return Err(RegionError::Invalid(format!(
                "{} shared memory regions are registered, the most this server holds (MAX_SHM_REGIONS); unregister some first",
                map.len()
            )));
        }
        map.insert(
            name.to_owned(),
            Arc::new(Region {
                status: RegionStatus {
                    name: name.to_owned(),
                    key: key.to_owned(),
                    offset,
                    byte_size,
                },
                file,
                users: Arc::new(Semaphore::new(MAX_USERS as usize)),
            }),
        );
        Ok(())
    }

    /// Opens the object `key` (`/name`) in the shm directory, read-write, refusing anything
    /// but a plain name of a regular file that is not a cvserve ring.
    fn open(&self, key: &str) -> Result<File, RegionError> {
        let invalid = |why: &str| {
            RegionError::Invalid(format!("shared memory key '{key}' is not accepted: {why}"))
        };
        let Some(name) = key.strip_prefix('/') else {
            return Err(invalid("a key is a POSIX shared memory name, '/name'"));
        };
        if name.is_empty()
            || name.len() > 255
            || name.starts_with('.')
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(invalid(
                "the name after '/' may hold letters, digits, '.', '_' and '-' (not first '.')",
            ));
        }
        if name.starts_with("cvserve-ring-") {
            return Err(invalid("it names a cvserve ring"));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(self.dir.join(name))
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    invalid("no such shared memory object on this machine")
                } else {
                    invalid(&e.to_string())
                }
            })?;
        let meta = file.metadata().map_err(|e| invalid(&e.to_string()))?;
        if !meta.file_type().is_file() {
            return Err(invalid("not a regular file"));
        }
        if self.protected.contains(&(meta.dev(), meta.ino())) {
            return Err(invalid("it is this server's ring"));
        }
        // The server writes with its own rights: never into another user's file, even one
        // it could open (a client cannot lend it rights the client lacks).
        if !self.owners.contains(&meta.uid()) {
            METRICS
                .shm_refused
                .with_label_values(&["foreign_owner"])
                .inc();
            return Err(RegionError::Refused(format!(
                "shared memory key '{key}' is not accepted: its file belongs to uid {}, not to this server's user (SHM_ALLOWED_UIDS)",
                meta.uid()
            )));
        }
        // Any cvserve's ring (a hard link or a copy of one) carries its mark.
        let mut head = [0u8; RING_MAGIC.len()];
        if file.read_exact_at(&mut head, 0).is_ok() && &head == RING_MAGIC {
            METRICS.shm_refused.with_label_values(&["ring"]).inc();
            return Err(invalid("it is a cvserve ring"));
        }
        Ok(file)
    }

    /// The region `name`, for one request's use by a client at `peer`.
    pub fn get(&self, name: &str, peer: Option<IpAddr>) -> Result<RegionUse, RegionError> {
        self.allowed(peer)?;
        let region = {
            let mut map = self.map.lock();
            let region = map
                .get(name)
                .cloned()
                .ok_or_else(|| RegionError::NotFound(name.to_owned()))?;
            // Its object unlinked by its owner: dropped (only this one is looked at here).
            if !linked(&region) {
                map.remove(name);
                return Err(RegionError::NotFound(name.to_owned()));
            }
            region
        };
        let permit = Arc::clone(&region.users)
            .try_acquire_owned()
            .map_err(|_| RegionError::NotFound(name.to_owned()))?;
        Ok(RegionUse {
            region,
            _permit: permit,
        })
    }

    /// The region `name`, or all, sorted by name.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>, RegionError> {
        let mut map = self.map.lock();
        sweep(&mut map);
        if let Some(name) = name {
            return map
                .get(name)
                .map(|r| vec![r.status.clone()])
                .ok_or_else(|| RegionError::NotFound(name.to_owned()));
        }
        let mut all: Vec<_> = map.values().map(|r| r.status.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Unregisters `name` (none: every region; an unknown name is not an error, as in
    /// Triton), then waits up to `wait` for the requests still using them: once it returns,
    /// nothing reads or writes them any more (unless it timed out: `false`).
    pub async fn unregister(&self, name: Option<&str>, wait: Duration) -> bool {
        let removed: Vec<Arc<Region>> = {
            let mut map = self.map.lock();
            match name {
                Some(n) => map.remove(n).into_iter().collect(),
                None => map.drain().map(|(_, r)| r).collect(),
            }
        };
        if name.is_none() {
            // Open to any client (Triton's clients call it with no name), and so recorded.
            METRICS.shm_unregister_all.inc();
            tracing::info!(
                regions = removed.len(),
                "every shared-memory region unregistered"
            );
        }
        let waits = removed.iter().map(|r| {
            let users = Arc::clone(&r.users);
            async move {
                let all = Arc::clone(&users).acquire_many_owned(MAX_USERS).await;
                // No use can start once it is closed (and removed from the map).
                users.close();
                drop(all);
            }
        });
        tokio::time::timeout(wait, futures_util::future::join_all(waits))
            .await
            .is_ok()
    }

    /// Regions registered now.
    pub fn count(&self) -> usize {
        self.map.lock().len()
    }
}

/// Drops regions whose object its client unlinked (went away without unregistering): their
/// descriptors close once no request uses them.
fn sweep(map: &mut HashMap<String, Arc<Region>>) {
    map.retain(|_, r| linked(r));
}

fn linked(r: &Region) -> bool {
    r.file.metadata().is_ok_and(|m| m.nlink() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const LOCAL: Option<IpAddr> = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));

    fn dir() -> (PathBuf, Regions) {
        let dir = std::env::temp_dir().join(format!(
            "cvserve-regions-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let regions = Regions::new(dir.clone(), ClientShm::Local, 4);
        (dir, regions)
    }

    #[test]
    fn keys_outside_the_shm_directory_or_naming_a_ring_are_refused() {
        let (dir, regions) = dir();
        std::fs::write(dir.join("ok"), [0u8; 64]).unwrap();
        std::fs::write(dir.join("cvserve-ring-1-2"), [0u8; 64]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        for key in [
            "ok",
            "/../etc/passwd",
            "/sub/x",
            "/..",
            "/.hidden",
            "/",
            "/cvserve-ring-1-2",
            "/link",
            "/sub",
            "/missing",
        ] {
            let r = regions.register("r", key, 0, 8, LOCAL);
            assert!(matches!(r, Err(RegionError::Invalid(_))), "{key}: {r:?}");
        }
        regions.register("r", "/ok", 0, 64, LOCAL).unwrap();
        // The server's ring under another name (a hard link) is still the ring.
        std::fs::write(dir.join("ring"), [0u8; 64]).unwrap();
        std::fs::hard_link(dir.join("ring"), dir.join("alias")).unwrap();
        let regions = Regions::new(dir.clone(), ClientShm::Local, 4).protect(&dir.join("ring"));
        let r = regions.register("a", "/alias", 0, 8, LOCAL);
        assert!(r.unwrap_err().to_string().contains("ring"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn windows_must_fit_at_register_and_at_every_use() {
        let (dir, regions) = dir();
        std::fs::write(dir.join("obj"), [7u8; 100]).unwrap();
        assert!(regions.register("big", "/obj", 0, 101, LOCAL).is_err());
        assert!(regions.register("far", "/obj", 90, 11, LOCAL).is_err());
        assert!(regions
            .register("wrap", "/obj", u64::MAX, 2, LOCAL)
            .is_err());
        regions.register("r", "/obj", 10, 80, LOCAL).unwrap();
        let used = regions.get("r", LOCAL).unwrap();
        let mut buf = [0u8; 10];
        used.read_at(70, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 10]);
        assert!(used.read_at(71, &mut buf).is_err());
        assert!(used.check(u64::MAX, 2).is_err());
        // Truncated by its owner: the read fails, no signal.
        std::fs::File::options()
            .write(true)
            .open(dir.join("obj"))
            .unwrap()
            .set_len(15)
            .unwrap();
        let e = used.read_at(0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(used.write_at(0, &buf).is_err());
        assert_eq!(std::fs::metadata(dir.join("obj")).unwrap().len(), 15);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_local_clients_register_by_default() {
        let (dir, regions) = dir();
        std::fs::write(dir.join("obj"), [0u8; 8]).unwrap();
        let remote = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(matches!(
            regions.register("r", "/obj", 0, 8, remote),
            Err(RegionError::Refused(_))
        ));
        assert!(regions.register("r", "/obj", 0, 8, None).is_err());
        regions
            .register("r6", "/obj", 0, 8, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)))
            .unwrap();
        let off = Regions::new(dir.clone(), ClientShm::Off, 4);
        assert!(off.register("r", "/obj", 0, 8, LOCAL).is_err());
        // A remote client may not name a local client's region either, nor list them.
        assert!(matches!(
            regions.get("r6", remote),
            Err(RegionError::Refused(_))
        ));
        assert!(regions.allowed(remote).is_err());
        let any = Regions::new(dir.clone(), ClientShm::Any, 4);
        any.register("r", "/obj", 0, 8, remote).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn unregister_waits_for_users_and_unlinked_objects_are_dropped() {
        let (dir, regions) = dir();
        std::fs::write(dir.join("obj"), [0u8; 8]).unwrap();
        std::fs::write(dir.join("gone"), [0u8; 8]).unwrap();
        regions.register("r", "/obj", 0, 8, LOCAL).unwrap();
        regions.register("g", "/gone", 0, 8, LOCAL).unwrap();
        assert!(regions.register("r", "/obj", 0, 8, LOCAL).is_err());
        std::fs::remove_file(dir.join("gone")).unwrap();
        let names: Vec<_> = regions
            .status(None)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["r"]);
        // A use outlives a timed-out unregister; the region is gone for new uses at once.
        std::fs::write(dir.join("slow"), [0u8; 8]).unwrap();
        regions.register("s", "/slow", 0, 8, LOCAL).unwrap();
        let held = regions.get("s", LOCAL).unwrap();
        assert!(
            !regions
                .unregister(Some("s"), Duration::from_millis(50))
                .await
        );
        assert!(matches!(
            regions.get("s", LOCAL),
            Err(RegionError::NotFound(_))
        ));
        drop(held);
        // Unregister returns once the last use is dropped.
        let used = regions.get("r", LOCAL).unwrap();
        let regions = Arc::new(regions);
        let r2 = Arc::clone(&regions);
        let waiter = tokio::spawn(async move { r2.unregister(None, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        assert!(matches!(
            regions.get("r", LOCAL),
            Err(RegionError::NotFound(_))
        ));
        drop(used);
        assert!(waiter.await.unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
