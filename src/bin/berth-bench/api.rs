//! The floor: the engine's API called straight, with nothing around it. The
//! calls go through berth's own Docker adapter (`berth::runtime::docker`,
//! the same HTTP client berth uses) on a runtime of their own, with no
//! bookkeeping: a start timed from the call, and containers created and
//! started a few at a time.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use berth::runtime::docker::DockerRuntime;
use berth::runtime::{ContainerRuntime, ContainerSpec};

use crate::engine::IMAGE;
use crate::sys::unix_nanos;

pub struct Api {
    docker: Arc<DockerRuntime>,
    runtime: tokio::runtime::Runtime,
}

impl Api {
    /// `host` as berth's `[docker] host` says it (`unix:///…`).
    pub fn new(host: &str) -> Result<Api> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start an async runtime for the engine's API")?;
        Ok(Api {
            docker: Arc::new(DockerRuntime::new(host)),
            runtime,
        })
    }

    /// Starts the stopped container `id`; returns the wall time (ns since the
    /// epoch) taken right before the call.
    pub fn start_timed(&self, id: &str) -> Result<i64> {
        let docker = Arc::clone(&self.docker);
        self.runtime.block_on(async move {
            let at = unix_nanos(SystemTime::now());
            docker
                .start(id)
                .await
                .with_context(|| format!("cannot start container {id}"))?;
            Ok(at)
        })
    }

    /// Creates and starts one container per name (`sh -c script` from the
    /// test image, on the host network, labelled `label`), `parallel` at a
    /// time; returns how long it took, from the first call to the last answer.
    pub fn create_and_start(
        &self,
        names: &[String],
        label: (&str, &str),
        script: &str,
        parallel: usize,
    ) -> Result<Duration> {
        let specs: Vec<ContainerSpec> = names
            .iter()
            .map(|name| ContainerSpec {
                name: name.clone(),
                image: IMAGE.to_owned(),
                cmd: Some(vec!["sh".into(), "-c".into(), script.to_owned()]),
                labels: [(label.0.to_owned(), label.1.to_owned())].into(),
                network_mode: "host".into(),
                ..ContainerSpec::default()
            })
            .collect();
        let docker = Arc::clone(&self.docker);
        self.runtime.block_on(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
            let began = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for spec in specs {
                let (docker, slots) = (Arc::clone(&docker), Arc::clone(&slots));
                tasks.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let id = docker
                        .create(&spec)
                        .await
                        .with_context(|| format!("cannot create {}", spec.name))?;
                    docker
                        .start(&id)
                        .await
                        .with_context(|| format!("cannot start {}", spec.name))
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.context("a create/start task failed")??;
            }
            Ok(began.elapsed())
        })
    }
}
