//! The shared ROS master (SPEC 6): one container, `berth.<device>.ros-master`,
//! while at least one `ros = true` deployment is deployed. It is supervised
//! like any executable, as the internal deployment `_ros`, under the policy
//! of the first deployment that brought it up; that policy and owner are
//! recorded in the state, so they survive berth restarts and reboots, and
//! they end when the last ROS deployment is gone.

use std::collections::BTreeMap;

use tracing::info;

use super::{Deployment, Supervisor};
use crate::model::{
    Command, ComponentSpec, DeploymentSpec, ExecutableSpec, Limits, PullPolicy, Status,
    ROS_MASTER_DEPLOYMENT,
};
use crate::report::{Reporter, Topic};
use crate::runtime::ContainerRuntime;
use crate::state::RosMasterRecord;

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    /// The deployments that use the master, in id order.
    fn ros_users(&self) -> Vec<String> {
        self.deployments
            .values()
            .filter(|d| d.spec.ros && !d.removing && d.spec.id != ROS_MASTER_DEPLOYMENT)
            .map(|d| d.spec.id.clone())
            .collect()
    }

    /// Brings the master up for the first ROS deployment, and down after the last.
    pub(super) fn converge_ros(&mut self) {
        let users = self.ros_users();
        let present = self.deployments.get(ROS_MASTER_DEPLOYMENT);
        match (users.first(), present) {
            (Some(first), None) => {
                let record = match self.state.ros_master.clone() {
                    Some(record) => record,
                    None => RosMasterRecord {
                        owner: first.clone(),
                        policy: self.deployments[first].spec.restart,
                    },
                };
                info!(owner = %record.owner, policy = %record.policy, "starting the shared ROS master");
                let spec = master_spec(
                    &self.config.ros,
                    record.policy,
                    &self.config.deployments_dir,
                );
                let dep = Deployment::new(
                    &self.config,
                    spec,
                    &BTreeMap::new(),
                    &mut self.state.executables,
                );
                self.deployments
                    .insert(ROS_MASTER_DEPLOYMENT.to_string(), dep);
                self.state.ros_master = Some(record);
                self.save_state();
                self.maybe_provision(ROS_MASTER_DEPLOYMENT);
            }
            (None, Some(master)) if !master.removing => {
                info!("no ROS deployment left; removing the shared ROS master");
                self.deprovision(ROS_MASTER_DEPLOYMENT);
            }
            _ => {}
        }
        // The users list is part of its document.
        self.mark_dirty(ROS_MASTER_DEPLOYMENT);
    }

    /// Called once the master's container is gone: the next ROS deployment
    /// is the first again.
    pub(super) fn ros_master_removed(&mut self) {
        self.state.ros_master = None;
        self.save_state();
        // A ROS deployment that came while the master was going brings up
        // a new one, under its own policy.
        self.converge_ros();
    }

    /// The `shared/ros-master` document.
    pub(super) fn publish_ros_master(&self, master: &Deployment) {
        let record = self.state.ros_master.as_ref();
        let exec = master.execs.first().or(master.retiring.first());
        let status = if master.phase == crate::model::Phase::DeploymentStopped {
            Status::Stopped
        } else {
            master.status()
        };
        let reason = match (master.phase, exec) {
            (crate::model::Phase::DeploymentStopped, _) => {
                Some("removed: no ROS deployment left".to_string())
            }
            (_, Some(e)) => e.shown.reason.clone(),
            _ => None,
        };
        let doc = crate::report::RosMasterDoc {
            device_id: self.config.device_id.clone(),
            policy: record.map(|r| r.policy).unwrap_or(master.spec.restart),
            owner: record.map(|r| r.owner.clone()),
            users: self.ros_users(),
            status,
            reason,
            error_code: exec.and_then(|e| e.shown.error_code),
            container_id: exec.and_then(|e| e.container_id().map(str::to_string)),
            restart_count: exec.map_or(0, |e| e.restart_count),
            updated_at: crate::report::timestamp(std::time::SystemTime::now()),
        };
        self.reporter.publish(
            Topic::RosMaster,
            serde_json::to_value(doc).expect("documents serialize"),
        );
    }
}

fn master_spec(
    ros: &crate::config::RosSettings,
    policy: crate::model::RestartPolicy,
    dir: &std::path::Path,
) -> DeploymentSpec {
    DeploymentSpec {
        id: ROS_MASTER_DEPLOYMENT.to_string(),
        package: "ros-master".to_string(),
        package_version: String::new(),
        restart: policy,
        depends_on: Vec::new(),
        ros: false,
        env: BTreeMap::new(),
        exports: BTreeMap::new(),
        components: vec![ComponentSpec {
            name: "ros".to_string(),
            executables: vec![ExecutableSpec {
                name: "master".to_string(),
                image: ros.master_image.clone(),
                pull: PullPolicy::IfNotPresent,
                command: Some(Command::Exec(ros.master_command.clone())),
                env: BTreeMap::new(),
                limits: Limits::default(),
                volumes: Vec::new(),
                devices: Vec::new(),
                network: Default::default(),
            }],
        }],
        update: Default::default(),
        source: dir.to_path_buf(),
    }
}
