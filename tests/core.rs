//! berth core, end to end: the real binary against the real Docker engine, a
//! real Mosquitto broker and a real registry. Each test has its own device id,
//! broker and temp dir, and removes its containers even when it fails.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// A script that counts its runs in the container's own filesystem (kept
/// across restarts of the same container), exits 1 for the first `fail` runs
/// and then keeps running until SIGTERM.
fn fail_then_run(fail: u32) -> String {
    format!(
        "n=$(cat /runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > /runs; \
         if [ $n -le {fail} ]; then sleep 0.2; exit 1; fi; \
         trap 'exit 0' TERM; while true; do sleep 1; done"
    )
}

fn field<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.get(name)
        .unwrap_or_else(|| panic!("document has no field {name}: {doc}"))
}

fn count(history: &[(String, i128)], action: &str) -> usize {
    history.iter().filter(|(a, _)| a == action).count()
}

#[test]
fn pulls_from_the_registry_and_reports_the_spec_document() {
    let registry = Registry::new();
    let mut s = Harness::new("pull", |c| c);
    let repo = format!("berth/{}:1", s.berth.device_id().to_lowercase());
    let image = registry.push(TEST_IMAGE, &repo);
    // The engine must really pull it.
    docker(&["rmi", &image]);
    s.berth.write_deployment(
        "talker",
        &deployment_toml("talker", &restart_policy("always"), &image, UNTIL_SIGTERM),
    );
    s.berth.start();

    let topic = s.berth.topic("deployments/talker");
    let doc = s.sub.wait_for(
        &topic,
        |d| d["phase"] == "Succeeded" && d["status"] == "Running",
        WAIT,
    );
    let inspect = &containers(s.berth.device_id())[0];
    let name = format!("berth.{}.talker.main.app", s.berth.device_id());
    assert_eq!(inspect["Name"], format!("/{name}"));
    let labels = &inspect["Config"]["Labels"];
    assert_eq!(labels["berth.device"], s.berth.device_id());
    assert_eq!(labels["berth.deployment"], "talker");
    assert_eq!(labels["berth.component"], "main");
    assert_eq!(labels["berth.executable"], "app");
    assert!(labels["berth.spec-hash"]
        .as_str()
        .is_some_and(|h| !h.is_empty()));
    assert_eq!(inspect["HostConfig"]["RestartPolicy"]["Name"], "no");

    // Every field of the SPEC 9 example, with this deployment's values.
    let want_fields = [
        "device_id",
        "deployment_id",
        "package",
        "package_version",
        "phase",
        "status",
        "error_code",
        "reason",
        "restart_policy",
        "restart_count",
        "executables",
        "update",
        "updated_at",
    ];
    let mut keys: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    let mut want = want_fields.to_vec();
    want.sort();
    assert_eq!(keys, want, "document fields");
    assert_eq!(field(&doc, "device_id"), s.berth.device_id());
    assert_eq!(field(&doc, "deployment_id"), "talker");
    assert_eq!(field(&doc, "package"), "pkg-talker");
    assert_eq!(field(&doc, "package_version"), "1.2.3");
    assert_eq!(field(&doc, "error_code"), &Value::Null);
    assert_eq!(field(&doc, "reason"), &Value::Null);
    assert_eq!(field(&doc, "restart_policy"), "always");
    assert_eq!(field(&doc, "restart_count"), 0);
    assert!(humantime::parse_rfc3339(field(&doc, "updated_at").as_str().unwrap()).is_ok());

    let e = exe(&doc);
    let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "component",
            "container_id",
            "error_code",
            "exit_code",
            "health",
            "image",
            "name",
            "reason",
            "restart_count",
            "started_at",
            "status"
        ],
        "executable fields"
    );
    assert_eq!(e["component"], "main");
    assert_eq!(e["name"], "app");
    assert_eq!(e["container_id"], inspect["Id"]);
    assert_eq!(e["image"], image.as_str());
    assert_eq!(e["status"], "Running");
    assert_eq!(e["reason"], Value::Null);
    assert_eq!(e["error_code"], Value::Null);
    assert_eq!(e["exit_code"], Value::Null);
    assert_eq!(e["restart_count"], 0);
    let started = humantime::parse_rfc3339(e["started_at"].as_str().unwrap()).unwrap();
    let engine_started =
        humantime::parse_rfc3339(inspect["State"]["StartedAt"].as_str().unwrap()).unwrap();
    let diff = engine_started
        .duration_since(started)
        .unwrap_or_else(|e| e.duration());
    assert!(
        diff < Duration::from_millis(1),
        "started_at {started:?} vs engine {engine_started:?}"
    );

    // Retained: a subscriber that comes later gets it from the broker.
    let late = Subscriber::new(s.broker.port(), &topic);
    let msg = late.wait_for_message(&topic, |d| d["status"] == "Running", WAIT);
    assert!(msg.retained, "the deployment document is retained");
    let agent = late_agent(&s);
    assert_eq!(agent["state"], "online");
    assert_eq!(agent["docker"], "connected");
    assert_eq!(agent["boot_id"], s.berth.boot_id());
    s.berth.sigterm();
}

