//! Item 9: the fleet (SPEC 10). Two figures of the operator's side.
//!
//! - **Command round trip through a bridge.** A central Mosquitto, and a
//!   robot's local Mosquitto bridged to it with the shipped
//!   `config/mosquitto/robot-bridge.conf` (only its addresses, paths and
//!   device id changed); berth on the local broker with `[remote]` on and
//!   the bench's key (`berth fleet keygen`) trusted. The operator side
//!   works on the central broker, two ways, alternately: `berth fleet
//!   restart|apply --device ID` as a user runs it (the whole process timed:
//!   start, connect, subscribe, sign, publish, the reply, exit), and a
//!   connected client of the bench's own that signs with berth's library
//!   (`berth::fleet::envelope`), publishes and waits for the reply (the
//!   round trip alone). `restart` is timed until its reply; `apply` is an
//!   update of a deployment (its command changes each time, so its container
//!   is recreated), timed until the reply says `Succeeded`.
//! - **`berth fleet --json` at scale.** A Mosquitto holding the retained
//!   `agent` and `deployments` documents of 1 000 simulated devices × 5
//!   deployments, each shaped as the documents the berth above published
//!   (about one in a hundred in `Error`): the wall time of `berth fleet
//!   --json` (collect, then print) and its peak resident memory (GNU
//!   `/usr/bin/time -f %M`: ru_maxrss from wait4).
//!
//! Everything is named after the run id: the device ids, the containers
//! (`berth.<device>.*`), the key, the topic prefix of the simulated fleet.
//! The brokers, berth and the containers go at the end, on error and on
//! Ctrl-C (sys tracks them).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use berth::fleet::CommandRequest;
use berth::remote::{keys, CommandName, Reply};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS, RecvTimeoutError};
use serde_json::Value;

use crate::berth::{deployment, Berth};
use crate::engine::{Containers, LONG_RUNNING};
use crate::mqtt::{Broker, Subscriber};
use crate::report::{dist, mb, p50_p99, secs, Row};
use crate::sys;
use crate::Ctx;

const ITEM: u8 = 10;
/// The topic prefix of the bridged robot (the shipped bridge config's).
const PREFIX: &str = "berth";
/// How long one command may take before the bench gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The simulated fleet.
const DEVICES: usize = 1000;
const DEPLOYMENTS: usize = 5;
/// The issue's target for `berth fleet --json` on that fleet.
const VIEW_TARGET: Duration = Duration::from_secs(2);
/// GNU time: ru_maxrss of the child it waits for.
const GNU_TIME: &str = "/usr/bin/time";

pub fn run(ctx: &Ctx) -> Result<Vec<Row>> {
    let dir = ctx.subdir(if ctx.loaded { "fleet-load" } else { "fleet" })?;
    let mut rows = Vec::new();
    let templates = match round_trips(ctx, &dir) {
        Ok((r, templates)) => {
            rows.extend(r);
            Some(templates)
        }
        Err(e) => {
            eprintln!("berth-bench: fleet round trips failed: {e:#}");
            rows.push(Row::error(
                ITEM,
                "fleet: command round trip through a bridge",
                &e,
            ));
            None
        }
    };
    if sys::interrupted() {
        return Ok(rows);
    }
    match fleet_view(ctx, &dir, templates.as_ref()) {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(Row::error(
            ITEM,
            "fleet: `berth fleet --json`, 1 000 devices × 5 deployments",
            &e,
        )),
    }
    Ok(rows)
}

// --- brokers ---------------------------------------------------------------------

/// A Mosquitto run from a config file of the bench's (`config(port)` is the
/// whole file for a free port), killed when dropped.
fn conf_broker(dir: &Path, name: &str, config: impl Fn(u16) -> Result<String>) -> Result<Broker> {
    let conf = dir.join(format!("{name}.conf"));
    Broker::start_as(dir, name, |port| {
        fs::write(&conf, config(port)?)
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let mut command = Command::new("mosquitto");
        command.arg("-c").arg(&conf);
        Ok(command)
    })
}

