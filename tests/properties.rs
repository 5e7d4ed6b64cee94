//! Property tests (proptest) of what berth derives from its inputs: every id
//! the config validators accept yields a valid container name, network name,
//! single MQTT topic level and label value; the back-off is monotonic and
//! capped; a deployment's status is that of its worst executable. Pure: no
//! engine, no broker.

use std::path::Path;
use std::time::Duration;

use berth::backoff::{delay_for, Backoff};
use berth::config::{parse_agent, parse_deployment, RestartSettings};
use berth::model::{
    container_labels, container_name, key_from_labels, network_name, ExecKey, Status,
};
use berth::report::Topic;
use proptest::prelude::*;

/// A TOML string literal holding `s` exactly.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Whether the agent config validator accepts `id` as `device_id`.
fn device_id_accepted(id: &str) -> bool {
    let text = format!("device_id = {}\n", toml_string(id));
    parse_agent(Path::new("/etc/berth/berth.toml"), &text).is_ok()
}

/// Whether the deployment validator accepts these as the deployment id, a
/// component name and an executable name.
fn names_accepted(deployment: &str, component: &str, executable: &str) -> bool {
    let text = format!(
        "id = {}\npackage = \"p\"\npackage_version = \"1\"\n\
         [[components]]\nname = {}\n\
         [[components.executables]]\nname = {}\nimage = \"busybox\"\n",
        toml_string(deployment),
        toml_string(component),
        toml_string(executable),
    );
    parse_deployment(Path::new("/etc/berth/deployments.d/x.toml"), &text).is_ok()
}

/// Docker's rule for container (and network) names.
fn is_docker_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// One MQTT topic level: not empty, no separator, no wildcard, no NUL.
fn is_topic_level(level: &str) -> bool {
    !level.is_empty() && !level.contains(['/', '+', '#', '\0'])
}

/// Ids in and around what the validators accept: the accepted alphabets
/// plus the characters that would break a name, a topic or a label.
fn near_id(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::string::string_regex(&format!("[A-Za-z0-9_-]{{1,{max}}}")).unwrap(),
        4 => proptest::string::string_regex(&format!("[a-z0-9][a-z0-9_-]{{0,{}}}", max - 1)).unwrap(),
        1 => proptest::string::string_regex(&format!("[a-z0-9_./+#\\x00 é-]{{0,{}}}", max + 2)).unwrap(),
    ]
}

