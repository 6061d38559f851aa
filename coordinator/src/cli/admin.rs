//! `cutover admin`: personal credentials. `create` makes the person's key here, has the
//! coordinator sign a certificate for it under their name and role, and writes a
//! credentials folder to hand over (the key never crosses the network and never exists
//! on the coordinator); `list` shows who holds credentials; `revoke` shuts one out at
//! once. The name of the certificate is what the timeline records for everything done
//! with it.

use std::path::{Path, PathBuf};

use cutover_proto::v1 as pb;
use cutover_shared::names::check_name;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde_json::{Value, json};

use super::table::{or_dash, print_table};
use super::{Conn, Failure, Output, Result};
use crate::cli::conn::Client;
use crate::cli::out::print_json;
use crate::model::FIRST_ADMIN;
use crate::views::rfc3339;
use crate::{errln, outln};

/// `cutover admin …`
#[derive(clap::Subcommand)]
pub enum AdminCmd {
    /// Issue personal credentials: a folder with ca.crt, client.crt and client.key (the
    /// key is made here) for `--credentials`.
    Create(CreateArgs),
    /// List who holds credentials.
    List,
    /// Revoke a person's credentials; their certificate opens nothing from now on.
    Revoke {
        /// The person's name, as `admin list` shows it.
        name: String,
    },
}

/// What a person's credentials may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    // Everything. (Plain comments: a doc comment would show in --help.)
    Admin,
    // Read only: status, hosts, history, show, stats, watch.
    Viewer,
}

impl RoleArg {
    fn as_str(self) -> &'static str {
        match self {
            RoleArg::Admin => "admin",
            RoleArg::Viewer => "viewer",
        }
    }
}

/// `cutover admin create`'s arguments.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// The person's name (a-z, 0-9, '-', '_', '.'): what the timeline records for
    /// everything done with these credentials.
    name: String,
    /// admin: everything; viewer: read only (status, hosts, history, show, stats, watch,
    /// logs, releases, service list, dry runs).
    #[arg(long, value_enum, default_value = "admin")]
    role: RoleArg,
    /// The folder to write (new, or empty) [default: ./cutover-NAME].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub async fn run(cmd: AdminCmd, conn: &Conn, output: Output) -> Result<i32> {
    match cmd {
        AdminCmd::Create(args) => create(conn, args, output).await,
        AdminCmd::List => list(conn, output).await,
        AdminCmd::Revoke { name } => revoke(conn, name, output).await,
    }
}

/// A credentials folder being written: removed again unless [`Folder::keep`] is called.
struct Folder {
    dir: PathBuf,
    /// The folder did not exist before: removing it leaves things as they were.
    made: bool,
    /// Files written so far.
    written: Vec<PathBuf>,
    kept: bool,
}

