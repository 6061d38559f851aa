//! The live view of a followed deployment on a terminal: a block of lines redrawn in
//! place — state, step and ETA, the phase against typical times, hosts, stragglers, the
//! last analysis interval, errors and the latest event.

use std::collections::BTreeMap;

use super::out;
use super::table::human_s;
use crate::model::{HostPhase, State};
use crate::report::{LastInterval, Show, ShowHost, Spread};

/// A block of lines redrawn in place on a terminal.
#[derive(Default)]
pub struct LiveView {
    /// Lines drawn last time: the cursor goes back up over them.
    drawn: usize,
}

impl LiveView {
    pub fn draw(&mut self, lines: &[String]) {
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for l in lines {
            out.push_str("\x1b[2K");
            out.push_str(l);
            out.push('\n');
        }
        // Clear what a longer previous block left below.
        for _ in lines.len()..self.drawn {
            out.push_str("\x1b[2K\n");
        }
        let extra = self.drawn.saturating_sub(lines.len());
        if extra > 0 {
            out.push_str(&format!("\x1b[{extra}A"));
        }
        self.drawn = lines.len();
        out::stderr_raw(out.as_bytes());
    }
}

/// The live view of `watch` on a terminal, from the `show` report.
pub fn live_lines(v: &Show) -> Vec<String> {
    let mut lines = vec![headline(v), phase_line(v), hosts_line(&v.hosts)];
    lines.extend(database_line(v));
    lines.extend(slowest_prepared(&v.host_prepare_s));
    for st in &v.stragglers {
        lines.push(format!(
            "  STRAGGLER  {} still preparing after {}",
            st.host,
            human_s(st.preparing_s)
        ));
    }
    lines.extend(v.last_interval.as_ref().map(signals_line));
    for h in &v.hosts {
        if let Some(error) = &h.error {
            lines.push(format!("  {}: {error}", h.name));
        }
    }
    if let Some(e) = v.timeline.last() {
        lines.push(format!("  last    +{:.1}s {}", e.offset_s, e.text));
    }
    if let Some(r) = &v.reason {
        lines.push(format!("  reason  {r}"));
    }
    lines
}

/// `d-000012  web 1.3 (from 1.2)  PROGRESSING  step 2/3 at 10%  elapsed 1m05s  ETA ~2m10s`
fn headline(v: &Show) -> String {
    let eta = v
        .eta_s
        .map(|e| format!("  ETA ~{}", human_s(e)))
        .unwrap_or_default();
    format!(
        "{}  {} {} (from {})  {}  step {}/{} at {}%  elapsed {}{eta}",
        v.id,
        v.service,
        v.release,
        v.previous_release.as_deref().unwrap_or("nothing"),
        v.state.as_str().to_uppercase(),
        v.step + 1,
        v.steps,
        v.traffic,
        human_s(v.elapsed_s),
    )
}

/// The current phase against the service's typical times.
fn phase_line(v: &Show) -> String {
    let t = &v.typical;
    let phase = if v.holding {
        let bake = v.bake_s.map_or(String::new(), |b| {
            format!(" (bake {} included)", human_s(b))
        });
        format!(
            "holding {} of {}{bake}",
            human_s(v.phase_elapsed_s),
            human_s(v.hold_s.unwrap_or(0.0))
        )
    } else if v.state == State::Preparing {
        format!(
            "preparing for {} (typical {})",
            human_s(v.phase_elapsed_s),
            typical(&t.prepare)
        )
    } else {
        format!("{} for {}", v.state.as_str(), human_s(v.phase_elapsed_s))
    };
    format!(
        "  phase   {phase}  | typical switch {}, total {} over {} past deployment(s)",
        typical(&t.switch),
        typical(&t.total),
        t.deployments
    )
}

/// `4.2s (p90 6.0s)`, or `-` without past deployments.
fn typical(s: &Spread) -> String {
    s.median_s.map_or("-".to_string(), |m| {
        format!("{} (p90 {})", human_s(m), human_s(s.p90_s.unwrap_or(m)))
    })
}

fn hosts_line(hosts: &[ShowHost]) -> String {
    let count = |p: HostPhase| hosts.iter().filter(|h| h.phase == p).count();
    format!(
        "  hosts   {} preparing · {} ready · {} switched · {} failed · {} rolled back (of {})",
        count(HostPhase::Preparing),
        count(HostPhase::Ready),
        count(HostPhase::Switched),
        count(HostPhase::Failed),
        count(HostPhase::RolledBack),
        hosts.len()
    )
}

/// The schema change's phase, with the typical expand while it expands.
fn database_line(v: &Show) -> Option<String> {
    let db = &v.database;
    if db.schema.is_none() && db.waits_for.is_none() {
        return None;
    }
    let typical_expand = if db.phase == "expanding" && v.typical.expand.count > 0 {
        format!(" (typical expand {})", typical(&v.typical.expand))
    } else {
        String::new()
    };
    Some(format!("  database {}{typical_expand}", db.summary()))
}

