//! The live view of a followed deployment on a terminal: a block of lines redrawn in
//! place — state, step and ETA, the phase against typical times, hosts, stragglers, the
//! last analysis interval, errors and the latest event.

use serde_json::Value;

use super::out;
use super::table::human_s;

/// A block of lines redrawn in place on a terminal.
#[derive(Default)]
pub struct LiveView {
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

/// The live view of `watch` on a terminal, from the `show` document.
pub fn live_lines(v: &Value) -> Vec<String> {
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut lines = Vec::new();
    let eta = v["eta_s"]
        .as_f64()
        .map(|e| format!("  ETA ~{}", human_s(e)))
        .unwrap_or_default();
    lines.push(format!(
        "{}  {} {} (from {})  {}  step {}/{} at {}%  elapsed {}{eta}",
        s("id"),
        s("service"),
        s("release"),
        v["previous_release"].as_str().unwrap_or("nothing"),
        s("state").to_uppercase(),
        v["step"].as_u64().unwrap_or(0) + 1,
        v["steps"].as_u64().unwrap_or(1),
        v["traffic"].as_u64().unwrap_or(0),
        human_s(f("elapsed_s")),
    ));
    let t = &v["typical"];
    let typ = |k: &str| {
        t[k]["median_s"].as_f64().map_or("-".to_string(), |m| {
            format!(
                "{} (p90 {})",
                human_s(m),
                human_s(t[k]["p90_s"].as_f64().unwrap_or(m))
            )
        })
    };
    let phase = if v["holding"].as_bool().unwrap_or(false) {
        let bake = v["bake_s"].as_f64().map_or(String::new(), |b| {
            format!(" (bake {} included)", human_s(b))
        });
        format!(
            "holding {} of {}{bake}",
            human_s(f("phase_elapsed_s")),
            human_s(v["hold_s"].as_f64().unwrap_or(0.0))
        )
    } else if s("state") == "preparing" {
        format!(
            "preparing for {} (typical {})",
            human_s(f("phase_elapsed_s")),
            typ("prepare")
        )
    } else {
        format!("{} for {}", s("state"), human_s(f("phase_elapsed_s")))
    };
    lines.push(format!(
        "  phase   {phase}  | typical switch {}, total {} over {} past deployment(s)",
        typ("switch"),
        typ("total"),
        t["deployments"].as_u64().unwrap_or(0)
    ));
    let hosts = v["hosts"].as_array().cloned().unwrap_or_default();
    let count = |p: &str| hosts.iter().filter(|h| h["phase"] == p).count();
    lines.push(format!(
        "  hosts   {} preparing · {} ready · {} switched · {} failed · {} rolled back (of {})",
        count("preparing"),
        count("ready"),
        count("switched"),
        count("failed"),
        count("rolled_back"),
        hosts.len()
    ));
    if let Some(prep) = v["host_prepare_s"].as_object()
        && !prep.is_empty()
    {
        let mut p: Vec<(&String, f64)> = prep
            .iter()
            .map(|(h, s)| (h, s.as_f64().unwrap_or(0.0)))
            .collect();
        p.sort_by(|a, b| b.1.total_cmp(&a.1));
        let slow: Vec<String> = p
            .iter()
            .take(3)
            .map(|(h, s)| format!("{h} {}", human_s(*s)))
            .collect();
        lines.push(format!("  slowest prepared  {}", slow.join(" · ")));
    }
    for st in v["stragglers"].as_array().cloned().unwrap_or_default() {
        lines.push(format!(
            "  STRAGGLER  {} still preparing after {}",
            st["host"].as_str().unwrap_or(""),
            human_s(st["preparing_s"].as_f64().unwrap_or(0.0))
        ));
    }
    if let Some(i) = v["last_interval"].as_object() {
        let metrics: Vec<String> = i["metrics"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| m["text"].as_str().unwrap_or("").to_string())
            .collect();
        lines.push(format!(
            "  signals new vs old at {}%: {} · {} ({} vs {} req)",
            i["traffic"],
            i["verdict"].as_str().unwrap_or(""),
            metrics.join(" · "),
            i["new_requests"],
            i["old_requests"]
        ));
    }
    for h in hosts.iter().filter(|h| h["error"].is_string()) {
        lines.push(format!(
            "  {}: {}",
            h["name"].as_str().unwrap_or(""),
            h["error"].as_str().unwrap_or("")
        ));
    }
    if let Some(e) = v["timeline"].as_array().and_then(|t| t.last()) {
        lines.push(format!(
            "  last    +{:.1}s {}",
            e["offset_s"].as_f64().unwrap_or(0.0),
            e["text"].as_str().unwrap_or("")
        ));
    }
    if let Some(r) = v["reason"].as_str() {
        lines.push(format!("  reason  {r}"));
    }
    lines
}
