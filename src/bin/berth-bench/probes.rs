//! Item 9: what liveness probes and metrics cost, and how fast a failing
//! probe restarts its executable (issue "robot realities").
//!
//! The cost: the same 50 deployments × 2 executables run twice under a berth
//! of their own, as shipped (info text logs, the watchdog armed): once with
//! no probe and `[metrics] interval_secs = 0`, once with an `exec` probe
//! every 10 s on each executable and `[metrics] interval_secs = 60`. Once
//! every container runs (and, with probes, every document says `healthy`)
//! and a settling time has passed, one window is read from `/proc`: berth's
//! CPU time and resident memory, and the engine's CPU time: the `dockerd`
//! that serves the engine's socket (found through the socket's inode, so
//! that a second `dockerd` of another lane or test is never taken for it),
//! its `containerd`, and the `containerd-shim`s of the lane's containers with
//! the children they reaped (runc and the probe processes themselves).
//!
//! The reaction: executables with a fast probe (every 1 s, 2 failures) whose
//! probe fails from a moment the bench chooses (it creates a file the probe
//! checks, in a directory mounted into the container), one executable per
//! sample so that each restart is the first after a good run (no back-off).
//! Timed on the engine's events: the file's creation, `health_status:
//! unhealthy` (the failed probe that reaches the threshold), `kill` (berth's
//! stop) and `start` (the same container started again).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::berth::{deployment_with, Berth};
use crate::engine::{all_started, first_after, Containers, LONG_RUNNING};
use crate::mqtt::{Broker, Subscriber};
use crate::report::{dist, mb, ms, Row};
use crate::sys::{self, unix_nanos, USER_HZ};
use crate::Ctx;

const ITEM: u8 = 9;
/// The probe of the cost side: SPEC 4's example timing, a trivial command.
const PROBE_EVERY_SECS: u64 = 10;
const METRICS_EVERY_SECS: u64 = 60;
/// The reaction side's probe: every second, unhealthy after two failures.
const FAST_PERIOD_SECS: u64 = 1;
const FAST_THRESHOLD: u32 = 2;

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut rows = match cost(ctx) {
        Ok(rows) => rows,
        Err(e) => vec![Row::error(ITEM, "probes and metrics: cost", &e)],
    };
    if sys::interrupted() {
        return Ok(rows);
    }
    match reaction(ctx) {
        Ok(more) => rows.extend(more),
        Err(e) => rows.push(Row::error(ITEM, "probe failure → restart", &e)),
    }
    Ok(rows)
}

// --- the cost -----------------------------------------------------------------------

/// One side's readings over the window.
struct Side {
    window_s: f64,
    berth_cpu: f64,
    /// berth's CPU time in the window, in ticks (the reading's resolution).
    berth_ticks: u64,
    rss_median_kb: u64,
    rss_max_kb: u64,
    dockerd_cpu: f64,
    containerd_cpu: Option<f64>,
    shims_cpu: f64,
    shims: usize,
    /// `exec_die` events of the lane's containers in the window.
    probe_runs: usize,
    /// `metrics` documents received in the window.
    metrics_docs: usize,
}

