//! Following a deployment until it ends (`cutover watch`, `deploy --wait`, `rollback
//! --wait`): poll it, show it — the live view on a terminal ([`super::live`]), plain
//! lines otherwise ([`super::plain`]) — and at the end say which host serves which
//! release and exit with the code of the final state. Ctrl-C stops following, not the
//! deployment.

use std::collections::BTreeMap;
use std::time::Duration;

use cutover_proto::v1 as pb;

use super::conn::{Client, decode};
use super::failure::{exit_code_for_state, is_final};
use super::live::{LiveView, live_lines};
use super::plain::{PlainLog, progress_line};
use super::reports::fetch_history;
use super::{Conn, Failure, Output, Result};
use crate::cli::out::print_json;
use crate::report::Show;
use crate::{errln, views};

/// How far back in the history `watch` looks for a deployment in progress.
const ACTIVE_SEARCH: u32 = 1000;
/// How long `watch` keeps trying while the coordinator is unavailable (it may be
/// restarting), in polls.
const UNAVAILABLE_POLLS: u32 = 60;

/// `cutover watch [ID]`: follows deployment `id`, or the latest one in progress.
pub async fn watch(conn: &Conn, id: Option<String>, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let id = match id {
        Some(id) => id,
        None => latest_active(&mut client).await?,
    };
    let d = follow(&mut client, &id).await?;
    Ok(finish(&mut client, &d, output).await)
}

/// The id of the newest deployment still in progress, or why there is none.
async fn latest_active(client: &mut Client) -> Result<String> {
    let rows = fetch_history(client, None, ACTIVE_SEARCH, 0).await?;
    if let Some(active) = rows.iter().find(|r| !r.state.is_final()) {
        return Ok(active.id.clone());
    }
    Err(Failure::other(match rows.first() {
        Some(latest) => format!(
            "no deployment in progress: the latest, {} ({} {}), ended {}; `cutover show` tells its story",
            latest.id,
            latest.service,
            latest.release,
            latest.state.as_str()
        ),
        None => "no deployment in progress: there is no deployment yet".to_string(),
    }))
}

/// What one poll of a followed deployment found.
enum Polled {
    /// Its record and its `show` report.
    Now(Box<(pb::Deployment, Show)>),
    /// The coordinator is unavailable (it may be restarting).
    Unavailable(tonic::Status),
}

async fn poll(client: &mut Client, id: &str) -> Result<Polled> {
    let answer = async {
        let d = client
            .get_deployment(pb::GetDeploymentRequest { id: id.to_string() })
            .await?
            .into_inner();
        let shown = client
            .show(pb::ShowRequest { id: d.id.clone() })
            .await?
            .into_inner();
        Ok::<_, tonic::Status>((d, shown))
    };
    match answer.await {
        Ok((d, doc)) => Ok(Polled::Now(Box::new((d, decode(&doc, "show report")?)))),
        Err(e) if e.code() == tonic::Code::Unavailable => Ok(Polled::Unavailable(e)),
        Err(e) => Err(e.into()),
    }
}

/// How a followed deployment is shown: redrawn in place, or as lines for a log.
enum Display {
    /// On a terminal: a block of lines redrawn on every poll.
    Live(LiveView),
    /// Anywhere else (or with `CUTOVER_PLAIN=1`): new events and changes, as lines.
    Plain {
        log: PlainLog,
        /// When following began, for the heartbeat of [`PlainLog`].
        started: std::time::Instant,
    },
}

impl Display {
    fn for_stderr() -> Display {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() && std::env::var_os("CUTOVER_PLAIN").is_none() {
            Display::Live(LiveView::default())
        } else {
            Display::Plain {
                log: PlainLog::default(),
                started: std::time::Instant::now(),
            }
        }
    }

