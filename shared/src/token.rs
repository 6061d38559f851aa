//! The join token's text form: `cutover1.<ca-fingerprint>.<id>.<secret>`, all hex. The
//! agent reads the CA fingerprint from it before contacting the coordinator; the
//! coordinator looks the id up and compares the secret's digest.

use std::fmt;

const PREFIX: &str = "cutover1";

#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_fingerprint: String,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed join token: expected cutover1.<fingerprint>.<id>.<secret> as printed by `cutover token create`"
)]
pub struct Malformed;

impl Token {
    pub fn parse(text: &str) -> Result<Token, Malformed> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let hex = |s: &str, len: Option<usize>| {
            !s.is_empty()
                && len.is_none_or(|l| s.len() == l)
                && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        match parts.as_slice() {
            [PREFIX, fp, id, secret]
                if hex(fp, Some(64))
                    && hex(id, None)
                    && id.len() <= 32
                    && hex(secret, Some(64)) =>
            {
                Ok(Token {
                    ca_fingerprint: fp.to_ascii_lowercase(),
                    id: id.to_ascii_lowercase(),
                    secret: secret.to_ascii_lowercase(),
                })
            }
            _ => Err(Malformed),
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}.{}.{}.{}",
            self.ca_fingerprint, self.id, self.secret
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        let t = Token {
            ca_fingerprint: "a".repeat(64),
            id: "0123abcd".into(),
            secret: "f".repeat(64),
        };
        assert_eq!(Token::parse(&t.encode()), Ok(t.clone()));
        assert_eq!(Token::parse(&format!("  {}\n", t.encode())), Ok(t.clone()));
        assert!(
            !format!("{t:?}").contains(&"f".repeat(64)),
            "secret is not printed"
        );
        for bad in [
            "",
            "cutover1",
            "cutover1.x.y.z",
            "cutover2.a.b.c",
            &t.encode().replace("cutover1", "cutover0"),
            &format!("{}.x", t.encode()),
        ] {
            assert_eq!(Token::parse(bad), Err(Malformed), "{bad}");
        }
    }
}
