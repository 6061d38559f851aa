//! When a slot runs its release's hooks ([`crate::hooks`] runs them): `before_start`
//! once the release is unpacked and before the first start, `validate` once the slot
//! first turns healthy (the slot reports `validating` meanwhile, and `healthy` only once
//! it passed), `before_stop` before the process is sent SIGTERM. Each run is reported in
//! the slot's state, with where its output is kept.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use cutover_proto::v1::HookRun;

use super::SlotCtx;
use super::launch::Launch;
use crate::hooks::{self, Hook, Invocation, Ran};

/// A `validate` run under way, owned so that the slot can keep watching its process
/// meanwhile.
pub type Validation = Pin<Box<dyn Future<Output = Ran> + Send>>;

impl SlotCtx {
    /// The spec's command for `hook`, if the plan names it.
    fn hook_spec(&self, hook: Hook) -> Option<&cutover_proto::v1::HookSpec> {
        hook.spec(self.spec.hooks.as_ref())
    }

    /// The plan has a `validate` hook.
    pub(super) fn has_validate(&self) -> bool {
        self.hook_spec(Hook::Validate).is_some()
    }

    /// What the hooks are told of the deployment now.
    fn hook_context(&self) -> hooks::Context {
        self.hook_context
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The slot's secret values, known once its environment was read.
    fn secrets(&self) -> cutover_shared::secrets::Secrets {
        self.secrets.get().cloned().unwrap_or_default()
    }

    /// Reports a hook's run (the latest of each hook) and where its output is.
    fn record_hook(&self, report: HookRun, log: &std::path::Path) {
        self.set(|s| {
            s.hooks.retain(|r| r.hook != report.hook);
            s.hooks.push(report);
            s.hook_log = log.to_string_lossy().into_owned();
        });
    }
}

/// Runs `before_start` (if the plan names one) for a process about to start on `port`.
/// `Err` is the slot's failure.
pub(super) async fn before_start(ctx: &SlotCtx, launch: &Launch, port: u16) -> Result<(), String> {
    let Some((ran, log)) = run(ctx, launch, port, Hook::BeforeStart).await else {
        return Ok(());
    };
    hooks::prune(&ctx.data_dir, &ctx.service, hooks::KEEP_LOGS, &log);
    finished(ctx, ran, &log)
}

/// Runs `hook` now, if the plan names it, for the process on `port`: how it went and
/// where its output is.
async fn run(ctx: &SlotCtx, launch: &Launch, port: u16, hook: Hook) -> Option<(Ran, PathBuf)> {
    let spec = ctx.hook_spec(hook)?;
    let context = ctx.hook_context();
    let log = hooks::log_path(&ctx.data_dir, &ctx.service, &context.deployment);
    let launcher = launch.launcher(port);
    let ran = Invocation {
        hook,
        spec,
        launcher: &launcher,
        port,
        context: &context,
        log: &log,
        slot: ctx.slot.as_str(),
        release: ctx.version(),
        secrets: ctx.secrets(),
    }
    .run()
    .await;
    Some((ran, log))
}

/// Starts `validate` against the process on `port`, if the plan names it.
pub(super) fn validation(ctx: &SlotCtx, launch: &Launch, port: u16) -> Option<Validation> {
    let spec = ctx.hook_spec(Hook::Validate)?.clone();
    let context = ctx.hook_context();
    let log = hooks::log_path(&ctx.data_dir, &ctx.service, &context.deployment);
    let launcher = launch.launcher(port);
    let (slot, release) = (ctx.slot.as_str(), ctx.version().to_string());
    let secrets = ctx.secrets();
    ctx.set(|s| s.hook_log = log.to_string_lossy().into_owned());
    Some(Box::pin(async move {
        Invocation {
            hook: Hook::Validate,
            spec: &spec,
            launcher: &launcher,
            port,
            context: &context,
            log: &log,
            slot,
            release: &release,
            secrets,
        }
        .run()
        .await
    }))
}

/// Reports how `validate` went; `Err` is the slot's failure.
pub(super) fn validated(ctx: &SlotCtx, ran: Ran) -> Result<(), String> {
    let context = ctx.hook_context();
    let log = hooks::log_path(&ctx.data_dir, &ctx.service, &context.deployment);
    hooks::prune(&ctx.data_dir, &ctx.service, hooks::KEEP_LOGS, &log);
    finished(ctx, ran, &log)
}

/// Runs `before_stop` (if the plan names one) before the process on `port` is stopped;
/// best effort: a failure is logged, and the process is stopped all the same.
pub(super) async fn before_stop(ctx: &SlotCtx, launch: &Launch, port: u16) {
    let Some((ran, log)) = run(ctx, launch, port, Hook::BeforeStop).await else {
        return;
    };
    if let Err(e) = finished(ctx, ran, &log) {
        tracing::warn!(
            service = ctx.service,
            slot = ctx.slot.as_str(),
            release = ctx.version(),
            log = %log.display(),
            error = e,
            "before_stop hook failed; stopping the slot anyway"
        );
    }
}

/// Records a hook's run; logs and returns its failure. Its last lines may hold the
/// slot's secret values, like anything else it prints: both are masked.
fn finished(ctx: &SlotCtx, ran: Ran, log: &std::path::Path) -> Result<(), String> {
    let Ran { mut report, result } = ran;
    report.outcome = ctx.mask(&report.outcome);
    let result = result.map_err(|e| ctx.mask(&e));
    let hook = report.hook.clone();
    let ms = report.duration_ms;
    ctx.record_hook(report, log);
    match &result {
        Ok(()) => tracing::info!(
            service = ctx.service,
            slot = ctx.slot.as_str(),
            release = ctx.version(),
            hook,
            ms,
            "hook passed"
        ),
        Err(e) if hook != Hook::BeforeStop.name() => tracing::warn!(
            service = ctx.service,
            slot = ctx.slot.as_str(),
            release = ctx.version(),
            log = %log.display(),
            error = e,
            "hook failed"
        ),
        Err(_) => {}
    }
    result
}
