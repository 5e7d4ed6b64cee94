//! `network = "isolated"` on a component: its executables get a bridge
//! network of their own and reach each other by executable name; the network
//! goes with the deployment.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// Removes the device's networks, also when the test fails.
struct NetworkGuard(String);

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let filter = format!("label=berth.device={}", self.0);
        if let Ok(ids) = try_docker(&["network", "ls", "-q", "--filter", &filter]) {
            for id in ids.split_whitespace() {
                let _ = try_docker(&["network", "rm", id]);
            }
        }
    }
}

#[test]
fn an_isolated_component_talks_by_name_on_its_own_network() {
    let device = unique_id("isolated");
    let _guard = EngineGuard::new(&device);
    let _networks = NetworkGuard(device.clone());
    let broker = Broker::new();
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));
    let sub = Subscriber::new(broker.port(), &format!("berth/{device}/#"));
    berth.write_deployment(
        "iso",
        &format!(
            r#"id = "iso"
package = "pkg"
package_version = "1"
restart = "on-failure"

[[components]]
name = "pair"
network = "isolated"

[[components.executables]]
name = "server"
image = "{TEST_IMAGE}"
command = ["sh", "-c", "trap 'exit 0' TERM; while true; do echo pong-iso | nc -l -p 7000 > /dev/null; sleep 0.1; done"]

[[components.executables]]
name = "client"
image = "{TEST_IMAGE}"
command = ["sh", "-c", "until echo ping | nc server 7000 | grep pong-iso > /dev/null; do sleep 0.2; done"]
"#
        ),
    );
    berth.start();
    let topic = berth.topic("deployments/iso");
    sub.wait_for(
        &topic,
        |d| {
            d["executables"][1]["status"] == "Completed"
                && d["executables"][0]["status"] == "Running"
        },
        WAIT,
    );
    let network = format!("berth.{device}.iso.pair");
    let server = containers(&device)
        .into_iter()
        .find(|c| c["Config"]["Labels"]["berth.executable"] == "server")
        .unwrap();
    assert_eq!(server["HostConfig"]["NetworkMode"], network.as_str());
    let aliases = &server["NetworkSettings"]["Networks"][&network]["Aliases"];
    assert!(
        aliases.as_array().unwrap().iter().any(|a| a == "server"),
        "{aliases}"
    );
    // They talked by name: the client completed, and it completes only
    // once it has read the server's own answer from `server:7000`. (Whether
    // the server read the client's `ping` is not asserted: busybox's
    // `nc -l` may close the connection once its answer is sent.)
    let labels = docker(&[
        "network",
        "inspect",
        "--format",
        "{{json .Labels}}",
        &network,
    ]);
    assert!(labels.contains(&device), "{labels}");

    berth.remove_deployment("iso");
    sub.wait_for(&topic, |d| d["phase"] == "DeploymentStopped", WAIT);
    assert!(
        wait_until(WAIT, || try_docker(&["network", "inspect", &network])
            .is_err()),
        "the network goes with the deployment"
    );
    berth.sigterm();
}
