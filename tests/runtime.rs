//! The Docker adapter against the real engine: how it classifies the
//! engine's answers, the log rotation it creates containers with (measured
//! on disk), crash evidence (log tail, exit code, signal, OOM kill), engine
//! healthchecks and their events, the probes berth runs on an isolated
//! network, images, the data root and resource use.
//!
//! Every container is labelled with a device id of its test and removed by
//! an `EngineGuard`, also when the test fails.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth::model::{labels, Probe, ProbeCheck};
use berth::runtime::docker::DockerRuntime;
use berth::runtime::{
    cpu_percent, ContainerRuntime, ContainerSpec, EventAction, EventStream, Healthcheck,
    LogRotation, RuntimeError,
};
use common::{docker, try_docker, unique_id, EngineGuard, TEST_IMAGE, WAIT};
use futures_util::StreamExt;

const ENGINE: &str = "unix:///var/run/docker.sock";

fn engine() -> DockerRuntime {
    DockerRuntime::new(ENGINE)
}

/// A container of `device` running `script` under busybox's `sh`.
fn spec(device: &str, name: &str, script: &str) -> ContainerSpec {
    ContainerSpec {
        name: format!("berth.{device}.{name}"),
        image: TEST_IMAGE.into(),
        cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
        labels: BTreeMap::from([(labels::DEVICE.to_string(), device.to_string())]),
        network_mode: "host".into(),
        ..Default::default()
    }
}

/// Waits for the `die` event of `id` on a stream opened before its start.
/// The engine's events of `device` from now on. The stream's request goes
/// out when it is first polled, after the test has started its container:
/// `since` now makes the engine replay what happened before that (on a
/// loaded machine a container could exit before the stream was open).
fn events_from_now(engine: &DockerRuntime, device: &str) -> EventStream {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i64;
    engine.events(device, Some(now), None)
}

async fn await_die(events: &mut EventStream, id: &str) -> Option<i64> {
    await_event(events, id, |a| matches!(a, EventAction::Die { .. }))
        .await
        .and_then(|a| match a {
            EventAction::Die { exit_code } => exit_code,
            _ => None,
        })
}

async fn await_event(
    events: &mut EventStream,
    id: &str,
    want: impl Fn(&EventAction) -> bool,
) -> Option<EventAction> {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            let event = event.expect("event stream");
            if event.container_id == id && want(&event.action) {
                return event.action;
            }
        }
        panic!("the event stream ended");
    })
    .await;
    Some(found.unwrap_or_else(|_| panic!("no such event for {id} within {WAIT:?}")))
}

#[tokio::test]
async fn engine_answers_are_classified_by_status() {
    let device = unique_id("classify");
    let _guard = EngineGuard::new(&device);
    let engine = engine();

    let mut absent = spec(&device, "absent", "true");
    absent.image = "berth-test/never-built:1".into();
    assert_eq!(
        engine.create(&absent).await,
        Err(RuntimeError::ImageUnavailable {
            image: absent.image.clone(),
            message: format!("no such image: {}", absent.image),
        })
    );
    let pulled = engine
        .pull("127.0.0.1:5000/berth/never-pushed:1", None)
        .await;
    assert!(
        matches!(pulled, Err(RuntimeError::ImageUnavailable { .. })),
        "{pulled:?}"
    );

    let nope = ContainerSpec {
        cmd: Some(vec!["nope".into()]),
        ..spec(&device, "nope", "")
    };
    let id = engine.create(&nope).await.unwrap();
    assert!(matches!(
        engine.create(&nope).await,
        Err(RuntimeError::Conflict {
            operation: "create",
            ..
        })
    ));
    assert_eq!(
        engine.start(&id).await,
        Err(RuntimeError::StartFailed {
            container: id.clone(),
            message: "exec: \"nope\": executable file not found in $PATH".into(),
        })
    );
    engine.remove(&id).await.unwrap();
    assert_eq!(
        engine.inspect(&id).await,
        Err(RuntimeError::NotFound(id.clone()))
    );
    assert_eq!(
        engine.start(&id).await,
        Err(RuntimeError::NotFound(id.clone()))
    );
    assert_eq!(
        engine.remove(&id).await,
        Err(RuntimeError::NotFound(id.clone()))
    );

    let unreachable = DockerRuntime::new("unix:///nonexistent/docker.sock");
    assert!(matches!(
        unreachable.ping().await,
        Err(RuntimeError::Unreachable(_))
    ));
}

