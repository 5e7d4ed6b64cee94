//! Item 2: a crash-loop storm beside a healthy canary. `n` `always`
//! executables fail one second after every start, for two minutes, under
//! SPEC 3's back-off (immediate, then 1 s doubling up to 300 s); a canary
//! deployment that runs well exits every 10 s (at each multiple of 10 s of
//! host uptime) and must be restarted at once each time.
//!
//! berth runs with `backoff_reset_after_secs = 5`, so that the canary's 10 s
//! runs count as good ones (its restarts are immediate) while the storm's
//! 1 s runs never do. The canary is timed first alone, then during the
//! storm: die → start, from the engine's events.
//!
//! Measured besides: berth's resident memory and CPU every second (also in
//! `storm.csv`); each storm restart's lateness, actual minus due (die →
//! start minus the scheduled back-off; negative is early, a failure), and
//! berth's part of it from its trace; and whether berth's restart counts
//! (`state.json`) equal the engine's history (`start` events − 1).

use std::fmt::Write as _;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::berth::{deployment, Berth};
use crate::engine::{times, Containers, Event};
use crate::mqtt::Broker;
use crate::report::{dist, mb, ms, p50_p99, Row};
use crate::restart::traced;
use crate::sys::{self, unix_nanos};
use crate::Ctx;

/// The wait before restart `k` (0 = the first after a good run), as SPEC 6
/// and `Options::new` set it: immediate, then 1 s, doubling, at most 300 s.
fn scheduled_ms(k: usize) -> f64 {
    if k == 0 {
        0.0
    } else {
        (1000.0 * 2f64.powi(k as i32 - 1)).min(300_000.0)
    }
}

/// Exits 1 at the next multiple of 10 s of host uptime (at least 1 s away).
const CANARY: &str = "sleep $(awk '{ s = 10 - ($1 % 10); if (s < 1) s += 10; printf \"%.3f\", s }' /proc/uptime); exit 1";

