//! `cutover artifact`: ed25519 signing keys and artifact signatures. The signature
//! covers the artifact's SHA-256 ([`cutover_shared::signing::signed_message`]); agents
//! with trusted keys check it before anything from the artifact runs.

use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::json;

use super::{Failure, Output, Result};
use crate::cli::out::print_json;
use crate::{errln, outln};

/// `cutover artifact …`
#[derive(clap::Subcommand)]
pub enum ArtifactCmd {
    /// Make a signing key; prints its public key for the agents' --trusted-key.
    Keygen {
        /// Where to write the private key (an existing file is never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Sign an artifact; prints the signature for `[release] signature`.
    Sign {
        /// The artifact to sign.
        file: PathBuf,
        /// The private key `artifact keygen` wrote.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
}

pub fn run(cmd: ArtifactCmd, output: Output) -> Result<i32> {
    match cmd {
        ArtifactCmd::Keygen { out } => keygen(&out, output),
        ArtifactCmd::Sign { file, key } => sign(&file, &key, output),
    }
}

/// `cutover artifact keygen`: a new ed25519 signing key, written to `out` (hex PKCS#8,
/// mode 0600); prints the public key (hex) for the agents' trusted keys.
fn keygen(out: &Path, output: Output) -> Result<i32> {
    if out.exists() {
        return Err(Failure::usage(format!(
            "{}: already exists; not overwriting a key",
            out.display()
        )));
    }
    let rng = ring::rand::SystemRandom::new();
    let doc = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| Failure::other("generate key: the system's random source failed"))?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .map_err(|_| Failure::other("generate key: invalid key"))?;
    write_new_private(out, hex::encode(doc.as_ref()).as_bytes())?;
    let public = hex::encode(pair.public_key().as_ref());
    match output {
        Output::Json => {
            print_json(&json!({"key_file": out.display().to_string(), "public_key": public}))
        }
        Output::Text => outln!("{public}"),
    }
    Ok(0)
}

/// Writes `text` and a newline to a new file readable by its owner only; never replaces
/// an existing file.
fn write_new_private(path: &Path, text: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| Failure::other(format!("write {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(failed)?;
    f.write_all(text)
        .and_then(|()| f.write_all(b"\n"))
        .map_err(failed)
}

/// `cutover artifact sign FILE --key KEY`: prints the signature for `[release] signature`.
fn sign(file: &Path, key: &Path, output: Output) -> Result<i32> {
    let pair = read_key(key)?;
    let sha = sha256_of(file)?;
    let sig = hex::encode(
        pair.sign(&cutover_shared::signing::signed_message(&sha))
            .as_ref(),
    );
    match output {
        Output::Json => print_json(&json!({"sha256": sha, "signature": sig})),
        Output::Text => {
            errln!("sha256 {sha}");
            outln!("{sig}");
        }
    }
    Ok(0)
}

/// The key `keygen` wrote to `key`.
fn read_key(key: &Path) -> Result<Ed25519KeyPair> {
    let key_hex = std::fs::read_to_string(key)
        .map_err(|e| Failure::usage(format!("{}: {e}", key.display())))?;
    let der = hex::decode(key_hex.trim()).map_err(|_| {
        Failure::usage(format!(
            "{}: not a key written by `cutover artifact keygen`",
            key.display()
        ))
    })?;
    Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|_| Failure::usage(format!("{}: not an ed25519 key", key.display())))
}

/// The SHA-256 of `file`, in hex, read as a stream.
fn sha256_of(file: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(file)
        .map_err(|e| Failure::usage(format!("{}: {e}", file.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .map_err(|e| Failure::other(format!("read {}: {e}", file.display())))?;
    Ok(hex::encode(hasher.finalize()))
}
