//! The coordinator's own histograms, kept in memory and rendered on `/metrics`: how long
//! steps, rollbacks and whole deployments take. Fed by the engine from the timeline
//! events it commits; they start empty when the coordinator starts (Prometheus treats
//! that as a counter reset).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the duration buckets, in seconds.
const BOUNDS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// A Prometheus histogram of durations, lock-free.
#[derive(Default)]
pub struct Histogram {
    /// Observations at or under each of [`BOUNDS`] (cumulative, as Prometheus wants).
    counts: [AtomicU64; BOUNDS.len()],
    /// Every observation (the `+Inf` bucket).
    count: AtomicU64,
    /// Their sum, in ms (whole ms add up exactly).
    sum_ms: AtomicU64,
}

impl Histogram {
    pub fn observe_ms(&self, ms: u64) {
        let s = ms as f64 / 1000.0;
        for (b, c) in BOUNDS.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Prometheus text for this histogram under `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, c) in BOUNDS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The coordinator's histograms.
#[derive(Default)]
pub struct Metrics {
    /// From a step's weights going out to the next step's (or the end).
    pub step: Histogram,
    /// From the first bad signal to the last host back on the previous release.
    pub rollback: Histogram,
    /// From submission to the end.
    pub deployment: Histogram,
}

impl Metrics {
    pub fn render(&self, out: &mut String) {
        self.step.render(
            out,
            "cutover_step_duration_seconds",
            "Time from a step's weights going out to the next step or the end.",
        );
        self.rollback.render(
            out,
            "cutover_rollback_duration_seconds",
            "Time from the first bad signal to the last host back on the previous release.",
        );
        self.deployment.render(
            out,
            "cutover_deployment_duration_seconds",
            "Time from submission to the end of a deployment.",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_ms(40);
        h.observe_ms(700);
        h.observe_ms(5_000_000);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "x");
        assert!(out.contains("x_seconds_bucket{le=\"0.05\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"3600\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 5000.74\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
    }
}
