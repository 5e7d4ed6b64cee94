//! Items 1 and 2 of the issue, in one run: how fast a container that exits
//! is started again, under berth (`always`) and under the engine's own
//! `--restart always`, and how fast the exit reaches an MQTT subscriber.
//!
//! Three sets of `n` containers from the same image, side by side: berth
//! `always` executables (`rNN`), engine `--restart always` containers, and
//! berth `never` executables (`mNN`, whose exit is a plain status change to
//! `Error`, with no restart in the way). Each exits once, at its own moment:
//! the scripts wait for a given host uptime (`/proc/uptime`, which containers
//! share), so that exits are interleaved one set after another, `GAP` apart,
//! and never pile up. A restarted container finds its marker file and stays
//! up.
//!
//! Clocks: the engine's event `timeNano` (die, start), berth's log timestamps
//! (its decision, its start request) and the subscriber's arrival stamps are
//! all the host's wall clock.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::berth::{deployment, Berth};
use crate::engine::{first_after, Containers, LONG_RUNNING};
use crate::mqtt::{Broker, Subscriber};
use crate::report::{dist, p50_p99, Row};
use crate::sys::{self, UptimeClock};
use crate::Ctx;

/// Seconds between two consecutive exits (of any set).
const GAP: f64 = 0.35;

/// `sleep` until the host's uptime reaches `uptime` (at once if past).
fn sleep_until(uptime: f64) -> String {
    format!(
        "sleep $(awk '{{ s = {uptime:.2} - $1; if (s < 0) s = 0; printf \"%.3f\", s }}' /proc/uptime)"
    )
}

/// Exits 1 at `uptime` the first time; runs until stopped once restarted.
fn exit_once_at(uptime: f64) -> String {
    format!(
        "if [ -f /ran ]; then {LONG_RUNNING}; fi; touch /ran; {}; exit 1",
        sleep_until(uptime)
    )
}

