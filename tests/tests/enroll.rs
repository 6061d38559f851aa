//! Enrolment that cannot be abused: a join never takes over an enrolled host unless its
//! token says `--replace`, tokens pin names and own labels, the token stays out of `ps`,
//! removed hosts stop for good, clients with a foreign certificate are told so, and a
//! coordinator on a wildcard address is reachable through every local address.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tests::{Cluster, Value, netns::Fabric, wait_until};

/// `cutover-agent join` against `c` with `args` after `--coordinator`, and `env` set.
fn join(c: &Cluster, coordinator: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(c.bin.join("cutover-agent"))
        .args(["join", "--coordinator", coordinator])
        .args(args)
        .env_remove("CUTOVER_JOIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("run cutover-agent join")
}

/// `cutover-agent join` of host `name` into `dir` with `--token`, through `via`, with
/// `extra` arguments after.
fn join_token(
    c: &Cluster,
    via: &str,
    token: &str,
    name: &str,
    dir: &Path,
    extra: &[&str],
) -> Output {
    let d = dir.to_str().expect("path");
    let mut args = vec!["--token", token, "--name", name, "--data-dir", d];
    args.extend_from_slice(extra);
    join(c, via, &args, &[])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Joins with `--token` and asserts the refusal names `want`.
fn refused(c: &Cluster, name: &str, dir: &Path, token: &str, labels: &str, want: &str) {
    let out = join_token(c, &c.coord_addr, token, name, dir, &["--labels", labels]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "join {name} must be refused: {err}"
    );
    assert!(err.contains(want), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        !dir.join("identity/cert.pem").exists(),
        "a refused join gets no certificate"
    );
}

fn tokens(c: &Cluster) -> Vec<Value> {
    let list = c.cli_ok(&["token", "list", "--output", "json"]);
    serde_json::from_str::<Value>(&list)
        .expect("token list json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn token_json(c: &Cluster, token: &str) -> Value {
    let id = token.split('.').nth(2).expect("token id");
    tokens(c)
        .into_iter()
        .find(|t| t["id"] == id)
        .expect("token listed")
}

fn labels_of(c: &Cluster, host: &str) -> Value {
    c.hosts()
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == host).cloned())
        .map(|h| h["labels"].clone())
        .unwrap_or_default()
}

fn count(log: &Path, text: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(text)
        .count()
}

#[test]
fn a_join_token_cannot_take_over_an_enrolled_host() {
    let mut c = Cluster::start(75, 0);
    c.add_agent("host-b", "127.75.0.2", "env=test,role=web");
    c.deploy_versions(&["1.0.0"]);
    let real = &c.agents[0];
    let serving = format!("127.75.0.2:{}", c.listen);
    assert_eq!(tests::get(&serving, "/").as_deref(), Ok("release 1.0.0"));

    // The incident: a token for dev hosts, used under host-b's name with its labels.
    let dev = c
        .cli_ok(&["token", "create", "--labels", "env=dev", "--uses", "2"])
        .trim()
        .to_string();
    let impostor = c.dir.join("impostor");
    refused(
        &c,
        "host-b",
        &impostor,
        &dev,
        "env=test,role=web",
        "host host-b is already enrolled; to replace it on purpose, run `cutover hosts remove host-b` first, or join with a token from `cutover token create --replace host-b`",
    );
    // A clone of host-b (same hostname) is refused the same way, labels or not.
    refused(
        &c,
        "host-b",
        &c.dir.join("clone"),
        &dev,
        "",
        "already enrolled",
    );
    assert_eq!(
        token_json(&c, &dev)["uses_left"],
        2,
        "refusals spend nothing"
    );

    // The real host keeps its session and keeps serving; its certificate still works.
    assert!(c.connected("host-b"));
    assert_eq!(count(&real.proc.log, "connected to coordinator"), 1);
    assert_eq!(tests::get(&serving, "/").as_deref(), Ok("release 1.0.0"));
    let (ip, data) = (real.ip.clone(), real.data_dir.clone());
    c.agents[0].proc.kill();
    c.agents[0].proc = c.spawn_agent("host-b", &ip, &data);
    wait_until(Duration::from_secs(20), "host-b to reconnect", || {
        count(&c.agents[0].proc.log, "connected to coordinator") == 1 && c.connected("host-b")
    });
    assert_eq!(labels_of(&c, "host-b")["env"], "test");

    the_tokens_labels_are_authoritative(&c, &dev);
}

/// The labels of token `dev` (`env=dev`, two uses left) are authoritative: a join can
/// neither change one nor add a key the token does not allow, and a join that takes
/// them as they are works.
fn the_tokens_labels_are_authoritative(c: &Cluster, dev: &str) {
    let newcomer = c.dir.join("host-c");
    refused(
        c,
        "host-c",
        &newcomer,
        dev,
        "env=prod",
        "label env=dev is set by the join token; join --labels cannot change it",
    );
    refused(
        c,
        "host-c",
        &newcomer,
        dev,
        "role=web",
        "label role is not allowed by the join token (it allows none)",
    );
    assert_eq!(token_json(c, dev)["uses_left"], 2);
    let out = join_token(c, &c.coord_addr, dev, "host-c", &newcomer, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(labels_of(c, "host-c"), serde_json::json!({"env": "dev"}));
    assert_eq!(token_json(c, dev)["uses_left"], 1);
}

#[test]
fn replace_tokens_revoke_the_old_host_and_pinned_names_admit_no_other() {
    let mut c = Cluster::start(76, 1);
    c.deploy_versions(&["1.0.0"]);
    let pinned = pinned_name_admits_no_other(&c);
    let replace = replace_token(&c, &pinned);
    let new_dir = c.dir.join("web-1-new");
    replace_web_1(&mut c, &replace, &new_dir);

    // The new machine is web-1: it gets web-1's desired state and serves it.
    let proc = c.spawn_agent("web-1", "127.76.0.3", &new_dir);
    c.agents[0].proc = proc;
    c.agents[0].ip = "127.76.0.3".into();
    c.agents[0].data_dir = new_dir;
    wait_until(
        Duration::from_secs(30),
        "the new web-1 to serve 1.0.0",
        || c.connected("web-1") && c.all_serving("1.0.0"),
    );
    assert_eq!(
        labels_of(&c, "web-1"),
        serde_json::json!({"env": "test", "zone": "b"})
    );
}

/// A token pinned to web-9 enrols web-9 and no other name; returns it.
fn pinned_name_admits_no_other(c: &Cluster) -> String {
    let pinned = c
        .cli_ok(&["token", "create", "--name", "web-9", "--labels", "env=test"])
        .trim()
        .to_string();
    refused(
        c,
        "web-8",
        &c.dir.join("web-8"),
        &pinned,
        "",
        "this join token enrols only host web-9, not web-8",
    );
    let out = c.join("web-9", &c.dir.join("web-9"), &pinned);
    assert!(out.status.success(), "{}", stderr(&out));
    pinned
}

/// A token that replaces web-1, listed as such next to the `pinned` one; returns it.
fn replace_token(c: &Cluster, pinned: &str) -> String {
    // Replacing web-1 on purpose, with one label the token allows the join to add.
    let replace = c
        .cli_ok(&[
            "token",
            "create",
            "--replace",
            "web-1",
            "--labels",
            "env=test",
            "--allow-labels",
            "zone",
        ])
        .trim()
        .to_string();
    let listed = token_json(c, &replace);
    assert_eq!(listed["name"], "web-1");
    assert_eq!(listed["replace"], true);
    assert_eq!(listed["allow_labels"], serde_json::json!(["zone"]));
    let listed = token_json(c, pinned);
    assert_eq!(
        (&listed["name"], &listed["replace"]),
        (&"web-9".into(), &false.into())
    );
    let text = c.cli_ok(&["token", "list"]);
    assert!(
        text.contains("web-1 (replace)") && text.contains("zone"),
        "{text}"
    );
    refused(
        c,
        "web-2",
        &c.dir.join("web-2"),
        &replace,
        "",
        "enrols only host web-1",
    );
    replace
}

/// web-1 enrolled again into `new_dir` with `replace`.
fn replace_web_1(c: &mut Cluster, replace: &str, new_dir: &Path) {
    let old_cert = std::fs::read_to_string(c.agents[0].data_dir.join("identity/cert.pem"))
        .expect("old certificate");
    let out = join_token(
        c,
        &c.coord_addr,
        replace,
        "web-1",
        new_dir,
        &["--labels", "zone=b"],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // The old machine's certificate is revoked: its agent says so and stops for good.
    wait_until(
        Duration::from_secs(20),
        "the replaced agent to exit",
        || matches!(c.agents[0].proc.child.try_wait(), Ok(Some(_))),
    );
    let status = c.agents[0]
        .proc
        .child
        .try_wait()
        .expect("wait")
        .expect("exited");
    assert_eq!(status.code(), Some(78));
    assert_eq!(
        count(
            &c.agents[0].proc.log,
            "host web-1 was enrolled again by a join with a --replace token"
        ),
        1
    );
    assert_ne!(
        std::fs::read_to_string(new_dir.join("identity/cert.pem")).expect("new certificate"),
        old_cert
    );
}

#[test]
fn a_removed_host_stops_its_agent_for_good() {
    let mut c = Cluster::start(77, 1);
    c.deploy_versions(&["1.0.0"]);
    c.cli_ok(&["hosts", "remove", "web-1"]);
    wait_until(
        Duration::from_secs(20),
        "the removed host's agent to exit",
        || matches!(c.agents[0].proc.child.try_wait(), Ok(Some(_))),
    );
    let status = c.agents[0]
        .proc
        .child
        .try_wait()
        .expect("wait")
        .expect("exited");
    assert_eq!(
        status.code(),
        Some(78),
        "the exit status systemd does not restart on"
    );
    let log = &c.agents[0].proc.log;
    assert_eq!(
        count(
            log,
            "host web-1 was removed from the coordinator; join again with a new token"
        ),
        1,
        "one clear line"
    );
    // Its services stopped with it: nothing unmanaged keeps serving.
    assert!(tests::get(&format!("127.77.0.2:{}", c.listen), "/").is_err());
    assert!(tests::processes_under(&c.agents[0].data_dir).is_empty());

    // Started again (as systemd would without RestartPreventExitStatus), it stops again.
    let (ip, data) = (c.agents[0].ip.clone(), c.agents[0].data_dir.clone());
    c.agents[0].proc = c.spawn_agent("web-1", &ip, &data);
    wait_until(
        Duration::from_secs(20),
        "the restarted agent to exit",
        || matches!(c.agents[0].proc.child.try_wait(), Ok(Some(s)) if s.code() == Some(78)),
    );
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/cutover-agent.service"),
    )
    .expect("agent unit");
    assert!(unit.contains("\nRestartPreventExitStatus=78\n"), "{unit}");
    c.agents.clear();
}

#[test]
fn the_join_token_comes_from_one_source_and_labels_follow_one_rule() {
    let c = Cluster::start(78, 0);
    let coord = c.coord_addr.clone();
    let dir = |n: &str| c.dir.join(n).to_str().expect("path").to_string();

    // From a file, and from the environment.
    let file = c.dir.join("join-token");
    std::fs::write(&file, format!("{}\n", c.token("env=test"))).expect("write token");
    let f = file.to_str().expect("path");
    let out = join(
        &c,
        &coord,
        &["--token-file", f, "--name", "h1", "--data-dir", &dir("h1")],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = c.token("env=test");
    let out = join(
        &c,
        &coord,
        &["--name", "h2", "--data-dir", &dir("h2")],
        &[("CUTOVER_JOIN_TOKEN", &token)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(c.hosts().as_array().map(Vec::len), Some(2), "both joined");

    // Exactly one source.
    let token = c.token("env=test");
    std::fs::write(&file, &token).expect("write token");
    let out = join(
        &c,
        &coord,
        &["--token-file", f, "--name", "h3", "--data-dir", &dir("h3")],
        &[("CUTOVER_JOIN_TOKEN", &token)],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("given more than once (--token-file, CUTOVER_JOIN_TOKEN)"),
        "{err}"
    );
    let out = join(&c, &coord, &["--name", "h3", "--data-dir", &dir("h3")], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no join token"), "{}", stderr(&out));
    std::fs::write(&file, "not a token").expect("write");
    let out = join(
        &c,
        &coord,
        &["--token-file", f, "--name", "h3", "--data-dir", &dir("h3")],
        &[],
    );
    assert!(
        stderr(&out).contains(&format!("--token-file {f}: malformed join token")),
        "{}",
        stderr(&out)
    );

    labels_follow_one_rule(&c);
}

/// Label syntax is one rule, wherever labels enter, and the error names the bad key or
/// value: `token create`, `join --labels`, a plan's targets.
fn labels_follow_one_rule(c: &Cluster) {
    let out = c.cli(&["token", "create", "--labels", "env=prod role=web"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--labels: label env: value \"prod role=web\" may only hold"),
        "{}",
        stderr(&out)
    );
    let out = c.cli(&["token", "create", "--allow-labels", "zone,bad key"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("label key \"bad key\""),
        "{}",
        stderr(&out)
    );
    let token = c.token("env=test");
    let h4 = c.dir.join("h4");
    let out = join_token(
        c,
        &c.coord_addr,
        &token,
        "h4",
        &h4,
        &["--labels", "zone=a/b"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("label zone: value \"a/b\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(token_json(c, &token)["uses_left"], 1);
    let plan = c
        .plan("1.0.0")
        .artifact("file:///x.tar.gz", &"0".repeat(64))
        .label("tier", "front end")
        .write("bad-labels");
    let out = c.cli(&["plan", "validate", plan.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("targets.labels: label tier: value \"front end\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn clients_with_a_certificate_from_another_ca_are_told_so() {
    let mut c = Cluster::start(79, 1);
    let other = Cluster::start(79, 0);
    let refusal =
        "the coordinator refused the client certificate: it is not from this coordinator's CA";

    // The CLI: this coordinator's CA, another coordinator's admin certificate.
    let mixed = c.dir.join("mixed");
    std::fs::create_dir_all(&mixed).expect("mkdir");
    std::fs::copy(c.credentials().join("ca.crt"), mixed.join("ca.crt")).expect("copy");
    for f in ["client.crt", "client.key"] {
        std::fs::copy(other.credentials().join(f), mixed.join(f)).expect("copy");
    }
    let cli = |creds: &Path| {
        Command::new(c.bin.join("cutover"))
            .args(["hosts", "--coordinator", &c.coord_addr, "--credentials"])
            .arg(creds)
            .output()
            .expect("run cutover")
    };
    let out = cli(&mixed);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(refusal), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A self-signed certificate.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["admin".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    std::fs::write(mixed.join("client.crt"), cert.pem()).expect("write");
    std::fs::write(mixed.join("client.key"), key.serialize_pem()).expect("write");
    let err = stderr(&cli(&mixed));
    assert!(err.contains(refusal), "{err}");

    // An agent whose identity holds another CA's certificate.
    let data = c.agents[0].data_dir.clone();
    c.agents[0].proc.stop(Duration::from_secs(10));
    for (from, to) in [("client.crt", "cert.pem"), ("client.key", "key.pem")] {
        std::fs::copy(
            other.credentials().join(from),
            data.join("identity").join(to),
        )
        .expect("copy");
    }
    c.agents[0].proc = c.spawn_agent("web-1", "127.79.0.2", &data);
    let log = c.agents[0].proc.log.clone();
    wait_until(Duration::from_secs(20), "the agent to be told why", || {
        count(&log, refusal) > 0
    });
    assert!(!c.connected("web-1"));
}

/// The names in a PEM certificate's subjectAltName.
fn cert_names(path: &Path) -> Vec<String> {
    let pem = std::fs::read(path).expect("server.crt");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    let cert = pem.parse_x509().expect("x509");
    let san = cert
        .subject_alternative_name()
        .expect("extensions")
        .expect("subjectAltName");
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).expect("v4")).to_string(),
                _ => format!("{b:?}"),
            },
            other => format!("{other}"),
        })
        .collect()
}

#[test]
fn a_coordinator_on_a_wildcard_address_is_reachable_through_every_local_address() {
    // The bridge address is a local interface, there before the coordinator starts.
    let fabric = Fabric::new(50, 1);
    let mut c = Cluster::unstarted(&[]);
    let port = c.coord_addr.rsplit(':').next().expect("port").to_string();
    c.coord_listen = Some(format!("0.0.0.0:{port}"));
    c.start_coordinator();
    let server_crt = c.dir.join("coordinator/pki/server.crt");
    let names = cert_names(&server_crt);
    assert!(names.contains(&fabric.gateway()), "{names:?}");
    assert!(!names.contains(&"0.0.0.0".to_string()), "{names:?}");

    // An agent in the namespace joins and runs through the bridge address.
    let via_bridge = format!("{}:{port}", fabric.gateway());
    let token = c.token("env=test");
    let data = c.dir.join("web-1");
    let out = join_token(&c, &via_bridge, &token, "web-1", &data, &[]);
    assert!(
        out.status.success(),
        "join through {via_bridge}: {}",
        stderr(&out)
    );
    c.netns.insert("web-1".into(), fabric.namespace(0));
    let proc = c.spawn_agent("web-1", &fabric.addr(0), &data);
    c.agents.push(tests::Agent {
        name: "web-1".into(),
        ip: fabric.addr(0),
        data_dir: data,
        proc,
    });
    wait_until(Duration::from_secs(20), "web-1 to connect", || {
        c.connected("web-1")
    });

    // A name the certificate lacks: the error says how to add it.
    let extra = "127.78.0.9";
    let via_extra = format!("{extra}:{port}");
    let token = c.token("env=test");
    let d2 = c.dir.join("web-2");
    let err = stderr(&join_token(&c, &via_extra, &token, "web-2", &d2, &[]));
    assert!(
        err.contains(&format!(
            "start it with `cutover serve --server-name {extra}`"
        )),
        "{err}"
    );

    // A later start with that --server-name reissues the certificate from the same CA:
    // the name works, and web-1, which trusts the CA, reconnects by itself.
    c.stop_coordinator();
    c.serve_args = vec!["--server-name".into(), extra.into()];
    c.start_coordinator();
    let names = cert_names(&server_crt);
    assert!(
        names.contains(&extra.to_string()) && names.contains(&fabric.gateway()),
        "{names:?}"
    );
    let out = join_token(&c, &via_extra, &token, "web-2", &d2, &[]);
    assert!(
        out.status.success(),
        "join through {via_extra}: {}",
        stderr(&out)
    );
    wait_until(Duration::from_secs(30), "web-1 to reconnect", || {
        c.connected("web-1")
    });

    // The new address's fabric goes after the coordinator has stopped.
    let _late = an_address_that_appears_is_named_soon_after(&c, &port, &server_crt);
    drop(c);
}

/// An address that appears while the coordinator runs (its `--listen` is a wildcard) is
/// named by its certificate soon after, and a join through it works. Returns the fabric
/// holding that address.
fn an_address_that_appears_is_named_soon_after(
    c: &Cluster,
    port: &str,
    server_crt: &Path,
) -> Fabric {
    let late = Fabric::new(51, 0);
    let via_late = format!("{}:{port}", late.gateway());
    let token = c.token("env=test");
    let d3 = c.dir.join("web-3");
    wait_until(
        Duration::from_secs(30),
        "the certificate to name the new address",
        || cert_names(server_crt).contains(&late.gateway()),
    );
    let out = join_token(c, &via_late, &token, "web-3", &d3, &[]);
    assert!(
        out.status.success(),
        "join through {via_late}: {}",
        stderr(&out)
    );
    late
}
