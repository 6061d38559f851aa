//! Join tokens (text form in `cutover_shared::token`). The coordinator stores only the
//! SHA-256 of the secret; checks compare digests in constant time.

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::model::TokenRecord;

pub use cutover_shared::token::Token;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("join token is unknown or revoked")]
    Unknown,
    #[error("join token expired")]
    Expired,
    #[error("join token has no uses left")]
    UsedUp,
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Makes a new token and the record to store for it.
pub fn issue(
    ca_fingerprint: &str,
    labels: std::collections::BTreeMap<String, String>,
    ttl_ms: u64,
    uses: u32,
    now_ms: u64,
) -> (Token, TokenRecord) {
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let token = Token {
        ca_fingerprint: ca_fingerprint.to_string(),
        id: hex::encode(id),
        secret: hex::encode(secret),
    };
    let record = TokenRecord {
        id: token.id.clone(),
        secret_sha256: hash_secret(&token.secret),
        labels,
        created_unix_ms: now_ms,
        expires_unix_ms: now_ms.saturating_add(ttl_ms),
        uses_left: uses,
        revoked: false,
    };
    (token, record)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks `token` against its stored record and spends one use.
pub fn spend(record: &mut TokenRecord, token: &Token, now_ms: u64) -> Result<(), Error> {
    let presented = hash_secret(&token.secret);
    let matches = constant_time_eq(presented.as_bytes(), record.secret_sha256.as_bytes());
    if record.revoked || !matches {
        return Err(Error::Unknown);
    }
    if now_ms >= record.expires_unix_ms {
        return Err(Error::Expired);
    }
    if record.uses_left == 0 {
        return Err(Error::UsedUp);
    }
    record.uses_left -= 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

    #[test]
    fn round_trip_and_spend() {
        let (tok, mut rec) = issue(FP, Default::default(), 60_000, 2, 1_000);
        let parsed = Token::parse(&tok.encode()).unwrap();
        assert_eq!(parsed, tok);
        assert!(
            !rec.secret_sha256.contains(&tok.secret),
            "secret must not be stored"
        );
        assert_eq!(spend(&mut rec, &parsed, 2_000), Ok(()));
        assert_eq!(spend(&mut rec, &parsed, 2_000), Ok(()));
        assert_eq!(spend(&mut rec, &parsed, 2_000), Err(Error::UsedUp));
    }

    #[test]
    fn expiry_forgery_and_garbage() {
        let (tok, mut rec) = issue(FP, Default::default(), 60_000, 5, 1_000);
        assert_eq!(spend(&mut rec, &tok, 61_000), Err(Error::Expired));
        let mut forged = tok.clone();
        forged.secret = "0".repeat(64);
        assert_eq!(spend(&mut rec, &forged, 2_000), Err(Error::Unknown));
        assert_eq!(rec.uses_left, 5, "refusals spend nothing");
        rec.revoked = true;
        assert_eq!(spend(&mut rec, &tok, 2_000), Err(Error::Unknown));
    }
}
