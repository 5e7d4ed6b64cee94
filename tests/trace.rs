//! `berth run --trace-file`: the real binary against the real engine, with
//! an executable that exits once. The trace must show its first start
//! request, the die berth received, the restart's durable record, and the
//! start request of the restart,
//! in that order, on the engine's clock (CLOCK_REALTIME): the die is
//! recorded after the container's own `FinishedAt`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

/// `berth run --trace-file`, killed when dropped.
struct Traced {
    child: Child,
    trace: PathBuf,
}

impl Traced {
    fn start(berth: &Berth) -> Traced {
        let trace = berth.dir().join("trace.txt");
        let log = fs::File::create(berth.dir().join("traced.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("run")
            .arg("--config")
            .arg(berth.config_path())
            .arg("--trace-file")
            .arg(&trace)
            .env_remove("RUST_LOG")
            .env_remove("BERTH_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn berth");
        Traced { child, trace }
    }

    /// The trace's records as (kind, executable, nanos).
    fn records(&self) -> Vec<(String, String, i128)> {
        records(&self.trace)
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn records(path: &Path) -> Vec<(String, String, i128)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(words.len(), 3, "a trace line of three words: {line:?}");
            (
                words[0].to_owned(),
                words[1].to_owned(),
                words[2].parse().expect("nanoseconds"),
            )
        })
        .collect()
}

#[test]
fn the_trace_shows_die_received_and_start_requests_on_the_engines_clock() {
    let broker = Broker::new();
    let device = unique_id("trace");
    let _guard = EngineGuard::new(&device);
    let berth = Berth::new(BerthConfig::new(&device, broker.port()));
    berth.write_deployment(
        "app",
        &pull_never(&deployment_toml(
            "app",
            &restart_policy("always"),
            TEST_IMAGE,
            &format!("if [ -f /ran ]; then {UNTIL_SIGTERM}; fi; touch /ran; exit 1"),
        )),
    );
    let began = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i128;
    let traced = Traced::start(&berth);

    let kinds = |traced: &Traced| -> Vec<String> {
        traced
            .records()
            .into_iter()
            .map(|(kind, _, _)| kind)
            .collect()
    };
    assert!(
        wait_until(WAIT, || kinds(&traced).len() >= 4),
        "no start request, die, commitment and start request in the trace: {:?}; log:\n{}",
        traced.records(),
        fs::read_to_string(berth.dir().join("traced.log")).unwrap_or_default()
    );
    let records = traced.records();
    // The first start is not a restart: no commitment; the restart's record
    // is durable before its start is asked for.
    assert_eq!(
        kinds(&traced)[..4],
        ["start-request", "die", "committed", "start-request"],
        "{records:?}"
    );
    for (_, executable, nanos) in &records {
        assert_eq!(executable, "app/main/app", "{records:?}");
        assert!(
            *nanos >= began,
            "a record before berth started: {records:?}"
        );
    }
    let (first, die, committed, second) = (records[0].2, records[1].2, records[2].2, records[3].2);
    assert!(
        first <= die && die <= committed && committed <= second,
        "out of order: {records:?}"
    );

    // The die reached berth after the process had exited, by the engine's
    // own account, on the same clock.
    let name = format!("berth.{device}.app.main.app");
    let finished = container(&name).expect("the container")["State"]["FinishedAt"]
        .as_str()
        .expect("FinishedAt")
        .to_owned();
    let finished = humantime::parse_rfc3339(&finished)
        .expect("FinishedAt is RFC 3339")
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_nanos() as i128;
    assert!(
        finished <= die && die - finished < 10_000_000_000,
        "die received at {die}, container finished at {finished}"
    );
}
