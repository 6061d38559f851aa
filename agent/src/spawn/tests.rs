use super::*;

fn launcher(dir: &Path) -> Launcher {
    Launcher {
        dir: dir.to_path_buf(),
        user: RunAs::resolve("", None).expect("the agent's own user"),
        env: vec![
            ("APP_MODE".into(), "test".into()),
            ("PORT".into(), "12345".into()),
        ],
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_timed_out_command_is_stopped_with_its_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    // The shell and its two children ignore SIGTERM: only SIGKILL ends them.
    let script = "echo $$; trap '' TERM; sleep 60 & sleep 60 & echo started; wait";
    let mut opts = RunOptions::new(Duration::from_millis(500));
    opts.grace = Duration::from_millis(300);
    let out = launcher(dir.path())
        .run(&sh(script), &opts)
        .await
        .expect("run");
    assert_eq!(out.exit, Exit::TimedOut(Duration::from_millis(500)));
    assert_eq!(out.exit.to_string(), "timed out after 500ms");
    assert!(out.duration < Duration::from_secs(5), "{:?}", out.duration);
    assert_eq!(out.tail.last().map(String::as_str), Some("started"));
    let pgid: i32 = out.tail[0].parse().expect("the shell's pid");
    assert!(
        crate::os::group_members(pgid).is_empty(),
        "processes of the group survived: {:?}",
        crate::os::group_members(pgid)
    );
}

#[tokio::test]
async fn a_command_that_ends_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let out = launcher(dir.path())
        .run(
            &sh("echo $$; sleep 60 >/dev/null 2>&1 & exit 0"),
            &RunOptions::new(Duration::from_secs(10)),
        )
        .await
        .expect("run");
    assert!(out.success(), "{:?}", out.exit);
    let pgid: i32 = out.tail[0].parse().expect("the shell's pid");
    assert!(crate::os::group_members(pgid).is_empty());
}

#[tokio::test]
async fn an_abandoned_run_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > {}; sleep 60 & wait", pidfile.display());
    let l = launcher(dir.path());
    let opts = RunOptions::new(Duration::from_secs(60));
    let argv = sh(&script);
    let run = l.run(&argv, &opts);
    let abandoned = tokio::time::timeout(Duration::from_millis(500), run).await;
    assert!(abandoned.is_err(), "the command was still running");
    let pgid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    wait_until("the abandoned group to end", || {
        crate::os::group_members(pgid).is_empty()
    });
}

#[tokio::test]
async fn output_ends_in_the_tail_and_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/cmd.log");
    let mut opts = RunOptions::new(Duration::from_secs(10));
    opts.output_log = Some(log.clone());
    opts.tail_lines = 3;
    let script =
        "i=1; while [ $i -le 50 ]; do echo line $i; i=$((i+1)); done; echo; echo oops >&2; exit 3";
    let l = launcher(dir.path());
    for _ in 0..2 {
        let out = l.run(&sh(script), &opts).await.expect("run");
        assert_eq!(out.exit, Exit::Code(3));
        assert_eq!(out.exit.to_string(), "exit status: 3");
        assert_eq!(out.tail, vec!["line 49", "line 50", "oops"]);
    }
    let text = std::fs::read_to_string(&log).expect("log");
    assert_eq!(text.lines().filter(|l| *l == "line 1").count(), 2);
    assert_eq!(text.lines().count(), 104, "appended, both runs whole");
    let mode = std::fs::metadata(&log).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn secret_values_are_masked_in_the_log_even_split_between_writes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/hook.log");
    let mut opts = RunOptions::new(Duration::from_secs(10));
    opts.output_log = Some(log.clone());
    opts.mask = cutover_shared::secrets::Secrets::new(["hunter22".to_string()]);
    // The value is written in two pieces with a pause between them, and the last line
    // has no end.
    let script =
        "printf 'token hun'; sleep 0.2; printf 'ter22 ok\\n'; echo plain; printf 'last hunter22'";
    let out = launcher(dir.path())
        .run(&sh(script), &opts)
        .await
        .expect("run");
    assert!(out.success());
    let text = std::fs::read_to_string(&log).expect("log");
    assert_eq!(text, "token ******** ok\nplain\nlast ********");
}

#[tokio::test]
async fn a_long_output_line_is_cut_and_the_tail_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // 100 KiB of output, the last line 1000 characters long.
    let script = "head -c 102400 /dev/zero | tr '\\0' 'a' | fold -w 1000; echo";
    let out = launcher(dir.path())
        .run(&sh(script), &RunOptions::new(Duration::from_secs(10)))
        .await
        .expect("run");
    assert!(out.success());
    assert!(out.tail.len() <= 10);
    assert!(out.tail.iter().all(|l| l.chars().count() <= LINE_CHARS));
}

