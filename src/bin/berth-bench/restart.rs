//! Item 1: how fast a container that exits is started again, under berth
//! (`always`), under the engine's own `--restart always`, and at the floor:
//! a bare start of the same kind of stopped container through the engine's
//! API. Also berth's own share of each restart, from its trace file, and
//! how fast an exit reaches an MQTT subscriber.
//!
//! Four sets of `n` containers from the same image, side by side: berth
//! `always` executables (`rNNN`), engine `--restart always` containers
//! (`-e-NNN`), stopped containers the bench starts through the API
//! (`-f-NNN`), and berth `never` executables (`mNNN`, whose exit is a status
//! change to `Error`, with no restart in the way). Every container waits
//! until the bench writes a base time into a directory they all mount
//! (`/sync/base`, a host uptime, which containers share), then exits at its
//! own moment after it: in each period, berth's first exit, the engine's
//! first exit, the floor's start, the `never` exit, berth's second exit, the
//! engine's second exit, `GAP` apart, so that no two restarts overlap. A
//! container restarted twice stays up.
//!
//! First restarts are immediate under berth and wait 100 ms under the
//! engine (moby's restart manager); second ones wait 200 ms under both:
//! berth runs here with `backoff_initial_ms = 200`, the engine doubles its
//! 100 ms. Those delays are subtracted, on both sides, from the later
//! restarts' figures.
//!
//! Clocks: the engine's event `timeNano` (die, start), berth's trace (die
//! received, start request sent), the bench's API call and the subscriber's
//! arrival stamps are all the host's wall clock.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::api::Api;
use crate::berth::{deployment_with, Berth, TraceLine};
use crate::engine::{first_after, Containers, Event, LONG_RUNNING};
use crate::mqtt::{Broker, Subscriber};
use crate::report::{dist, p50_p99, Dist, Row};
use crate::sys::{self, UptimeClock};
use crate::Ctx;

/// Seconds between two consecutive exits (of any set).
const GAP: f64 = 0.45;
/// Exits per period: see the module's comment.
const SLOTS: usize = 6;
/// berth's back-off in this lane, so that its second restart waits what the
/// engine's does.
pub const BACKOFF_INITIAL_MS: u64 = 200;
/// The engine's first and second restart delays (moby's restart manager:
/// 100 ms, doubling).
const ENGINE_DELAYS_MS: [f64; 2] = [100.0, 200.0];
const BERTH_DELAYS_MS: [f64; 2] = [0.0, BACKOFF_INITIAL_MS as f64];

/// Waits for `/sync/base`, then sleeps until that uptime plus `offset`.
pub fn sleep_until_base_plus(offset: f64) -> String {
    format!(
        "while [ ! -f /sync/base ]; do sleep 1; done; \
         t=$(awk -v o={offset:.3} '{{ printf \"%.3f\", $1 + o }}' /sync/base); \
         sleep $(awk -v t=$t '{{ s = t - $1; if (s < 0) s = 0; printf \"%.3f\", s }}' /proc/uptime)"
    )
}

/// A script that exits 1 at each of `offsets` after the base, one per run,
/// and then runs until stopped. Its run count lives in the container.
pub fn exits_at(offsets: &[f64]) -> String {
    let mut script =
        String::from("c=$(cat /count 2>/dev/null || echo 0); echo $((c + 1)) > /count; ");
    for (k, offset) in offsets.iter().enumerate() {
        script += &format!(
            "if [ $c -eq {k} ]; then {}; exit 1; fi; ",
            sleep_until_base_plus(*offset)
        );
    }
    script + LONG_RUNNING
}

/// A container that exits at once the first time and runs until stopped the
/// next: a stopped container for the floor.
fn stop_at_once() -> String {
    format!(
        "c=$(cat /count 2>/dev/null || echo 0); echo $((c + 1)) > /count; \
         if [ $c -eq 0 ]; then exit 0; fi; {LONG_RUNNING}"
    )
}

/// Writes the base (an uptime `lead` seconds ahead) into the sync dir;
/// returns the clock it was read on and the base.
pub fn set_base(sync: &Path, lead: f64) -> Result<(UptimeClock, f64)> {
    let clock = UptimeClock::now()?;
    let base = clock.uptime + lead;
    let tmp = sync.join(".base");
    fs::write(&tmp, format!("{base:.3}\n")).context("cannot write the base time")?;
    fs::rename(&tmp, sync.join("base")).context("cannot write the base time")?;
    Ok((clock, base))
}

