//! `cutover`: the coordinator (`cutover serve`) and the release manager's CLI.
//!
//! The CLI's connection and output flags (`--coordinator`, `--credentials`, `--output`)
//! are accepted before the subcommand (`cutover --output json status`) and anywhere
//! after it (`cutover status --output json`), on every command except `serve`, which
//! has flags of its own only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as _, CommandFactory, FromArgMatches, Parser, Subcommand};
use coordinator::cli::{self, Conn, Failure, Output};
use coordinator::errln;
use coordinator::serve::{LogFormat, ServeArgs};
use tokio_util::sync::CancellationToken;

const COORDINATOR_HELP: &str = "The coordinator's gRPC address (its --listen), HOST:PORT; env \
                                CUTOVER_COORDINATOR [default: 127.0.0.1:7400]";
const CREDENTIALS_HELP: &str = "Folder with ca.crt, client.crt and client.key (one `cutover admin \
                                create` wrote, or the coordinator's DATA/admin); env \
                                CUTOVER_CREDENTIALS [default: ~/.config/cutover]";
const OUTPUT_HELP: &str = "Format of the data on stdout [default: text]";
const DEFAULT_COORDINATOR: &str = "127.0.0.1:7400";

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Progressive, self-healing deployments for fleets of plain hosts"
)]
struct Args {
    // The connection and output flags written before the subcommand.
    #[command(flatten)]
    flags: TopFlags,
    // What to do.
    #[command(subcommand)]
    command: Cmd,
}

/// The CLI flags written before the subcommand; the environment fills them in.
#[derive(clap::Args)]
struct TopFlags {
    // Each field's help text says what it is for.
    #[arg(long, env = "CUTOVER_COORDINATOR", hide_env = true, value_name = "HOST:PORT", help = COORDINATOR_HELP)]
    coordinator: Option<String>,
    #[arg(long, env = "CUTOVER_CREDENTIALS", hide_env = true, value_name = "DIR", help = CREDENTIALS_HELP)]
    credentials: Option<PathBuf>,
    #[arg(long, value_enum, help = OUTPUT_HELP)]
    output: Option<Output>,
}

/// The same flags written after a CLI subcommand; they win over [`TopFlags`]. Added to
/// every subcommand but `serve` by [`command`].
#[derive(clap::Args, Default)]
struct CliFlags {
    // The fields of [`TopFlags`], without their environment variables (those fill in
    // the flags before the subcommand only, so that a flag after it always wins).
    #[arg(long, global = true, value_name = "HOST:PORT", help = COORDINATOR_HELP)]
    coordinator: Option<String>,
    #[arg(long, global = true, value_name = "DIR", help = CREDENTIALS_HELP)]
    credentials: Option<PathBuf>,
    #[arg(long, global = true, value_enum, help = OUTPUT_HELP)]
    output: Option<Output>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator.
    Serve(ServeArgs),
    #[command(flatten)]
    Cli(cli::Command),
}

/// The full command line: [`Args`] with [`CliFlags`] on every subcommand but `serve`.
fn command() -> clap::Command {
    let flags: Vec<clap::Arg> = CliFlags::augment_args(clap::Command::new("flags"))
        .get_arguments()
        .cloned()
        .collect();
    let mut cmd = Args::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .filter(|n| n != "serve")
        .collect();
    for name in names {
        let flags = flags.clone();
        cmd = cmd.mut_subcommand(name, |s| s.args(flags));
    }
    cmd
}

/// Parses the command line; returns the arguments and the merged CLI flags.
fn parse() -> (Args, Conn, Output) {
    let matches = command().get_matches();
    let parsed = Args::from_arg_matches(&matches)
        .and_then(|args| {
            let after = match matches.subcommand() {
                Some((name, sub)) if name != "serve" => CliFlags::from_arg_matches(sub)?,
                _ => CliFlags::default(),
            };
            Ok((args, after))
        })
        .unwrap_or_else(|e| e.exit());
    let (args, after) = parsed;
    let top = &args.flags;
    let credentials = after
        .credentials
        .or_else(|| top.credentials.clone())
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".config/cutover")
        });
    let conn = Conn {
        coordinator: after
            .coordinator
            .or_else(|| top.coordinator.clone())
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string()),
        credentials,
    };
    let output = after.output.or(top.output).unwrap_or(Output::Text);
    (args, conn, output)
}