/// The `[containers]` rotation holds on disk: a container that writes
/// without pause keeps at most `max_files` files of about `max_size` each.
#[tokio::test]
async fn log_rotation_holds_on_disk() {
    let device = unique_id("logrot");
    let _guard = EngineGuard::new(&device);
    let engine = engine().with_log_rotation(LogRotation {
        max_size_mb: 1,
        max_files: 2,
    });
    let script = "i=0; while true; do echo \"line $i ................................................................\"; i=$((i+1)); done";
    let id = engine
        .create(&spec(&device, "chatty", script))
        .await
        .unwrap();
    engine.start(&id).await.unwrap();

    let info: serde_json::Value =
        serde_json::from_str(&docker(&["inspect", "--format", "{{json .}}", &id])).unwrap();
    assert_eq!(info["HostConfig"]["LogConfig"]["Type"], "json-file");
    assert_eq!(info["HostConfig"]["LogConfig"]["Config"]["max-size"], "1m");
    assert_eq!(info["HostConfig"]["LogConfig"]["Config"]["max-file"], "2");
    let log_path = info["LogPath"].as_str().unwrap().to_string();
    let data_root = docker(&["info", "--format", "{{.DockerRootDir}}"]);
    assert!(log_path.starts_with(data_root.trim()), "{log_path}");

    // Wait until the oldest file kept no longer starts at line 0: the first
    // lines were rotated away, so the container wrote more than the limit.
    let rotated = format!("{log_path}.1");
    let first_line = |path: &str| -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        let line: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
        line["log"]
            .as_str()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    assert!(
        common::wait_until(WAIT, || first_line(&rotated).is_some_and(|n| n > 0)),
        "the log never rotated twice"
    );
    // Measure while it still writes, then again once it stopped.
    let limit = 2 * 1024 * 1024 + 64 * 1024;
    let on_disk = || -> u64 {
        std::fs::read_dir(std::path::Path::new(&log_path).parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("-json.log"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    for _ in 0..20 {
        let size = on_disk();
        assert!(size <= limit, "{size} bytes of log on disk");
    }
    engine.stop(&id, 0).await.unwrap();
    let size = on_disk();
    assert!(size <= limit, "{size} bytes of log on disk");
    // Both files are kept: the rotated one holds up to 1 MiB (the engine
    // rotates before a write that would pass the limit, so a little less),
    // the current one what came after.
    assert!(std::path::Path::new(&rotated).exists() && std::path::Path::new(&log_path).exists());
    assert!(
        size > 1024 * 1024 - 64 * 1024,
        "{size}: both files are in use"
    );
}

/// An exit leaves its evidence: the exit code, and the last lines of both
/// streams, bounded, read once.
#[tokio::test]
async fn exit_leaves_its_last_lines_and_code() {
    let device = unique_id("evidence");
    let _guard = EngineGuard::new(&device);
    let engine = engine();
    let mut events = events_from_now(&engine, &device);
    // Odd lines to stderr, even ones to stdout, a moment apart: the engine
    // reads the two pipes apart, and orders by when it read.
    let script = "i=1; while [ $i -le 30 ]; do if [ $((i % 2)) = 0 ]; then echo out $i; \
                  else echo err $i >&2; fi; i=$((i+1)); sleep 0.02; done; exit 3";
    let id = engine
        .create(&spec(&device, "dying", script))
        .await
        .unwrap();
    engine.start(&id).await.unwrap();
    assert_eq!(await_die(&mut events, &id).await, Some(3));

    let info = engine.inspect(&id).await.unwrap();
    assert_eq!(info.exit_code, Some(3));
    assert_eq!(info.signal(), None);
    assert!(!info.oom_killed);
    let tail = engine.log_tail(&id, None).await.unwrap();
    assert_eq!(tail.len(), 20, "{tail:?}");
    assert!(tail.contains(&"out 30".to_string()), "{tail:?}");
    assert!(tail.contains(&"err 29".to_string()), "{tail:?}");
    assert!(!tail.contains(&"err 9".to_string()), "{tail:?}");
    // The same lines as the engine's own `docker logs --tail 20`.
    let cli = std::process::Command::new("docker")
        .args(["logs", "--tail", "20", &id])
        .output()
        .unwrap();
    let mut expected: Vec<String> = [cli.stdout, cli.stderr]
        .iter()
        .flat_map(|b| {
            String::from_utf8_lossy(b)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut got = tail.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);

    // A long line keeps its end within 4 KiB.
    let long = "x=$(head -c 6000 /dev/zero | tr '\\0' a); echo \"$x\"; echo end; exit 1";
    let id = engine.create(&spec(&device, "long", long)).await.unwrap();
    engine.start(&id).await.unwrap();
    assert_eq!(await_die(&mut events, &id).await, Some(1));
    let tail = engine.log_tail(&id, None).await.unwrap();
    assert_eq!(tail.last().map(String::as_str), Some("end"));
    assert_eq!(tail.iter().map(String::len).sum::<usize>(), 4096);
}

/// The tail of an exited run can be read after the container was started
/// again: cut at the exit's time, the new run's lines are not in it.
#[tokio::test]
async fn the_tail_of_a_run_is_read_after_the_next_started() {
    let device = unique_id("tailuntil");
    let _guard = EngineGuard::new(&device);
    let engine = engine();
    let mut events = events_from_now(&engine, &device);
    // Each run says which it is (a file in the container counts them); the
    // second one writes five lines more, then waits.
    let script = "n=$(cat /run-count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /run-count; \
                  echo run $n; echo last words of run $n >&2; \
                  if [ $n = 1 ]; then exit 3; fi; \
                  for i in 1 2 3 4 5; do echo run $n line $i; done; sleep 600";
    let id = engine
        .create(&spec(&device, "again", script))
        .await
        .unwrap();
    engine.start(&id).await.unwrap();
    let died = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            let event = event.expect("event stream");
            if event.container_id == id && matches!(event.action, EventAction::Die { .. }) {
                return event.time_nanos;
            }
        }
        panic!("the event stream ended")
    })
    .await
    .expect("a die event");
    engine.start(&id).await.unwrap();
    // The second run has written its lines.
    let mut whole = Vec::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        whole = engine.log_tail(&id, None).await.unwrap();
        if whole.iter().any(|l| l == "run 2 line 5") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(whole.len(), 9, "both runs' lines: {whole:?}");
    let tail = engine.log_tail(&id, Some(died)).await.unwrap();
    let mut sorted = tail.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["last words of run 1", "run 1"], "{tail:?}");
    engine.stop(&id, 0).await.unwrap();
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let device = unique_id("oom");
    let _guard = EngineGuard::new(&device);
    let engine = engine();
    let mut events = events_from_now(&engine, &device);
    let hog = ContainerSpec {
        memory_bytes: Some(8 * 1024 * 1024),
        ..spec(&device, "hog", "x=a; while true; do x=$x$x; done")
    };
    let id = engine.create(&hog).await.unwrap();
    engine.start(&id).await.unwrap();
    let code = await_die(&mut events, &id).await;
    // The engine sets `OOMKilled` when the kernel's notice reaches it, which
    // on a loaded machine can be after the `die`.
    let deadline = Instant::now() + WAIT;
    let mut info = engine.inspect(&id).await.unwrap();
    while !info.oom_killed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        info = engine.inspect(&id).await.unwrap();
    }
    assert!(info.oom_killed, "exit {code:?}: {info:?}");
    assert_eq!(info.exit_code, Some(137));
    assert_eq!(info.signal(), Some("SIGKILL"));
}

