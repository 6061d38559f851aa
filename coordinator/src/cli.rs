//! The release manager's CLI: every `cutover` subcommand except `serve`. Data goes to
//! stdout (text or `--output json`), progress and errors to stderr; exit codes follow
//! the product contract (0 ok, 2 usage or plan, 3 rolled back, 4 failed or aborted,
//! 130 when Ctrl-C stops following a deployment, 1 anything else).

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod out;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_proto::v1::{self as pb, control_client::ControlClient};
use cutover_shared::plan::{Plan, check_artifact_url, check_sha256};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{errln, outln};

/// A CLI failure: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
    fn other(message: impl Into<String>) -> Self {
        Failure::new(1, message)
    }
    fn plan(message: impl Into<String>) -> Self {
        Failure::new(2, message)
    }
}

pub type Result<T> = std::result::Result<T, Failure>;

fn status_failure(e: tonic::Status) -> Failure {
    let code = match e.code() {
        tonic::Code::InvalidArgument => 2,
        _ => 1,
    };
    let msg = e.message();
    let msg = if msg.is_empty() {
        e.code().description()
    } else {
        msg
    };
    Failure::new(code, msg.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

pub struct Conn {
    pub coordinator: String,
    pub credentials: PathBuf,
}

impl Conn {
    pub async fn client(&self) -> Result<ControlClient<Channel>> {
        cutover_proto::tls::install_default_provider();
        let read = |name: &str| {
            let p = self.credentials.join(name);
            std::fs::read(&p).map_err(|e| {
                Failure::other(format!(
                    "read credentials {}: {e} (point --credentials or CUTOVER_CREDENTIALS at the coordinator's DATA/admin folder)",
                    p.display()
                ))
            })
        };
        let (ca, cert, key) = (read("ca.crt")?, read("client.crt")?, read("client.key")?);
        let cfg = cutover_proto::tls::client_config(&ca, &cert, &key).map_err(|e| {
            Failure::other(format!(
                "credentials in {}: {e}",
                self.credentials.display()
            ))
        })?;
        let channel = cutover_proto::tls::connect(&self.coordinator, cfg)
            .await
            .map_err(|e| {
                Failure::other(format!(
                    "cannot reach the coordinator: {}",
                    cutover_shared::errors::chain(&e)
                ))
            })?;
        Ok(ControlClient::new(channel))
    }
}

fn print_json(v: &Value) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn opt(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

fn ms_to_rfc3339(ms: u64) -> Value {
    if ms == 0 {
        return Value::Null;
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    Value::String(humantime::format_rfc3339_millis(t).to_string())
}

pub fn deployment_json(d: &pb::Deployment) -> Value {
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
        "created_at": ms_to_rfc3339(d.created_unix_ms),
        "ended_at": ms_to_rfc3339(d.ended_unix_ms),
        "hosts": d.hosts.iter().map(|h| json!({
            "name": h.name,
            "phase": h.phase,
            "weight": h.weight,
            "error": opt(&h.error),
        })).collect::<Vec<_>>(),
        "rollback": if d.rollback_decided_unix_ms == 0 { Value::Null } else { json!({
            "first_bad_at": ms_to_rfc3339(d.first_bad_unix_ms),
            "decided_at": ms_to_rfc3339(d.rollback_decided_unix_ms),
            "done_at": ms_to_rfc3339(d.rollback_done_unix_ms),
            "first_bad_unix_ms": d.first_bad_unix_ms,
            "done_unix_ms": if d.rollback_done_unix_ms == 0 { Value::Null } else { json!(d.rollback_done_unix_ms) },
            "seconds_to_restore": if d.rollback_done_unix_ms == 0 { Value::Null } else {
                json!((d.rollback_done_unix_ms.saturating_sub(d.first_bad_unix_ms)) as f64 / 1000.0)
            },
        })},
        "intervals": d.intervals.iter().map(|i| json!({
            "step": i.step,
            "traffic": i.traffic,
            "started_at": ms_to_rfc3339(i.started_unix_ms),
            "ended_at": ms_to_rfc3339(i.ended_unix_ms),
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

fn slot_json(s: Option<&pb::HostSlot>) -> Value {
    match s {
        Some(s) => json!({"release": opt(&s.release), "state": s.state, "weight": s.weight}),
        None => json!({"release": null, "state": "empty", "weight": 0}),
    }
}

pub fn hosts_json(hosts: &[pb::Host]) -> Value {
    Value::Array(
        hosts
            .iter()
            .map(|h| {
                let labels: std::collections::BTreeMap<_, _> = h.labels.iter().collect();
                json!({
                    "name": h.name,
                    "labels": labels,
                    "connected": h.connected,
                    "last_seen": ms_to_rfc3339(h.last_seen_unix_ms),
                    "services": h.services.iter().map(|s| json!({
                        "service": s.service,
                        "live_release": opt(&s.live_release),
                        "slots": {"blue": slot_json(s.blue.as_ref()), "green": slot_json(s.green.as_ref())},
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

pub fn exit_code_for_state(state: &str) -> i32 {
    match state {
        "succeeded" => 0,
        "rolled_back" => 3,
        "failed" | "aborted" => 4,
        _ => 1,
    }
}

fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "rolled_back" | "failed" | "aborted")
}

/// Reads and validates a plan file, then applies the command line's overrides.
pub fn load_plan(
    path: &Path,
    release: Option<String>,
    artifact: Option<String>,
    sha256: Option<String>,
) -> Result<Plan> {
    let shown = path.display().to_string();
    let read = |e: std::io::Error| Failure::plan(format!("{shown}: {e}"));
    // A file over the size limit is refused without reading it.
    let size = std::fs::metadata(path).map_err(read)?.len();
    Plan::check_size(size, &shown).map_err(|e| Failure::plan(e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(read)?;
    let mut plan = Plan::parse(&text, &shown).map_err(|e| Failure::plan(e.to_string()))?;
    if let Some(v) = release {
        if v.trim().is_empty() {
            return Err(Failure::plan("--release: must not be empty"));
        }
        plan.release.version = v;
    }
    if let Some(a) = artifact {
        check_artifact_url(&a).map_err(|m| Failure::plan(format!("--artifact: {m}")))?;
        plan.release.artifact = a;
    }
    if let Some(s) = sha256 {
        check_sha256(&s).map_err(|m| Failure::plan(format!("--sha256: {m}")))?;
        plan.release.sha256 = s;
    }
    plan.validate()
        .map_err(|inv| Failure::plan(format!("{shown}: {}", inv.message)))?;
    Ok(plan)
}

pub async fn deploy(
    conn: &Conn,
    plan: Plan,
    path: &Path,
    wait: bool,
    output: Output,
) -> Result<i32> {
    let mut client = conn.client().await?;
    let text = toml::to_string(&plan).map_err(|e| Failure::other(format!("encode plan: {e}")))?;
    let resp = client
        .deploy(pb::DeployRequest {
            actor: actor(),
            plan_toml: text,
            plan_path: path.display().to_string(),
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    follow_up(&mut client, resp, wait, output).await
}

pub async fn rollback(conn: &Conn, service: String, wait: bool, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let resp = client
        .rollback(pb::RollbackRequest {
            service,
            actor: actor(),
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    follow_up(&mut client, resp, wait, output).await
}

async fn follow_up(
    client: &mut ControlClient<Channel>,
    resp: pb::DeployResponse,
    wait: bool,
    output: Output,
) -> Result<i32> {
    if output == Output::Text || !wait {
        if output == Output::Text {
            outln!("{}", resp.id);
        } else {
            print_json(&json!({"id": resp.id, "noop": resp.noop}));
        }
    }
    if resp.noop {
        errln!(
            "{}: release already live on every target host; nothing to do",
            resp.id
        );
    }
    if !wait {
        return Ok(0);
    }
    let d = watch(client, &resp.id).await?;
    Ok(finish(client, &d, output).await)
}

/// The end of `--wait` and `watch`: which host serves which release, the final record
/// in JSON (with `serving`), and the exit code for the final state.
pub async fn finish(
    client: &mut ControlClient<Channel>,
    d: &pb::Deployment,
    output: Output,
) -> i32 {
    let serving = serving(client, d).await;
    report_serving(d, &serving);
    if output == Output::Json {
        let mut v = deployment_json(d);
        v["serving"] = json!(serving);
        print_json(&v);
    }
    exit_code_for_state(&d.state)
}

/// The plain progress line in two parts: what it says about the deployment's state
/// (printed when it changes), and the figures that move on their own (the last
/// analysis interval, the ETA), shown along with it.
fn progress_line(d: &pb::Deployment) -> (String, String) {
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
struct PlainLog {
    printed_events: usize,
    last_progress: String,
    last_line_at: Option<Duration>,
}

impl PlainLog {
    /// The lines to print now; `at` is the time since following began.
    fn lines(
        &mut self,
        events: &[Value],
        (progress, figures): (String, String),
        eta: Option<f64>,
        at: Duration,
    ) -> Vec<String> {
        let mut out: Vec<String> = events
            .iter()
            .skip(self.printed_events)
            .map(|e| {
                format!(
                    "  +{:.1}s {}",
                    e["offset_s"].as_f64().unwrap_or(0.0),
                    e["text"].as_str().unwrap_or("")
                )
            })
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

/// Exit code of `watch` and `--wait` interrupted by Ctrl-C; the deployment goes on.
pub const INTERRUPTED: i32 = 130;

fn interrupted(id: &str) -> Failure {
    Failure::new(
        INTERRUPTED,
        format!(
            "{id} goes on; follow it with `cutover watch {id}`, stop it with `cutover abort {id}`"
        ),
    )
}

/// Ctrl-C while following a deployment: resolves on SIGINT (never, if the signal cannot
/// be watched).
struct Interrupt(Option<tokio::signal::unix::Signal>);

impl Interrupt {
    fn new() -> Interrupt {
        use tokio::signal::unix::{SignalKind, signal};
        Interrupt(signal(SignalKind::interrupt()).ok())
    }
    async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// What the deployment's hosts serve now, from their latest reports: release → hosts.
/// A host splitting traffic is listed under each release that carries weight; a host
/// that is not connected is listed as `unknown (unreachable)`.
pub async fn serving(
    client: &mut ControlClient<Channel>,
    d: &pb::Deployment,
) -> BTreeMap<String, Vec<String>> {
    let hosts = match client.list_hosts(pb::ListHostsRequest {}).await {
        Ok(r) => r.into_inner().hosts,
        Err(_) => return BTreeMap::new(),
    };
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for dh in &d.hosts {
        let Some(h) = hosts.iter().find(|h| h.name == dh.name) else {
            continue;
        };
        let mut releases: Vec<String> = h
            .services
            .iter()
            .filter(|s| s.service == d.service)
            .flat_map(|s| [s.blue.as_ref(), s.green.as_ref()])
            .flatten()
            .filter(|slot| slot.weight > 0 && !slot.release.is_empty())
            .map(|slot| slot.release.clone())
            .collect();
        if !h.connected {
            releases = vec!["unknown (unreachable)".into()];
        } else if releases.is_empty() {
            releases = vec!["nothing".into()];
        }
        for r in releases {
            out.entry(r).or_default().push(h.name.clone());
        }
    }
    out
}

/// Says on stderr which release each host serves, and warns when the fleet is mixed.
fn report_serving(d: &pb::Deployment, serving: &BTreeMap<String, Vec<String>>) {
    if serving.is_empty() {
        return;
    }
    let parts: Vec<String> = serving
        .iter()
        .map(|(release, hosts)| format!("{release} on {}", hosts.join(", ")))
        .collect();
    if serving.len() == 1 {
        errln!("{}: every host serves {}", d.service, parts.join(""));
    } else {
        errln!(
            "warning: the fleet is mixed: {} serves {}",
            d.service,
            parts.join("; ")
        );
        for h in d.hosts.iter().filter(|h| !h.error.is_empty()) {
            errln!("  {}: {}", h.name, h.error);
        }
    }
}

/// `cutover watch [ID]`: follows deployment `id`, or the latest one in progress.
pub async fn watch_command(conn: &Conn, id: Option<String>, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let id = match id {
        Some(id) => id,
        None => latest_active(&mut client).await?,
    };
    let d = watch(&mut client, &id).await?;
    Ok(finish(&mut client, &d, output).await)
}

/// How far back in the history `watch` looks for a deployment in progress.
const ACTIVE_SEARCH: u32 = 1000;

/// The id of the newest deployment still in progress, or why there is none.
async fn latest_active(client: &mut ControlClient<Channel>) -> Result<String> {
    let history = json_of(
        client
            .history(pb::HistoryRequest {
                service: String::new(),
                limit: ACTIVE_SEARCH,
                since_unix_ms: 0,
            })
            .await
            .map_err(status_failure)?
            .into_inner(),
    );
    let rows = history.as_array().cloned().unwrap_or_default();
    let state = |r: &Value| r["state"].as_str().unwrap_or("").to_string();
    if let Some(active) = rows.iter().find(|r| !is_final(&state(r))) {
        return Ok(active["id"].as_str().unwrap_or_default().to_string());
    }
    Err(Failure::other(match rows.first() {
        Some(latest) => format!(
            "no deployment in progress: the latest, {} ({} {}), ended {}; `cutover show` tells its story",
            latest["id"].as_str().unwrap_or(""),
            latest["service"].as_str().unwrap_or(""),
            latest["release"].as_str().unwrap_or(""),
            state(latest)
        ),
        None => "no deployment in progress: there is no deployment yet".to_string(),
    }))
}

/// One poll of a deployment: its record and its `show` document.
async fn poll(
    client: &mut ControlClient<Channel>,
    id: &str,
) -> std::result::Result<(pb::Deployment, Value), tonic::Status> {
    let d = client
        .get_deployment(pb::GetDeploymentRequest { id: id.to_string() })
        .await?
        .into_inner();
    let shown = client
        .show(pb::ShowRequest { id: d.id.clone() })
        .await?
        .into_inner();
    Ok((d, serde_json::from_str(&shown.json).unwrap_or_default()))
}

/// Follows a deployment on stderr until it ends; returns its final state. Ctrl-C stops
/// following (exit [`INTERRUPTED`]) and leaves the deployment going.
pub async fn watch(client: &mut ControlClient<Channel>, id: &str) -> Result<pb::Deployment> {
    use std::io::IsTerminal;
    let live = std::io::stderr().is_terminal() && std::env::var_os("CUTOVER_PLAIN").is_none();
    let mut view = LiveView::default();
    let mut plain = PlainLog::default();
    let mut interrupt = Interrupt::new();
    let started = std::time::Instant::now();
    let mut failures = 0;
    loop {
        let polled = tokio::select! {
            _ = interrupt.recv() => return Err(interrupted(id)),
            p = poll(client, id) => p,
        };
        match polled {
            Ok((d, shown)) => {
                failures = 0;
                if live {
                    view.draw(&live_lines(&shown));
                } else {
                    let events = shown["timeline"].as_array().cloned().unwrap_or_default();
                    let lines = plain.lines(
                        &events,
                        progress_line(&d),
                        shown["eta_s"].as_f64(),
                        started.elapsed(),
                    );
                    for line in lines {
                        errln!("{line}");
                    }
                }
                if is_final(&d.state) {
                    return Ok(d);
                }
            }
            Err(e) if e.code() == tonic::Code::Unavailable && failures < 60 => {
                // The coordinator may be restarting; keep following for a while.
                failures += 1;
            }
            Err(e) => return Err(status_failure(e)),
        }
        let pause = Duration::from_millis(if live { 500 } else { 250 });
        tokio::select! {
            _ = interrupt.recv() => return Err(interrupted(id)),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

fn human_s(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// A block of lines redrawn in place on a terminal.
#[derive(Default)]
struct LiveView {
    drawn: usize,
}

impl LiveView {
    fn draw(&mut self, lines: &[String]) {
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
fn live_lines(v: &Value) -> Vec<String> {
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

pub async fn status(conn: &Conn, id: Option<String>, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let d = client
        .get_deployment(pb::GetDeploymentRequest {
            id: id.unwrap_or_default(),
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    match output {
        Output::Json => print_json(&deployment_json(&d)),
        Output::Text => {
            outln!("id:        {}", d.id);
            outln!("service:   {}", d.service);
            outln!(
                "release:   {}{}",
                d.release,
                if d.previous_release.is_empty() {
                    String::new()
                } else {
                    format!(" (was {})", d.previous_release)
                }
            );
            outln!("state:     {}", d.state);
            outln!("step:      {}/{}", d.step + 1, d.steps.max(1));
            outln!("traffic:   {}%", d.traffic);
            if !d.reason.is_empty() {
                outln!("reason:    {}", d.reason);
            }
            outln!("hosts:");
            for h in &d.hosts {
                let err = if h.error.is_empty() {
                    String::new()
                } else {
                    format!("  {}", h.error)
                };
                outln!("  {:<20} {:<12} {:>3}%{}", h.name, h.phase, h.weight, err);
            }
        }
    }
    Ok(0)
}

pub async fn command(
    conn: &Conn,
    id: String,
    cmd: pb::DeploymentCommand,
    output: Output,
) -> Result<i32> {
    let mut client = conn.client().await?;
    let d = client
        .command(pb::CommandRequest {
            actor: actor(),
            id,
            command: cmd as i32,
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    match output {
        Output::Json => print_json(&deployment_json(&d)),
        Output::Text => outln!("{} {}", d.id, d.state),
    }
    Ok(0)
}

pub async fn hosts(conn: &Conn, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let hosts = client
        .list_hosts(pb::ListHostsRequest {})
        .await
        .map_err(status_failure)?
        .into_inner()
        .hosts;
    match output {
        Output::Json => print_json(&hosts_json(&hosts)),
        Output::Text => {
            let mut rows = vec![["NAME", "CONNECTED", "LABELS", "SERVICES"].map(String::from)];
            for h in &hosts {
                let mut labels: Vec<String> =
                    h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                let services: Vec<String> = h
                    .services
                    .iter()
                    .map(|s| {
                        let slot = |x: &Option<pb::HostSlot>| {
                            x.as_ref()
                                .filter(|x| !x.release.is_empty())
                                .map(|x| format!("{}:{}@{}%", x.release, x.state, x.weight))
                                .unwrap_or_else(|| "-".into())
                        };
                        format!(
                            "{} live={} blue={} green={}",
                            s.service,
                            if s.live_release.is_empty() {
                                "-"
                            } else {
                                &s.live_release
                            },
                            slot(&s.blue),
                            slot(&s.green)
                        )
                    })
                    .collect();
                rows.push([
                    h.name.clone(),
                    if h.connected { "yes" } else { "no" }.to_string(),
                    if labels.is_empty() {
                        "-".to_string()
                    } else {
                        labels.join(",")
                    },
                    services.join("; "),
                ]);
            }
            print_table(&rows, &[]);
        }
    }
    Ok(0)
}

pub async fn remove_host(conn: &Conn, name: String, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    client
        .remove_host(pb::RemoveHostRequest { name: name.clone() })
        .await
        .map_err(status_failure)?;
    match output {
        Output::Json => print_json(&json!({"removed": name})),
        Output::Text => errln!("host {name} removed; its certificate is revoked"),
    }
    Ok(0)
}

/// What `cutover token create` asks for, parsed.
pub struct NewToken {
    pub labels: BTreeMap<String, String>,
    pub allow_labels: Vec<String>,
    pub name: Option<String>,
    pub replace: Option<String>,
    pub ttl: cutover_shared::Duration,
    pub uses: u32,
}

pub async fn token_create(conn: &Conn, t: NewToken, output: Output) -> Result<i32> {
    if t.ttl.is_zero() {
        return Err(Failure::new(2, "--ttl: must be more than 0s"));
    }
    if t.uses == 0 {
        return Err(Failure::new(2, "--uses: must be at least 1"));
    }
    if let (Some(n), Some(r)) = (&t.name, &t.replace)
        && n != r
    {
        return Err(Failure::new(
            2,
            format!("--name {n} and --replace {r} name different hosts"),
        ));
    }
    let mut client = conn.client().await?;
    let r = client
        .create_token(pb::CreateTokenRequest {
            labels: t.labels.into_iter().collect(),
            ttl_ms: t.ttl.as_millis(),
            uses: t.uses,
            name: t.name.unwrap_or_default(),
            replace: t.replace.unwrap_or_default(),
            allow_labels: t.allow_labels,
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    match output {
        Output::Json => print_json(
            &json!({"token": r.token, "id": r.id, "expires_at": ms_to_rfc3339(r.expires_unix_ms)}),
        ),
        Output::Text => outln!("{}", r.token),
    }
    Ok(0)
}

pub async fn token_list(conn: &Conn, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let tokens = client
        .list_tokens(pb::ListTokensRequest {})
        .await
        .map_err(status_failure)?
        .into_inner()
        .tokens;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let state = |t: &pb::TokenInfo| {
        if t.revoked {
            "revoked"
        } else if t.expires_unix_ms <= now {
            "expired"
        } else if t.uses_left == 0 {
            "used"
        } else {
            "valid"
        }
    };
    match output {
        Output::Json => print_json(&Value::Array(
            tokens
                .iter()
                .map(|t| {
                    let labels: std::collections::BTreeMap<_, _> = t.labels.iter().collect();
                    json!({
                        "id": t.id,
                        "labels": labels,
                        "name": opt(&t.name),
                        "replace": t.replace,
                        "allow_labels": t.allow_labels,
                        "created_at": ms_to_rfc3339(t.created_unix_ms),
                        "expires_at": ms_to_rfc3339(t.expires_unix_ms),
                        "uses_left": t.uses_left,
                        "state": state(t),
                    })
                })
                .collect(),
        )),
        Output::Text => {
            let mut rows = vec![
                [
                    "ID",
                    "STATE",
                    "USES LEFT",
                    "EXPIRES",
                    "HOST",
                    "ALLOW LABELS",
                    "LABELS",
                ]
                .map(String::from),
            ];
            let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
            for t in &tokens {
                let mut labels: Vec<String> =
                    t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                let expires = ms_to_rfc3339(t.expires_unix_ms);
                let host = match (t.name.as_str(), t.replace) {
                    ("", _) => String::new(),
                    (name, true) => format!("{name} (replace)"),
                    (name, false) => name.to_string(),
                };
                rows.push([
                    t.id.clone(),
                    state(t).to_string(),
                    t.uses_left.to_string(),
                    expires.as_str().unwrap_or("-").to_string(),
                    or_dash(host),
                    or_dash(t.allow_labels.join(",")),
                    or_dash(labels.join(",")),
                ]);
            }
            print_table(&rows, &[2]);
        }
    }
    Ok(0)
}

pub async fn token_revoke(conn: &Conn, id: String, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    client
        .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
        .await
        .map_err(status_failure)?;
    match output {
        Output::Json => print_json(&json!({"revoked": id})),
        Output::Text => errln!("token {id} revoked"),
    }
    Ok(0)
}

pub fn plan_validate(path: &Path, output: Output) -> Result<i32> {
    let plan = load_plan(path, None, None, None)?;
    match output {
        Output::Json => print_json(
            &json!({"valid": true, "service": plan.service, "release": plan.release.version, "steps": plan.strategy.steps.len()}),
        ),
        Output::Text => outln!(
            "{}: ok (service {}, release {}, {} step(s))",
            path.display(),
            plan.service,
            plan.release.version,
            plan.strategy.steps.len()
        ),
    }
    Ok(0)
}

/// `cutover artifact keygen`: a new ed25519 signing key, written to `out` (hex PKCS#8,
/// mode 0600); prints the public key (hex) for the agents' trusted keys.
pub fn artifact_keygen(out: &Path, output: Output) -> Result<i32> {
    use ring::signature::KeyPair;
    if out.exists() {
        return Err(Failure::new(
            2,
            format!("{}: already exists; not overwriting a key", out.display()),
        ));
    }
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| Failure::other("generate key: the system's random source failed"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .map_err(|_| Failure::other("generate key: invalid key"))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| Failure::other(format!("write {}: {e}", out.display())))?;
        f.write_all(hex::encode(doc.as_ref()).as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .map_err(|e| Failure::other(format!("write {}: {e}", out.display())))?;
    }
    let public = hex::encode(pair.public_key().as_ref());
    match output {
        Output::Json => {
            print_json(&json!({"key_file": out.display().to_string(), "public_key": public}))
        }
        Output::Text => outln!("{public}"),
    }
    Ok(0)
}

/// `cutover artifact sign FILE --key KEY`: prints the signature for `[release] signature`.
pub fn artifact_sign(file: &Path, key: &Path, output: Output) -> Result<i32> {
    use sha2::Digest;
    let key_hex = std::fs::read_to_string(key)
        .map_err(|e| Failure::new(2, format!("{}: {e}", key.display())))?;
    let der = hex::decode(key_hex.trim()).map_err(|_| {
        Failure::new(
            2,
            format!(
                "{}: not a key written by `cutover artifact keygen`",
                key.display()
            ),
        )
    })?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|_| Failure::new(2, format!("{}: not an ed25519 key", key.display())))?;
    let mut f = std::fs::File::open(file)
        .map_err(|e| Failure::new(2, format!("{}: {e}", file.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .map_err(|e| Failure::other(format!("read {}: {e}", file.display())))?;
    let sha = hex::encode(hasher.finalize());
    let sig = hex::encode(
        pair.sign(&cutover_shared::signing::signed_message(&sha))
            .as_ref(),
    );
    match output {
        Output::Json => print_json(&json!({"sha256": sha, "signature": sig})),
        Output::Text => {
            errln!("sha256 {sha}");
            outln!("{sig}");
        }
    }
    Ok(0)
}

/// `user@host` of whoever runs the CLI, for the deployment's timeline.
fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "unknown".into());
    match nix::unistd::gethostname() {
        Ok(h) => format!("{user}@{}", h.to_string_lossy()),
        Err(_) => user,
    }
}

/// `--since 30d` as unix ms.
fn since_ms(flag: &str, text: &str) -> Result<u64> {
    let d = cutover_shared::duration::parse(text)
        .map_err(|m| Failure::new(2, format!("{flag} {text}: {m}")))?;
    Ok(cutover_shared::clock::now_ms().saturating_sub(d.as_millis()))
}

fn json_of(doc: pb::JsonDocument) -> Value {
    serde_json::from_str(&doc.json).unwrap_or_default()
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
            .await
            .map_err(status_failure)?
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

fn print_table<const N: usize>(rows: &[[String; N]], right: &[usize]) {
    for line in table_lines(rows, right) {
        outln!("{line}");
    }
}

/// Rows in columns as wide as their widest cell, two spaces apart; columns in `right`
/// are right-aligned, and the last column is not padded.
fn table_lines<const N: usize>(rows: &[[String; N]], right: &[usize]) -> Vec<String> {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = " ".repeat(widths[c] - cell.chars().count());
                if c > 0 {
                    line.push_str("  ");
                }
                if right.contains(&c) {
                    line.push_str(&pad);
                }
                line.push_str(cell);
                if !right.contains(&c) {
                    line.push_str(&pad);
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

pub async fn show(conn: &Conn, id: Option<String>, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let v = json_of(
        client
            .show(pb::ShowRequest {
                id: id.unwrap_or_default(),
            })
            .await
            .map_err(status_failure)?
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
            .await
            .map_err(status_failure)?
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

#[cfg(test)]
mod tests;
