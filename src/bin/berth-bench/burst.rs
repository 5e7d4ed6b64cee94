//! Item 1, many exits at once: `n` executables that all exit at the same
//! moment (a shared dependency died, a power glitch), under berth (`always`)
//! and, at another moment, the same number under the engine's own
//! `--restart always`; and one lone exit on each side, for what a single
//! restart costs on the machine at that time.
//!
//! Every container waits for the base time in `/sync/base` (see `restart`)
//! and exits once at its side's moment: berth's single, the engine's single,
//! berth's burst, the engine's burst, far enough apart that one side's burst
//! is over before the other's starts. Timed from the first `die` of a burst
//! to the last container's next `start`.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use crate::berth::{deployment_with, Berth};
use crate::engine::{first_after, Containers};
use crate::mqtt::Broker;
use crate::report::{ms, Row};
use crate::restart::{exits_at, restart_of, set_base, sync_dir};
use crate::sys;
use crate::Ctx;

/// The first die and the last restart of `names` after `after`; None until
/// every one has restarted.
fn burst_span(ev: &[crate::engine::Event], names: &[String], after: i64) -> Option<(i64, i64)> {
    let mut first_die = i64::MAX;
    let mut last_start = i64::MIN;
    for name in names {
        let (die, start) = restart_of(ev, name, after, 0)?;
        first_die = first_die.min(die);
        last_start = last_start.max(start);
    }
    Some((first_die, last_start))
}

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = if ctx.quick { 10 } else { 50 };
    let dir = ctx.subdir(if ctx.loaded { "burst-load" } else { "burst" })?;
    let sync = sync_dir(&dir)?;
    let tag = if ctx.loaded { "l" } else { "q" };
    let device = format!("{}-b{tag}", ctx.run_id);
    let engine_prefix = format!("{}-{tag}-x-", ctx.run_id);
    let broker = Broker::start(&dir)?;
    let _engine_containers = Containers::guard(&ctx.engine, &engine_prefix);
    let mut berth = Berth::new(
        &ctx.berth_bin,
        &dir,
        ctx.berth_options(&device, broker.port(), &ctx.engine.url()),
    )?;
    let _berth_containers = Containers::guard(&ctx.engine, &berth.container_prefix());

    // Moments after the base: singles, then each burst with room to finish.
    let room = 10.0 + 0.5 * n as f64;
    let (berth_single, engine_single, berth_burst) = (0.0, 3.0, 6.0);
    let engine_burst = berth_burst + room;
    let id = |i: usize| format!("x{i:03}");
    berth.write_deployment(
        "single",
        &deployment_with(
            "single",
            "always",
            &[("app", &exits_at(&[berth_single]))],
            Some(&sync),
        ),
    )?;
    for i in 0..n {
        berth.write_deployment(
            &id(i),
            &deployment_with(
                &id(i),
                "always",
                &[("app", &exits_at(&[berth_burst]))],
                Some(&sync),
            ),
        )?;
    }
    let began = sys::unix_nanos(SystemTime::now());
    berth.start()?;
    let label = ctx.label();
    let volume = format!("{}:/sync:ro", sync.display());
    let engine_single_name = format!("{engine_prefix}single");
    let mut jobs = vec![(
        engine_single_name.clone(),
        Some("always"),
        exits_at(&[engine_single]),
    )];
    let engine_names: Vec<String> = (0..n).map(|i| format!("{engine_prefix}{i:03}")).collect();
    jobs.extend(
        engine_names
            .iter()
            .map(|name| (name.clone(), Some("always"), exits_at(&[engine_burst]))),
    );
    crate::engine::run_parallel(&ctx.engine, &jobs, &label, &[&volume], 4)?;
    let berth_single_name = berth.container_name("single", "main", "app");
    let berth_names: Vec<String> = (0..n)
        .map(|i| berth.container_name(&id(i), "main", "app"))
        .collect();
    sys::wait_until(
        "every container of the burst benchmark to run",
        Duration::from_secs(if ctx.quick { 120 } else { 300 }),
        Duration::from_millis(250),
        || {
            berth.check()?;
            let list = ctx.engine.list()?;
            let running = |name: &String| list.iter().any(|c| &c.name == name && c.running);
            Ok(berth_names.iter().chain(&engine_names).all(running)
                && running(&berth_single_name)
                && running(&engine_single_name))
        },
    )?;
    let (clock, base) = set_base(&sync, 3.0)?;
    let t0 = clock.wall_nanos_at(base) - 1_000_000_000;

    let deadline = Instant::now()
        + Duration::from_secs_f64(3.0 + engine_burst + room + if ctx.quick { 30.0 } else { 60.0 });
    let mut spans = (None, None);
    sys::wait_until(
        "both bursts to be restarted",
        deadline.saturating_duration_since(Instant::now()),
        Duration::from_millis(250),
        || {
            berth.check()?;
            ctx.events.check()?;
            let ev = ctx.events.since(began);
            spans = (
                burst_span(&ev, &berth_names, t0),
                burst_span(&ev, &engine_names, t0),
            );
            Ok(spans.0.is_some()
                && spans.1.is_some()
                && first_after(&ev, &engine_single_name, "die", t0).is_some())
        },
    )?;
    berth.stop()?;
    let ev = ctx.events.since(began);
    let single = |name: &str| restart_of(&ev, name, t0, 0).map(|(d, s)| (s - d) as f64 / 1e6);
    let (Some(b), Some(e)) = spans else {
        anyhow::bail!("a burst was not restarted");
    };
    let b_ms = (b.1 - b.0) as f64 / 1e6;
    let e_ms = (e.1 - e.0) as f64 / 1e6;
    let mut rows = vec![Row::new(
        1,
        format!("burst: {n} executables exit at once: first `die` → all {n} started again"),
    )
    .berth(ms(b_ms))
    .other(format!("{} (engine `--restart always`)", ms(e_ms)))
    .ratio(format!("{:.2}", b_ms / e_ms))];
    if let (Some(bs), Some(es)) = (single(&berth_single_name), single(&engine_single_name)) {
        rows.push(
            Row::new(1, "… one lone exit at the same time: die → start")
                .berth(ms(bs))
                .other(format!("{} (engine)", ms(es))),
        );
        rows.push(
            Row::new(1, "… the burst against one lone restart (burst ÷ single)")
                .berth(format!("{:.1}×", b_ms / bs))
                .other(format!("{:.1}× (engine)", e_ms / es)),
        );
    }
    let warnings = berth.warnings();
    if warnings > 0 {
        rows.push(Row::new(1, "berth WARN/ERROR log lines (burst)").berth(warnings.to_string()));
    }
    Ok(rows)
}