fn cost(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = if ctx.quick { 5 } else { 50 };
    let total = 2 * n;
    let without = measure_side(ctx, n, false)?;
    let with = measure_side(ctx, n, true)?;
    let pct = |v: f64| format!("{v:.3} % of a core");
    let diff = |a: f64, b: f64| format!("{:+.3} points", a - b);
    let window = with.window_s.min(without.window_s);
    let mut rows = vec![
        Row::new(
            ITEM,
            format!(
                "probes and metrics: berth CPU, {total} executables each with an `exec` probe every \
                 {PROBE_EVERY_SECS} s and metrics every {METRICS_EVERY_SECS} s, against the same \
                 without probes and metrics, as shipped, over {window:.0} s"
            ),
        )
        .berth(format!("{} ({} ticks)", pct(with.berth_cpu), with.berth_ticks))
        .other(format!(
            "{} ({} ticks, without)",
            pct(without.berth_cpu),
            without.berth_ticks
        ))
        .ratio(diff(with.berth_cpu, without.berth_cpu)),
        Row::new(ITEM, "… berth resident memory (VmRSS), median / max over the window")
            .berth(format!(
                "{} / {}",
                mb(with.rss_median_kb),
                mb(with.rss_max_kb)
            ))
            .other(format!(
                "{} / {} (without)",
                mb(without.rss_median_kb),
                mb(without.rss_max_kb)
            ))
            .ratio(format!(
                "{:+.2} MB (median)",
                (with.rss_median_kb as f64 - without.rss_median_kb as f64) / 1024.0
            )),
        Row::new(
            ITEM,
            "… the engine: dockerd (the one serving the engine's socket), utime + stime",
        )
        .berth(pct(with.dockerd_cpu))
        .other(format!("{} (without)", pct(without.dockerd_cpu)))
        .ratio(diff(with.dockerd_cpu, without.dockerd_cpu)),
    ];
    if let (Some(w), Some(wo)) = (with.containerd_cpu, without.containerd_cpu) {
        rows.push(
            Row::new(ITEM, "… the engine: its containerd, utime + stime")
                .berth(pct(w))
                .other(format!("{} (without)", pct(wo)))
                .ratio(diff(w, wo)),
        );
    }
    rows.push(
        Row::new(
            ITEM,
            format!(
                "… the engine: the {} containers' containerd-shims, with the children they reaped \
                 (runc, the probe processes)",
                with.shims
            ),
        )
        .berth(pct(with.shims_cpu))
        .other(format!("{} (without)", pct(without.shims_cpu)))
        .ratio(diff(with.shims_cpu, without.shims_cpu)),
    );
    let engine_with = with.dockerd_cpu + with.containerd_cpu.unwrap_or(0.0) + with.shims_cpu;
    let engine_without =
        without.dockerd_cpu + without.containerd_cpu.unwrap_or(0.0) + without.shims_cpu;
    let runs = with.probe_runs.max(1) as f64;
    rows.push(
        Row::new(
            ITEM,
            "… the engine in all (dockerd + containerd + shims), and its extra CPU time per probe run",
        )
        .berth(format!(
            "{} ({:.1} ms of CPU per probe run)",
            pct(engine_with),
            (engine_with - engine_without) / 100.0 * with.window_s * 1000.0 / runs
        ))
        .other(format!("{} (without)", pct(engine_without)))
        .ratio(diff(engine_with, engine_without)),
    );
    rows.push(
        Row::new(
            ITEM,
            "… probe runs (engine `exec_die` events) / metrics documents received in the window",
        )
        .berth(format!("{} / {}", with.probe_runs, with.metrics_docs))
        .other(format!(
            "{} / {} (without)",
            without.probe_runs, without.metrics_docs
        )),
    );
    Ok(rows)
}

