//! How a CLI command fails: one line for stderr and the exit code the product contract
//! gives it (0 ok, 1 anything else, 2 usage or plan, 3 rolled back, 4 failed or aborted,
//! 130 when Ctrl-C stops following a deployment), and the exit code of a deployment's
//! final state.

/// Anything else: the coordinator unreachable, a refusal, an unreadable answer.
pub const OTHER: i32 = 1;
/// A usage or plan error.
pub const USAGE: i32 = 2;
/// `watch` or `--wait` interrupted by Ctrl-C; the deployment goes on.
pub const INTERRUPTED: i32 = 130;

/// A CLI failure: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// The process's exit code (see the module doc).
    pub code: i32,
    /// One line for stderr, without the `error: ` prefix `main` adds.
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// Exit 1: anything that is not the user's input.
    pub fn other(message: impl Into<String>) -> Self {
        Failure::new(OTHER, message)
    }

    /// Exit 2: a bad flag, argument or plan.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(USAGE, message)
    }

    /// Ctrl-C while following deployment `id`: says how to follow or stop it.
    pub fn interrupted(id: &str) -> Self {
        Failure::new(
            INTERRUPTED,
            format!(
                "{id} goes on; follow it with `cutover watch {id}`, stop it with `cutover abort {id}`"
            ),
        )
    }
}

/// What a CLI command returns: its exit code, or how it failed.
pub type Result<T> = std::result::Result<T, Failure>;

/// The coordinator's refusal: its message (or the code's description when it sent none);
/// exit 2 for an invalid argument (a plan the coordinator rejected), else 1.
impl From<tonic::Status> for Failure {
    fn from(e: tonic::Status) -> Failure {
        let code = match e.code() {
            tonic::Code::InvalidArgument => USAGE,
            _ => OTHER,
        };
        let msg = e.message();
        let msg = if msg.is_empty() {
            e.code().description()
        } else {
            msg
        };
        Failure::new(code, msg.to_string())
    }
}

/// The exit code for a deployment that ended in `state`.
pub fn exit_code_for_state(state: &str) -> i32 {
    match state {
        "succeeded" => 0,
        "rolled_back" => 3,
        "failed" | "aborted" => 4,
        _ => OTHER,
    }
}

/// Whether a deployment in `state` has ended (and has an exit code of its own).
pub fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "rolled_back" | "failed" | "aborted")
}
