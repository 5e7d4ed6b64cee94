//! Item 4: recovery after the engine restarts, and after a reboot. `n`
//! `always` executables under berth, and `n` `--restart always` containers
//! under the engine, each side on an engine holding only its own. Every
//! figure is timed from the spawn of the restarted `dockerd` to the `start`
//! event of the last container, so both sides include the engine's own cold
//! start:
//!
//! - engine restart: `dockerd` stopped (SIGTERM, which stops every
//!   container) and started again. berth keeps running and restores its
//!   containers once the engine answers; the engine restores its own.
//! - reboot (berth's side only; for the engine a reboot is the same as its
//!   restart): berth stopped too, a new boot id written, `dockerd` started,
//!   and berth started once the engine answers, as its unit (after
//!   `docker.service`) would be.
//!
//! The machine's engine is shared with other work and must not be
//! restarted, so both run against a second `dockerd` of the bench's own, in
//! its own network namespace (see `engine::Dockerd`), loaded with the test
//! image, which berth reaches through `[docker] host`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};

use crate::berth::{deployment, Berth};
use crate::engine::{all_started, Containers, Dockerd, Engine, Events, IMAGE, LONG_RUNNING};
use crate::mqtt::Broker;
use crate::report::{secs, Row};
use crate::sys::{self, unix_nanos};
use crate::Ctx;

const WAIT: Duration = Duration::from_secs(300);