/// Runs `n` deployments × 2 executables under a berth of their own, with or
/// without probes and metrics, and reads one window.
fn measure_side(ctx: &Ctx, n: usize, probes: bool) -> Result<Side> {
    let settle = Duration::from_secs(if ctx.quick { 5 } else { 15 });
    let window = Duration::from_secs(if ctx.quick { 20 } else { 60 });
    let tag = format!(
        "{}{}",
        if probes { "on" } else { "off" },
        if ctx.loaded { "-l" } else { "" }
    );
    let dir = ctx.subdir(&format!("probes-{tag}"))?;
    let device = format!("{}-pr{tag}", ctx.run_id);
    let broker = Broker::start(&dir)?;
    let mut options = ctx.berth_options(&device, broker.port(), &ctx.engine.url());
    options.watchdog = true;
    options.extra_config = format!(
        "\n[metrics]\ninterval_secs = {}\n",
        if probes { METRICS_EVERY_SECS } else { 0 }
    );
    let mut berth = Berth::new(&ctx.berth_bin, &dir, options)?;
    let prefix = berth.container_prefix();
    let _containers = Containers::guard(&ctx.engine, &prefix);
    let sub = Subscriber::connect(broker.port(), &format!("berth/{device}/#"))?;
    let probe = probes.then(|| {
        format!(
            "\n[components.executables.probe]\nexec = [\"true\"]\ninitial_delay_secs = 0\n\
             period_secs = {PROBE_EVERY_SECS}\ntimeout_secs = 2\nfailure_threshold = 3\n"
        )
    });
    let mut names = BTreeSet::new();
    let mut topics = Vec::new();
    for i in 0..n {
        let id = format!("h{i:02}");
        let text = deployment_with(
            &id,
            "always",
            &[("a", LONG_RUNNING), ("b", LONG_RUNNING)],
            None,
        );
        let text = match &probe {
            Some(probe) => with_probe(&text, probe),
            None => text,
        };
        berth.write_deployment(&id, &text)?;
        names.insert(berth.container_name(&id, "main", "a"));
        names.insert(berth.container_name(&id, "main", "b"));
        topics.push(berth.topic(&id));
    }

    let t0 = unix_nanos(berth.start()?);
    let mut started = false;
    sys::wait_until(
        &format!(
            "{} containers running{}",
            2 * n,
            if probes { " and healthy" } else { "" }
        ),
        Duration::from_secs(if ctx.quick { 120 } else { 300 }),
        Duration::from_millis(100),
        || {
            berth.check()?;
            ctx.events.check()?;
            if !started {
                started = all_started(&ctx.events.since(t0), &names, t0).is_some();
            }
            Ok(started && sub.with(|msgs| all_ready(msgs, &topics, probes)))
        },
    )?;
    let settled = Instant::now();
    while settled.elapsed() < settle {
        berth.check()?;
        std::thread::sleep(Duration::from_millis(200));
    }

    let engine = EnginePids::find(ctx, &prefix)?;
    let pid = berth.pid()?;
    let first = sys::sample(pid)?;
    let engine_first = engine.read()?;
    let w0 = SystemTime::now();
    let mut rss = vec![first.rss_kb];
    let mut last = first;
    while first.at.elapsed() < window {
        std::thread::sleep(Duration::from_secs(1));
        berth.check()?;
        last = sys::sample(pid)?;
        rss.push(last.rss_kb);
    }
    let engine_last = engine.read()?;
    let w1 = SystemTime::now();
    let window_s = last.at.duration_since(first.at).as_secs_f64();
    let engine_s = engine_last.at.duration_since(engine_first.at).as_secs_f64();
    let share = |from: u64, to: u64| to.saturating_sub(from) as f64 / USER_HZ / engine_s * 100.0;
    rss.sort_unstable();
    let (from, to) = (unix_nanos(w0), unix_nanos(w1));
    let probe_runs = ctx
        .events
        .since(from)
        .iter()
        .filter(|e| e.nanos <= to && e.name.starts_with(&prefix) && e.action == "exec_die")
        .count();
    let metrics_topic = format!("berth/{device}/metrics");
    let metrics_docs = sub.with(|msgs| {
        msgs.iter()
            .filter(|m| m.topic == metrics_topic && m.at >= w0 && m.at <= w1)
            .count()
    });
    berth.stop()?;
    Ok(Side {
        window_s,
        berth_cpu: sys::cpu_percent(&first, &last),
        berth_ticks: last.cpu_ticks.saturating_sub(first.cpu_ticks),
        rss_median_kb: rss[rss.len() / 2],
        rss_max_kb: rss[rss.len() - 1],
        dockerd_cpu: share(engine_first.dockerd, engine_last.dockerd),
        containerd_cpu: engine_first
            .containerd
            .zip(engine_last.containerd)
            .map(|(a, b)| share(a, b)),
        shims_cpu: share(engine_first.shims, engine_last.shims),
        shims: engine.shims.len(),
        probe_runs,
        metrics_docs,
    })
}

/// Adds `probe` to every executable of a deployment file written by
/// `deployment_with` (each executable's table ends where the next begins).
fn with_probe(text: &str, probe: &str) -> String {
    const HEADER: &str = "\n[[components.executables]]";
    let mut parts = text.split(HEADER);
    let mut out = parts.next().unwrap_or_default().to_owned();
    for part in parts {
        out += HEADER;
        out += part;
        out += probe;
    }
    out
}

/// Whether every topic's latest document is `Running` (and, with probes,
/// every executable `healthy`).
fn all_ready(msgs: &[crate::mqtt::Message], topics: &[String], probes: bool) -> bool {
    topics.iter().all(|topic| {
        msgs.iter()
            .rev()
            .find(|m| m.topic == *topic)
            .is_some_and(|m| {
                m.payload["status"] == "Running"
                    && (!probes
                        || m.payload["executables"]
                            .as_array()
                            .is_some_and(|e| e.iter().all(|x| x["health"] == "healthy")))
            })
    })
}

/// The engine's processes whose CPU time the lane reads.
struct EnginePids {
    dockerd: u32,
    containerd: Option<u32>,
    shims: Vec<u32>,
}