/// What every broker config of the bench starts with: as root, mosquitto
/// would switch to its own user, who cannot write the bench's files.
fn preamble(port: u16) -> String {
    format!("user root\nlog_dest stderr\nlistener {port} 127.0.0.1\n")
}

/// The central broker: anonymous (the ACL is not what is measured).
fn central_config(port: u16) -> String {
    format!("{}allow_anonymous true\n", preamble(port))
}

/// The shipped `robot-bridge.conf` for `device`, listening on `port`,
/// bridged to the central broker on `central`, persisting into `dir`.
/// Fails when a line it changes is no longer in the shipped file.
fn bridge_config(
    shipped: &str,
    device: &str,
    port: u16,
    central: u16,
    dir: &Path,
) -> Result<String> {
    let mut text = shipped.to_owned();
    for (old, new) in [
        ("listener 1883 127.0.0.1\n", String::new()),
        (
            "persistence_location /var/lib/mosquitto/\n",
            format!("persistence_location {}/\n", dir.display()),
        ),
        (
            "address central.example.com:1883\n",
            format!("address 127.0.0.1:{central}\n"),
        ),
        ("robot-42", device.to_owned()),
    ] {
        if !text.contains(old) {
            bail!(
                "config/mosquitto/robot-bridge.conf no longer has {:?}; update the fleet lane",
                old.trim_end()
            );
        }
        text = text.replace(old, &new);
    }
    Ok(format!("{}{text}", preamble(port)))
}

// --- the operator's own client ---------------------------------------------------

/// A client on the central broker that stays connected, subscribed to the
/// device's replies: the round trip without `berth fleet`'s process.
struct Operator {
    client: Client,
    replies: mpsc::Receiver<(String, Vec<u8>)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Operator {
    fn connect(port: u16, client_id: &str, filter: &str) -> Result<Operator> {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(options, 64);
        let (tx, replies) = mpsc::channel();
        let subscriber = client.clone();
        let wanted = filter.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || loop {
            if stopping.load(Ordering::Relaxed) {
                break;
            }
            match connection.recv_timeout(Duration::from_millis(250)) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    let _ = subscriber.try_subscribe(wanted.as_str(), QoS::AtLeastOnce);
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    if tx.send((String::new(), Vec::new())).is_err() {
                        break;
                    }
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        break;
                    }
                }
                Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Err(_)) => thread::sleep(Duration::from_millis(100)),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        });
        let operator = Operator {
            client,
            replies,
            stop,
            thread: Some(thread),
        };
        match operator.replies.recv_timeout(Duration::from_secs(15)) {
            Ok((topic, _)) if topic.is_empty() => Ok(operator),
            Ok((topic, _)) => bail!("a message on {topic} before the subscription"),
            Err(_) => bail!("no subscription to {filter} on the central broker within 15 s"),
        }
    }

    /// Signs `request` with `key`, publishes it and waits for its reply;
    /// returns the reply and the time from just before signing to its
    /// arrival.
    fn send(
        &self,
        request: &CommandRequest,
        key: &ed25519_dalek::SigningKey,
        request_id: &str,
    ) -> Result<(Reply, Duration)> {
        let started = Instant::now();
        let envelope =
            berth::fleet::envelope(request, key, request_id.to_owned(), SystemTime::now());
        let topic = format!(
            "{}/{}/commands/{}",
            request.prefix, request.device, request.command
        );
        self.client
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&envelope).context("an envelope as JSON")?,
            )
            .context("cannot publish the command")?;
        let reply_topic = format!("{}/{}/replies/{request_id}", request.prefix, request.device);
        let deadline = started + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (topic, payload) = self.replies.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!("no reply to {request_id} within {COMMAND_TIMEOUT:?}")
            })?;
            if topic == reply_topic {
                let took = started.elapsed();
                let reply: Reply = serde_json::from_slice(&payload)
                    .with_context(|| format!("the reply to {request_id} is not a reply"))?;
                return Ok((reply, took));
            }
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// --- round trips -------------------------------------------------------------------