/// A directory the containers mount at `/sync`, empty.
pub fn sync_dir(dir: &Path) -> Result<std::path::PathBuf> {
    let sync = dir.join("sync");
    let _ = fs::remove_dir_all(&sync);
    fs::create_dir_all(&sync).with_context(|| format!("cannot create {}", sync.display()))?;
    Ok(sync)
}

/// The `k`-th die (0-based) after `after` of container `name`, and the
/// first `start` after it.
pub fn restart_of(ev: &[Event], name: &str, after: i64, k: usize) -> Option<(i64, i64)> {
    let die = ev
        .iter()
        .filter(|e| e.name == name && e.action == "die" && e.nanos >= after)
        .nth(k)?
        .nanos;
    let start = first_after(ev, name, "start", die)?;
    Some((die, start))
}

/// berth's trace records of `executable` for a restart between `die` and
/// `start`: the first die received at or after the engine's die, and the
/// first start request after that, before the start.
pub fn traced(
    trace: &[TraceLine],
    executable: &str,
    die: i64,
    start: i64,
) -> (Option<i64>, Option<i64>) {
    let received = trace
        .iter()
        .find(|t| t.kind == "die" && t.executable == executable && t.nanos >= die)
        .map(|t| t.nanos);
    let requested = received.and_then(|r| {
        trace
            .iter()
            .find(|t| {
                t.kind == "start-request"
                    && t.executable == executable
                    && t.nanos >= r
                    && t.nanos <= start
            })
            .map(|t| t.nanos)
    });
    (received, requested)
}

/// berth's `committed` trace record of `executable` between two moments:
/// when its restart's record was on disk.
pub fn committed_between(trace: &[TraceLine], executable: &str, from: i64, to: i64) -> Option<i64> {
    trace
        .iter()
        .find(|t| {
            t.kind == "committed" && t.executable == executable && t.nanos >= from && t.nanos <= to
        })
        .map(|t| t.nanos)
}

