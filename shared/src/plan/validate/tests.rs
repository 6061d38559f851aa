//! Each section's checks on its own: the exact message and key path of every refusal,
//! and that the first problem in file order is the one reported.

use super::*;
use crate::duration::Duration;
use crate::plan::Judge;
use crate::plan::path::key_path;

fn plan() -> Plan {
    let text = format!(
        "service = \"web\"\n[release]\nversion = \"1\"\nartifact = \"file:///a.tar.gz\"\nsha256 = \"{}\"\n[run]\ncommand = [\"./web\", \"--port\", \"${{PORT}}\"]\nlisten = 8080\n[health]\nhttp = \"/healthz\"\n[analysis]\n[[analysis.metric]]\nname = \"error_rate\"\nmax = 0.01\n",
        "a".repeat(64)
    );
    Plan::parse(&text, "plan.toml").expect("a valid plan")
}

/// Asserts `r` is refused at `path` with `message`.
#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, Invalid>, path: &str, message: &str) {
    let inv = r.expect_err("refused");
    assert_eq!(
        (key_path(&inv.path).as_str(), inv.message.as_str()),
        (path, message)
    );
}

fn step(traffic: u32) -> Step {
    Step {
        traffic,
        hold: Duration::ZERO,
        pause: false,
        hosts: None,
    }
}

#[test]
fn the_first_problem_in_file_order_is_reported() {
    let mut p = plan();
    p.run.listen = 80;
    p.release.version = String::new();
    p.service = String::new();
    refused(p.validate(), "service", "service name is empty");
    p.service = "web".into();
    refused(p.validate(), "release.version", "must not be empty");
    p.release.version = "1".into();
    refused(
        p.validate(),
        "run.listen",
        "port 80 is below 1024; cutover's proxy binds unprivileged ports only",
    );
}

#[test]
fn release() {
    let mut r = plan().release;
    r.version = "../x".into();
    refused(
        validate_release(&r),
        "release.version",
        "must be at most 128 characters with no '/' or '\\'",
    );
    r.version = "1".into();
    r.artifact = "ftp://x".into();
    refused(
        validate_release(&r),
        "release.artifact",
        "\"ftp://x\" is not a file:///, http:// or https:// URL",
    );
    r.artifact = "https://x".into();
    r.sha256 = "abc".into();
    refused(
        validate_release(&r),
        "release.sha256",
        "\"abc\" is not a SHA-256 digest (64 hexadecimal digits; `sha256sum FILE` prints it)",
    );
    r.sha256 = "b".repeat(64);
    r.signature = Some("zz".into());
    refused(
        validate_release(&r),
        "release.signature",
        "not an ed25519 signature (128 hexadecimal digits, as `cutover artifact sign` prints)",
    );
    r.signature = Some("c".repeat(128));
    assert_eq!(validate_release(&r), Ok(()));
}

#[test]
fn targets() {
    let mut t = plan().targets;
    t.labels.insert("role".into(), "web server".into());
    let inv = validate_targets(&t).expect_err("a space in a label value");
    assert_eq!(key_path(&inv.path), "targets.labels");
    assert!(
        inv.message.starts_with("label role: value \"web server\""),
        "{}",
        inv.message
    );
}

#[test]
fn run() {
    let mut r = plan().run;
    r.command = vec![" ".into()];
    refused(
        validate_run(&r),
        "run.command",
        "must name the program to run, e.g. [\"./bin/web\", \"--port\", \"${PORT}\"]",
    );
    r.command = vec!["./web".into(), "${PROT}".into()];
    refused(
        validate_run(&r),
        "run.command[1]",
        "unknown variable ${PROT}: did you mean ${PORT}?",
    );
    r.command = vec!["./web".into()];
    r.env.insert("A=B".into(), "${PORT}".into());
    refused(validate_run(&r), "run.env", "invalid variable name \"A=B\"");
    r.env.clear();
    r.stop_timeout = Duration::ZERO;
    refused(validate_run(&r), "run.stop_timeout", "must be more than 0s");
    r.stop_timeout = Duration::from_secs(1);
    r.user = Some(" ".into());
    refused(validate_run(&r), "run.user", "must not be empty");
}

#[test]
fn health() {
    let mut h = plan().health;
    h.http = None;
    refused(
        validate_health(&h),
        "health",
        "no health check: set one of http = \"/healthz\", tcp = true or exec = [\"./check\"]",
    );
    h.tcp = Some(true);
    h.exec = Some(vec!["./check".into()]);
    refused(
        validate_health(&h),
        "health",
        "set only one of http, tcp and exec",
    );
    h.tcp = None;
    h.exec = Some(Vec::new());
    refused(
        validate_health(&h),
        "health.exec",
        "must name a program to run",
    );
    h.exec = None;
    h.http = Some("healthz".into());
    refused(
        validate_health(&h),
        "health.http",
        "must be a path starting with '/'",
    );
    h.http = Some("/healthz".into());
    h.start_timeout = Duration::ZERO;
    refused(
        validate_health(&h),
        "health.start_timeout",
        "must be more than 0s",
    );
    h.start_timeout = Duration::from_secs(1);
    h.unhealthy_after = 0;
    refused(
        validate_health(&h),
        "health.unhealthy_after",
        "must be at least 1",
    );
}

#[test]
fn strategy() {
    let mut s = plan().strategy;
    s.max_parallel = Count::Hosts(0);
    refused(
        validate_strategy(&s),
        "strategy.max_parallel",
        "must be at least 1 host",
    );
    s.max_parallel = Count::Percent(101);
    refused(
        validate_strategy(&s),
        "strategy.max_parallel",
        "101% is not a share from 1% to 100%",
    );
    s.max_parallel = Count::Hosts(1);
    s.progress_deadline = Duration::ZERO;
    refused(
        validate_strategy(&s),
        "strategy.progress_deadline",
        "must be more than 0s",
    );
}

