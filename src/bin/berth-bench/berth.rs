//! berth as the bench runs it: the release binary as `berth run` with an agent
//! config, deployments dir, state dir and boot id file of its own, logged as
//! shipped (info level, text), with its trace file (`--trace-file`: die
//! received and start request sent, on the engine's clock) and its state
//! file. With `watchdog`, it runs as under systemd's watchdog: a notify
//! socket of the bench's own and `WATCHDOG_USEC`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::sys;

/// What a benchmark chooses in berth's agent config; the rest is SPEC 3's
/// defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub device_id: String,
    pub mqtt_port: u16,
    pub docker_host: String,
    pub backoff_initial_ms: u64,
    pub backoff_max_secs: u64,
    pub backoff_reset_after_secs: u64,
    /// Extra environment for `berth run`.
    pub env: Vec<(String, String)>,
    /// Arm the watchdog as the systemd unit does (`WatchdogSec=30`).
    pub watchdog: bool,
    /// Appended to the agent config as it is (more sections, e.g.
    /// `[metrics]`).
    pub extra_config: String,
}

impl Options {
    /// The back-off of SPEC 3: 1 s initial, 300 s at most, reset after 60 s.
    pub fn new(device_id: &str, mqtt_port: u16, docker_host: &str) -> Options {
        Options {
            device_id: device_id.to_owned(),
            mqtt_port,
            docker_host: docker_host.to_owned(),
            backoff_initial_ms: 1000,
            backoff_max_secs: 300,
            backoff_reset_after_secs: 60,
            env: Vec::new(),
            watchdog: false,
            extra_config: String::new(),
        }
    }
}

/// One trace record of berth's (src/trace.rs).
#[derive(Debug, Clone)]
pub struct TraceLine {
    /// `die`, `committed` or `start-request`.
    pub kind: String,
    /// `deployment/component/executable`.
    pub executable: String,
    /// CLOCK_REALTIME, ns since the epoch.
    pub nanos: i64,
}

pub struct Berth {
    bin: PathBuf,
    dir: PathBuf,
    options: Options,
    child: Option<Child>,
    /// The systemd stand-in the watchdog pings go to, while berth runs.
    notify: Option<sys::NotifySocket>,
}

impl Berth {
    /// Writes the config, an empty deployments dir and a boot id under `dir`;
    /// does not start berth.
    pub fn new(bin: &Path, dir: &Path, options: Options) -> Result<Berth> {
        let berth = Berth {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            options,
            child: None,
            notify: None,
        };
        for d in [berth.deployments_dir(), berth.state_dir()] {
            fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        write_atomically(&dir.join("berth.toml"), &berth.config_text())?;
        berth.set_boot_id(&format!(
            "bench-boot-{}",
            sys::unix_nanos(SystemTime::now())
        ))?;
        Ok(berth)
    }

    fn config_text(&self) -> String {
        let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
        let p = |v: PathBuf| s(&v.display().to_string());
        let o = &self.options;
        format!(
            "device_id = {}\n\
             deployments_dir = {}\n\
             state_dir = {}\n\
             boot_id_file = {}\n\
             \n[docker]\nhost = {}\n\
             \n[mqtt]\nurl = {}\ntopic_prefix = \"berth\"\nkeep_alive_secs = 30\n\
             \n[restart]\nbackoff_initial_ms = {}\nbackoff_max_secs = {}\nbackoff_reset_after_secs = {}\n\
             \n[log]\nlevel = \"info\"\nformat = \"text\"\n{}",
            s(&o.device_id),
            p(self.deployments_dir()),
            p(self.state_dir()),
            p(self.boot_id_file()),
            s(&o.docker_host),
            s(&format!("mqtt://127.0.0.1:{}", o.mqtt_port)),
            o.backoff_initial_ms,
            o.backoff_max_secs,
            o.backoff_reset_after_secs,
            o.extra_config,
        )
    }

    /// SPEC 4: `berth.<device_id>.<deployment>.<component>.<executable>`.
    pub fn container_name(&self, deployment: &str, component: &str, executable: &str) -> String {
        format!(
            "berth.{}.{deployment}.{component}.{executable}",
            self.options.device_id
        )
    }

    /// Every container name of this device starts with this.
    pub fn container_prefix(&self) -> String {
        format!("berth.{}.", self.options.device_id)
    }

    pub fn topic(&self, deployment: &str) -> String {
        format!("berth/{}/deployments/{deployment}", self.options.device_id)
    }

    pub fn topics(&self) -> String {
        format!("berth/{}/deployments/+", self.options.device_id)
    }

    fn deployments_dir(&self) -> PathBuf {
        self.dir.join("deployments.d")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn boot_id_file(&self) -> PathBuf {
        self.dir.join("boot_id")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("berth.log")
    }

    fn trace_path(&self) -> PathBuf {
        self.dir.join("trace.txt")
    }

    pub fn write_deployment(&self, id: &str, text: &str) -> Result<()> {
        write_atomically(&self.deployments_dir().join(format!("{id}.toml")), text)
    }

    pub fn remove_deployment(&self, id: &str) -> Result<()> {
        let path = self.deployments_dir().join(format!("{id}.toml"));
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))
    }

