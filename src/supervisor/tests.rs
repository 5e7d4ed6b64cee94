//! The loop driven by the fake engine and the memory reporter, in real
//! time with a 100 ms back-off.

use std::path::Path;

use serde_json::Value;
use tokio::task::JoinHandle;

use super::lifecycle::NEVER_INTERRUPTED_REASON;
use super::*;
use crate::config::{DockerSettings, LogSettings, MqttSettings, RestartSettings, RosSettings};
use crate::model::{labels, Command, ComponentSpec, Limits, RestartPolicy};
use crate::report::MemoryReporter;
use crate::runtime::fake::{Call, FakeRuntime, Fault, Method};

const DEVICE: &str = "robot-42";
const BOOT: &str = "3f1c0d6e-boot-1";
const IMAGE: &str = "registry.example.com/talker:1.0";
const NAME: &str = "berth.robot-42.talker.talker.talker";
const INITIAL: Duration = Duration::from_millis(100);
/// Long enough for any restart berth would wrongly make to show.
const QUIET: Duration = Duration::from_millis(350);
const NOPE: &str = "failed to create shim task: OCI runtime create failed: runc create failed: \
    unable to start container process: exec: \"nope\": executable file not found in $PATH: unknown";
const NOPE_REASON: &str = "exec: \"nope\": executable file not found in $PATH";

fn config(state_dir: &Path) -> AgentConfig {
    AgentConfig {
        device_id: DEVICE.into(),
        deployments_dir: state_dir.join("deployments.d"),
        state_dir: state_dir.to_path_buf(),
        boot_id_file: state_dir.join("boot_id"),
        docker: DockerSettings::new("unix:///var/run/docker.sock"),
        mqtt: MqttSettings {
            endpoint: "mqtt://127.0.0.1:1883".parse().unwrap(),
            client_id: format!("berth-{DEVICE}"),
            topic_prefix: "berth".into(),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive: Duration::from_secs(30),
        },
        restart: RestartSettings {
            backoff_initial: INITIAL,
            backoff_max: Duration::from_secs(2),
            backoff_reset_after: Duration::from_secs(60),
        },
        ros: RosSettings {
            master_image: "ros:noetic-ros-core".into(),
            master_command: vec!["roscore".into()],
            master_uri: "http://localhost:11311".into(),
        },
        log: LogSettings {
            level: "debug".into(),
            json: false,
        },
        containers: Default::default(),
        images: Default::default(),
        metrics: Default::default(),
        remote: Default::default(),
        source: state_dir.join("berth.toml"),
    }
}

fn deployment(restart: RestartPolicy, pull: PullPolicy, program: &str) -> DeploymentSpec {
    DeploymentSpec {
        id: "talker".into(),
        package: "ros-talker".into(),
        package_version: "1.0.0".into(),
        restart,
        depends_on: Vec::new(),
        ros: false,
        env: BTreeMap::from([("ROBOT_NAME".into(), "r42".into())]),
        exports: BTreeMap::new(),
        components: vec![ComponentSpec {
            name: "talker".into(),
            executables: vec![ExecutableSpec {
                name: "talker".into(),
                image: IMAGE.into(),
                pull,
                command: Some(Command::Exec(vec![program.into(), "--rate=10".into()])),
                env: BTreeMap::from([("LOG_LEVEL".into(), "debug".into())]),
                limits: Limits {
                    cpus: Some(0.5),
                    memory_mb: Some(256),
                },
                volumes: Vec::new(),
                devices: Vec::new(),
                network: Default::default(),
                probe: None,
            }],
        }],
        update: Default::default(),
        source: "/etc/berth/deployments.d/talker.toml".into(),
    }
}

fn key() -> ExecKey {
    ExecKey::new("talker", "talker", "talker")
}