/// One reading of their CPU times, in ticks.
struct EngineTicks {
    at: Instant,
    dockerd: u64,
    containerd: Option<u64>,
    /// With the children they reaped.
    shims: u64,
}

impl EnginePids {
    fn find(ctx: &Ctx, prefix: &str) -> Result<EnginePids> {
        let url = ctx.engine.url();
        let socket = url
            .strip_prefix("unix://")
            .with_context(|| format!("the engine at {url} is not on a unix socket"))?;
        let dockerd = socket_server(Path::new(socket), "dockerd")?;
        let containerd = processes()
            .into_iter()
            .find(|&pid| comm(pid) == "containerd" && ppid(pid) == Some(dockerd));
        let ids: Vec<String> = ctx
            .engine
            .containers(prefix)?
            .into_iter()
            .map(|c| c.id)
            .collect();
        let shims: Vec<u32> = processes()
            .into_iter()
            .filter(|&pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                args.first()
                    .is_some_and(|a| String::from_utf8_lossy(a).contains("containerd-shim"))
                    && args
                        .iter()
                        .any(|a| ids.iter().any(|id| a == &id.as_bytes()))
            })
            .collect();
        if shims.len() != ids.len() {
            bail!(
                "found {} containerd-shim processes for {} containers",
                shims.len(),
                ids.len()
            );
        }
        Ok(EnginePids {
            dockerd,
            containerd,
            shims,
        })
    }

    fn read(&self) -> Result<EngineTicks> {
        let mut shims = 0;
        for &pid in &self.shims {
            shims += cpu_ticks(pid, true)?;
        }
        Ok(EngineTicks {
            at: Instant::now(),
            dockerd: cpu_ticks(self.dockerd, false)?,
            containerd: self.containerd.map(|p| cpu_ticks(p, false)).transpose()?,
            shims,
        })
    }
}

/// utime + stime of a process (and, with `children`, cutime + cstime: the
/// children it waited for), in USER_HZ ticks.
fn cpu_ticks(pid: u32, children: bool) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name's last ')': state is 0, utime 11,
    // stime 12, cutime 13, cstime 14 (proc(5) fields 14 to 17).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat is short"))
    };
    let own = field(11)? + field(12)?;
    Ok(if children {
        own + field(13)? + field(14)?
    } else {
        own
    })
}

fn processes() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The process named `name` that holds the listening unix socket bound at
/// `path` (from `/proc/net/unix`, then each process's open files).
fn socket_server(path: &Path, name: &str) -> Result<u32> {
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let table = fs::read_to_string("/proc/net/unix").context("cannot read /proc/net/unix")?;
    // Num RefCount Protocol Flags Type St Inode Path; Flags 0x10000 is a
    // listening socket.
    let inodes: BTreeSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = u32::from_str_radix(f.get(3)?, 16).ok()? & 0x10000 != 0;
            let inode = f.get(6)?;
            let bound = Path::new(f.get(7)?);
            let same = fs::canonicalize(bound).unwrap_or_else(|_| bound.to_owned()) == target;
            (listening && same).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        bail!(
            "no listening socket at {} in /proc/net/unix",
            path.display()
        );
    }
    for pid in processes() {
        if comm(pid) != name {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds.filter_map(|e| e.ok()).any(|e| {
            fs::read_link(e.path()).is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref()))
        });
        if holds {
            return Ok(pid);
        }
    }
    bail!("no {name} process holds the socket {}", path.display())
}

// --- the reaction -------------------------------------------------------------------

