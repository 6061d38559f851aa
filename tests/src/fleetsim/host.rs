//! One simulated host's synthetic state, as a real agent would report it: the desired
//! state it was sent (older generations ignored), its two slots — each new one turning
//! `fetching` → `unpacking` → `starting` → `healthy` (or `failed` on a faulty host) as
//! time passes — the weights in effect (the agent's healing rule: traffic leaves a
//! broken slot for a healthy twin), growing traffic counters (5xx for a faulty
//! release), and every change of generation or weights it reported, with when.
//!
//! Pure: time comes in as `now` (unix ms) and faults as an argument; the session in
//! [`super::link`] feeds it messages and the clock.

use std::collections::BTreeMap;

use cutover_proto::Slot;
use cutover_proto::v1::{
    DesiredService, KeptRelease, ObservedService, SlotMetrics, SlotPhase, SlotSpec, SlotStatus,
};

/// Upper bounds (µs) of the latency buckets a real agent reports.
const LATENCY_BUCKETS_US: [u64; 16] = agent::proxy::LATENCY_BUCKETS_US;

/// How every simulated host behaves.
#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    /// How long a new slot takes from `fetching` to `healthy` (or `failed`), in ms; each
    /// host takes between 75 % and 125 % of it.
    pub ready_after_ms: u64,
    /// Requests per second each host's public port gets, per service.
    pub rps: f64,
}

/// Faults injected into one release, changed at run time by the scenarios.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// The release that misbehaves; none: every release is good.
    pub release: Option<String>,
    /// Fraction of hosts (the same ones every run, by name) on which its slots fail to
    /// start.
    pub fail_hosts: f64,
    /// Fraction of its requests answered with a 5xx.
    pub error_rate: f64,
}

impl Faults {
    fn is_faulty(&self, release: &str) -> bool {
        self.release.as_deref() == Some(release)
    }
}

/// One report's generation and weights for one service: what a host acknowledges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// When the report left the host (unix ms).
    pub at_ms: u64,
    pub service: String,
    /// The desired generation the report answers.
    pub generation: u64,
    /// The weight in effect on each release the host runs, by release.
    pub weights: BTreeMap<String, u32>,
}

