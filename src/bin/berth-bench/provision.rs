//! Items 3 and 5: provisioning 50 deployments × 2 executables (images local)
//! until all 100 containers run, under berth, under `docker-compose up -d`
//! of the same 100 containers, under a loop of `docker run -d`, and at the
//! floor: the same 100 containers created and started straight through the
//! engine's API, 8 at a time, with no bookkeeping. Each side starts from an
//! engine that holds none of the others' containers: berth's are removed
//! (after the footprint) before the next side runs, and so on.
//!
//! Then, while berth manages its 100 containers and nothing moves, its
//! footprint as shipped (info-level text logs, the watchdog armed against a
//! notify socket of the bench's): resident memory, idle CPU, binary size.
//!
//! berth is timed from its spawn to the engine's `start` event of the last
//! container (and, separately, to the last `Succeeded`/`Running` document on
//! MQTT); the others from the first call to the return of the last, since
//! each returns once its containers are started.

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::api::Api;
use crate::berth::{deployment, Berth};
use crate::engine::{all_started, Containers, IMAGE, LONG_RUNNING};
use crate::mqtt::{Broker, Message, Subscriber};
use crate::report::{mb, secs, Row};
use crate::sys::{self, unix_nanos};
use crate::Ctx;

pub fn run(ctx: &Ctx, compare: bool, footprint: bool) -> Result<Vec<Row>> {
    let n = if ctx.quick { 5 } else { 50 };
    let total = 2 * n;
    let tag = if ctx.loaded { "l" } else { "" };
    let dir = ctx.subdir(if ctx.loaded {
        "provision-load"
    } else {
        "provision"
    })?;
    let device = format!("{}-p{tag}", ctx.run_id);
    let broker = Broker::start(&dir)?;
    let mut options = ctx.berth_options(&device, broker.port(), &ctx.engine.url());
    options.watchdog = true;
    let mut berth = Berth::new(&ctx.berth_bin, &dir, options)?;
    let berth_containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    let sub = Subscriber::connect(broker.port(), &berth.topics())?;
    let mut names = BTreeSet::new();
    let mut topics = Vec::new();
    for i in 0..n {
        let id = format!("p{i:02}");
        let text = deployment(&id, "always", &[("a", LONG_RUNNING), ("b", LONG_RUNNING)]);
        berth.write_deployment(&id, &text)?;
        names.insert(berth.container_name(&id, "main", "a"));
        names.insert(berth.container_name(&id, "main", "b"));
        topics.push(berth.topic(&id));
    }

    let t0 = unix_nanos(berth.start()?);
    let (mut engine_done, mut mqtt_done) = (None, None);
    sys::wait_until(
        &format!("berth to start {total} containers"),
        Duration::from_secs(if ctx.quick { 120 } else { 300 }),
        Duration::from_millis(50),
        || {
            berth.check()?;
            ctx.events.check()?;
            if engine_done.is_none() {
                engine_done = all_started(&ctx.events.since(t0), &names, t0);
            }
            if mqtt_done.is_none() {
                mqtt_done = sub.with(|msgs| all_reported(msgs, &topics));
            }
            Ok(engine_done.is_some() && mqtt_done.is_some())
        },
    )?;
    let berth_secs = (engine_done.unwrap_or(t0) - t0) as f64 / 1e9;
    let reported_secs = (mqtt_done.unwrap_or(t0) - t0) as f64 / 1e9;

    let mut rows = Vec::new();
    if footprint {
        rows.extend(measure_footprint(ctx, &mut berth, total)?);
    }
    berth.stop()?;
    // The next side starts from an engine without berth's containers.
    drop(berth_containers);
    rows.push(
        Row::new(
            3,
            format!("provisioning {n} deployments × 2 executables: start → all {total} running"),
        )
        .berth(secs(berth_secs)),
    );
    if compare {
        let tag = if ctx.loaded { "l" } else { "q" };
        match api_floor(ctx, tag, total) {
            Ok(t) => {
                let ratio = berth_secs / t;
                rows.push(
                    Row::new(
                        3,
                        format!("… against the floor: {total} created and started through the API, 8 at a time"),
                    )
                    .berth(secs(berth_secs))
                    .other(secs(t))
                    .ratio(format!("{ratio:.2}"))
                    .target("≤ 1.1", ratio <= 1.1),
                );
            }
            Err(e) => rows.push(Row::error(3, "the API floor", &e)),
        }
        match docker_run_loop(ctx, tag, total) {
            Ok(t) => rows.push(
                Row::new(3, format!("… against a loop of {total} × `docker run -d`"))
                    .berth(secs(berth_secs))
                    .other(secs(t))
                    .ratio(format!("{:.2}", berth_secs / t)),
            ),
            Err(e) => rows.push(Row::error(3, "`docker run -d` loop", &e)),
        }
        match compose_up(ctx, tag, &dir, total) {
            Ok(t) => rows.push(
                Row::new(
                    3,
                    format!("… against `docker-compose up -d` of {total} services"),
                )
                .berth(secs(berth_secs))
                .other(secs(t))
                .ratio(format!("{:.2}", berth_secs / t)),
            ),
            Err(e) => rows.push(Row::error(3, "`docker-compose up -d`", &e)),
        }
    }
    rows.push(
        Row::new(
            3,
            format!("berth: start → all {n} documents `Succeeded`/`Running` on MQTT"),
        )
        .berth(secs(reported_secs)),
    );
    Ok(rows)
}

