//! How long berth's durable state writes take on this machine's disk: the
//! restart log's append (one `fdatasync`), and the replacement of the whole
//! `state.json` (temporary file, fsync, renames, directory fsync), for a state
//! of 100 executables. Used to choose how a restart commitment is written
//! (docs/DESIGN.md, "What is written when").
//!
//! `cargo run --example state_io [DIR] [ROUNDS]`; DIR defaults to a
//! temporary directory under /var/tmp (on the disk, not a tmpfs).

use std::time::{Duration, Instant};

use berth::model::ExecKey;
use berth::state::{Intent, Journal, PendingRestart, State, StateStore};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = match args.next() {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::PathBuf::from(format!("/var/tmp/berth-state-io-{}", std::process::id())),
    };
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(500);
    let store = StateStore::open(&dir).expect("open the state dir");
    let mut journal = Journal::new(store);

    let mut state = State::default();
    for d in 0..25 {
        for e in 0..4 {
            let key = ExecKey::new(&format!("deployment-{d}"), "component", &format!("exe-{e}"));
            let record = state.exec_mut(&key);
            record.restart_count = 12;
            record.container_id = Some(format!("{:064x}", d * 4 + e));
            record.started_at = Some("2026-12-01T23:00:00.123456789Z".into());
        }
    }
    let intent = |n: u64| Intent {
        key: "deployment-7/component/exe-2".into(),
        restart_count: n,
        pending_restart: PendingRestart::after(Some("2026-12-01T23:00:00.123456789Z".into())),
    };

    let append = measure(rounds, |n| journal.append(&[intent(n as u64)]).unwrap());
    journal.compact(&state).unwrap();
    let compact = measure(rounds, |_| journal.compact(&state).unwrap());
    println!(
        "state of {} executables, {} bytes; {rounds} rounds in {}",
        state.executables.len(),
        serde_json::to_vec(&state).unwrap().len(),
        dir.display()
    );
    report("restart log append + fdatasync", &append);
    report(
        "state.json replace (tmp, fsync, renames, dir fsync)",
        &compact,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn measure(rounds: usize, mut f: impl FnMut(usize)) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|n| {
            let start = Instant::now();
            f(n);
            start.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn report(what: &str, sorted: &[Duration]) {
    let at = |q: f64| sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)];
    println!(
        "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        sorted[sorted.len() - 1].as_secs_f64() * 1e3
    );
}