fn late_agent(s: &Harness) -> Value {
    let topic = s.berth.topic("agent");
    let sub = Subscriber::new(s.broker.port(), &topic);
    let msg = sub.wait_for_message(&topic, |_| true, WAIT);
    assert!(msg.retained, "the agent document is retained");
    msg.payload
}

/// SPEC 6, first two rows, for each policy: what exit 0 and exit 3 lead to.
#[test]
fn exit_codes_under_each_policy() {
    let mut s = Harness::new("policy", |c| c.backoff(100, 1, 30));
    // (deployment, policy, exit code, restarts?, final status, error code)
    let rows = [
        ("always-0", "always", 0, true, "", Value::Null),
        ("always-3", "always", 3, true, "", Value::Null),
        ("onfail-0", "on-failure", 0, false, "Completed", Value::Null),
        ("onfail-3", "on-failure", 3, true, "", Value::Null),
        ("never-0", "never", 0, false, "Completed", Value::Null),
        (
            "never-3",
            "never",
            3,
            false,
            "Error",
            Value::from("DEP_E152"),
        ),
    ];
    for (id, policy, code, ..) in &rows {
        s.berth.write_deployment(
            id,
            &deployment_toml(
                id,
                &restart_policy(policy),
                TEST_IMAGE,
                &format!("sleep 0.3; exit {code}"),
            ),
        );
    }
    s.berth.start();
    for (id, policy, code, restarts, status, error_code) in &rows {
        let topic = s.berth.topic(&format!("deployments/{id}"));
        if *restarts {
            let doc = s
                .sub
                .wait_for(&topic, |d| d["restart_count"].as_u64() >= Some(3), WAIT);
            assert_eq!(doc["restart_policy"], *policy);
            assert_eq!(doc["phase"], "Succeeded", "{id}: {doc}");
        } else {
            let doc = s.sub.wait_for(&topic, |d| d["status"] == *status, WAIT);
            assert_eq!(exe(&doc)["exit_code"], *code, "{id}: {doc}");
            assert_eq!(doc["error_code"], *error_code, "{id}: {doc}");
            assert_eq!(exe(&doc)["error_code"], *error_code, "{id}: {doc}");
            if *status == "Error" {
                let reason = doc["reason"].as_str().unwrap_or_default();
                assert!(reason.contains("exited with code 3"), "{id}: {doc}");
            }
        }
    }
    // A restart of exit 3 while waiting out its back-off: Pending, the exit
    // code and DEP_E152, and a reason that says when.
    let doc = s.wait("always-3", |d| {
        exe(d)["status"] == "Pending"
            && exe(d)["reason"]
                .as_str()
                .is_some_and(|r| r.contains("back-off"))
    });
    let reason = exe(&doc)["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("restarting in ") && reason.contains("after exit code 3"),
        "{reason}"
    );
    assert_eq!(exe(&doc)["exit_code"], 3);
    assert_eq!(exe(&doc)["error_code"], "DEP_E152");

    // Give the non-restarting ones time to prove they stay down.
    std::thread::sleep(Duration::from_secs(2));
    for (id, _, code, restarts, status, _) in &rows {
        let cs: Vec<Value> = containers(s.berth.device_id())
            .into_iter()
            .filter(|c| c["Config"]["Labels"]["berth.deployment"] == *id)
            .collect();
        assert_eq!(cs.len(), 1, "{id}: one container");
        let c = &cs[0];
        let history = s.events.history(c["Id"].as_str().unwrap(), 0);
        let starts = count(&history, "start");
        if *restarts {
            assert!(starts >= 4, "{id}: {starts} starts");
        } else {
            assert_eq!(starts, 1, "{id}: never restarted");
            assert_eq!(c["State"]["ExitCode"], *code);
            let doc = s.wait(id, |_| true);
            assert_eq!(doc["status"], *status);
            assert_eq!(doc["restart_count"], 0);
        }
    }
    // Restarts are reported on the events topic with the exit code.
    let events = s.sub.messages_on(&s.berth.topic("events"));
    for (id, _, code, restarts, ..) in &rows {
        let n = events
            .iter()
            .filter(|m| m.payload["event"] == "restart" && m.payload["deployment"] == *id)
            .inspect(|m| {
                assert_eq!(m.payload["exit_code"], *code, "{id}");
                assert!(!m.retained, "events are not retained");
            })
            .count();
        assert_eq!(n > 0, *restarts, "{id}: restart events: {n}");
    }
    s.berth.sigterm();
}

