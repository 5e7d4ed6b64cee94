//! An engine that stops answering, in paused time: the event pump's timeout
//! turns it into `EngineDown` (every executable `Unknown` + `DEP_E301`)
//! within `[docker] timeout_secs` of its last answer, and the reconnection
//! reconciles without a restart once it answers again.

use super::*;
use crate::runtime::fake::{Fault, Method};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Every new call hangs, as a hung engine's do (the live event stream stays
/// open and silent); `false` clears it.
fn hang(runtime: &FakeRuntime, hung: bool) {
    if !hung {
        runtime.clear_faults();
        return;
    }
    for method in [
        Method::Ping,
        Method::List,
        Method::Inspect,
        Method::Create,
        Method::Start,
        Method::Stop,
        Method::Remove,
        Method::Events,
    ] {
        runtime.fault(method, None, Fault::Hang);
    }
}

#[tokio::test(start_paused = true)]
async fn an_engine_that_stops_answering_is_down_within_the_timeout_then_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let reporter = Arc::new(MemoryReporter::default());
    let store = StateStore::open(dir.path()).unwrap();
    let mut config = config(dir.path());
    config.docker.timeout = TIMEOUT;
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let supervisor = Supervisor::from_parts(Parts {
        config,
        deployments: BTreeMap::from([(spec.id.clone(), spec)]),
        runtime: runtime.clone(),
        reporter: reporter.clone(),
        store: store.clone(),
        state: store.load().unwrap(),
        boot_id: BOOT.into(),
        registries: Vec::new(),
        notifier: crate::notify::Notifier::disabled(),
        invalid: BTreeMap::new(),
    });
    let token = CancellationToken::new();
    let task = tokio::spawn(supervisor.run(token.clone()));
    let latest = || reporter.latest(&Topic::Deployment("talker".into()));
    let wait = |what: &'static str, pred: fn(&Value) -> bool| async move {
        for _ in 0..100_000 {
            if latest().is_some_and(|d| pred(&d)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("no {what}; latest: {:?}", latest());
    };
    wait("Running", |d| d["status"] == "Running").await;
    // A while of a healthy engine: the pump's pings answer.
    tokio::time::sleep(TIMEOUT * 2).await;
    assert_eq!(latest().unwrap()["status"], "Running");

    hang(&runtime, true);
    let stalled = Instant::now();
    wait("Unknown", |d| {
        d["status"] == "Unknown" && exe(d)["error_code"] == "DEP_E301"
    })
    .await;
    let took = stalled.elapsed();
    // The last answer was a ping at most a third of the timeout before the
    // stall; the timeout counts from it.
    assert!(
        took > TIMEOUT * 2 / 3 && took <= TIMEOUT,
        "Unknown {took:?} after the stall, timeout {TIMEOUT:?}"
    );
    let agent = reporter.latest(&Topic::Agent).unwrap();
    assert_eq!(agent["docker"], "unreachable");

    hang(&runtime, false);
    wait("Running again", |d| d["status"] == "Running").await;
    let doc = latest().unwrap();
    assert_eq!(doc["restart_count"], 0);
    let starts = count(&runtime.calls(), |c| matches!(c, Call::Start(_)));
    assert_eq!(starts, 1, "reconciled, not restarted");

    token.cancel();
    task.await.unwrap();
}
