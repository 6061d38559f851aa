//! The CLI's side of the control API: where the coordinator is, the credentials it
//! presents (which alone say who runs the command), and reading the JSON documents the
//! coordinator answers with.

use std::path::PathBuf;

use cutover_proto::v1::{self as pb, control_client::ControlClient};
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::{Failure, Result};

/// How to reach the coordinator, from `--coordinator` and `--credentials`.
pub struct Conn {
    /// The coordinator's gRPC address, `HOST:PORT`.
    pub coordinator: String,
    /// The folder with `ca.crt`, `client.crt` and `client.key`.
    pub credentials: PathBuf,
}

/// A connected control API client.
pub type Client = ControlClient<Channel>;

impl Conn {
    /// Connects over mutual TLS with the admin credentials.
    pub async fn client(&self) -> Result<Client> {
        cutover_proto::tls::install_default_provider();
        let read = |name: &str| {
            let p = self.credentials.join(name);
            std::fs::read(&p).map_err(|e| {
                Failure::other(format!(
                    "read credentials {}: {e} (point --credentials or CUTOVER_CREDENTIALS at a folder `cutover admin create` wrote, or at the coordinator's DATA/admin)",
                    p.display()
                ))
            })
        };
        let (ca, cert, key) = (read("ca.crt")?, read("client.crt")?, read("client.key")?);
        let cfg = cutover_proto::tls::client_config(&ca, &cert, &key).map_err(|e| {
            Failure::other(format!(
                "credentials in {}: {e}",
                self.credentials.display()
            ))
        })?;
        let channel = cutover_proto::tls::connect(&self.coordinator, cfg)
            .await
            .map_err(|e| {
                Failure::other(format!(
                    "cannot reach the coordinator: {}",
                    cutover_shared::errors::chain(&e)
                ))
            })?;
        Ok(ControlClient::new(channel))
    }
}

/// The typed report a JSON document carries; `what` names it in the error when the
/// document is not one (a coordinator of another version).
pub fn decode<T: DeserializeOwned>(doc: &pb::JsonDocument, what: &str) -> Result<T> {
    serde_json::from_str(&doc.json).map_err(|e| {
        Failure::other(format!(
            "the coordinator's {what} cannot be read by this cutover ({e}); are both the same version?"
        ))
    })
}
