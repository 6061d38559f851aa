//! Plans for the sample service: packing the sample release into an artifact, and a
//! [`PlanBuilder`] that writes a plan deploying it — with the defaults every test shares
//! (service `web` on the cluster's public port, hosts labelled `env = "test"`, the
//! sample's HTTP health check, fast health timings, one step to 100 %) and one method
//! per thing a test changes.

use std::path::{Path, PathBuf};
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

/// How every plan runs the sample unless a test gives another command.
pub const SAMPLE_COMMAND: [&str; 4] = ["./bin/cutover-sample", "serve", "--port", "${PORT}"];

/// A release artifact as a plan names it.
pub struct Artifact {
    /// `[release] artifact`: a `file://` URL for a packed sample.
    pub url: String,
    /// `[release] sha256`.
    pub sha256: String,
}

impl Artifact {
    /// The file behind a `file://` URL, for a test that signs, serves or removes it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(self.url.trim_start_matches("file://"))
    }
}

impl Cluster {
    /// Packs the sample release `version` whose `behaviour.env` also holds `behaviour`
    /// (`error_rate=0.3`, `delay_ms=20`, ...; see `cutover-sample`).
    pub fn pack(&self, version: &str, behaviour: &[&str]) -> Artifact {
        pack(&self.bin, &self.dir, version, behaviour, &[])
    }

    /// A plan for the sample service at `version`; [`PlanBuilder::write`] packs the
    /// sample unless the test gives an artifact.
    pub fn plan(&self, version: &str) -> PlanBuilder {
        PlanBuilder::new(&self.dir, &self.bin, version, self.listen)
    }
}

