//! How many drafts a sequence proposes: grown while they are accepted, shrunk when they are
//! not, and switched off (with probes at growing intervals) while nothing is accepted or
//! while the running acceptance rate stays under the proposer's break-even (the `floor` of
//! `observe`: a draft model's drafts cost time of their own, so a draft accepted now and
//! then still loses), so that text no proposer can predict costs at most an occasional probe.

/// Steps a sequence waits after its drafts were all rejected at length 1, the first time;
/// doubled on each further failed probe up to `MAX_PAUSE`.
const MIN_PAUSE: u32 = 16;
/// The longest pause between probes.
const MAX_PAUSE: u32 = 512;
/// Weight of the newest verification in the running acceptance rate.
const RATE_WEIGHT: f64 = 0.3;
/// Verifications at or above the floor, after a pause, that end the back-off.
const SETTLE: u32 = 8;

/// One sequence's draft length controller.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftLength {
    /// Drafts it may propose next (1..=max).
    cap: usize,
    /// `max_draft_len`.
    max: usize,
    /// Steps left before it proposes again.
    paused: u32,
    /// The next pause.
    pause: u32,
    /// Running share of drafts accepted (1.0 at the start and after each pause).
    rate: f64,
    /// Verifications since the start or the last pause.
    seen: u32,
}

impl DraftLength {
    /// Starts at `max` drafts.
    pub fn new(max: usize) -> Self {
        Self {
            cap: max.max(1),
            max: max.max(1),
            paused: 0,
            pause: MIN_PAUSE,
            rate: 1.0,
            seen: 0,
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

    /// Records a verification: `accepted` of `drafted` drafts were kept. `floor`: the share
    /// of drafts that must be accepted for drafting to pay (0 for free drafts).
    pub fn observe(&mut self, drafted: usize, accepted: usize, floor: f64) {
        if drafted == 0 {
            return;
        }
        self.rate += RATE_WEIGHT * (accepted as f64 / drafted as f64 - self.rate);
        self.seen += 1;
        if accepted == drafted {
            self.cap = (self.cap + 1).min(self.max);
        } else if accepted > 0 {
            self.cap = accepted + 1;
        } else if self.cap > 1 {
            self.cap /= 2;
        } else {
            self.pause_now();
            return;
        }
        if self.rate < floor {
            self.pause_now();
        } else if self.seen >= SETTLE {
            self.pause = MIN_PAUSE;
        }
    }

    /// Stops proposing for the next pause, and doubles the one after.
    fn pause_now(&mut self) {
        self.paused = self.pause;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        self.rate = 1.0;
        self.seen = 0;
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
            d.observe(n, 0, 0.0);
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
        d.observe(4, 0, 0.0);
        d.observe(2, 0, 0.0);
        assert_eq!(d.allowance(), 1);
        for _ in 0..5 {
            let n = d.allowance();
            d.observe(n, n, 0.0);
        }
        assert_eq!(d.allowance(), 4);
        d.observe(4, 2, 0.0);
        assert_eq!(d.allowance(), 3, "partly accepted: one more than were kept");
    }

    /// Of 400 steps, those in which a controller drafted when one draft is kept each step.
    fn drafting_steps_keeping_one(floor: f64) -> usize {
        let mut d = DraftLength::new(4);
        let mut drafting_steps = 0;
        for _ in 0..400 {
            let n = d.allowance();
            if n > 0 {
                drafting_steps += 1;
                d.observe(n, 1, floor);
            }
        }
        drafting_steps
    }

    #[test]
    fn drafts_accepted_less_often_than_they_cost_pause_speculation() {
        // One draft kept each step (the length settles at 2: half of them); 60% must be kept.
        let drafting_steps = drafting_steps_keeping_one(0.6);
        assert!(
            drafting_steps <= 30,
            "{drafting_steps} of 400 steps drafted"
        );
        // The same acceptance pays when drafts are cheaper: it keeps drafting.
        assert_eq!(drafting_steps_keeping_one(0.3), 400);
    }

    #[test]
    fn a_draft_that_is_always_right_never_pauses_whatever_its_cost() {
        let mut d = DraftLength::new(4);
        for _ in 0..100 {
            let n = d.allowance();
            assert_eq!(n, 4);
            d.observe(n, n, 0.9);
        }
    }
}
