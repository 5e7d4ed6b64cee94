//! The Docker engine as the bench sees it, through the `docker` CLI: the
//! containers of one name prefix, the engine's event stream (its timestamps
//! are the clock every latency here is read against), and a second, private
//! `dockerd` that the reboot comparison may restart without touching the
//! engine everyone else on the machine uses.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::sys;

/// Built by `scripts/setup.sh`: busybox with `sh`, `sleep`, `awk`.
pub const IMAGE: &str = "berth-test/busybox:1";

/// A container that runs until stopped and stops at once on SIGTERM, without
/// waking up meanwhile (an idle machine for the footprint figures).
pub const LONG_RUNNING: &str = "trap 'exit 0' TERM; sleep 2147483647 & wait; exit 0";

/// How long one ordinary docker command may take on a loaded machine.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

/// One Docker engine, the machine's own or the bench's second one.
#[derive(Debug, Clone)]
pub struct Engine {
    host: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub running: bool,
}

impl Engine {
    /// The engine the `docker` CLI talks to by default (`DOCKER_HOST`).
    pub fn local() -> Engine {
        Engine {
            host: std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()),
        }
    }

    pub fn at(host: &str) -> Engine {
        Engine {
            host: Some(host.to_owned()),
        }
    }

    pub fn host(&self) -> Option<String> {
        self.host.clone()
    }

    /// What berth's `[docker] host` must say to reach this engine.
    pub fn url(&self) -> String {
        self.host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new("docker");
        if let Some(host) = &self.host {
            command.arg("--host").arg(host);
        }
        command
    }

    pub fn docker(&self, args: &[&str]) -> Result<String> {
        self.docker_timeout(args, DOCKER_TIMEOUT)
    }

    pub fn docker_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        sys::run(self.command().args(args), timeout)
    }

    pub fn version(&self) -> Result<String> {
        let out = self.docker_timeout(
            &[
                "version",
                "--format",
                "{{.Server.Version}} (API {{.Server.APIVersion}})",
            ],
            Duration::from_secs(10),
        )?;
        Ok(out.trim().to_owned())
    }

    pub fn ping(&self) -> bool {
        self.docker_timeout(
            &["version", "--format", "{{.Server.Version}}"],
            Duration::from_secs(5),
        )
        .is_ok()
    }

    /// Every container, running or not.
    pub fn list(&self) -> Result<Vec<Container>> {
        let out = self.docker(&[
            "ps",
            "--all",
            "--no-trunc",
            "--format",
            "{{.ID}}\t{{.Names}}\t{{.State}}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut parts = line.split('\t');
                Some(Container {
                    id: parts.next()?.to_owned(),
                    name: parts.next()?.to_owned(),
                    running: parts.next()? == "running",
                })
            })
            .collect())
    }

    /// The containers whose name starts with `prefix`.
    pub fn containers(&self, prefix: &str) -> Result<Vec<Container>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|c| c.name.starts_with(prefix))
            .collect())
    }

    pub fn running(&self, prefix: &str) -> Result<usize> {
        Ok(self
            .containers(prefix)?
            .iter()
            .filter(|c| c.running)
            .count())
    }

    /// Removes (`rm --force`) every container whose name starts with
    /// `prefix`; returns how many there were.
    pub fn remove(&self, prefix: &str) -> Result<usize> {
        let ids: Vec<String> = self.containers(prefix)?.into_iter().map(|c| c.id).collect();
        self.for_chunks("rm", &["--force", "--volumes"], &ids)?;
        // One gone while the list was taken makes `rm` fail: check the end.
        let left = self.containers(prefix)?;
        if !left.is_empty() {
            let ids: Vec<String> = left.into_iter().map(|c| c.id).collect();
            self.for_chunks("rm", &["--force", "--volumes"], &ids)?;
        }
        Ok(ids.len())
    }

    /// `docker kill` of every running container whose name starts with
    /// `prefix`.
    pub fn kill(&self, prefix: &str) -> Result<usize> {
        let ids: Vec<String> = self
            .containers(prefix)?
            .into_iter()
            .filter(|c| c.running)
            .map(|c| c.id)
            .collect();
        self.for_chunks("kill", &[], &ids)?;
        Ok(ids.len())
    }

    fn for_chunks(&self, verb: &str, flags: &[&str], ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(50) {
            let mut args = vec![verb];
            args.extend_from_slice(flags);
            args.extend(chunk.iter().map(String::as_str));
            if let Err(e) = self.docker_timeout(&args, Duration::from_secs(300)) {
                // Already gone or already stopped is no failure here.
                let text = format!("{e:#}");
                if !(text.contains("No such container") || text.contains("is not running")) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes the networks whose name starts with `prefix` (a compose
    /// project's default network).
    pub fn remove_networks(&self, prefix: &str) -> Result<()> {
        let out = self.docker(&["network", "ls", "--format", "{{.Name}}"])?;
        for name in out.lines().filter(|n| n.starts_with(prefix)) {
            let _ = self.docker(&["network", "rm", name]);
        }
        Ok(())
    }

    /// `docker run --detach` of `sh -c script` on the host network, labelled
    /// as the bench's.
    pub fn run_detached(
        &self,
        name: &str,
        label: &str,
        restart: Option<&str>,
        script: &str,
    ) -> Result<()> {
        self.run_with(name, label, restart, &[], script)
    }

    /// `run_detached` with `--volume` mounts.
    pub fn run_with(
        &self,
        name: &str,
        label: &str,
        restart: Option<&str>,
        volumes: &[&str],
        script: &str,
    ) -> Result<()> {
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "host",
            "--label",
            label,
        ];
        if let Some(policy) = restart {
            args.extend(["--restart", policy]);
        }
        for volume in volumes {
            args.extend(["--volume", volume]);
        }
        args.extend([IMAGE, "sh", "-c", script]);
        self.docker(&args).map(|_| ())
    }
}

/// `docker run --detach` of each `(name, restart policy, script)`, by
/// `workers` CLI processes at a time (set-up, not measured).
pub fn run_parallel(
    engine: &Engine,
    jobs: &[(String, Option<&str>, String)],
    label: &str,
    volumes: &[&str],
    workers: usize,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(workers.max(1)))
            .map(|chunk| {
                s.spawn(move || -> Result<()> {
                    for (name, restart, script) in chunk {
                        engine.run_with(name, label, *restart, volumes, script)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a docker run worker panicked"))??;
        }
        Ok(())
    })
}

/// The containers of one name prefix, removed when dropped (and by the
/// emergency clean-up if the bench is interrupted).
pub struct Containers {
    engine: Engine,
    prefix: String,
}

impl Containers {
    pub fn guard(engine: &Engine, prefix: &str) -> Containers {
        sys::track_prefix(engine.host(), prefix.to_owned());
        Containers {
            engine: engine.clone(),
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if sys::interrupted() {
            return; // the emergency clean-up removes them
        }
        if let Err(e) = self.engine.remove(&self.prefix) {
            eprintln!(
                "berth-bench: cannot remove containers {}*: {e:#}",
                self.prefix
            );
        }
        sys::untrack_prefix(&self.engine.host(), &self.prefix);
    }
}

// --- events ------------------------------------------------------------------------

/// One container event as the engine stamped it.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub action: String,
    /// The engine's `timeNano`: wall-clock nanoseconds since the epoch.
    pub nanos: i64,
}

/// `docker events` running in the background from a given moment, keeping
/// the container events whose names start with one of `prefixes`. The engine
/// keeps only its last 256 events for `--since`, so a stream must be open
/// through each experiment; it starts at `since`, which covers the moment it
/// takes to attach.
pub struct Events {
    child: Option<Child>,
    events: Arc<Mutex<Vec<Event>>>,
    ended: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    errors: PathBuf,
}

impl Events {
    pub fn watch(
        engine: &Engine,
        prefixes: Vec<String>,
        since: SystemTime,
        log: &Path,
    ) -> Result<Events> {
        let nanos = sys::unix_nanos(since);
        let since = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
        let mut command = engine.command();
        command.args([
            "events",
            "--since",
            &since,
            "--filter",
            "type=container",
            "--format",
            "{{json .}}",
        ]);
        let what = sys::describe(&command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(sys::log_file(log)?)
            .spawn()
            .with_context(|| format!("cannot run `{what}`"))?;
        sys::track_pid(child.id(), false);
        let stdout = child.stdout.take().context("docker events: no stdout")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicBool::new(false));
        let reader = {
            let events = Arc::clone(&events);
            let ended = Arc::clone(&ended);
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let name = v["Actor"]["Attributes"]["name"].as_str().unwrap_or("");
                    if !prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                        continue;
                    }
                    let event = Event {
                        name: name.to_owned(),
                        action: v["Action"].as_str().unwrap_or("").to_owned(),
                        nanos: v["timeNano"].as_i64().unwrap_or(0),
                    };
                    events
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(event);
                }
                ended.store(true, Ordering::Relaxed);
            })
        };
        Ok(Events {
            child: Some(child),
            events,
            ended,
            reader: Some(reader),
            errors: log.to_owned(),
        })
    }

    /// The events so far, at or after `nanos`, in the engine's order.
    pub fn since(&self, nanos: i64) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|e| e.nanos >= nanos)
            .cloned()
            .collect()
    }

    /// Fails if the stream has ended (the engine went away, or the CLI did).
    pub fn check(&self) -> Result<()> {
        if self.ended.load(Ordering::Relaxed) {
            bail!(
                "the docker events stream ended: {}",
                sys::tail(&self.errors, 5)
            );
        }
        Ok(())
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            sys::untrack_pid(child.id());
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The times of `action` events of container `name`, in order.
pub fn times(events: &[Event], name: &str, action: &str) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e.name == name && e.action == action)
        .map(|e| e.nanos)
        .collect()
}