/// Runs `cutover-sample pack` into `dir`, the release also shipping `files` (path in
/// the release, text).
fn pack(
    bin: &Path,
    dir: &Path,
    version: &str,
    behaviour: &[&str],
    files: &[(String, String)],
) -> Artifact {
    let name: String = behaviour
        .join("_")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(60)
        .collect();
    let out_file = dir.join(format!("web-{version}-{name}.tar.gz"));
    let mut cmd = Command::new(bin.join("cutover-sample"));
    cmd.args(["pack", "--out"])
        .arg(&out_file)
        .args(["--version", version]);
    let shipped = dir.join("files").join(version);
    for (dest, text) in files {
        let src = shipped.join(dest);
        if let Some(parent) = src.parent() {
            std::fs::create_dir_all(parent).expect("dir for a release file");
        }
        std::fs::write(&src, text).expect("write a release file");
        cmd.arg("--file").arg(format!("{}={dest}", src.display()));
    }
    let out = cmd.args(behaviour).output().expect("pack");
    assert!(
        out.status.success(),
        "pack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Artifact {
        url: format!("file://{}", out_file.display()),
        sha256: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}

/// Where a plan's release comes from.
enum Source {
    /// The sample, packed by [`PlanBuilder::write`] with these `behaviour.env` lines.
    Sample(Vec<String>),
    /// An artifact the test packed, made or serves itself.
    Given(Artifact),
}

/// The `[health]` check a plan names.
enum HealthCheck {
    /// `http = "/healthz"`, which the sample answers.
    SampleHttp,
    /// `exec = [...]`: a command the agent runs as the service's user.
    Exec(Vec<String>),
}

/// A plan for the sample service, written by [`PlanBuilder::write`].
pub struct PlanBuilder {
    /// Where the plan file (and a sample packed for it) is written: the cluster's dir.
    dir: PathBuf,
    /// The workspace's binaries, for `cutover-sample pack`.
    bin: PathBuf,
    /// `service`: `web` unless a test deploys a second service.
    service: String,
    /// `[release] version`, also the version a packed sample answers with.
    version: String,
    /// `[release] artifact` and `sha256`.
    source: Source,
    /// `[release] signature`, for agents with trusted keys.
    signature: Option<String>,
    /// `[targets] labels` besides `env = "test"`, which every harness host has.
    labels: Vec<(String, String)>,
    /// `[run] command`.
    command: Vec<String>,
    /// `[run] env`, in the order given.
    env: Vec<(String, String)>,
    /// `[run] listen`: the cluster's public port unless a test needs another.
    listen: u16,
    /// `[run] user`, when the plan names one.
    user: Option<String>,
    /// `[health]`'s check.
    check: HealthCheck,
    /// `[health] start_timeout`, when a test waits for a release that never turns healthy.
    start_timeout: Option<String>,
    /// `[strategy] steps`, a TOML array as written in the test.
    steps: String,
    /// More `[strategy]` lines (`key = value`), in the order given.
    strategy: Vec<String>,
    /// An `[analysis]` section, as written in the test.
    analysis: Option<String>,
    /// A `[database]` section, as written in the test.
    database: Option<String>,
    /// Files the packed sample ships besides itself: (path in the release, text).
    files: Vec<(String, String)>,
}

impl PlanBuilder {
    fn new(dir: &Path, bin: &Path, version: &str, listen: u16) -> PlanBuilder {
        PlanBuilder {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            service: "web".into(),
            version: version.into(),
            source: Source::Sample(Vec::new()),
            signature: None,
            labels: Vec::new(),
            command: SAMPLE_COMMAND.map(String::from).to_vec(),
            env: Vec::new(),
            listen,
            user: None,
            check: HealthCheck::SampleHttp,
            start_timeout: None,
            steps: "[{ traffic = 100 }]".into(),
            strategy: Vec::new(),
            analysis: None,
            database: None,
            files: Vec::new(),
        }
    }

    /// The sample to pack behaves so (`error_rate=0.3`, `unhealthy=1`, ...).
    pub fn behaviour(mut self, behaviour: &[&str]) -> Self {
        self.source = Source::Sample(behaviour.iter().map(|b| b.to_string()).collect());
        self
    }

    /// Deploys this artifact instead of packing the sample.
    pub fn artifact(mut self, url: &str, sha256: &str) -> Self {
        self.source = Source::Given(Artifact {
            url: url.into(),
            sha256: sha256.into(),
        });
        self
    }

    /// `[release] signature`.
    pub fn signature(mut self, signature: &str) -> Self {
        self.signature = Some(signature.into());
        self
    }

    /// `service`.
    pub fn service(mut self, name: &str) -> Self {
        self.service = name.into();
        self
    }

    /// One more `[targets] labels` entry.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// `[run] command`.
    pub fn command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(|a| a.to_string()).collect();
        self
    }

    /// One more `[run] env` variable.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// `[run] listen`.
    pub fn listen(mut self, port: u16) -> Self {
        self.listen = port;
        self
    }

    /// `[run] user`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    /// `[health] exec` instead of the sample's HTTP check.
    pub fn health_exec(mut self, command: &[&str]) -> Self {
        self.check = HealthCheck::Exec(command.iter().map(|a| a.to_string()).collect());
        self
    }

    /// `[health] start_timeout`, e.g. `"3s"`.
    pub fn start_timeout(mut self, timeout: &str) -> Self {
        self.start_timeout = Some(timeout.into());
        self
    }

    /// `[strategy] steps`, as a TOML array: `[{ traffic = 10, hold = "5s" }, { traffic = 100 }]`.
    pub fn steps(mut self, steps: &str) -> Self {
        self.steps = steps.into();
        self
    }

    /// `[strategy] max_failed_hosts`.
    pub fn max_failed_hosts(self, hosts: u32) -> Self {
        self.strategy_line("max_failed_hosts", &hosts.to_string())
    }

    /// `[strategy] keep_previous`, e.g. `"1s"`.
    pub fn keep_previous(self, duration: &str) -> Self {
        self.strategy_line("keep_previous", &quoted(duration))
    }

    /// `[strategy] on_host_lost`: `"pause"`, `"rollback"` or `"continue"`.
    pub fn on_host_lost(self, action: &str) -> Self {
        self.strategy_line("on_host_lost", &quoted(action))
    }

    /// `[strategy] host_lost_after`, e.g. `"2s"`.
    pub fn host_lost_after(self, duration: &str) -> Self {
        self.strategy_line("host_lost_after", &quoted(duration))
    }

    /// An `[analysis]` section, e.g. [`ANALYSIS_ERRORS`].
    pub fn analysis(mut self, section: &str) -> Self {
        self.analysis = Some(section.into());
        self
    }

    /// A `[database]` section's keys, e.g. `schema = "app_${RELEASE}"` lines.
    pub fn database(mut self, section: &str) -> Self {
        self.database = Some(section.into());
        self
    }

    /// One more file the packed sample ships: `path` in the release, with `text`.
    pub fn file(mut self, path: &str, text: &str) -> Self {
        self.files.push((path.into(), text.into()));
        self
    }

    fn strategy_line(mut self, key: &str, value: &str) -> Self {
        self.strategy.push(format!("{key} = {value}"));
        self
    }

    /// Writes the plan to `NAME.toml` in the cluster's dir, packing the sample first
    /// unless an artifact was given; returns its path.
    pub fn write(self, name: &str) -> PathBuf {
        let text = match &self.source {
            Source::Given(artifact) => self.render(artifact),
            Source::Sample(behaviour) => {
                let behaviour: Vec<&str> = behaviour.iter().map(String::as_str).collect();
                let artifact = pack(&self.bin, &self.dir, &self.version, &behaviour, &self.files);
                self.render(&artifact)
            }
        };
        let p = self.dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).expect("write plan");
        p
    }

    /// The plan's text, deploying `artifact`.
    fn render(&self, artifact: &Artifact) -> String {
        let optional = |key: &str, value: &Option<String>| {
            value
                .as_ref()
                .map_or(String::new(), |v| format!("\n{key} = {}", quoted(v)))
        };
        let env = if self.env.is_empty() {
            String::new()
        } else {
            format!("\nenv = {}", inline_table(&self.env))
        };
        let check = match &self.check {
            HealthCheck::SampleHttp => "http = \"/healthz\"".to_string(),
            HealthCheck::Exec(command) => format!("exec = {}", list(command)),
        };
        let mut labels = vec![("env".to_string(), "test".to_string())];
        labels.extend(self.labels.iter().cloned());
        let strategy: String = self.strategy.iter().map(|l| format!("\n{l}")).collect();
        format!(
            r#"service = {service}

[release]
version = {version}
artifact = {artifact}
sha256 = {sha256}{signature}

[targets]
labels = {labels}

[run]
command = {command}
listen = {listen}
drain = "2s"
stop_timeout = "5s"{env}{user}

[health]
{check}
interval = "200ms"
timeout = "1s"
healthy_after = 2
unhealthy_after = 2{start_timeout}

[strategy]
max_parallel = "100%"
steps = {steps}{strategy}

{analysis}{database}"#,
            service = quoted(&self.service),
            version = quoted(&self.version),
            artifact = quoted(&artifact.url),
            sha256 = quoted(&artifact.sha256),
            signature = optional("signature", &self.signature),
            labels = inline_table(&labels),
            command = list(&self.command),
            listen = self.listen,
            user = optional("user", &self.user),
            start_timeout = optional("start_timeout", &self.start_timeout),
            steps = self.steps,
            analysis = self.analysis.as_deref().unwrap_or_default(),
            database = self
                .database
                .as_ref()
                .map_or(String::new(), |d| format!("\n[database]\n{d}\n")),
        )
    }
}

