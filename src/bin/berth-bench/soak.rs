//! `--soak DURATION`: one release berth, as shipped (info text logs), kept
//! busy for a long time, to see whether anything grows. It talks to a
//! Mosquitto of its own (stopped and started again on the same port for the
//! outages), to the machine's engine through the `docker` CLI (containers
//! named after the run id), to berth's deployment files and to its control
//! socket.
//!
//! berth runs three crash-looping deployments (`always`, exit 1 two seconds
//! after each start, back-off from 0.5 s capped at 4 s, so they restart about
//! every 6 s for the whole run) and three healthy ones. Every 30 s one
//! disturbance, in turn:
//! - update: a healthy deployment gets a new `package_version` and `env`, so
//!   its container is replaced;
//! - reload: a deployment file rewritten as it was, then another removed
//!   (awaited until its container is gone) and written back;
//! - broker outage: the bench's Mosquitto killed for 5 s, then started again
//!   on the same port;
//! - operator restart: `restart DEPLOYMENT` through the control socket, as
//!   `berth restart` sends it.
//!
//! `--soak-disturbances` takes a subset (`none` for the crash loops alone),
//! to tell which of them a growth comes from.
//!
//! Every 10 s it samples berth's resident memory (VmRSS, and its anonymous
//! part RssAnon apart: the rest is the binary's pages, read in as new code
//! paths run, which no leak explains), open descriptors
//! (entries of `/proc/PID/fd`), threads (`Threads:` of `/proc/PID/status`)
//! and live runtime tasks (`runtime.alive_tasks` of the control socket's
//! `status` answer) into `soak/soak.csv` in the work directory. At the end it
//! prints, and with `--results FILE` writes between the soak markers of that
//! file, the start, end, min and max of each and its least-squares slope per
//! hour, over the whole run and after the warm-up (the first sixth of the
//! run, at most 5 minutes), with the disturbances done.
//!
//! Targets, judged after the warm-up: RSS slope below 0.5 MB/h; descriptors
//! flat, meaning a slope below 1 per hour (one descriptor lost per
//! disturbance would be 120 per hour). Threads and tasks are reported without
//! a target.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::berth::{deployment, Berth};
use crate::engine::{Containers, LONG_RUNNING};
use crate::sys;
use crate::{Ctx, Outcome};

/// The markers between which the soak writes its figures.
pub const BEGIN: &str = "<!-- soak:begin -->";
pub const END: &str = "<!-- soak:end -->";

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const DISTURB_EVERY: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(5);
const CRASHING: usize = 3;
const HEALTHY: usize = 3;
/// Exits 1 two seconds after each start.
const CRASH: &str = "sleep 2; exit 1";

/// RSS slope after the warm-up must stay below this (MB per hour).
const RSS_SLOPE_MAX: f64 = 0.5;
/// Descriptors are flat when their slope after the warm-up stays below this
/// (per hour).
const FD_SLOPE_MAX: f64 = 1.0;

/// One reading of berth.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    rss_kb: u64,
    /// The anonymous part of it (RssAnon: heap, stacks); the rest is mostly
    /// the binary's and the libraries' pages, read in as code runs.
    anon_kb: u64,
    fds: u64,
    threads: u64,
    /// None when the control socket did not answer in time.
    tasks: Option<u64>,
}

/// What `--soak-disturbances` may name; `none` leaves the crash loops alone
/// at work (to tell what a growth comes from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Disturbance {
    Update,
    Reload,
    Outage,
    Restart,
    None,
}

/// The default turn of disturbances.
pub const CYCLE: [Disturbance; 4] = [
    Disturbance::Update,
    Disturbance::Reload,
    Disturbance::Outage,
    Disturbance::Restart,
];

#[derive(Debug, Default)]
struct Counts {
    updates: usize,
    reloads: usize,
    outages: usize,
    restarts: usize,
    /// Disturbances that did not go as planned (an operator restart refused,
    /// a deployment that did not go away), with what happened.
    failures: Vec<String>,
}

