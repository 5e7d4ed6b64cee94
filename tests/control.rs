//! The operator commands end to end: `berth status` against the real daemon's
//! control socket, `berth logs` and `berth exec` against the real Docker
//! engine. Each test has its own device id, broker and temp dir, and removes
//! its containers even when it fails.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Writes "first" to stdout, "err" to stderr, then "out" to stdout half a
/// second later (so that it is the last line of the log), and runs until
/// SIGTERM.
const SCRIPT: &str = "echo first; echo err >&2; sleep 0.5; echo out; \
                      trap 'exit 0' TERM; while true; do sleep 1; done";

/// berth running deployment `dep`, its executable `main/app` Running.
fn setup(prefix: &str) -> Harness {
    let mut s = Harness::new(prefix, |c| c);
    s.berth.write_deployment(
        "dep",
        &deployment_toml("dep", &restart_policy("always"), TEST_IMAGE, SCRIPT),
    );
    s.berth.start();
    s.wait("dep", |d| {
        d["phase"] == "Succeeded" && d["status"] == "Running"
    });
    s
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// `berth status --json`, parsed.
fn status_json(berth: &Berth) -> Value {
    let out = berth.command(&["status", "--json"]);
    assert!(out.status.success(), "status --json: {}", describe(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}): {}", describe(&out)))
}

fn latest_on(sub: &Subscriber, topic: &str) -> Option<Value> {
    sub.messages_on(topic).pop().map(|m| m.payload)
}

/// `berth status` exits 3 and names the socket.
fn assert_not_running(berth: &Berth) {
    let socket = berth.state_dir().join("berth.sock");
    let out = berth.command(&["status"]);
    assert_eq!(out.status.code(), Some(3), "status: {}", describe(&out));
    assert_eq!(
        text(&out.stderr),
        format!(
            "berth is not running (no control socket at {})\n",
            socket.display()
        )
    );
    assert!(out.stdout.is_empty(), "status: {}", describe(&out));
}

#[test]
fn status_shows_what_mqtt_carries() {
    let mut s = setup("status");
    let socket = s.berth.state_dir().join("berth.sock");
    let mode = std::fs::metadata(&socket)
        .expect("the control socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // The same documents as the broker's latest; a publish may land between
    // the two reads, so ask again until they agree.
    let topic = s.berth.topic("deployments/dep");
    let agent_topic = s.berth.topic("agent");
    let mut last = Value::Null;
    let agreed = wait_until(Duration::from_secs(10), || {
        last = status_json(&s.berth);
        last["deployments"].as_array().map(Vec::len) == Some(1)
            && Some(&last["deployments"][0]) == latest_on(&s.sub, &topic).as_ref()
            && Some(&last["agent"]) == latest_on(&s.sub, &agent_topic).as_ref()
    });
    assert!(
        agreed,
        "status --json {last:#} differs from MQTT: deployment {:#?}, agent {:#?}",
        latest_on(&s.sub, &topic),
        latest_on(&s.sub, &agent_topic)
    );
    assert_eq!(last["deployments"][0]["deployment_id"], "dep");
    assert!(last.get("ros_master").is_some(), "{last:#}");

    let out = s.berth.command(&["status"]);
    assert!(out.status.success(), "status: {}", describe(&out));
    let table = text(&out.stdout);
    assert!(
        !table.contains('\x1b'),
        "colour without a terminal:\n{table}"
    );
    let lines: Vec<&str> = table.lines().collect();
    let row = |start: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no row starting {start:?}:\n{table}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("DEPLOYMENT"),
        [
            "DEPLOYMENT",
            "PHASE",
            "STATUS",
            "RESTARTS",
            "ERROR",
            "REASON"
        ]
    );
    assert_eq!(row("dep "), ["dep", "Succeeded", "Running", "0", "-", "-"]);
    assert_eq!(row("  main/app"), ["main/app", "Running", "0", "-", "-"]);

    // Killed: the socket file stays behind, nobody answers.
    s.berth.kill9();
    assert!(socket.exists());
    assert_not_running(&s.berth);

    // Started again: the stale socket is replaced.
    s.berth.start();
    let answered = wait_until(WAIT, || s.berth.command(&["status"]).status.success());
    assert!(answered, "berth status after a restart:\n{}", s.berth.log());

    // Stopped cleanly: the socket is gone.
    assert!(s.berth.sigterm().success(), "{}", s.berth.log());
    assert!(!socket.exists());
    assert_not_running(&s.berth);
}

#[test]
fn logs_keep_stdout_and_stderr_apart() {
    let s = setup("logs");
    let all = |berth: &Berth| berth.command(&["logs", "dep"]);
    let complete = wait_until(WAIT, || text(&all(&s.berth).stdout) == "first\nout\n");
    let out = all(&s.berth);
    assert!(complete, "logs dep: {}", describe(&out));
    assert_eq!(text(&out.stderr), "err\n", "logs dep: {}", describe(&out));

    let out = s.berth.command(&["logs", "dep", "--tail", "1"]);
    assert!(out.status.success(), "logs --tail 1: {}", describe(&out));
    assert_eq!(
        text(&out.stdout),
        "out\n",
        "logs --tail 1: {}",
        describe(&out)
    );
    assert_eq!(text(&out.stderr), "", "logs --tail 1: {}", describe(&out));

    let out = s
        .berth
        .command(&["logs", "dep", "main/app", "--timestamps"]);
    assert!(
        out.status.success(),
        "logs --timestamps: {}",
        describe(&out)
    );
    for line in text(&out.stdout).lines() {
        let (stamp, _) = line.split_once(' ').expect("a time stamp, then the line");
        assert!(humantime::parse_rfc3339(stamp).is_ok(), "{line:?}");
    }

    let out = s.berth.command(&["logs", "dep", "nope"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "logs dep nope: {}",
        describe(&out)
    );
    assert_eq!(
        text(&out.stderr),
        "berth: deployment dep has no executable nope; it has main/app\n"
    );
    let out = s.berth.command(&["logs", "nothing-here"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("deployment nothing-here has no container"),
        "{}",
        describe(&out)
    );
}

#[test]
fn exec_runs_in_the_container_and_returns_its_exit_code() {
    let s = setup("exec");
    let out = s
        .berth
        .command(&["exec", "dep", "app", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "exit 7: {}", describe(&out));

    let out = s.berth.command(&["exec", "dep", "app", "--", "echo", "hi"]);
    assert!(out.status.success(), "echo hi: {}", describe(&out));
    assert_eq!(text(&out.stdout), "hi\n");

    let out = s
        .berth
        .command(&["exec", "dep", "main/app", "--", "sh", "-c", "echo oops >&2"]);
    assert!(out.status.success(), "stderr: {}", describe(&out));
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        (String::new(), "oops\n".into())
    );

    // stdin is forwarded, and its end reaches the command.
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "exec",
            "dep",
            "app",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo done",
        ])
        .env("BERTH_CONFIG", s.berth.config_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth exec");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello\n")
        .expect("write to berth exec");
    let out = child.wait_with_output().expect("berth exec");
    assert!(out.status.success(), "tr: {}", describe(&out));
    assert_eq!(text(&out.stdout), "HELLO\ndone\n");

    let out = s.berth.command(&["exec", "dep", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert_eq!(
        text(&out.stderr),
        "berth: deployment dep has no executable nope; it has main/app\n"
    );
}

#[test]
fn help_tells_the_exit_codes() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .output()
            .expect("run berth");
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        text(&out.stdout)
    };
    // Exit codes are listed as `<code> <meaning>`, however they are aligned.
    let squeeze = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(squeeze(run(&["status", "--help"])).contains("3 berth is not running"));
    assert!(squeeze(run(&["exec", "--help"])).contains("125 berth could not run it"));
    assert!(run(&["logs", "--help"]).contains("--tail <N>"));
}
