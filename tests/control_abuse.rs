//! The control socket under abuse: a flood of clients, clients that never
//! read or never write, and a huge request are bounded (a cap on clients at
//! once, a time limit per client, a request size limit), each get an answer
//! where one can be given, and never hold up the thread the supervisor runs
//! on: a heartbeat on that same single-threaded runtime, which also
//! publishes to the snapshot as the supervisor does, keeps ticking.
//!
//! No engine or broker: the socket is served from the library, as in
//! `berth run`, with an in-memory reporter behind the snapshot.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use berth::control::{query_status, serve, Snapshot, MAX_CLIENTS};
use berth::report::{MemoryReporter, Reporter, Topic};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a tick of the heartbeat may be late. Waiting on a client would
/// hold the thread for a client's whole time limit (5 s) or for ever; a
/// shorter gap is the scheduler of a loaded machine, not berth.
const MAX_STALL: Duration = Duration::from_secs(5);

struct Served {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The longest gap between two heartbeat ticks so far.
    stall: Arc<Mutex<Duration>>,
}

impl Served {
    /// Serves a snapshot holding `documents` deployments of `size` bytes
    /// each, with the heartbeat running beside it.
    fn start(documents: usize, size: usize) -> Served {
        let dir = tempfile::tempdir().expect("temp dir");
        let snapshot = Arc::new(Snapshot::new(Arc::new(MemoryReporter::default())));
        for i in 0..documents {
            snapshot.publish(
                Topic::Deployment(format!("d{i}")),
                json!({
                    "device_id": "robot-42", "deployment_id": format!("d{i}"),
                    "package": "pkg", "package_version": "1", "phase": "Succeeded",
                    "status": "Running", "error_code": null, "reason": "x".repeat(size),
                    "restart_policy": "always", "restart_count": 0, "executables": [],
                    "updated_at": "2026-11-28T16:00:00.125Z",
                }),
            );
        }
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let path = serve(
            dir.path(),
            Arc::clone(&snapshot),
            shutdown.clone(),
            &tracker,
        )
        .expect("serve the control socket");
        let stall = Arc::new(Mutex::new(Duration::ZERO));
        let beat = {
            let stall = Arc::clone(&stall);
            let snapshot = Arc::clone(&snapshot);
            let shutdown = shutdown.clone();
            async move {
                let mut n = 0u64;
                while !shutdown.is_cancelled() {
                    let before = Instant::now();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let gap = before.elapsed();
                    let mut worst = stall.lock().unwrap();
                    *worst = (*worst).max(gap);
                    n += 1;
                    snapshot.publish(Topic::Agent, json!({"state": "online", "beat": n}));
                }
            }
        };
        tracker.spawn(beat);
        Served {
            _dir: dir,
            path,
            shutdown,
            tracker,
            stall,
        }
    }

    fn assert_never_stalled(&self) {
        let worst = *self.stall.lock().unwrap();
        assert!(
            worst < MAX_STALL,
            "the runtime thread stalled for {worst:?} (at most {MAX_STALL:?})"
        );
    }

    async fn stop(self) {
        self.assert_never_stalled();
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("the control socket's tasks end on shutdown");
    }
}

/// One exchange as `berth status` does it, from a thread of its own.
fn ask(path: &Path) -> Value {
    let mut stream = UnixStream::connect(path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // A server that turns the client away answers at once and closes
    // without reading: the request may then meet a closed socket, and the
    // answer is still there to read.
    if let Err(e) = stream.write_all(b"status\n") {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "send the request: {e}"
        );
    }
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read the answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client thread")
}

