//! Locked doors on the host: artifact signatures and the user slot processes run as.

use std::path::Path;

use tests::Cluster;

/// `cutover artifact keygen --out KEY`; returns the public key.
fn keygen(c: &Cluster, key: &Path) -> String {
    c.cli_ok(&["artifact", "keygen", "--out", key.to_str().expect("path")])
        .trim()
        .to_string()
}

/// `cutover artifact sign FILE --key KEY`; returns the signature.
fn sign(c: &Cluster, file: &Path, key: &Path) -> String {
    let (file, key) = (file.to_str().expect("path"), key.to_str().expect("path"));
    c.cli_ok(&["artifact", "sign", file, "--key", key])
        .trim()
        .to_string()
}

#[test]
fn only_signed_artifacts_run_where_keys_are_trusted() {
    let mut c = Cluster::start(44, 0);
    let key = c.dir.join("release.key");
    let public = keygen(&c, &key);
    assert_eq!(public.len(), 64, "{public}");
    // A second keygen never overwrites a key.
    assert_eq!(
        c.cli(&["artifact", "keygen", "--out", key.to_str().expect("path")])
            .status
            .code(),
        Some(2)
    );
    c.add_agent_with("web-1", "127.44.0.2", "env=test", |dir| {
        std::fs::write(
            dir.join("trusted_keys"),
            format!("# release signing key\n{public}\n"),
        )
        .expect("write trusted_keys");
    });

    let v1 = c.pack("1.0.0", &[]);
    let signature = sign(&c, &v1.path(), &key);

    // Unsigned: the host fails preparation with a clear reason; nothing runs.
    let v1_plan = || c.plan("1.0.0").artifact(&v1.url, &v1.sha256);
    let plan = v1_plan().write("unsigned");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 4, "{err}");
    let reason = c.reason(&id);
    assert!(
        reason.contains("host web-1: artifact signature missing"),
        "{reason}"
    );

    // Signed by another key: refused too.
    let other = c.dir.join("other.key");
    keygen(&c, &other);
    let forged = sign(&c, &v1.path(), &other);
    let forged_plan = v1_plan().signature(&forged).write("forged");
    let (code, id, _) = c.deploy_wait(&forged_plan);
    assert_eq!(code, 4);
    let reason = c.reason(&id);
    assert!(
        reason.contains("does not verify with any trusted key"),
        "{reason}"
    );

    // Signed with the trusted key: it runs.
    let signed_plan = v1_plan().signature(&signature).write("signed");
    let (code, _, err) = c.deploy_wait(&signed_plan);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        c.versions().get("web-1").map(String::as_str),
        Some("release 1.0.0")
    );
}

/// Deploys the sample `version` with `[run] user` set to `user` (none: left out);
/// returns the exit code and the deployment id.
fn deploy_as(c: &Cluster, name: &str, version: &str, user: Option<&str>) -> (i32, String) {
    let plan = c.plan(version);
    let plan = match user {
        Some(user) => plan.user(user),
        None => plan,
    };
    let (code, id, _) = c.deploy_wait(&plan.write(name));
    (code, id)
}

#[test]
fn services_run_unprivileged_unless_the_plan_says_root() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start(45, 0);
    // The unprivileged user must be able to reach the release directory.
    std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    c.agent_args = vec!["--service-user".into(), "nobody".into()];
    c.add_agent("web-1", "127.45.0.2", "env=test");
    let addr = format!("127.45.0.2:{}", c.listen);
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .expect("id");
    let nobody = String::from_utf8_lossy(&nobody.stdout).trim().to_string();
    assert_ne!(nobody, "0");

    // No user in the plan: the agent's --service-user.
    assert_eq!(deploy_as(&c, "default", "1.0.0", None).0, 0);
    assert_eq!(tests::get(&addr, "/uid").expect("uid"), nobody);

    // Root only when the plan says so.
    assert_eq!(deploy_as(&c, "root", "2.0.0", Some("root")).0, 0);
    assert_eq!(tests::get(&addr, "/uid").expect("uid"), "0");

    // A named user.
    assert_eq!(deploy_as(&c, "named", "3.0.0", Some("nobody")).0, 0);
    assert_eq!(tests::get(&addr, "/uid").expect("uid"), nobody);

    // A user that does not exist fails preparation with a clear reason.
    let (code, id) = deploy_as(&c, "ghost", "4.0.0", Some("no-such-user-here"));
    assert_eq!(code, 3);
    let reason = c.reason(&id);
    assert!(
        reason.contains("user no-such-user-here does not exist"),
        "{reason}"
    );
    assert_eq!(tests::get(&addr, "/uid").expect("uid"), nobody);
}

#[test]
fn agent_certificates_renew_themselves_over_the_live_connection() {
    use std::time::Duration;
    use tests::wait_until;
    // 9s certificates: renewed once 6s have passed.
    let joined = std::time::Instant::now();
    let mut c = Cluster::start_with(46, 1, &["--cert-ttl", "9s"]);
    let cert = c.agents[0].data_dir.join("identity/cert.pem");
    let first = std::fs::read_to_string(&cert).expect("cert");
    wait_until(
        Duration::from_secs(20),
        "the certificate to be renewed",
        || std::fs::read_to_string(&cert).is_ok_and(|c| c != first),
    );
    assert!(c.connected("web-1"), "renewal keeps the connection");
    // Past the first certificate's expiry, a restarted agent connects with the new one.
    wait_until(
        Duration::from_secs(15),
        "the first certificate to expire",
        || joined.elapsed() > Duration::from_secs(10),
    );
    let (ip, data) = (c.agents[0].ip.clone(), c.agents[0].data_dir.clone());
    c.agents[0].proc.kill();
    wait_until(Duration::from_secs(15), "web-1 to drop", || {
        !c.connected("web-1")
    });
    c.agents[0].proc = c.spawn_agent("web-1", &ip, &data);
    wait_until(
        Duration::from_secs(15),
        "web-1 back with its renewed certificate",
        || c.connected("web-1"),
    );
}