/// An `exec` probe becomes the engine's healthcheck, whose verdicts come as
/// `health_status` events, and the inspection says the same.
#[tokio::test]
async fn an_exec_probe_runs_as_the_engine_healthcheck() {
    let device = unique_id("health");
    let _guard = EngineGuard::new(&device);
    let engine = engine();
    let mut events = events_from_now(&engine, &device);
    let probe = Probe {
        check: ProbeCheck::Exec(vec!["test".into(), "-f".into(), "/tmp/ok".into()]),
        initial_delay_secs: 0,
        period_secs: 1,
        timeout_secs: 1,
        failure_threshold: 2,
    };
    let script = "touch /tmp/ok; trap 'exit 0' TERM; trap 'rm /tmp/ok' USR1; \
                  while true; do sleep 0.2; done";
    let checked = ContainerSpec {
        healthcheck: Healthcheck::from_probe(Some(&probe)),
        ..spec(&device, "checked", script)
    };
    let id = engine.create(&checked).await.unwrap();
    let created: serde_json::Value = serde_json::from_str(&docker(&[
        "inspect",
        "--format",
        "{{json .Config.Healthcheck}}",
        &id,
    ]))
    .unwrap();
    assert_eq!(
        created["Test"],
        serde_json::json!(["CMD", "test", "-f", "/tmp/ok"])
    );
    assert_eq!(created["Interval"], 1_000_000_000u64);
    assert_eq!(created["Retries"], 2);
    engine.start(&id).await.unwrap();
    // On a loaded machine a check can time out before the first passes.
    let healthy = |a: &EventAction| matches!(a, EventAction::Health { healthy: true });
    assert_eq!(
        await_event(&mut events, &id, healthy).await,
        Some(EventAction::Health { healthy: true })
    );
    assert_eq!(
        engine.inspect(&id).await.unwrap().health,
        Some(berth::runtime::Health::Healthy)
    );
    docker(&["kill", "--signal", "USR1", &id]);
    let unhealthy = |a: &EventAction| matches!(a, EventAction::Health { healthy: false });
    assert_eq!(
        await_event(&mut events, &id, unhealthy).await,
        Some(EventAction::Health { healthy: false })
    );
    engine.stop(&id, 5).await.unwrap();
}

