//! `berth-bench`: measures berth against the Docker engine's own mechanisms
//! on this machine and prints one table (see BENCHMARKS.md).
//!
//! `cargo run --release --bin berth-bench [-- --quick] [-- --only restart,storm]`
//!
//! It builds the release `berth` beside itself, starts its own Mosquitto
//! brokers on free ports, and names everything it creates after a run id
//! (`bbench-<pid>-<hex>`): berth device ids, container names, a compose
//! project, a second `dockerd` in `/tmp/berth-bench-<pid>`. Every container
//! it made is removed at the end, on failure, on Ctrl-C and on panic; what an
//! earlier run left behind (its process gone) is removed at the start.
//!
//! Each benchmark is a module, numbered by the item of BENCHMARKS.md it
//! answers: `restart` (1: against the engine's policy and the floor, berth's
//! own share from its trace file, exit → MQTT), `burst` (1: many exits at
//! once), `storm` (2), `provision` (3, and 5: the footprint), `reboot` (4),
//! `build` (8), `probes` (9), `fleet` (10); `--soak DURATION` runs the soak
//! of `soak` instead (a long run that watches berth's memory, descriptors
//! and tasks for growth). The host side lives in `sys`, the engine in `engine` and
//! `api` (the floor, straight through the engine's API), the broker in
//! `mqtt`, berth in `berth`, the figures and the table in `report`.
//!
//! Exit status: 0 every figure produced and every target met, 3 a target
//! missed, 2 a benchmark could not produce its figures, 1 the harness could
//! not start.

mod api;
mod berth;
mod build;
mod burst;
mod engine;
mod fleet;
mod mqtt;
mod probes;
mod provision;
mod reboot;
mod report;
mod restart;
mod soak;
mod storm;
mod sys;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use engine::{Engine, Events, IMAGE};
use report::{Row, Verdict};

/// Container names, device ids and networks of a run start with this.
pub const RUN_PREFIX: &str = "bbench-";
/// A run's work directory is `/tmp/<this><pid>`.
pub const WORK_DIR_PREFIX: &str = "berth-bench-";

/// Measures berth against the Docker engine's own restart policy,
/// docker-compose and `docker run`, and prints the table of BENCHMARKS.md.
#[derive(Parser)]
#[command(about, long_about = None)]
struct Flags {
    /// Run only these benchmarks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Bench>,
    /// Smaller counts and shorter windows: a smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// The berth binary to measure [default: `berth` beside this program,
    /// built first with cargo].
    #[arg(long)]
    berth: Option<PathBuf>,
    /// Keep the work directory (configs, berth's logs, storm.csv) after a run
    /// without errors; it is always kept after one with errors.
    #[arg(long)]
    keep: bool,
    /// Also write the table (Markdown) to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Extra environment for every berth the bench starts, KEY=VALUE
    /// (repeatable), e.g. MALLOC_ARENA_MAX=2 to compare allocator settings.
    #[arg(long, value_parser = parse_env)]
    berth_env: Vec<(String, String)>,
    /// Run every selected benchmark a second time with a busy loop on every
    /// core, and report both columns.
    #[arg(long)]
    load: bool,
    /// Write the table and the machine description into this file (e.g.
    /// BENCHMARKS.md) between `<!-- bench:begin -->` and
    /// `<!-- bench:end -->`, leaving the rest of it as it is.
    #[arg(long, value_name = "FILE")]
    results: Option<PathBuf>,
    /// Instead of the benchmarks, a soak of this long (`65m`, `120s`):
    /// crash loops, updates, reloads, broker outages and operator restarts,
    /// with berth's memory, descriptors, threads and tasks sampled for
    /// growth; `--results` writes between `<!-- soak:begin -->` and
    /// `<!-- soak:end -->`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// The disturbances of the soak, taken in turn every 30 s; `none` for
    /// the crash loops alone.
    #[arg(long, value_delimiter = ',', default_values = ["update", "reload", "outage", "restart"], requires = "soak")]
    soak_disturbances: Vec<soak::Disturbance>,
}

