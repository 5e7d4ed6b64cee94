//! Item 5 of the issue: a crash-loop storm. 100 `always` executables that
//! fail one second after every start, for two minutes, under SPEC 3's
//! back-off (immediate, then 1 s doubling up to 300 s). Measured: berth's
//! resident memory and CPU every second (also written to `storm.csv`);
//! whether every restart waited at least its scheduled back-off; and whether
//! berth's restart counts (`state.json`) equal the engine's history (its
//! `start` events, minus the first, per container).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::berth::{deployment, Berth};
use crate::engine::{times, Containers};
use crate::mqtt::Broker;
use crate::report::{dist, mb, ms, Row};
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

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = if ctx.quick { 20 } else { 100 };
    let duration = Duration::from_secs(if ctx.quick { 30 } else { 120 });
    let dir = ctx.subdir("storm")?;
    let device = format!("{}-s", ctx.run_id);
    let broker = Broker::start(&dir)?;
    let mut berth = Berth::new(
        &ctx.berth_bin,
        &dir,
        ctx.berth_options(&device, broker.port(), &ctx.engine.url()),
    )?;
    let _containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    for i in 0..n {
        let id = format!("x{i:03}");
        berth.write_deployment(
            &id,
            &deployment(&id, "always", &[("app", "sleep 1; exit 1")]),
        )?;
    }

    let t0 = unix_nanos(berth.start()?);
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
    berth.stop()?;
    // The last events reach the stream.
    std::thread::sleep(Duration::from_secs(3));
    fs::write(dir.join("storm.csv"), csv).context("cannot write storm.csv")?;

    let state = berth.state()?;
    let ev = ctx.events.since(t0);
    let mut requests: HashMap<String, Vec<i64>> = HashMap::new();
    for line in berth.log() {
        if line.message == "start request" {
            requests
                .entry(line.field("container").to_owned())
                .or_default()
                .push(unix_nanos(line.at));
        }
    }
    let (mut matching, mut restarts, mut mismatches) = (0, 0, Vec::new());
    let (mut held, mut waited, mut lateness) = (0, 0, Vec::new());
    // Split into berth's part (die → its start request, minus the back-off)
    // and the engine's (start request → `start` event).
    let (mut berth_late, mut engine_work) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = berth.container_name(&format!("x{i:03}"), "main", "app");
        let starts = times(&ev, &name, "start");
        let dies = times(&ev, &name, "die");
        let engine_restarts = starts.len().saturating_sub(1);
        let key = format!("x{i:03}/main/app");
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
            let gap = (next - die) as f64 / 1e6;
            let scheduled = scheduled_ms(k);
            waited += 1;
            // 1 ms for the two ends of a timer on different clocks.
            if gap >= scheduled - 1.0 {
                held += 1;
            }
            lateness.push(gap - scheduled);
            let request = requests
                .get(&name)
                .and_then(|r| r.iter().find(|t| **t >= *die && **t <= *next));
            if let Some(request) = request {
                berth_late.push((request - die) as f64 / 1e6 - scheduled);
                engine_work.push((next - request) as f64 / 1e6);
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
    let mut rows = vec![
        Row::new(5, format!("crash-loop storm: {n} executables failing 1 s after each start, {secs} s, SPEC back-off"))
            .berth(format!("{restarts} restarts")),
        Row::new(5, "berth resident memory during the storm: max VmRSS / VmHWM")
            .berth(format!("{} / {}", mb(max_rss), mb(last.hwm_kb)))
            .target("≤ 8 MB (item 4's)", max_rss <= 8 * 1024),
        Row::new(5, "berth CPU during the storm: mean / busiest second")
            .berth(format!("{mean_cpu:.2} % / {peak_cpu:.1} % of a core")),
        Row::new(5, "restart counts (state.json) = engine `start` events − 1")
            .berth(format!("{matching}/{n} executables match"))
            .target("all", matching == n),
        Row::new(5, "back-off holds: restarts that waited at least their scheduled delay")
            .berth(format!("{held}/{waited}"))
            .target("all", held == waited && waited > 0),
    ];
    for (label, values) in [
        (
            "die → start minus the scheduled back-off, p50 / p99 / max",
            &lateness,
        ),
        (
            "… berth's part: die → start request minus the back-off",
            &berth_late,
        ),
        (
            "… the engine's part: start request → `start` event",
            &engine_work,
        ),
    ] {
        if let Some(d) = dist(values) {
            rows.push(Row::new(5, label).berth(format!(
                "{} / {} / {}",
                ms(d.p50),
                ms(d.p99),
                ms(d.max)
            )));
        }
    }
    let warnings = berth.warnings();
    if warnings > 0 {
        rows.push(Row::new(5, "berth WARN/ERROR log lines").berth(warnings.to_string()));
    }
    Ok(rows)
}