    fn show(&mut self, d: &pb::Deployment, shown: &Show) {
        match self {
            Display::Live(view) => view.draw(&live_lines(shown)),
            Display::Plain { log, started } => {
                let lines = log.lines(
                    &shown.timeline,
                    progress_line(d),
                    shown.eta_s,
                    started.elapsed(),
                );
                for line in lines {
                    errln!("{line}");
                }
            }
        }
    }

    /// Time between polls: a live view moves its clocks twice a second.
    fn pause(&self) -> Duration {
        Duration::from_millis(match self {
            Display::Live(_) => 500,
            Display::Plain { .. } => 250,
        })
    }
}

/// Follows a deployment on stderr until it ends; returns its final state. Ctrl-C stops
/// following (exit [`super::INTERRUPTED`]) and leaves the deployment going.
pub async fn follow(client: &mut Client, id: &str) -> Result<pb::Deployment> {
    let mut display = Display::for_stderr();
    let mut interrupt = Interrupt::new();
    let mut unavailable = 0;
    loop {
        let polled = tokio::select! {
            _ = interrupt.recv() => return Err(Failure::interrupted(id)),
            p = poll(client, id) => p?,
        };
        match polled {
            Polled::Now(now) => {
                let (d, shown) = *now;
                unavailable = 0;
                display.show(&d, &shown);
                if is_final(&d.state) {
                    return Ok(d);
                }
            }
            Polled::Unavailable(_) if unavailable < UNAVAILABLE_POLLS => {
                // The coordinator may be restarting; keep following for a while.
                unavailable += 1;
            }
            Polled::Unavailable(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = interrupt.recv() => return Err(Failure::interrupted(id)),
            _ = tokio::time::sleep(display.pause()) => {}
        }
    }
}

/// Ctrl-C while following a deployment: resolves on SIGINT (never, if the signal cannot
/// be watched).
pub(super) struct Interrupt(Option<tokio::signal::unix::Signal>);

impl Interrupt {
    pub(super) fn new() -> Interrupt {
        use tokio::signal::unix::{SignalKind, signal};
        Interrupt(signal(SignalKind::interrupt()).ok())
    }

    pub(super) async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// The end of `--wait` and `watch`: which host serves which release, the final record
/// in JSON (with `serving`), and the exit code for the final state.
pub async fn finish(client: &mut Client, d: &pb::Deployment, output: Output) -> i32 {
    let serving = serving(client, d).await;
    report_serving(d, &serving);
    if output == Output::Json {
        print_json(&views::Finished {
            deployment: views::Deployment::from(d),
            serving,
        });
    }
    exit_code_for_state(&d.state)
}

/// What the deployment's hosts serve now, from their latest reports: release → hosts.
/// A host splitting traffic is listed under each release that carries weight; a host
/// that is not connected is listed as `unknown (unreachable)`.
async fn serving(client: &mut Client, d: &pb::Deployment) -> BTreeMap<String, Vec<String>> {
    let hosts = match client.list_hosts(pb::ListHostsRequest {}).await {
        Ok(r) => r.into_inner().hosts,
        Err(_) => return BTreeMap::new(),
    };
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for dh in &d.hosts {
        let Some(h) = hosts.iter().find(|h| h.name == dh.name) else {
            continue;
        };
        for r in releases_served(h, &d.service) {
            out.entry(r).or_default().push(h.name.clone());
        }
    }
    out
}

/// The releases host `h` serves for `service`: those of its slots that carry weight.
fn releases_served(h: &pb::Host, service: &str) -> Vec<String> {
    if !h.connected {
        return vec!["unknown (unreachable)".into()];
    }
    let releases: Vec<String> = h
        .services
        .iter()
        .filter(|s| s.service == service)
        .flat_map(|s| [s.blue.as_ref(), s.green.as_ref()])
        .flatten()
        .filter(|slot| slot.weight > 0 && !slot.release.is_empty())
        .map(|slot| slot.release.clone())
        .collect();
    if releases.is_empty() {
        vec!["nothing".into()]
    } else {
        releases
    }
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
