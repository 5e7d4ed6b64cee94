//! An engine that stops answering, in paused time: the event pump's timeout
//! turns it into `EngineDown` (every executable `Unknown` + `DEP_E301`)
//! within `[docker] timeout_secs` of its last answer, and the reconnection
//! reconciles without a restart once it answers again.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::runtime::{EventStream, RegistryAuth};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The fake engine, with a switch that makes every new call hang (the live
/// event stream stays open and silent, as a hung engine's does).
struct Stalling {
    inner: FakeRuntime,
    hung: AtomicBool,
}

impl Stalling {
    async fn gate(&self) {
        if self.hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

impl ContainerRuntime for Stalling {
    async fn ping(&self) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.ping().await
    }
    async fn image_present(&self, image: &str) -> crate::runtime::Result<bool> {
        self.gate().await;
        self.inner.image_present(image).await
    }
    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.pull(image, auth).await
    }
    async fn list(&self, device_id: &str) -> crate::runtime::Result<Vec<ContainerInfo>> {
        self.gate().await;
        self.inner.list(device_id).await
    }
    async fn inspect(&self, id: &str) -> crate::runtime::Result<ContainerInfo> {
        self.gate().await;
        self.inner.inspect(id).await
    }
    async fn create(&self, spec: &ContainerSpec) -> crate::runtime::Result<String> {
        self.gate().await;
        self.inner.create(spec).await
    }
    async fn start(&self, id: &str) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.start(id).await
    }
    async fn stop(&self, id: &str, grace_secs: i64) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.stop(id, grace_secs).await
    }
    async fn remove(&self, id: &str) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.remove(id).await
    }
    async fn rename(&self, id: &str, name: &str) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.rename(id, name).await
    }
    async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.ensure_network(name, labels).await
    }
    async fn remove_network(&self, name: &str) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.remove_network(name).await
    }
    async fn pull_with_progress(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &mut (dyn FnMut(crate::runtime::PullProgress) + Send),
    ) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.pull_with_progress(image, auth, progress).await
    }
    async fn log_tail(&self, id: &str) -> crate::runtime::Result<Vec<String>> {
        self.gate().await;
        self.inner.log_tail(id).await
    }
    async fn stats(&self, id: &str) -> crate::runtime::Result<crate::runtime::ContainerStats> {
        self.gate().await;
        self.inner.stats(id).await
    }
    async fn list_images(&self) -> crate::runtime::Result<Vec<crate::runtime::ImageInfo>> {
        self.gate().await;
        self.inner.list_images().await
    }
    async fn remove_image(&self, reference: &str) -> crate::runtime::Result<()> {
        self.gate().await;
        self.inner.remove_image(reference).await
    }
    async fn data_root_usage(&self) -> crate::runtime::Result<crate::runtime::DiskUsage> {
        self.gate().await;
        self.inner.data_root_usage().await
    }
    fn events(&self, device_id: &str, since: Option<i64>, until: Option<i64>) -> EventStream {
        if self.hung.load(Ordering::SeqCst) {
            return Box::pin(futures_util::stream::pending());
        }
        self.inner.events(device_id, since, until)
    }
}

#[tokio::test(start_paused = true)]
async fn an_engine_that_stops_answering_is_down_within_the_timeout_then_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(Stalling {
        inner: FakeRuntime::new().with_registry_image(IMAGE),
        hung: AtomicBool::new(false),
    });
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

    runtime.hung.store(true, Ordering::SeqCst);
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

    runtime.hung.store(false, Ordering::SeqCst);
    wait("Running again", |d| d["status"] == "Running").await;
    let doc = latest().unwrap();
    assert_eq!(doc["restart_count"], 0);
    let starts = count(&runtime.inner.calls(), |c| matches!(c, Call::Start(_)));
    assert_eq!(starts, 1, "reconciled, not restarted");

    token.cancel();
    task.await.unwrap();
}
