//! When a slot's process is started again after it exits, as a pure policy: after a
//! backoff that doubles from 0.5 s up to 30 s, back at 0.5 s once the process turned
//! healthy or ran for a minute; and never again after [`MAX_EARLY_EXITS`] exits of a
//! slot that never turned healthy (a release that cannot start fails the slot, so the
//! coordinator can roll back instead of waiting).

use std::time::Duration;

/// Exits before turning healthy that fail the slot outright.
pub const MAX_EARLY_EXITS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A process that ran this long is started again without waiting long.
const STEADY_RUN: Duration = Duration::from_secs(60);

/// What follows an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Start the process again after this long.
    RestartAfter(Duration),
    /// The slot fails: it never turned healthy in this many starts.
    GiveUp { starts: u32 },
}

/// The restart history of one slot.
#[derive(Clone, Debug)]
pub struct Restarts {
    /// Exits of a process that was not healthy when it exited.
    early_exits: u32,
    /// The wait before the next start.
    backoff: Duration,
}

impl Default for Restarts {
    fn default() -> Restarts {
        Restarts {
            early_exits: 0,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl Restarts {
    /// The process turned healthy: the next exit is restarted quickly.
    pub fn healthy(&mut self) {
        self.backoff = FIRST_BACKOFF;
    }

    /// The process exited. `ever_healthy`: the slot turned healthy at some point;
    /// `healthy_at_exit`: the process that exited was healthy; `ran_for`: since its start.
    pub fn exited(&mut self, ever_healthy: bool, healthy_at_exit: bool, ran_for: Duration) -> Next {
        if !ever_healthy || !healthy_at_exit {
            self.early_exits += 1;
        }
        if !ever_healthy && self.early_exits >= MAX_EARLY_EXITS {
            return Next::GiveUp {
                starts: self.early_exits,
            };
        }
        if ran_for > STEADY_RUN {
            self.backoff = FIRST_BACKOFF;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Next::RestartAfter(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_secs(1);
    fn ms(n: u64) -> Next {
        Next::RestartAfter(Duration::from_millis(n))
    }

    #[test]
    fn a_slot_that_never_turns_healthy_gives_up_after_three_starts() {
        let mut r = Restarts::default();
        assert_eq!(r.exited(false, false, SHORT), ms(500));
        assert_eq!(r.exited(false, false, SHORT), ms(1000));
        assert_eq!(r.exited(false, false, SHORT), Next::GiveUp { starts: 3 });
    }

    #[test]
    fn a_slot_that_was_healthy_is_restarted_for_ever_with_a_capped_backoff() {
        let mut r = Restarts::default();
        let waits: Vec<Next> = (0..9).map(|_| r.exited(true, false, SHORT)).collect();
        assert_eq!(
            waits,
            [
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(16_000),
                ms(30_000),
                ms(30_000),
                ms(30_000)
            ]
        );
    }

    #[test]
    fn turning_healthy_or_a_long_run_resets_the_backoff() {
        let mut r = Restarts::default();
        for _ in 0..4 {
            r.exited(true, true, SHORT);
        }
        r.healthy();
        assert_eq!(r.exited(true, true, SHORT), ms(500));
        for _ in 0..4 {
            r.exited(true, true, SHORT);
        }
        assert_eq!(r.exited(true, true, Duration::from_secs(61)), ms(500));
    }
}
