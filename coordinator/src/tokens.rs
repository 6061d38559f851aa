//! Join tokens (text form in `cutover_shared::token`) and the rules of a join. The
//! coordinator stores only the SHA-256 of the secret; checks compare digests in constant
//! time. A join never takes over an enrolled host unless its token was made to replace
//! that host; the token's labels are authoritative and a join may only add the label
//! keys the token allows.

use std::collections::BTreeMap;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::model::{TokenHost, TokenRecord};

pub use cutover_shared::token::Token;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("join token is unknown or revoked")]
    Unknown,
    #[error("join token expired")]
    Expired,
    #[error("join token has no uses left")]
    UsedUp,
    #[error("this join token enrols only host {pinned}, not {asked}")]
    WrongName { pinned: String, asked: String },
    #[error(
        "host {0} is already enrolled; to replace it on purpose, run `cutover hosts remove {0}` first, or join with a token from `cutover token create --replace {0}`"
    )]
    Enrolled(String),
    #[error("label {key}={value} is set by the join token; join --labels cannot change it")]
    LabelFixed { key: String, value: String },
    #[error(
        "label {key} is not allowed by the join token ({allowed}); make the token with `cutover token create --allow-labels {key}`"
    )]
    LabelNotAllowed { key: String, allowed: String },
}

/// What `token create` asks for, besides the time to live and the number of uses.
#[derive(Clone, Debug, Default)]
pub struct Grant {
    /// The enrolled host's labels; a join cannot change them.
    pub labels: BTreeMap<String, String>,
    /// Which host the token may enrol: any, a named one, or one it replaces.
    pub host: TokenHost,
    /// Label keys a join may add.
    pub allow_labels: Vec<String>,
}

/// What a joining agent asks for.
pub struct Join<'a> {
    /// The host name it asks for.
    pub name: &'a str,
    /// The labels it asks for (`join --labels`).
    pub labels: &'a BTreeMap<String, String>,
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Makes a new token and the record to store for it.
pub fn issue(
    ca_fingerprint: &str,
    grant: Grant,
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
        labels: grant.labels,
        created_unix_ms: now_ms,
        expires_unix_ms: now_ms.saturating_add(ttl_ms),
        uses_left: uses,
        revoked: false,
        host: grant.host,
        allow_labels: grant.allow_labels,
    };
    (token, record)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks that `token` is the one `record` was made for, and that it is still usable.
fn check_usable(record: &TokenRecord, token: &Token, now_ms: u64) -> Result<(), Error> {
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
    Ok(())
}

/// The enrolled host's labels: the token's, plus the keys it allows from the join.
fn host_labels(
    record: &TokenRecord,
    asked: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = record.labels.clone();
    for (key, value) in asked {
        match record.labels.get(key) {
            Some(fixed) if fixed == value => {}
            Some(fixed) => {
                return Err(Error::LabelFixed {
                    key: key.clone(),
                    value: fixed.clone(),
                });
            }
            None if record.allow_labels.contains(key) => {
                labels.insert(key.clone(), value.clone());
            }
            None => {
                let allowed = if record.allow_labels.is_empty() {
                    "it allows none".to_string()
                } else {
                    format!("it allows {}", record.allow_labels.join(", "))
                };
                return Err(Error::LabelNotAllowed {
                    key: key.clone(),
                    allowed,
                });
            }
        }
    }
    Ok(labels)
}