/// die → start of the canary, for every die in [from, to).
fn canary_restarts(ev: &[Event], name: &str, from: i64, to: i64) -> Vec<f64> {
    let starts = times(ev, name, "start");
    times(ev, name, "die")
        .into_iter()
        .filter(|d| *d >= from && *d < to)
        .filter_map(|d| {
            starts
                .iter()
                .find(|s| **s > d)
                .map(|s| (s - d) as f64 / 1e6)
        })
        .collect()
}

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = if ctx.quick { 20 } else { 100 };
    let calm = if ctx.quick { 1 } else { 5 };
    let duration = Duration::from_secs(if ctx.quick { 25 } else { 120 });
    let dir = ctx.subdir(if ctx.loaded { "storm-load" } else { "storm" })?;
    let device = format!("{}-s{}", ctx.run_id, if ctx.loaded { "l" } else { "" });
    let broker = Broker::start(&dir)?;
    let mut options = ctx.berth_options(&device, broker.port(), &ctx.engine.url());
    options.backoff_reset_after_secs = 5;
    let mut berth = Berth::new(&ctx.berth_bin, &dir, options)?;
    let _containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    berth.write_deployment(
        "canary",
        &deployment("canary", "always", &[("app", CANARY)]),
    )?;
    let canary = berth.container_name("canary", "main", "app");

    // The canary alone.
    let t0 = unix_nanos(berth.start()?);
    sys::wait_until(
        "the canary's restarts without a storm",
        Duration::from_secs(15 + 12 * calm as u64),
        Duration::from_millis(200),
        || {
            berth.check()?;
            ctx.events.check()?;
            Ok(canary_restarts(&ctx.events.since(t0), &canary, t0, i64::MAX).len() >= calm)
        },
    )?;

    // The storm.
    for i in 0..n {
        let id = format!("x{i:03}");
        berth.write_deployment(
            &id,
            &deployment(&id, "always", &[("app", "sleep 1; exit 1")]),
        )?;
    }
    let storm_began = unix_nanos(std::time::SystemTime::now());
    let pid = berth.pid()?;
    let started = Instant::now();
    let mut samples = vec![sys::sample(pid)?];
    let mut csv = String::from("seconds,rss_kb,cpu_percent_of_a_core\n");
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(1));
        berth.check()?;
        ctx.events.check()?;
        let s = sys::sample(pid)?;
        let cpu = sys::cpu_percent(samples.last().expect("a sample"), &s);
        let _ = writeln!(
            csv,
            "{:.1},{},{cpu:.2}",
            started.elapsed().as_secs_f64(),
            s.rss_kb
        );
        samples.push(s);
    }
    let storm_ended = unix_nanos(std::time::SystemTime::now());
    berth.stop()?;
    // The last events reach the stream.
    std::thread::sleep(Duration::from_secs(3));
    fs::write(dir.join("storm.csv"), csv).context("cannot write storm.csv")?;

    let state = berth.state()?;
    let ev = ctx.events.since(t0);
    let trace = berth.trace();
    let quiet_canary = canary_restarts(&ev, &canary, t0, storm_began);
    // From 5 s in: the storm is under way.
    let storm_canary = canary_restarts(&ev, &canary, storm_began + 5_000_000_000, storm_ended);
    let (mut matching, mut restarts, mut mismatches) = (0, 0, Vec::new());
    let (mut lateness, mut berth_late, mut engine_work) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let id = format!("x{i:03}");
        let name = berth.container_name(&id, "main", "app");
        let key = format!("{id}/main/app");
        let starts = times(&ev, &name, "start");
        let dies = times(&ev, &name, "die");
        let engine_restarts = starts.len().saturating_sub(1);
        let counted = state["executables"][&key]["restart_count"].as_u64();
        restarts += engine_restarts;
        if counted == Some(engine_restarts as u64) {
            matching += 1;
        } else {
            mismatches.push(format!(
                "{key}: berth {counted:?}, engine {engine_restarts}"
            ));
        }
        for (k, die) in dies.iter().enumerate() {
            let Some(next) = starts.iter().find(|s| **s > *die) else {
                break;
            };
            let scheduled = scheduled_ms(k);
            lateness.push((next - die) as f64 / 1e6 - scheduled);
            if let (Some(received), Some(requested)) = traced(&trace, &key, *die, *next) {
                berth_late.push((requested - received) as f64 / 1e6 - scheduled);
                engine_work.push((next - requested) as f64 / 1e6);
            }
        }
    }
    if !mismatches.is_empty() {
        fs::write(dir.join("count-mismatches.txt"), mismatches.join("\n"))?;
    }

    let first = samples[0];
    let last = *samples.last().expect("a sample");
    let max_rss = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);
    let mean_cpu = sys::cpu_percent(&first, &last);
    let peak_cpu = samples
        .windows(2)
        .map(|w| sys::cpu_percent(&w[0], &w[1]))
        .fold(0.0, f64::max);
    let secs = duration.as_secs();
    let mut rows = vec![Row::new(
        2,
        format!("crash-loop storm: {n} executables failing 1 s after each start, {secs} s, SPEC back-off"),
    )
    .berth(format!("{restarts} restarts"))];
    match (dist(&storm_canary), dist(&quiet_canary)) {
        (Some(s), Some(q)) => {
            let r50 = s.p50 / q.p50;
            rows.push(
                Row::new(2, "healthy canary beside the storm: die → start, p50 / p99")
                    .berth(format!("{} (n = {})", p50_p99(&s), s.n))
                    .other(format!(
                        "{} (n = {}, the canary alone before)",
                        p50_p99(&q),
                        q.n
                    ))
                    .ratio(format!("{r50:.2} / {:.2}", s.p99 / q.p99))
                    .target("p50 ≤ 1.2", r50 <= 1.2),
            );
        }
        _ => rows.push(
            Row::new(2, "healthy canary beside the storm")
                .berth(format!(
                    "{} restarts during the storm, {} alone",
                    storm_canary.len(),
                    quiet_canary.len()
                ))
                .target("p50 ≤ 1.2", false),
        ),
    }
    match dist(&lateness) {
        Some(d) => {
            let min = lateness.iter().copied().fold(f64::INFINITY, f64::min);
            // 1 ms for the two ends of a timer on different clocks.
            let early = lateness.iter().filter(|l| **l < -1.0).count();
            rows.push(
                Row::new(2, "back-off lateness, actual − due (die → start minus the back-off), p50 / p99 / min")
                    .berth(format!("{} / {} / {} (n = {})", ms(d.p50), ms(d.p99), ms(min), d.n)),
            );
            rows.push(
                Row::new(2, "restarts earlier than their back-off (lateness < −1 ms)")
                    .berth(format!("{early}/{}", d.n))
                    .target("none", early == 0),
            );
        }
        None => rows.push(
            Row::new(2, "back-off lateness")
                .berth("no restarts")
                .target("restarts", false),
        ),
    }
    for (label, values) in [
        (
            "… berth's part: die received → start request, minus the back-off, p50 / p99 / max",
            &berth_late,
        ),
        (
            "… the engine's part: start request → `start`, p50 / p99 / max",
            &engine_work,
        ),
    ] {
        if let Some(d) = dist(values) {
            rows.push(Row::new(2, label).berth(format!(
                "{} / {} / {}",
                ms(d.p50),
                ms(d.p99),
                ms(d.max)
            )));
        }
    }
    rows.extend([
        Row::new(
            2,
            "berth resident memory during the storm: max VmRSS / VmHWM",
        )
        .berth(format!("{} / {}", mb(max_rss), mb(last.hwm_kb))),
        Row::new(2, "berth CPU during the storm: mean / busiest second")
            .berth(format!("{mean_cpu:.2} % / {peak_cpu:.1} % of a core")),
        Row::new(2, "restart counts (state.json) = engine `start` events − 1")
            .berth(format!("{matching}/{n} executables match"))
            .target("all", matching == n),
    ]);
    let warnings = berth.warnings();
    if warnings > 0 {
        rows.push(Row::new(2, "berth WARN/ERROR log lines (storm)").berth(warnings.to_string()));
    }
    Ok(rows)
}