/// This disk's `fdatasync` of a small append, as berth's restart log does
/// it, `samples` times (ms): the floor of a durable restart record.
pub fn fdatasync_floor(dir: &Path, samples: usize) -> Result<Vec<f64>> {
    use std::io::Write;
    let path = dir.join("fdatasync-floor");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut took = Vec::with_capacity(samples);
    for _ in 0..samples {
        file.write_all(&[b'x'; 120])?;
        let t = std::time::Instant::now();
        file.sync_data()?;
        took.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(file);
    let _ = fs::remove_file(&path);
    Ok(took)
}

fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = if ctx.quick { 5 } else { 100 };
    let dir = ctx.subdir(if ctx.loaded {
        "restart-load"
    } else {
        "restart"
    })?;
    let sync = sync_dir(&dir)?;
    let device = format!("{}-r{}", ctx.run_id, if ctx.loaded { "l" } else { "" });
    let prefix = format!("{}-{}", ctx.run_id, if ctx.loaded { "l" } else { "q" });
    let (engine_prefix, floor_prefix) = (format!("{prefix}-e-"), format!("{prefix}-f-"));

    let broker = Broker::start(&dir)?;
    let _engine_containers = Containers::guard(&ctx.engine, &engine_prefix);
    let _floor_containers = Containers::guard(&ctx.engine, &floor_prefix);
    let mut options = ctx.berth_options(&device, broker.port(), &ctx.engine.url());
    options.backoff_initial_ms = BACKOFF_INITIAL_MS;
    let mut berth = Berth::new(&ctx.berth_bin, &dir, options)?;
    let _berth_containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    let sub = Subscriber::connect(broker.port(), &berth.topics())?;

    let at = |i: usize, slot: usize| GAP * (SLOTS * i + slot) as f64;
    let r_id = |i: usize| format!("r{i:03}");
    let m_id = |i: usize| format!("m{i:03}");
    for i in 0..n {
        let script = exits_at(&[at(i, 0), at(i, 4)]);
        berth.write_deployment(
            &r_id(i),
            &deployment_with(&r_id(i), "always", &[("app", &script)], Some(&sync)),
        )?;
        let script = exits_at(&[at(i, 3)]);
        berth.write_deployment(
            &m_id(i),
            &deployment_with(&m_id(i), "never", &[("app", &script)], Some(&sync)),
        )?;
    }
    let began = sys::unix_nanos(SystemTime::now());
    berth.start()?;
    let label = ctx.label();
    let volume = format!("{}:/sync:ro", sync.display());
    let engine_name = |i: usize| format!("{engine_prefix}{i:03}");
    let floor_name = |i: usize| format!("{floor_prefix}{i:03}");
    let jobs: Vec<(String, Option<&str>, String)> = (0..n)
        .flat_map(|i| {
            [
                (
                    engine_name(i),
                    Some("always"),
                    exits_at(&[at(i, 1), at(i, 5)]),
                ),
                (floor_name(i), None, stop_at_once()),
            ]
        })
        .collect();
    crate::engine::run_parallel(&ctx.engine, &jobs, &label, &[&volume], 4)?;

    // Everything up (the floor's containers stopped again), then the base.
    let r_names: Vec<String> = (0..n)
        .map(|i| berth.container_name(&r_id(i), "main", "app"))
        .collect();
    let m_names: Vec<String> = (0..n)
        .map(|i| berth.container_name(&m_id(i), "main", "app"))
        .collect();
    sys::wait_until(
        "every container of the restart benchmark to be up",
        Duration::from_secs(if ctx.quick { 120 } else { 600 }),
        Duration::from_millis(250),
        || {
            berth.check()?;
            let list = ctx.engine.list()?;
            let running = |name: &str| list.iter().any(|c| c.name == name && c.running);
            let stopped = |name: &str| list.iter().any(|c| c.name == name && !c.running);
            Ok(r_names.iter().chain(&m_names).all(|c| running(c))
                && (0..n).all(|i| running(&engine_name(i)) && stopped(&floor_name(i))))
        },
    )?;
    let floor_ids: HashMap<String, String> = ctx
        .engine
        .containers(&floor_prefix)?
        .into_iter()
        .map(|c| (c.name, c.id))
        .collect();
    let api = Api::new(&ctx.engine.url())?;
    let lead = 3.0;
    let (clock, base) = set_base(&sync, lead)?;
    let wall = |offset: f64| clock.wall_nanos_at(base + offset);

    // The floor: the bench starts each stopped container at its slot.
    let mut floor_calls = Vec::new();
    for i in 0..n {
        let due = wall(at(i, 2));
        let now = sys::unix_nanos(SystemTime::now());
        if due > now {
            std::thread::sleep(Duration::from_nanos((due - now) as u64));
        }
        if sys::aborting() {
            bail!("interrupted");
        }
        let id = floor_ids
            .get(&floor_name(i))
            .with_context(|| format!("no container {}", floor_name(i)))?;
        floor_calls.push((floor_name(i), api.start_timed(id)?));
        berth.check()?;
    }

    // Every restart and every exit, or the deadline.
    let deadline = Instant::now() + Duration::from_secs(if ctx.quick { 30 } else { 60 });
    loop {
        berth.check()?;
        ctx.events.check()?;
        let ev = ctx.events.since(began);
        let count = |name: &str, action: &str| {
            ev.iter()
                .filter(|e| e.name == name && e.action == action)
                .count()
        };
        let done = (0..n).all(|i| {
            count(&r_names[i], "start") >= 3
                && count(&engine_name(i), "start") >= 3
                && count(&m_names[i], "die") >= 1
        });
        if done || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The documents of the last exits.
    std::thread::sleep(Duration::from_secs(1));
    berth.stop()?;

    let ev = ctx.events.since(began);
    let trace = berth.trace();
    let t0 = wall(0.0) - 1_000_000_000;
    // [first, second] restarts, delays subtracted.
    let mut berth_total: [Vec<f64>; 2] = Default::default();
    let mut engine_total: [Vec<f64>; 2] = Default::default();
    let (mut own, mut delivery, mut engine_work) = (Vec::new(), Vec::new(), Vec::new());
    // The first restarts' own share in two: die received → record durable,
    // record durable → start request.
    let (mut own_write, mut own_rest) = (Vec::new(), Vec::new());
    let mut own_later = Vec::new();
    let mut floor = Vec::new();
    let (mut mqtt_restart, mut mqtt_error) = (Vec::new(), Vec::new());
    for i in 0..n {
        let key = format!("{}/main/app", r_id(i));
        for k in 0..2 {
            if let Some((die, start)) = restart_of(&ev, &r_names[i], t0, k) {
                berth_total[k].push(ms(start - die) - BERTH_DELAYS_MS[k]);
                let (received, requested) = traced(&trace, &key, die, start);
                if let (Some(rc), Some(rq)) = (received, requested) {
                    if k == 0 {
                        own.push(ms(rq - rc));
                        if let Some(c) = committed_between(&trace, &key, rc, rq) {
                            own_write.push(ms(c - rc));
                            own_rest.push(ms(rq - c));
                        }
                        delivery.push(ms(rc - die));
                        engine_work.push(ms(start - rq));
                    } else {
                        own_later.push(ms(rq - rc) - BERTH_DELAYS_MS[k]);
                    }
                }
                if k == 0 {
                    // The first document after the exit that shows it.
                    let topic = berth.topic(&r_id(i));
                    if let Some(at) = sub.with(|msgs| {
                        msgs.iter()
                            .find(|m| {
                                let exe = &m.payload["executables"][0];
                                m.topic == topic
                                    && sys::unix_nanos(m.at) >= die
                                    && (exe["status"] != "Running"
                                        || exe["restart_count"].as_u64().unwrap_or(0) >= 1)
                            })
                            .map(|m| sys::unix_nanos(m.at))
                    }) {
                        mqtt_restart.push(ms(at - die));
                    }
                }
            }
            if let Some((die, start)) = restart_of(&ev, &engine_name(i), t0, k) {
                engine_total[k].push(ms(start - die) - ENGINE_DELAYS_MS[k]);
            }
        }
        if let Some(die) = first_after(&ev, &m_names[i], "die", t0) {
            let topic = berth.topic(&m_id(i));
            if let Some(at) = sub.with(|msgs| {
                msgs.iter()
                    .find(|m| {
                        m.topic == topic
                            && sys::unix_nanos(m.at) >= die
                            && m.payload["executables"][0]["status"] == "Error"
                    })
                    .map(|m| sys::unix_nanos(m.at))
            }) {
                mqtt_error.push(ms(at - die));
            }
        }
    }
    for (name, called) in &floor_calls {
        if let Some(start) = first_after(&ev, name, "start", *called) {
            floor.push(ms(start - called));
        }
    }

    let mut rows = Vec::new();
    let observed = |v: &Vec<f64>| format!("{}/{n}", v.len());
    let ratio = |a: &Dist, b: &Dist| (a.p50 / b.p50, a.p99 / b.p99);
    let (b1, e1, b2, e2, f) = (
        dist(&berth_total[0]),
        dist(&engine_total[0]),
        dist(&berth_total[1]),
        dist(&engine_total[1]),
        dist(&floor),
    );
    match (&b1, &f) {
        (Some(b), Some(f)) => {
            let (r50, r99) = ratio(b, f);
            rows.push(
                Row::new(
                    1,
                    "restart reaction, die → start, first restarts, p50 / p99",
                )
                .berth(format!("{} (n = {})", p50_p99(b), b.n))
                .other(format!(
                    "{} (floor: a bare API start → `start`, n = {})",
                    p50_p99(f),
                    f.n
                ))
                .ratio(format!("{r50:.3} / {r99:.3}"))
                .target("≤ 1.05", r50 <= 1.05 && r99 <= 1.05),
            );
        }
        _ => rows.push(
            Row::new(1, "restart reaction against the floor")
                .berth(format!(
                    "berth {}, floor {}",
                    observed(&berth_total[0]),
                    observed(&floor)
                ))
                .target("all restarts observed", false),
        ),
    }
    for (label, b, e) in [
        ("first restarts (engine's 100 ms subtracted)", &b1, &e1),
        (
            "second restarts, 200 ms back-off subtracted on both sides",
            &b2,
            &e2,
        ),
    ] {
        if let (Some(b), Some(e)) = (b, e) {
            let (r50, r99) = ratio(b, e);
            rows.push(
                Row::new(
                    1,
                    format!("… against the engine's `--restart always`, {label}"),
                )
                .berth(format!("{} (n = {})", p50_p99(b), b.n))
                .other(format!("{} (n = {})", p50_p99(e), e.n))
                .ratio(format!("{r50:.3} / {r99:.3}")),
            );
        }
    }
    let all_observed = [
        &berth_total[0],
        &berth_total[1],
        &engine_total[0],
        &engine_total[1],
        &floor,
    ]
    .iter()
    .all(|v| v.len() == n);
    if !all_observed {
        rows.push(
            Row::new(
                1,
                "restarts observed: berth first / second, engine first / second, floor",
            )
            .berth(format!(
                "{} / {}, {} / {}, {}",
                observed(&berth_total[0]),
                observed(&berth_total[1]),
                observed(&engine_total[0]),
                observed(&engine_total[1]),
                observed(&floor)
            ))
            .target(format!("{n} each"), false),
        );
    }
    let own_target = if ctx.loaded { 5.0 } else { 2.0 };
    match dist(&own) {
        Some(d) => rows.push(
            Row::new(
                1,
                "berth's own share (trace): die received → start request sent, first restarts, p50 / p99",
            )
            .berth(format!("{} (n = {})", p50_p99(&d), d.n))
            .target(format!("p99 ≤ {own_target} ms"), d.p99 <= own_target),
        ),
        None if !berth.traces() => rows.push(
            Row::new(1, "berth's own share (trace)")
                .berth("not measured: this berth writes no trace file"),
        ),
        None => rows.push(
            Row::new(1, "berth's own share (trace)")
                .berth("no die / start-request trace records")
                .target(format!("p99 ≤ {own_target} ms"), false),
        ),
    }
    if let (Some(w), Some(r)) = (dist(&own_write), dist(&own_rest)) {
        rows.push(
            Row::new(
                1,
                "… of which: die received → restart record durable (written while the container ran, or one `fdatasync` at the exit), p50 / p99",
            )
            .berth(p50_p99(&w)),
        );
        rows.push(
            Row::new(
                1,
                "… of which: record durable → start request sent, p50 / p99",
            )
            .berth(p50_p99(&r))
            .target(format!("p99 ≤ {own_target} ms"), r.p99 <= own_target),
        );
    }
    match fdatasync_floor(&dir, if ctx.quick { 20 } else { 200 }) {
        Ok(took) => {
            if let Some(d) = dist(&took) {
                rows.push(
                    Row::new(
                        1,
                        "this disk: one `fdatasync` of a small append (what a record written at the exit adds), p50 / p99",
                    )
                    .other(format!("floor: {}", p50_p99(&d))),
                );
            }
        }
        Err(e) => eprintln!("berth-bench: fdatasync floor: {e:#}"),
    }
    if let Some(d) = dist(&own_later) {
        rows.push(
            Row::new(
                1,
                "… second restarts, its 200 ms back-off subtracted (timer precision included), p50 / p99",
            )
            .berth(p50_p99(&d)),
        );
    }
    if let Some(d) = dist(&delivery) {
        rows.push(
            Row::new(
                1,
                "engine `die` → berth received it (event delivery), p50 / p99",
            )
            .berth(p50_p99(&d)),
        );
    }
    if let Some(d) = dist(&engine_work) {
        rows.push(
            Row::new(
                1,
                "berth's start request → engine `start` (the engine's work), p50 / p99",
            )
            .berth(p50_p99(&d)),
        );
    }
    for (label, values) in [
        (
            "exit → MQTT, `never` → `Error` document, p50 / p99",
            &mqtt_error,
        ),
        (
            "exit → MQTT, `always` → restarting document, p50 / p99",
            &mqtt_restart,
        ),
    ] {
        match dist(values) {
            Some(d) => rows.push(
                Row::new(1, label)
                    .berth(format!("{} (n = {})", p50_p99(&d), d.n))
                    .target("p99 ≤ 20 ms", d.p99 <= 20.0 && d.n == n),
            ),
            None => rows.push(
                Row::new(1, label)
                    .berth("no document received")
                    .target("p99 ≤ 20 ms", false),
            ),
        }
    }
    let warnings = berth.warnings();
    if warnings > 0 {
        rows.push(Row::new(1, "berth WARN/ERROR log lines (restart)").berth(warnings.to_string()));
    }
    Ok(rows)
}