/// The documents a real berth published: the template of the simulated
/// fleet.
struct Templates {
    device_id: String,
    agent: Value,
    deployment: Value,
}

/// The deployment the `apply` figure updates, version `k`: only its
/// command changes, which recreates its container. `min_ready_secs = 0`:
/// the figure is the command's path and the container's replacement, not
/// the wait an update chooses (SPEC's default adds 10 s).
fn update(k: usize) -> String {
    deployment(
        "upd",
        "always",
        &[("app", &format!("{LONG_RUNNING} # version {k}"))],
    ) + "\n[update]\nmin_ready_secs = 0\n"
}

fn round_trips(ctx: &Ctx, dir: &Path) -> Result<(Vec<Row>, Templates)> {
    let restarts = if ctx.quick { 10 } else { 100 };
    let min_applies = if ctx.quick { 3 } else { 20 };
    let apply_window = if ctx.quick {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(120)
    };
    let device = format!("{}-f{}", ctx.run_id, if ctx.loaded { "l" } else { "" });
    let key_id = format!("{device}-ops");

    // The operator's key pair, as a user makes it.
    let keys_dir = dir.join("keys");
    fs::create_dir_all(&keys_dir)
        .with_context(|| format!("cannot create {}", keys_dir.display()))?;
    sys::run(
        Command::new(&ctx.berth_bin)
            .args(["fleet", "keygen", &key_id, "--dir"])
            .arg(&keys_dir),
        Duration::from_secs(30),
    )?;
    let key_file = keys_dir.join(format!("{key_id}.key"));
    let key = keys::signing_key(&key_file)?;
    let trusted = dir.join("trusted");
    fs::create_dir_all(&trusted).with_context(|| format!("cannot create {}", trusted.display()))?;
    fs::copy(
        keys_dir.join(format!("{key_id}.pem")),
        trusted.join(format!("{key_id}.pem")),
    )
    .context("cannot copy the public key into trusted_keys_dir")?;

    // Central, and the robot's local broker bridged to it.
    let central = conf_broker(dir, "central", |port| Ok(central_config(port)))?;
    let shipped_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto/robot-bridge.conf");
    let shipped = fs::read_to_string(&shipped_path)
        .with_context(|| format!("cannot read {}", shipped_path.display()))?;
    let local_dir = dir.join("local-broker");
    fs::create_dir_all(&local_dir)
        .with_context(|| format!("cannot create {}", local_dir.display()))?;
    let local = conf_broker(dir, "local", |port| {
        bridge_config(&shipped, &device, port, central.port(), &local_dir)
    })?;

    // berth on the local broker, [remote] on.
    let berth_dir = dir.join("berth");
    fs::create_dir_all(&berth_dir)
        .with_context(|| format!("cannot create {}", berth_dir.display()))?;
    let options = ctx.berth_options(&device, local.port(), &ctx.engine.url());
    let mut berth = Berth::new(&ctx.berth_bin, &berth_dir, options)?;
    let _containers = Containers::guard(&ctx.engine, &berth.container_prefix());
    let config = berth_dir.join("berth.toml");
    let mut text =
        fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
    text += &format!(
        "\n[remote]\nenabled = true\ntrusted_keys_dir = {}\n",
        toml::Value::String(trusted.display().to_string())
    );
    fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    berth.write_deployment(
        "app",
        &deployment("app", "always", &[("app", LONG_RUNNING)]),
    )?;
    berth.start()?;

    // Its documents reach the central broker through the bridge.
    let documents = Subscriber::connect(central.port(), &format!("{PREFIX}/{device}/#"))?;
    let app_topic = format!("{PREFIX}/{device}/deployments/app");
    let agent_topic = format!("{PREFIX}/{device}/agent");
    sys::wait_until(
        "berth's documents on the central broker, through the bridge",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            berth.check()?;
            Ok(documents.with(|m| {
                m.iter().any(|m| m.topic == agent_topic)
                    && m.iter()
                        .any(|m| m.topic == app_topic && m.payload["status"] == "Running")
            }))
        },
    )?;
    let templates = documents.with(|m| {
        let last = |topic: &str| {
            m.iter()
                .rev()
                .find(|m| m.topic == topic)
                .map(|m| m.payload.clone())
        };
        Templates {
            device_id: device.clone(),
            agent: last(&agent_topic).unwrap_or(Value::Null),
            deployment: last(&app_topic).unwrap_or(Value::Null),
        }
    });
    drop(documents);

    let operator = Operator::connect(
        central.port(),
        &format!("{}-ops", ctx.run_id),
        &format!("{PREFIX}/{device}/replies/+"),
    )?;
    let request = |command: CommandName, payload: String| CommandRequest {
        device: device.clone(),
        prefix: PREFIX.to_owned(),
        command,
        payload,
        key_file: key_file.clone(),
        key_id: key_id.clone(),
        timeout: COMMAND_TIMEOUT,
    };
    // `berth fleet <args> --device ID` on the central broker: its reply
    // and how long the whole process took.
    let cli = |args: &[&str], file: Option<&Path>| -> Result<(Value, Duration)> {
        let mut command = Command::new(&ctx.berth_bin);
        command
            .arg("fleet")
            .args(args)
            .args(["--broker", &central.url(), "--device", &device, "--key"])
            .arg(&key_file);
        if let Some(file) = file {
            command.arg(file);
        }
        let started = Instant::now();
        let out = sys::run(&mut command, COMMAND_TIMEOUT + Duration::from_secs(30))?;
        let took = started.elapsed();
        let reply: Value = serde_json::from_str(&out)
            .with_context(|| format!("`berth fleet {}` printed no reply: {out}", args.join(" ")))?;
        Ok((reply, took))
    };

    // restart: one of each first, not counted (connections, caches).
    let mut cli_restart = Vec::new();
    let mut lib_restart = Vec::new();
    let mut seq = 0usize;
    let mut next_id = |what: &str| {
        seq += 1;
        format!("{}-{what}-{seq}", ctx.run_id)
    };
    for i in 0..=restarts {
        let (reply, took) = cli(&["restart", "app"], None)?;
        if reply["ok"] != true {
            bail!("`berth fleet restart app` was refused or failed: {reply}");
        }
        let (reply, took_lib) = operator.send(
            &request(CommandName::Restart, "app".into()),
            &key,
            &next_id("restart"),
        )?;
        if !reply.ok {
            bail!("a signed restart was refused or failed: {:?}", reply.error);
        }
        if i > 0 {
            cli_restart.push(took.as_secs_f64() * 1000.0);
            lib_restart.push(took_lib.as_secs_f64() * 1000.0);
        }
        berth.check()?;
    }

    // apply: an update each time, until Succeeded with a new container.
    let mut cli_apply = Vec::new();
    let mut lib_apply = Vec::new();
    let mut version = 0usize;
    let mut container = String::new();
    let mut check_apply = |doc: Option<&Value>, how: &str| -> Result<()> {
        let doc = doc.context("an apply reply without the deployment's document")?;
        if doc["phase"] != "Succeeded" {
            bail!(
                "{how}: the apply ended in {} rather than Succeeded: {doc}",
                doc["phase"]
            );
        }
        let now = doc["executables"][0]["container_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if now.is_empty() || now == container {
            bail!("{how}: the reply came before the update (container {now:?}): {doc}");
        }
        container = now;
        Ok(())
    };
    // The first apply creates the deployment: not counted.
    let (reply, _) = operator.send(
        &request(CommandName::Apply, update(0)),
        &key,
        &next_id("apply"),
    )?;
    check_apply(reply.deployment.as_ref(), "the first apply")?;
    let began = Instant::now();
    while cli_apply.len() < min_applies
        || lib_apply.len() < min_applies
        || began.elapsed() < apply_window
    {
        if sys::aborting() {
            bail!("interrupted");
        }
        version += 1;
        let file = dir.join("upd.toml");
        fs::write(&file, update(version))
            .with_context(|| format!("cannot write {}", file.display()))?;
        let (reply, took) = cli(&["apply"], Some(&file))?;
        if reply["ok"] != true {
            bail!("`berth fleet apply` was refused or failed: {reply}");
        }
        check_apply(reply.get("deployment"), "berth fleet apply")?;
        cli_apply.push(took.as_secs_f64() * 1000.0);

        version += 1;
        let (reply, took) = operator.send(
            &request(CommandName::Apply, update(version)),
            &key,
            &next_id("apply"),
        )?;
        if !reply.ok {
            bail!("a signed apply was refused or failed: {:?}", reply.error);
        }
        check_apply(reply.deployment.as_ref(), "a signed apply")?;
        lib_apply.push(took.as_secs_f64() * 1000.0);
        berth.check()?;
    }
    drop(operator);
    let warnings = berth.warnings();
    berth.stop()?;
    drop(local);
    drop(central);

    let row = |metric: &str, values: &[f64]| -> Result<Row> {
        let d = dist(values).context("no samples")?;
        Ok(Row::new(ITEM, format!("{metric} ({} samples), p50 / p99", d.n)).berth(p50_p99(&d)))
    };
    let mut rows = vec![
        row(
            "fleet: `restart` round trip through a bridge, `berth fleet restart` (whole process)",
            &cli_restart,
        )?,
        row(
            "fleet: `restart` round trip through a bridge, signed and published by a connected client",
            &lib_restart,
        )?,
        row(
            "fleet: `apply` (an update, `min_ready_secs = 0`) until `Succeeded` through a bridge, `berth fleet apply` (whole process)",
            &cli_apply,
        )?,
        row(
            "fleet: `apply` (an update, `min_ready_secs = 0`) until `Succeeded` through a bridge, signed and published by a connected client",
            &lib_apply,
        )?,
    ];
    if warnings > 0 {
        rows.push(
            Row::new(
                ITEM,
                "fleet: berth's warnings and errors during the round trips",
            )
            .berth(warnings.to_string()),
        );
    }
    Ok((rows, templates))
}