struct NetworkGuard(String);

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let _ = try_docker(&["network", "rm", &self.0]);
    }
}

/// On an isolated network berth reaches a `tcp` or `http` probe at the
/// container's own address, which the inspection gives; on the host
/// network at 127.0.0.1.
#[tokio::test]
async fn probes_reach_a_container_on_its_network() {
    let device = unique_id("netprobe");
    let guard = EngineGuard::new(&device);
    let network = format!("berth.{device}.net");
    let _network = NetworkGuard(network.clone());
    let engine = engine();
    let net_labels = BTreeMap::from([(labels::DEVICE.to_string(), device.clone())]);
    engine.ensure_network(&network, &net_labels).await.unwrap();
    let script = "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www";
    let served = ContainerSpec {
        network_mode: network.clone(),
        network_aliases: vec!["web".into()],
        ..spec(&device, "web", script)
    };
    let id = engine.create(&served).await.unwrap();
    engine.start(&id).await.unwrap();
    let info = engine.inspect(&id).await.unwrap();
    let host = info.probe_host();
    assert!(info.ip_address.is_some(), "{info:?}");
    assert_ne!(host, "127.0.0.1");

    let probe = |check: ProbeCheck| Probe {
        check,
        initial_delay_secs: 0,
        period_secs: 1,
        timeout_secs: 2,
        failure_threshold: 1,
    };
    let tcp = probe(ProbeCheck::Tcp(8080));
    let http = probe(ProbeCheck::Http("http://127.0.0.1:8080/index.html".into()));
    let missing = probe(ProbeCheck::Http("http://localhost:8080/missing".into()));
    let deadline = Instant::now() + WAIT;
    while berth::probe::check(&tcp, &host).await.is_err() {
        assert!(Instant::now() < deadline, "httpd never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    berth::probe::check(&http, &host).await.unwrap();
    let err = berth::probe::check(&missing, &host).await.unwrap_err();
    assert!(
        matches!(err, berth::probe::ProbeError::Status { status: 404, .. }),
        "{err}"
    );
    engine.stop(&id, 0).await.unwrap();
    assert!(berth::probe::check(&tcp, &host).await.is_err());

    // On the host network the executable is reached on 127.0.0.1.
    let port = common::free_port();
    let script = format!(
        "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"
    );
    let id = engine
        .create(&spec(&device, "hostweb", &script))
        .await
        .unwrap();
    engine.start(&id).await.unwrap();
    let info = engine.inspect(&id).await.unwrap();
    assert_eq!(info.ip_address, None);
    assert_eq!(info.probe_host(), "127.0.0.1");
    let http = probe(ProbeCheck::Http(format!("http://localhost:{port}/")));
    let deadline = Instant::now() + WAIT;
    while berth::probe::check(&http, &info.probe_host())
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "httpd never answered on the host"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.stop(&id, 0).await.unwrap();
    drop(guard);
}

/// Images: listed with their users, removed only unforced, pulled with
/// progress; and the engine's data root with its free space.
#[tokio::test]
async fn images_are_listed_pulled_with_progress_and_removed_unforced() {
    let device = unique_id("images");
    let _guard = EngineGuard::new(&device);
    let engine = engine();

    // An image of its own: a fresh layer of 3 MB of random bytes, pushed to
    // a registry of the test's own and then removed locally.
    let registry = common::Registry::new();
    let builder = format!("berth.{device}.builder");
    docker(&[
        "run",
        "--name",
        &builder,
        "--label",
        &format!("{}={device}", labels::DEVICE),
        "--network",
        "none",
        TEST_IMAGE,
        "sh",
        "-c",
        "head -c 3000000 /dev/urandom > /blob",
    ]);
    let local = format!("berth-test/{device}:1");
    docker(&["commit", &builder, &local]);
    let remote = format!("{}/berth/{device}:1", registry.server());
    docker(&["tag", &local, &remote]);
    docker(&["push", &remote]);
    docker(&["rm", &builder]);
    let image_id = docker(&["image", "inspect", "--format", "{{.Id}}", &local])
        .trim()
        .to_string();
    let cleanup = ImageGuard(vec![remote.clone(), local.clone()]);

    // Two tags on one id: removing the id unforced is a conflict, and
    // nothing is removed.
    assert!(matches!(
        engine.remove_image(&image_id).await,
        Err(RuntimeError::Conflict { .. })
    ));
    engine.remove_image(&local).await.unwrap();
    engine.remove_image(&remote).await.unwrap();
    assert!(!engine.image_present(&remote).await.unwrap());

    let mut seen = Vec::new();
    let started = Instant::now();
    engine
        .pull_with_progress(&remote, None, &mut |p| seen.push((started.elapsed(), p)))
        .await
        .unwrap();
    let last = seen.last().expect("progress was reported").1;
    assert!(last.total_bytes >= 2_900_000, "{seen:?}");
    assert_eq!(last.percent(), 100, "{seen:?}");
    assert!(
        seen.windows(2)
            .all(|w| w[0].1.done_bytes <= w[1].1.done_bytes
                || w[0].1.total_bytes < w[1].1.total_bytes),
        "{seen:?}"
    );

    let id = engine
        .create(&ContainerSpec {
            image: remote.clone(),
            ..spec(&device, "user", "true")
        })
        .await
        .unwrap();
    let images = engine.list_images().await.unwrap();
    let ours = images
        .iter()
        .find(|i| i.tags.contains(&remote))
        .expect("the pulled image is listed");
    assert_eq!(ours.containers, std::slice::from_ref(&id));
    assert!(ours.size_bytes >= 3_000_000, "{ours:?}");
    assert!(matches!(
        engine.remove_image(&ours.id).await,
        Err(RuntimeError::Conflict { .. })
    ));
    engine.remove(&id).await.unwrap();
    engine.remove_image(&ours.id).await.unwrap();
    assert!(!engine.image_present(&remote).await.unwrap());
    drop(cleanup);

    let usage = engine.data_root_usage().await.unwrap();
    let data_root = docker(&["info", "--format", "{{.DockerRootDir}}"]);
    assert_eq!(usage.data_root, std::path::PathBuf::from(data_root.trim()));
    assert!(usage.total_bytes > 0 && usage.free_bytes <= usage.total_bytes);
    let df = nix::sys::statvfs::statvfs(&usage.data_root).unwrap();
    let free = df.blocks_available() as u64 * df.fragment_size() as u64;
    // Other tests write meanwhile: the same within 1 GiB.
    assert!(
        usage.free_bytes.abs_diff(free) < 1 << 30,
        "{usage:?} vs {free}"
    );
}

struct ImageGuard(Vec<String>);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = try_docker(&["rmi", image]);
        }
    }
}

