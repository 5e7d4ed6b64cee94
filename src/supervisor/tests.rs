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
use crate::runtime::fake::{Call, FakeRuntime};

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
            record.restart_count, row.restart_count,
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
        assert!(
            h.store.load().unwrap().exec(&key()).unwrap().manual_stop,
            "{name}"
        );
        assert!(
            h.events().iter().any(|e| e["event"] == "manual_stop"),
            "{name}: a manual_stop event"
        );
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

/// SPEC 5, `DEP_E302`: a restart whose record cannot be written (a full
/// disk) waits, shown as `Error` with the reason, and goes ahead once the
/// record is on disk; counted once.
#[tokio::test]
async fn a_restart_waits_for_its_record_and_goes_ahead_once_written() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    h.store.fail_writes.store(true, SeqCst);
    h.runtime.exit(NAME, 3);
    let doc = h
        .wait_for("Error + DEP_E302", |d| {
            d["status"] == "Error" && d["error_code"] == "DEP_E302"
        })
        .await;
    let reason = exe(&doc)["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.starts_with("cannot write its restart record: ") && reason.contains("retrying in"),
        "{reason}"
    );
    assert_eq!(exe(&doc)["error_code"], "DEP_E302");
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 1, "no restart starts without its record");
    assert!(
        h.events()
            .iter()
            .any(|e| e["event"] == "error" && e["error_code"] == "DEP_E302"),
        "an error event: {:?}",
        h.events()
    );

    h.store.fail_writes.store(false, SeqCst);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["error_code"], Value::Null);
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 2, "started once, once written");
    assert_eq!(
        h.store.load().unwrap().exec(&key()).unwrap().restart_count,
        1,
        "counted once, on disk"
    );
    h.shutdown().await;
}

/// An unreadable `state.json` falls back to its previous copy and the
/// restart log: the counts stay, and a `DEP_E302` event says what happened.
#[tokio::test]
async fn a_corrupt_state_keeps_its_counts_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    for n in 1..=2 {
        h.runtime.exit(NAME, 3);
        h.running(n).await;
    }
    h.shutdown().await;
    std::fs::write(dir.path().join("state.json"), b"{ torn").unwrap();

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    let doc = h.running(2).await;
    assert_eq!(exe(&doc)["restart_count"], 2);
    let events = h.events();
    let error = events
        .iter()
        .find(|e| e["event"] == "error" && e["error_code"] == "DEP_E302")
        .unwrap_or_else(|| panic!("a DEP_E302 event: {events:?}"));
    let reason = error["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("state.json"), "{reason}");
    assert!(dir.path().join("state.json.corrupt").exists());
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 3, "adopted, not restarted");
    h.shutdown().await;
}

mod stalls;
fn with_probe(mut spec: DeploymentSpec, check: crate::model::ProbeCheck) -> DeploymentSpec {
    spec.components[0].executables[0].probe = Some(crate::model::Probe {
        check,
        initial_delay_secs: 0,
        period_secs: 1,
        timeout_secs: 1,
        failure_threshold: 2,
    });
    spec
}

fn events_named(h: &Harness, name: &str) -> Vec<Value> {
    h.events()
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

/// SPEC 6, the unhealthy row: the engine's healthcheck (an exec probe) says
/// unhealthy; berth stops the container itself and restarts it, counted,
/// and its own stop is not a manual stop.
#[tokio::test]
async fn an_unhealthy_exec_probe_is_a_counted_restart_not_a_manual_stop() {
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Exec(vec!["true".into()]),
    );
    let h = Harness::start(fake(), dir.path(), spec);
    let doc = h.running(0).await;
    assert_eq!(exe(&doc)["health"], "starting");
    assert!(h.runtime.spec(NAME).unwrap().healthcheck.is_some());
    h.runtime.set_health(NAME, true);
    h.wait_for("healthy", |d| exe(d)["health"] == "healthy")
        .await;

    h.runtime.set_health(NAME, false);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["health"], "starting", "a new run, no verdict yet");
    tokio::time::sleep(QUIET).await;
    let restarts = events_named(&h, "restart");
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(
        restarts[0]["reason"],
        "restarting after unhealthy: exec probe failed 2 times in a row"
    );
    assert_eq!(restarts[0]["restart_count"], 1);
    assert!(
        events_named(&h, "manual_stop").is_empty(),
        "{:?}",
        h.events()
    );
    let calls = h.runtime.calls();
    let stop = calls.iter().position(|c| matches!(c, Call::Stop(_)));
    let second_start = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Call::Start(_)))
        .nth(1)
        .map(|(i, _)| i);
    assert!(
        stop.is_some() && stop < second_start,
        "berth stops it before starting it again: {calls:?}"
    );
    assert_eq!(h.starts(), 2);
    assert!(h.runtime.container(NAME).unwrap().running);
    h.shutdown().await;
}

