//! Which process left by an earlier agent run a slot may adopt. There is one rule,
//! [`Claim::covers`], used twice: at start-up every live recorded process that no
//! desired slot claims is stopped ([`stop_unclaimed`]), and a slot that starts takes
//! over the live process it claims ([`find`]) instead of starting a second copy.
//!
//! A process is claimed by a slot only for exactly the spec it was started with (the
//! [`spec_digest`]), and only while it runs with the recorded pid and start time.

use std::time::Duration;

use cutover_proto::Slot;
use cutover_proto::v1::{DesiredService, SlotSpec};
use prost::Message;
use sha2::Digest;

use super::process;
use crate::os;
use crate::store::{ProcessRecord, Store};

/// A digest of everything in a slot spec, stable across runs (the environment map is
/// sorted first), so a process is adopted only for exactly the spec it was started with.
pub fn spec_digest(spec: &SlotSpec) -> String {
    let mut s = spec.clone();
    let mut env: Vec<(String, String)> = s
        .run
        .as_mut()
        .map(|r| std::mem::take(&mut r.env).into_iter().collect())
        .unwrap_or_default();
    env.sort();
    let mut h = sha2::Sha256::new();
    h.update(s.encode_to_vec());
    for (k, v) in env {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k);
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    }
    hex::encode(h.finalize())
}

/// A desired slot, as the adoption rule sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The service the slot belongs to.
    pub service: String,
    /// Which of its slots.
    pub slot: Slot,
    /// The [`spec_digest`] of the spec the slot runs.
    pub digest: String,
}

impl Claim {
    pub fn new(service: &str, slot: Slot, spec: &SlotSpec) -> Claim {
        Claim {
            service: service.to_string(),
            slot,
            digest: spec_digest(spec),
        }
    }

    /// Every slot the desired states ask to run (none of a stopped service).
    pub fn all(desired: &[DesiredService]) -> Vec<Claim> {
        desired
            .iter()
            .filter(|d| !d.stopped && !d.removed)
            .flat_map(|d| {
                Slot::BOTH
                    .into_iter()
                    .filter_map(|slot| Some(Claim::new(&d.service, slot, d.slot(slot)?)))
            })
            .collect()
    }

    /// The rule: the record is of this service's slot, started for the very same spec,
    /// with a known port (records of older agents have none, and a process whose port
    /// is unknown cannot be routed to). Whether it still runs is [`runs`]'s question.
    pub fn covers(&self, r: &ProcessRecord) -> bool {
        r.port != 0
            && r.service == self.service
            && r.slot == self.slot.as_str()
            && r.spec_digest == self.digest
    }
}

/// True while the recorded process runs: the same pid with the same start time.
pub fn runs(r: &ProcessRecord) -> bool {
    os::alive(r.pid, r.start_ticks)
}

/// The live process an earlier agent run left that `claim` covers: what a starting slot
/// adopts.
pub fn find(store: &Store, claim: &Claim) -> Option<ProcessRecord> {
    let records = store.processes().ok()?;
    records.into_iter().find(|r| claim.covers(r) && runs(r))
}

/// At start-up, before any slot starts: stops every live recorded process that no
/// claim covers (SIGTERM to its group, SIGKILL after `grace`) and forgets it, and
/// forgets the records of processes that are gone. Returns how many were stopped.
pub async fn stop_unclaimed(store: &Store, claims: &[Claim], grace: Duration) -> usize {
    let records = match store.processes() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "read recorded slot processes");
            return 0;
        }
    };
    let mut stopped = 0;
    for r in records {
        let live = runs(&r);
        if live && claims.iter().any(|c| c.covers(&r)) {
            continue;
        }
        if live {
            process::stop_leftover(&r, grace).await;
            stopped += 1;
        }
        if let Err(e) = store.remove_process(&r) {
            tracing::error!(error = %e, "forget recorded slot process");
        }
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proto::v1::{Release, RunSpec};

    fn spec(env: &[(&str, &str)]) -> SlotSpec {
        SlotSpec {
            release: Some(Release {
                version: "1.0.0".into(),
                ..Default::default()
            }),
            run: Some(RunSpec {
                command: vec!["./web".into()],
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn spec_digest_ignores_map_order_but_not_content() {
        let pairs: Vec<(String, String)> = (0..30)
            .map(|i| (format!("K{i}"), format!("v{i}")))
            .collect();
        let a: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut b = a.clone();
        b.reverse();
        assert_eq!(spec_digest(&spec(&a)), spec_digest(&spec(&b)));
        let mut c = a.clone();
        c[3].1 = "changed";
        assert_ne!(spec_digest(&spec(&a)), spec_digest(&spec(&c)));
        let mut other = spec(&a);
        other.release.as_mut().unwrap().version = "1.0.1".into();
        assert_ne!(spec_digest(&spec(&a)), spec_digest(&other));
    }

    fn record(service: &str, slot: &str, port: u16, spec: &SlotSpec) -> ProcessRecord {
        ProcessRecord {
            service: service.into(),
            slot: slot.into(),
            pid: 1,
            start_ticks: 1,
            release: "1.0.0".into(),
            port,
            spec_digest: spec_digest(spec),
        }
    }

    #[test]
    fn a_claim_covers_only_its_own_slot_spec_and_a_known_port() {
        let (s, other) = (spec(&[("A", "1")]), spec(&[("A", "2")]));
        let claim = Claim::new("web", Slot::Blue, &s);
        assert!(claim.covers(&record("web", "blue", 10_001, &s)));
        assert!(
            !claim.covers(&record("web", "green", 10_001, &s)),
            "other slot"
        );
        assert!(
            !claim.covers(&record("api", "blue", 10_001, &s)),
            "other service"
        );
        assert!(
            !claim.covers(&record("web", "blue", 10_001, &other)),
            "other spec"
        );
        assert!(!claim.covers(&record("web", "blue", 0, &s)), "port unknown");
    }

    #[test]
    fn every_desired_slot_with_a_spec_is_claimed() {
        let d = DesiredService {
            service: "web".into(),
            green: Some(spec(&[])),
            ..Default::default()
        };
        assert_eq!(
            Claim::all(&[d]),
            [Claim::new("web", Slot::Green, &spec(&[]))]
        );
    }

    fn sleeper() -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("start sleep")
    }

    #[tokio::test]
    async fn leftovers_are_stopped_unless_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.redb")).unwrap();
        let s = spec(&[]);
        let (mut keep, mut stop) = (sleeper(), sleeper());
        let put = |c: &std::process::Child, slot: &str| {
            let pid = c.id() as i32;
            let r = ProcessRecord {
                pid,
                start_ticks: os::start_ticks(pid).expect("start time"),
                ..record("web", slot, 10_001, &s)
            };
            store.put_process(&r).unwrap();
            r
        };
        let (k, st) = (put(&keep, "blue"), put(&stop, "green"));
        // A record whose process is gone is just forgotten.
        let gone = ProcessRecord {
            pid: i32::MAX - 1,
            ..k.clone()
        };
        store.put_process(&gone).unwrap();
        let claims = [Claim::new("web", Slot::Blue, &s)];
        assert_eq!(
            find(&store, &claims[0]),
            Some(k.clone()),
            "the live one is found"
        );

        let stopped = stop_unclaimed(&store, &claims, Duration::from_secs(5)).await;
        assert_eq!(stopped, 1);
        assert!(!runs(&st), "the leftover was stopped");
        assert!(runs(&k), "the claimed one runs on");
        assert_eq!(store.processes().unwrap(), vec![k]);
        let _ = keep.kill();
        let _ = keep.wait();
        let _ = stop.wait();
    }
}