/// Mostly ids of the given rule, some near misses.
fn mostly(rule: &str) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::string::string_regex(rule).unwrap(),
        1 => near_id(64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn device_ids_the_validator_accepts_name_topics_and_containers(id in near_id(66)) {
        let accepted = device_id_accepted(&id);
        let by_rule = (1..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        prop_assert_eq!(accepted, by_rule, "validator and SPEC 3 disagree on {:?}", id);
        if accepted {
            let key = ExecKey::new("talker", "comp", "exe");
            prop_assert!(is_docker_name(&container_name(&id, &key)));
            prop_assert!(is_docker_name(&network_name(&id, &key)));
            let topic = Topic::Agent.path("berth", &id);
            let levels: Vec<&str> = topic.split('/').collect();
            prop_assert_eq!(levels.len(), 3, "{}", topic);
            prop_assert_eq!(levels[1], id.as_str());
            prop_assert!(is_topic_level(levels[1]));
            let labels = container_labels(&id, &key, "0123456789abcdef");
            prop_assert_eq!(labels.get("berth.device").map(String::as_str), Some(id.as_str()));
        }
    }

    #[test]
    fn names_the_validator_accepts_name_topics_containers_and_labels(
        deployment in mostly("[a-z0-9][a-z0-9-]{0,62}"),
        component in mostly("[a-z0-9][a-z0-9_-]{0,62}"),
        executable in mostly("[a-z0-9][a-z0-9_-]{0,62}"),
    ) {
        if names_accepted(&deployment, &component, &executable) {
            let key = ExecKey::new(&deployment, &component, &executable);
            let name = container_name("robot-42", &key);
            prop_assert!(is_docker_name(&name), "{}", name);
            // The name splits back into its parts: no part holds a dot.
            let parts: Vec<&str> = name.split('.').collect();
            prop_assert_eq!(parts, vec!["berth", "robot-42", &deployment, &component, &executable]);
            prop_assert!(is_docker_name(&network_name("robot-42", &key)));
            // The executable's name is its alias on an isolated network: a
            // DNS label.
            prop_assert!(executable.len() <= 63 && !executable.starts_with('-'));

            let topic = Topic::Deployment(deployment.clone()).path("berth", "robot-42");
            let levels: Vec<&str> = topic.split('/').collect();
            prop_assert_eq!(levels.len(), 4, "{}", topic);
            prop_assert!(levels.iter().all(|l| is_topic_level(l)), "{}", topic);
            prop_assert_eq!(levels[3], deployment.as_str());

            let labels = container_labels("robot-42", &key, "0123456789abcdef");
            for value in labels.values() {
                prop_assert!(!value.is_empty() && !value.chars().any(char::is_control));
            }
            prop_assert_eq!(key_from_labels(&labels), Some(key));
        }
    }

    #[test]
    fn deployment_ids_are_exactly_spec_4s(id in near_id(65)) {
        let by_rule = {
            let mut chars = id.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && id.len() <= 63
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        prop_assert_eq!(names_accepted(&id, "c", "e"), by_rule, "{:?}", id);
    }

    #[test]
    fn backoff_is_monotonic_and_capped(
        initial_ms in 1u64..=600_000,
        max_secs in 1u64..=86_400,
        consecutive in 0u32..=200,
    ) {
        let settings = RestartSettings {
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max: Duration::from_secs(max_secs).max(Duration::from_millis(initial_ms)),
            backoff_reset_after: Duration::from_secs(60),
        };
        let this = delay_for(&settings, consecutive);
        let next = delay_for(&settings, consecutive.saturating_add(1));
        prop_assert!(this <= next, "{:?} then {:?}", this, next);
        prop_assert!(next <= settings.backoff_max);
        if consecutive == 0 {
            prop_assert_eq!(this, Duration::ZERO);
        } else {
            prop_assert!(this >= settings.backoff_initial);
        }
        // The counter itself walks the same sequence, and a long run resets it.
        let mut backoff = Backoff { consecutive };
        prop_assert_eq!(backoff.next_delay(&settings, Some(Duration::from_millis(1))), this);
        prop_assert_eq!(backoff.consecutive, consecutive.saturating_add(1));
        prop_assert_eq!(
            backoff.next_delay(&settings, Some(settings.backoff_reset_after)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_deployment_has_the_status_of_its_worst_executable(
        statuses in proptest::collection::vec(
            prop_oneof![
                Just(Status::Error),
                Just(Status::Pending),
                Just(Status::Unknown),
                Just(Status::Stopped),
                Just(Status::Running),
                Just(Status::Completed),
            ],
            0..40,
        )
    ) {
        // SPEC 5's order, written out independently of the enum.
        const ORDER: [&str; 6] = ["Error", "Pending", "Unknown", "Stopped", "Running", "Completed"];
        let names: Vec<String> = statuses
            .iter()
            .map(|s| serde_json::to_value(s).unwrap().as_str().unwrap().to_string())
            .collect();
        let expected = ORDER.iter().find(|o| names.iter().any(|n| n == *o));
        let got = Status::worst(statuses.iter().copied())
            .map(|s| serde_json::to_value(s).unwrap().as_str().unwrap().to_string());
        prop_assert_eq!(got.as_deref(), expected.copied());
        // Whatever the order the executables come in.
        let mut reversed = statuses.clone();
        reversed.reverse();
        prop_assert_eq!(Status::worst(reversed), Status::worst(statuses));
    }
}