/// The same containers created and started straight through the API, 8 at
/// a time; timed from the first call to the last answer.
fn api_floor(ctx: &Ctx, tag: &str, total: usize) -> Result<f64> {
    let prefix = format!("{}-{tag}-a-", ctx.run_id);
    let _containers = Containers::guard(&ctx.engine, &prefix);
    let names: Vec<String> = (0..total).map(|i| format!("{prefix}{i:03}")).collect();
    let api = Api::new(&ctx.engine.url())?;
    let took = api.create_and_start(&names, ("berth-bench.run", &ctx.run_id), LONG_RUNNING, 8)?;
    let running = ctx.engine.running(&prefix)?;
    if running != total {
        bail!("only {running} of {total} API containers are running");
    }
    Ok(took.as_secs_f64())
}

/// The time by which every topic had a `Succeeded`/`Running` document.
fn all_reported(msgs: &[Message], topics: &[String]) -> Option<i64> {
    let mut last = i64::MIN;
    for topic in topics {
        let first = msgs.iter().find(|m| {
            m.topic == *topic
                && m.payload["phase"] == "Succeeded"
                && m.payload["status"] == "Running"
        })?;
        last = last.max(unix_nanos(first.at));
    }
    Some(last)
}

fn docker_run_loop(ctx: &Ctx, tag: &str, total: usize) -> Result<f64> {
    let prefix = format!("{}-{tag}-d-", ctx.run_id);
    let _containers = Containers::guard(&ctx.engine, &prefix);
    let label = ctx.label();
    let started = Instant::now();
    for i in 0..total {
        ctx.engine
            .run_detached(&format!("{prefix}{i:03}"), &label, None, LONG_RUNNING)?;
    }
    let t = started.elapsed().as_secs_f64();
    let running = ctx.engine.running(&prefix)?;
    if running != total {
        bail!("only {running} of {total} `docker run` containers are running");
    }
    Ok(t)
}