fn init_logging(serving: bool, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if serving { "info" } else { "warn" })
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() -> ExitCode {
    let (args, conn, output) = parse();
    let log_format = match &args.command {
        Cmd::Serve(serve) => Some(serve.log_format),
        Cmd::Cli(_) => None,
    };
    init_logging(log_format.is_some(), log_format.unwrap_or(LogFormat::Text));

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("error: start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(args, conn, output));
    // Data cut short by a failing stdout (other than a closed pipe) is a failure.
    let result = match (result, cli::out::stdout_error()) {
        (Ok(_), Some(e)) => Err(Failure::new(1, format!("write to stdout: {e}"))),
        (r, _) => r,
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(f) if f.code == cli::INTERRUPTED => {
            errln!("{}", f.message);
            ExitCode::from(f.code as u8)
        }
        Err(f) => {
            let line = cutover_shared::errors::shorten(&f.message);
            if log_format == Some(LogFormat::Json) {
                tracing::error!(error = %line, "coordinator stopped");
            } else {
                errln!("error: {line}");
            }
            ExitCode::from(f.code as u8)
        }
    }
}

async fn run(args: Args, conn: Conn, out: Output) -> cli::Result<i32> {
    match args.command {
        Cmd::Serve(serve) => run_serve(serve).await,
        Cmd::Cli(command) => command.run(&conn, out).await,
    }
}

/// `cutover serve`: checks the flags, then runs the coordinator until SIGTERM or SIGINT.
async fn run_serve(args: ServeArgs) -> cli::Result<i32> {
    let config = args.config().map_err(Failure::usage)?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping");
        signal.cancel();
    });
    coordinator::serve::serve(config, shutdown)
        .await
        .map_err(|e| Failure::other(format!("{e:#}")))?;
    Ok(0)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every subcommand, with the path of subcommands leading to it.
    fn arguments(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Arg)>) {
        for a in cmd.get_arguments() {
            out.push((path.clone(), a.clone()));
        }
        for s in cmd.get_subcommands() {
            arguments(s, format!("{path} {}", s.get_name()), out);
        }
    }

    fn built() -> clap::Command {
        let mut cmd = command();
        cmd.build();
        cmd
    }

    #[test]
    fn every_argument_has_a_help_line() {
        let mut all = Vec::new();
        arguments(&built(), "cutover".into(), &mut all);
        assert!(all.len() > 40, "{} arguments", all.len());
        for (path, a) in all {
            assert!(
                a.get_help()
                    .is_some_and(|h| !h.to_string().trim().is_empty()),
                "{path} {} has no help",
                a.get_id()
            );
        }
    }

    #[test]
    fn serve_has_only_its_own_flags() {
        let cmd = built();
        let serve = cmd.find_subcommand("serve").expect("serve");
        let ids: Vec<&str> = serve.get_arguments().map(|a| a.get_id().as_str()).collect();
        for cli_only in ["coordinator", "credentials", "output"] {
            assert!(!ids.contains(&cli_only), "serve has --{cli_only}: {ids:?}");
        }
        let hosts = cmd.find_subcommand("token").expect("token");
        let create = hosts.find_subcommand("create").expect("create");
        let ids: Vec<&str> = create
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .collect();
        assert!(ids.contains(&"output"), "{ids:?}");
    }

    /// The CLI flags before and after the subcommand, the later one winning.
    #[test]
    fn cli_flags_are_accepted_before_and_after_the_subcommand() {
        let flags = |argv: &[&str]| {
            let m = command().try_get_matches_from(argv).expect("parses");
            let top = TopFlags::from_arg_matches(&m).expect("top");
            let (_, sub) = m.subcommand().expect("subcommand");
            let after = CliFlags::from_arg_matches(sub).expect("after");
            (
                after.output.or(top.output),
                after.coordinator.or(top.coordinator),
            )
        };
        assert_eq!(
            flags(&["cutover", "--output", "json", "status"]).0,
            Some(Output::Json)
        );
        assert_eq!(
            flags(&["cutover", "status", "--output", "json"]).0,
            Some(Output::Json)
        );
        assert_eq!(
            flags(&["cutover", "token", "create", "--output", "json"]).0,
            Some(Output::Json)
        );
        assert_eq!(
            flags(&["cutover", "token", "--output", "json", "list"]).0,
            Some(Output::Json)
        );
        assert_eq!(
            flags(&[
                "cutover",
                "--coordinator",
                "a:1",
                "hosts",
                "remove",
                "x",
                "--coordinator",
                "b:2"
            ])
            .1
            .as_deref(),
            Some("b:2")
        );
        assert!(
            command()
                .try_get_matches_from(["cutover", "serve", "--data-dir", "d", "--output", "json"])
                .is_err(),
            "serve does not take CLI flags"
        );
    }
}
