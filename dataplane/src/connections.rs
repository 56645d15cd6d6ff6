//! Which client connections are served (issue #31, finding 5). Before, a
//! connection held one of `--max-connections` from its accept until the
//! keep-alive timeout, whether or not it ever sent a byte: 4,096 idle
//! sockets (no token, no byte) denied every agent for 60 s, and of the
//! connections past the limit most were closed without the documented 503.
//!
//! Now a connection waits for its first byte (at most [`FIRST_BYTE`])
//! before it takes a serving slot, so silence costs a socket, not service;
//! one client address may hold at most [`address_share`] of the slots, so
//! one flood leaves the others theirs; and every connection past the limit
//! that sent a request is answered 503 with `Retry-After`. The book is pure
//! (counts in, decisions out); `lib.rs` does the I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a new connection may stay silent. A client sends its request
/// as soon as it has connected (TLS is not spoken here); seconds cover a
/// loaded client machine, and bound what an idle socket holds.
pub const FIRST_BYTE: Duration = Duration::from_secs(5);

/// Connections waiting for their first byte (or for their 503 to be
/// read), per slot served, and at least [`MIN_WAITING`]: enough to absorb a
/// flood of idle sockets several times the slots without refusing the real
/// clients among them, and to answer a burst past the limit gracefully,
/// bounded well below a sidecar's descriptor limit.
pub const WAITING_PER_SLOT: usize = 4;
pub const MIN_WAITING: usize = 1024;

/// The slots one client address may hold: all but an eighth, kept for
/// everyone else. A sidecar's single local client still gets nearly all.
pub fn address_share(max_served: usize) -> usize {
    (max_served - max_served / 8).max(1)
}

#[derive(Debug, Default)]
struct Counts {
    waiting: usize,
    served: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// What is open now, and the limits.
#[derive(Debug)]
pub struct ConnectionBook {
    max_served: usize,
    max_waiting: usize,
    counts: Mutex<Counts>,
}

/// Why a connection is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Full,
    /// Its address holds its share already.
    AddressShare,
}

impl ConnectionBook {
    pub fn new(max_served: usize) -> Arc<Self> {
        let max_served = max_served.max(1);
        Arc::new(Self {
            max_served,
            max_waiting: max_served.saturating_mul(WAITING_PER_SLOT).max(MIN_WAITING),
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection may wait for its first byte, or there are too many
    /// waiting already (answer it at once).
    pub fn wait(self: &Arc<Self>) -> Option<Waiting> {
        let mut c = self.counts();
        if c.waiting >= self.max_waiting {
            return None;
        }
        c.waiting += 1;
        Some(Waiting(self.clone()))
    }

    /// The connection sent its first byte: a slot, or why not. A refused
    /// one keeps its [`Waiting`] until its 503 is read, so refusals are
    /// bounded with the waiting.
    pub fn serve(self: &Arc<Self>, address: IpAddr) -> Result<Served, Refusal> {
        let mut c = self.counts();
        if c.served >= self.max_served {
            return Err(Refusal::Full);
        }
        let held = c.by_address.get(&address).copied().unwrap_or(0);
        if held >= address_share(self.max_served) {
            return Err(Refusal::AddressShare);
        }
        c.served += 1;
        *c.by_address.entry(address).or_default() += 1;
        Ok(Served {
            book: self.clone(),
            address,
        })
    }

    /// (waiting, served) now.
    pub fn open(&self) -> (usize, usize) {
        let c = self.counts();
        (c.waiting, c.served)
    }
}

/// A connection waiting for its first byte; counted until dropped.
#[derive(Debug)]
pub struct Waiting(Arc<ConnectionBook>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.counts().waiting -= 1;
    }
}

/// A connection being served; its slot is free again when dropped.
#[derive(Debug)]
pub struct Served {
    book: Arc<ConnectionBook>,
    address: IpAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let mut c = self.book.counts();
        c.served -= 1;
        if let Some(n) = c.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                c.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn silent_connections_never_take_a_slot() {
        let book = ConnectionBook::new(4);
        let idle: Vec<Waiting> = (0..MIN_WAITING).map(|_| book.wait().unwrap()).collect();
        assert!(book.wait().is_none(), "waiting is bounded too");
        drop(idle);
        let w = book.wait().unwrap();
        let served = book.serve(ip(1)).unwrap();
        drop(w);
        assert_eq!(book.open(), (0, 1));
        drop(served);
        assert_eq!(book.open(), (0, 0));
    }

    #[test]
    fn one_address_leaves_the_others_their_share() {
        let book = ConnectionBook::new(16);
        assert_eq!(address_share(16), 14);
        let mine: Vec<Served> = (0..14).map(|_| book.serve(ip(1)).unwrap()).collect();
        assert_eq!(book.serve(ip(1)).unwrap_err(), Refusal::AddressShare);
        let theirs: Vec<Served> = (0..2).map(|_| book.serve(ip(2)).unwrap()).collect();
        assert_eq!(book.serve(ip(3)).unwrap_err(), Refusal::Full);
        drop(mine);
        drop(theirs);
        assert_eq!(book.open(), (0, 0));
        assert_eq!(address_share(1), 1, "a single slot is still usable");
    }
}
