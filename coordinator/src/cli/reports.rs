//! The reports on past deployments: `history` (one line each), `show` (one deployment's
//! story, where it failed first) and `stats` (the DORA figures and where failures
//! happen). Each reads the coordinator's typed report ([`crate::report`]) and prints it
//! as text, or as the JSON it came as.

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;

use super::conn::{Client, decode};
use super::table::{human_s, print_table};
use super::{Conn, Failure, Output, Result};
use crate::cli::out::print_json;
use crate::outln;
use crate::report::{HistoryRow, Show, Spread, Stats};

/// `cutover history`'s flags.
#[derive(clap::Args)]
pub struct HistoryArgs {
    /// Only this service's deployments.
    #[arg(long)]
    service: Option<String>,
    /// Show at most this many deployments.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Only deployments started within this long, e.g. 7d.
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
}

/// `cutover stats`' flags.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// Only this service's deployments.
    #[arg(long)]
    service: Option<String>,
    /// Deployments started within this long, e.g. 7d.
    #[arg(long, default_value = "30d", value_name = "DURATION")]
    since: String,
}

/// `--since 30d` as unix ms.
fn since_ms(flag: &str, text: &str) -> Result<u64> {
    let d = cutover_shared::duration::parse(text)
        .map_err(|m| Failure::usage(format!("{flag} {text}: {m}")))?;
    Ok(cutover_shared::clock::now_ms().saturating_sub(d.as_millis()))
}

/// The history: `service`'s deployments (every service: `None`) started since
/// `since_unix_ms`, newest first, at most `limit` (0: the coordinator's default).
pub async fn fetch_history(
    client: &mut Client,
    service: Option<String>,
    limit: u32,
    since_unix_ms: u64,
) -> Result<Vec<HistoryRow>> {
    let doc = client
        .history(pb::HistoryRequest {
            service: service.unwrap_or_default(),
            limit,
            since_unix_ms,
        })
        .await?
        .into_inner();
    decode(&doc, "history")
}

/// `cutover history`.
pub async fn history(conn: &Conn, args: HistoryArgs, output: Output) -> Result<i32> {
    let since_unix_ms = match &args.since {
        Some(s) => since_ms("--since", s)?,
        None => 0,
    };
    let mut client = conn.client().await?;
    let rows = fetch_history(&mut client, args.service, args.limit, since_unix_ms).await?;
    match output {
        Output::Json => print_json(&rows),
        Output::Text => print_table(&history_rows(&rows), &[5]),
    }
    Ok(0)
}

/// The `history` table, header first.
fn history_rows(rows: &[HistoryRow]) -> Vec<[String; 8]> {
    let header = [
        "ID", "SERVICE", "RELEASE", "STATE", "STARTED", "DURATION", "DATABASE", "REASON",
    ];
    let mut table = vec![header.map(String::from)];
    for d in rows {
        let state = if d.rollback {
            format!("{} (rollback)", d.state.as_str())
        } else if d.restart {
            format!("{} (restart)", d.state.as_str())
        } else {
            d.state.as_str().to_string()
        };
        table.push([
            d.id.clone(),
            d.service.clone(),
            d.release.clone(),
            state,
            d.created_at.clone().unwrap_or_default(),
            d.duration_s.map_or("-".into(), human_s),
            d.database.clone().unwrap_or_else(|| "-".into()),
            d.reason.clone().unwrap_or_default(),
        ]);
    }
    table
}