#[tokio::test]
async fn commands_see_only_the_clean_environment() {
    let dir = tempfile::tempdir().unwrap();
    let l = launcher(dir.path());
    let mut opts = RunOptions::new(Duration::from_secs(10));
    opts.env = vec![("CUTOVER_HOOK".into(), "validate".into())];
    opts.tail_lines = 100;
    let out = l.run(&["env".into()], &opts).await.expect("run env");
    assert!(out.success(), "{:?}", out.exit);
    let mut names: Vec<&str> = out
        .tail
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "APP_MODE",
            "CUTOVER_HOOK",
            "HOME",
            "LANG",
            "LOGNAME",
            "PATH",
            "PORT",
            "USER"
        ]
    );
    let get = |k: &str| {
        out.tail
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(get("PATH"), PATH);
    assert_eq!(get("LANG"), LANG);
    assert_eq!(get("USER"), l.user.name);
    assert_eq!(get("HOME"), l.user.home.to_string_lossy());
    assert_eq!(get("PORT"), "12345");
}

#[test]
fn later_variables_replace_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = launcher(dir.path());
    l.env.push(("PATH".into(), "/opt/web/bin".into()));
    let env = l.environment(&[("APP_MODE".into(), "hook".into())]);
    let get = |k: &str| {
        env.iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("PATH"), ["/opt/web/bin"]);
    assert_eq!(get("APP_MODE"), ["hook"]);
}

#[test]
fn programs_are_the_releases_files_or_found_on_the_clean_path() {
    let dir = tempfile::tempdir().unwrap();
    let rel = dir.path();
    std::fs::create_dir_all(rel.join("bin")).unwrap();
    std::fs::write(rel.join("bin/web"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(rel.join("bin/web"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(rel.join("notes.txt"), "").unwrap();
    assert_eq!(
        resolve_program("./bin/web", rel, PATH).unwrap(),
        rel.join("./bin/web")
    );
    let sh = resolve_program("sh", rel, PATH).unwrap();
    assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
    let err = |prog: &str, path: &str| resolve_program(prog, rel, path).unwrap_err().to_string();
    assert_eq!(
        err("./bin/nope", PATH),
        "command ./bin/nope: not found in the release"
    );
    assert_eq!(err("./bin", PATH), "command ./bin: is a directory");
    assert_eq!(
        err("./notes.txt", PATH),
        "command ./notes.txt: not executable"
    );
    assert_eq!(
        err("/no/such/prog", PATH),
        "command /no/such/prog: not found"
    );
    assert_eq!(
        err("no-such-program-here", PATH),
        format!("command no-such-program-here: not found on PATH ({PATH})")
    );
    // Only the given PATH is searched, whatever the agent's own is.
    assert!(resolve_program("sh", rel, "/nonexistent").is_err());
}

#[test]
fn users_are_resolved_as_the_plan_and_the_agent_say() {
    let me = RunAs::resolve("", None).unwrap();
    assert!(!me.switch);
    let e = RunAs::resolve("no-such-user-here", None)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "user no-such-user-here does not exist on this host");
    if nix::unistd::geteuid().is_root() {
        let nobody = RunAs::resolve("", Some("nobody")).unwrap();
        assert_eq!(nobody.name, "nobody");
        assert!(nobody.switch && !nobody.is_root());
        // The plan's user wins over --service-user; "root" is root on purpose.
        let root = RunAs::resolve("root", Some("nobody")).unwrap();
        assert!(root.is_root() && !root.switch);
    } else {
        let e = RunAs::resolve("root", None).unwrap_err().to_string();
        assert_eq!(e, "running as user root needs an agent running as root");
    }
}

#[tokio::test]
async fn commands_run_as_the_service_user() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut l = launcher(dir.path());
    l.user = RunAs::resolve("", Some("nobody")).unwrap();
    let out = l
        .run(
            &sh("id -u; id -g; id -G"),
            &RunOptions::new(Duration::from_secs(10)),
        )
        .await
        .expect("run");
    assert!(out.success(), "{:?} {:?}", out.exit, out.tail);
    let want = l.user.uid.to_string();
    let gid = l.user.gid.to_string();
    assert_eq!(out.tail, vec![want, gid.clone(), gid]);
}

#[test]
fn the_state_dir_belongs_to_the_service_user_alone() {
    let data = tempfile::tempdir().unwrap();
    let user = if nix::unistd::geteuid().is_root() {
        RunAs::resolve("", Some("nobody")).unwrap()
    } else {
        RunAs::resolve("", None).unwrap()
    };
    let dir = state_dir(data.path(), "web", &user).unwrap();
    assert_eq!(dir, data.path().join("state/web"));
    let check = |path: &Path, mode: u32, uid: u32| {
        let m = std::fs::metadata(path).unwrap();
        assert_eq!(m.mode() & 0o7777, mode, "{}", path.display());
        assert_eq!(m.uid(), uid, "{}", path.display());
    };
    check(&dir, 0o700, user.uid);
    let agent = nix::unistd::geteuid().as_raw();
    check(&data.path().join("state"), 0o711, agent);
    // Again (a later release): the same directory, what it holds kept.
    std::fs::write(dir.join("kept"), "1").unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(state_dir(data.path(), "web", &user).unwrap(), dir);
    check(&dir, 0o700, user.uid);
    assert!(dir.join("kept").exists());
}
