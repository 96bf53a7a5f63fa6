//! A counting gate with a bounded, first-come-first-served waiting queue: what the router's
//! admission (worker-request slots) and its tokenizer pool (threads) are built on.
//!
//! A request asks for some slots; it gets them at once when nobody waits and they fit under
//! the limit, else it waits in line (at most `max_queued` waiters, at most `max_wait`). The
//! line is strict FIFO: a large request at its head is not overtaken by small ones, so it
//! cannot starve. Not for: what the slots mean or how refusals are answered (the caller's).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

/// Why a gate did not let a request through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The request needs more slots than the limit itself: waiting can never help.
    TooLarge {
        /// Slots asked for.
        need: usize,
        /// The limit.
        limit: usize,
    },
    /// `max_queued` requests already wait.
    QueueFull {
        /// Requests waiting.
        queued: usize,
    },
    /// No slots freed up within `max_wait`.
    TimedOut {
        /// How long the request waited.
        waited: Duration,
    },
    /// The gate is closed (the router is draining).
    Closed,
}

struct Waiter {
    id: u64,
    need: usize,
    grant: oneshot::Sender<()>,
}

struct Inner {
    limit: usize,
    used: usize,
    queue: VecDeque<Waiter>,
    next_id: u64,
    closed: bool,
}

impl Inner {
    /// Hands slots to waiters from the head of the line while they fit.
    fn grant_waiters(&mut self) {
        while let Some(head) = self.queue.front() {
            if self.used.saturating_add(head.need) > self.limit {
                break;
            }
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            self.used += w.need;
            if w.grant.send(()).is_err() {
                // The waiter is gone (its future dropped after leaving the queue check).
                self.used -= w.need;
            }
        }
    }

    fn release(&mut self, slots: usize) {
        self.used = self.used.saturating_sub(slots);
        self.grant_waiters();
    }
}

/// The gate: a limit on slots in use, and a line of waiters.
pub struct Gate {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Gate")
            .field("limit", &g.limit)
            .field("used", &g.used)
            .field("queued", &g.queue.len())
            .field("closed", &g.closed)
            .finish()
    }
}

/// Slots held; dropping it gives them back and lets waiters in.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    slots: usize,
}

impl Permit {
    /// Slots this permit holds.
    pub fn slots(&self) -> usize {
        self.slots
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.lock().release(self.slots);
    }
}

/// A waiter's place in line: leaving the line (timeout, cancelled request) gives back slots
/// granted in the meantime.
struct Place {
    gate: Arc<Gate>,
    id: u64,
    need: usize,
    granted: oneshot::Receiver<()>,
    done: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut g = self.gate.lock();
        if let Some(i) = g.queue.iter().position(|w| w.id == self.id) {
            g.queue.remove(i);
            // A waiter behind may fit now that this one no longer blocks the head.
            g.grant_waiters();
        } else if self.granted.try_recv().is_ok() {
            g.release(self.need);
        }
    }
}

