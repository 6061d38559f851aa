//! What verifying a release adds to a host's desired state: the plan's hooks in the slot
//! spec (a changed hook is a changed spec, prepared anew), and during the shadow phase
//! the instruction to copy live requests to the new slot. Pure, like `desired`.

use cutover_proto::v1::{HookSpec, Hooks as WireHooks, ShadowSpec};
use cutover_shared::plan::{Hook, Hooks};

use crate::model::{DeployHost, DeploymentRecord, HostPhase, ShadowPhase, State};

/// The hooks of a slot spec; none when the plan has none, so a plan without hooks asks
/// for the very spec it always did.
pub fn hooks_spec(hooks: &Hooks) -> Option<WireHooks> {
    let spec = |h: &Option<Hook>| {
        h.as_ref().map(|h| HookSpec {
            command: h.command.clone(),
            timeout_ms: h.timeout.as_millis(),
        })
    };
    let wire = WireHooks {
        before_start: spec(&hooks.before_start),
        validate: spec(&hooks.validate),
        before_stop: spec(&hooks.before_stop),
    };
    (wire != WireHooks::default()).then_some(wire)
}

/// What `host` copies to its new slot while the deployment is in its shadow phase: a
/// share of the live requests of the listed methods. Only a prepared host with a live
/// release copies anything; paused, the copies go on (the hold clock stands still).
pub fn mirror(dep: &DeploymentRecord, host: &DeployHost) -> Option<ShadowSpec> {
    let plan = dep.plan.strategy.shadow.as_ref()?;
    let copying = dep.shadow == ShadowPhase::Mirroring
        && matches!(dep.state, State::Progressing | State::Paused)
        && mirrors(host);
    copying.then(|| ShadowSpec {
        slot: host.new_slot.as_str().to_string(),
        share: plan.share,
        methods: plan.methods.clone(),
    })
}

/// The host takes part in the shadow phase: prepared, with a live release whose
/// requests are copied.
pub fn mirrors(host: &DeployHost) -> bool {
    !host.untouched && host.phase == HostPhase::Ready && host.old_slot.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_shared::Duration;

    #[test]
    fn a_plan_without_hooks_asks_for_no_hooks() {
        assert_eq!(hooks_spec(&Hooks::default()), None);
        let hooks = Hooks {
            validate: Some(Hook {
                command: vec!["./smoke".into()],
                timeout: Duration::from_secs(30),
            }),
            ..Hooks::default()
        };
        let wire = hooks_spec(&hooks).expect("hooks");
        assert_eq!(wire.before_start, None);
        assert_eq!(
            wire.validate,
            Some(HookSpec {
                command: vec!["./smoke".into()],
                timeout_ms: 30_000,
            })
        );
    }
}