/// A number in [0, 1) that stands for `key` in every run: which hosts are faulty, how
/// long each host takes to prepare.
pub fn unit(key: &str) -> f64 {
    // FNV-1a, mixed by splitmix64's finaliser (FNV alone spreads names that differ in
    // their last digit poorly), then the top 53 bits as a fraction.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Cumulative traffic counters of one slot, like the agent proxy's.
#[derive(Clone, Debug, Default)]
struct Counters {
    requests: u64,
    errors: u64,
    /// Parts of a request not yet counted.
    carry: f64,
    error_carry: f64,
}

impl Counters {
    fn add(&mut self, requests: f64, error_rate: f64) {
        self.carry += requests;
        let whole = self.carry.floor();
        self.carry -= whole;
        self.requests += whole as u64;
        // Rounded, not floored: a host answering one request a second at a 50 % error
        // rate shows its errors from the first request on, as a real slot would show
        // them to an interval of a second or two.
        self.error_carry += whole * error_rate;
        let errors = self.error_carry.round().max(0.0);
        self.error_carry -= errors;
        self.errors += errors as u64;
    }

    /// Half the answers within 2.5 ms, 40 % within 5 ms, the rest within 10 ms.
    fn metrics(&self) -> SlotMetrics {
        let fast = self.requests / 2;
        let mid = self.requests * 4 / 10;
        let slow = self.requests - fast - mid;
        let mut counts = vec![0; LATENCY_BUCKETS_US.len()];
        counts[2] = fast;
        counts[3] = mid;
        counts[4] = slow;
        SlotMetrics {
            requests: self.requests,
            responses_5xx: self.errors,
            upstream_failures: 0,
            latency_bucket_le_us: LATENCY_BUCKETS_US.to_vec(),
            latency_counts: counts,
            latency_sum_us: fast * 1_500 + mid * 3_500 + slow * 7_000,
            ..Default::default()
        }
    }
}

/// One slot of one service.
#[derive(Clone, Debug)]
struct SimSlot {
    /// The spec it runs; a new spec starts a new slot.
    spec: SlotSpec,
    release: String,
    /// The desired generation that started it: a newer one restarts a failed slot.
    generation: u64,
    /// When it started (unix ms).
    started_ms: u64,
    /// How long it takes to turn healthy or failed; 0 for a slot that already ran
    /// when the simulator started (adopted, as a restarted agent does).
    ready_ms: u64,
    /// It fails to start instead of turning healthy.
    fails: bool,
    /// The private port it "listens" on, named in its error.
    port: u32,
    counters: Counters,
}

impl SimSlot {
    /// When (ms after its start) fetching, unpacking and starting end: 40 %, 10 % and
    /// 50 % of its preparation.
    fn ends(&self) -> [u64; 3] {
        let r = self.ready_ms;
        [r * 4 / 10, r / 2, r]
    }

    fn phase(&self, now: u64) -> SlotPhase {
        let t = now.saturating_sub(self.started_ms);
        let [fetched, unpacked, started] = self.ends();
        if t < fetched {
            SlotPhase::Fetching
        } else if t < unpacked {
            SlotPhase::Unpacking
        } else if t < started {
            SlotPhase::Starting
        } else if self.fails {
            SlotPhase::Failed
        } else {
            SlotPhase::Healthy
        }
    }

    /// The next instant its phase changes, if any.
    fn next_change(&self, now: u64) -> Option<u64> {
        self.ends()
            .into_iter()
            .map(|t| self.started_ms + t)
            .find(|t| *t > now)
    }

    fn status(&self, now: u64) -> SlotStatus {
        let phase = self.phase(now);
        let t = now.saturating_sub(self.started_ms);
        let [fetched, unpacked, started] = self.ends();
        // Each part's time once it is over, as the agent measures it.
        let (fetch_ms, unpack_ms, start_ms) = if self.ready_ms == 0 {
            (0, 0, 0)
        } else {
            (
                if t >= fetched { fetched } else { 0 },
                if t >= unpacked { unpacked - fetched } else { 0 },
                if phase == SlotPhase::Healthy {
                    started - unpacked
                } else {
                    0
                },
            )
        };
        let failed = phase == SlotPhase::Failed;
        SlotStatus {
            release: self.release.clone(),
            phase: phase as i32,
            error: if failed {
                format!(
                    "process exited: bind 127.0.0.1:{}: Address already in use; gave up after 3 starts",
                    self.port
                )
            } else {
                String::new()
            },
            restarts: if failed { 2 } else { 0 },
            port: self.port,
            metrics: Some(self.counters.metrics()),
            scrape: None,
            fetch_ms,
            unpack_ms,
            start_ms,
            ..Default::default()
        }
    }
}

/// One service on the host.
#[derive(Clone, Debug, Default)]
struct Service {
    desired: DesiredService,
    slots: [Option<SimSlot>; 2],
}

impl Service {
    /// The releases its slots hold on disk, as the agent lists them (the newest used
    /// first): what a rollback starts without a download.
    fn kept(&self) -> Vec<KeptRelease> {
        let mut slots: Vec<&SimSlot> = self.slots.iter().flatten().collect();
        slots.sort_by_key(|s| std::cmp::Reverse(s.started_ms));
        slots.dedup_by(|a, b| a.release == b.release);
        slots
            .into_iter()
            .map(|s| KeptRelease {
                version: s.release.clone(),
                sha256: s
                    .spec
                    .release
                    .as_ref()
                    .map(|r| r.sha256.clone())
                    .unwrap_or_default(),
                used_unix_ms: s.started_ms,
            })
            .collect()
    }

    /// The weights in effect, by the agent's healing rule, and why traffic moved.
    fn routing(&self, now: u64) -> ([u32; 2], String) {
        let mut weights = [0u32; 2];
        for s in Slot::BOTH {
            if self.slots[s.index()].is_some() {
                weights[s.index()] = self.desired.weight(s);
            }
        }
        let mut healing = String::new();
        for s in Slot::BOTH {
            let (i, o) = (s.index(), s.other().index());
            let (Some(me), Some(twin)) = (&self.slots[i], &self.slots[o]) else {
                continue;
            };
            if weights[i] == 0 || twin.phase(now) != SlotPhase::Healthy {
                continue;
            }
            match me.phase(now) {
                SlotPhase::Healthy => continue,
                p @ (SlotPhase::Failed | SlotPhase::Unhealthy | SlotPhase::Stopped) => {
                    healing = format!("{} slot ({}) is {}", s.as_str(), me.release, p.name());
                }
                _ => {}
            }
            weights[o] += weights[i];
            weights[i] = 0;
        }
        (weights, healing)
    }
}

/// A simulated host.
#[derive(Debug)]
pub struct SimHost {
    /// Its name, as enrolled.
    pub name: String,
    /// Its place in the fleet, which picks its slots' ports.
    index: usize,
    behaviour: Behaviour,
    services: BTreeMap<String, Service>,
    /// A desired state was applied since the simulator started: slots named in the
    /// first one already ran (a restarted agent adopts them), later ones start anew.
    applied_any: bool,
    /// Until when traffic was counted (unix ms).
    counted_until: u64,
    /// Every change of generation or weights it reported, oldest first.
    acks: Vec<Ack>,
}

impl SimHost {
    pub fn new(name: String, index: usize, behaviour: Behaviour, now: u64) -> SimHost {
        SimHost {
            name,
            index,
            behaviour,
            services: BTreeMap::new(),
            applied_any: false,
            counted_until: now,
            acks: Vec::new(),
        }
    }

    /// Applies one service's desired state, as the agent does: an older generation than
    /// the one applied is ignored; a slot keeps running if its spec is unchanged (a
    /// failed one restarts for a newer generation), else it is replaced or emptied.
    pub fn apply(&mut self, d: DesiredService, faults: &Faults, now: u64) {
        self.count_traffic(faults, now);
        let adopting = !self.applied_any;
        let svc = self.services.entry(d.service.clone()).or_default();
        if svc.desired.generation > d.generation {
            return;
        }
        for s in Slot::BOTH {
            let i = s.index();
            let keep = match (&svc.slots[i], d.slot(s)) {
                (Some(run), Some(spec)) => {
                    let failed = run.phase(now) == SlotPhase::Failed;
                    run.spec == *spec && !(failed && d.generation > run.generation)
                }
                (None, None) => true,
                _ => false,
            };
            if keep {
                continue;
            }
            svc.slots[i] = d.slot(s).map(|spec| {
                let release = spec
                    .release
                    .as_ref()
                    .map(|r| r.version.clone())
                    .unwrap_or_default();
                let fails = faults.is_faulty(&release) && unit(&self.name) < faults.fail_hosts;
                let jitter = 0.75 + 0.5 * unit(&format!("{}/{release}", self.name));
                SimSlot {
                    spec: spec.clone(),
                    release,
                    generation: d.generation,
                    started_ms: now,
                    ready_ms: if adopting {
                        0
                    } else {
                        (self.behaviour.ready_after_ms as f64 * jitter) as u64
                    },
                    fails,
                    port: 20_000 + ((self.index * 2 + i) % 40_000) as u32,
                    counters: Counters::default(),
                }
            });
        }
        svc.desired = d;
    }

    /// Marks the end of the first desired state after the simulator started.
    pub fn applied(&mut self) {
        self.applied_any = true;
    }

    /// The next instant a slot changes phase (unix ms), if any.
    pub fn next_change(&self, now: u64) -> Option<u64> {
        self.services
            .values()
            .flat_map(|s| s.slots.iter().flatten())
            .filter_map(|slot| slot.next_change(now))
            .min()
    }

    /// What the host reports now, with fresh counters; the report is recorded as an
    /// acknowledgement when its generation or weights changed.
    pub fn observe(&mut self, faults: &Faults, now: u64) -> Vec<ObservedService> {
        self.count_traffic(faults, now);
        let out: Vec<ObservedService> = self
            .services
            .iter()
            .map(|(name, svc)| {
                let (weights, healing) = svc.routing(now);
                let status = |s: Slot| svc.slots[s.index()].as_ref().map(|x| x.status(now));
                ObservedService {
                    service: name.clone(),
                    generation: svc.desired.generation,
                    blue: status(Slot::Blue),
                    green: status(Slot::Green),
                    blue_weight: weights[Slot::Blue.index()],
                    green_weight: weights[Slot::Green.index()],
                    error: String::new(),
                    healing,
                    releases: svc.kept(),
                    ..ObservedService::default()
                }
            })
            .collect();
        for o in &out {
            self.record(o, now);
        }
        out
    }

    /// Every change of generation or weights reported so far.
    pub fn acks(&self) -> &[Ack] {
        &self.acks
    }

    fn record(&mut self, o: &ObservedService, now: u64) {
        let mut weights = BTreeMap::new();
        for s in Slot::BOTH {
            if let Some(st) = o.slot(s) {
                *weights.entry(st.release.clone()).or_insert(0) += o.weight(s);
            }
        }
        let same = self
            .acks
            .iter()
            .rev()
            .find(|a| a.service == o.service)
            .is_some_and(|a| a.generation == o.generation && a.weights == weights);
        if !same {
            self.acks.push(Ack {
                at_ms: now,
                service: o.service.clone(),
                generation: o.generation,
                weights,
            });
        }
    }

    /// Counts the requests each slot answered since the last count, by the weights in
    /// effect.
    fn count_traffic(&mut self, faults: &Faults, now: u64) {
        let elapsed_s = now.saturating_sub(self.counted_until).min(10_000) as f64 / 1000.0;
        self.counted_until = now;
        let per_host = self.behaviour.rps * elapsed_s;
        for svc in self.services.values_mut() {
            let (weights, _) = svc.routing(now);
            for (slot, w) in svc.slots.iter_mut().zip(weights) {
                if let Some(slot) = slot
                    && w > 0
                {
                    let rate = if faults.is_faulty(&slot.release) {
                        faults.error_rate
                    } else {
                        0.0
                    };
                    slot.counters.add(per_host * f64::from(w) / 100.0, rate);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cutover_proto::v1::Release;

    use super::*;

    fn spec(version: &str) -> SlotSpec {
        SlotSpec {
            release: Some(Release {
                version: version.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn desired(
        generation: u64,
        blue: Option<&str>,
        green: Option<&str>,
        w: [u32; 2],
    ) -> DesiredService {
        DesiredService {
            service: "web".into(),
            generation,
            blue: blue.map(spec),
            green: green.map(spec),
            blue_weight: w[0],
            green_weight: w[1],
            ..Default::default()
        }
    }

    fn host() -> SimHost {
        let b = Behaviour {
            ready_after_ms: 1_000,
            rps: 100.0,
        };
        SimHost::new("sim-00001".into(), 0, b, 0)
    }

    fn phases(h: &mut SimHost, now: u64) -> (Option<SlotPhase>, Option<SlotPhase>) {
        let o = h.observe(&Faults::default(), now);
        let p = |s: Option<&SlotStatus>| s.map(|s| SlotPhase::of(s.phase));
        (p(o[0].blue.as_ref()), p(o[0].green.as_ref()))
    }

    #[test]
    fn slots_of_the_first_desired_state_already_run_and_later_ones_prepare() {
        let mut h = host();
        let f = Faults::default();
        h.apply(desired(1, Some("1"), None, [100, 0]), &f, 0);
        h.applied();
        assert_eq!(phases(&mut h, 0), (Some(SlotPhase::Healthy), None));
        h.apply(desired(2, Some("1"), Some("2"), [100, 0]), &f, 1_000);
        let ready = h.next_change(1_000).map(|t| t - 1_000);
        assert!(ready.is_some_and(|t| t > 0 && t < 1_250), "{ready:?}");
        let mut seen = Vec::new();
        let mut now = 1_000;
        while let Some(next) = h.next_change(now) {
            seen.push(phases(&mut h, now).1);
            now = next;
        }
        seen.push(phases(&mut h, now).1);
        assert_eq!(
            seen,
            [
                Some(SlotPhase::Fetching),
                Some(SlotPhase::Unpacking),
                Some(SlotPhase::Starting),
                Some(SlotPhase::Healthy)
            ]
        );
        let o = h.observe(&f, now);
        let green = o[0]
            .green
            .as_ref()
            .map(|g| (g.fetch_ms > 0, g.start_ms > 0));
        assert_eq!(green, Some((true, true)));
    }

    #[test]
    fn older_generations_are_ignored_and_weights_are_acknowledged_once() {
        let mut h = host();
        let f = Faults::default();
        h.apply(desired(1, Some("1"), Some("2"), [100, 0]), &f, 0);
        h.applied();
        h.apply(desired(3, Some("1"), Some("2"), [90, 10]), &f, 10);
        h.apply(desired(2, Some("1"), Some("2"), [0, 100]), &f, 20);
        h.observe(&f, 30);
        h.observe(&f, 1_030);
        let acks = h.acks();
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].generation, 3);
        assert_eq!(acks[0].weights["1"], 90);
        assert_eq!(acks[0].weights["2"], 10);
        assert_eq!(acks[0].at_ms, 30);
    }

    #[test]
    fn a_faulty_release_fails_on_its_hosts_and_answers_errors() {
        // Every host is faulty at fail_hosts = 1.0; a per-host port makes each error
        // its own, as a port collision's is.
        let mut h = host();
        let f = Faults {
            release: Some("2".into()),
            fail_hosts: 1.0,
            error_rate: 0.5,
        };
        h.apply(desired(1, Some("1"), None, [100, 0]), &f, 0);
        h.applied();
        h.apply(desired(2, Some("1"), Some("2"), [100, 0]), &f, 0);
        let o = h.observe(&f, 2_000);
        let green = o[0].green.clone().unwrap_or_default();
        assert_eq!(SlotPhase::of(green.phase), SlotPhase::Failed);
        assert!(green.error.contains(":20001:"), "{}", green.error);
        // Weight on the failed slot goes to its healthy twin, and the report says why.
        h.apply(desired(3, Some("1"), Some("2"), [50, 50]), &f, 2_000);
        // A newer generation restarts the failed slot: it prepares again.
        let o = h.observe(&f, 2_000);
        assert_eq!(
            o[0].green.as_ref().map(|g| SlotPhase::of(g.phase)),
            Some(SlotPhase::Fetching)
        );
        assert_eq!((o[0].blue_weight, o[0].green_weight), (100, 0));
        assert!(
            o[0].healing.is_empty(),
            "a slot on its way up is not reported"
        );
        let o = h.observe(&f, 4_000);
        assert_eq!((o[0].blue_weight, o[0].green_weight), (100, 0));
        assert!(
            o[0].healing.contains("green slot (2) is failed"),
            "{}",
            o[0].healing
        );
    }

    #[test]
    fn counters_grow_by_the_weights_in_effect_with_errors_for_a_faulty_release() {
        let mut h = host();
        let f = Faults {
            release: Some("2".into()),
            fail_hosts: 0.0,
            error_rate: 0.5,
        };
        h.apply(desired(1, Some("1"), Some("2"), [90, 10]), &f, 0);
        h.applied();
        let o = h.observe(&f, 10_000);
        let m = |s: &Option<SlotStatus>| {
            let m = s
                .as_ref()
                .and_then(|s| s.metrics.clone())
                .unwrap_or_default();
            (
                m.requests,
                m.responses_5xx,
                m.latency_counts.iter().sum::<u64>(),
            )
        };
        assert_eq!(m(&o[0].blue), (900, 0, 900));
        assert_eq!(m(&o[0].green), (100, 50, 100));
    }

    #[test]
    fn unit_is_stable_and_spread() {
        assert_eq!(unit("sim-00001"), unit("sim-00001"));
        let bad = (0..10_000)
            .filter(|i| unit(&format!("sim-{i:05}")) < 0.1)
            .count();
        assert!((800..1_200).contains(&bad), "{bad}");
    }
}