/// `cutover show [ID]`.
pub async fn show(conn: &Conn, id: Option<String>, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let doc = client
        .show(pb::ShowRequest {
            id: id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let shown: Show = decode(&doc, "show report")?;
    match output {
        Output::Json => print_json(&shown),
        Output::Text => print_show(&shown),
    }
    Ok(0)
}

fn print_show(v: &Show) {
    if let Some(f) = &v.failure {
        outln!(
            "{} {} {}: {}",
            v.state.as_str().to_uppercase(),
            v.id,
            f.phase,
            f.reason.as_deref().unwrap_or("no reason recorded")
        );
        for h in &f.hosts {
            outln!("  {}: {}", h.name, h.error.as_deref().unwrap_or("failed"));
        }
        outln!();
    }
    outln!(
        "{} {} {} (from {}): {} after {}",
        v.id,
        v.service,
        v.release,
        v.previous_release.as_deref().unwrap_or("nothing"),
        v.state.as_str(),
        human_s(v.elapsed_s)
    );
    for e in &v.timeline {
        outln!("  {:>8}  {}", format!("+{:.1}s", e.offset_s), e.text);
    }
    print_database(&v.database);
    let Some(plan) = &v.plan else { return };
    outln!();
    outln!("plan ({}, secret values masked):", v.plan_path);
    match toml::to_string(plan) {
        Ok(text) => text.lines().for_each(|l| outln!("  {l}")),
        Err(e) => outln!("  (cannot be shown: {e})"),
    }
}

/// The schema change's phase, and for each command where it ran and where its whole
/// output is (`host:path`).
fn print_database(db: &crate::views::Database) {
    let Some(schema) = &db.schema else { return };
    outln!();
    outln!("database {schema}: {}", db.summary());
    if let Some(e) = &db.error {
        outln!("  {e}");
    }
    for (name, run) in [
        ("expand", &db.expand),
        ("contract", &db.contract),
        ("abort", &db.abort),
    ] {
        let Some(r) = run else { continue };
        let how = r.status.as_deref().unwrap_or("running");
        let log = r
            .log
            .as_deref()
            .map_or(String::new(), |l| format!(", output in {}:{l}", r.host));
        outln!("  {name:<8} {} on {}: {how}{log}", r.task, r.host);
    }
}

/// `cutover stats`.
pub async fn stats(conn: &Conn, args: StatsArgs, output: Output) -> Result<i32> {
    let since_unix_ms = since_ms("--since", &args.since)?;
    let mut client = conn.client().await?;
    let doc = client
        .stats(pb::StatsRequest {
            service: args.service.clone().unwrap_or_default(),
            since_unix_ms,
        })
        .await?
        .into_inner();
    let stats: Stats = decode(&doc, "stats")?;
    match output {
        Output::Json => print_json(&stats),
        Output::Text => print_stats(&stats, args.service.as_deref(), &args.since),
    }
    Ok(0)
}

fn print_stats(v: &Stats, service: Option<&str>, since: &str) {
    outln!(
        "{} over the last {since} (since {}):",
        service.unwrap_or("every service"),
        v.since.as_deref().unwrap_or("")
    );
    outln!(
        "  deployments            {} ({}/day): {} succeeded, {} rolled back, {} failed, {} aborted, {} rolled back manually",
        v.deployments,
        json_number(v.deployments_per_day),
        v.succeeded,
        v.rolled_back,
        v.failed,
        v.aborted,
        v.rolled_back_manually
    );
    outln!(
        "  change failure rate    {}",
        v.change_failure_rate.map_or("-".into(), |r| format!(
            "{:.1}% ({} of {} degraded service)",
            r * 100.0,
            v.change_failures,
            v.deployments
        ))
    );
    outln!(
        "  failed before traffic  {} (never served a request; not change failures)",
        v.failed_before_traffic
    );
    outln!("  time to restore        {}", spread(&v.time_to_restore));
    outln!(
        "  deployment duration    {}",
        spread(&v.deployment_duration)
    );
    outln!("  lead time              {}", spread(&v.lead_time));
    outln!("  failures by phase      {}", tally(&v.failures_by_phase));
    outln!("  failures by host       {}", tally(&v.failures_by_host));
}

/// A figure as its JSON shows it (`0.5`, `2.0`), which is how the text has always
/// written deployments per day.
fn json_number(x: f64) -> String {
    serde_json::Value::from(x).to_string()
}

/// `median 4.2s, mean 4.5s, p90 6.0s (n=12)`, or `-` without durations.
fn spread(x: &Spread) -> String {
    match x.median_s {
        None => "-".to_string(),
        Some(m) => format!(
            "median {}, mean {}, p90 {} (n={})",
            human_s(m),
            human_s(x.mean_s.unwrap_or(m)),
            human_s(x.p90_s.unwrap_or(m)),
            x.count
        ),
    }
}

/// `at 10%: 2, preparing: 1`: most first, then by name; `-` when empty.
fn tally(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "-".to_string();
    }
    let mut items: Vec<(&String, &usize)> = m.iter().collect();
    items.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    items
        .iter()
        .map(|(a, b)| format!("{a}: {b}"))
        .collect::<Vec<_>>()
        .join(", ")
}