/// CPU and memory from the cgroup files and from the engine's one-shot
/// stats agree; prints what each costs (docs/DESIGN.md has the figures).
#[tokio::test]
async fn resource_use_from_cgroup_files_and_engine_agree() {
    let device = unique_id("stats");
    let _guard = EngineGuard::new(&device);
    let engine = engine();
    let busy = ContainerSpec {
        memory_bytes: Some(64 * 1024 * 1024),
        ..spec(&device, "busy", "while true; do :; done")
    };
    let idle = spec(
        &device,
        "idle",
        "trap 'exit 0' TERM; while true; do sleep 1; done",
    );
    let busy_id = engine.create(&busy).await.unwrap();
    let idle_id = engine.create(&idle).await.unwrap();
    engine.start(&busy_id).await.unwrap();
    engine.start(&idle_id).await.unwrap();

    let cgroup = engine
        .stats_from_cgroup(&busy_id)
        .expect("the cgroup files of a running container are found");
    let from_engine = engine.stats_from_engine(&busy_id).await.unwrap();
    assert_eq!(cgroup.memory_limit_bytes, Some(64 * 1024 * 1024));
    assert_eq!(from_engine.memory_limit_bytes, cgroup.memory_limit_bytes);
    assert!(from_engine.cpu_usage_nanos >= cgroup.cpu_usage_nanos);
    assert!(cgroup.memory_bytes > 0 && cgroup.memory_bytes < 64 * 1024 * 1024);

    // CPU over a second: the busy loop gets what the machine lets it (on
    // a loaded one, less than a core), and the kernel's account of its
    // process says the same; the sleeper uses next to nothing.
    let pid = docker(&["inspect", "--format", "{{.State.Pid}}", &busy_id]);
    let process_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let measure = |id: String| {
        let engine = &engine;
        async move {
            let (before, ticks) = (engine.stats(&id).await.unwrap(), process_ticks());
            let at = Instant::now();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (after, ticks_after) = (engine.stats(&id).await.unwrap(), process_ticks());
            let elapsed = at.elapsed();
            let by_process =
                (ticks_after - ticks) as f64 * 10.0 / elapsed.as_secs_f64() * 100.0 / 1000.0;
            let percent =
                cpu_percent(before.cpu_usage_nanos, after.cpu_usage_nanos, elapsed).unwrap();
            (percent, by_process)
        }
    };
    let (busy_percent, by_process) = measure(busy_id.clone()).await;
    let (idle_percent, _) = measure(idle_id.clone()).await;
    assert!(
        busy_percent > 5.0 && (busy_percent - by_process).abs() < 5.0,
        "busy loop at {busy_percent:.1}%, its process at {by_process:.1}%"
    );
    assert!(idle_percent < 5.0, "sleeper at {idle_percent:.1}%");

    // The cost of one reading, each way: wall time, the CPU time of this
    // thread (the test runs on one, engine requests included), and of the
    // engine's daemons (dockerd, containerd; other tests add noise to those).
    let rounds = 200;
    let (cgroup_wall, cgroup_cpu, cgroup_engine_cpu) = cost(rounds, || async {
        engine.stats_from_cgroup(&idle_id).unwrap();
    })
    .await;
    // The engine answers when its collector samples next (every second).
    let (engine_wall, engine_cpu, engine_engine_cpu) = cost(5, || async {
        engine.stats_from_engine(&idle_id).await.unwrap();
    })
    .await;
    eprintln!(
        "per reading: cgroup files {cgroup_wall:?} wall, {cgroup_cpu:?} cpu, engine daemons \
         {cgroup_engine_cpu:?}; one-shot stats {engine_wall:?} wall, {engine_cpu:?} cpu, \
         engine daemons {engine_engine_cpu:?}"
    );
    assert!(
        cgroup_wall < engine_wall,
        "{cgroup_wall:?} vs {engine_wall:?}"
    );
    engine.stop(&busy_id, 0).await.unwrap();
    engine.stop(&idle_id, 1).await.unwrap();
}

