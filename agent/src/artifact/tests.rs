use super::*;

/// Builds a .tar.gz from (path, kind) entries, writing names raw so that unsafe paths
/// can be expressed.
enum E<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
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
            E::Dir(name) => {
                raw_name(&mut h, name);
                h.set_size(0);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Symlink(name, target) => {
                raw_name(&mut h, name);
                h.set_size(0);
                h.set_mode(0o777);
                h.set_entry_type(tar::EntryType::Symlink);
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
