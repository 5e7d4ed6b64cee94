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
    Command, ComponentSpec, DeploymentSpec, ExecutableSpec, Limits, PullPolicy, RestartPolicy,
    Status, ROS_MASTER_DEPLOYMENT,
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
        let users: Vec<(String, RestartPolicy)> = self
            .ros_users()
            .into_iter()
            .map(|id| {
                let policy = self.deployments[&id].spec.restart;
                (id, policy)
            })
            .collect();
        let master = self
            .deployments
            .get(ROS_MASTER_DEPLOYMENT)
            .map(|m| m.removing);
        match master_plan(&users, master, self.state.ros_master.as_ref()) {
            MasterPlan::Start(record) => {
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
            MasterPlan::Remove => {
                info!("no ROS deployment left; removing the shared ROS master");
                self.deprovision(ROS_MASTER_DEPLOYMENT);
            }
            MasterPlan::Keep => {}
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

/// What the shared master needs.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum MasterPlan {
    /// Bring it up under this owner and policy.
    Start(RosMasterRecord),
    /// No ROS deployment is left: remove it.
    Remove,
    /// Leave it as it is: up for its users, already going, or not needed.
    Keep,
}

/// The master's rule (SPEC 6), pure: it runs while at least one ROS
/// deployment is deployed, under the policy of the first one that brought it
/// up; that owner, once recorded, holds until the master is removed. A
/// master being removed is left to go: when it is gone, the next ROS
/// deployment brings up a new one and is its first user again.
///
/// `users`: the ROS deployments and their policies, in id order; `master`:
/// `None` when there is none, else whether it is being removed; `recorded`:
/// the owner berth recorded.
pub(super) fn master_plan(
    users: &[(String, RestartPolicy)],
    master: Option<bool>,
    recorded: Option<&RosMasterRecord>,
) -> MasterPlan {
    match (users.first(), master) {
        (Some((first, policy)), None) => {
            MasterPlan::Start(recorded.cloned().unwrap_or_else(|| RosMasterRecord {
                owner: first.clone(),
                policy: *policy,
            }))
        }
        (None, Some(false)) => MasterPlan::Remove,
        _ => MasterPlan::Keep,
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
                probe: None,
            }],
        }],
        update: Default::default(),
        source: dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RestartPolicy::*;

    fn users(list: &[(&str, RestartPolicy)]) -> Vec<(String, RestartPolicy)> {
        list.iter().map(|(id, p)| (id.to_string(), *p)).collect()
    }

    fn record(owner: &str, policy: RestartPolicy) -> RosMasterRecord {
        RosMasterRecord {
            owner: owner.into(),
            policy,
        }
    }

    #[test]
    fn the_first_ros_deployment_brings_it_up_under_its_policy() {
        assert_eq!(
            master_plan(&users(&[("a", Never), ("b", Always)]), None, None),
            MasterPlan::Start(record("a", Never))
        );
    }

    #[test]
    fn a_recorded_owner_holds_over_later_deployments() {
        let recorded = record("gone", OnFailure);
        assert_eq!(
            master_plan(&users(&[("b", Always)]), None, Some(&recorded)),
            MasterPlan::Start(recorded.clone())
        );
    }

    #[test]
    fn it_stays_while_a_ros_deployment_is_deployed() {
        assert_eq!(
            master_plan(&users(&[("a", Always)]), Some(false), None),
            MasterPlan::Keep
        );
    }

    #[test]
    fn the_last_ros_deployment_gone_removes_it() {
        assert_eq!(master_plan(&[], Some(false), None), MasterPlan::Remove);
        assert_eq!(master_plan(&[], None, None), MasterPlan::Keep);
    }

    #[test]
    fn a_ros_deployment_added_while_it_goes_waits_for_a_new_one() {
        // The master being removed is left to go; once it is gone (no master,
        // no record) the newcomer brings up a new one as its first user.
        assert_eq!(
            master_plan(&users(&[("late", OnFailure)]), Some(true), None),
            MasterPlan::Keep
        );
        assert_eq!(
            master_plan(&users(&[("late", OnFailure)]), None, None),
            MasterPlan::Start(record("late", OnFailure))
        );
    }
}