pub fn main(
    ctx: &Ctx,
    duration: Duration,
    disturbances: &[Disturbance],
    results: Option<&Path>,
    keep: bool,
) -> Result<Outcome> {
    let cycle: Vec<Disturbance> = disturbances
        .iter()
        .copied()
        .filter(|d| *d != Disturbance::None)
        .collect();
    if let Some(path) = results {
        // Before an hour of soaking, not after.
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        replace_between_markers(&text, "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let revision = crate::berth_revision();
    let machine = crate::machine(&ctx.engine);
    let began = SystemTime::now();
    let dir = ctx.subdir("soak")?;
    let mut broker = Broker::start(&dir)?;
    let device = format!("{}-k", ctx.run_id);
    let mut options = ctx.berth_options(&device, broker.port, &ctx.engine.url());
    options.backoff_initial_ms = 500;
    options.backoff_max_secs = 4;
    options.backoff_reset_after_secs = 60;
    let mut berth = Berth::new(&ctx.berth_bin, &dir, options)?;
    let containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    for i in 0..CRASHING {
        let id = format!("crash{i}");
        berth.write_deployment(&id, &deployment(&id, "always", &[("app", CRASH)]))?;
    }
    for i in 0..HEALTHY {
        let id = format!("steady{i}");
        berth.write_deployment(&id, &healthy(&id, 0))?;
    }
    berth.start()?;
    let pid = berth.pid()?;
    let socket = dir.join("state").join("berth.sock");
    let prefix = berth.container_prefix();
    sys::wait_until(
        "the healthy deployments to run",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            berth.check()?;
            Ok(ctx.engine.running(&format!("{prefix}steady"))? >= HEALTHY)
        },
    )?;
    println!(
        "berth-bench: soak for {} (berth pid {pid}): {CRASHING} crash loops, {HEALTHY} healthy \
         deployments, {}, a sample every {} s into {}",
        humantime::format_duration(duration),
        if cycle.is_empty() {
            "no disturbances".to_owned()
        } else {
            format!("{cycle:?} in turn every {} s", DISTURB_EVERY.as_secs()).to_lowercase()
        },
        SAMPLE_EVERY.as_secs(),
        dir.join("soak.csv").display()
    );

    let mut csv = File::create(dir.join("soak.csv")).context("cannot create soak.csv")?;
    writeln!(csv, "seconds,rss_kb,rss_anon_kb,fds,threads,alive_tasks")?;
    let started = Instant::now();
    let end = started + duration;
    let mut samples: Vec<Sample> = Vec::new();
    let mut counts = Counts::default();
    let mut next_sample = started;
    let mut next_disturbance = started + DISTURB_EVERY;
    let mut turn = 0usize;
    let mut next_progress = started + Duration::from_secs(300);
    loop {
        let now = Instant::now();
        if now >= next_sample {
            berth.check()?;
            let s = sample(pid, &socket, started)?;
            writeln!(
                csv,
                "{:.1},{},{},{},{},{}",
                s.secs,
                s.rss_kb,
                s.anon_kb,
                s.fds,
                s.threads,
                s.tasks.map(|t| t.to_string()).unwrap_or_default()
            )?;
            csv.flush()?;
            samples.push(s);
            next_sample += SAMPLE_EVERY;
            if now >= end {
                break;
            }
            if now >= next_progress {
                println!(
                    "berth-bench: soak {:.0} min: RSS {}, {} fds, {} threads, {} tasks; {} \
                     updates, {} reloads, {} outages, {} restarts",
                    s.secs / 60.0,
                    crate::report::mb(s.rss_kb),
                    s.fds,
                    s.threads,
                    s.tasks.map_or("?".to_owned(), |t| t.to_string()),
                    counts.updates,
                    counts.reloads,
                    counts.outages,
                    counts.restarts
                );
                next_progress += Duration::from_secs(300);
            }
            continue;
        }
        if now >= next_disturbance && now < end && !cycle.is_empty() {
            let what = cycle[turn % cycle.len()];
            disturb(
                ctx,
                &mut berth,
                &mut broker,
                &socket,
                what,
                turn,
                &mut counts,
            )?;
            turn += 1;
            next_disturbance += DISTURB_EVERY;
            continue;
        }
        if sys::interrupted() {
            bail!("interrupted");
        }
        let wake = if cycle.is_empty() {
            next_sample
        } else {
            next_sample.min(next_disturbance)
        };
        std::thread::sleep(
            wake.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500)),
        );
    }
    drop(csv);
    berth.check()?;
    berth.stop()?;
    let state = berth.state().ok();
    let crash_restarts: u64 = state.as_ref().map_or(0, |state| {
        (0..CRASHING)
            .filter_map(|i| {
                state["executables"][format!("crash{i}/main/app")]["restart_count"].as_u64()
            })
            .sum()
    });
    let warnings = berth.warnings();
    drop(containers);
    drop(broker);

    let report = Report::new(&samples, duration);
    let ended = SystemTime::now();
    let timestamp = |t: SystemTime| {
        humantime::format_rfc3339_seconds(t)
            .to_string()
            .replace('T', " ")
            .trim_end_matches('Z')
            .to_owned()
    };
    let summary = format!(
        "Run: `berth-bench --soak {}{}`, berth {revision}, {} to {} UTC, {} samples, warm-up \
         {}.\n\n\
         Machine: {}; load average at the end {}.\n\n\
         Done: {crash_restarts} crash-loop restarts ({CRASHING} executables), {} updates, {} \
         reloads, {} broker outages of {} s, {} operator restarts{}; berth logged {warnings} \
         WARN/ERROR lines.\n\n{} target(s) missed.\n",
        humantime::format_duration(duration)
            .to_string()
            .replace(' ', ""),
        if disturbances == CYCLE {
            String::new()
        } else {
            format!(
                " --soak-disturbances {}",
                disturbances
                    .iter()
                    .map(|d| format!("{d:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        },
        timestamp(began),
        timestamp(ended),
        samples.len(),
        humantime::format_duration(Duration::from_secs(report.warmup_secs as u64)),
        machine,
        crate::loadavg(),
        counts.updates,
        counts.reloads,
        counts.outages,
        OUTAGE.as_secs(),
        counts.restarts,
        if counts.failures.is_empty() {
            String::new()
        } else {
            format!(
                " ({} did not go as planned: {})",
                counts.failures.len(),
                counts.failures.join("; ")
            )
        },
        report.missed,
    );
    let table = report.table();
    println!("\n{table}\n{summary}");
    if let Some(path) = results {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = replace_between_markers(&text, &format!("{summary}\n{table}"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("berth-bench: soak figures written into {}", path.display());
    }
    if keep {
        println!(
            "berth-bench: logs and soak.csv kept in {}",
            ctx.dir.display()
        );
    } else {
        let _ = fs::remove_dir_all(&ctx.dir);
    }
    Ok(if report.missed > 0 {
        Outcome::Missed
    } else {
        Outcome::Met
    })
}

/// A healthy deployment at generation `generation`: a new generation is a
/// new `package_version` and `env`, so berth replaces its container.
fn healthy(id: &str, generation: usize) -> String {
    deployment(id, "always", &[("app", LONG_RUNNING)]).replacen(
        "package_version = \"1.0.0\"\n",
        &format!("package_version = \"1.0.{generation}\"\nenv = {{ SOAK_GENERATION = \"{generation}\" }}\n"),
        1,
    )
}

fn disturb(
    ctx: &Ctx,
    berth: &mut Berth,
    broker: &mut Broker,
    socket: &Path,
    what: Disturbance,
    turn: usize,
    counts: &mut Counts,
) -> Result<()> {
    let prefix = berth.container_prefix();
    match what {
        Disturbance::Update => {
            berth.write_deployment("steady0", &healthy("steady0", turn + 1))?;
            counts.updates += 1;
        }
        Disturbance::Reload => {
            berth.write_deployment("steady1", &healthy("steady1", 0))?;
            berth.remove_deployment("steady2")?;
            let gone = sys::wait_until(
                "steady2 to be deprovisioned",
                Duration::from_secs(60),
                Duration::from_millis(250),
                || {
                    berth.check()?;
                    Ok(ctx
                        .engine
                        .containers(&format!("{prefix}steady2."))?
                        .is_empty())
                },
            );
            if let Err(e) = gone {
                counts.failures.push(format!("reload {turn}: {e:#}"));
            }
            berth.write_deployment("steady2", &healthy("steady2", 0))?;
            counts.reloads += 1;
        }
        Disturbance::Outage => {
            broker.stop();
            std::thread::sleep(OUTAGE);
            broker.restart()?;
            counts.outages += 1;
        }
        Disturbance::None => {}
        Disturbance::Restart => {
            match exchange(socket, "restart steady1", Duration::from_secs(60)) {
                Ok(answer) if answer["ok"] == true => {}
                Ok(answer) => counts.failures.push(format!("restart {turn}: {answer}")),
                Err(e) => counts.failures.push(format!("restart {turn}: {e:#}")),
            }
            counts.restarts += 1;
        }
    }
    Ok(())
}

fn sample(pid: u32, socket: &Path, started: Instant) -> Result<Sample> {
    let proc = sys::sample(pid)?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let threads = field("Threads:")?;
    let anon_kb = field("RssAnon:")?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd"))?
        .count() as u64;
    let tasks = exchange(socket, "status", Duration::from_secs(5))
        .ok()
        .and_then(|answer| answer["runtime"]["alive_tasks"].as_u64());
    Ok(Sample {
        secs: started.elapsed().as_secs_f64(),
        rss_kb: proc.rss_kb,
        anon_kb,
        fds,
        threads,
        tasks,
    })
}

/// One request line to berth's control socket, one JSON answer line back.
fn exchange(socket: &Path, request: &str, timeout: Duration) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .with_context(|| format!("no answer to {request:?}"))?;
    serde_json::from_str(&line).with_context(|| format!("not JSON: {line:?}"))
}

// --- the broker --------------------------------------------------------------------

/// `mosquitto -p PORT` that can be stopped and started again on its port.
struct Broker {
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    fn start(dir: &Path) -> Result<Broker> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port")?
            .port();
        let mut broker = Broker {
            port,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    /// Starts it on its port; a few tries, the port may still be held by
    /// the one just killed.
    fn restart(&mut self) -> Result<()> {
        for _ in 0..20 {
            let mut child = sys::spawn_logged(
                Command::new("mosquitto").args(["-p", &self.port.to_string()]),
                &self.log,
                false,
            )
            .context("mosquitto is needed: run scripts/setup.sh")?;
            let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
            let mut exited = false;
            sys::wait_until(
                "mosquitto to accept connections",
                Duration::from_secs(15),
                Duration::from_millis(20),
                || {
                    if child.try_wait()?.is_some() {
                        exited = true;
                        return Ok(true);
                    }
                    Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
                },
            )?;
            if !exited {
                self.child = Some(child);
                return Ok(());
            }
            sys::untrack_pid(child.id());
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "mosquitto did not start again on port {}:\n{}",
            self.port,
            sys::tail(&self.log, 10)
        )
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            sys::untrack_pid(child.id());
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

// --- figures -----------------------------------------------------------------------

/// The least-squares slope of `y` over `x`; None with fewer than two
/// distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    Some(sxy / sxx)
}

/// One series: its name, unit, values over time (hours) and target.
struct Series {
    name: &'static str,
    unit: &'static str,
    points: Vec<(f64, f64)>,
    /// Largest slope per hour after the warm-up, with how it reads.
    target: Option<(f64, &'static str)>,
}

struct Report {
    warmup_secs: f64,
    series: Vec<Series>,
    missed: usize,
}

impl Report {
    fn new(samples: &[Sample], duration: Duration) -> Report {
        let warmup_secs = (duration.as_secs_f64() / 6.0).min(300.0);
        let of = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
            samples
                .iter()
                .filter_map(|s| f(s).map(|v| (s.secs / 3600.0, v)))
                .collect()
        };
        let series = vec![
            Series {
                name: "resident memory (VmRSS)",
                unit: "MB",
                points: of(&|s| Some(s.rss_kb as f64 / 1024.0)),
                target: Some((RSS_SLOPE_MAX, "< 0.5 MB/h")),
            },
            Series {
                name: "… of which anonymous (RssAnon: heap, stacks)",
                unit: "MB",
                points: of(&|s| Some(s.anon_kb as f64 / 1024.0)),
                target: None,
            },
            Series {
                name: "open descriptors (/proc/PID/fd)",
                unit: "",
                points: of(&|s| Some(s.fds as f64)),
                target: Some((FD_SLOPE_MAX, "flat: < 1 /h")),
            },
            Series {
                name: "threads",
                unit: "",
                points: of(&|s| Some(s.threads as f64)),
                target: None,
            },
            Series {
                name: "live runtime tasks (`alive_tasks`)",
                unit: "",
                points: of(&|s| s.tasks.map(|t| t as f64)),
                target: None,
            },
        ];
        let mut report = Report {
            warmup_secs,
            series,
            missed: 0,
        };
        report.missed = report
            .series
            .iter()
            .filter(|s| report.verdict(s) == Some(false))
            .count();
        report
    }

    fn after_warmup(&self, series: &Series) -> Option<f64> {
        let from = self.warmup_secs / 3600.0;
        let points: Vec<(f64, f64)> = series
            .points
            .iter()
            .copied()
            .filter(|p| p.0 >= from)
            .collect();
        slope(&points)
    }

    fn verdict(&self, series: &Series) -> Option<bool> {
        let (max, _) = series.target?;
        Some(self.after_warmup(series).is_some_and(|s| s < max))
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "| figure | start | end | min | max | slope, whole run | slope after warm-up | target | result |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for s in &self.series {
            let unit = if s.unit.is_empty() {
                String::new()
            } else {
                format!(" {}", s.unit)
            };
            let value = |v: f64| {
                if s.unit == "MB" {
                    format!("{v:.2}{unit}")
                } else {
                    format!("{v:.0}")
                }
            };
            let per_hour = |v: Option<f64>| {
                v.map_or("–".to_owned(), |v| {
                    if s.unit == "MB" {
                        format!("{v:+.3}{unit}/h")
                    } else {
                        format!("{v:+.2} /h")
                    }
                })
            };
            let values: Vec<f64> = s.points.iter().map(|p| p.1).collect();
            let (Some(first), Some(last)) = (values.first(), values.last()) else {
                let _ = writeln!(out, "| {} | no samples |  |  |  |  |  |  |  |", s.name);
                continue;
            };
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.name,
                value(*first),
                value(*last),
                value(min),
                value(max),
                per_hour(slope(&s.points)),
                per_hour(self.after_warmup(s)),
                s.target.map_or("", |t| t.1),
                match self.verdict(s) {
                    Some(true) => "pass",
                    Some(false) => "**FAIL**",
                    None => "",
                }
            );
        }
        out
    }
}

/// `document` with the text between the soak markers (each on a line of its
/// own) replaced by `generated`.
pub fn replace_between_markers(document: &str, generated: &str) -> Result<String, String> {
    crate::report::replace_between(document, BEGIN, END, generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_is_the_least_squares_fit() {
        // y = 2x + 1 exactly.
        let line: Vec<(f64, f64)> = (0..10)
            .map(|x| (f64::from(x), 2.0 * f64::from(x) + 1.0))
            .collect();
        assert_eq!(slope(&line), Some(2.0));
        // Noise symmetric about a flat line leaves the slope at 0.
        let flat = [(0.0, 5.0), (1.0, 7.0), (2.0, 7.0), (3.0, 5.0)];
        assert_eq!(slope(&flat), Some(0.0));
        // (0,0) (1,1) (2,1): mean x 1, mean y 2/3, sxy = 1, sxx = 2.
        assert_eq!(slope(&[(0.0, 0.0), (1.0, 1.0), (2.0, 1.0)]), Some(0.5));
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn the_targets_are_judged_after_the_warm_up() {
        // RSS grows 1 MB in the first minute (warm-up), then stays; fds flat.
        let samples: Vec<Sample> = (0..=360)
            .map(|i| {
                let secs = f64::from(i) * 10.0;
                Sample {
                    secs,
                    rss_kb: if secs < 60.0 { 8000 } else { 9024 },
                    anon_kb: 1000,
                    fds: 20 + u64::from(i % 2 == 0),
                    threads: 3,
                    tasks: (i % 7 != 0).then_some(12),
                }
            })
            .collect();
        let report = Report::new(&samples, Duration::from_secs(3600));
        assert_eq!(report.warmup_secs, 300.0);
        assert_eq!(report.missed, 0, "{}", report.table());
        assert_eq!(report.after_warmup(&report.series[0]), Some(0.0));
        // Over the whole run the warm-up's growth shows.
        assert!(slope(&report.series[0].points).is_some_and(|s| s > 0.0));
        // A descriptor lost every 30 s fails.
        let leaking: Vec<Sample> = samples
            .iter()
            .map(|s| Sample {
                fds: 20 + (s.secs / 30.0) as u64,
                ..*s
            })
            .collect();
        let report = Report::new(&leaking, Duration::from_secs(3600));
        assert_eq!(report.missed, 1);
        assert!(report.table().contains("**FAIL**"));
    }

    #[test]
    fn only_the_soak_markers_on_lines_of_their_own_count() {
        let doc = format!("see `{BEGIN}` here\n{BEGIN}\nold\n{END}\nprose\n");
        let new = replace_between_markers(&doc, "new\n").expect("markers");
        assert_eq!(
            new,
            format!("see `{BEGIN}` here\n{BEGIN}\nnew\n{END}\nprose\n")
        );
        assert!(replace_between_markers("none", "x").is_err());
        assert!(replace_between_markers(&format!("{END}\n{BEGIN}\n"), "x").is_err());
    }
}