impl Folder {
    /// A new folder (owner only), or an existing empty one; never one holding anything.
    fn prepare(dir: PathBuf) -> Result<Folder> {
        use std::os::unix::fs::DirBuilderExt;
        let shown = dir.display().to_string();
        let made = match std::fs::read_dir(&dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Failure::usage(format!(
                        "--out {shown}: not empty; not overwriting anything there"
                    )));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|e| Failure::other(format!("create {shown}: {e}")))?;
                true
            }
            Err(e) => return Err(Failure::usage(format!("--out {shown}: {e}"))),
        };
        Ok(Folder {
            dir,
            made,
            written: Vec::new(),
            kept: false,
        })
    }

    /// Writes `name` in the folder, readable by its owner only; never replaces a file.
    fn write(&mut self, name: &str, text: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(name);
        let failed = |e: std::io::Error| Failure::other(format!("write {}: {e}", path.display()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        self.written.push(path.clone());
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(failed)
    }

    fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.dir.clone()
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for f in &self.written {
            let _ = std::fs::remove_file(f);
        }
        if self.made {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// A new key and a certificate request for it, named `name`: (key PEM, CSR PEM).
fn key_and_request(name: &str) -> Result<(String, String)> {
    let failed = |e: rcgen::Error| Failure::other(format!("make a key: {e}"));
    let key = KeyPair::generate().map_err(failed)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(failed)?;
    Ok((key.serialize_pem(), csr.pem().map_err(failed)?))
}

/// `cutover admin create NAME`: prints the credentials folder alone on stdout.
async fn create(conn: &Conn, args: CreateArgs, output: Output) -> Result<i32> {
    check_name("admin", &args.name).map_err(Failure::usage)?;
    if args.name == FIRST_ADMIN {
        return Err(Failure::usage(format!(
            "the name {FIRST_ADMIN} belongs to the coordinator's first-start credentials (DATA/admin); choose another"
        )));
    }
    let mut client = conn.client().await?;
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("cutover-{}", args.name)));
    let mut folder = Folder::prepare(out)?;
    let (key_pem, csr_pem) = key_and_request(&args.name)?;
    // The key first: a folder that cannot take it fails before anything is issued.
    folder.write("client.key", &key_pem)?;
    let issued = client
        .create_admin(pb::CreateAdminRequest {
            name: args.name.clone(),
            role: args.role.as_str().into(),
            csr_pem,
        })
        .await?
        .into_inner();
    if let Err(e) = write_certificates(&mut folder, &issued) {
        return Err(take_back(&mut client, &args.name, e).await);
    }
    let dir = folder.keep();
    report_created(&args.name, args.role, &dir, &issued, output);
    Ok(0)
}

fn write_certificates(folder: &mut Folder, issued: &pb::CreateAdminResponse) -> Result<()> {
    folder.write("ca.crt", &issued.ca_pem)?;
    folder.write("client.crt", &issued.certificate_pem)
}

/// Revokes credentials that were issued but could not be written, so that no
/// certificate stays valid that nobody holds; the failure to report.
async fn take_back(client: &mut Client, name: &str, failure: Failure) -> Failure {
    let revoked = client
        .revoke_admin(pb::RevokeAdminRequest {
            name: name.to_string(),
        })
        .await;
    let then = match revoked {
        Ok(_) => "the credentials were revoked again".to_string(),
        Err(e) => format!(
            "revoking them again failed too ({}); run `cutover admin revoke {name}`",
            e.message()
        ),
    };
    Failure::new(failure.code, format!("{}; {then}", failure.message))
}

fn report_created(
    name: &str,
    role: RoleArg,
    dir: &Path,
    issued: &pb::CreateAdminResponse,
    output: Output,
) {
    match output {
        Output::Json => print_json(&json!({
            "name": name,
            "role": role.as_str(),
            "credentials": dir.display().to_string(),
            "fingerprint": issued.fingerprint,
            "expires_at": rfc3339(issued.not_after_unix_ms),
        })),
        Output::Text => {
            outln!("{}", dir.display());
            errln!(
                "credentials for {name} ({}) written to {}; the key was made here and is in no other place: hand the folder to {name}, who uses it with --credentials or CUTOVER_CREDENTIALS",
                role.as_str(),
                dir.display()
            );
        }
    }
}

async fn list(conn: &Conn, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let admins = client
        .list_admins(pb::ListAdminsRequest {})
        .await?
        .into_inner()
        .admins;
    match output {
        Output::Json => print_json(&Value::Array(admins.iter().map(admin_json).collect())),
        Output::Text => print_table(&admin_rows(&admins), &[]),
    }
    Ok(0)
}

fn admin_json(a: &pb::AdminInfo) -> Value {
    json!({
        "name": a.name,
        "role": a.role,
        "fingerprint": a.fingerprint,
        "created_at": rfc3339(a.created_unix_ms),
        "created_by": crate::views::opt(&a.created_by),
        "expires_at": rfc3339(a.expires_unix_ms),
    })
}

/// The `admin list` table, header first.
fn admin_rows(admins: &[pb::AdminInfo]) -> Vec<[String; 6]> {
    let header = ["NAME", "ROLE", "CREATED", "BY", "EXPIRES", "FINGERPRINT"];
    let mut rows = vec![header.map(String::from)];
    for a in admins {
        let by = if a.created_by.is_empty() && a.name == FIRST_ADMIN {
            "(first start)".to_string()
        } else {
            a.created_by.clone()
        };
        rows.push([
            a.name.clone(),
            a.role.clone(),
            or_dash(rfc3339(a.created_unix_ms).unwrap_or_default()),
            or_dash(by),
            or_dash(rfc3339(a.expires_unix_ms).unwrap_or_default()),
            a.fingerprint.chars().take(16).collect(),
        ]);
    }
    rows
}

async fn revoke(conn: &Conn, name: String, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    client
        .revoke_admin(pb::RevokeAdminRequest { name: name.clone() })
        .await?;
    match output {
        Output::Json => print_json(&json!({"revoked": name})),
        Output::Text => {
            errln!("credentials of {name} revoked; their certificate opens nothing any more")
        }
    }
    Ok(0)
}
