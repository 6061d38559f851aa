//! Words both sides use about the protocol's types, defined once: the two slots of a
//! service and how to reach each in the generated messages, a slot phase's name, a
//! database task's state, and the timing of the agent link.

use std::time::Duration;

use crate::v1::{
    DatabaseTaskState, DatabaseTaskStatus, DesiredService, ObservedService, SlotPhase, SlotSpec,
    SlotStatus,
};

/// One of the two slots a service has on every host.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    Blue,
    Green,
}

impl Slot {
    pub const BOTH: [Slot; 2] = [Slot::Blue, Slot::Green];

    pub fn other(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }

    /// Its place in a `[_; 2]` kept per slot: blue 0, green 1.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The slot named `name` (`blue` or `green`).
    pub fn parse(name: &str) -> Option<Slot> {
        match name {
            "blue" => Some(Slot::Blue),
            "green" => Some(Slot::Green),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DesiredService {
    pub fn slot(&self, s: Slot) -> Option<&SlotSpec> {
        match s {
            Slot::Blue => self.blue.as_ref(),
            Slot::Green => self.green.as_ref(),
        }
    }

    pub fn set_slot(&mut self, s: Slot, spec: Option<SlotSpec>) {
        match s {
            Slot::Blue => self.blue = spec,
            Slot::Green => self.green = spec,
        }
    }

    pub fn weight(&self, s: Slot) -> u32 {
        match s {
            Slot::Blue => self.blue_weight,
            Slot::Green => self.green_weight,
        }
    }

    pub fn set_weight(&mut self, s: Slot, w: u32) {
        match s {
            Slot::Blue => self.blue_weight = w,
            Slot::Green => self.green_weight = w,
        }
    }

    /// The slot carrying the host's traffic, if any: the one with the most weight (blue
    /// on a tie), among slots that hold a spec.
    pub fn live_slot(&self) -> Option<Slot> {
        Slot::BOTH
            .into_iter()
            .filter(|s| self.slot(*s).is_some())
            .max_by_key(|s| (self.weight(*s), *s == Slot::Blue))
            .filter(|s| self.weight(*s) > 0)
    }
}

impl ObservedService {
    pub fn slot(&self, s: Slot) -> Option<&SlotStatus> {
        match s {
            Slot::Blue => self.blue.as_ref(),
            Slot::Green => self.green.as_ref(),
        }
    }

    pub fn weight(&self, s: Slot) -> u32 {
        match s {
            Slot::Blue => self.blue_weight,
            Slot::Green => self.green_weight,
        }
    }
}

impl SlotSpec {
    /// The release this spec runs: (version, sha256).
    pub fn release_key(&self) -> Option<(&str, &str)> {
        self.release
            .as_ref()
            .map(|r| (r.version.as_str(), r.sha256.as_str()))
    }
}

impl SlotPhase {
    /// The name a slot phase goes by in reports, logs and output.
    pub fn name(self) -> &'static str {
        match self {
            SlotPhase::Empty => "empty",
            SlotPhase::Fetching => "fetching",
            SlotPhase::Unpacking => "unpacking",
            SlotPhase::Starting => "starting",
            SlotPhase::Healthy => "healthy",
            SlotPhase::Unhealthy => "unhealthy",
            SlotPhase::Failed => "failed",
            SlotPhase::Stopped => "stopped",
            SlotPhase::Validating => "validating",
        }
    }

    /// The phase a wire value stands for (an unknown value reads as `Empty`).
    pub fn of(raw: i32) -> SlotPhase {
        SlotPhase::try_from(raw).unwrap_or(SlotPhase::Empty)
    }
}

impl ObservedService {
    /// What the host reports of database task `id`, if it knows it.
    pub fn database_task(&self, id: &str) -> Option<&DatabaseTaskStatus> {
        self.database_tasks.iter().find(|t| t.id == id)
    }
}

impl DatabaseTaskState {
    /// The name a task's state goes by in reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            DatabaseTaskState::Unspecified => "unknown",
            DatabaseTaskState::Preparing => "preparing",
            DatabaseTaskState::Running => "running",
            DatabaseTaskState::Succeeded => "succeeded",
            DatabaseTaskState::Failed => "failed",
            DatabaseTaskState::Interrupted => "interrupted",
        }
    }