fn host_docker0() -> bool {
    Path::new("/sys/class/net/docker0").exists()
}

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n: usize = if ctx.quick { 10 } else { 100 };
    let tag = if ctx.loaded { "l" } else { "q" };
    let dir = ctx.subdir(if ctx.loaded { "reboot-load" } else { "reboot" })?;
    let docker0_before = host_docker0();
    let mut dockerd = Dockerd::new(&ctx.dir.join(format!("dockerd-{tag}")))?;
    dockerd.start()?;
    let engine = dockerd.engine();
    sys::pipe(
        ctx.engine.command().args(["save", IMAGE]),
        engine.command().arg("load"),
        Duration::from_secs(180),
    )?;
    let prefixes = vec![ctx.run_id.clone(), format!("berth.{}", ctx.run_id)];
    let events_log = dir.join("events.log");
    let mut events = Events::watch(&engine, prefixes.clone(), SystemTime::now(), &events_log)?;

    // berth.
    let broker = Broker::start(&dir)?;
    let device = format!("{}-b{tag}", ctx.run_id);
    let mut berth = Berth::new(
        &ctx.berth_bin,
        &dir,
        ctx.berth_options(&device, broker.port(), &dockerd.host()),
    )?;
    let berth_containers = Containers::guard(&engine, &berth.container_prefix());
    let mut names = BTreeSet::new();
    for i in 0..n {
        let id = format!("b{i:03}");
        berth.write_deployment(&id, &deployment(&id, "always", &[("app", LONG_RUNNING)]))?;
        names.insert(berth.container_name(&id, "main", "app"));
    }
    let t = unix_nanos(berth.start()?);
    wait_started(
        Some(&mut berth),
        &events,
        &names,
        t,
        "berth to start its containers",
    )?;

    // The engine restarts under a running berth.
    drop(events);
    dockerd.stop()?;
    let (spawned, _) = dockerd.start()?;
    let t0 = unix_nanos(spawned);
    events = Events::watch(&engine, prefixes.clone(), spawned, &events_log)?;
    let done = wait_started(
        Some(&mut berth),
        &events,
        &names,
        t0,
        "berth to restore its containers after the engine restarted",
    )?;
    let berth_engine_restart = (done - t0) as f64 / 1e9;

    // A reboot: berth and the engine down, a new boot.
    berth.stop()?;
    drop(events);
    dockerd.stop()?;
    berth.set_boot_id(&format!("bench-reboot-{}", unix_nanos(SystemTime::now())))?;
    let (spawned, _) = dockerd.start()?;
    let t0 = unix_nanos(spawned);
    events = Events::watch(&engine, prefixes.clone(), spawned, &events_log)?;
    berth.start()?;
    let done = wait_started(
        Some(&mut berth),
        &events,
        &names,
        t0,
        "berth to restore its containers after the reboot",
    )?;
    let berth_reboot = (done - t0) as f64 / 1e9;
    berth.stop()?;
    let state = berth.state()?;
    let counted = names
        .iter()
        .filter(|name| {
            let id = name.split('.').nth(2).unwrap_or("");
            state["executables"][format!("{id}/main/app")]["restart_count"] == 2
        })
        .count();
    drop(berth_containers);

    // The engine's own, on an engine holding only them.
    let prefix = format!("{}-{tag}-k-", ctx.run_id);
    let engine_containers = Containers::guard(&engine, &prefix);
    let label = ctx.label();
    let engine_names: BTreeSet<String> = (0..n).map(|i| format!("{prefix}{i:03}")).collect();
    let jobs: Vec<(String, Option<&str>, String)> = engine_names
        .iter()
        .map(|name| (name.clone(), Some("always"), LONG_RUNNING.to_owned()))
        .collect();
    crate::engine::run_parallel(&engine, &jobs, &label, &[], 4)?;
    wait_running(&engine, &prefix, n)?;
    drop(events);
    dockerd.stop()?;
    let (spawned, ready) = dockerd.start()?;
    let t0 = unix_nanos(spawned);
    events = Events::watch(&engine, prefixes, spawned, &events_log)?;
    let done = wait_started(
        None,
        &events,
        &engine_names,
        t0,
        "the engine to restore its containers",
    )?;
    let engine_secs = (done - t0) as f64 / 1e9;
    drop(engine_containers);
    drop(events);
    dockerd.destroy()?;
    let docker0_after = host_docker0();

    Ok(vec![
        Row::new(
            4,
            format!("engine restart, {n} `always` executables: dockerd spawned → all running again"),
        )
        .berth(format!("{} (berth running throughout)", secs(berth_engine_restart)))
        .other(format!("{} (`--restart always`)", secs(engine_secs)))
        .ratio(format!("{:.2}", berth_engine_restart / engine_secs)),
        Row::new(
            4,
            "reboot (new boot id; berth started once the engine answers): dockerd spawned → all running",
        )
        .berth(secs(berth_reboot))
        .other(format!("{} (the engine restart above)", secs(engine_secs)))
        .ratio(format!("{:.2}", berth_reboot / engine_secs)),
        Row::new(4, "… of which the engine's dockerd spawn → API answering")
            .other(secs(ready.as_secs_f64())),
        Row::new(
            4,
            "restart count after the engine restart and the reboot = 2 for each executable (SPEC 6)",
        )
        .berth(format!("{counted}/{n}"))
        .target("all", counted == n),
        Row::new(4, "the host's docker0 is still there after the bench's dockerd")
            .berth(if docker0_after { "yes" } else { "no" })
            .target("yes", docker0_after || !docker0_before),
    ])
}

/// Waits for the first `start` of each of `names` at or after `after`.
fn wait_started(
    mut berth: Option<&mut Berth>,
    events: &Events,
    names: &BTreeSet<String>,
    after: i64,
    what: &str,
) -> Result<i64> {
    let mut done = None;
    sys::wait_until(what, WAIT, Duration::from_millis(50), || {
        if let Some(berth) = berth.as_deref_mut() {
            berth.check()?;
        }
        events.check()?;
        done = all_started(&events.since(after), names, after);
        Ok(done.is_some())
    })?;
    match done {
        Some(t) => Ok(t),
        None => bail!("{what}: no start events"),
    }
}

fn wait_running(engine: &Engine, prefix: &str, want: usize) -> Result<()> {
    sys::wait_until(
        &format!("{want} running containers {prefix}*"),
        WAIT,
        Duration::from_millis(100),
        || Ok(engine.running(prefix)? == want),
    )
}
