//! `cutover logs SERVICE`: what the slots wrote, from every host that runs the service
//! (or `--deployment ID`: that deployment's hook and database command output), each
//! line prefixed with its host and slot — or, with `--output json`, one JSON object per
//! line. `-f` follows the logs until Ctrl-C, which ends the stream on the hosts too.

use serde::Serialize;

use super::conn::Conn;
use super::follow::Interrupt;
use super::{Failure, Output, Result};
use crate::{errln, outln};
use cutover_proto::v1 as pb;

/// `cutover logs`'s flags.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// The service whose slots' output to show.
    service: Option<String>,
    /// Only this host.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Only hosts with these labels, as k=v,k2=v2.
    #[arg(long, value_name = "K=V,...")]
    labels: Option<String>,
    /// Only this slot: blue, green, live (the one carrying traffic) or new (the other).
    #[arg(long, value_parser = ["blue", "green", "live", "new"])]
    slot: Option<String>,
    /// Only slots running this release.
    #[arg(long, value_name = "VERSION")]
    release: Option<String>,
    /// The last lines of each log to show.
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 100)]
    lines: u32,
    /// Keep showing lines as they are written, until Ctrl-C.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only lines written within this long, e.g. 10m.
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Show the output of this deployment's hooks and database commands instead.
    #[arg(long, value_name = "ID", conflicts_with_all = ["slot", "release"])]
    deployment: Option<String>,
}

/// One line as `--output json` prints it.
#[derive(Serialize)]
struct JsonLine<'a> {
    host: &'a str,
    /// The slot it comes from; none for a deployment's file.
    slot: Option<&'a str>,
    /// The release that slot runs.
    release: Option<&'a str>,
    /// The deployment's file it comes from.
    file: Option<&'a str>,
    line: &'a str,
}

/// `cutover logs`: exit 0, or 1 when a host could not answer (the others' lines are
/// shown). Ctrl-C while following is the normal end: exit 0.
pub async fn run(conn: &Conn, args: LogsArgs, output: Output) -> Result<i32> {
    let req = request(args)?;
    let mut client = conn.client().await?;
    let mut stream = client.logs(req).await?.into_inner();
    let mut interrupt = Interrupt::new();
    let mut failed = 0;
    loop {
        let next = tokio::select! {
            _ = interrupt.recv() => return Ok(0),
            next = stream.message() => next?,
        };
        let Some(r) = next else { break };
        for l in &r.lines {
            print_line(&r.host, l, output);
        }
        if !r.error.is_empty() {
            errln!("host {}: {}", r.host, r.error);
            failed += 1;
        }
    }
    Ok(if failed > 0 { super::failure::OTHER } else { 0 })
}

/// The request the flags make; a usage error says which flag is wrong.
fn request(a: LogsArgs) -> Result<pb::LogsRequest> {
    let service = a.service.unwrap_or_default();
    let deployment = a.deployment.unwrap_or_default();
    if service.is_empty() && deployment.is_empty() {
        return Err(Failure::usage(
            "name the service whose logs to show, or a deployment with --deployment ID",
        ));
    }
    let labels = match &a.labels {
        Some(l) => cutover_shared::names::parse_labels(l)
            .map_err(|m| Failure::usage(format!("--labels: {m}")))?,
        None => Default::default(),
    };
    let since_unix_ms = match &a.since {
        Some(s) => {
            let d = cutover_shared::duration::parse(s)
                .map_err(|m| Failure::usage(format!("--since {s}: {m}")))?;
            cutover_shared::clock::now_ms()
                .saturating_sub(d.as_millis())
                .max(1)
        }
        None => 0,
    };
    Ok(pb::LogsRequest {
        service,
        host: a.host.unwrap_or_default(),
        labels: labels.into_iter().collect(),
        slot: a.slot.unwrap_or_default(),
        release: a.release.unwrap_or_default(),
        lines: a.lines,
        follow: a.follow,
        since_unix_ms,
        deployment,
    })
}

/// `web-1 blue | line` (`web-1 expand.log | line` for a deployment's file), or a JSON
/// object on one line.
fn print_line(host: &str, l: &pb::LogLine, output: Output) {
    fn opt(s: &str) -> Option<&str> {
        (!s.is_empty()).then_some(s)
    }
    match output {
        Output::Json => {
            let v = JsonLine {
                host,
                slot: opt(&l.slot),
                release: opt(&l.release),
                file: opt(&l.file),
                line: &l.line,
            };
            let text = serde_json::to_string(&crate::views::to_value(&v)).unwrap_or_default();
            outln!("{text}");
        }
        Output::Text => {
            let from = if l.file.is_empty() { &l.slot } else { &l.file };
            outln!("{host} {from} | {}", l.line);
        }
    }
}