/// The first `action` event of `name` at or after `after`.
pub fn first_after(events: &[Event], name: &str, action: &str, after: i64) -> Option<i64> {
    events
        .iter()
        .find(|e| e.name == name && e.action == action && e.nanos >= after)
        .map(|e| e.nanos)
}

/// Of the containers named in `names`, the time by which each had its first
/// `start` at or after `after`: None until every one has.
pub fn all_started(events: &[Event], names: &BTreeSet<String>, after: i64) -> Option<i64> {
    let mut last = i64::MIN;
    for name in names {
        last = last.max(first_after(events, name, "start", after)?);
    }
    Some(last)
}

// --- a second dockerd -----------------------------------------------------------------

/// A `dockerd` of the bench's own: its own socket, data root, exec root (and
/// so its own containerd), and its own network namespace (`unshare --net`,
/// loopback up) with no bridge and no iptables rules, so that it coexists
/// with the machine's engine, leaves the host's `docker0` alone (a dockerd
/// told `--bridge none` in the host's namespace deletes it) and can be
/// restarted freely. Its containers on the host network share its
/// namespace; its unix socket is reached from the host as any file.
pub struct Dockerd {
    dir: PathBuf,
    child: Option<Child>,
}

impl Dockerd {
    pub fn new(dir: &Path) -> Result<Dockerd> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Its own (empty) daemon.json: the machine's must not apply.
        fs::write(dir.join("daemon.json"), "{}\n").context("cannot write daemon.json")?;
        Ok(Dockerd {
            dir: dir.to_owned(),
            child: None,
        })
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    pub fn engine(&self) -> Engine {
        Engine::at(&self.host())
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// Starts it; returns when it answers, with the moment it was spawned.
    pub fn start(&mut self) -> Result<(SystemTime, Duration)> {
        if self.child.is_some() {
            bail!("the bench's dockerd is already running");
        }
        let d = |name: &str| self.dir.join(name).display().to_string();
        let mut command = Command::new("unshare");
        command.args([
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$@\"",
            "sh",
            "dockerd",
            "--host",
            &self.host(),
            "--config-file",
            &d("daemon.json"),
            "--data-root",
            &d("root"),
            "--exec-root",
            &d("exec"),
            "--pidfile",
            &d("pid"),
            "--bridge",
            "none",
            "--iptables=false",
            "--ip-masq=false",
        ]);
        let spawned = SystemTime::now();
        let started = Instant::now();
        self.child = Some(sys::spawn_logged(&mut command, &self.log(), true)?);
        let engine = self.engine();
        let log = self.log();
        let child = self.child.as_mut().expect("just set");
        sys::wait_until(
            "the bench's dockerd to answer",
            Duration::from_secs(90),
            Duration::from_millis(20),
            || {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "the bench's dockerd exited ({status}):\n{}",
                        sys::tail(&log, 20)
                    );
                }
                Ok(engine.ping())
            },
        )?;
        Ok((spawned, started.elapsed()))
    }

    /// SIGTERM, as a shutdown would: it stops its containers and exits.
    pub fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        sys::signal(pid, Signal::SIGTERM);
        let status = sys::wait_for(child, Duration::from_secs(90));
        sys::untrack_pid(pid);
        if status.is_none() {
            bail!("the bench's dockerd did not stop within 90 s; killed");
        }
        Ok(())
    }

    /// Stops it and deletes its data (images, containers), keeping the log.
    pub fn destroy(&mut self) -> Result<()> {
        self.stop()?;
        unmount_under(&self.dir);
        for name in ["root", "exec"] {
            let path = self.dir.join(name);
            if path.exists() {
                fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        Ok(())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            eprintln!("berth-bench: {e:#}");
        }
    }
}

