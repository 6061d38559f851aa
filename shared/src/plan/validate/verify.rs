//! Validation of what verifies a release before it meets a customer: `[hooks]` (each a
//! command to run and a timeout) and `[strategy] shadow` (a duration, a share and the
//! methods copied, only for HTTP services), and the `status_match` metric, which only
//! shadow traffic can measure.

use super::super::RUN_VARIABLES;
use super::super::model::{Analysis, Hook, Hooks, MetricName, Protocol, Shadow};
use super::super::path::{I, K};
use super::{Invalid, invalid, more_than_zero};
use crate::placeholders;

/// The largest bytes of a method name: longer is not a method anyone sends.
const METHOD_MAX: usize = 32;

/// `[hooks]`: each hook names a program, holds only `${PORT}`, and has a timeout.
pub(super) fn validate_hooks(hooks: &Hooks) -> Result<(), Invalid> {
    for (name, hook) in hooks.named() {
        validate_hook(name, hook)?;
    }
    Ok(())
}

fn validate_hook(name: &'static str, hook: &Hook) -> Result<(), Invalid> {
    let at = |k: &'static str| [K("hooks"), K(name), K(k)];
    if hook.command.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(invalid(
            &at("command"),
            "must name the program to run, e.g. [\"./bin/smoke-test\"]",
        ));
    }
    for (i, arg) in hook.command.iter().enumerate() {
        placeholders::check(arg, RUN_VARIABLES)
            .map_err(|e| invalid(&[K("hooks"), K(name), K("command"), I(i)], e.to_string()))?;
    }
    more_than_zero(&at("timeout"), hook.timeout)
}

/// `[strategy] shadow`: a duration, a share from 1 to 100, HTTP methods, and an HTTP
/// service (a TCP byte stream cannot be copied to a second slot safely).
pub(super) fn validate_shadow(shadow: &Shadow, protocol: Protocol) -> Result<(), Invalid> {
    let at = |k: &'static str| [K("strategy"), K("shadow"), K(k)];
    if protocol == Protocol::Tcp {
        return Err(invalid(
            &[K("strategy"), K("shadow")],
            "shadow traffic needs protocol = \"http\": a TCP byte stream cannot be copied to a second slot safely (requests are not framed, and a copy may repeat writes)",
        ));
    }
    more_than_zero(&at("duration"), shadow.duration)?;
    if shadow.share == 0 || shadow.share > 100 {
        return Err(invalid(
            &at("share"),
            format!("share {} is not a percentage from 1 to 100", shadow.share),
        ));
    }
    if shadow.methods.is_empty() {
        return Err(invalid(
            &at("methods"),
            "no methods: list the ones safe to send twice, e.g. [\"GET\", \"HEAD\"]",
        ));
    }
    for (i, m) in shadow.methods.iter().enumerate() {
        let token = !m.is_empty()
            && m.len() <= METHOD_MAX
            && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
        if !token {
            return Err(invalid(
                &[K("strategy"), K("shadow"), K("methods"), I(i)],
                format!("{m:?} is not an HTTP method in capitals, like \"GET\""),
            ));
        }
    }
    Ok(())
}

/// `status_match` compares the new release's answers with the live ones, which only
/// shadow traffic gives: a plan judging it must have `[strategy] shadow`.
pub(super) fn validate_status_match(a: &Analysis, shadow: Option<&Shadow>) -> Result<(), Invalid> {
    if shadow.is_some() {
        return Ok(());
    }
    match a
        .metric
        .iter()
        .position(|m| m.proxy_name() == Some(MetricName::StatusMatch))
    {
        Some(i) => Err(invalid(
            &[K("analysis"), K("metric"), I(i), K("name")],
            "status_match is measured only on shadow traffic: add [strategy] shadow = { duration = \"1m\" }",
        )),
        None => Ok(()),
    }
}

/// A metric whose bounds say something about `status_match`: a share, so `max` and
/// `min` are at most 1.
pub(super) fn validate_status_match_bounds(
    i: usize,
    min: Option<f64>,
    max: Option<f64>,
) -> Result<(), Invalid> {
    for (k, v) in [("min", min), ("max", max)] {
        if let Some(v) = v
            && v > 1.0
        {
            return Err(invalid(
                &[K("analysis"), K("metric"), I(i), K(k)],
                format!("status_match is a fraction from 0 to 1; {v} is above 1"),
            ));
        }
    }
    Ok(())
}