// --- the fleet view ------------------------------------------------------------------

/// A deployment document of the shape berth publishes, for when the round
/// trips could not produce a real one.
const FALLBACK_DEPLOYMENT: &str = r#"{"device_id":"DEVICE","deployment_id":"app","package":"bench","package_version":"1.0.0","phase":"Succeeded","status":"Running","error_code":null,"reason":null,"restart_policy":"always","restart_count":0,"executables":[{"component":"main","name":"app","container_id":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","image":"berth-test/busybox:1","status":"Running","reason":null,"error_code":null,"exit_code":null,"restart_count":0,"started_at":"2026-11-28T16:00:00.000Z"}],"updated_at":"2026-11-28T16:00:00.000Z"}"#;
const FALLBACK_AGENT: &str = r#"{"state":"online","version":"0.1.0","boot_id":"bench-boot","docker":"connected","since":"2026-11-28T16:00:00.000Z"}"#;

/// Simulated device `d`'s agent document and its deployment `i`'s, from
/// the templates: ids replaced, about one deployment in a hundred in
/// `Error`, restart counts varied.
fn simulated(t: &Templates, device: &str, i: usize, d: usize) -> (String, String) {
    let agent = t.agent.to_string().replace(&t.device_id, device);
    let mut doc = t.deployment.clone();
    let id = format!("dep-{i}");
    doc["deployment_id"] = Value::from(id.as_str());
    doc["restart_count"] = Value::from((d + i) % 7);
    if (d + i).is_multiple_of(97) {
        doc["status"] = Value::from("Error");
        doc["error_code"] = Value::from("DEP_E152");
        doc["reason"] = Value::from("exited with code 1");
    }
    let text = doc
        .to_string()
        .replace(&t.device_id, device)
        .replace(".app.main.", &format!(".{id}.main."));
    (agent, text)
}