impl Gate {
    /// A gate letting through `limit` slots at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                limit,
                used: 0,
                queue: VecDeque::new(),
                next_id: 0,
                closed: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the limit (it may follow the workers' capacity) and lets in the waiters that now
    /// fit.
    pub fn set_limit(&self, limit: usize) {
        let mut g = self.lock();
        g.limit = limit;
        g.grant_waiters();
    }

    /// Takes `need` slots, waiting in line up to `max_wait` if they are not free or others
    /// wait; at most `max_queued` requests wait at once.
    pub async fn acquire(
        self: &Arc<Self>,
        need: usize,
        max_queued: usize,
        max_wait: Duration,
    ) -> Result<Permit, Refused> {
        let mut place = {
            let mut g = self.lock();
            if g.closed {
                return Err(Refused::Closed);
            }
            if need > g.limit {
                return Err(Refused::TooLarge {
                    need,
                    limit: g.limit,
                });
            }
            if g.queue.is_empty() && g.used + need <= g.limit {
                g.used += need;
                return Ok(Permit {
                    gate: self.clone(),
                    slots: need,
                });
            }
            if g.queue.len() >= max_queued {
                return Err(Refused::QueueFull {
                    queued: g.queue.len(),
                });
            }
            let (tx, rx) = oneshot::channel();
            let id = g.next_id;
            g.next_id += 1;
            g.queue.push_back(Waiter {
                id,
                need,
                grant: tx,
            });
            Place {
                gate: self.clone(),
                id,
                need,
                granted: rx,
                done: false,
            }
        };
        let waited = tokio::time::timeout(max_wait, &mut place.granted).await;
        match waited {
            Ok(Ok(())) => {
                place.done = true;
                Ok(Permit {
                    gate: self.clone(),
                    slots: need,
                })
            }
            Ok(Err(_)) => {
                // close() dropped the sender: no slots were granted.
                place.done = true;
                Err(Refused::Closed)
            }
            Err(_) => {
                let mut g = self.lock();
                if let Some(i) = g.queue.iter().position(|w| w.id == place.id) {
                    g.queue.remove(i);
                    g.grant_waiters();
                    place.done = true;
                    Err(Refused::TimedOut { waited: max_wait })
                } else if place.granted.try_recv().is_ok() {
                    // Granted just as the wait ran out: keep the slots.
                    place.done = true;
                    Ok(Permit {
                        gate: self.clone(),
                        slots: need,
                    })
                } else {
                    place.done = true;
                    Err(Refused::Closed)
                }
            }
        }
    }

    /// Refuses every waiter and every later request with `Refused::Closed`; permits held
    /// stay valid.
    pub fn close(&self) {
        let mut g = self.lock();
        g.closed = true;
        g.queue.clear();
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code

    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn slots_are_counted_and_given_back() {
        let gate = Gate::new(4);
        let a = gate.acquire(3, 0, LONG).await.unwrap();
        assert_eq!(gate.used(), 3);
        assert_eq!(
            gate.acquire(2, 0, LONG).await.unwrap_err(),
            Refused::QueueFull { queued: 0 }
        );
        let b = gate.acquire(1, 0, LONG).await.unwrap();
        drop(a);
        drop(b);
        assert_eq!(gate.used(), 0);
        assert_eq!(
            gate.acquire(5, 8, LONG).await.unwrap_err(),
            Refused::TooLarge { need: 5, limit: 4 }
        );
    }

    #[tokio::test]
    async fn a_waiter_gets_in_when_slots_free_up_and_times_out_otherwise() {
        let gate = Gate::new(2);
        let held = gate.acquire(2, 4, LONG).await.unwrap();
        let timed_out = gate.acquire(1, 4, Duration::from_millis(50)).await;
        assert_eq!(
            timed_out.unwrap_err(),
            Refused::TimedOut {
                waited: Duration::from_millis(50)
            }
        );
        assert_eq!(gate.queued(), 0, "a timed-out waiter leaves the line");
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire(2, 4, LONG).await });
        while gate.queued() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let permit = waiter.await.unwrap().unwrap();
        assert_eq!(permit.slots(), 2);
        assert_eq!(gate.used(), 2);
    }

    #[tokio::test]
    async fn the_line_is_first_come_first_served_and_bounded() {
        let gate = Gate::new(2);
        let held = gate.acquire(1, 2, LONG).await.unwrap();
        let g = gate.clone();
        let big = tokio::spawn(async move { g.acquire(2, 2, LONG).await });
        while gate.queued() < 1 {
            tokio::task::yield_now().await;
        }
        // One slot is free, but the big request is first in line: the small one waits.
        let g = gate.clone();
        let small = tokio::spawn(async move { g.acquire(1, 2, LONG).await });
        while gate.queued() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            gate.acquire(1, 2, LONG).await.unwrap_err(),
            Refused::QueueFull { queued: 2 }
        );
        drop(held);
        let big = big.await.unwrap().unwrap();
        assert_eq!(gate.used(), 2);
        drop(big);
        let small = small.await.unwrap().unwrap();
        assert_eq!(small.slots(), 1);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_slots_behind() {
        let gate = Gate::new(1);
        let held = gate.acquire(1, 4, LONG).await.unwrap();
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire(1, 4, LONG).await });
        while gate.queued() == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(gate.queued(), 0);
        drop(held);
        assert_eq!(gate.used(), 0);
    }

    #[tokio::test]
    async fn closing_refuses_waiters_and_newcomers() {
        let gate = Gate::new(1);
        let _held = gate.acquire(1, 4, LONG).await.unwrap();
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire(1, 4, LONG).await });
        while gate.queued() == 0 {
            tokio::task::yield_now().await;
        }
        gate.close();
        assert_eq!(waiter.await.unwrap().unwrap_err(), Refused::Closed);
        assert_eq!(gate.acquire(1, 4, LONG).await.unwrap_err(), Refused::Closed);
    }
}