#[tokio::test]
async fn an_unhealthy_executable_under_never_is_an_error_left_running() {
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Never, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Exec(vec!["true".into()]),
    );
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    h.runtime.set_health(NAME, false);
    let doc = h.wait_for("Error", |d| exe(d)["status"] == "Error").await;
    assert_eq!(exe(&doc)["error_code"], "DEP_E152");
    assert_eq!(exe(&doc)["health"], "unhealthy");
    assert_eq!(
        exe(&doc)["reason"],
        "unhealthy: exec probe failed 2 times in a row; restart policy never"
    );
    tokio::time::sleep(QUIET).await;
    assert!(h.runtime.container(NAME).unwrap().running, "left running");
    assert_eq!(h.starts(), 1);
    assert_eq!(count(&h.runtime.calls(), |c| matches!(c, Call::Stop(_))), 0);
    let errors = events_named(&h, "error");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["error_code"], "DEP_E152");
    h.shutdown().await;
}

/// berth's own tcp probe, against a listener of the test's: healthy while
/// it accepts, a counted restart once it has refused `failure_threshold`
/// times in a row.
#[tokio::test]
async fn a_tcp_probe_is_run_by_berth_healthy_then_unhealthy() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Tcp(port),
    );
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    assert!(
        h.runtime.spec(NAME).unwrap().healthcheck.is_none(),
        "berth runs tcp probes itself"
    );
    h.wait_for("healthy", |d| exe(d)["health"] == "healthy")
        .await;
    drop(listener);
    let doc = h.running(1).await;
    let restarts = events_named(&h, "restart");
    let reason = restarts[0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.starts_with("restarting after unhealthy: tcp probe failed 2 times in a row: "),
        "{reason}"
    );
    assert!(exe(&doc)["health"] == "starting" || exe(&doc)["health"] == "unhealthy");
    h.shutdown().await;
}

/// Every exit carries its evidence: the last lines, the signal, the OOM kill.
#[tokio::test]
async fn exits_carry_their_evidence_in_their_events() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(
        fake(),
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
    );
    h.running(0).await;
    for line in ["starting", "lost the map", "giving up"] {
        h.runtime.write_log(NAME, line);
    }
    h.runtime.exit(NAME, 3);
    h.running(1).await;
    let restart = events_named(&h, "restart").pop().unwrap();
    assert_eq!(restart["exit_code"], 3);
    assert_eq!(restart["oom_killed"], false);
    assert_eq!(restart.get("signal"), None, "no signal for exit 3");
    let tail = restart["log_tail"].as_array().unwrap();
    assert_eq!(tail.last().unwrap(), "giving up");
    assert!(tail.iter().any(|l| l == "lost the map"));

    h.runtime.manual_kill(NAME);
    h.wait_for("stopped by hand", |d| exe(d)["status"] == "Stopped")
        .await;
    let stop = events_named(&h, "manual_stop").pop().unwrap();
    assert_eq!(stop["signal"], "SIGKILL");
    assert_eq!(stop["exit_code"], 137);
    h.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(
        fake(),
        dir.path(),
        deployment(RestartPolicy::Never, PullPolicy::IfNotPresent, "talker"),
    );
    h.running(0).await;
    h.runtime.oom_kill(NAME);
    h.wait_for("Error", |d| exe(d)["status"] == "Error").await;
    let error = events_named(&h, "error").pop().unwrap();
    assert_eq!(error["oom_killed"], true);
    assert_eq!(error["signal"], "SIGKILL");
    assert_eq!(error["exit_code"], 137);
    h.shutdown().await;
}