fn reaction(ctx: &Ctx) -> Result<Vec<Row>> {
    let samples = if ctx.quick { 3 } else { 10 };
    let tag = if ctx.loaded { "-l" } else { "" };
    let dir = ctx.subdir(&format!("probes-reaction{tag}"))?;
    let sync = ctx.subdir(&format!("probes-reaction{tag}/sync"))?;
    let device = format!("{}-prr{tag}", ctx.run_id);
    let broker = Broker::start(&dir)?;
    let options = ctx.berth_options(&device, broker.port(), &ctx.engine.url());
    let mut berth = Berth::new(&ctx.berth_bin, &dir, options)?;
    let _containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    let exes: Vec<String> = (0..samples).map(|i| format!("e{i:02}")).collect();
    let scripts: Vec<(&str, &str)> = exes.iter().map(|e| (e.as_str(), LONG_RUNNING)).collect();
    // Each executable's probe checks its own file: absent is healthy.
    let mut text = deployment_with("sick", "always", &scripts, Some(&sync));
    for exe in &exes {
        let probe = format!(
            "\n[components.executables.probe]\nexec = [\"sh\", \"-c\", \"test ! -e /sync/{exe}\"]\n\
             initial_delay_secs = 1\nperiod_secs = {FAST_PERIOD_SECS}\ntimeout_secs = 1\n\
             failure_threshold = {FAST_THRESHOLD}\n"
        );
        // The probe goes at the end of this executable's table.
        let at = text
            .find(&format!("name = \"{exe}\""))
            .and_then(|i| {
                text[i..]
                    .find("\n[[components.executables]]")
                    .map(|j| i + j)
            })
            .unwrap_or(text.len());
        text.insert_str(at, probe.trim_end_matches('\n'));
    }
    berth.write_deployment("sick", &text)?;
    let names: Vec<String> = exes
        .iter()
        .map(|e| berth.container_name("sick", "main", e))
        .collect();
    let t0 = unix_nanos(berth.start()?);
    sys::wait_until(
        "every executable of the reaction healthy",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            berth.check()?;
            ctx.events.check()?;
            let events = ctx.events.since(t0);
            Ok(names
                .iter()
                .all(|n| first_after(&events, n, "health_status: healthy", t0).is_some()))
        },
    )?;

    let (mut detect, mut to_kill, mut to_start, mut all) = (vec![], vec![], vec![], vec![]);
    for (exe, name) in exes.iter().zip(&names) {
        let flag = sync.join(exe);
        let failing = unix_nanos(SystemTime::now());
        fs::write(&flag, b"sick\n").with_context(|| format!("cannot write {}", flag.display()))?;
        let mut seen = None;
        let waited = sys::wait_until(
            &format!("{name} to turn unhealthy and start again"),
            Duration::from_secs(60),
            Duration::from_millis(50),
            || {
                berth.check()?;
                ctx.events.check()?;
                let events = ctx.events.since(failing);
                let Some(unhealthy) =
                    first_after(&events, name, "health_status: unhealthy", failing)
                else {
                    return Ok(false);
                };
                let Some(kill) = first_after(&events, name, "kill", unhealthy) else {
                    return Ok(false);
                };
                seen = first_after(&events, name, "start", kill).map(|s| (unhealthy, kill, s));
                Ok(seen.is_some())
            },
        );
        // Healthy again after its start, and no second restart.
        let _ = fs::remove_file(&flag);
        waited?;
        let (unhealthy, kill, start) = seen.context("no restart seen")?;
        detect.push((unhealthy - failing) as f64 / 1e6);
        to_kill.push((kill - unhealthy) as f64 / 1e6);
        to_start.push((start - unhealthy) as f64 / 1e6);
        all.push((start - failing) as f64 / 1e6);
    }
    berth.stop()?;
    let p50_max = |v: &[f64]| -> String {
        dist(v).map_or_else(
            || "no sample".to_owned(),
            |d| format!("{} / {} (n = {})", ms(d.p50), ms(d.max), d.n),
        )
    };
    Ok(vec![
        Row::new(
            ITEM,
            format!(
                "probe failure → restart (`exec` probe every {FAST_PERIOD_SECS} s, {FAST_THRESHOLD} \
                 failures, `always`): the probe's file appears → `start` of the restart, p50 / max"
            ),
        )
        .berth(p50_max(&all)),
        Row::new(
            ITEM,
            format!(
                "… of which detection: the file appears → engine `health_status: unhealthy` \
                 (inherent: up to period × threshold = {} s, plus the probe runs: the engine \
                 waits a period after each run ends), p50 / max",
                FAST_PERIOD_SECS * u64::from(FAST_THRESHOLD)
            ),
        )
        .berth(p50_max(&detect)),
        Row::new(
            ITEM,
            "… after the last failed probe: `health_status: unhealthy` → `start` (event delivery, \
             berth's decision, the stop with SIGTERM, the start), p50 / max",
        )
        .berth(p50_max(&to_start)),
        Row::new(
            ITEM,
            "… of which `health_status: unhealthy` → berth's stop (`kill`), p50 / max",
        )
        .berth(p50_max(&to_kill)),
    ])
}
