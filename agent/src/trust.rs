//! The keys a release must be signed with: read from `--trusted-key` and
//! `DATA/trusted_keys`, and the check of a release's signature against them. With no key
//! at all signatures are not required; with any, nothing unsigned or signed by another
//! key runs.

use std::path::Path;

/// The file in the data dir that adds keys to `--trusted-key`'s.
pub const FILE: &str = "trusted_keys";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `at` names the flag or the file and line the text came from.
    #[error("{at}: not an ed25519 public key (64 hex digits, as `cutover artifact keygen` prints)")]
    NotAKey { at: String },
}

/// Why a release's signature is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "artifact signature missing: this agent only runs artifacts signed by a trusted key ([release] signature, made with `cutover artifact sign`)"
    )]
    Missing,
    #[error("artifact signature is not hex")]
    NotHex,
    #[error("artifact signature does not verify with any trusted key")]
    NoKeyVerifies,
}

/// The trusted ed25519 public keys (32 bytes each).
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    /// Raw public keys; empty when this agent does not require signatures.
    keys: Vec<Vec<u8>>,
}

impl TrustedKeys {
    /// The command line's keys (`flags`, hex) plus one hex key per line of
    /// `DATA/trusted_keys` (blank lines and `#` comments ignored; no file, no keys).
    pub fn load(flags: &[String], data_dir: &Path) -> Result<TrustedKeys, Error> {
        let file = data_dir.join(FILE);
        let mut texts: Vec<(String, String)> = flags
            .iter()
            .map(|k| ("--trusted-key".to_string(), k.clone()))
            .collect();
        if let Ok(body) = std::fs::read_to_string(&file) {
            for (i, line) in body.lines().enumerate() {
                let line = line.trim();
                if !line.is_empty() && !line.starts_with('#') {
                    texts.push((format!("{}:{}", file.display(), i + 1), line.to_string()));
                }
            }
        }
        let keys = texts
            .into_iter()
            .map(|(at, k)| match hex::decode(k.trim()) {
                Ok(b) if b.len() == 32 => Ok(b),
                _ => Err(Error::NotAKey { at }),
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedKeys { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a release's signature (hex, over its sha256) when any key is trusted.
    pub fn check(&self, sha256: &str, signature_hex: &str) -> Result<(), Refused> {
        if self.keys.is_empty() {
            return Ok(());
        }
        if signature_hex.is_empty() {
            return Err(Refused::Missing);
        }
        let sig = hex::decode(signature_hex).map_err(|_| Refused::NotHex)?;
        let msg = cutover_shared::signing::signed_message(sha256);
        let verifies = |key: &Vec<u8>| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
                .verify(&msg, &sig)
                .is_ok()
        };
        if self.keys.iter().any(verifies) {
            Ok(())
        } else {
            Err(Refused::NoKeyVerifies)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn key_pair() -> ring::signature::Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn keys_come_from_the_flag_and_the_file_and_bad_ones_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key_pair(), key_pair());
        let hex_of = |k: &ring::signature::Ed25519KeyPair| hex::encode(k.public_key().as_ref());
        std::fs::write(
            dir.path().join(FILE),
            format!("# ops key\n\n{}\n", hex_of(&b)),
        )
        .unwrap();
        let keys = TrustedKeys::load(&[hex_of(&a)], dir.path()).unwrap();
        assert_eq!(keys.len(), 2);

        std::fs::write(dir.path().join(FILE), "# ops key\nabcd\n").unwrap();
        let e = TrustedKeys::load(&[], dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}:2: not an ed25519",
                dir.path().join(FILE).display()
            )),
            "{e}"
        );
        let e = TrustedKeys::load(&["zz".into()], tempfile::tempdir().unwrap().path())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--trusted-key: not an ed25519"), "{e}");
    }

    #[test]
    fn only_a_signature_by_a_trusted_key_passes_once_any_key_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (trusted, other) = (key_pair(), key_pair());
        let sha = "ab".repeat(32);
        let sign = |k: &ring::signature::Ed25519KeyPair| {
            hex::encode(k.sign(&cutover_shared::signing::signed_message(&sha)))
        };
        assert!(
            TrustedKeys::default().check(&sha, "").is_ok(),
            "no key, no requirement"
        );
        let keys =
            TrustedKeys::load(&[hex::encode(trusted.public_key().as_ref())], dir.path()).unwrap();
        assert!(keys.check(&sha, &sign(&trusted)).is_ok());
        assert!(matches!(keys.check(&sha, ""), Err(Refused::Missing)));
        assert!(matches!(keys.check(&sha, "xyz"), Err(Refused::NotHex)));
        assert!(matches!(
            keys.check(&sha, &sign(&other)),
            Err(Refused::NoKeyVerifies)
        ));
    }
}