/// The `metrics` document every interval, in paused time: CPU in percent of
/// one core between two readings, memory, the data root, and availability
/// that drops once the executable is no longer `Running`.
#[tokio::test(start_paused = true)]
async fn metrics_go_out_every_interval_with_cpu_memory_disk_and_availability() {
    const EVERY: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics.interval = Some(EVERY);
    let runtime = fake();
    runtime.set_disk(crate::runtime::DiskUsage {
        data_root: "/var/lib/docker".into(),
        total_bytes: 100 << 30,
        free_bytes: 40 << 30,
    });
    let h = Harness::start_with(
        runtime,
        dir.path(),
        vec![deployment(
            RestartPolicy::Never,
            PullPolicy::IfNotPresent,
            "talker",
        )],
        BOOT,
        cfg,
    );
    h.running(0).await;
    let stats = |cpu_secs: u64| crate::runtime::ContainerStats {
        cpu_usage_nanos: cpu_secs * 1_000_000_000,
        memory_bytes: 50 << 20,
        memory_limit_bytes: Some(256 << 20),
    };
    h.runtime.set_stats(NAME, stats(1));
    let metrics = |n: usize| {
        let h = &h;
        async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let docs: Vec<Value> = h
                    .reporter
                    .published
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(t, _)| *t == Topic::Metrics)
                    .map(|(_, v)| v.clone())
                    .collect();
                if docs.len() >= n {
                    return docs[n - 1].clone();
                }
                assert!(Instant::now() < deadline, "no metrics document {n}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let first = metrics(1).await;
    assert_eq!(first["device_id"], DEVICE);
    assert_eq!(first["interval_secs"], 10);
    assert_eq!(first["data_root"]["size_bytes"], 100u64 << 30);
    assert_eq!(first["data_root"]["free_bytes"], 40u64 << 30);
    let m = &first["executables"][0];
    assert_eq!(m["executable"], "talker");
    assert_eq!(m["cpu_percent"], Value::Null, "one reading is no rate");
    assert_eq!(m["memory_bytes"], 50u64 << 20);
    assert_eq!(m["memory_limit_bytes"], 256u64 << 20);
    assert_eq!(m["restart_count"], 0);
    assert_eq!(m["health"], Value::Null, "no probe");

    // 5 s of CPU over a 10 s interval: half a core.
    h.runtime.set_stats(NAME, stats(6));
    let second = metrics(2).await;
    let m = &second["executables"][0];
    assert_eq!(m["cpu_percent"], 50.0);
    assert_eq!(m["availability"], 1.0);
    // Uptime runs on the engine's (wall) clock, which paused time does not move.
    assert!(m["uptime_secs"].is_u64(), "{m}");

    h.runtime.exit(NAME, 3);
    h.wait_for("Error", |d| exe(d)["status"] == "Error").await;
    let third = metrics(3).await;
    let fourth = metrics(4).await;
    let m = &fourth["executables"][0];
    assert_eq!(m["status"], "Error");
    assert_eq!(m["cpu_percent"], Value::Null);
    assert_eq!(m["uptime_secs"], Value::Null);
    let availability = m["availability"].as_f64().unwrap();
    assert!(
        availability < third["executables"][0]["availability"].as_f64().unwrap()
            && availability < 1.0,
        "availability drops: {third} {fourth}"
    );
    // Kept across berth restarts, in the state.
    let store = h.store.clone();
    h.shutdown().await;
    let record = store.load().unwrap().exec(&key()).cloned().unwrap();
    assert!(record.availability.share().unwrap() < 1.0);
}

/// SPEC 8: the pull's progress shows in the Pending reason.
#[tokio::test]
async fn pull_progress_shows_in_the_reason_and_the_image_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(FakeRuntime::new().with_registry_image_sized(IMAGE, 27_000_000));
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
    );
    h.running(0).await;
    let mut reasons: Vec<String> = h
        .docs()
        .iter()
        .filter_map(|d| exe(d)["reason"].as_str().map(str::to_string))
        .filter(|r| r.starts_with(&format!("pulling image {IMAGE}: ")))
        .collect();
    reasons.dedup(); // other changes republish the document
    assert_eq!(
        reasons,
        vec![format!("pulling image {IMAGE}: 0% of 27 MB")],
        "one progress per 2 s at most"
    );
    let store = h.store.clone();
    h.shutdown().await;
    assert!(store.load().unwrap().pulled_images.contains(IMAGE));
}