    /// A new boot id, as a reboot gives; berth reads it when it starts.
    pub fn set_boot_id(&self, boot_id: &str) -> Result<()> {
        write_atomically(&self.boot_id_file(), &format!("{boot_id}\n"))
    }

    /// Starts `berth run` and returns the moment it was spawned.
    pub fn start(&mut self) -> Result<SystemTime> {
        if self.child.is_some() {
            bail!("berth is already running");
        }
        let mut command = Command::new(&self.bin);
        command
            .arg("run")
            .arg("--config")
            .arg(self.dir.join("berth.toml"));
        // An older berth (`--berth`, for a before/after comparison) may not
        // have a trace file: its own share is then not measured.
        if has_trace_file(&self.bin) {
            command.arg("--trace-file").arg(self.trace_path());
        }
        command
            .env_remove("RUST_LOG")
            .env_remove("BERTH_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)));
        if self.options.watchdog {
            let socket = sys::NotifySocket::bind(&self.dir.join("notify.sock"))?;
            command
                .env("NOTIFY_SOCKET", socket.path())
                .env("WATCHDOG_USEC", "30000000");
            self.notify = Some(socket);
        }
        let at = SystemTime::now();
        self.child = Some(sys::spawn_logged(&mut command, &self.log_path(), false)?);
        Ok(at)
    }

    pub fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .context("berth is not running")
    }

    /// Fails, with the end of its log, if berth has exited.
    pub fn check(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("berth is not running");
        };
        if let Some(status) = child.try_wait()? {
            sys::untrack_pid(child.id());
            self.child = None;
            bail!(
                "berth exited ({status}); end of its log:\n{}",
                sys::tail(&self.log_path(), 30)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 25 s (more than the unit's stop timeout).
    pub fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        sys::signal(pid, Signal::SIGTERM);
        let status = sys::wait_for(child, Duration::from_secs(25));
        sys::untrack_pid(pid);
        match status {
            Some(_) => Ok(()),
            None => bail!("berth did not stop within 25 s of SIGTERM; killed"),
        }
    }

    /// Its trace records so far, in the order written.
    /// Whether this berth writes a trace file (an older one does not).
    pub fn traces(&self) -> bool {
        has_trace_file(&self.bin)
    }

    pub fn trace(&self) -> Vec<TraceLine> {
        let text = fs::read_to_string(self.trace_path()).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut words = line.split(' ');
                Some(TraceLine {
                    kind: words.next()?.to_owned(),
                    executable: words.next()?.to_owned(),
                    nanos: words.next()?.parse().ok()?,
                })
            })
            .collect()
    }

    /// How many watchdog pings (`WATCHDOG=1`) berth has sent.
    pub fn watchdog_pings(&self) -> usize {
        self.notify
            .as_ref()
            .map_or(0, sys::NotifySocket::watchdog_pings)
    }

    /// The log lines at WARN or ERROR, for a report of anything unexpected.
    pub fn warnings(&self) -> usize {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count()
    }

    /// `<state_dir>/state.json`.
    pub fn state(&self) -> Result<Value> {
        let path = self.state_dir().join("state.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            sys::untrack_pid(child.id());
        }
    }
}

/// A deployment file: one component `main` holding `executables`, each
/// `(name, script)` run as `sh -c script` from the test image.
pub fn deployment(id: &str, policy: &str, executables: &[(&str, &str)]) -> String {
    deployment_with(id, policy, executables, None)
}

/// `deployment`, with a host directory mounted at `/sync` in every
/// executable (where the bench tells them when to exit).
pub fn deployment_with(
    id: &str,
    policy: &str,
    executables: &[(&str, &str)],
    sync: Option<&Path>,
) -> String {
    let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
    let mut text = format!(
        "id = {}\npackage = \"bench\"\npackage_version = \"1.0.0\"\nrestart = {}\n\n\
         [[components]]\nname = \"main\"\n",
        s(id),
        s(policy)
    );
    for (name, script) in executables {
        text += &format!(
            "\n[[components.executables]]\nname = {}\nimage = {}\npull = \"never\"\n\
             command = [\"sh\", \"-c\", {}]\n",
            s(name),
            s(crate::engine::IMAGE),
            s(script)
        );
        if let Some(dir) = sync {
            text += &format!(
                "volumes = [{{ host = {}, container = \"/sync\", read_only = true }}]\n",
                s(&dir.display().to_string())
            );
        }
    }
    text
}

/// Writes through a temp file and a rename: berth never reads half a file,
/// and the temp name does not end in `.toml`.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("file name")?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

/// Whether the berth binary `bin` takes `run --trace-file` (a hidden
/// option: `run --trace-file F --help` is help, not an unknown argument).
fn has_trace_file(bin: &Path) -> bool {
    static KNOWN: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, has)) = known.iter().find(|(b, _)| b == bin) {
        return *has;
    }
    let has = Command::new(bin)
        .args(["run", "--trace-file", "/dev/null", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    known.push((bin.to_path_buf(), has));
    has
}