fn fleet_view(ctx: &Ctx, dir: &Path, templates: Option<&Templates>) -> Result<Vec<Row>> {
    let runs = if ctx.quick { 3 } else { 5 };
    let view_dir = dir.join("view");
    fs::create_dir_all(&view_dir)
        .with_context(|| format!("cannot create {}", view_dir.display()))?;
    let fallback;
    let templates = match templates {
        Some(t) => t,
        None => {
            fallback = Templates {
                device_id: "DEVICE".into(),
                agent: serde_json::from_str(FALLBACK_AGENT).context("the fallback agent")?,
                deployment: serde_json::from_str(FALLBACK_DEPLOYMENT)
                    .context("the fallback deployment")?,
            };
            &fallback
        }
    };
    let broker = Broker::start(&view_dir)?;
    let prefix = ctx.run_id.clone();
    let bytes = publish_fleet(broker.port(), &prefix, templates)?;

    let timed = Path::new(GNU_TIME).is_file();
    let rss_file = view_dir.join("maxrss.txt");
    let (mut took, mut rss_kb) = (Vec::new(), Vec::new());
    let mut printed = 0usize;
    for _ in 0..runs {
        let mut command = if timed {
            let mut c = Command::new(GNU_TIME);
            c.args(["-f", "%M", "-o"])
                .arg(&rss_file)
                .arg(&ctx.berth_bin);
            c
        } else {
            Command::new(&ctx.berth_bin)
        };
        command.args([
            "fleet",
            "--json",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", broker.port()),
            "--prefix",
            &prefix,
        ]);
        let started = Instant::now();
        let out = sys::run(&mut command, Duration::from_secs(120))?;
        took.push(started.elapsed().as_secs_f64());
        printed = out.len();
        check_view(&out)?;
        if timed {
            let text = fs::read_to_string(&rss_file)
                .with_context(|| format!("cannot read {}", rss_file.display()))?;
            rss_kb.push(
                text.trim()
                    .parse::<u64>()
                    .with_context(|| format!("{GNU_TIME} wrote {text:?}, not a size in KB"))?,
            );
        }
    }
    drop(broker);
    let times = dist(&took).context("no runs")?;
    let metric = format!(
        "fleet: `berth fleet --json`, {DEVICES} devices × {DEPLOYMENTS} deployments \
         ({:.1} MB retained, {:.1} MB printed): collect and print, p50 of {runs} (max)",
        bytes as f64 / 1e6,
        printed as f64 / 1e6
    );
    let mut rows = vec![Row::new(ITEM, metric)
        .berth(format!("{} ({})", secs(times.p50), secs(times.max)))
        .target(
            format!("≤ {}", secs(VIEW_TARGET.as_secs_f64())),
            times.p50 <= VIEW_TARGET.as_secs_f64(),
        )];
    if timed {
        rss_kb.sort_unstable();
        rows.push(
            Row::new(
                ITEM,
                format!("fleet: `berth fleet --json` on that fleet: peak memory (max RSS), p50 of {runs} (max)"),
            )
            .berth(format!(
                "{} ({})",
                mb(rss_kb[(rss_kb.len() - 1) / 2]),
                mb(*rss_kb.last().unwrap_or(&0))
            )),
        );
    } else {
        rows.push(
            Row::new(
                ITEM,
                "fleet: `berth fleet --json` on that fleet: peak memory",
            )
            .berth(format!("not measured: no {GNU_TIME} (GNU time)")),
        );
    }
    Ok(rows)
}

