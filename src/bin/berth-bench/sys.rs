//! The host side of the bench: child processes run with deadlines, the
//! resource figures of a process read from `/proc`, clocks, and the emergency
//! clean-up.
//!
//! The release profile aborts on panic, so no destructor runs then: every
//! child process and every container name prefix the bench creates is also
//! recorded here, and `emergency()` (called from the panic hook and on
//! SIGINT/SIGTERM) kills and removes them.

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::engine::Engine;

/// The kernel reports utime and stime in USER_HZ ticks, 100 a second on
/// every Linux architecture (whatever CONFIG_HZ is).
pub const USER_HZ: f64 = 100.0;

// --- child processes ---------------------------------------------------------

/// `program arg...`, shortened, for error messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
        if text.len() > 160 {
            text.truncate(157);
            text.push_str("...");
            break;
        }
    }
    text
}

/// Runs `command` with stdin closed and returns its stdout. Fails with its
/// stderr when it exits non-zero, and kills it when it runs past `timeout`.
pub fn run(command: &mut Command, timeout: Duration) -> Result<String> {
    if aborting() {
        bail!("interrupted");
    }
    let what = describe(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{what}`"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_for(child, timeout);
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(stdout),
        Some(status) => bail!("`{what}` failed ({status}): {}", stderr.trim()),
        None => bail!("`{what}` did not finish within {timeout:?} and was killed"),
    }
}

/// `first | second`, both killed past `timeout`.
pub fn pipe(first: &mut Command, second: &mut Command, timeout: Duration) -> Result<()> {
    let what = format!("{} | {}", describe(first), describe(second));
    let deadline = Instant::now() + timeout;
    let mut producer = first
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{what}`"))?;
    let Some(out) = producer.stdout.take() else {
        bail!("`{what}`: no pipe");
    };
    let consumer = second
        .stdin(Stdio::from(out))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut consumer = match consumer {
        Ok(child) => child,
        Err(e) => {
            let _ = producer.kill();
            let _ = producer.wait();
            return Err(e).with_context(|| format!("cannot run `{what}`"));
        }
    };
    let producer_err = drain(producer.stderr.take());
    let consumer_err = drain(consumer.stderr.take());
    let a = wait_for(producer, deadline.saturating_duration_since(Instant::now()));
    let b = wait_for(consumer, deadline.saturating_duration_since(Instant::now()));
    let errors = format!(
        "{} {}",
        producer_err.join().unwrap_or_default().trim(),
        consumer_err.join().unwrap_or_default().trim()
    );
    match (a, b) {
        (Some(a), Some(b)) if a.success() && b.success() => Ok(()),
        (Some(_), Some(_)) => bail!("`{what}` failed: {}", errors.trim()),
        _ => bail!("`{what}` did not finish within {timeout:?} and was killed"),
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child` to exit, precisely (a blocking wait, no polling); kills
/// it after `timeout` and returns None then.
pub fn wait_for(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => Some(status),
        Ok(Err(_)) => None,
        Err(_) => {
            // Not reaped yet, so the pid is still this child's.
            signal(pid, Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(10));
            None
        }
    }
}

pub fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether process `pid` runs (a zombie, exited but not reaped, does not).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Opens `path` for appending, for the output of a background service.
pub fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Starts `command` in the background with stdin closed and its output
/// appended to `log`, and records it for the emergency clean-up.
pub fn spawn_logged(command: &mut Command, log: &Path, graceful: bool) -> Result<Child> {
    if aborting() {
        bail!("interrupted");
    }
    let out = log_file(log)?;
    let err = out
        .try_clone()
        .context("cannot duplicate a log file handle")?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(command)))?;
    track_pid(child.id(), graceful);
    Ok(child)
}

/// The last `lines` lines of a text file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `ready` every `every` until it holds; fails with `what` after
/// `timeout`. An error from `ready` ends the wait at once.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(());
        }
        if aborting() {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(every);
    }
}

// --- /proc figures -------------------------------------------------------------

/// One reading of a process's resident memory and CPU time.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    pub rss_kb: u64,
    /// Peak resident memory since the process started.
    pub hwm_kb: u64,
    /// utime + stime, in USER_HZ ticks, all threads.
    pub cpu_ticks: u64,
}

pub fn sample(pid: u32) -> Result<ProcSample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/status has no {name}"))
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. utime and stime are fields 14 and 15 of proc(5).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat is short"))
    };
    Ok(ProcSample {
        at: Instant::now(),
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
        cpu_ticks: tick(11)? + tick(12)?,
    })
}

/// Where a process's resident memory is, from `/proc/PID/smaps`: its own
/// binary's pages, the brk heap, other anonymous mappings (thread malloc
/// arenas, stacks), shared libraries; in kB, largest first.
pub fn rss_breakdown(pid: u32) -> Result<Vec<(&'static str, u64)>> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("process {pid} is gone"))?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut sums = [
        ("binary", 0u64),
        ("heap", 0),
        ("other anonymous", 0),
        ("libraries", 0),
    ];
    let mut group = 2;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: range perms offset dev inode [path].
            let path = line.split_whitespace().nth(5).unwrap_or("");
            group = if path == exe {
                0
            } else if path == "[heap]" {
                1
            } else if path.starts_with('/') {
                3
            } else {
                2
            };
        } else if first == "Rss:" {
            sums[group].1 += words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut out: Vec<(&'static str, u64)> = sums.to_vec();
    out.sort_by_key(|(_, kb)| std::cmp::Reverse(*kb));
    Ok(out)
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(from: &ProcSample, to: &ProcSample) -> f64 {
    let secs = to.at.duration_since(from.at).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    (to.cpu_ticks.saturating_sub(from.cpu_ticks)) as f64 / USER_HZ / secs * 100.0
}

// --- clocks ----------------------------------------------------------------------

pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The host's uptime (seconds, from `/proc/uptime`) beside the wall clock.
/// Containers read the same `/proc/uptime`, so a script inside one can wait
/// for a given uptime, to a hundredth of a second, which `date` cannot do.
#[derive(Debug, Clone, Copy)]
pub struct UptimeClock {
    pub uptime: f64,
    pub wall_nanos: i64,
}

impl UptimeClock {
    pub fn now() -> Result<UptimeClock> {
        let text = fs::read_to_string("/proc/uptime").context("cannot read /proc/uptime")?;
        let uptime = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("/proc/uptime is unreadable")?;
        Ok(UptimeClock {
            uptime,
            wall_nanos: unix_nanos(SystemTime::now()),
        })
    }

    /// The wall time (ns since the epoch) of a given uptime.
    pub fn wall_nanos_at(&self, uptime: f64) -> i64 {
        self.wall_nanos + ((uptime - self.uptime) * 1e9) as i64
    }
}

// --- emergency clean-up ----------------------------------------------------------

struct Registry {
    /// Children killed at once (berth, brokers, event watchers).
    kill: Vec<u32>,
    /// Children stopped with SIGTERM and waited for (a second dockerd, which
    /// stops its containers and unmounts on the way out).
    term: Vec<u32>,
    /// (engine host, container name prefix) of containers the bench made.
    prefixes: Vec<(Option<String>, String)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    kill: Vec::new(),
    term: Vec::new(),
    prefixes: Vec::new(),
});
static ABORTING: AtomicBool = AtomicBool::new(false);
/// Held for the whole emergency clean-up, so that the main thread, ending
/// meanwhile, waits for it instead of ending the process under it.
static CLEANUP: Mutex<()> = Mutex::new(());

thread_local! {
    /// Set on the thread that runs the emergency clean-up, whose own docker
    /// commands must still run.
    static CLEANING: Cell<bool> = const { Cell::new(false) };
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// True once an interruption began: new commands are refused.
pub fn aborting() -> bool {
    ABORTING.load(Ordering::Relaxed) && !CLEANING.with(Cell::get)
}

/// True once an interruption began, on any thread: the emergency clean-up
/// owns the removals then.
pub fn interrupted() -> bool {
    ABORTING.load(Ordering::Relaxed)
}

pub fn track_pid(pid: u32, graceful: bool) {
    let mut r = registry();
    if graceful {
        r.term.push(pid);
    } else {
        r.kill.push(pid);
    }
}

pub fn untrack_pid(pid: u32) {
    let mut r = registry();
    r.kill.retain(|p| *p != pid);
    r.term.retain(|p| *p != pid);
}

pub fn track_prefix(host: Option<String>, prefix: String) {
    registry().prefixes.push((host, prefix));
}

pub fn untrack_prefix(host: &Option<String>, prefix: &str) {
    registry()
        .prefixes
        .retain(|(h, p)| !(h == host && p == prefix));
}

/// Kills every child the bench started and removes every container it made;
/// for a panic or a signal, when destructors will not run.
pub fn emergency() {
    let _cleaning = CLEANUP.lock().unwrap_or_else(PoisonError::into_inner);
    ABORTING.store(true, Ordering::Relaxed);
    CLEANING.with(|c| c.set(true));
    let (kill_pids, term_pids, prefixes) = {
        let r = registry();
        (r.kill.clone(), r.term.clone(), r.prefixes.clone())
    };
    eprintln!("berth-bench: cleaning up after an interruption");
    // berth first, so that it restarts nothing that is being removed.
    for pid in &kill_pids {
        signal(*pid, Signal::SIGKILL);
    }
    // Twice: a `docker run` already under way when the first list was
    // taken may finish after it.
    for round in 0..2 {
        if round > 0 {
            thread::sleep(Duration::from_secs(2));
        }
        for (host, prefix) in &prefixes {
            let engine = match host {
                Some(h) => Engine::at(h),
                None => Engine::local(),
            };
            if let Err(e) = engine.remove(prefix) {
                eprintln!("berth-bench: cannot remove containers {prefix}*: {e:#}");
            }
        }
    }
    for pid in &term_pids {
        signal(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while term_pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
}

/// Called by the main thread before it ends: if an interruption is being
/// cleaned up, waits for that and ends the process as interrupted.
pub fn finish() {
    let _done = CLEANUP.lock().unwrap_or_else(PoisonError::into_inner);
    if ABORTING.load(Ordering::Relaxed) {
        std::process::exit(130);
    }
}

// --- systemd's side of the notify protocol ----------------------------------------

/// A stand-in for systemd's notify socket: a datagram socket the bench binds
/// and drains, counting `WATCHDOG=1` pings, so that berth runs with its
/// watchdog armed as it does under the shipped unit.
pub struct NotifySocket {
    path: std::path::PathBuf,
    pings: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> Result<NotifySocket> {
        use std::os::unix::net::UnixDatagram;
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let _ = fs::remove_file(path);
        let socket = UnixDatagram::bind(path)
            .with_context(|| format!("cannot bind a notify socket at {}", path.display()))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .context("cannot set a timeout on the notify socket")?;
        let pings = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (pings, stop) = (Arc::clone(&pings), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if text.lines().any(|l| l == "WATCHDOG=1") {
                            pings.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Ok(NotifySocket {
            path: path.to_owned(),
            pings,
            stop,
            reader: Some(reader),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn watchdog_pings(&self) -> usize {
        self.pings.load(Ordering::Relaxed)
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

// --- load ------------------------------------------------------------------------

/// A busy loop per core (`sh -c 'while :; do :; done'`), at normal
/// priority, for the figures under load; killed when dropped and by the
/// emergency clean-up.
pub struct CpuHog {
    children: Vec<Child>,
}

impl CpuHog {
    pub fn start() -> Result<CpuHog> {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        let mut children = Vec::with_capacity(cores);
        for _ in 0..cores {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start a CPU hog (sh)")?;
            track_pid(child.id(), false);
            children.push(child);
        }
        Ok(CpuHog { children })
    }

    pub fn cores(&self) -> usize {
        self.children.len()
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            untrack_pid(child.id());
        }
    }
}