fn parse_env(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// 1: die → start under berth, under `--restart always` and the floor.
    Restart,
    /// 1: die → MQTT document (runs with `restart`).
    Mqtt,
    /// 1: many executables exiting at the same moment.
    Burst,
    /// 2: 100 executables crash-looping beside a healthy canary.
    Storm,
    /// 3: 50 × 2 executables against the floor, docker-compose and `docker run`.
    Provision,
    /// 4: recovery after an engine restart and a reboot.
    Reboot,
    /// 5: memory, idle CPU, binary size (berth managing item 3's containers).
    Footprint,
    /// 8: the release build from scratch (only when named: it takes minutes).
    Build,
    /// 9: what exec probes and metrics cost berth and the engine, and probe
    /// failure → restart.
    Probes,
    /// 10: the fleet: signed command round trips through a bridge, and
    /// `berth fleet --json` over 1 000 simulated devices.
    Fleet,
}

/// What every benchmark gets.
pub struct Ctx {
    pub run_id: String,
    pub dir: PathBuf,
    pub berth_bin: PathBuf,
    /// Extra environment for berth (`--berth-env`).
    pub berth_env: Vec<(String, String)>,
    pub quick: bool,
    /// This pass runs under the CPU hog (`--load`).
    pub loaded: bool,
    pub engine: Engine,
    /// The machine engine's events for this run's containers, from the start.
    pub events: Events,
}

impl Ctx {
    /// The label on every container the bench runs itself.
    pub fn label(&self) -> String {
        format!("berth-bench.run={}", self.run_id)
    }

    /// berth's options for this run: SPEC defaults and `--berth-env`.
    pub fn berth_options(
        &self,
        device_id: &str,
        mqtt_port: u16,
        docker_host: &str,
    ) -> berth::Options {
        let mut options = berth::Options::new(device_id, mqtt_port, docker_host);
        options.env = self.berth_env.clone();
        options
    }

    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}

/// How a run ended, for the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Every figure produced, every target met: 0.
    Met,
    /// A target missed: 3.
    Missed,
    /// A benchmark could not produce its figures: 2.
    Errors,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    install_handlers();
    let code = match run(flags) {
        Ok(Outcome::Met) => ExitCode::SUCCESS,
        Ok(Outcome::Missed) => ExitCode::from(3),
        Ok(Outcome::Errors) => ExitCode::from(2),
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            sys::emergency();
            return ExitCode::FAILURE;
        }
    };
    sys::finish();
    code
}

