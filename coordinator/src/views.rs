//! The JSON views that both the CLI (`--output json`) and the HTTP API print: the hosts
//! with what they run, and one deployment as `status` shows it.

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;
use serde_json::{Value, json};

pub use crate::report::rfc3339;

/// `s`, or null when it is empty (the protocol's way of saying "none").
pub fn opt(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// One deployment as `cutover status --output json` prints it.
pub fn deployment(d: &pb::Deployment) -> Value {
    json!({
        "id": d.id,
        "service": d.service,
        "release": d.release,
        "previous_release": opt(&d.previous_release),
        "state": d.state,
        "step": d.step,
        "steps": d.steps,
        "traffic": d.traffic,
        "reason": opt(&d.reason),
        "created_at": rfc3339(d.created_unix_ms),
        "ended_at": rfc3339(d.ended_unix_ms),
        "hosts": d.hosts.iter().map(|h| json!({
            "name": h.name,
            "phase": h.phase,
            "weight": h.weight,
            "error": opt(&h.error),
        })).collect::<Vec<_>>(),
        "rollback": if d.rollback_decided_unix_ms == 0 { Value::Null } else { json!({
            "first_bad_at": rfc3339(d.first_bad_unix_ms),
            "decided_at": rfc3339(d.rollback_decided_unix_ms),
            "done_at": rfc3339(d.rollback_done_unix_ms),
            "first_bad_unix_ms": d.first_bad_unix_ms,
            "done_unix_ms": if d.rollback_done_unix_ms == 0 { Value::Null } else { json!(d.rollback_done_unix_ms) },
            "seconds_to_restore": if d.rollback_done_unix_ms == 0 { Value::Null } else {
                json!((d.rollback_done_unix_ms.saturating_sub(d.first_bad_unix_ms)) as f64 / 1000.0)
            },
        })},
        "intervals": d.intervals.iter().map(|i| json!({
            "step": i.step,
            "traffic": i.traffic,
            "started_at": rfc3339(i.started_unix_ms),
            "ended_at": rfc3339(i.ended_unix_ms),
            "new_requests": i.new_requests,
            "old_requests": i.old_requests,
            "verdict": i.verdict,
            "why": opt(&i.why),
            "metrics": i.metrics.iter().map(|m| json!({
                "name": m.name,
                "new": if m.new.is_finite() { json!(m.new) } else { Value::Null },
                "old": if m.old.is_finite() { json!(m.old) } else { Value::Null },
                "verdict": m.verdict,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn slot(s: Option<&pb::HostSlot>) -> Value {
    match s {
        Some(s) => json!({"release": opt(&s.release), "state": s.state, "weight": s.weight}),
        None => json!({"release": null, "state": "empty", "weight": 0}),
    }
}

/// The hosts as `cutover hosts --output json` and `/api/fleet` print them.
pub fn hosts(hosts: &[pb::Host]) -> Value {
    Value::Array(
        hosts
            .iter()
            .map(|h| {
                let labels: BTreeMap<_, _> = h.labels.iter().collect();
                json!({
                    "name": h.name,
                    "labels": labels,
                    "connected": h.connected,
                    "last_seen": rfc3339(h.last_seen_unix_ms),
                    "services": h.services.iter().map(|s| json!({
                        "service": s.service,
                        "live_release": opt(&s.live_release),
                        "slots": {"blue": slot(s.blue.as_ref()), "green": slot(s.green.as_ref())},
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
