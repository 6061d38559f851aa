//! Events out: each `--webhook URL` receives a JSON document for every deployment start,
//! step, pause, rollback and end, and every database command's start, end and stall, in
//! order, with retries. Each document carries a Slack-compatible `text`, so a Slack (or
//! Mattermost) incoming webhook shows it as is.
//!
//! Delivery is in memory and at least once per URL: a URL that keeps failing gets each
//! event up to [`ATTEMPTS`] times with backoff, then the event is logged and dropped so
//! one broken receiver never holds up the others or the engine.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::DeploymentRecord;
use crate::timeline::{Event, Kind};

/// Tries per event and URL.
pub const ATTEMPTS: usize = 6;

/// Hands events to the delivery tasks; cheap to clone. Without URLs it does nothing.
#[derive(Clone, Default)]
pub struct Webhooks {
    /// One queue per URL, each drained in order by its own delivery task.
    queues: Vec<mpsc::UnboundedSender<Value>>,
}

/// The events that go out, by timeline kind.
fn wanted(kind: &Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Submitted { .. } => "deployment_started",
        Kind::StepStarted { .. } => "step_started",
        Kind::StepHolding { .. } => "step_holding",
        Kind::Paused { .. } => "paused",
        Kind::Command { .. } => "command",
        Kind::RollbackStarted { .. } => "rollback_started",
        Kind::RollbackDone => "rollback_done",
        Kind::Ended { .. } => "deployment_ended",
        Kind::DatabaseStarted { .. } => "database_started",
        Kind::DatabaseEnded { .. } => "database_ended",
        Kind::DatabaseStalled { .. } => "database_stalled",
        _ => return None,
    })
}

/// The document sent for one event of deployment `d`.
pub fn document(d: &DeploymentRecord, e: &Event) -> Option<Value> {
    let name = wanted(&e.kind)?;
    let mut v = serde_json::to_value(e).ok()?;
    if let Value::Object(m) = &mut v {
        m.insert("event".into(), json!(name));
        m.insert("deployment".into(), json!(d.id));
        m.insert("service".into(), json!(d.service));
        m.insert("release".into(), json!(d.release));
        m.insert("previous_release".into(), json!(d.previous_release));
        m.insert("state".into(), json!(d.state.as_str()));
        m.insert("at".into(), json!(crate::views::rfc3339(e.at_unix_ms)));
        m.insert(
            "text".into(),
            json!(format!(
                "cutover {} {} {}: {}",
                d.id,
                d.service,
                d.release,
                e.describe()
            )),
        );
    }
    Some(v)
}

impl Webhooks {
    /// Starts one delivery task per URL.
    pub fn start(urls: &[String], cancel: &CancellationToken) -> Webhooks {
        let mut queues = Vec::new();
        for url in urls {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(deliver(url.clone(), rx, cancel.clone()));
            queues.push(tx);
        }
        Webhooks { queues }
    }

    /// Queues the events of deployment `d` that go out (after they were committed).
    pub fn send(&self, d: &DeploymentRecord, events: &[Event]) {
        if self.queues.is_empty() {
            return;
        }
        for e in events {
            if let Some(doc) = document(d, e) {
                for q in &self.queues {
                    let _ = q.send(doc.clone());
                }
            }
        }
    }
}

async fn deliver(url: String, mut rx: mpsc::UnboundedReceiver<Value>, cancel: CancellationToken) {
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(url, error = %e, "webhook client");
            return;
        }
    };
    loop {
        let doc = tokio::select! {
            _ = cancel.cancelled() => return,
            d = rx.recv() => match d { Some(d) => d, None => return },
        };
        let post = || async {
            let r = client
                .post(&url)
                .header("content-type", "application/json")
                .body(doc.to_string())
                .send()
                .await?;
            r.error_for_status().map(|_| ())
        };
        let sent = post
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(ATTEMPTS - 1)
                    .with_jitter(),
            )
            .sleep(tokio::time::sleep)
            .notify(|e, after| {
                tracing::warn!(url, error = %cutover_shared::errors::chain(e), retry_in = ?after, "webhook delivery failed")
            });
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = sent => if let Err(e) = r {
                tracing::error!(url, event = %doc["event"], deployment = %doc["deployment"], error = %cutover_shared::errors::chain(&e), "webhook event dropped after {ATTEMPTS} tries");
            },
        }
    }
}