/// Runs the selected benchmarks (twice with `--load`) and reports.
fn run(flags: Flags) -> Result<Outcome> {
    let began = Instant::now();
    let selected = |b: Bench| {
        if flags.soak.is_some() {
            false
        } else if flags.only.is_empty() {
            b != Bench::Build
        } else {
            flags.only.contains(&b)
        }
    };
    let engine = Engine::local();
    preflight(&engine, &flags, &selected)?;
    if let Some(path) = flags.results.as_ref().filter(|_| flags.soak.is_none()) {
        // Before an hour of measuring, not after.
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        report::replace_between_markers(&text, "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let tmp = std::env::temp_dir();
    for line in engine::remove_leftovers(&engine, &tmp)? {
        println!("berth-bench: {line}");
    }
    let berth_bin = match &flags.berth {
        Some(path) => path.clone(),
        None => build_berth()?,
    };
    if !berth_bin.is_file() {
        bail!("no berth binary at {}", berth_bin.display());
    }

    let pid = std::process::id();
    let run_id = format!(
        "{RUN_PREFIX}{pid}-{:x}",
        sys::unix_nanos(SystemTime::now()) / 1_000_000 % 0xff_ffff
    );
    let dir = tmp.join(format!("{WORK_DIR_PREFIX}{pid}"));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let events = Events::watch(
        &engine,
        vec![run_id.clone(), format!("berth.{run_id}")],
        SystemTime::now(),
        &dir.join("events.log"),
    )?;
    let mut ctx = Ctx {
        run_id,
        dir,
        berth_bin,
        berth_env: flags.berth_env.clone(),
        quick: flags.quick,
        loaded: false,
        engine,
        events,
    };
    println!(
        "berth-bench: run {} ({}{}), berth {}{}, work dir {}",
        ctx.run_id,
        if ctx.quick { "quick" } else { "full" },
        if flags.load { ", then under load" } else { "" },
        ctx.berth_bin.display(),
        ctx.berth_env
            .iter()
            .map(|(k, v)| format!(" {k}={v}"))
            .collect::<String>(),
        ctx.dir.display()
    );
    let machine = machine(&ctx.engine);
    println!("berth-bench: machine: {machine}");
    if let Some(duration) = flags.soak {
        return soak::main(
            &ctx,
            duration,
            &flags.soak_disturbances,
            flags.results.as_deref(),
            flags.keep,
        );
    }

    let (mut rows, mut timings) = run_lanes(&ctx, &selected);
    if flags.load && !sys::interrupted() {
        let hog = sys::CpuHog::start()?;
        println!(
            "berth-bench: again, under load: a busy loop on each of {} cores",
            hog.cores()
        );
        ctx.loaded = true;
        let (loaded, more) = run_lanes(&ctx, &|b| selected(b) && b != Bench::Build);
        drop(hog);
        report::merge_loaded(&mut rows, loaded);
        timings.extend(more.into_iter().map(|t| format!("{t} (under load)")));
    }

    // Belt and braces: nothing of this run may stay.
    for prefix in [ctx.run_id.clone(), format!("berth.{}", ctx.run_id)] {
        if sys::interrupted() {
            break; // the emergency clean-up removes them
        }
        if let Err(e) = ctx.engine.remove(&prefix) {
            eprintln!("berth-bench: cannot remove containers {prefix}*: {e:#}");
        }
    }
    let _ = ctx.engine.remove_networks(&ctx.run_id);
    rows.sort_by_key(|r| r.item);

    let table = report::table(&rows);
    let total = began.elapsed();
    let errors = rows.iter().filter(|r| r.verdict == Verdict::Error).count();
    let failed = rows.iter().filter(|r| r.verdict == Verdict::Fail).count();
    let command = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--results") && !a.starts_with("--markdown"))
        .collect::<Vec<_>>()
        .join(" ");
    let summary = format!(
        "Run: `berth-bench{}{command}` ({}), berth {}, {} UTC, {:.1} min ({}).\n\n\
         Machine: {machine}; load average at the end {}.\n\n\
         {failed} target(s) missed, {errors} benchmark error(s).\n",
        if command.is_empty() { "" } else { " " },
        if ctx.quick {
            "quick: small counts, figures for a smoke test only"
        } else {
            "full"
        },
        berth_revision(),
        humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .replace('T', " ")
            .trim_end_matches('Z'),
        total.as_secs_f64() / 60.0,
        timings.join(", "),
        loadavg(),
    );
    println!("\n{table}\n{summary}");
    if let Some(path) = &flags.markdown {
        fs::write(path, format!("{table}\n{summary}"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &flags.results {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = report::replace_between_markers(&text, &format!("{summary}\n{table}"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("berth-bench: results written into {}", path.display());
    }
    if errors == 0 && !flags.keep {
        let _ = fs::remove_dir_all(&ctx.dir);
    } else {
        println!("berth-bench: logs kept in {}", ctx.dir.display());
    }
    Ok(if errors > 0 {
        Outcome::Errors
    } else if failed > 0 {
        Outcome::Missed
    } else {
        Outcome::Met
    })
}

/// Runs each selected benchmark once; returns their rows and how long each
/// took.
fn run_lanes(ctx: &Ctx, selected: &dyn Fn(Bench) -> bool) -> (Vec<Row>, Vec<String>) {
    let mut rows: Vec<Row> = Vec::new();
    let mut timings = Vec::new();
    let mut step = |name: &str, item: u8, f: &dyn Fn(&Ctx) -> Result<Vec<Row>>| {
        if sys::interrupted() {
            return;
        }
        let t = Instant::now();
        println!("berth-bench: {name} …");
        let result = f(ctx);
        let took = t.elapsed();
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("berth-bench: {name} failed: {e:#}");
                rows.push(Row::error(item, name, &e));
            }
        }
        println!("berth-bench: {name} took {:.0} s", took.as_secs_f64());
        timings.push(format!("{name} {:.0} s", took.as_secs_f64()));
    };
    if selected(Bench::Restart) || selected(Bench::Mqtt) {
        step("restart reaction", 1, &restart::run);
    }
    if selected(Bench::Burst) {
        step("burst", 1, &burst::run);
    }
    if selected(Bench::Storm) {
        step("crash-loop storm", 2, &storm::run);
    }
    let compare = selected(Bench::Provision);
    let footprint = selected(Bench::Footprint);
    if compare || footprint {
        step("provisioning and footprint", 3, &|ctx| {
            provision::run(ctx, compare, footprint)
        });
    }
    if selected(Bench::Reboot) {
        step("reboot recovery", 4, &reboot::run);
    }
    if selected(Bench::Probes) {
        step("probes and metrics", 9, &probes::run);
    }
    if selected(Bench::Fleet) {
        step("fleet", 10, &fleet::run);
    }
    if selected(Bench::Build) {
        step("build cost", 8, &build::run);
    }
    (rows, timings)
}

/// The commit of the source tree the bench was built from, `+` when it has
/// uncommitted changes.
fn berth_revision() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        sys::run(
            Command::new("git").arg("-C").arg(dir).args(args),
            Duration::from_secs(10),
        )
        .map(|o| o.trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Ok(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_ok_and(|s| !s.is_empty());
            format!("{rev}{}", if dirty { "+" } else { "" })
        }
        Err(_) => "(unknown commit)".to_owned(),
    }
}

/// Fails early, with what to do, when a tool or the image is missing.
fn preflight(engine: &Engine, _flags: &Flags, selected: &dyn Fn(Bench) -> bool) -> Result<()> {
    engine
        .version()
        .context("the Docker engine does not answer: run scripts/setup.sh (as root)")?;
    engine
        .docker(&["image", "inspect", "--format", "{{.Id}}", IMAGE])
        .with_context(|| format!("the test image {IMAGE} is missing: run scripts/setup.sh"))?;
    let need = |program: &str, why: &str| -> Result<()> {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("{program} is needed {why} and is not on PATH: run scripts/setup.sh");
        }
        Ok(())
    };
    need("mosquitto", "(berth reports to it)")?;
    if selected(Bench::Provision) {
        need("docker-compose", "for the provisioning comparison")?;
    }
    if selected(Bench::Reboot) {
        need("dockerd", "for the reboot comparison (a second engine)")?;
        need(
            "unshare",
            "for the reboot comparison (the second engine's network namespace)",
        )?;
        need(
            "ip",
            "for the reboot comparison (loopback in that namespace)",
        )?;
        use std::os::unix::fs::MetadataExt;
        if fs::metadata("/proc/self").map_or(true, |m| m.uid() != 0) {
            bail!("the reboot comparison starts a second dockerd and needs root");
        }
    }
    Ok(())
}

/// Builds the `berth` binary beside this one, with the same profile, and
/// returns its path.
fn build_berth() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let bin_dir = exe.parent().context("this program has no directory")?;
    let target_dir = bin_dir
        .parent()
        .context("this program is not in a target dir")?;
    let release = bin_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .args(["build", "--bin", "berth", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir);
    // `cargo run` hands this program the package's CARGO_MANIFEST_DIR,
    // CARGO_PKG_*...; build scripts that watch them (ring's) would see a
    // change and rebuild, here and again in the next plain `cargo build`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
        {
            command.env_remove(key.as_ref());
        }
    }
    if release {
        command.arg("--release");
    } else {
        eprintln!("berth-bench: not a release build: measuring a debug berth (use --release)");
    }
    println!("berth-bench: building berth ({})", sys::describe(&command));
    let status = command
        .status()
        .with_context(|| format!("cannot run `{}`", sys::describe(&command)))?;
    if !status.success() {
        bail!("building berth failed ({status})");
    }
    Ok(bin_dir.join("berth"))
}

/// One line about the machine: cores, memory, engine, kernel, OS, load.
fn machine(engine: &Engine) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_default();
    format!(
        "{cores} cores, {:.1} GiB, Docker {}, kernel {}, {os}, load average {}",
        mem_kb as f64 / 1024.0 / 1024.0,
        engine
            .version()
            .unwrap_or_else(|e| format!("unknown ({e})")),
        kernel.trim(),
        loadavg()
    )
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Ctrl-C, SIGTERM and panics clean up before the process ends: the release
/// profile aborts on panic, and a signal would end the process without
/// destructors.
fn install_handlers() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        sys::emergency();
    }));
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            eprintln!("berth-bench: cannot watch for signals; Ctrl-C will leave containers behind");
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("berth-bench: interrupted");
            sys::emergency();
            std::process::exit(130);
        });
    });
    // Give the signal thread a moment to install its handlers.
    std::thread::sleep(Duration::from_millis(20));
}
