//! Timing in paused time (`start_paused`): back-off delays asserted to the
//! millisecond in both directions, the limit on engine calls in flight, and
//! the crash-loop lane that keeps a healthy executable from waiting behind a
//! storm. Virtual time only moves when every task waits, so these take no
//! real time and hold on a loaded machine.

use super::*;
use crate::runtime::fake::{Fault, Method};

/// Polls every virtual millisecond until `done`, and says when it held: the
/// resolution of every figure below is that millisecond.
async fn when(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn spec_named(id: &str, restart: RestartPolicy) -> DeploymentSpec {
    let mut spec = deployment(restart, PullPolicy::IfNotPresent, "talker");
    spec.id = id.into();
    spec
}

fn name_of(id: &str) -> String {
    format!("berth.{DEVICE}.{id}.talker.talker")
}

fn starts_of(runtime: &FakeRuntime, name: &str) -> usize {
    runtime.start_times(name).len()
}

#[tokio::test(start_paused = true)]
async fn back_off_delays_are_exact_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.restart = RestartSettings {
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(4),
        backoff_reset_after: Duration::from_secs(3600),
    };
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start_with(fake(), dir.path(), vec![spec], BOOT, config);
    when("the first start", Duration::from_secs(10), || {
        h.starts() == 1
    })
    .await;
    // The first restart after a good run is immediate; then 1 s, doubling,
    // capped at 4 s.
    for (n, want_ms) in [0u64, 1000, 2000, 4000, 4000].into_iter().enumerate() {
        let before = h.starts();
        let exited = Instant::now();
        let real = std::time::Instant::now();
        h.runtime.exit(NAME, 1);
        let started = when(
            &format!("restart {}", n + 1),
            Duration::from_secs(10),
            || h.starts() > before,
        )
        .await;
        // Never early; late by no more than the 1 ms the observation
        // polls at (the durable record of the restart is written first).
        // berth times a back-off from the exit's engine time, on the wall
        // clock, which moves in real time while this test's clock is
        // paused: the real milliseconds that passed (a loaded machine) may
        // count as waited already.
        let waited = (started - exited).as_millis() as u64;
        let real_ms = real.elapsed().as_millis() as u64;
        assert!(
            waited + real_ms >= want_ms && waited <= want_ms + 1,
            "restart {}: waited {waited} ms ({real_ms} ms of real time), want {want_ms} ms",
            n + 1
        );
    }
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn at_most_four_heavy_engine_calls_are_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    // Every create takes a second of engine time.
    runtime.fault(Method::Create, None, Fault::Delay(Duration::from_secs(1)));
    let specs: Vec<DeploymentSpec> = (0..10)
        .map(|i| spec_named(&format!("d{i}"), RestartPolicy::Always))
        .collect();
    let h = Harness::start_with(runtime, dir.path(), specs, BOOT, config(dir.path()));
    let creates = || count(&h.runtime.calls(), |c| matches!(c, Call::Create(_)));
    when("the first creates", Duration::from_secs(10), || {
        creates() > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(creates(), 4, "four creates in the first second");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(creates(), 8, "four more once the first four answered");
    when("every start", Duration::from_secs(10), || h.starts() == 10).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_healthy_executable_never_waits_behind_fifty_crash_loops() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.restart = RestartSettings {
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(100),
        backoff_reset_after: Duration::from_secs(3600),
    };
    let runtime = fake();
    let mut specs: Vec<DeploymentSpec> = (0..50)
        .map(|i| spec_named(&format!("loop{i}"), RestartPolicy::Always))
        .collect();
    specs.push(spec_named("healthy", RestartPolicy::Always));
    let h = Harness::start_with(runtime, dir.path(), specs, BOOT, config);
    when("every first start", Duration::from_secs(30), || {
        h.starts() == 51
    })
    .await;
    // Put the fifty in a crash loop: two quick exits each, and from then on
    // every start of theirs takes the engine two seconds.
    for round in 0..2 {
        for i in 0..50 {
            let name = name_of(&format!("loop{i}"));
            let before = starts_of(&h.runtime, &name);
            h.runtime.exit(&name, 1);
            when(
                &format!("loop{i} round {round}"),
                Duration::from_secs(30),
                || starts_of(&h.runtime, &name) > before,
            )
            .await;
        }
    }
    for i in 0..50 {
        h.runtime.fault(
            Method::Start,
            Some(&name_of(&format!("loop{i}"))),
            Fault::Delay(Duration::from_secs(2)),
        );
        h.runtime.exit(&name_of(&format!("loop{i}")), 1);
    }
    // The storm is under way: the lane holds two of them at a time.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let healthy = name_of("healthy");
    let before = starts_of(&h.runtime, &healthy);
    let exited = Instant::now();
    h.runtime.exit(&healthy, 1);
    let started = when("the healthy restart", Duration::from_secs(120), || {
        starts_of(&h.runtime, &healthy) > before
    })
    .await;
    assert!(
        (started - exited).as_millis() <= 1,
        "a first restart is immediate, whatever the storm: it took {:?}",
        started - exited
    );
    h.shutdown_within(Duration::from_secs(10)).await;
}