/// Admits a join: checks `token` against its record, the name against the token's pin
/// and against `enrolled` (a host is already enrolled under that name), and the join's
/// labels against the token's; then spends one use. Returns the host's labels. A
/// refusal spends nothing.
pub fn admit(
    record: &mut TokenRecord,
    token: &Token,
    join: &Join<'_>,
    enrolled: bool,
    now_ms: u64,
) -> Result<BTreeMap<String, String>, Error> {
    check_usable(record, token, now_ms)?;
    if let Some(pinned) = record.host.name()
        && pinned != join.name
    {
        return Err(Error::WrongName {
            pinned: pinned.to_string(),
            asked: join.name.to_string(),
        });
    }
    if enrolled && !matches!(record.host, TokenHost::Replaces(_)) {
        return Err(Error::Enrolled(join.name.to_string()));
    }
    let labels = host_labels(record, join.labels)?;
    record.uses_left -= 1;
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

    fn labels(text: &str) -> BTreeMap<String, String> {
        cutover_shared::names::parse_labels(text).unwrap()
    }

    fn join<'a>(name: &'a str, labels: &'a BTreeMap<String, String>) -> Join<'a> {
        Join { name, labels }
    }

    #[test]
    fn round_trip_and_spend() {
        let (tok, mut rec) = issue(FP, Grant::default(), 60_000, 2, 1_000);
        let parsed = Token::parse(&tok.encode()).unwrap();
        assert_eq!(parsed, tok);
        assert!(
            !rec.secret_sha256.contains(&tok.secret),
            "secret must not be stored"
        );
        let none = BTreeMap::new();
        assert!(admit(&mut rec, &parsed, &join("a", &none), false, 2_000).is_ok());
        assert!(admit(&mut rec, &parsed, &join("b", &none), false, 2_000).is_ok());
        assert_eq!(
            admit(&mut rec, &parsed, &join("c", &none), false, 2_000),
            Err(Error::UsedUp)
        );
    }

    #[test]
    fn expiry_forgery_and_garbage() {
        let (tok, mut rec) = issue(FP, Grant::default(), 60_000, 5, 1_000);
        let none = BTreeMap::new();
        let j = join("a", &none);
        assert_eq!(
            admit(&mut rec, &tok, &j, false, 61_000),
            Err(Error::Expired)
        );
        let mut forged = tok.clone();
        forged.secret = "0".repeat(64);
        assert_eq!(
            admit(&mut rec, &forged, &j, false, 2_000),
            Err(Error::Unknown)
        );
        assert_eq!(rec.uses_left, 5, "refusals spend nothing");
        rec.revoked = true;
        assert_eq!(admit(&mut rec, &tok, &j, false, 2_000), Err(Error::Unknown));
    }

    #[test]
    fn an_enrolled_name_is_taken_only_by_a_replace_token() {
        let none = BTreeMap::new();
        let (tok, mut rec) = issue(FP, Grant::default(), 60_000, 1, 1_000);
        let e = admit(&mut rec, &tok, &join("host-b", &none), true, 2_000).unwrap_err();
        assert_eq!(e, Error::Enrolled("host-b".into()));
        assert!(e.to_string().contains("cutover hosts remove host-b"), "{e}");
        assert!(e.to_string().contains("--replace host-b"), "{e}");
        assert_eq!(rec.uses_left, 1, "a refused join spends nothing");

        let grant = Grant {
            host: TokenHost::Replaces("host-b".into()),
            ..Grant::default()
        };
        let (tok, mut rec) = issue(FP, grant, 60_000, 2, 1_000);
        assert_eq!(
            admit(&mut rec, &tok, &join("host-c", &none), true, 2_000),
            Err(Error::WrongName {
                pinned: "host-b".into(),
                asked: "host-c".into()
            }),
            "a replace token replaces only its host"
        );
        assert!(admit(&mut rec, &tok, &join("host-b", &none), true, 2_000).is_ok());
        assert!(
            admit(&mut rec, &tok, &join("host-b", &none), false, 2_000).is_ok(),
            "nothing to replace: a plain join"
        );
    }

    #[test]
    fn a_pinned_name_admits_no_other() {
        let none = BTreeMap::new();
        let grant = Grant {
            host: TokenHost::Named("web-7".into()),
            ..Grant::default()
        };
        let (tok, mut rec) = issue(FP, grant, 60_000, 1, 1_000);
        let e = admit(&mut rec, &tok, &join("web-8", &none), false, 2_000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this join token enrols only host web-7, not web-8"
        );
        assert_eq!(
            admit(&mut rec, &tok, &join("web-7", &none), true, 2_000),
            Err(Error::Enrolled("web-7".into())),
            "pinning a name does not replace"
        );
        assert!(admit(&mut rec, &tok, &join("web-7", &none), false, 2_000).is_ok());
    }

    #[test]
    fn token_labels_are_authoritative() {
        let grant = Grant {
            labels: labels("env=dev"),
            allow_labels: vec!["role".into()],
            ..Grant::default()
        };
        let (tok, mut rec) = issue(FP, grant, 60_000, 1, 1_000);
        let asked = labels("env=prod,role=web");
        let e = admit(&mut rec, &tok, &join("a", &asked), false, 2_000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "label env=dev is set by the join token; join --labels cannot change it"
        );
        let asked = labels("role=web,zone=b");
        let e = admit(&mut rec, &tok, &join("a", &asked), false, 2_000).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("label zone is not allowed by the join token (it allows role)"),
            "{e}"
        );
        assert_eq!(rec.uses_left, 1);
        let asked = labels("env=dev,role=web");
        assert_eq!(
            admit(&mut rec, &tok, &join("a", &asked), false, 2_000),
            Ok(labels("env=dev,role=web"))
        );
    }
}