#[tokio::test(flavor = "current_thread")]
async fn two_hundred_clients_at_once_are_each_answered() {
    let served = Served::start(20, 200);
    let path = served.path.clone();
    let answers = blocking(move || {
        let barrier = Arc::new(Barrier::new(200));
        let clients: Vec<_> = (0..200)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                let path = path.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    ask(&path)
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect::<Vec<_>>()
    })
    .await;
    let mut statuses = 0;
    for answer in &answers {
        if answer["deployments"]
            .as_array()
            .is_some_and(|d| d.len() == 20)
        {
            statuses += 1;
        } else {
            assert_eq!(
                answer["error"], "busy: too many control clients at once; try again",
                "neither the status nor the busy answer: {answer}"
            );
        }
    }
    assert!(
        statuses >= MAX_CLIENTS.min(200),
        "only {statuses} of 200 clients got the status"
    );
    // The flood leaves nothing behind: the next client is served.
    let path = served.path.clone();
    let after = blocking(move || query_status(&path)).await;
    assert_eq!(
        after.expect("status after the flood").deployments[0].status,
        berth::model::Status::Running
    );
    served.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_ten_megabyte_request_gets_an_error_after_256_bytes() {
    let served = Served::start(1, 10);
    let path = served.path.clone();
    let (answer, took) = blocking(move || {
        let started = Instant::now();
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // berth stops reading after 257 bytes and closes: the rest of the
        // write fails with a broken pipe, which is the point.
        let _ = stream.write_all(&vec![b'a'; 10 * 1024 * 1024]);
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read the answer");
        (answer, started.elapsed())
    })
    .await;
    let answer: Value = serde_json::from_str(&answer)
        .unwrap_or_else(|e| panic!("not one JSON answer ({e}): {answer:?}"));
    assert_eq!(answer["error"], "request longer than 256 bytes");
    assert!(
        took < Duration::from_secs(5),
        "answered after {took:?}, not at once"
    );
    served.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn clients_that_never_read_or_never_write_are_cut_off_and_others_served() {
    // 64 documents of 64 KiB: an answer of 4 MiB, far more than a socket
    // buffer, so a client that does not read holds its exchange open.
    let served = Served::start(64, 64 * 1024);
    let path = served.path.clone();
    let (silent, mute) = blocking(move || {
        let mute = UnixStream::connect(&path).expect("connect");
        let mut silent = UnixStream::connect(&path).expect("connect");
        silent.write_all(b"status\n").expect("send the request");
        (silent, mute)
    })
    .await;

    // Meanwhile everyone else is served, whole answers.
    let path = served.path.clone();
    let others = blocking(move || (0..5).map(|_| ask(&path)).collect::<Vec<_>>()).await;
    for answer in others {
        assert_eq!(answer["deployments"].as_array().map(Vec::len), Some(64));
    }

    // Then the two are closed by berth within its time limit (5 s): each
    // read ends (EOF), the silent one's before the whole answer.
    let (silent_read, mute_read, took) = blocking(move || {
        let started = Instant::now();
        let mut silent = silent;
        let mut mute = mute;
        silent
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        mute.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut sink = Vec::new();
        // Wait for berth to give up before reading anything.
        let mut probe = [0u8; 1];
        let mute_read = mute.read(&mut probe).expect("berth closes the mute client");
        std::thread::sleep(Duration::from_millis(100));
        let silent_read = silent.read_to_end(&mut sink).expect("read what was sent");
        (silent_read, mute_read, started.elapsed())
    })
    .await;
    assert_eq!(mute_read, 0, "the mute client is closed without an answer");
    assert!(
        silent_read < 64 * 64 * 1024,
        "the silent client got the whole answer ({silent_read} bytes): it was not cut off"
    );
    assert!(
        took < Duration::from_secs(15),
        "cut off only after {took:?}"
    );
    served.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn beyond_the_cap_clients_are_told_busy_at_once_until_a_slot_frees() {
    let served = Served::start(1, 10);
    let path = served.path.clone();
    let hogs = blocking(move || {
        (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect::<Vec<_>>()
    })
    .await;
    // Every slot is held by a client that sends nothing; the next is turned
    // away at once instead of queueing behind them.
    let path = served.path.clone();
    let (busy, took) = blocking(move || {
        let started = Instant::now();
        let answer = ask(&path);
        (answer, started.elapsed())
    })
    .await;
    assert_eq!(
        busy["error"],
        "busy: too many control clients at once; try again"
    );
    assert!(
        took < Duration::from_secs(2),
        "the busy answer took {took:?}"
    );
    // A hog that leaves frees its slot.
    drop(hogs);
    let path = served.path.clone();
    let answer = blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = ask(&path);
            if answer.get("deployments").is_some() || Instant::now() > deadline {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await;
    assert_eq!(answer["deployments"][0]["status"], "Running");
    served.stop().await;
}
