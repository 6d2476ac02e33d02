//! MAX_BODY_MEMORY_BYTES: the bytes of request bodies, and of images fetched for them, that
//! the server holds at once, and BODY_MEMORY_PEER_SHARE of it that one client address may
//! hold. Each holder keeps a [`BodyLease`], grown as its bytes arrive (never for bytes only
//! promised by a Content-Length) and given back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::ApiError;
use crate::metrics::METRICS;

/// The server's body memory, in KiB, and what each client address holds of it.
pub struct BodyBudget {
    total_kib: usize,
    per_peer_kib: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total_kib: usize,
    /// Only addresses holding something are present.
    by_peer: HashMap<IpAddr, usize>,
}

/// Why a lease could not grow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetFull {
    /// The server holds MAX_BODY_MEMORY_BYTES.
    Server,
    /// This client address holds its BODY_MEMORY_PEER_SHARE.
    Peer,
}

impl BodyBudget {
    /// `total_bytes`, of which one address may hold `peer_share` but never less than
    /// `largest_body`.
    pub fn new(total_bytes: usize, peer_share: f64, largest_body: usize) -> Arc<Self> {
        let total_kib = total_bytes.div_ceil(1024).max(1);
        let share = (total_kib as f64 * peer_share).ceil() as usize;
        Arc::new(Self {
            total_kib,
            per_peer_kib: share.max(largest_body.div_ceil(1024)).clamp(1, total_kib),
            held: Mutex::default(),
        })
    }

    /// An empty lease for a body from `peer` (unknown: counted under the server total only).
    pub fn lease(self: &Arc<Self>, peer: Option<IpAddr>) -> BodyLease {
        BodyLease {
            budget: Arc::clone(self),
            peer,
            kib: 0,
        }
    }

    /// The most one client address may hold, in bytes.
    pub fn per_peer_bytes(&self) -> usize {
        self.per_peer_kib * 1024
    }

    /// Bytes held now by `peer`.
    pub fn held_by(&self, peer: IpAddr) -> usize {
        self.held.lock().by_peer.get(&peer).copied().unwrap_or(0) * 1024
    }

    fn grow(&self, peer: Option<IpAddr>, kib: usize) -> Result<(), BudgetFull> {
        let mut held = self.held.lock();
        if held.total_kib + kib > self.total_kib {
            return Err(BudgetFull::Server);
        }
        if let Some(peer) = peer {
            let mine = held.by_peer.entry(peer).or_default();
            if *mine + kib > self.per_peer_kib {
                if *mine == 0 {
                    held.by_peer.remove(&peer);
                }
                return Err(BudgetFull::Peer);
            }
            *mine += kib;
        }
        held.total_kib += kib;
        Ok(())
    }

    fn release(&self, peer: Option<IpAddr>, kib: usize) {
        let mut held = self.held.lock();
        held.total_kib -= kib;
        if let Some(peer) = peer {
            if let Some(mine) = held.by_peer.get_mut(&peer) {
                *mine -= kib;
                if *mine == 0 {
                    held.by_peer.remove(&peer);
                }
            }
        }
    }
}

/// The share of the body budget one body (or fetched image) holds.
pub struct BodyLease {
    budget: Arc<BodyBudget>,
    peer: Option<IpAddr>,
    kib: usize,
}

impl BodyLease {
    /// Grows the lease to cover `total` bytes.
    pub fn cover(&mut self, total: usize) -> Result<(), BudgetFull> {
        let needed = total.div_ceil(1024);
        if needed <= self.kib {
            return Ok(());
        }
        self.budget.grow(self.peer, needed - self.kib)?;
        METRICS
            .body_bytes_held
            .add(((needed - self.kib) * 1024) as i64);
        self.kib = needed;
        Ok(())
    }

    /// The most one client address may hold, in bytes.
    pub fn per_peer_bytes(&self) -> usize {
        self.budget.per_peer_bytes()
    }

    /// Bytes this lease holds of the budget (whole KiB).
    pub fn held_bytes(&self) -> usize {
        self.kib * 1024
    }

    /// Bytes the lease would hold once covering `total`.
    pub fn held_bytes_for(&self, total: usize) -> usize {
        total.div_ceil(1024).max(self.kib) * 1024
    }

    /// Shrinks the lease to cover only `total` bytes (never grows it).
    pub fn shrink_to(&mut self, total: usize) {
        let needed = total.div_ceil(1024);
        if needed < self.kib {
            let extra = self.kib - needed;
            self.budget.release(self.peer, extra);
            METRICS.body_bytes_held.sub((extra * 1024) as i64);
            self.kib = needed;
        }
    }

    /// Gives back everything held (the lease stays usable).
    pub fn clear(&mut self) {
        if self.kib > 0 {
            self.budget.release(self.peer, self.kib);
            METRICS.body_bytes_held.sub((self.kib * 1024) as i64);
            self.kib = 0;
        }
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The address a client's bodies count under: its IPv4 address, or the /64 network of its
/// IPv6 address (one host commonly holds a whole /64).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The 429 for a lease that could not grow: a retry succeeds once bodies are answered.
pub fn body_memory_full(why: BudgetFull) -> ApiError {
    ApiError::overloaded(match why {
        BudgetFull::Server => "Server overloaded: it holds as many request bodies as it may (MAX_BODY_MEMORY_BYTES); retry shortly",
        BudgetFull::Peer => "Too many request bodies from this client address are being received at once (BODY_MEMORY_PEER_SHARE of MAX_BODY_MEMORY_BYTES); retry shortly",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_count_by_ipv4_address_or_ipv6_network() {
        let key = |s: &str| client_key(s.parse().unwrap()).to_string();
        assert_eq!(key("10.1.2.3"), "10.1.2.3");
        assert_eq!(key("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::1"), "2001:db8:1:2::");
    }

    #[test]
    fn one_address_holds_at_most_its_share_and_gets_it_back() {
        let budget = BodyBudget::new(100 * 1024, 0.25, 1024);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut first = budget.lease(Some(a));
        first.cover(20 * 1024).unwrap();
        let mut second = budget.lease(Some(a));
        assert_eq!(second.cover(6 * 1024), Err(BudgetFull::Peer));
        second.cover(5 * 1024).unwrap();
        assert_eq!(budget.held_by(a), 25 * 1024);
        // Another address still has its share, up to what the server has left.
        let mut other = budget.lease(Some(b));
        other.cover(25 * 1024).unwrap();
        let mut unknown = budget.lease(None);
        assert_eq!(unknown.cover(51 * 1024), Err(BudgetFull::Server));
        unknown.cover(50 * 1024).unwrap();
        drop(first);
        drop(second);
        assert_eq!(budget.held_by(a), 0);
        assert!(!budget.held.lock().by_peer.contains_key(&a));
        let mut again = budget.lease(Some(a));
        again.cover(25 * 1024).unwrap();
    }
}