/// The three slowest hosts that finished preparing, if any did.
fn slowest_prepared(prepare_s: &BTreeMap<String, f64>) -> Option<String> {
    if prepare_s.is_empty() {
        return None;
    }
    let mut p: Vec<(&String, f64)> = prepare_s.iter().map(|(h, s)| (h, *s)).collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slow: Vec<String> = p
        .iter()
        .take(3)
        .map(|(h, s)| format!("{h} {}", human_s(*s)))
        .collect();
    Some(format!("  slowest prepared  {}", slow.join(" · ")))
}

fn signals_line(i: &LastInterval) -> String {
    let metrics: Vec<&str> = i.metrics.iter().map(|m| m.text.as_str()).collect();
    format!(
        "  signals new vs old at {}%: {} · {} ({} vs {} req)",
        i.traffic,
        i.verdict,
        metrics.join(" · "),
        i.new_requests,
        i.old_requests
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A deployment holding at 10 %, as the coordinator's `show` report sends it.
    fn holding() -> Show {
        let spread = |m: f64| json!({"count": 3, "mean_s": m, "median_s": m, "p90_s": m * 2.0});
        let none = json!({"count": 0, "mean_s": null, "median_s": null, "p90_s": null});
        let host = |name: &str, phase: &str, weight: u32, error: Option<&str>| json!({"name": name, "phase": phase, "weight": weight, "error": error});
        serde_json::from_value(json!({
            "id": "d-000012", "service": "web", "release": "1.3", "previous_release": "1.2",
            "state": "progressing", "reason": null, "failure": null,
            "step": 0, "steps": 3, "traffic": 10,
            "created_at": "2026-01-01T00:00:00.000Z", "ended_at": null,
            "elapsed_s": 65.0, "phase_elapsed_s": 20.0,
            "holding": true, "hold_s": 30.0, "bake_s": null,
            "hosts": [
                host("web-1", "switched", 10, None),
                host("web-2", "switched", 10, None),
                host("web-3", "preparing", 0, None),
                host("web-4", "failed", 0, Some("disk full")),
            ],
            "last_interval": {
                "traffic": 10, "verdict": "pass", "new_requests": 40, "old_requests": 360,
                "metrics": [
                    {"name": "error_rate", "new": 0.0, "old": 0.0, "unit": "ratio", "text": "error_rate 0.00% vs 0.00%"},
                    {"name": "latency_p99", "new": 12.0, "old": 11.0, "unit": "ms", "text": "latency_p99 12.0ms vs 11.0ms"},
                ],
            },
            "host_prepare_s": {"web-1": 2.5, "web-2": 4.0},
            "typical": {"deployments": 3, "prepare": spread(5.0), "host_prepare": spread(2.0), "switch": spread(0.5), "total": none},
            "eta_s": 130.0,
            "stragglers": [{"host": "web-3", "preparing_s": 12.5}],
            "timeline": [{
                "event": "step_holding", "step": 0, "traffic": 10, "at_unix_ms": 1_767_225_645_000u64,
                "at": "2026-01-01T00:00:45.000Z", "offset_s": 45.0,
                "text": "step 1: 10% confirmed on every host",
            }],
        }))
        .expect("a show report")
    }

    #[test]
    fn the_live_view_shows_where_a_deployment_stands() {
        assert_eq!(
            live_lines(&holding()),
            [
                "d-000012  web 1.3 (from 1.2)  PROGRESSING  step 1/3 at 10%  elapsed 1m05s  ETA ~2m10s",
                "  phase   holding 20.0s of 30.0s  | typical switch 0.5s (p90 1.0s), total - over 3 past deployment(s)",
                "  hosts   1 preparing · 0 ready · 2 switched · 1 failed · 0 rolled back (of 4)",
                "  slowest prepared  web-2 4.0s · web-1 2.5s",
                "  STRAGGLER  web-3 still preparing after 12.5s",
                "  signals new vs old at 10%: pass · error_rate 0.00% vs 0.00% · latency_p99 12.0ms vs 11.0ms (40 vs 360 req)",
                "  web-4: disk full",
                "  last    +45.0s step 1: 10% confirmed on every host",
            ]
        );
    }

    #[test]
    fn a_preparing_deployment_shows_its_typical_preparation() {
        let mut v = holding();
        v.holding = false;
        v.state = State::Preparing;
        v.reason = Some("waiting for web-3".into());
        let lines = live_lines(&v);
        assert_eq!(
            lines[1],
            "  phase   preparing for 20.0s (typical 5.0s (p90 10.0s))  | typical switch 0.5s (p90 1.0s), total - over 3 past deployment(s)"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("  reason  waiting for web-3")
        );
    }
}