/// Lazily unmounts whatever a killed dockerd left mounted under `dir`.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let dir = dir.display().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&dir))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = sys::run(
            Command::new("umount").args(["--lazy", point]),
            Duration::from_secs(10),
        );
    }
}

// --- left-overs of earlier runs -----------------------------------------------------------

/// The pid in a run id `bbench-<pid>-<hex>`, at the start of `name` or after
/// `berth.`.
pub fn run_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("berth.").unwrap_or(name);
    let rest = rest.strip_prefix(crate::RUN_PREFIX)?;
    rest.split('-').next()?.parse().ok()
}

/// Whether `pid` is a running berth-bench.
pub fn bench_alive(pid: u32) -> bool {
    sys::alive(pid)
        && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "berth-bench")
}

/// Removes the containers, networks and second dockerds (with their data)
/// of earlier runs whose bench is no longer running; returns what it did.
/// Their work directories, logs and all, stay.
pub fn remove_leftovers(engine: &Engine, tmp: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let stale: Vec<Container> = engine
        .list()?
        .into_iter()
        .filter(|c| run_pid(&c.name).is_some_and(|pid| !bench_alive(pid)))
        .collect();
    if !stale.is_empty() {
        let ids: Vec<String> = stale.iter().map(|c| c.id.clone()).collect();
        engine.for_chunks("rm", &["--force", "--volumes"], &ids)?;
        done.push(format!(
            "removed {} containers of earlier runs",
            stale.len()
        ));
    }
    let networks = engine.docker(&["network", "ls", "--format", "{{.Name}}"])?;
    for name in networks.lines() {
        if run_pid(name).is_some_and(|pid| !bench_alive(pid)) {
            let _ = engine.docker(&["network", "rm", name]);
            done.push(format!("removed network {name}"));
        }
    }
    let Ok(entries) = fs::read_dir(tmp) else {
        return Ok(done);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(crate::WORK_DIR_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if bench_alive(pid) {
            continue;
        }
        let dir = entry.path();
        let dockerds: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("dockerd"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        for dockerd in dockerds {
            // A second dockerd the dead bench left running.
            let pidfile = dockerd.join("pid");
            if let Some(d) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                let cmdline = fs::read(format!("/proc/{d}/cmdline")).unwrap_or_default();
                if sys::alive(d)
                    && String::from_utf8_lossy(&cmdline).contains(&dir.display().to_string())
                {
                    sys::signal(d, Signal::SIGTERM);
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while sys::alive(d) && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(100));
                    }
                    done.push(format!("stopped the dockerd of an earlier run (pid {d})"));
                }
            }
            // Its data goes; the logs stay (a run with --keep or with errors
            // kept them on purpose).
            unmount_under(&dir);
            for data in ["root", "exec"] {
                let path = dockerd.join(data);
                if path.exists() && fs::remove_dir_all(&path).is_ok() {
                    done.push(format!("removed {}", path.display()));
                }
            }
        }
    }
    Ok(done)
}
