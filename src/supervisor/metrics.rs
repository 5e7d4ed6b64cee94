//! The `metrics` topic (SPEC 9): every `[metrics] interval_secs` the loop
//! accounts each executable's availability, and a tracked task reads the
//! engine (one `stats` call per running container and one data-root reading)
//! off the loop; its answer comes back as a message and becomes the
//! retained document.

use super::*;
use crate::report::{DataRootDoc, ExecMetricsDoc, MetricsDoc};
use crate::runtime::{ContainerStats, DiskUsage};

/// What the loop keeps between two documents.
#[derive(Debug, Default)]
pub(super) struct Metrics {
    meter: crate::runtime::CpuMeter,
    /// A reading is under way: the next tick does not start another.
    collecting: bool,
    /// When availability was last accounted, on the monotonic clock: a
    /// robot's wall clock jumps when it first syncs, and an elapsed time
    /// taken from it would credit (or lose) the jump.
    accounted: Option<Instant>,
    /// A collection of images is under way.
    collecting_images: bool,
}

/// One reading of the engine.
#[derive(Debug)]
pub(super) struct Reading {
    pub(super) stats: Vec<(ExecKey, String, Option<ContainerStats>)>,
    pub(super) disk: Option<DiskUsage>,
    pub(super) at: Instant,
}

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    /// The metrics interval is over: account availability and read the engine.
    pub(super) fn collect_metrics(&mut self) {
        let now = Instant::now();
        let elapsed = self
            .metrics
            .accounted
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        self.metrics.accounted = Some(now);
        // The hour an elapsed time is booked in is the wall clock's.
        let now_secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut running = Vec::new();
        for dep in self.deployments.values_mut().filter(|d| !d.removing) {
            for exec in &mut dep.execs {
                let up = exec.shown.status == Status::Running;
                if !elapsed.is_zero() {
                    exec.availability
                        .add(now_secs, elapsed.as_millis() as u64, up);
                    self.state_dirty = true;
                }
                if let (true, Some(id)) = (up, exec.container_id()) {
                    running.push((exec.key.clone(), id.to_string()));
                }
            }
        }
        if self.metrics.collecting || !self.engine_up {
            return;
        }
        self.metrics.collecting = true;
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        self.tracker.spawn(async move {
            let mut stats = Vec::with_capacity(running.len());
            for (key, id) in running {
                let read = runtime.stats(&id).await.ok();
                stats.push((key, id, read));
                // A reading from the cgroup files is ready at once, without
                // a pause: the loop and the launches run between two.
                tokio::task::yield_now().await;
            }
            let disk = runtime.data_root_usage().await.ok();
            let _ = tx.send(Msg::Metrics(Reading {
                stats,
                disk,
                at: Instant::now(),
            }));
        });
    }

    /// Images pulled by an update, or removed by a collection.
    pub(super) fn on_collected(&mut self, pulled: Vec<String>, removed: Vec<String>) {
        if pulled.is_empty() {
            // The collection the data root's use started is over.
            self.metrics.collecting_images = false;
        }
        for image in pulled {
            self.state.pulled_images.insert(image);
            self.state_dirty = true;
        }
        for image in removed {
            self.state.pulled_images.remove(&image);
            self.state_dirty = true;
        }
    }

    /// The data root is fuller than `gc_high_percent`: unused images berth
    /// pulled go, down to `gc_low_percent`, in a tracked task.
    fn maybe_collect_images(&mut self, disk: &DiskUsage) {
        use crate::runtime::housekeeping::collection_due;
        if self.metrics.collecting_images
            || collection_due(disk, &self.config.images, false).is_none()
        {
            return;
        }
        self.metrics.collecting_images = true;
        let hk = self.housekeeping();
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        self.tracker.spawn(async move {
            let mut removed = Vec::new();
            if let Err(e) = launch::collect_images(&*runtime, &hk, false, &mut removed).await {
                debug!(error = %e, "image collection interrupted");
            }
            let _ = tx.send(Msg::Collected {
                pulled: Vec::new(),
                removed,
            });
        });
    }

    /// The engine's figures are read: the document goes out.
    pub(super) fn on_metrics(&mut self, reading: Reading) {
        self.metrics.collecting = false;
        if let Some(disk) = &reading.disk {
            self.maybe_collect_images(disk);
        }
        let mut by_key: HashMap<ExecKey, (String, ContainerStats)> = HashMap::new();
        for (key, id, stats) in reading.stats {
            if let Some(stats) = stats {
                by_key.insert(key, (id, stats));
            }
        }
        let ids: Vec<&str> = by_key.values().map(|(id, _)| id.as_str()).collect();
        self.metrics.meter.retain(&ids);
        let now_nanos = unix_nanos(SystemTime::now());
        let mut executables = Vec::new();
        for dep in self.deployments.values().filter(|d| !d.removing) {
            for exec in &dep.execs {
                let stats = by_key.get(&exec.key);
                let cpu_percent = stats.and_then(|(id, s)| {
                    self.metrics.meter.sample(id, s.cpu_usage_nanos, reading.at)
                });
                let running = exec.shown.status == Status::Running;
                let uptime_secs = exec
                    .container
                    .as_ref()
                    .filter(|c| running && c.started_nanos > 0)
                    .map(|c| ((now_nanos - c.started_nanos).max(0) / 1_000_000_000) as u64);
                executables.push(ExecMetricsDoc {
                    deployment: exec.key.deployment.clone(),
                    component: exec.key.component.clone(),
                    executable: exec.key.executable.clone(),
                    status: exec.shown.status,
                    cpu_percent: cpu_percent.map(|p| (p * 10.0).round() / 10.0),
                    memory_bytes: stats.map(|(_, s)| s.memory_bytes),
                    memory_limit_bytes: stats.and_then(|(_, s)| s.memory_limit_bytes),
                    restart_count: exec.restart_count,
                    uptime_secs,
                    availability: exec
                        .availability
                        .share()
                        .map(|a| (a * 1000.0).round() / 1000.0),
                    health: exec.health_shown(),
                });
            }
        }
        let doc = MetricsDoc {
            device_id: self.config.device_id.clone(),
            time: timestamp(SystemTime::now()),
            interval_secs: self
                .config
                .metrics
                .interval
                .map(|i| i.as_secs())
                .unwrap_or(0),
            data_root: reading.disk.map(|d| DataRootDoc {
                path: d.data_root.display().to_string(),
                size_bytes: d.total_bytes,
                free_bytes: d.free_bytes,
            }),
            executables,
        };
        self.reporter.publish(
            Topic::Metrics,
            serde_json::to_value(doc).expect("documents serialize"),
        );
    }
}

/// Ticks every metrics interval; never without one.
pub(super) async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
