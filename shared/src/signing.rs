//! What an artifact signature covers. The signature (ed25519, hex) is made over
//! [`signed_message`] of the artifact's SHA-256, which the agent verifies over the
//! artifact's bytes first; so signing the digest binds the signature to the content
//! without reading a large artifact into memory twice.

/// The exact bytes an artifact signature is made over.
pub fn signed_message(sha256_hex: &str) -> Vec<u8> {
    format!("cutover-artifact-v1:{}", sha256_hex.to_ascii_lowercase()).into_bytes()
}
