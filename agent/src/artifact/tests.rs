use super::*;

/// Builds a .tar.gz from (path, kind) entries, writing names raw so that unsafe paths
/// can be expressed.
enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    DirMode(&'a str, u32),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Fifo(&'a str),
}

fn raw_name(h: &mut tar::Header, name: &str) {
    let field = &mut h.as_old_mut().name;
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
}

fn build(entries: &[E<'_>]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        match e {
            E::File(name, data, mode) => {
                raw_name(&mut h, name);
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            E::Dir(name) | E::DirMode(name, _) => {
                raw_name(&mut h, name);
                h.set_size(0);
                h.set_mode(match e {
                    E::DirMode(_, mode) => *mode,
                    _ => 0o755,
                });
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Symlink(name, target) | E::HardLink(name, target) => {
                raw_name(&mut h, name);
                h.set_size(0);
                h.set_mode(0o777);
                h.set_entry_type(if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_link_name(target).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Fifo(name) => {
                raw_name(&mut h, name);
                h.set_size(0);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn try_unpack(bytes: &[u8]) -> (tempfile::TempDir, Result<(), Error>) {
    let dir = tempfile::tempdir().unwrap();
    let ar = dir.path().join("a.tar.gz");
    std::fs::write(&ar, bytes).unwrap();
    let r = unpack(&ar, &dir.path().join("rel"), &Limits::default());
    (dir, r)
}

#[test]
fn unpacks_files_dirs_links_and_modes() {
    let bytes = build(&[
        E::Dir("bin"),
        E::File("bin/web", b"#!/bin/sh\necho hi\n", 0o755),
        E::File("./conf/app.toml", b"x = 1\n", 0o644),
        E::Symlink("current", "bin/web"),
        E::Symlink("conf/up", "../bin"),
    ]);
    let (dir, r) = try_unpack(&bytes);
    r.unwrap();
    let rel = dir.path().join("rel");
    assert_eq!(
        std::fs::read(rel.join("bin/web")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(rel.join("bin/web"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "exec bits kept");
    assert!(rel.join("conf/app.toml").exists());
    assert!(
        std::fs::symlink_metadata(rel.join("current"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn refuses_unsafe_archives_and_leaves_nothing() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (build(&[E::File("../evil", b"x", 0o644)]), "'..'"),
        (build(&[E::File("a/../../evil", b"x", 0o644)]), "'..'"),
        (build(&[E::File("/etc/evil", b"x", 0o644)]), "absolute"),
        (build(&[E::Symlink("l", "/etc/passwd")]), "outside"),
        (build(&[E::Symlink("a/l", "../../x")]), "outside"),
        (
            build(&[E::Symlink("l", "."), E::Symlink("l2", "l/../..")]),
            "outside",
        ),
        (build(&[E::Fifo("f")]), "special file"),
        (b"not gzip at all".to_vec(), ".tar.gz or .tar.zst"),
        (build(&[]), "empty"),
    ];
    for (bytes, want) in cases {
        let (dir, r) = try_unpack(&bytes);
        let e = r.expect_err("archive should be refused").to_string();
        assert!(e.contains(want), "want {want:?} in {e:?}");
        assert!(
            !dir.path().join("rel").exists(),
            "nothing left behind for {want}"
        );
        assert!(!dir.path().parent().unwrap().join("evil").exists());
    }
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn unpacked_files_grant_no_privilege_and_cannot_be_changed_by_others() {
    let bytes = build(&[
        E::File("bin/su-web", b"#!/bin/sh\n", 0o4755),
        E::File("bin/sg-web", b"#!/bin/sh\n", 0o2711),
        E::File("open.txt", b"anyone\n", 0o666),
        E::File("group.txt", b"group\n", 0o660),
        E::File("private.key", b"k\n", 0o600),
        E::DirMode("scratch", 0o1777),
        E::DirMode("shared", 0o2775),
        E::File("deep/er/file", b"x", 0o644),
    ]);
    let (dir, r) = try_unpack(&bytes);
    r.unwrap();
    let rel = dir.path().join("rel");
    for (path, want) in [
        ("bin/su-web", 0o755),
        ("bin/sg-web", 0o711),
        ("open.txt", 0o644),
        ("group.txt", 0o640),
        ("private.key", 0o600),
        ("scratch", 0o755),
        ("shared", 0o755),
        // Directories the archive does not list, and the release itself.
        ("deep", 0o755),
        ("deep/er", 0o755),
        ("", 0o755),
    ] {
        assert_eq!(mode_of(&rel.join(path)), want, "{path}");
    }
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!(std::fs::metadata(rel.join("open.txt")).unwrap().uid(), me);
}

#[test]
fn link_chains_cannot_leave_the_release() {
    let cases: Vec<(&str, Vec<E<'_>>)> = vec![
        (
            // Lexically each stays inside; followed, the second leads out.
            "chain",
            vec![
                E::Symlink("a/b/c/up", "../../.."),
                E::Symlink("a/b/c/up/esc", "../../../../outside"),
            ],
        ),
        (
            "through a link in the target",
            vec![E::Symlink("a/up", ".."), E::Symlink("x", "a/up/../..")],
        ),
        (
            "a link made dangerous by a later one",
            vec![E::Symlink("x", "d/e"), E::Symlink("d", "..")],
        ),
        (
            "a file written through links",
            vec![
                E::Symlink("l", "d"),
                E::Symlink("d", ".."),
                E::File("l/evil", b"x", 0o644),
            ],
        ),
        ("a loop", vec![E::Symlink("p", "q"), E::Symlink("q", "p")]),
    ];
    for (what, entries) in cases {
        let (dir, r) = try_unpack(&build(&entries));
        let e = r.expect_err(what).to_string();
        assert!(
            e.starts_with("unsafe artifact: ") && (e.contains("outside") || e.contains("loop")),
            "{what}: {e}"
        );
        assert!(!dir.path().join("rel").exists(), "{what}: nothing kept");
        assert!(!dir.path().join("outside").exists(), "{what}");
        assert!(!dir.path().join("evil").exists(), "{what}");
    }
}

#[test]
fn links_through_links_that_stay_inside_are_kept() {
    let bytes = build(&[
        E::File("bin/web", b"web", 0o755),
        E::Symlink("a/b/c/up", "../../.."),
        E::Symlink("a/b/c/up/current", "bin/web"),
        E::Symlink("usr", "."),
        E::File("usr/lib/x.so", b"so", 0o644),
    ]);
    let (dir, r) = try_unpack(&bytes);
    r.unwrap();
    let rel = dir.path().join("rel");
    assert_eq!(std::fs::read(rel.join("current")).unwrap(), b"web");
    assert_eq!(std::fs::read(rel.join("lib/x.so")).unwrap(), b"so");
}

#[test]
fn hard_links_must_name_a_file_directly() {
    let ok = build(&[E::File("sub/f", b"f", 0o644), E::HardLink("h", "sub/f")]);
    let (dir, r) = try_unpack(&ok);
    r.unwrap();
    assert_eq!(std::fs::read(dir.path().join("rel/h")).unwrap(), b"f");

    let through = build(&[
        E::File("sub/f", b"f", 0o644),
        E::Symlink("s", "sub"),
        E::HardLink("hs", "s/f"),
    ]);
    let (_dir, r) = try_unpack(&through);
    assert_eq!(
        r.unwrap_err().to_string(),
        "unsafe artifact: hard link hs names s/f through the symbolic link s; a hard link must name a file unpacked before it"
    );
    // To a symbolic link itself: it would be re-read relative to the hard link.
    let to_link = build(&[E::Symlink("a/s", "../x"), E::HardLink("hs", "a/s")]);
    let (_dir, r) = try_unpack(&to_link);
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("hard link hs names a/s through the symbolic link a/s"),
    );
    let missing = build(&[E::Dir("d"), E::HardLink("hd", "d")]);
    let (_dir, r) = try_unpack(&missing);
    assert_eq!(
        r.unwrap_err().to_string(),
        "unpack artifact: hard link hd: its target d is not a file unpacked before it"
    );
    let out = build(&[E::HardLink("ho", "../etc/passwd")]);
    let (_dir, r) = try_unpack(&out);
    assert!(r.unwrap_err().to_string().contains("outside"));
}

#[test]
fn leftovers_of_interrupted_work_are_removed() {
    let data = tempfile::tempdir().unwrap();
    let (cache, releases) = (data.path().join("cache"), data.path().join("releases"));
    std::fs::create_dir_all(releases.join("web/.unpack-1.0.0-abc-4242/bin")).unwrap();
    std::fs::write(releases.join("web/.unpack-1.0.0-abc-4242/bin/web"), "x").unwrap();
    std::fs::create_dir_all(releases.join("web/1.0.0-abc")).unwrap();
    std::fs::create_dir_all(releases.join("api/.unpack-2.0.0-def-7")).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("abc-123.part"), "half").unwrap();
    std::fs::write(cache.join("notes"), "kept").unwrap();

    assert_eq!(remove_leftovers(&cache, &releases), 3);
    assert!(!releases.join("web/.unpack-1.0.0-abc-4242").exists());
    assert!(!releases.join("api/.unpack-2.0.0-def-7").exists());
    assert!(!cache.join("abc-123.part").exists());
    assert!(releases.join("web/1.0.0-abc").is_dir(), "releases are kept");
    assert!(cache.join("notes").exists());
    // Nothing there (a new host): nothing to do.
    assert_eq!(
        remove_leftovers(&data.path().join("x"), &data.path().join("y")),
        0
    );
}

#[test]
fn refuses_truncated_archive() {
    let bytes = build(&[E::File("big", &[7u8; 100_000], 0o644)]);
    let (_dir, r) = try_unpack(&bytes[..bytes.len() / 2]);
    assert!(r.is_err());
}

#[test]
fn refuses_oversized_unpack() {
    let bytes = build(&[E::File("big", &[0u8; 10_000], 0o644)]);
    let dir = tempfile::tempdir().unwrap();
    let ar = dir.path().join("a.tar.gz");
    std::fs::write(&ar, bytes).unwrap();
    let limits = Limits {
        max_unpacked_bytes: 1000,
        ..Limits::default()
    };
    let e = unpack(&ar, &dir.path().join("rel"), &limits).unwrap_err();
    assert!(matches!(e, Error::UnpackedTooLarge { .. }), "{e}");
}

#[tokio::test]
async fn fetch_file_checks_digest() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    std::fs::write(&src, b"hello").unwrap();
    let good = sha256_file(&src).unwrap();
    let url = format!("file://{}", src.display());
    let dest = dir.path().join("dl");
    fetch(&url, &good, &dest, &Limits::default()).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"hello");

    let bad = "0".repeat(64);
    let e = fetch(&url, &bad, &dest, &Limits::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("sha256 mismatch: expected 000000000000…, got 2cf24dba5fb0…"),
        "{e}"
    );
    assert!(!dest.exists(), "a mismatching download is deleted");

    let e = fetch(
        "file:///nonexistent/x.tar.gz",
        &good,
        &dest,
        &Limits::default(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
}

#[test]
fn unpacks_tar_zst() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o755);
    h.set_cksum();
    b.append_data(&mut h, "bin/run", &b"hi\n"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let zst =
        ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest);
    let (dir, r) = try_unpack(&zst);
    r.unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("rel/bin/run")).unwrap(),
        b"hi\n"
    );
}

#[test]
fn the_same_release_unpacked_twice_at_once_ends_complete_for_both() {
    let files: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("f{i}"), vec![b'x'; 4096]))
        .collect();
    let entries: Vec<E<'_>> = files.iter().map(|(n, d)| E::File(n, d, 0o644)).collect();
    let bytes = build(&entries);
    let dir = tempfile::tempdir().unwrap();
    let ar = dir.path().join("a.tar.gz");
    std::fs::write(&ar, &bytes).unwrap();
    let dest = dir.path().join("releases").join("web").join("1.0.0-abc");
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (ar, dest) = (ar.clone(), dest.clone());
            std::thread::spawn(move || unpack(&ar, &dest, &Limits::default()))
        })
        .collect();
    for r in runs {
        r.join().unwrap().expect("every concurrent unpack succeeds");
    }
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 200);
    let siblings: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(siblings.len(), 1, "no temporary dir left: {siblings:?}");
}