/// `text` as a TOML string. A JSON string is a valid TOML basic string: the same quotes
/// and backslash escapes, and control characters as `\uXXXX`.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// `["a", "b"]`.
fn list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|i| quoted(i)).collect();
    format!("[{}]", items.join(", "))
}

/// `{ KEY = "value", "odd key" = "value" }`.
fn inline_table(entries: &[(String, String)]) -> String {
    let bare = |k: &str| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    let entries: Vec<String> = entries
        .iter()
        .map(|(k, v)| {
            let key = if bare(k) { k.clone() } else { quoted(k) };
            format!("{key} = {}", quoted(v))
        })
        .collect();
    format!("{{ {} }}", entries.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_shared::duration::Duration;
    use cutover_shared::plan::{Check, Count, OnHostLost, Plan};

    fn builder() -> PlanBuilder {
        PlanBuilder::new(
            Path::new("/nonexistent"),
            Path::new("/nonexistent"),
            "2.0.0",
            7400,
        )
    }

    fn parse(b: &PlanBuilder) -> Plan {
        let artifact = Artifact {
            url: "file:///tmp/web.tar.gz".into(),
            sha256: "ab".repeat(32),
        };
        let text = b.render(&artifact);
        Plan::parse(&text, "plan.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_defaults_deploy_the_sample_to_every_test_host_in_one_step() {
        let p = parse(&builder());
        assert_eq!(p.service, "web");
        assert_eq!(p.release.version, "2.0.0");
        assert_eq!(p.release.artifact, "file:///tmp/web.tar.gz");
        assert_eq!(p.release.signature, None);
        assert_eq!(p.targets.labels.len(), 1);
        assert_eq!(p.targets.labels["env"], "test");
        assert_eq!(p.run.command, SAMPLE_COMMAND);
        assert!(p.run.env.is_empty());
        assert_eq!(p.run.listen, 7400);
        assert_eq!(p.run.drain, Duration::from_secs(2));
        assert_eq!(p.run.stop_timeout, Duration::from_secs(5));
        assert_eq!(p.run.user, None);
        assert_eq!(p.health.check(), Some(Check::Http("/healthz".into())));
        assert_eq!(p.health.interval, Duration::from_millis(200));
        assert_eq!(p.health.timeout, Duration::from_secs(1));
        assert_eq!((p.health.healthy_after, p.health.unhealthy_after), (2, 2));
        assert_eq!(p.health.start_timeout, Duration::from_secs(60));
        assert_eq!(p.strategy.max_parallel, Count::Percent(100));
        assert_eq!(p.strategy.steps.len(), 1);
        assert_eq!(p.strategy.steps[0].traffic, 100);
        assert!(p.analysis.is_none());
    }

    #[test]
    fn every_change_a_test_makes_reaches_the_plan() {
        let shell = r#"echo "$PORT" > 'a \ file'"#;
        let b = builder()
            .service("api")
            .signature(&"cd".repeat(64))
            .label("tier", "front")
            .command(&["sh", "-c", shell])
            .env("APP_URL", "http://127.0.0.1:${PORT}/")
            .env("WORKERS", "4")
            .listen(9000)
            .user("nobody")
            .health_exec(&["sh", "-c", "true"])
            .start_timeout("3s")
            .steps(r#"[{ traffic = 50, hold = "6s" }, { traffic = 100 }]"#)
            .max_failed_hosts(1)
            .keep_previous("1s")
            .on_host_lost("rollback")
            .host_lost_after("2s")
            .analysis(ANALYSIS_ERRORS)
            .database("schema = \"app_${RELEASE}\"\nexpand = [\"e\"]\ncontract = [\"c\"]\nabort = [\"a\"]");
        let p = parse(&b);
        assert_eq!(p.service, "api");
        assert_eq!(p.release.signature, Some("cd".repeat(64)));
        assert_eq!(p.targets.labels["tier"], "front");
        assert_eq!(p.run.command, ["sh", "-c", shell]);
        assert_eq!(p.run.env["APP_URL"], "http://127.0.0.1:${PORT}/");
        assert_eq!(p.run.env["WORKERS"], "4");
        assert_eq!(p.run.listen, 9000);
        assert_eq!(p.run.user.as_deref(), Some("nobody"));
        assert_eq!(
            p.health.check(),
            Some(Check::Exec(vec!["sh".into(), "-c".into(), "true".into()]))
        );
        assert_eq!(p.health.start_timeout, Duration::from_secs(3));
        assert_eq!(p.strategy.steps.len(), 2);
        assert_eq!(p.strategy.steps[0].hold, Duration::from_secs(6));
        assert_eq!(p.strategy.max_failed_hosts, 1);
        assert_eq!(p.strategy.keep_previous, Duration::from_secs(1));
        assert_eq!(p.strategy.on_host_lost, OnHostLost::Rollback);
        assert_eq!(p.strategy.host_lost_after, Duration::from_secs(2));
        assert_eq!(p.analysis.map(|a| a.min_requests), Some(20));
        let db = p.database.expect("[database]");
        assert_eq!(db.schema_name("2.0.0"), "app_2_0_0");
        assert_eq!(db.expand, ["e"]);
    }
}
