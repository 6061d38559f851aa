//! Deploy locks (`cutover lock SERVICE --message TEXT`, `cutover unlock SERVICE`): a
//! locked service refuses new deployments and rollbacks, saying why, who locked it and
//! when, until it is unlocked. Deployments already running go on (and can still be
//! paused, promoted or aborted). This module owns the record, the message's rule and
//! the refusal's words; the store keeps locks across restarts and the engine asks
//! before it creates a deployment. Pure.

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::views::rfc3339;

/// The longest lock message, in characters.
pub const MAX_MESSAGE: usize = 300;

/// A service's lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockRecord {
    pub service: String,
    /// Why, in one line.
    pub message: String,
    /// The name of the certificate that locked it.
    pub by: String,
    pub at_unix_ms: u64,
}

impl LockRecord {
    /// The lock in protocol form.
    pub fn to_pb(&self) -> pb::ServiceLock {
        pb::ServiceLock {
            service: self.service.clone(),
            message: self.message.clone(),
            by: self.by.clone(),
            at_unix_ms: self.at_unix_ms,
        }
    }

    /// Why a deployment or rollback of the service is refused: the message, who and when,
    /// and how to lift it.
    pub fn refusal(&self) -> String {
        format!(
            "service {} is locked by {} since {}: {:?}; `cutover unlock {}` lifts the lock",
            self.service,
            self.by,
            rfc3339(self.at_unix_ms).unwrap_or_default(),
            self.message,
            self.service
        )
    }
}

/// The message of `lock --message`, trimmed: one line of printable text, not empty, at
/// most [`MAX_MESSAGE`] characters (it is repeated in every refusal it causes).
pub fn check_message(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("--message: say why the service is locked".into());
    }
    if text.chars().any(char::is_control) {
        return Err(
            "--message: must be one line of text (no newlines or control characters)".into(),
        );
    }
    if text.chars().count() > MAX_MESSAGE {
        return Err(format!("--message: longer than {MAX_MESSAGE} characters"));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_short_line() {
        assert_eq!(check_message("  db migration  ").unwrap(), "db migration");
        assert!(check_message(" ").unwrap_err().contains("say why"));
        assert!(check_message("a\nb").unwrap_err().contains("one line"));
        assert!(check_message(&"x".repeat(301)).unwrap_err().contains("300"));
        assert!(check_message(&"é".repeat(300)).is_ok());
    }

    #[test]
    fn a_refusal_says_why_who_when_and_how_to_lift_it() {
        let lock = LockRecord {
            service: "web".into(),
            message: "db migration until 14:00".into(),
            by: "ana".into(),
            at_unix_ms: 1_000,
        };
        assert_eq!(
            lock.refusal(),
            "service web is locked by ana since 1970-01-01T00:00:01.000Z: \"db migration until 14:00\"; `cutover unlock web` lifts the lock"
        );
    }
}
