//! The reports on past deployments: `history` (one line each), `show` (one deployment's
//! story, where it failed first) and `stats` (the DORA figures and where failures
//! happen), as text or as the coordinator's JSON.

use cutover_proto::v1 as pb;
use serde_json::Value;

use super::table::{human_s, print_table};
use super::{Conn, Failure, Output, Result};
use crate::cli::out::print_json;
use crate::outln;

fn json_of(doc: pb::JsonDocument) -> Value {
    serde_json::from_str(&doc.json).unwrap_or_default()
}

/// `--since 30d` as unix ms.
fn since_ms(flag: &str, text: &str) -> Result<u64> {
    let d = cutover_shared::duration::parse(text)
        .map_err(|m| Failure::usage(format!("{flag} {text}: {m}")))?;
    Ok(cutover_shared::clock::now_ms().saturating_sub(d.as_millis()))
}

pub async fn history(
    conn: &Conn,
    service: Option<String>,
    limit: u32,
    since: Option<&str>,
    output: Output,
) -> Result<i32> {
    let since_unix_ms = match since {
        Some(s) => since_ms("--since", s)?,
        None => 0,
    };
    let mut client = conn.client().await?;
    let v = json_of(
        client
            .history(pb::HistoryRequest {
                service: service.unwrap_or_default(),
                limit,
                since_unix_ms,
            })
            .await?
            .into_inner(),
    );
    if output == Output::Json {
        print_json(&v);
        return Ok(0);
    }
    let mut rows = vec![
        [
            "ID", "SERVICE", "RELEASE", "STATE", "STARTED", "DURATION", "REASON",
        ]
        .map(String::from),
    ];
    for d in v.as_array().cloned().unwrap_or_default() {
        let text = |k: &str| d[k].as_str().unwrap_or("").to_string();
        let state = if d["rollback"].as_bool().unwrap_or(false) {
            format!("{} (rollback)", text("state"))
        } else {
            text("state")
        };
        rows.push([
            text("id"),
            text("service"),
            text("release"),
            state,
            text("created_at"),
            d["duration_s"].as_f64().map_or("-".into(), human_s),
            text("reason"),
        ]);
    }
    print_table(&rows, &[5]);
    Ok(0)
}

pub async fn show(conn: &Conn, id: Option<String>, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let v = json_of(
        client
            .show(pb::ShowRequest {
                id: id.unwrap_or_default(),
            })
            .await?
            .into_inner(),
    );
    if output == Output::Json {
        print_json(&v);
        return Ok(0);
    }
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    if let Some(f) = v["failure"].as_object() {
        outln!(
            "{} {} {}: {}",
            s("state").to_uppercase(),
            s("id"),
            f.get("phase").and_then(Value::as_str).unwrap_or("?"),
            f.get("reason")
                .and_then(Value::as_str)
                .unwrap_or("no reason recorded")
        );
        for h in f
            .get("hosts")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            outln!(
                "  {}: {}",
                h["name"].as_str().unwrap_or(""),
                h["error"].as_str().unwrap_or("failed")
            );
        }
        outln!();
    }
    outln!(
        "{} {} {} (from {}): {} after {}",
        s("id"),
        s("service"),
        s("release"),
        v["previous_release"].as_str().unwrap_or("nothing"),
        s("state"),
        human_s(v["elapsed_s"].as_f64().unwrap_or(0.0))
    );
    for e in v["timeline"].as_array().cloned().unwrap_or_default() {
        outln!(
            "  {:>8}  {}",
            format!("+{:.1}s", e["offset_s"].as_f64().unwrap_or(0.0)),
            e["text"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

pub async fn stats(
    conn: &Conn,
    service: Option<String>,
    since: &str,
    output: Output,
) -> Result<i32> {
    let since_unix_ms = since_ms("--since", since)?;
    let mut client = conn.client().await?;
    let v = json_of(
        client
            .stats(pb::StatsRequest {
                service: service.clone().unwrap_or_default(),
                since_unix_ms,
            })
            .await?
            .into_inner(),
    );
    if output == Output::Json {
        print_json(&v);
        return Ok(0);
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let spread = |k: &str| {
        let x = &v[k];
        match x["median_s"].as_f64() {
            None => "-".to_string(),
            Some(m) => format!(
                "median {}, mean {}, p90 {} (n={})",
                human_s(m),
                human_s(x["mean_s"].as_f64().unwrap_or(m)),
                human_s(x["p90_s"].as_f64().unwrap_or(m)),
                x["count"]
            ),
        }
    };
    let tally = |k: &str| {
        let m = v[k].as_object().cloned().unwrap_or_default();
        if m.is_empty() {
            return "-".to_string();
        }
        let mut items: Vec<(String, u64)> = m
            .into_iter()
            .map(|(a, b)| (a, b.as_u64().unwrap_or(0)))
            .collect();
        items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        items
            .iter()
            .map(|(a, b)| format!("{a}: {b}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    outln!(
        "{} over the last {since} (since {}):",
        service.as_deref().unwrap_or("every service"),
        v["since"].as_str().unwrap_or("")
    );
    outln!(
        "  deployments            {} ({}/day): {} succeeded, {} rolled back, {} failed, {} aborted, {} rolled back manually",
        n("deployments"),
        v["deployments_per_day"],
        n("succeeded"),
        n("rolled_back"),
        n("failed"),
        n("aborted"),
        n("rolled_back_manually")
    );
    outln!(
        "  change failure rate    {}",
        v["change_failure_rate"]
            .as_f64()
            .map_or("-".into(), |r| format!(
                "{:.1}% ({} of {} degraded service)",
                r * 100.0,
                n("change_failures"),
                n("deployments")
            ))
    );
    outln!(
        "  failed before traffic  {} (never served a request; not change failures)",
        n("failed_before_traffic")
    );
    outln!("  time to restore        {}", spread("time_to_restore"));
    outln!("  deployment duration    {}", spread("deployment_duration"));
    outln!("  lead time              {}", spread("lead_time"));
    outln!("  failures by phase      {}", tally("failures_by_phase"));
    outln!("  failures by host       {}", tally("failures_by_host"));
    Ok(0)
}
