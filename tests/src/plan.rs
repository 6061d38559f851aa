//! Plans for the sample service: packing the sample release into an artifact, and
//! writing a plan that deploys it.

use std::path::PathBuf;
use std::process::Command;

use crate::cluster::Cluster;

/// An `[analysis]` section that fails a release whose error rate is above 5 % in one
/// 1 s interval of at least 20 requests.
pub const ANALYSIS_ERRORS: &str = r#"[analysis]
interval = "1s"
failure_limit = 1
min_requests = 20

[[analysis.metric]]
name = "error_rate"
max = 0.05
"#;

impl Cluster {
    /// Packs a sample release; returns (file:// URL, sha256).
    pub fn pack(&self, version: &str, behaviour: &[&str]) -> (String, String) {
        let out_file = self.dir.join(format!(
            "web-{version}-{}.tar.gz",
            behaviour.join("_").replace(['=', '.'], "")
        ));
        let out = Command::new(self.bin.join("cutover-sample"))
            .args(["pack", "--out"])
            .arg(&out_file)
            .args(["--version", version])
            .args(behaviour)
            .output()
            .expect("pack");
        assert!(
            out.status.success(),
            "pack: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            format!("file://{}", out_file.display()),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    /// Writes a plan for the sample service; `strategy` is the `[strategy]` body.
    pub fn plan(
        &self,
        name: &str,
        version: &str,
        artifact: &str,
        sha: &str,
        strategy: &str,
        health_extra: &str,
    ) -> PathBuf {
        self.plan_with(name, version, artifact, sha, strategy, health_extra, "")
    }

    /// Like [`Cluster::plan`], with more sections (e.g. `[analysis]`) appended.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_with(
        &self,
        name: &str,
        version: &str,
        artifact: &str,
        sha: &str,
        strategy: &str,
        health_extra: &str,
        more: &str,
    ) -> PathBuf {
        let text = format!(
            r#"service = "web"

[release]
version = "{version}"
artifact = "{artifact}"
sha256 = "{sha}"

[targets]
labels = {{ env = "test" }}

[run]
command = ["./bin/cutover-sample", "serve", "--port", "${{PORT}}"]
listen = {listen}
drain = "2s"
stop_timeout = "5s"

[health]
http = "/healthz"
interval = "200ms"
timeout = "1s"
healthy_after = 2
unhealthy_after = 2
{health_extra}

[strategy]
max_parallel = "100%"
{strategy}

{more}
"#,
            listen = self.listen
        );
        let p = self.dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).expect("write plan");
        p
    }
}