/// Back-off: immediate first restart, then initial, doubling up to the cap;
/// a run of `backoff_reset_after_secs` starts the sequence again. Measured on
/// the engine's own `die` and `start` timestamps.
#[test]
fn backoff_delays_grow_and_reset() {
    // initial 1.5 s, max 3 s, reset after 4 s: delays far enough apart to
    // tell from the engine's own start time on a loaded machine.
    let mut s = Harness::new("backoff", |c| c.backoff(1500, 3, 4));
    let script = "n=$(cat /runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > /runs; \
                  if [ $n -eq 5 ]; then sleep 5; fi; \
                  if [ $n -ge 7 ]; then trap 'exit 0' TERM; while true; do sleep 1; done; fi; \
                  sleep 0.1; exit 1";
    s.berth.write_deployment(
        "loop",
        &deployment_toml("loop", &restart_policy("always"), TEST_IMAGE, script),
    );
    let t0 = nanos_now();
    s.berth.start();
    let topic = s.berth.topic("deployments/loop");
    let doc = s.sub.wait_for(
        &topic,
        |d| d["restart_count"] == 6 && d["status"] == "Running",
        Duration::from_secs(60),
    );
    let id = exe(&doc)["container_id"].as_str().unwrap().to_owned();
    // From the engine's `die` to berth's decision to start again: the time
    // of its `restart` event, on the same clock. The engine's own start,
    // which takes seconds on a loaded machine, is not berth's wait.
    let dies: Vec<i128> = s
        .events
        .history(&id, t0)
        .into_iter()
        .filter(|(action, _)| action == "die")
        .map(|(_, t)| t)
        .collect();
    let restarts: Vec<i128> = s
        .sub
        .messages_on(&s.berth.topic("events"))
        .iter()
        .filter(|m| m.payload["event"] == "restart" && m.payload["deployment"] == "loop")
        .map(|m| {
            let t = humantime::parse_rfc3339(m.payload["time"].as_str().unwrap()).unwrap();
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128
        })
        .collect();
    let gaps: Vec<i64> = restarts
        .iter()
        .filter_map(|r| {
            // The event's time is in whole milliseconds, the truncated
            // start of the millisecond the restart happened in: the restart
            // came before its end (an immediate restart may carry the
            // millisecond its `die` happened in).
            let end = *r + 999_999;
            let die = dies.iter().filter(|d| **d <= end).max()?;
            Some(((end - die) / 1_000_000) as i64)
        })
        .collect();
    // Run 5 lasts 5 s (longer than reset_after): restart 5 is immediate again.
    let want = [0, 1500, 3000, 3000, 0, 1500];
    assert_eq!(gaps.len(), want.len(), "gaps {gaps:?}");
    for (i, (got, want)) in gaps.iter().zip(want).enumerate() {
        assert!(
            // The `die` reaches berth a moment after the engine stamps it.
            *got >= want && *got < want + 1200,
            "restart {}: waited {got} ms, want about {want} ms (all: {gaps:?})",
            i + 1
        );
    }
    s.berth.sigterm();
}

