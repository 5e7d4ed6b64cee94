//! The systemd unit, `systemd/berth.service`: `systemd-analyze verify`
//! accepts it without a warning, it has the settings berth relies on, its
//! hardening leaves berth what it needs (the docker socket, DNS, its state
//! dir, /proc/sys/kernel/random/boot_id), and the exit code it does not
//! restart on is the one berth uses for a broken config.
//!
//! Runs without systemd as PID 1: `verify` only loads the unit.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Berth, BerthConfig};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/berth.service");

/// `section -> key -> values`, a key given more than once keeping each value
/// (as systemd does for list settings such as `After=`).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line {}: continuation lines are not expected",
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            unit.entry(name.to_owned()).or_default();
            continue;
        }
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("line {}: a setting before any section", n + 1));
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", n + 1));
        unit.get_mut(section)
            .expect("section exists")
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    unit
}

fn read_unit() -> Unit {
    let text = std::fs::read_to_string(UNIT).unwrap_or_else(|e| panic!("read {UNIT}: {e}"));
    parse_unit(&text)
}

/// The single value of `section.key`; panics if it is missing or repeated.
fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    match unit
        .get(section)
        .and_then(|s| s.get(key))
        .map(Vec::as_slice)
    {
        Some([value]) => value,
        Some(values) => panic!(
            "[{section}] {key} is set {} times: {values:?}",
            values.len()
        ),
        None => panic!("[{section}] {key} is not set in {UNIT}"),
    }
}

/// Every word of every value of `section.key` (list settings).
fn words(unit: &Unit, section: &str, key: &str) -> Vec<String> {
    unit.get(section)
        .and_then(|s| s.get(key))
        .map(|values| {
            values
                .iter()
                .flat_map(|v| v.split_whitespace())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let version = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        version.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install the systemd package (scripts/setup.sh --tests does)"
    );
    // verify checks that ExecStart's binary exists: point it at the one
    // cargo built, in a copy of the unit under the same name.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(UNIT).unwrap();
    assert!(
        text.contains("ExecStart=/usr/bin/berth run"),
        "ExecStart changed; update this test"
    );
    let copy = dir.path().join("berth.service");
    std::fs::write(
        &copy,
        text.replace(
            "ExecStart=/usr/bin/berth ",
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_berth")),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings, with exit status 0:
    // any output at all is a finding.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        copy.display(),
        out.status
    );
}

#[test]
fn the_unit_has_the_settings_berth_relies_on() {
    let unit = read_unit();
    for (section, key, want) in [
        ("Service", "Type", "notify"),
        ("Service", "NotifyAccess", "main"),
        ("Service", "WatchdogSec", "30"),
        ("Service", "ExecStart", "/usr/bin/berth run"),
        ("Service", "ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Service", "Restart", "always"),
        ("Service", "TimeoutStopSec", "15"),
        ("Service", "StateDirectory", "berth"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "ProtectHome", "yes"),
        ("Service", "PrivateTmp", "yes"),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "ProtectKernelTunables", "yes"),
        ("Service", "ProtectKernelModules", "yes"),
        ("Install", "WantedBy", "multi-user.target"),
    ] {
        assert_eq!(one(&unit, section, key), want, "[{section}] {key}");
    }
    // SIGTERM reaches berth, which leaves the containers (children of the
    // engine) running; `control-group` would not matter for them but would
    // race berth's own shutdown.
    let kill_mode = one(&unit, "Service", "KillMode");
    assert!(
        matches!(kill_mode, "mixed" | "process"),
        "KillMode={kill_mode}"
    );
    for key in ["After", "Wants"] {
        let targets = words(&unit, "Unit", key);
        for want in ["docker.service", "network-online.target"] {
            assert!(
                targets.iter().any(|t| t == want),
                "[Unit] {key} lacks {want}: {targets:?}"
            );
        }
    }
    assert!(
        words(&unit, "Service", "ReadWritePaths")
            .iter()
            .any(|p| p == "/var/lib/berth"),
        "ReadWritePaths lacks /var/lib/berth"
    );
}

/// Settings that would cut berth off from what it needs.
#[test]
fn the_hardening_leaves_berth_what_it_needs() {
    let unit = read_unit();
    let families = words(&unit, "Service", "RestrictAddressFamilies");
    assert_eq!(
        families,
        ["AF_UNIX", "AF_INET", "AF_INET6"],
        "the docker socket needs AF_UNIX, the broker and DNS AF_INET/AF_INET6"
    );
    let service = &unit["Service"];
    let set = |key: &str| service.get(key).map(|v| v.join(" ")).unwrap_or_default();
    // A private network or user namespace loses the broker or the socket's
    // owner; ProcSubset=pid hides /proc/sys/kernel/random/boot_id.
    for (key, bad) in [
        ("PrivateNetwork", "yes"),
        ("PrivateUsers", "yes"),
        ("ProcSubset", "pid"),
        ("IPAddressDeny", "any"),
    ] {
        assert_ne!(set(key), bad, "{key}={bad} would break berth");
    }
    for key in ["InaccessiblePaths", "TemporaryFileSystem"] {
        for path in set(key).split_whitespace() {
            let path = path.trim_start_matches(['-', '+']);
            for needed in [
                "/run",
                "/var/run",
                "/var/run/docker.sock",
                "/etc/berth",
                "/var/lib/berth",
                "/proc",
            ] {
                assert!(
                    !Path::new(needed).starts_with(path),
                    "{key}={path} hides {needed}, which berth needs"
                );
            }
        }
    }
    // The file system stays readable, and the state dir writable.
    assert!(
        !service.contains_key("DynamicUser"),
        "DynamicUser would lose the docker socket's owner"
    );
    let user = set("User");
    assert!(
        user.is_empty() || user == "root",
        "User={user}: the docker socket is root:docker"
    );
}

/// A broken config at start-up exits with the code the unit does not
/// restart on, so systemd does not loop on it.
#[test]
fn a_broken_config_exits_with_the_code_the_unit_does_not_restart_on() {
    let unit = read_unit();
    let codes = words(&unit, "Service", "RestartPreventExitStatus");
    let mut berth = Berth::new(BerthConfig::new("unit-exit-code", 1));
    berth.write_raw_config("device_id = \"unit-exit-code\"\nno_such_key = 1\n");
    berth.start();
    let status = berth.wait_exit(Duration::from_secs(10));
    let code = status.code().expect("berth exited, not killed").to_string();
    assert!(
        codes.contains(&code),
        "berth exits {code} on a broken config; RestartPreventExitStatus={codes:?}"
    );
}