/// Publishes the simulated fleet, retained, QoS 1, and waits for every
/// acknowledgement; returns the bytes of payload published.
fn publish_fleet(port: u16, prefix: &str, templates: &Templates) -> Result<usize> {
    let mut options = MqttOptions::new(format!("{prefix}-seed"), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    options.set_inflight(200);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(options, 1000);
    let mut messages = Vec::with_capacity(DEVICES * (DEPLOYMENTS + 1));
    for d in 0..DEVICES {
        let device = format!("robot-{d:04}");
        for i in 0..DEPLOYMENTS {
            let (agent, doc) = simulated(templates, &device, i, d);
            if i == 0 {
                messages.push((format!("{prefix}/{device}/agent"), agent));
            }
            messages.push((format!("{prefix}/{device}/deployments/dep-{i}"), doc));
        }
    }
    let total = messages.len();
    let bytes = messages.iter().map(|(_, m)| m.len()).sum();
    let publisher = thread::spawn(move || -> Result<()> {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, true, payload)
                .context("cannot publish a retained document")?;
        }
        Ok(())
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut acked = 0;
    while acked < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match connection.recv_timeout(left) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("publishing the simulated fleet: {e}"),
            Err(_) => bail!("only {acked} of {total} retained documents acknowledged within 120 s"),
        }
    }
    publisher
        .join()
        .map_err(|_| anyhow::anyhow!("the publisher panicked"))??;
    Ok(bytes)
}