#[test]
fn missing_image_and_missing_command_are_errors() {
    let registry = Registry::new();
    let mut s = Harness::new("errors", |c| c);
    let missing = format!("{}/berth/missing:1", registry.server());
    s.berth.write_deployment(
        "noimage",
        &deployment_toml("noimage", &restart_policy("always"), &missing, "sleep 100"),
    );
    s.berth.write_deployment(
        "nocmd",
        &format!(
            r#"id = "nocmd"
package = "p"
package_version = "1"

[[components]]
name = "main"

[[components.executables]]
name = "app"
image = "{TEST_IMAGE}"
command = ["no-such-binary", "--flag"]
"#
        ),
    );
    s.berth.start();
    let doc = s.wait("noimage", |d| d["status"] == "Error");
    assert_eq!(doc["error_code"], "DEP_E161", "{doc}");
    assert_eq!(exe(&doc)["error_code"], "DEP_E161", "{doc}");
    assert!(
        exe(&doc)["reason"]
            .as_str()
            .unwrap()
            .contains("berth/missing"),
        "{doc}"
    );
    assert!(containers(s.berth.device_id())
        .iter()
        .all(|c| c["Config"]["Labels"]["berth.deployment"] != "noimage"));

    let doc = s.wait("nocmd", |d| d["status"] == "Error");
    assert_eq!(doc["error_code"], "DEP_E152", "{doc}");
    let reason = exe(&doc)["reason"].as_str().unwrap();
    assert!(
        reason.contains(r#"exec: "no-such-binary": executable file not found in $PATH"#),
        "{reason}"
    );
    // Retried with back-off, never given up.
    let doc = s.wait("nocmd", |d| d["restart_count"].as_u64() >= Some(2));
    assert_eq!(doc["status"], "Error");
    s.berth.sigterm();
}

/// A password whose base64 form (in the engine's auth header) holds `+` and
/// `/`: bollard's own encoding would lose it.
#[test]
fn private_registry_with_credentials() {
    let password = "pa>?ss~~w>rd?";
    let encoded = base64_std(format!("{{\"password\":\"{password}\"}}").as_bytes());
    assert!(
        base64_std(password.as_bytes()).contains(['+', '/']) || encoded.contains(['+', '/']),
        "the password must exercise the base64 trap"
    );
    let registry = Registry::with_auth("robot", password);
    let repo = format!("private/app-{}:1", std::process::id());
    let image = registry.push(TEST_IMAGE, &repo);
    docker(&["rmi", &image]);
    assert!(
        registry.pull_anonymously(&image).is_err(),
        "the registry must refuse anonymous pulls"
    );

    let login = registry.login().unwrap();
    let mut s = Harness::new("creds", |c| c.registry(login));
    s.berth.write_deployment(
        "private",
        &deployment_toml("private", &restart_policy("always"), &image, UNTIL_SIGTERM),
    );
    s.berth.start();
    let doc = s.wait("private", |d| {
        d["status"] == "Running" || d["status"] == "Error"
    });
    assert_eq!(doc["status"], "Running", "{doc}\n{}", s.berth.log());
    assert!(
        !s.berth.log().contains(password),
        "the password must not be logged"
    );
    s.berth.sigterm();
}

/// The broker goes away while an executable crash-loops: berth keeps
/// enforcing the policy, and when the broker is back the retained documents
/// carry the latest truth with every restart counted.
#[test]
fn broker_outage_during_a_crash_loop() {
    let mut s = Harness::new("outage", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "crashy",
        &deployment_toml(
            "crashy",
            &restart_policy("always"),
            TEST_IMAGE,
            &fail_then_run(6),
        ),
    );
    s.berth.start();
    s.wait("crashy", |d| {
        d["executables"][0]["container_id"].is_string()
    });
    s.broker.stop();
    // Six failures at up to 1 s back-off each, all while the broker is away.
    let id = exe(&s.wait("crashy", |_| true))["container_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        wait_until(WAIT, || count(&s.events.history(&id, 0), "start") == 7),
        "the loop ran while the broker was away: {:?}",
        s.events.history(&id, 0)
    );
    assert!(
        !s.broker.is_running(),
        "all of it while the broker was away"
    );

    s.broker.start();
    s.wait("crashy", |d| {
        d["restart_count"] == 6 && d["status"] == "Running"
    });
    // Republished retained: a subscriber that comes now gets it from the broker.
    let late = Subscriber::new(s.broker.port(), &s.berth.topic("deployments/crashy"));
    let msg = late.wait_for_message(&s.berth.topic("deployments/crashy"), |_| true, WAIT);
    assert!(msg.retained);
    assert_eq!(msg.payload["restart_count"], 6);
    assert_eq!(msg.payload["status"], "Running");
    assert_eq!(exe(&msg.payload)["restart_count"], 6);
    let agent = late_agent(&s);
    assert_eq!(agent["state"], "online");
    s.berth.sigterm();
}

/// SIGTERM leaves the containers running; the next berth adopts them by
/// label without restarting them, and the counts are unchanged.
#[test]
fn sigterm_then_restart_adopts_the_containers() {
    let mut s = Harness::new("adopt", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "steady",
        &deployment_toml(
            "steady",
            &restart_policy("on-failure"),
            TEST_IMAGE,
            &fail_then_run(2),
        ),
    );
    s.berth.start();
    let topic = s.berth.topic("deployments/steady");
    let before = s.sub.wait_for(
        &topic,
        |d| d["restart_count"] == 2 && d["status"] == "Running",
        WAIT,
    );
    let status = s.berth.sigterm();
    assert!(status.success(), "berth exits 0 on SIGTERM: {status:?}");
    let agent = s
        .sub
        .wait_for(&s.berth.topic("agent"), |d| d["state"] == "offline", WAIT);
    assert_eq!(agent["error_code"], "DEP_E151");
    let inspect = &containers(s.berth.device_id())[0];
    assert_eq!(
        inspect["State"]["Running"], true,
        "SIGTERM leaves containers running"
    );
    let t_restart = nanos_now();

    s.sub.clear();
    s.berth.start();
    let after = s.sub.wait_for(
        &topic,
        |d| d["status"] == "Running" && d["phase"] == "Succeeded",
        WAIT,
    );
    s.sub
        .wait_for(&s.berth.topic("agent"), |d| d["state"] == "online", WAIT);
    assert_eq!(exe(&after)["container_id"], exe(&before)["container_id"]);
    assert_eq!(exe(&after)["started_at"], exe(&before)["started_at"]);
    assert_eq!(after["restart_count"], 2);
    assert_eq!(exe(&after)["restart_count"], 2);
    // Not a wait for an outcome: a window in which a wrong restart would
    // show.
    std::thread::sleep(Duration::from_secs(1));
    let id = exe(&after)["container_id"].as_str().unwrap();
    let history = s.events.history(id, t_restart);
    assert_eq!(
        count(&history, "start"),
        0,
        "adopted without a restart: {history:?}"
    );
    assert_eq!(containers(s.berth.device_id()).len(), 1);
    s.berth.sigterm();
}

#[test]
fn check_config_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("berth.toml");
    let deps = dir.path().join("deployments.d");
    std::fs::create_dir(&deps).unwrap();
    std::fs::write(
        &agent,
        "device_id = \"robot 42\"\ndeployments_dir = \"deployments.d\"\nstate_dir = \"state\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1\"\n",
    )
    .unwrap();
    std::fs::write(
        deps.join("a.toml"),
        "id = \"a\"\npackage = \"p\"\npackage_version = \"1\"\nrestart = \"sometimes\"\n\n[[components]]\nname = \"c\"\n\n[[components.executables]]\nname = \"e\"\nimage = \"i\"\n",
    )
    .unwrap();
    std::fs::write(
        deps.join("b.toml"),
        "id = \"b\"\npackage = \"p\"\npackage_version = \"1\"\n[[components]]\nname = \"c\"\n[[components.executables]]\nname = \"e\"\nimage = \"i\"\nimagee = \"typo\"\n",
    )
    .unwrap();
    std::fs::write(
        deps.join("c.toml"),
        "id = \"Bad Id\"\npackage = \"p\"\npackage_version = \"1\"\n[[components]]\nname = \"c\"\n[[components.executables]]\nname = \"e\"\nimage = \"i\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["check-config", "--config"])
        .arg(&agent)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "exit 1 on errors");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let expect = [
        (agent.clone(), 1, "device_id"),
        (deps.join("c.toml"), 1, "id"),
        (deps.join("a.toml"), 4, "sometimes"),
        (deps.join("b.toml"), 9, "imagee"),
    ];
    for (file, line, word) in expect {
        let prefix = format!("{}:{line}:", file.display());
        let found = lines
            .iter()
            .find(|l| l.starts_with(&prefix) && l.contains(word))
            .unwrap_or_else(|| panic!("no error {prefix}...{word} in:\n{text}"));
        let col = found[prefix.len()..].split(':').next().unwrap();
        assert!(
            col.parse::<u32>().is_ok_and(|c| c >= 1),
            "column in {found}"
        );
    }
    assert_eq!(lines.len(), 4, "one line per error:\n{text}");

    // A good config passes with exit 0.
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["check-config", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/berth.toml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
}

/// The broker is down when berth starts: berth provisions anyway, and the
/// documents reach the broker, retained, once it is up.
#[test]
fn broker_down_at_start() {
    let mut s = Harness::new("nobroker", |c| c);
    s.broker.stop();
    s.berth.write_deployment(
        "early",
        &deployment_toml(
            "early",
            &restart_policy("always"),
            TEST_IMAGE,
            UNTIL_SIGTERM,
        ),
    );
    s.berth.start();
    let device = s.berth.device_id().to_owned();
    assert!(
        wait_until(WAIT, || containers(&device)
            .first()
            .is_some_and(|c| c["State"]["Running"] == true)),
        "berth provisions without a broker"
    );
    s.broker.start();
    let topic = s.berth.topic("deployments/early");
    s.sub.wait_for(&topic, |d| d["status"] == "Running", WAIT);
    let late = Subscriber::new(s.broker.port(), &topic);
    let msg = late.wait_for_message(&topic, |_| true, WAIT);
    assert!(msg.retained);
    assert_eq!(msg.payload["status"], "Running");
    assert_eq!(late_agent(&s)["state"], "online");
    s.berth.sigterm();
}