/// One supervisor running in a task, with its fakes.
struct Harness {
    runtime: Arc<FakeRuntime>,
    reporter: Arc<MemoryReporter>,
    store: StateStore,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Harness {
    fn start(runtime: Arc<FakeRuntime>, state_dir: &Path, spec: DeploymentSpec) -> Self {
        Self::start_on_boot(runtime, state_dir, spec, BOOT)
    }

    fn start_on_boot(
        runtime: Arc<FakeRuntime>,
        state_dir: &Path,
        spec: DeploymentSpec,
        boot_id: &str,
    ) -> Self {
        Self::start_with(runtime, state_dir, vec![spec], boot_id, config(state_dir))
    }

    /// Several deployments, and an agent config of the test's.
    fn start_with(
        runtime: Arc<FakeRuntime>,
        state_dir: &Path,
        specs: Vec<DeploymentSpec>,
        boot_id: &str,
        config: AgentConfig,
    ) -> Self {
        let store = StateStore::open(state_dir).unwrap();
        let reporter = Arc::new(MemoryReporter::default());
        let token = CancellationToken::new();
        // As `berth run` does: an unreadable state falls back, and says so.
        let recovered = store.recover().unwrap();
        let mut supervisor = Supervisor::from_parts(Parts {
            config,
            deployments: specs.into_iter().map(|s| (s.id.clone(), s)).collect(),
            runtime: runtime.clone(),
            reporter: reporter.clone(),
            store: store.clone(),
            state: recovered.state,
            boot_id: boot_id.into(),
            registries: Vec::new(),
            notifier: crate::notify::Notifier::disabled(),
            invalid: BTreeMap::new(),
        });
        supervisor.report_state_problems(recovered.problems);
        let task = tokio::spawn(supervisor.run(token.clone()));
        Harness {
            runtime,
            reporter,
            store,
            token,
            task,
        }
    }

    /// Every document published for the deployment, oldest first.
    fn docs(&self) -> Vec<Value> {
        let topic = Topic::Deployment("talker".into());
        let published = self.reporter.published.lock().unwrap();
        published
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        let published = self.reporter.published.lock().unwrap();
        published
            .iter()
            .filter(|(t, _)| *t == Topic::Events)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Waits until the latest deployment document satisfies `pred`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let latest = self.reporter.latest(&Topic::Deployment("talker".into()));
            if let Some(doc) = latest.as_ref().filter(|d| pred(d)) {
                return doc.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; latest document: {:#}",
                latest.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until an event satisfies `pred`; returns the first that does.
    async fn wait_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(event) = self.events().into_iter().find(|e| pred(e)) {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events: {:#?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn running(&self, restart_count: u64) -> Value {
        self.wait_for(&format!("Running with {restart_count} restarts"), |d| {
            d["status"] == "Running" && d["restart_count"] == restart_count
        })
        .await
    }

    fn starts(&self) -> usize {
        count(&self.runtime.calls(), |c| matches!(c, Call::Start(_)))
    }

    async fn shutdown(self) {
        self.shutdown_within(Duration::from_secs(5)).await
    }

    /// Cancels and waits for the loop, which gives engine calls in flight
    /// up to 5 s and the state writer 2 s more before it ends.
    async fn shutdown_within(self, limit: Duration) {
        self.token.cancel();
        tokio::time::timeout(limit, self.task)
            .await
            .expect("supervisor stops on cancel")
            .unwrap();
    }
}

fn count(calls: &[Call], pred: impl Fn(&Call) -> bool) -> usize {
    calls.iter().filter(|c| pred(c)).count()
}

fn exe(doc: &Value) -> &Value {
    &doc["executables"][0]
}

fn fake() -> Arc<FakeRuntime> {
    Arc::new(FakeRuntime::new().with_registry_image(IMAGE))
}

#[tokio::test]
async fn provisions_a_deployment_to_succeeded_and_running() {
    let dir = tempfile::tempdir().unwrap();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(fake(), dir.path(), spec.clone());
    let doc = h
        .wait_for("Succeeded/Running", |d| {
            d["phase"] == "Succeeded" && d["status"] == "Running"
        })
        .await;

    let info = h
        .runtime
        .container(NAME)
        .expect("container named as SPEC 4 says");
    assert!(info.running);
    assert_eq!(doc["device_id"], DEVICE);
    assert_eq!(doc["restart_policy"], "always");
    assert_eq!(doc["restart_count"], 0);
    assert_eq!(doc["error_code"], Value::Null);
    assert_eq!(doc["reason"], Value::Null);
    assert_eq!(exe(&doc)["restart_count"], 0);
    assert_eq!(exe(&doc)["container_id"], info.id.as_str());
    assert_eq!(exe(&doc)["image"], IMAGE);
    assert_eq!(
        exe(&doc)["started_at"],
        normalize_time(info.started_at.as_deref().unwrap()).as_str()
    );

    let created = h.runtime.spec(NAME).unwrap();
    let (_, exe_spec) = spec.executables().next().unwrap();
    let env = merged_env(&config(dir.path()), &spec, exe_spec, &BTreeMap::new());
    assert_eq!(
        created.labels,
        BTreeMap::from([
            (labels::DEVICE.to_string(), DEVICE.to_string()),
            (labels::DEPLOYMENT.to_string(), "talker".to_string()),
            (labels::COMPONENT.to_string(), "talker".to_string()),
            (labels::EXECUTABLE.to_string(), "talker".to_string()),
            (labels::SPEC_HASH.to_string(), spec_hash(exe_spec, &env)),
        ])
    );
    assert_eq!(
        created.cmd,
        Some(vec!["talker".to_string(), "--rate=10".to_string()])
    );
    assert_eq!(created.env["ROBOT_NAME"], "r42");
    assert_eq!(created.env["LOG_LEVEL"], "debug");
    assert_eq!(created.network_mode, "host");
    assert_eq!(created.nano_cpus, Some(500_000_000));
    assert_eq!(created.memory_bytes, Some(256 * 1024 * 1024));

    let calls = h.runtime.calls();
    let pull = calls
        .iter()
        .position(|c| *c == Call::Pull(IMAGE.into(), None));
    let create = calls.iter().position(|c| *c == Call::Create(NAME.into()));
    assert!(
        pull.is_some() && pull < create,
        "pull before create: {calls:?}"
    );
    assert_eq!(count(&calls, |c| matches!(c, Call::Create(_))), 1);
    assert_eq!(h.starts(), 1);
    assert!(
        h.docs().iter().any(|d| d["phase"] == "Provisioning"
            && exe(d)["status"] == "Pending"
            && exe(d)["reason"] == format!("pulling image {IMAGE}").as_str()),
        "a Pending document while pulling"
    );
    // Statuses and start times are saved in batches; shutdown writes them.
    let store = h.store.clone();
    h.shutdown().await;
    let record = store.load().unwrap().exec(&key()).cloned().unwrap();
    assert_eq!(record.status, Some(Status::Running));
    assert_eq!(record.restart_count, 0);
    assert_eq!(record.container_id.as_deref(), Some(info.id.as_str()));
}

/// SPEC 6, the first two rows of the table, one row per policy.
#[tokio::test]
async fn exits_follow_the_restart_table() {
    struct Row {
        policy: RestartPolicy,
        code: i64,
        status: &'static str,
        exit_code: Option<i64>,
        restart_count: u64,
        error_code: Option<&'static str>,
    }
    use RestartPolicy::*;
    #[rustfmt::skip]
    let rows = [
        Row { policy: Always, code: 0, status: "Running", exit_code: None, restart_count: 1, error_code: None },
        Row { policy: Always, code: 3, status: "Running", exit_code: None, restart_count: 1, error_code: None },
        Row { policy: OnFailure, code: 0, status: "Completed", exit_code: Some(0), restart_count: 0, error_code: None },
        Row { policy: OnFailure, code: 3, status: "Running", exit_code: None, restart_count: 1, error_code: None },
        Row { policy: Never, code: 0, status: "Completed", exit_code: Some(0), restart_count: 0, error_code: None },
        Row { policy: Never, code: 3, status: "Error", exit_code: Some(3), restart_count: 0, error_code: Some("DEP_E152") },
    ];
    let runs = rows.into_iter().map(|row| async move {
        let name = format!("exit {} under {}", row.code, row.policy);
        let dir = tempfile::tempdir().unwrap();
        let spec = deployment(row.policy, PullPolicy::IfNotPresent, "talker");
        let h = Harness::start(fake(), dir.path(), spec);
        h.running(0).await;
        h.runtime.exit(NAME, row.code);
        let doc = h
            .wait_for(&name, |d| {
                d["status"] == row.status && d["restart_count"] == row.restart_count
            })
            .await;
        tokio::time::sleep(QUIET).await;
        let last = h
            .reporter
            .latest(&Topic::Deployment("talker".into()))
            .unwrap();
        assert_eq!(last["status"], doc["status"], "{name}: settled");
        assert_eq!(h.starts() as u64, 1 + row.restart_count, "{name}: starts");
        assert_eq!(last["restart_count"], row.restart_count, "{name}");
        assert_eq!(exe(&last)["restart_count"], row.restart_count, "{name}");
        assert_eq!(
            exe(&last)["exit_code"],
            serde_json::json!(row.exit_code),
            "{name}"
        );
        assert_eq!(
            last["error_code"],
            serde_json::json!(row.error_code),
            "{name}"
        );
        assert_eq!(
            exe(&last)["error_code"],
            serde_json::json!(row.error_code),
            "{name}"
        );
        assert_eq!(last["phase"], "Succeeded", "{name}");
        if row.status == "Error" {
            let reason = exe(&last)["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(reason.contains("exited with code 3"), "{name}: {reason}");
        }
        // The count may still be in the restart log only: read both, as a
        // berth starting now would.
        let state = h.store.recover().unwrap().state;
        let record = state.exec(&key()).cloned().unwrap_or_default();
        assert_eq!(
            record.restarts_done(),
            row.restart_count,
            "{name}: persisted count"
        );
        h.shutdown().await;
    });
    futures_util::future::join_all(runs).await;
}

#[tokio::test]
async fn back_off_grows_from_immediate_to_doubling() {
    let dir = tempfile::tempdir().unwrap();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    for n in 1..=3 {
        h.runtime.exit(NAME, 3);
        h.running(n).await;
    }
    let history = h.runtime.history();
    let dies: Vec<i64> = history
        .iter()
        .filter(|e| matches!(e.action, EventAction::Die { .. }))
        .map(|e| e.time_nanos)
        .collect();
    let starts = h.runtime.start_times(NAME);
    assert_eq!((dies.len(), starts.len()), (3, 4));
    let waited: Vec<Duration> = dies
        .iter()
        .zip(&starts[1..])
        .map(|(die, start)| Duration::from_nanos((start - die) as u64))
        .collect();
    let want = [Duration::ZERO, INITIAL, 2 * INITIAL];
    for (i, (got, want)) in waited.iter().zip(want).enumerate() {
        assert!(
            *got >= want,
            "restart {}: waited {got:?}, less than {want:?}",
            i + 1
        );
    }
    // Wall time cannot show "immediate" on a loaded machine; the reasons
    // do: the first restart never waited out a back-off.
    let mut backoffs: Vec<(String, Value)> = h
        .docs()
        .iter()
        .map(exe)
        .filter(|e| e["status"] == "Pending")
        .filter(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("restarting in"))
        })
        .map(|e| {
            (
                e["reason"].as_str().unwrap().to_string(),
                e["error_code"].clone(),
            )
        })
        .collect();
    backoffs.dedup();
    assert_eq!(
        backoffs,
        [
            (
                "restarting in 0.1s after exit code 3 (back-off)".to_string(),
                "DEP_E152".into()
            ),
            (
                "restarting in 0.2s after exit code 3 (back-off)".to_string(),
                "DEP_E152".into()
            ),
        ]
    );
    h.shutdown().await;
}

/// `docker stop`, `docker kill` and `docker rm -f` by hand all suspend
/// the policy; a `docker start` by hand brings it back.
#[tokio::test]
async fn manual_stop_suspends_the_policy_until_started_by_hand() {
    type Act = fn(&FakeRuntime, &str);
    let rows: [(&str, Act); 3] = [
        ("docker stop", FakeRuntime::manual_stop),
        ("docker kill", FakeRuntime::manual_kill),
        ("docker rm -f", FakeRuntime::manual_remove),
    ];
    let runs = rows.into_iter().map(|(name, act)| async move {
        let dir = tempfile::tempdir().unwrap();
        let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
        let h = Harness::start(fake(), dir.path(), spec);
        h.running(0).await;
        act(&h.runtime, NAME);
        let doc = h.wait_for(name, |d| d["status"] == "Stopped").await;
        assert_eq!(exe(&doc)["reason"], MANUAL_STOP_REASON, "{name}");
        assert_eq!(
            doc["reason"],
            format!("talker/talker: {MANUAL_STOP_REASON}").as_str()
        );
        assert_eq!(doc["error_code"], Value::Null, "{name}");
        tokio::time::sleep(QUIET).await;
        let last = h
            .reporter
            .latest(&Topic::Deployment("talker".into()))
            .unwrap();
        assert_eq!(last["status"], "Stopped", "{name}: not restarted");
        assert_eq!(last["restart_count"], 0, "{name}");
        assert_eq!(h.starts(), 1, "{name}: no start after the manual stop");
        assert_eq!(
            count(&h.runtime.calls(), |c| matches!(c, Call::Create(_))),
            1,
            "{name}"
        );
        // Written at once by the state writer, off the loop: awaited.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.store.load().unwrap().exec(&key()).unwrap().manual_stop {
            assert!(
                Instant::now() < deadline,
                "{name}: manual stop not recorded"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        h.wait_event(&format!("{name}: a manual_stop event"), |e| {
            e["event"] == "manual_stop"
        })
        .await;
        if name == "docker stop" {
            h.runtime.manual_start(NAME);
            h.running(0).await;
            // Written by the state writer, off the loop: shortly after.
            let deadline = Instant::now() + Duration::from_secs(5);
            while h.store.load().unwrap().exec(&key()).unwrap().manual_stop {
                assert!(Instant::now() < deadline, "manual stop still recorded");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            h.runtime.exit(NAME, 3);
            h.running(1).await;
        }
        h.shutdown().await;
    });
    futures_util::future::join_all(runs).await;
}

#[tokio::test]
async fn missing_image_is_an_error_with_dep_e161() {
    let rows = [
        ("not in the registry", PullPolicy::IfNotPresent, false, 1),
        ("absent and pull = never", PullPolicy::Never, true, 0),
    ];
    let runs = rows
        .into_iter()
        .map(|(name, pull, in_registry, pulls)| async move {
            let dir = tempfile::tempdir().unwrap();
            let runtime = if in_registry {
                fake()
            } else {
                Arc::new(FakeRuntime::new())
            };
            let h = Harness::start(
                runtime,
                dir.path(),
                deployment(RestartPolicy::Always, pull, "talker"),
            );
            let doc = h.wait_for(name, |d| d["status"] == "Error").await;
            assert_eq!(doc["error_code"], "DEP_E161", "{name}");
            assert_eq!(exe(&doc)["error_code"], "DEP_E161", "{name}");
            let reason = exe(&doc)["reason"].as_str().unwrap();
            assert!(reason.contains(IMAGE), "{name}: {reason}");
            assert_eq!(doc["phase"], "Provisioning", "{name}");
            let calls = h.runtime.calls();
            assert!(
                count(&calls, |c| matches!(c, Call::Pull(..))) >= pulls,
                "{name}: {calls:?}"
            );
            if pulls == 0 {
                assert_eq!(count(&calls, |c| matches!(c, Call::Pull(..))), 0, "{name}");
            }
            assert_eq!(
                count(&calls, |c| matches!(c, Call::Create(_) | Call::Start(_))),
                0
            );
            h.shutdown().await;
        });
    futures_util::future::join_all(runs).await;
}

#[tokio::test]
async fn failed_start_is_an_error_with_the_exec_reason() {
    // Under `never` it stays failed.
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    runtime.fail_start("nope", NOPE);
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Never, PullPolicy::IfNotPresent, "nope"),
    );
    let doc = h
        .wait_for("start failure", |d| d["status"] == "Error")
        .await;
    assert_eq!(doc["error_code"], "DEP_E152");
    assert_eq!(exe(&doc)["reason"], NOPE_REASON);
    assert_eq!(
        doc["reason"],
        format!("talker/talker: {NOPE_REASON}").as_str()
    );
    assert_eq!(doc["phase"], "Provisioning", "never started successfully");
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 1, "never: no retry");
    assert_eq!(h.runtime.container(NAME).unwrap().state, "created");
    h.shutdown().await;

    // Under `always` it is retried with back-off, `Error` while it fails,
    // and each retry counts as a restart.
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    runtime.fail_start("nope", NOPE);
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "nope"),
    );
    let doc = h
        .wait_for("start failure retried", |d| {
            d["status"] == "Error" && d["restart_count"].as_u64() >= Some(2)
        })
        .await;
    assert_eq!(doc["error_code"], "DEP_E152");
    let reason = exe(&doc)["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(NOPE_REASON) && reason.contains("retrying in"),
        "{reason}"
    );
    h.runtime.clear_fail_start("nope");
    let doc = h
        .wait_for("running after the failure is fixed", |d| {
            d["status"] == "Running" && d["phase"] == "Succeeded"
        })
        .await;
    assert_eq!(doc["error_code"], Value::Null);
    assert_eq!(
        doc["restart_count"],
        h.starts() as u64 - 1,
        "every retry counted once"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn engine_down_is_unknown_then_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    h.runtime.set_down(true);
    let doc = h.wait_for("Unknown", |d| d["status"] == "Unknown").await;
    assert_eq!(doc["error_code"], "DEP_E301");
    assert_eq!(exe(&doc)["error_code"], "DEP_E301");
    let agent = h.reporter.latest(&Topic::Agent).unwrap();
    assert_eq!(
        (agent["docker"].as_str(), agent["error_code"].as_str()),
        (Some("unreachable"), Some("DEP_E301"))
    );

    // The container crashes while berth cannot see the engine.
    h.runtime.exit(NAME, 3);
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        h.reporter
            .latest(&Topic::Deployment("talker".into()))
            .unwrap()["status"],
        "Unknown"
    );
    h.runtime.set_down(false);
    let doc = h.running(1).await;
    assert_eq!(doc["error_code"], Value::Null);
    assert_eq!(doc["phase"], "Succeeded");
    assert_eq!(
        h.reporter.latest(&Topic::Agent).unwrap()["docker"],
        "connected"
    );
    assert_eq!(h.starts(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn a_restarted_supervisor_adopts_the_running_container() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    runtime.exit(NAME, 3);
    h.running(1).await;
    h.shutdown().await;
    assert!(
        runtime.container(NAME).unwrap().running,
        "containers outlive berth"
    );

    let before = runtime.calls().len();
    let h = Harness::start(runtime.clone(), dir.path(), spec);
    let doc = h
        .wait_for("adopted", |d| {
            d["status"] == "Running" && d["phase"] == "Succeeded"
        })
        .await;
    assert_eq!(doc["restart_count"], 1, "counts survive a berth restart");
    assert_eq!(
        exe(&doc)["container_id"],
        runtime.container(NAME).unwrap().id.as_str()
    );
    let after = &runtime.calls()[before..];
    assert_eq!(
        count(after, |c| matches!(
            c,
            Call::Create(_) | Call::Start(_) | Call::Stop(_) | Call::Remove(_)
        )),
        0,
        "adopted untouched: {after:?}"
    );
    runtime.exit(NAME, 3);
    h.running(2).await;
    h.shutdown().await;
}

/// SPEC 6, "interrupted by a restart of the Docker engine": the engine
/// comes back with the container exited and no `die` in its history.
#[tokio::test]
async fn engine_restart_interrupts_by_policy() {
    let rows = [
        (RestartPolicy::Always, "Running", 1, None),
        (RestartPolicy::OnFailure, "Running", 1, None),
        (
            RestartPolicy::Never,
            "Stopped",
            0,
            Some(NEVER_INTERRUPTED_REASON),
        ),
    ];
    let runs = rows
        .into_iter()
        .map(|(policy, status, restarts, reason)| async move {
            let dir = tempfile::tempdir().unwrap();
            let spec = deployment(policy, PullPolicy::IfNotPresent, "talker");
            let h = Harness::start(fake(), dir.path(), spec);
            h.running(0).await;
            h.runtime.restart_engine();
            let doc = h
                .wait_for(&format!("{status} under {policy}"), |d| {
                    d["status"] == status && d["restart_count"] == restarts
                })
                .await;
            assert_eq!(exe(&doc)["reason"], serde_json::json!(reason), "{policy}");
            tokio::time::sleep(QUIET).await;
            assert_eq!(h.starts() as u64, 1 + restarts, "{policy}");
            h.shutdown().await;
        });
    futures_util::future::join_all(runs).await;
}

/// SPEC 6: a different boot clears a manual stop and restarts what the
/// reboot interrupted, counted once.
#[tokio::test]
async fn a_reboot_clears_a_manual_stop() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    runtime.manual_stop(NAME);
    h.wait_for("Stopped", |d| d["status"] == "Stopped").await;
    h.shutdown().await;

    // Same boot: still suspended.
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    let doc = h
        .wait_for("still Stopped", |d| d["status"] == "Stopped")
        .await;
    assert_eq!(exe(&doc)["reason"], MANUAL_STOP_REASON);
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 1);
    h.shutdown().await;

    runtime.restart_engine();
    let h = Harness::start_on_boot(runtime.clone(), dir.path(), spec, "3f1c0d6e-boot-2");
    h.running(1).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 2);
    let state = h.store.load().unwrap();
    assert_eq!(state.boot_id.as_deref(), Some("3f1c0d6e-boot-2"));
    assert!(!state.exec(&key()).unwrap().manual_stop);
    h.shutdown().await;
}

