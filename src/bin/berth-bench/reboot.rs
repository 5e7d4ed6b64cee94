//! Item 6 of the issue: recovery after a reboot. 100 `always` executables.
//! berth: stop berth, `docker kill` its containers, write a new boot id,
//! start berth, until every container runs again. The engine: the same
//! number of `--restart always` containers, and a restart of the daemon,
//! which starts them again itself.
//!
//! The machine's engine is shared with other work and must not be restarted,
//! so both run against a second `dockerd` of the bench's own (own socket,
//! data root, exec root, containerd and network namespace; no bridge, no
//! iptables), loaded with the test image, which berth reaches through
//! `[docker] host`.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};

use crate::berth::{deployment, Berth};
use crate::engine::{all_started, Containers, Dockerd, Engine, Events, IMAGE, LONG_RUNNING};
use crate::mqtt::Broker;
use crate::report::{secs, Row};
use crate::sys::{self, unix_nanos};
use crate::Ctx;

const WAIT: Duration = Duration::from_secs(300);

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n: usize = if ctx.quick { 20 } else { 100 };
    let dir = ctx.subdir("reboot")?;
    let mut dockerd = Dockerd::new(&ctx.dir.join("dockerd"))?;
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
    let device = format!("{}-b", ctx.run_id);
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
        &mut berth,
        &events,
        &names,
        t,
        "berth to start its containers",
    )?;
    berth.stop()?;
    engine.kill(berth_containers.prefix())?;
    wait_running(&engine, berth_containers.prefix(), 0)?;
    berth.set_boot_id(&format!("bench-reboot-{}", unix_nanos(SystemTime::now())))?;
    let t0 = unix_nanos(berth.start()?);
    let done = wait_started(
        &mut berth,
        &events,
        &names,
        t0,
        "berth to restart its containers after the reboot",
    )?;
    let berth_secs = (done - t0) as f64 / 1e9;
    berth.stop()?;
    let state = berth.state()?;
    let counted_once = names
        .iter()
        .filter(|name| {
            let id = name.split('.').nth(2).unwrap_or("");
            state["executables"][format!("{id}/main/app")]["restart_count"] == 1
        })
        .count();
    drop(berth_containers);

    // The engine's own.
    let prefix = format!("{}-k-", ctx.run_id);
    let engine_containers = Containers::guard(&engine, &prefix);
    let label = ctx.label();
    let engine_names: BTreeSet<String> = (0..n).map(|i| format!("{prefix}{i:03}")).collect();
    // Not measured: created four at a time to save a minute.
    let list: Vec<&String> = engine_names.iter().collect();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = list
            .chunks(n.div_ceil(4))
            .map(|chunk| {
                let (engine, label) = (&engine, &label);
                s.spawn(move || -> Result<()> {
                    for name in chunk {
                        engine.run_detached(name, label, Some("always"), LONG_RUNNING)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a docker run worker panicked"))??;
        }
        Ok(())
    })?;
    wait_running(&engine, &prefix, n)?;
    drop(events);
    dockerd.stop()?;
    let (spawned, ready) = dockerd.start()?;
    let t0 = unix_nanos(spawned);
    events = Events::watch(&engine, prefixes, spawned, &events_log)?;
    wait_running(&engine, &prefix, n)?;
    let mut done = None;
    sys::wait_until(
        "the engine's start events",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            events.check()?;
            done = all_started(&events.since(t0), &engine_names, t0);
            Ok(done.is_some())
        },
    )?;
    let engine_secs = (done.unwrap_or(t0) - t0) as f64 / 1e9;
    drop(engine_containers);
    drop(events);
    dockerd.destroy()?;

    Ok(vec![
        Row::new(
            6,
            format!("reboot recovery, {n} `always` executables: start → all running"),
        )
        .berth(format!("{} (berth start)", secs(berth_secs)))
        .other(format!(
            "{} (dockerd start, `--restart always`)",
            secs(engine_secs)
        ))
        .ratio(format!("{:.2}", berth_secs / engine_secs)),
        Row::new(6, "… of which the engine's dockerd start → API answering")
            .other(secs(ready.as_secs_f64())),
        Row::new(
            6,
            "restart count after the reboot = 1 for each executable (SPEC 6)",
        )
        .berth(format!("{counted_once}/{n}"))
        .target("all", counted_once == n),
    ])
}

/// Waits for the first `start` of each of `names` at or after `after`.
fn wait_started(
    berth: &mut Berth,
    events: &Events,
    names: &BTreeSet<String>,
    after: i64,
    what: &str,
) -> Result<i64> {
    let mut done = None;
    sys::wait_until(what, WAIT, Duration::from_millis(50), || {
        berth.check()?;
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