/// `pull = "always"` with the registry out of reach and the image present:
/// the present image runs, and the reason said so.
#[tokio::test]
async fn pull_always_offline_runs_the_present_image() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(FakeRuntime::new().with_image(IMAGE));
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::Always, "talker"),
    );
    h.running(0).await;
    assert!(h.runtime.calls().contains(&Call::Pull(IMAGE.into(), None)));
    assert!(
        h.docs().iter().any(|d| exe(d)["reason"]
            .as_str()
            .is_some_and(|r| r.ends_with("running the image present on the device"))),
        "the reason says so"
    );
    h.shutdown().await;
}

/// Before a pull with less than `min_free_mb` free: unused images berth
/// pulled go, others stay; a pull that still does not fit is DEP_E305.
#[tokio::test]
async fn a_pull_that_does_not_fit_collects_then_is_dep_e305() {
    const OLD: &str = "registry.example.com/talker:0.9";
    const FOREIGN: &str = "registry.example.com/someone-else:1";
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let mut state = store.load().unwrap();
    state.pulled_images.insert(OLD.into());
    store.save(&state).unwrap();
    let runtime = Arc::new(
        FakeRuntime::new()
            .with_image(OLD)
            .with_image(FOREIGN)
            .with_registry_image(IMAGE),
    );
    runtime.set_disk(crate::runtime::DiskUsage {
        data_root: "/var/lib/docker".into(),
        total_bytes: 10 << 30,
        free_bytes: 100 << 20,
    });
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
    );
    let doc = h
        .wait_for("DEP_E305", |d| exe(d)["error_code"] == "DEP_E305")
        .await;
    assert_eq!(exe(&doc)["status"], "Error");
    let reason = exe(&doc)["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("no room to pull image {IMAGE}: 100 MB free")),
        "{reason}"
    );
    let calls = h.runtime.calls();
    assert!(calls.contains(&Call::RemoveImage(OLD.into())), "{calls:?}");
    assert!(
        !calls.contains(&Call::RemoveImage(FOREIGN.into())),
        "not berth's"
    );
    assert!(!calls.contains(&Call::Pull(IMAGE.into(), None)), "no pull");
    let error = events_named(&h, "error").pop().unwrap();
    assert_eq!(error["error_code"], "DEP_E305");
    let store = h.store.clone();
    h.shutdown().await;
    assert!(!store.load().unwrap().pulled_images.contains(OLD));
}

/// berth restarted while a container runs: the reconcile adopts it, and
/// berth's own probe watches it again.
#[tokio::test]
async fn an_adopted_container_is_probed_again() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Tcp(port),
    );
    let runtime = fake();
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.wait_for("healthy", |d| exe(d)["health"] == "healthy")
        .await;
    h.shutdown().await;

    let h = Harness::start(runtime, dir.path(), spec);
    h.wait_for("healthy again", |d| exe(d)["health"] == "healthy")
        .await;
    assert_eq!(h.starts(), 1, "adopted, not restarted");
    drop(listener);
    h.running(1).await;
    h.shutdown().await;
}

mod timing;
