//! Plain lines for logs while following a deployment: each new timeline event once, the
//! progress line when what it says changes, and the progress line again after
//! [`HEARTBEAT`] without any line, so a log shows the follower is alive.

use std::time::Duration;

use super::table::human_s;
use crate::report::TimelineEntry;
use cutover_proto::v1 as pb;

/// The plain progress line in two parts: what it says about the deployment's state
/// (printed when it changes), and the figures that move on their own (the last
/// analysis interval, the ETA), shown along with it.
pub fn progress_line(d: &pb::Deployment) -> (String, String) {
    let count = |p: &str| d.hosts.iter().filter(|h| h.phase == p).count();
    let total = d.hosts.len();
    let mut line = format!(
        "{} {} {}: {} step {}/{} traffic {}% | hosts {} preparing, {} healthy, {} switched, {} failed of {}",
        d.id,
        d.service,
        d.release,
        d.state,
        d.step + 1,
        d.steps.max(1),
        d.traffic,
        count("preparing"),
        count("ready"),
        count("switched"),
        count("failed"),
        total
    );
    for h in d.hosts.iter().filter(|h| !h.error.is_empty()) {
        line.push_str(&format!(" | {}: {}", h.name, h.error));
    }
    if let Some(db) = d
        .database
        .as_ref()
        .filter(|db| !db.schema.is_empty() || !db.waits_for.is_empty())
    {
        let db = crate::views::Database::from(db);
        line.push_str(&format!(" | database: {}", db.summary()));
    }
    if !d.reason.is_empty() {
        line.push_str(&format!(" | reason: {}", d.reason));
    }
    let mut figures = String::new();
    if let Some(i) = d.intervals.last() {
        figures.push_str(&format!(
            " | last interval: {} ({} req new, {} old){}",
            i.verdict,
            i.new_requests,
            i.old_requests,
            if i.why.is_empty() {
                String::new()
            } else {
                format!(": {}", i.why)
            }
        ));
    }
    (line, figures)
}

/// Without a change, the progress line is repeated this often in plain output, so a
/// log shows the follower is alive.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Plain lines for logs: each new timeline event, the progress line when what it says
/// changes, and the progress line again after [`HEARTBEAT`] without any line.
#[derive(Default)]
pub struct PlainLog {
    /// Timeline events printed so far: only later ones are new.
    printed_events: usize,
    /// The progress line (without its moving figures) as last printed.
    last_progress: String,
    /// When the last line was printed, for the heartbeat.
    last_line_at: Option<Duration>,
}

impl PlainLog {
    /// The lines to print now; `at` is the time since following began.
    pub fn lines(
        &mut self,
        events: &[TimelineEntry],
        (progress, figures): (String, String),
        eta: Option<f64>,
        at: Duration,
    ) -> Vec<String> {
        let mut out: Vec<String> = events
            .iter()
            .skip(self.printed_events)
            .map(|e| format!("  +{:.1}s {}", e.offset_s, e.text))
            .collect();
        self.printed_events = self.printed_events.max(events.len());
        let quiet = self
            .last_line_at
            .is_none_or(|last| at.saturating_sub(last) >= HEARTBEAT);
        if progress != self.last_progress || (out.is_empty() && quiet) {
            let eta = eta.map_or(String::new(), |e| format!(" | ETA {}", human_s(e)));
            out.push(format!("{progress}{figures}{eta}"));
            self.last_progress = progress;
        }
        if !out.is_empty() {
            self.last_line_at = Some(at);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::{Event, Kind};

    fn event(offset_s: f64, text: &str) -> TimelineEntry {
        TimelineEntry {
            event: Event {
                at_unix_ms: (offset_s * 1000.0) as u64,
                kind: Kind::RollbackDone,
            },
            at: None,
            offset_s,
            text: text.into(),
        }
    }

    fn progress(state: &str) -> (String, String) {
        (
            format!("d-000001 web 2: {state} step 1/2 traffic 10%"),
            " | last interval: pass (10 req new, 90 old)".to_string(),
        )
    }

    #[test]
    fn plain_lines_say_what_changed_and_a_heartbeat_when_nothing_does() {
        let mut log = PlainLog::default();
        let s = Duration::from_secs;
        let first = log.lines(
            &[event(0.0, "submitted")],
            progress("preparing"),
            Some(10.0),
            s(0),
        );
        assert_eq!(
            first,
            [
                "  +0.0s submitted",
                "d-000001 web 2: preparing step 1/2 traffic 10% | last interval: pass (10 req new, 90 old) | ETA 10.0s"
            ]
        );
        // Four polls a second for 29 s: the ETA and the figures move, nothing else does.
        for tick in 1..(29 * 4) {
            let at = Duration::from_millis(tick * 250);
            let mut p = progress("preparing");
            p.1 = format!(" | last interval: pass ({tick} req new, 90 old)");
            let eta = 10.0 - at.as_secs_f64();
            assert!(
                log.lines(&[event(0.0, "submitted")], p, Some(eta), at)
                    .is_empty(),
                "at {at:?}"
            );
        }
        // 30 s without a line: the progress line again, with the current figures.
        let beat = log.lines(
            &[event(0.0, "submitted")],
            progress("preparing"),
            None,
            s(30),
        );
        assert_eq!(beat.len(), 1);
        assert!(beat[0].starts_with("d-000001 web 2: preparing"), "{beat:?}");
        // A new event is printed at once; the unchanged progress line is not.
        let events = [event(0.0, "submitted"), event(31.0, "web-1: ready")];
        assert_eq!(
            log.lines(&events, progress("preparing"), None, s(31)),
            ["  +31.0s web-1: ready"]
        );
        // An event resets the heartbeat: nothing at 60 s, a line at 61 s.
        assert!(
            log.lines(&events, progress("preparing"), None, s(60))
                .is_empty()
        );
        assert_eq!(
            log.lines(&events, progress("preparing"), None, s(61)).len(),
            1
        );
        // A change of state is printed at once.
        let changed = log.lines(
            &events,
            progress("progressing"),
            None,
            Duration::from_millis(61_250),
        );
        assert_eq!(changed.len(), 1);
        assert!(changed[0].contains(": progressing step"), "{changed:?}");
    }
}
