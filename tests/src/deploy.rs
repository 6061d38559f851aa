//! Deploying to a [`Cluster`] and seeing the outcome: `deploy --wait` with its exit code,
//! a deployment left holding its first step, a deployment's status, and which release
//! each host's public port answers with.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::http::get;
use crate::procs::wait_until;

impl Cluster {
    /// Deploys each version in turn straight to 100 % and waits for success.
    pub fn deploy_versions(&self, versions: &[&str]) {
        for v in versions {
            let plan = self.plan(v).write(v);
            let (code, _, err) = self.deploy_wait(&plan);
            assert_eq!(code, 0, "deploy {v}: {err}");
        }
    }

    /// Starts a deployment without waiting; returns its id.
    pub fn deploy(&self, plan: &Path) -> String {
        self.cli_ok(&["deploy", plan.to_str().expect("utf-8 path")])
            .trim()
            .to_string()
    }

    /// Starts a deployment without waiting and polls until its first step holds: every
    /// host switched and the deployment progressing. Returns its id.
    pub fn deploy_until_holding(&self, plan: &Path) -> String {
        let id = self.deploy(plan);
        wait_until(Duration::from_secs(30), "the first step to hold", || {
            let s = self.status(&id);
            s["state"] == "progressing"
                && s["hosts"]
                    .as_array()
                    .is_some_and(|h| h.iter().all(|h| h["phase"] == "switched"))
        });
        id
    }

    /// Deploys and waits; returns (exit code, id, stderr).
    pub fn deploy_wait(&self, plan: &Path) -> (i32, String, String) {
        let out = self.cli(&["deploy", plan.to_str().expect("utf-8 path"), "--wait"]);
        let id = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        (
            out.status.code().unwrap_or(-1),
            id,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `cutover watch ID`: follows the deployment to its end; returns (exit code, stderr).
    pub fn watch(&self, id: &str) -> (i32, String) {
        let out = self.cli(&["watch", id]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `cutover status ID` as JSON.
    pub fn status(&self, id: &str) -> Value {
        serde_json::from_str(&self.cli_ok(&["status", id, "--output", "json"]))
            .expect("status json")
    }

    /// Why deployment `id` ended as it did (its status's `reason`), or "".
    pub fn reason(&self, id: &str) -> String {
        self.status(id)["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The body each host's public port answers with (`release X` or an error).
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.agents
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    get(&format!("{}:{}", a.ip, self.listen), "/").unwrap_or_else(|e| e),
                )
            })
            .collect()
    }

    /// True when every host's public port answers `release {version}`.
    pub fn all_serving(&self, version: &str) -> bool {
        self.all_answering(&format!("release {version}"))
    }

    /// True when every host's public port answers exactly `body`.
    pub fn all_answering(&self, body: &str) -> bool {
        self.versions().values().all(|v| v == body)
    }
}