/// CPU time of the calling thread, from `/proc/thread-self/schedstat` (ns).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    Duration::from_nanos(text.split_whitespace().next().unwrap().parse().unwrap())
}

/// CPU time of the engine's daemons, from `/proc/<pid>/stat` (clock ticks).
fn daemons_cpu() -> Duration {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if !matches!(comm.trim(), "dockerd" | "containerd") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis; utime and stime
        // are the 14th and 15th of the whole line.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    Duration::from_millis(ticks * 10)
}

/// Average wall time, thread CPU and engine-daemon CPU of `rounds` calls.
async fn cost<F, Fut>(rounds: u32, mut call: F) -> (Duration, Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (cpu, daemons, at) = (thread_cpu(), daemons_cpu(), Instant::now());
    for _ in 0..rounds {
        call().await;
    }
    (
        at.elapsed() / rounds,
        (thread_cpu() - cpu) / rounds,
        (daemons_cpu() - daemons) / rounds,
    )
}

/// A stand-in for the engine's socket that forwards to the real one until
/// told to stall; then it keeps every connection open and silent, and
/// accepts new ones without answering: an engine hung mid-life.
struct StallingProxy {
    path: std::path::PathBuf,
    stall: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl StallingProxy {
    fn start() -> StallingProxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (stall, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut stalled = watch.clone();
                tokio::spawn(async move {
                    if *stalled.borrow() {
                        // Accepted, never answered.
                        let _ = stalled.wait_for(|s| !*s).await;
                        std::future::pending::<()>().await;
                    }
                    let mut engine = tokio::net::UnixStream::connect("/var/run/docker.sock")
                        .await
                        .unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut engine) => {}
                        // Stop forwarding, keep both ends open.
                        _ = async { stalled.wait_for(|s| *s).await.map(|_| ()) } => {
                            std::future::pending::<()>().await
                        }
                    }
                });
            }
        });
        StallingProxy {
            path,
            stall,
            _dir: dir,
        }
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    fn set_stalled(&self, stalled: bool) {
        self.stall.send_replace(stalled);
    }
}