/// A reboot that lost the container: starting a new one is a restart,
/// counted once and with exactly one `restart` event.
#[tokio::test]
async fn a_container_lost_to_a_reboot_is_restarted_with_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    h.shutdown().await;

    // Gone by the next boot, with the engine's memory of it.
    runtime.manual_remove(NAME);
    runtime.restart_engine();
    let h = Harness::start_on_boot(runtime.clone(), dir.path(), spec, "3f1c0d6e-boot-2");
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["restart_count"], 1);
    tokio::time::sleep(QUIET).await;
    let restarts: Vec<Value> = h
        .events()
        .into_iter()
        .filter(|e| e["event"] == "restart")
        .collect();
    assert_eq!(restarts.len(), 1, "one restart event: {restarts:?}");
    assert_eq!(restarts[0]["restart_count"], 1);
    assert_eq!(restarts[0]["exit_code"], Value::Null);
    h.shutdown().await;
}

/// SPEC 6, "berth down, same boot": what happened while berth was away is
/// told apart by replaying the engine's events.
#[tokio::test]
async fn replay_tells_a_manual_stop_from_a_crash_while_berth_was_away() {
    type Act = fn(&FakeRuntime, &str);
    let crash: Act = |f, name| f.exit(name, 3);
    let rows: [(&str, Act, &str, u64); 3] = [
        ("docker stop", FakeRuntime::manual_stop, "Stopped", 0),
        ("crash", crash, "Running", 1),
        ("docker rm -f", FakeRuntime::manual_remove, "Stopped", 0),
    ];
    let runs = rows
        .into_iter()
        .map(|(name, act, status, restarts)| async move {
            let dir = tempfile::tempdir().unwrap();
            let runtime = fake();
            let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
            let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
            h.running(0).await;
            h.shutdown().await;
            act(&runtime, NAME);
            let h = Harness::start(runtime.clone(), dir.path(), spec);
            h.wait_for(name, |d| {
                d["status"] == status && d["restart_count"] == restarts
            })
            .await;
            tokio::time::sleep(QUIET).await;
            assert_eq!(h.starts() as u64, 1 + restarts, "{name}");
            h.shutdown().await;
        });
    futures_util::future::join_all(runs).await;
}

mod robot;
mod stalls;
mod state;
mod timing;
