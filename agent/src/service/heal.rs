//! The healing rule, pure: which weights the proxy gets, given the desired weights and
//! the phases of the service's two slots. Traffic never stays on a slot that is not
//! healthy while the other slot is:
//!
//! - a slot that crashed, failed or turned unhealthy after serving loses its weight to
//!   its healthy twin at once, without waiting for the coordinator, and the report
//!   says why (`healing`; the coordinator then rolls the fleet back);
//! - a slot still on its way up (an agent restart, or a host catching up with its
//!   fleet) gives its weight to its healthy twin until it turns healthy; nothing
//!   failed, so nothing is reported;
//! - with no healthy twin (both unhealthy, or one slot only) the desired weights stand:
//!   moving traffic would not help.
//!
//! A slot that is not there gets no weight, whatever is desired.

use cutover_proto::Slot;
use cutover_proto::v1::SlotPhase;

/// One slot, as the rule sees it.
#[derive(Clone, Copy, Debug)]
pub struct SlotView<'a> {
    /// Where the slot is in its life.
    pub phase: SlotPhase,
    /// The release it runs, named in the healing text.
    pub release: &'a str,
    /// Why it is not healthy, named in the healing text (the phase's name when empty).
    pub error: &'a str,
}

/// What the proxy gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    /// Weights in effect, indexed by [`Slot::index`].
    pub weights: [u32; 2],
    /// Why traffic was moved off a broken slot; empty when nothing failed.
    pub healing: String,
}

/// How the rule treats a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    /// Passes its checks: may take its twin's traffic.
    Healthy,
    /// Failed after it was started (crashed, failed, turned unhealthy, stopped): its
    /// traffic moves to a healthy twin, and the move is reported.
    Broken,
    /// Not serving yet (fetching, unpacking, starting, validating, empty): its traffic
    /// waits on a healthy twin, unreported.
    NotReady,
}

impl Standing {
    fn of(phase: SlotPhase) -> Standing {
        match phase {
            SlotPhase::Healthy => Standing::Healthy,
            SlotPhase::Unhealthy | SlotPhase::Failed | SlotPhase::Stopped => Standing::Broken,
            SlotPhase::Fetching
            | SlotPhase::Unpacking
            | SlotPhase::Starting
            | SlotPhase::Validating
            | SlotPhase::Empty => Standing::NotReady,
        }
    }
}

/// The weights in effect for `desired` weights (indexed by [`Slot::index`]) and the two
/// slots (`None`: no slot there).
pub fn route(desired: [u32; 2], slots: [Option<SlotView<'_>>; 2]) -> Routing {
    let mut weights = [0u32; 2];
    for slot in Slot::BOTH {
        if slots[slot.index()].is_some() {
            weights[slot.index()] = desired[slot.index()];
        }
    }
    let mut healing = String::new();
    for slot in Slot::BOTH {
        let (i, other) = (slot.index(), slot.other().index());
        let (Some(me), Some(twin)) = (slots[i], slots[other]) else {
            continue;
        };
        if weights[i] == 0 || Standing::of(twin.phase) != Standing::Healthy {
            continue;
        }
        match Standing::of(me.phase) {
            Standing::Healthy => continue,
            Standing::Broken => healing = broken(slot, &me),
            Standing::NotReady => {}
        }
        weights[other] += weights[i];
        weights[i] = 0;
    }
    Routing { weights, healing }
}

/// `blue slot (1.0.0) is unhealthy: GET /health: HTTP 500`.
fn broken(slot: Slot, me: &SlotView<'_>) -> String {
    let why = if me.error.is_empty() {
        me.phase.name()
    } else {
        me.error
    };
    format!(
        "{} slot ({}) is {}: {why}",
        slot.as_str(),
        me.release,
        me.phase.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: SlotPhase, release: &'static str, error: &'static str) -> SlotView<'static> {
        SlotView {
            phase,
            release,
            error,
        }
    }
    fn healthy(release: &'static str) -> Option<SlotView<'static>> {
        Some(view(SlotPhase::Healthy, release, ""))
    }
    fn routing(weights: [u32; 2], healing: &str) -> Routing {
        Routing {
            weights,
            healing: healing.to_string(),
        }
    }

    #[test]
    fn healthy_slots_get_the_desired_weights() {
        assert_eq!(
            route([30, 70], [healthy("1.0.0"), healthy("2.0.0")]),
            routing([30, 70], "")
        );
    }

    #[test]
    fn a_broken_slot_with_a_healthy_twin_loses_its_traffic_and_says_why() {
        let bad = view(SlotPhase::Unhealthy, "2.0.0", "GET /health: HTTP 500");
        assert_eq!(
            route([10, 90], [healthy("1.0.0"), Some(bad)]),
            routing(
                [100, 0],
                "green slot (2.0.0) is unhealthy: GET /health: HTTP 500"
            )
        );
        // Failed and stopped are broken too; without an error the phase says why.
        let failed = view(SlotPhase::Failed, "1.0.0", "");
        assert_eq!(
            route([100, 0], [Some(failed), healthy("2.0.0")]),
            routing([0, 100], "blue slot (1.0.0) is failed: failed")
        );
        let stopped = view(SlotPhase::Stopped, "1.0.0", "process exited (signal: 9)");
        assert_eq!(
            route([50, 50], [Some(stopped), healthy("2.0.0")]),
            routing(
                [0, 100],
                "blue slot (1.0.0) is stopped: process exited (signal: 9)"
            )
        );
    }

    #[test]
    fn a_slot_still_starting_waits_on_its_healthy_twin_unreported() {
        for phase in [
            SlotPhase::Fetching,
            SlotPhase::Unpacking,
            SlotPhase::Starting,
            SlotPhase::Empty,
        ] {
            let starting = view(phase, "2.0.0", "");
            assert_eq!(
                route([50, 50], [healthy("1.0.0"), Some(starting)]),
                routing([100, 0], ""),
                "{phase:?}"
            );
        }
    }

    #[test]
    fn with_both_slots_unhealthy_the_desired_weights_stand() {
        let (a, b) = (
            view(SlotPhase::Unhealthy, "1.0.0", "connect: refused"),
            view(SlotPhase::Failed, "2.0.0", "gave up"),
        );
        assert_eq!(route([40, 60], [Some(a), Some(b)]), routing([40, 60], ""));
        // A broken slot next to one still starting keeps its traffic too.
        let starting = view(SlotPhase::Starting, "2.0.0", "");
        assert_eq!(
            route([100, 0], [Some(a), Some(starting)]),
            routing([100, 0], "")
        );
    }

    #[test]
    fn one_slot_only_keeps_its_weight_and_a_missing_slot_gets_none() {
        let bad = view(SlotPhase::Unhealthy, "1.0.0", "connect: refused");
        assert_eq!(route([100, 0], [Some(bad), None]), routing([100, 0], ""));
        assert_eq!(
            route([20, 80], [healthy("1.0.0"), None]),
            routing([20, 0], ""),
            "no weight for a slot that is not there"
        );
        assert_eq!(route([50, 50], [None, None]), routing([0, 0], ""));
    }

    #[test]
    fn a_broken_slot_without_weight_moves_nothing_and_reports_nothing() {
        let bad = view(SlotPhase::Failed, "2.0.0", "gave up");
        assert_eq!(
            route([100, 0], [healthy("1.0.0"), Some(bad)]),
            routing([100, 0], "")
        );
        assert_eq!(
            route([0, 0], [healthy("1.0.0"), Some(bad)]),
            routing([0, 0], "")
        );
    }
}
