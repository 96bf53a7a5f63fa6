//! How many drafts a sequence proposes: grown while they are accepted, shrunk when they are
//! not, and switched off (with probes at growing intervals) while nothing is accepted, so
//! that text no proposer can predict costs at most an occasional one-draft probe.

/// Steps a sequence waits after its drafts were all rejected at length 1, the first time;
/// doubled on each further failed probe up to `MAX_PAUSE`.
const MIN_PAUSE: u32 = 16;
/// The longest pause between probes.
const MAX_PAUSE: u32 = 512;

/// One sequence's draft length controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftLength {
    /// Drafts it may propose next (1..=max).
    cap: usize,
    /// `max_draft_len`.
    max: usize,
    /// Steps left before it proposes again.
    paused: u32,
    /// The next pause.
    pause: u32,
}

impl DraftLength {
    /// Starts at `max` drafts.
    pub fn new(max: usize) -> Self {
        Self {
            cap: max.max(1),
            max: max.max(1),
            paused: 0,
            pause: MIN_PAUSE,
        }
    }

    /// Drafts the sequence may propose this step (0 while paused); called once per step in
    /// which it decodes.
    pub fn allowance(&mut self) -> usize {
        if self.paused > 0 {
            self.paused -= 1;
            return 0;
        }
        self.cap
    }

    /// Records a verification: `accepted` of `drafted` drafts were kept.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if accepted > 0 {
            self.pause = MIN_PAUSE;
        }
        if accepted == drafted {
            self.cap = (self.cap + 1).min(self.max);
        } else if accepted > 0 {
            self.cap = accepted + 1;
        } else if self.cap > 1 {
            self.cap /= 2;
        } else {
            self.paused = self.pause;
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_that_are_never_accepted_pause_speculation_for_longer_and_longer() {
        let mut d = DraftLength::new(4);
        let mut proposed = Vec::new();
        for _ in 0..400 {
            let n = d.allowance();
            proposed.push(n);
            d.observe(n, 0);
        }
        // 4, 2, 1, then 16 steps off, a probe, 32 off, a probe, 64 off, ...
        assert_eq!(&proposed[..4], &[4, 2, 1, 0]);
        let drafting_steps = proposed.iter().filter(|&&n| n > 0).count();
        assert!(drafting_steps <= 8, "{drafting_steps} of 400 steps drafted");
        let drafted: usize = proposed.iter().sum();
        assert!(drafted <= 12, "{drafted} drafts wasted over 400 steps");
    }

    #[test]
    fn accepted_drafts_grow_back_to_the_maximum() {
        let mut d = DraftLength::new(4);
        d.observe(4, 0);
        d.observe(2, 0);
        assert_eq!(d.allowance(), 1);
        for _ in 0..5 {
            let n = d.allowance();
            d.observe(n, n);
        }
        assert_eq!(d.allowance(), 4);
        d.observe(4, 2);
        assert_eq!(d.allowance(), 3, "partly accepted: one more than were kept");
    }
}
