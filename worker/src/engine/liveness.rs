//! Liveness that means progress: the engine loop stamps the start of every pass (a step, or a
//! round of commands), and marks when it blocks waiting for work. A pass that has run longer
//! than `engine_stall_timeout` while requests are in flight means the engine thread is stuck
//! (a hung collective, a device that stopped answering, a kernel that never returns), and the
//! worker's Health says so, so the router ejects it instead of routing requests into it.
//!
//! Not this module's job: ending the stuck requests (their deadlines do) or restarting the
//! engine (the launcher's).

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When the engine loop's current pass began.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    epoch: Instant,
    /// Nanoseconds from `epoch` to the start of the current pass, plus one; 0 while the loop
    /// is blocked waiting for a command (idle, so never stalled).
    pass_started: AtomicU64,
}

impl Heartbeat {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            pass_started: AtomicU64::new(0),
        }
    }

    /// A pass begins now.
    pub(crate) fn beat(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.pass_started.store(nanos + 1, Ordering::Relaxed);
    }

    /// The loop is about to block until a command arrives.
    pub(crate) fn waiting(&self) {
        self.pass_started.store(0, Ordering::Relaxed);
    }

    /// How long the current pass has run; None while the loop waits for work.
    pub(crate) fn pass_age(&self) -> Option<Duration> {
        match self.pass_started.load(Ordering::Relaxed) {
            0 => None,
            n => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(n - 1)),
            ),
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

/// The message of a caught panic (`panic!` with a string or a formatted message).
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_ages_until_the_next_beat_and_waiting_is_never_old() {
        let hb = Heartbeat::new();
        assert_eq!(hb.pass_age(), None, "a new loop waits for work");
        hb.beat();
        std::thread::sleep(Duration::from_millis(30));
        let age = hb.pass_age().expect("a pass is running");
        assert!(age >= Duration::from_millis(30), "{age:?}");
        hb.beat();
        assert!(hb.pass_age().expect("running") < age);
        hb.waiting();
        assert_eq!(hb.pass_age(), None);
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let a = std::panic::catch_unwind(|| panic!("plain")).expect_err("panics");
        let b = std::panic::catch_unwind(|| panic!("formatted {}", 7)).expect_err("panics");
        assert_eq!(
            (panic_message(a.as_ref()), panic_message(b.as_ref())),
            ("plain".to_owned(), "formatted 7".to_owned())
        );
    }
}