/// An engine that stalls mid-life turns every call into `Unreachable`
/// within the timeout, and answers again once it recovers. Its live event
/// stream does not end: it goes quiet, so only a bounded call (a ping)
/// tells a stalled engine from an idle one.
#[tokio::test]
async fn an_engine_stalling_mid_life_is_unreachable_in_time_and_recovers() {
    let device = unique_id("stall");
    let proxy = StallingProxy::start();
    let timeout = Duration::from_millis(800);
    let engine = DockerRuntime::new(&proxy.host()).with_timeout(timeout);
    engine.ping().await.unwrap();
    assert!(engine.list(&device).await.unwrap().is_empty());
    // The stream's request goes out when it is first polled.
    let mut events = events_from_now(&engine, &device);
    let quiet = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
    assert!(quiet.is_err(), "no events for a device without containers");

    proxy.set_stalled(true);
    for _ in 0..2 {
        let at = Instant::now();
        let result = engine.list(&device).await;
        let took = at.elapsed();
        assert!(
            matches!(result, Err(RuntimeError::Unreachable(_))),
            "{result:?}"
        );
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(3),
            "{took:?}"
        );
        let at = Instant::now();
        assert!(matches!(
            engine.ping().await,
            Err(RuntimeError::Unreachable(_))
        ));
        assert!(at.elapsed() < timeout + Duration::from_secs(3));
    }
    let quiet = tokio::time::timeout(Duration::from_secs(2), events.next()).await;
    assert!(
        quiet.is_err(),
        "the event stream of a stalled engine stays open and quiet: {quiet:?}"
    );

    proxy.set_stalled(false);
    let deadline = Instant::now() + WAIT;
    while engine.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the engine never answered again");
    }
    assert!(engine.list(&device).await.unwrap().is_empty());
}