/// Whether `berth fleet --json` printed the whole simulated fleet.
fn check_view(out: &str) -> Result<()> {
    let view: Value = serde_json::from_str(out).context("`berth fleet --json` printed no JSON")?;
    let devices = view["devices"]
        .as_array()
        .context("`berth fleet --json` printed no devices")?;
    let documents: usize = devices
        .iter()
        .map(|d| d["deployments"].as_array().map_or(0, Vec::len))
        .sum();
    let online = devices
        .iter()
        .filter(|d| d["agent"]["state"] == "online")
        .count();
    if devices.len() != DEVICES || documents != DEVICES * DEPLOYMENTS || online != DEVICES {
        bail!(
            "`berth fleet --json` saw {} devices ({online} online) and {documents} deployments, \
             not {DEVICES} and {}",
            devices.len(),
            DEVICES * DEPLOYMENTS
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_bridge_config_is_used_with_only_its_addresses_and_ids_changed() {
        let shipped = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto/robot-bridge.conf"),
        )
        .expect("the shipped bridge config");
        let text = bridge_config(&shipped, "bbench-1-f", 4000, 5000, Path::new("/tmp/x"))
            .expect("the lines it changes");
        assert!(text.contains("listener 4000 127.0.0.1\n"), "{text}");
        assert!(!text.contains("listener 1883"), "{text}");
        assert!(text.contains("address 127.0.0.1:5000\n"), "{text}");
        assert!(text.contains("topic berth/bbench-1-f/# out 1\n"), "{text}");
        assert!(
            text.contains("topic berth/bbench-1-f/commands/# in 1\n"),
            "{text}"
        );
        assert!(text.contains("persistence_location /tmp/x/\n"), "{text}");
        assert!(!text.contains("robot-42"), "{text}");
        assert!(bridge_config("listener 1883 127.0.0.1\n", "d", 1, 2, Path::new("/")).is_err());
    }

    #[test]
    fn simulated_documents_take_the_device_and_deployment_ids() {
        let t = Templates {
            device_id: "real-dev".into(),
            agent: serde_json::json!({"state": "online", "boot_id": "b"}),
            deployment: serde_json::json!({
                "device_id": "real-dev",
                "deployment_id": "app",
                "status": "Running",
                "executables": [{"name": "app", "container_name": "berth.real-dev.app.main.app"}],
            }),
        };
        let (agent, doc) = simulated(&t, "robot-0001", 2, 1);
        let doc: Value = serde_json::from_str(&doc).expect("JSON");
        assert_eq!(agent, r#"{"boot_id":"b","state":"online"}"#);
        assert_eq!(doc["device_id"], "robot-0001");
        assert_eq!(doc["deployment_id"], "dep-2");
        assert_eq!(
            doc["executables"][0]["container_name"],
            "berth.robot-0001.dep-2.main.app"
        );
        assert_eq!(doc["status"], "Running");
        let (_, failing) = simulated(&t, "robot-0096", 1, 96);
        assert!(failing.contains(r#""status":"Error""#), "{failing}");
    }
}