    /// The state a wire value stands for (an unknown value reads as `Unspecified`).
    pub fn of(raw: i32) -> DatabaseTaskState {
        DatabaseTaskState::try_from(raw).unwrap_or(DatabaseTaskState::Unspecified)
    }

    /// The task has ended, and how is known.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DatabaseTaskState::Succeeded | DatabaseTaskState::Failed
        )
    }
}

/// Timing of the agent link, the same on both ends.
pub mod link {
    use super::Duration;

    /// An agent reports its observed state on change: at once (a burst gathered for a
    /// few ms) when its slots, weights or errors change, and its counters at most this
    /// often while they grow. An unchanged state is not sent again before
    /// [`REFRESH`]; the heartbeat says the host is alive meanwhile.
    pub const REPORT_EVERY: Duration = Duration::from_secs(1);
    /// An agent sends its whole observed state at least this often, changed or not.
    pub const REFRESH: Duration = Duration::from_secs(30);
    /// Each side sends a heartbeat this often.
    pub const HEARTBEAT: Duration = Duration::from_secs(2);
    /// A stream silent this long is dropped by either side.
    pub const SILENCE_LIMIT: Duration = Duration::from_secs(6);
    /// A host not heard from for this long is not counted on (in decisions and in what
    /// `hosts` shows) even while its stream is open: a partition closes nothing.
    pub const STALE_AFTER: Duration = Duration::from_secs(3);
    /// An agent's first reconnect waits about this long.
    pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
    /// An agent never waits longer than this to reconnect: a coordinator that comes back
    /// has its whole fleet again within a few seconds.
    pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

    /// The wait before reconnect attempt `attempt` (0 for the first after a session
    /// ended): doubling from [`RECONNECT_MIN`] up to [`RECONNECT_MAX`], and `jitter` (in
    /// [0, 1), random per attempt) places it in the upper half of that, so a fleet that
    /// lost its coordinator at one instant comes back spread out, not as a stampede.
    pub fn reconnect_delay(attempt: u32, jitter: f64) -> Duration {
        let ceiling = RECONNECT_MIN
            .saturating_mul(1u32 << attempt.min(16))
            .min(RECONNECT_MAX);
        ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_weights() {
        let mut d = DesiredService::default();
        assert_eq!(d.live_slot(), None);
        d.set_slot(Slot::Green, Some(SlotSpec::default()));
        d.set_weight(Slot::Green, 100);
        assert_eq!(d.live_slot(), Some(Slot::Green));
        d.set_slot(Slot::Blue, Some(SlotSpec::default()));
        d.set_weight(Slot::Blue, 50);
        d.set_weight(Slot::Green, 50);
        assert_eq!(d.live_slot(), Some(Slot::Blue), "blue on a tie");
        assert_eq!(Slot::parse(Slot::Green.as_str()), Some(Slot::Green));
        assert_eq!(Slot::Blue.other(), Slot::Green);
        assert_eq!(SlotPhase::of(99), SlotPhase::Empty);
        assert_eq!(SlotPhase::Starting.name(), "starting");
    }

    #[test]
    fn reconnects_double_up_to_a_few_seconds_spread_by_jitter() {
        use link::*;
        assert_eq!(reconnect_delay(0, 0.0), RECONNECT_MIN / 2);
        assert_eq!(reconnect_delay(0, 0.999_999).as_millis(), 199);
        assert_eq!(reconnect_delay(2, 0.0), RECONNECT_MIN * 2);
        for attempt in [5, 6, 30, u32::MAX] {
            assert_eq!(reconnect_delay(attempt, 0.0), RECONNECT_MAX / 2);
            assert!(reconnect_delay(attempt, 1.0) <= RECONNECT_MAX);
        }
    }
}
