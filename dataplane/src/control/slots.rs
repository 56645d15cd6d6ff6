//! Waiting for a concurrency slot (issue #33, item 1): a call over its
//! agent's concurrency limit waits here, in a first-come queue per agent,
//! for up to `--concurrency-wait-ms`, instead of being answered 429 at
//! once. Agent frameworks run tools and sub-agents in parallel against
//! calls of 5–60 s; an SDK's two retries a second apart ran out long
//! before a slot freed (6 of 8 calls failed in the run).
//!
//! The control plane stays the one that counts slots (across data planes
//! and control planes: its store counts every open reservation), so a
//! waiting call asks it again; only the head of an agent's queue asks, a
//! call arriving while others wait joins the back without asking (no
//! barging), and the queue moves on as soon as the head leaves. Its asks
//! say it waits (`AdmitRequest.waits_for_slot`), so the ledger logs no
//! refusal for them; the last one, once the wait is over, is logged if
//! refused, and its 429 is what the client gets.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// How often the head of a queue asks again: a slot freed anywhere is
/// taken within this (plus the settlement's own way to the control
/// plane); each ask is one admission the control plane refuses in memory.
pub const POLL: Duration = Duration::from_millis(50);

/// How long a call waits for a slot unless told otherwise: a few of the
/// calls agents make in parallel (tools, sub-agents) end within it, and
/// past it the client gets its 429 with time left for its own retries.
pub const DEFAULT_CONCURRENCY_WAIT: Duration = Duration::from_secs(5);

/// The calls waiting for each agent's slots, first come first.
#[derive(Debug, Default)]
pub struct SlotQueues {
    queues: Mutex<HashMap<String, VecDeque<u64>>>,
    /// Calls waiting, all agents: while none does, an admission looks no
    /// further (no lock, no lookup of its agent).
    waiters: AtomicUsize,
    next: AtomicU64,
    /// A head left its queue: the next may ask now.
    moved: Notify,
}

/// A place in an agent's queue; leaving it (dropped: admitted, refused,
/// or the client gone) lets the next call ask.
#[derive(Debug)]
pub struct Ticket {
    queues: Arc<SlotQueues>,
    agent: String,
    id: u64,
}

impl SlotQueues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<u64>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the back of `agent`'s queue.
    pub fn enter(self: &Arc<Self>, agent: &str) -> Ticket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.waiters.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(agent.to_string())
            .or_default()
            .push_back(id);
        Ticket {
            queues: self.clone(),
            agent: agent.to_string(),
            id,
        }
    }

    /// Whether any call waits here, for any agent.
    pub fn any_waiting(&self) -> bool {
        self.waiters.load(Ordering::Relaxed) > 0
    }

    /// Whether calls of `agent` wait here (a new one then joins them).
    pub fn waiting(&self, agent: &str) -> usize {
        self.lock().get(agent).map_or(0, VecDeque::len)
    }

    /// Resolves when a queue moved after this was called (callers also
    /// poll, so a move between their check and this costs one `POLL`).
    pub fn moved(&self) -> tokio::sync::futures::Notified<'_> {
        self.moved.notified()
    }
}

impl Ticket {
    /// Whether this call is first in its queue: the one that asks.
    pub fn is_head(&self) -> bool {
        self.queues.lock().get(&self.agent).and_then(|q| q.front()) == Some(&self.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut queues = self.queues.lock();
            if let Some(q) = queues.get_mut(&self.agent) {
                q.retain(|id| *id != self.id);
                if q.is_empty() {
                    queues.remove(&self.agent);
                }
            }
        }
        self.queues.waiters.fetch_sub(1, Ordering::Relaxed);
        self.queues.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_first_asks_and_leaving_moves_the_queue() {
        let q = Arc::new(SlotQueues::default());
        assert_eq!(q.waiting("a"), 0);
        assert!(!q.any_waiting());
        let first = q.enter("a");
        let second = q.enter("a");
        let other = q.enter("b");
        assert!(first.is_head() && !second.is_head() && other.is_head());
        assert_eq!(q.waiting("a"), 2);
        drop(first);
        assert!(second.is_head());
        drop(second);
        assert_eq!(q.waiting("a"), 0);
        assert!(q.lock().get("a").is_none(), "an empty queue is forgotten");
        // Leaving from the middle (a client gone) keeps the order.
        let (x, y, z) = (q.enter("c"), q.enter("c"), q.enter("c"));
        drop(y);
        assert!(x.is_head());
        drop(x);
        assert!(z.is_head());
        drop((other, z));
        assert!(!q.any_waiting());
    }
}