#[test]
fn steps() {
    refused(
        validate_steps(&[]),
        "strategy.steps",
        "no steps: add at least { traffic = 100 }",
    );
    refused(
        validate_steps(&[step(0), step(100)]),
        "strategy.steps[0].traffic",
        "traffic 0 is not a percentage from 1 to 100",
    );
    refused(
        validate_steps(&[step(50), step(10), step(100)]),
        "strategy.steps[1].traffic",
        "traffic goes down from 50 to 10; steps must not lower traffic",
    );
    refused(
        validate_steps(&[step(10), step(10), step(100)]),
        "strategy.steps[1].traffic",
        "step repeats traffic 10 and changes nothing",
    );
    refused(
        validate_steps(&[step(10), step(90)]),
        "strategy.steps[1].traffic",
        "the last step sends 90% to the new release; it must end at 100",
    );
    // The same traffic again is a step when it holds, pauses or widens the hosts.
    let held = Step {
        hold: Duration::from_secs(1),
        ..step(10)
    };
    let paused = Step {
        pause: true,
        ..step(10)
    };
    assert_eq!(validate_steps(&[step(10), held, paused, step(100)]), Ok(()));
}

#[test]
fn host_waves() {
    let wave = |traffic, hosts| Step {
        hosts: Some(hosts),
        ..step(traffic)
    };
    refused(
        validate_steps(&[
            wave(10, Count::Percent(50)),
            wave(10, Count::Percent(25)),
            step(100),
        ]),
        "strategy.steps[1].hosts",
        "hosts goes down from 50% to 25%; later steps must not drop hosts",
    );
    refused(
        validate_steps(&[
            wave(10, Count::Hosts(2)),
            step(10),
            wave(100, Count::Percent(50)),
        ]),
        "strategy.steps[2].hosts",
        "hosts goes down from 100% to 50%; later steps must not drop hosts",
    );
    refused(
        validate_steps(&[step(10), wave(100, Count::Hosts(3))]),
        "strategy.steps[1].hosts",
        "the last step must cover every target host: leave hosts out or write \"100%\"",
    );
    // Counts of different kinds are not compared; a wave after all hosts is a change.
    let ok = [
        wave(10, Count::Percent(50)),
        wave(10, Count::Hosts(1)),
        step(10),
        step(100),
    ];
    assert_eq!(validate_steps(&ok), Ok(()));
}

#[test]
fn analysis() {
    let mut a = plan().analysis.expect("analysis");
    a.failure_limit = 0;
    refused(
        validate_analysis(&a),
        "analysis.failure_limit",
        "must be at least 1",
    );
    a.failure_limit = 1;
    a.interval = Duration::ZERO;
    refused(
        validate_analysis(&a),
        "analysis.interval",
        "must be more than 0s",
    );
}

#[test]
fn metrics() {
    let m = plan().analysis.expect("analysis").metric.remove(0);
    let with = |f: &dyn Fn(&mut Metric)| {
        let mut m = m.clone();
        f(&mut m);
        validate_metric(3, &m)
    };
    refused(
        with(&|m| m.max = None),
        "analysis.metric[3]",
        "metric has no bound: set max, min, max_vs_baseline, min_vs_baseline or judge",
    );
    refused(
        with(&|m| m.min = Some(f64::NAN)),
        "analysis.metric[3].min",
        "must be a number of 0 or more",
    );
    refused(
        with(&|m| m.min = Some(0.5)),
        "analysis.metric[3].min",
        "min 0.5 is above max 0.01",
    );
    refused(
        with(&|m| m.max = Some(2.0)),
        "analysis.metric[3].max",
        "error_rate is a fraction from 0 to 1; 2 is above 1",
    );
    refused(
        with(&|m| m.max_vs_baseline = Some(0.0)),
        "analysis.metric[3].max_vs_baseline",
        "must be a ratio above 0, e.g. 1.5",
    );
    refused(
        with(&|m| m.confidence = Some(0.9)),
        "analysis.metric[3].confidence",
        "needs judge = \"mann-whitney\"",
    );
    refused(
        with(&|m| {
            m.judge = Some(Judge::MannWhitney);
            m.confidence = Some(1.0);
        }),
        "analysis.metric[3].confidence",
        "must be between 0 and 1, e.g. 0.95",
    );
    refused(
        with(&|m| m.min_vs_baseline = Some(-1.0)),
        "analysis.metric[3].min_vs_baseline",
        "must be a ratio above 0, e.g. 0.8",
    );
    assert_eq!(with(&|m| m.name = "latency_p99".into()), Ok(()));
}

#[test]
fn env_files_are_absolute_and_listed_once_and_secret_names_are_variable_names() {
    let mut p = plan();
    p.run.env_files = vec!["/etc/cutover/web.env".into(), "web.env".into()];
    refused(
        validate_env_sources(&p.run),
        "run.env_files[1]",
        "\"web.env\" is not an absolute path; write e.g. \"/etc/cutover/web.env\"",
    );
    p.run.env_files = vec!["/etc/a.env".into(), "/etc/a.env".into()];
    refused(
        validate_env_sources(&p.run),
        "run.env_files[1]",
        "/etc/a.env is listed twice",
    );
    p.run.env_files = vec!["/etc/a.env".into()];
    p.run.secret_env = vec!["DATABASE_URL".into(), "A=B".into()];
    refused(
        validate_env_sources(&p.run),
        "run.secret_env[1]",
        "invalid variable name \"A=B\"",
    );
    p.run.secret_env.pop();
    assert_eq!(p.validate(), Ok(()));
}