fn exit_at(uptime: f64) -> String {
    format!("{}; exit 1", sleep_until(uptime))
}

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = if ctx.quick { 5 } else { 20 };
    let lead = if ctx.quick { 15.0 } else { 25.0 };
    let dir = ctx.subdir("restart")?;
    let device = format!("{}-r", ctx.run_id);
    let engine_prefix = format!("{}-e-", ctx.run_id);

    let broker = Broker::start(&dir)?;
    let _engine_containers = Containers::guard(&ctx.engine, &engine_prefix);
    let mut berth = Berth::new(
        &ctx.berth_bin,
        &dir,
        ctx.berth_options(&device, broker.port(), &ctx.engine.url()),
    )?;
    let _berth_containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    let sub = Subscriber::connect(broker.port(), &berth.topics())?;

    let clock = UptimeClock::now()?;
    let slot = |k: usize| clock.uptime + lead + GAP * k as f64;
    for i in 0..n {
        let (r, m) = (format!("r{i:02}"), format!("m{i:02}"));
        let script = exit_once_at(slot(3 * i));
        berth.write_deployment(&r, &deployment(&r, "always", &[("app", &script)]))?;
        let script = exit_at(slot(3 * i + 2));
        berth.write_deployment(&m, &deployment(&m, "never", &[("app", &script)]))?;
    }
    let began = sys::unix_nanos(std::time::SystemTime::now());
    berth.start()?;
    let label = ctx.label();
    for i in 0..n {
        ctx.engine.run_detached(
            &format!("{engine_prefix}{i:02}"),
            &label,
            Some("always"),
            &exit_once_at(slot(3 * i + 1)),
        )?;
    }
    let names: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                berth.container_name(&format!("r{i:02}"), "main", "app"),
                berth.container_name(&format!("m{i:02}"), "main", "app"),
            )
        })
        .collect();
    let restarted = |i: usize| names[i].0.clone();
    let failed = |i: usize| names[i].1.clone();
    let engines = |i: usize| format!("{engine_prefix}{i:02}");

    // Every restart and every exit, or the deadline.
    let last_exit = clock.wall_nanos_at(slot(3 * n));
    let settle = Duration::from_secs(if ctx.quick { 20 } else { 40 });
    let wait = Duration::from_nanos((last_exit - began).max(0) as u64) + settle;
    let deadline = Instant::now() + wait;
    loop {
        berth.check()?;
        ctx.events.check()?;
        let ev = ctx.events.since(began);
        let starts = |name: &str| {
            ev.iter()
                .filter(|e| e.name == name && e.action == "start")
                .count()
        };
        let dies = |name: &str| {
            ev.iter()
                .filter(|e| e.name == name && e.action == "die")
                .count()
        };
        let done = (0..n).all(|i| {
            starts(&restarted(i)) >= 2 && starts(&engines(i)) >= 2 && dies(&failed(i)) >= 1
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
    let log = berth.log();
    let mut late = 0;
    let mut reaction = |name: &str, slot_uptime: f64| -> Option<(i64, i64)> {
        let first = first_after(&ev, name, "start", began)?;
        if first > clock.wall_nanos_at(slot_uptime) {
            late += 1;
        }
        let die = first_after(&ev, name, "die", first)?;
        let next = first_after(&ev, name, "start", die)?;
        Some((die, next))
    };
    let (mut berth_total, mut engine_total) = (Vec::new(), Vec::new());
    let (mut own, mut die_to_request, mut request_to_start) = (Vec::new(), Vec::new(), Vec::new());
    let (mut mqtt_restart, mut mqtt_error) = (Vec::new(), Vec::new());
    let ns_ms = |ns: i64| ns as f64 / 1e6;
    for i in 0..n {
        if let Some((die, start)) = reaction(&restarted(i), slot(3 * i)) {
            berth_total.push(ns_ms(start - die));
            let key = format!("r{i:02}/main/app");
            let decision = log.iter().find(|l| {
                l.message == "decision"
                    && l.field("executable") == key
                    && l.field("decision").starts_with("Restart")
                    && sys::unix_nanos(l.at) >= die - 1_000_000
            });
            let request = decision.and_then(|d| {
                log.iter().find(|l| {
                    l.message == "start request"
                        && l.field("container") == restarted(i)
                        && l.at >= d.at
                })
            });
            if let (Some(d), Some(r)) = (decision, request) {
                let (d, r) = (sys::unix_nanos(d.at), sys::unix_nanos(r.at));
                own.push(ns_ms(r - d));
                die_to_request.push(ns_ms(r - die));
                request_to_start.push(ns_ms(start - r));
            }
            // The first document after the exit that shows it.
            let topic = berth.topic(&format!("r{i:02}"));
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
                mqtt_restart.push(ns_ms(at - die));
            }
        }
        if let Some((die, start)) = reaction(&engines(i), slot(3 * i + 1)) {
            engine_total.push(ns_ms(start - die));
        }
        let name = failed(i);
        if let Some(die) = first_after(&ev, &name, "die", began) {
            let topic = berth.topic(&format!("m{i:02}"));
            if let Some(at) = sub.with(|msgs| {
                msgs.iter()
                    .find(|m| {
                        m.topic == topic
                            && sys::unix_nanos(m.at) >= die
                            && m.payload["executables"][0]["status"] == "Error"
                    })
                    .map(|m| sys::unix_nanos(m.at))
            }) {
                mqtt_error.push(ns_ms(at - die));
            }
        }
    }

    let mut rows = Vec::new();
    let observed = format!(
        "{}/{n} berth, {}/{n} engine",
        berth_total.len(),
        engine_total.len()
    );
    match (dist(&berth_total), dist(&engine_total)) {
        (Some(b), Some(e)) => {
            let r50 = b.p50 / e.p50;
            let r99 = b.p99 / e.p99;
            rows.push(
                Row::new(
                    1,
                    format!("restart reaction, die → start, p50 / p99 (n = {n})"),
                )
                .berth(p50_p99(&b))
                .other(format!("{} (engine `--restart always`)", p50_p99(&e)))
                .ratio(format!("{r50:.3} / {r99:.3}"))
                .target("≤ 0.75", r50 <= 0.75 && r99 <= 0.75),
            );
        }
        _ => rows.push(
            Row::new(1, "restart reaction")
                .berth(observed.clone())
                .target("all restarts observed", false),
        ),
    }
    if berth_total.len() < n || engine_total.len() < n {
        rows.push(
            Row::new(1, "restarts observed")
                .berth(observed)
                .target(format!("{n}/{n}"), false),
        );
    }
    match dist(&own) {
        Some(d) => rows.push(
            Row::new(
                1,
                "berth's own share: die received (decision logged) → start request sent, p50 / p99",
            )
            .berth(p50_p99(&d))
            .target("p99 ≤ 5 ms", d.p99 <= 5.0),
        ),
        None => rows.push(
            Row::new(1, "berth's own share")
                .berth("no decision / start request log lines found")
                .target("p99 ≤ 5 ms", false),
        ),
    }
    if let Some(d) = dist(&die_to_request) {
        rows.push(
            Row::new(
                1,
                "die (engine time) → berth's start request, incl. event delivery, p50 / p99",
            )
            .berth(p50_p99(&d)),
        );
    }
    if let Some(d) = dist(&request_to_start) {
        rows.push(
            Row::new(
                1,
                "berth's start request → engine `start` event (the engine's work), p50 / p99",
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
                Row::new(2, format!("{label} (n = {})", d.n))
                    .berth(p50_p99(&d))
                    .target("p99 ≤ 20 ms", d.p99 <= 20.0 && d.n == n),
            ),
            None => rows.push(
                Row::new(2, label)
                    .berth("no document received")
                    .target("p99 ≤ 20 ms", false),
            ),
        }
    }
    if late > 0 {
        rows.push(
            Row::new(
                1,
                "containers started after their exit slot (exits overlapped)",
            )
            .berth(late.to_string()),
        );
    }
    let warnings = berth.warnings();
    if warnings > 0 {
        rows.push(Row::new(1, "berth WARN/ERROR log lines").berth(warnings.to_string()));
    }
    Ok(rows)
}