fn compose_up(ctx: &Ctx, tag: &str, dir: &std::path::Path, total: usize) -> Result<f64> {
    sys::run(
        Command::new("docker-compose").arg("version"),
        Duration::from_secs(60),
    )
    .context("docker-compose is needed for this comparison: run scripts/setup.sh --tests")?;
    // Compose v1 names containers <project>_<service>_1.
    let project = format!("{}-{tag}-c", ctx.run_id);
    let _containers = Containers::guard(&ctx.engine, &format!("{project}_"));
    let mut yaml = String::from("version: \"2.4\"\nservices:\n");
    let command = serde_json::to_string(&["sh", "-c", LONG_RUNNING])?;
    for i in 0..total {
        yaml += &format!(
            "  s{i:03}:\n    image: {IMAGE}\n    command: {command}\n    network_mode: host\n    \
             labels:\n      berth-bench.run: \"{}\"\n",
            ctx.run_id
        );
    }
    let file = dir.join("docker-compose.yml");
    fs::write(&file, yaml).context("cannot write docker-compose.yml")?;
    let mut up = Command::new("docker-compose");
    up.arg("--project-name")
        .arg(&project)
        .arg("--file")
        .arg(&file)
        .args(["up", "--detach"])
        .env("COMPOSE_HTTP_TIMEOUT", "600")
        // Compose v1 runs a task per service and, inside it, one per
        // container, from one pool of COMPOSE_PARALLEL_LIMIT (64) threads:
        // with more services than that, the outer tasks hold every thread
        // and the inner ones never run (docker/compose#5864, #7486, #8161).
        .env("COMPOSE_PARALLEL_LIMIT", (2 * total + 8).to_string());
    let started = Instant::now();
    let result = sys::run(&mut up, Duration::from_secs(900));
    let t = started.elapsed().as_secs_f64();
    let running = ctx.engine.running(&format!("{project}_"));
    let _ = ctx.engine.remove_networks(&project);
    result?;
    let running = running?;
    if running != total {
        bail!("only {running} of {total} compose containers are running");
    }
    Ok(t)
}

fn measure_footprint(ctx: &Ctx, berth: &mut Berth, total: usize) -> Result<Vec<Row>> {
    let settle = Duration::from_secs(if ctx.quick { 3 } else { 10 });
    let window = Duration::from_secs(if ctx.quick { 15 } else { 60 });
    let started = Instant::now();
    while started.elapsed() < settle {
        berth.check()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = berth.pid()?;
    let first = sys::sample(pid)?;
    let mut samples = vec![first];
    while first.at.elapsed() < window {
        std::thread::sleep(Duration::from_secs(1));
        berth.check()?;
        samples.push(sys::sample(pid)?);
    }
    let last = *samples.last().expect("one sample at least");
    let mut rss: Vec<u64> = samples.iter().map(|s| s.rss_kb).collect();
    rss.sort_unstable();
    let median = rss[rss.len() / 2];
    let max = rss[rss.len() - 1];
    let cpu = sys::cpu_percent(&first, &last);
    let ticks = last.cpu_ticks - first.cpu_ticks;
    let window_s = last.at.duration_since(first.at).as_secs_f64();

    let pings = berth.watchdog_pings();
    let breakdown = sys::rss_breakdown(pid)?
        .iter()
        .map(|(what, kb)| format!("{what} {}", mb(*kb)))
        .collect::<Vec<_>>()
        .join(", ");
    let bin = &ctx.berth_bin;
    let bytes = fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let stripped = !bytes.windows(8).any(|w| w == b".symtab\0");
    Ok(vec![
        Row::new(
            5,
            format!("steady resident memory (VmRSS) managing {total} containers, as shipped (info text logs, watchdog armed), median / max over {window_s:.0} s"),
        )
        .berth(format!("{} / {}", mb(median), mb(max)))
        .target("≤ 6 MB", max <= 6 * 1024),
        Row::new(5, "… where it is (/proc/PID/smaps) at the end of the window").berth(breakdown),
        Row::new(5, "peak resident memory since start (VmHWM, includes provisioning)")
            .berth(mb(last.hwm_kb)),
        Row::new(5, format!("idle CPU over {window_s:.0} s (utime + stime)"))
            .berth(format!("{cpu:.3} % of a core ({ticks} ticks)"))
            .target("≤ 0.1 %", cpu <= 0.1),
        Row::new(5, "watchdog pings (`WATCHDOG=1`) received by the bench's notify socket since berth started")
            .berth(pings.to_string())
            .target("> 0", pings > 0),
        Row::new(5, "binary size (the berth measured)")
            .berth(format!(
                "{:.2} MB ({} bytes, {})",
                bytes.len() as f64 / 1024.0 / 1024.0,
                bytes.len(),
                if stripped { "stripped" } else { "NOT stripped" }
            )),
    ])
}
