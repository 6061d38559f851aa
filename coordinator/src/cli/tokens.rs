//! `cutover token`: join tokens for new hosts — creating one (printed alone on stdout),
//! listing them (never their secrets) and revoking one.

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;
use cutover_shared::names::{check_name, parse_label_keys, parse_labels};
use serde_json::{Value, json};

use super::table::{or_dash, print_table};
use super::{Conn, Failure, Output, Result};
use crate::cli::out::print_json;
use crate::views::{opt, rfc3339};
use crate::{errln, outln};

/// `cutover token …`
#[derive(clap::Subcommand)]
pub enum TokenCmd {
    /// Create a join token; prints it alone on stdout. A join under a name already
    /// enrolled is refused unless the token was made with --replace NAME.
    Create(CreateArgs),
    /// List join tokens (never their secrets).
    List,
    /// Revoke a join token by id.
    Revoke {
        /// The token's id, as `token list` shows it.
        id: String,
    },
}

/// `cutover token create`'s flags, as typed.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// The enrolled host's labels, as k=v,k2=v2; a join cannot change them.
    #[arg(long, default_value = "")]
    labels: String,
    /// How long the token can be used.
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    ttl: cutover_shared::Duration,
    /// How many hosts can join with it.
    #[arg(long, default_value_t = 1)]
    uses: u32,
    /// Enrol only a host of this name.
    #[arg(long)]
    name: Option<String>,
    /// Enrol a new machine as this enrolled host; the old one's certificate is revoked.
    #[arg(long, value_name = "NAME")]
    replace: Option<String>,
    /// Label keys `cutover-agent join --labels` may add, as k1,k2.
    #[arg(long, default_value = "")]
    allow_labels: String,
}

pub async fn run(cmd: TokenCmd, conn: &Conn, output: Output) -> Result<i32> {
    match cmd {
        TokenCmd::Create(args) => create(conn, args.request()?, output).await,
        TokenCmd::List => list(conn, output).await,
        TokenCmd::Revoke { id } => revoke(conn, id, output).await,
    }
}

impl CreateArgs {
    /// The request these flags make, each checked and named in the error when wrong.
    fn request(self) -> Result<pb::CreateTokenRequest> {
        fn usage(flag: &'static str) -> impl Fn(String) -> Failure {
            move |m| Failure::usage(format!("{flag}: {m}"))
        }
        let host = |n: Option<String>| n.map(|n| check_name("host", &n).map(|()| n)).transpose();
        let labels = parse_labels(&self.labels).map_err(usage("--labels"))?;
        let allow_labels = parse_label_keys(&self.allow_labels).map_err(usage("--allow-labels"))?;
        let name = host(self.name).map_err(usage("--name"))?;
        let replace = host(self.replace).map_err(usage("--replace"))?;
        if self.ttl.is_zero() {
            return Err(Failure::usage("--ttl: must be more than 0s"));
        }
        if self.uses == 0 {
            return Err(Failure::usage("--uses: must be at least 1"));
        }
        if let (Some(n), Some(r)) = (&name, &replace)
            && n != r
        {
            return Err(Failure::usage(format!(
                "--name {n} and --replace {r} name different hosts"
            )));
        }
        Ok(pb::CreateTokenRequest {
            labels: labels.into_iter().collect(),
            ttl_ms: self.ttl.as_millis(),
            uses: self.uses,
            name: name.unwrap_or_default(),
            replace: replace.unwrap_or_default(),
            allow_labels,
        })
    }
}

async fn create(conn: &Conn, request: pb::CreateTokenRequest, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let r = client.create_token(request).await?.into_inner();
    match output {
        Output::Json => print_json(
            &json!({"token": r.token, "id": r.id, "expires_at": rfc3339(r.expires_unix_ms)}),
        ),
        Output::Text => outln!("{}", r.token),
    }
    Ok(0)
}

/// `valid`, `revoked`, `expired` or `used` at `now`.
fn state(t: &pb::TokenInfo, now: u64) -> &'static str {
    if t.revoked {
        "revoked"
    } else if t.expires_unix_ms <= now {
        "expired"
    } else if t.uses_left == 0 {
        "used"
    } else {
        "valid"
    }
}

async fn list(conn: &Conn, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let tokens = client
        .list_tokens(pb::ListTokensRequest {})
        .await?
        .into_inner()
        .tokens;
    let now = cutover_shared::clock::now_ms();
    match output {
        Output::Json => print_json(&Value::Array(
            tokens.iter().map(|t| token_json(t, now)).collect(),
        )),
        Output::Text => print_table(&token_rows(&tokens, now), &[2]),
    }
    Ok(0)
}

fn token_json(t: &pb::TokenInfo, now: u64) -> Value {
    let labels: BTreeMap<_, _> = t.labels.iter().collect();
    json!({
        "id": t.id,
        "labels": labels,
        "name": opt(&t.name),
        "replace": t.replace,
        "allow_labels": t.allow_labels,
        "created_at": rfc3339(t.created_unix_ms),
        "expires_at": rfc3339(t.expires_unix_ms),
        "uses_left": t.uses_left,
        "state": state(t, now),
    })
}

/// The `token list` table, header first.
fn token_rows(tokens: &[pb::TokenInfo], now: u64) -> Vec<[String; 7]> {
    let header = [
        "ID",
        "STATE",
        "USES LEFT",
        "EXPIRES",
        "HOST",
        "ALLOW LABELS",
        "LABELS",
    ];
    let mut rows = vec![header.map(String::from)];
    for t in tokens {
        let mut labels: Vec<String> = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let expires = rfc3339(t.expires_unix_ms);
        let host = match (t.name.as_str(), t.replace) {
            ("", _) => String::new(),
            (name, true) => format!("{name} (replace)"),
            (name, false) => name.to_string(),
        };
        rows.push([
            t.id.clone(),
            state(t, now).to_string(),
            t.uses_left.to_string(),
            expires.unwrap_or_else(|| "-".into()),
            or_dash(host),
            or_dash(t.allow_labels.join(",")),
            or_dash(labels.join(",")),
        ]);
    }
    rows
}

async fn revoke(conn: &Conn, id: String, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    client
        .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
        .await?;
    match output {
        Output::Json => print_json(&json!({"revoked": id})),
        Output::Text => errln!("token {id} revoked"),
    }
    Ok(0)
}
