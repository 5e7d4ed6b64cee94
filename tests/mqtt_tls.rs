//! berth against a locked-down broker: Mosquitto with a TLS listener that
//! requires a client certificate, a password file and no anonymous access,
//! as a fleet's broker would be. The CA, the broker's certificate (for
//! 127.0.0.1 and localhost) and the client certificate are made with the
//! `openssl` CLI for each test.
//!
//! With the right files berth publishes its retained agent document. With a
//! wrong CA or a wrong password it keeps running, says what is wrong, and
//! retries with growing gaps. In no case do the password or the private key
//! show up in its log.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::Value;
use tempfile::TempDir;

const BERTH_USER: &str = "robot";
const BERTH_PASSWORD: &str = "pw-Berth-7f3a9c-secret";
const OBSERVER_USER: &str = "observer";
const OBSERVER_PASSWORD: &str = "pw-observer-51d2e0";
const SETUP_HINT: &str = "run scripts/setup.sh --tests";

// --- certificates -------------------------------------------------------------

/// A CA, a broker certificate and a client certificate signed by it, and a
/// second CA that signed neither: PEM files in a temp dir.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("temp dir for certificates"),
        };
        pki.self_signed_ca("ca", "berth-test-ca");
        pki.signed(
            "server",
            "localhost",
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n",
            2,
        );
        pki.signed("client", "berth-client", "extendedKeyUsage=clientAuth\n", 3);
        pki.self_signed_ca("other-ca", "not-the-broker-ca");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The private key files' contents, for checking that no log shows them.
    fn key_contents(&self) -> Vec<String> {
        ["client.key", "server.key", "ca.key"]
            .iter()
            .map(|name| fs::read_to_string(self.path(name)).expect("read key"))
            .collect()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl ({e}): {SETUP_HINT}"));
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `<name>.key` (P-256, PKCS#8) and `<name>.csr`.
    fn key_and_request(&self, name: &str, cn: &str) {
        let key = format!("{name}.key");
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &key,
        ]);
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &format!("{name}.csr"),
        ]);
    }

    fn self_signed_ca(&self, name: &str, cn: &str) {
        self.key_and_request(name, cn);
        let ext = format!("{name}.ext");
        fs::write(
            self.path(&ext),
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
        )
        .unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-signkey",
            &format!("{name}.key"),
            "-extfile",
            &ext,
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// A leaf certificate signed by `ca`, with `extensions` added.
    fn signed(&self, name: &str, cn: &str, extensions: &str, serial: u32) {
        self.key_and_request(name, cn);
        let ext = format!("{name}.ext");
        fs::write(
            self.path(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nauthorityKeyIdentifier=keyid\n{extensions}"
            ),
        )
        .unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial.to_string(),
            "-extfile",
            &ext,
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
        ]);
    }
}

// --- broker ---------------------------------------------------------------------

/// Mosquitto with one TLS listener on 127.0.0.1: client certificates
/// required, logins from a password file, no anonymous clients.
struct TlsBroker {
    port: u16,
    child: Child,
    dir: TempDir,
}

impl TlsBroker {
    fn new(pki: &Pki) -> TlsBroker {
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let passwd = dir.path().join("passwd");
        for (i, (user, password)) in [
            (BERTH_USER, BERTH_PASSWORD),
            (OBSERVER_USER, OBSERVER_PASSWORD),
        ]
        .iter()
        .enumerate()
        {
            let mut args = vec!["-b"];
            if i == 0 {
                args.push("-c");
            }
            args.extend([passwd.to_str().unwrap(), user, password]);
            let out = Command::new("mosquitto_passwd")
                .args(&args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run mosquitto_passwd ({e}): {SETUP_HINT}"));
            assert!(
                out.status.success(),
                "mosquitto_passwd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let log = dir.path().join("mosquitto.log");
        // The port may be taken between finding it and binding it.
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("mosquitto.conf");
            fs::write(
                &config,
                format!(
                    "# Run as the test's user: the files are in its temp dirs.\n\
                     user {user}\n\
                     per_listener_settings false\n\
                     allow_anonymous false\n\
                     password_file {passwd}\n\
                     persistence false\n\
                     log_dest stderr\n\
                     listener {port} 127.0.0.1\n\
                     {tls}\
                     listener {port} ::1\n\
                     {tls}",
                    user = current_user(),
                    passwd = passwd.display(),
                    tls = format_args!(
                        "cafile {}\n\
                         certfile {}\n\
                         keyfile {}\n\
                         require_certificate true\n",
                        pki.path("ca.pem").display(),
                        pki.path("server.pem").display(),
                        pki.path("server.key").display(),
                    ),
                ),
            )
            .unwrap();
            let out = fs::File::create(&log).unwrap();
            let mut child = Command::new("mosquitto")
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start mosquitto ({e}): {SETUP_HINT}"));
            // Logged once both listeners are bound; a port taken on either
            // address makes mosquitto exit instead.
            let running = || fs::read_to_string(&log).is_ok_and(|l| l.contains(" running"));
            if wait_until(Duration::from_secs(15), || {
                running() || child.try_wait().unwrap().is_some()
            }) && running()
                && child.try_wait().unwrap().is_none()
            {
                return TlsBroker { port, child, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "mosquitto with TLS did not start:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Waits for one message on `topic` with `mosquitto_sub`, logged in as
    /// the observer with the client certificate; returns (retained, payload).
    fn receive_one(&self, pki: &Pki, topic: &str) -> (bool, Value) {
        let out: Output = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--cafile")
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path("client.pem"))
            .arg("--key")
            .arg(pki.path("client.key"))
            .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD])
            .args(["-t", topic, "-q", "1", "-C", "1", "-W", "30", "-F", "%r %p"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run mosquitto_sub ({e}): {SETUP_HINT}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mosquitto_sub on {topic}: {}; {}\nbroker log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let (retained, payload) = stdout.trim().split_once(' ').expect("'%r %p' output");
        (
            retained == "1",
            serde_json::from_str(payload).expect("a JSON payload"),
        )
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- mosquitto log ---\n{}", self.log());
        }
    }
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

// --- berth ----------------------------------------------------------------------

/// berth set up for the TLS broker with the given CA and password.
fn berth_for(broker: &TlsBroker, pki: &Pki, ca: &str, password: &str) -> Berth {
    let mut config = BerthConfig::new(&unique_id("tls"), broker.port);
    config.mqtt_scheme = "mqtts".to_owned();
    config.mqtt_username = Some(BERTH_USER.to_owned());
    config.mqtt_ca_file = Some(pki.path(ca));
    config.mqtt_cert_file = Some(pki.path("client.pem"));
    config.mqtt_key_file = Some(pki.path("client.key"));
    let mut berth = Berth::new(config);
    let password_file = berth.dir().join("mqtt-password");
    fs::write(&password_file, format!("{password}\n")).unwrap();
    berth.config_mut().mqtt_password_file = Some(password_file);
    berth.write_config();
    berth
}

/// Neither password nor any line of a private key in berth's log.
fn assert_no_secrets(berth: &Berth, pki: &Pki, passwords: &[&str]) {
    let log = berth.log();
    for password in passwords {
        assert!(!log.contains(password), "berth logged a password:\n{log}");
    }
    for key in pki.key_contents() {
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !log.contains(line),
                "berth logged part of a private key ({line}):\n{log}"
            );
        }
    }
}

/// berth's log without colour codes.
fn plain_log(berth: &Berth) -> String {
    let log = berth.log();
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, up to a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The time of every failed connection attempt berth logged, with its line.
fn failed_attempts(berth: &Berth, port: u16) -> Vec<(SystemTime, String)> {
    let broker = format!("broker=mqtts://127.0.0.1:{port}");
    plain_log(berth)
        .lines()
        .filter(|l| l.contains(&broker) && l.contains(" error="))
        .map(|l| {
            let stamp = l.split_whitespace().next().unwrap_or_default();
            let at = humantime::parse_rfc3339(stamp)
                .unwrap_or_else(|e| panic!("no timestamp at the start of {l:?}: {e}"));
            (at, l.to_owned())
        })
        .collect()
}

/// berth stays up, names `problem` in a warning, and tries again and again
/// with gaps that grow (the reporter's back-off: 100 ms doubling).
fn assert_retries_with_backoff(berth: &mut Berth, broker: &TlsBroker, problem: &str) {
    const ATTEMPTS: usize = 6;
    let mut attempts = Vec::new();
    let started = Instant::now();
    while attempts.len() < ATTEMPTS && started.elapsed() < WAIT {
        assert!(
            berth.is_running(),
            "berth exited on a broker it cannot log in to:\n{}",
            berth.log()
        );
        thread::sleep(Duration::from_millis(200));
        attempts = failed_attempts(berth, broker.port);
    }
    assert!(
        attempts.len() >= ATTEMPTS,
        "{} failed attempts logged in {WAIT:?}, expected {ATTEMPTS}:\n{}",
        attempts.len(),
        berth.log()
    );
    let (_, first) = &attempts[0];
    assert!(
        first.contains("WARN") && first.contains(problem),
        "the first failure should be a warning naming {problem:?}: {first}"
    );
    let gaps: Vec<Duration> = attempts
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0).unwrap_or_default())
        .collect();
    for pair in gaps.windows(2) {
        assert!(
            pair[1] * 10 >= pair[0] * 7,
            "the gaps between attempts shrink: {gaps:?}"
        );
    }
    let (first_gap, last_gap) = (gaps[0], gaps[gaps.len() - 1]);
    assert!(
        last_gap >= first_gap * 4,
        "the gaps between attempts do not grow: {gaps:?}"
    );
    assert!(berth.is_running(), "berth exited:\n{}", berth.log());
}

// --- tests ------------------------------------------------------------------------

#[test]
fn mutual_tls_and_a_password_get_the_agent_document_published() {
    let pki = Pki::new();
    let broker = TlsBroker::new(&pki);
    let mut berth = berth_for(&broker, &pki, "ca.pem", BERTH_PASSWORD);
    berth.start();
    berth.wait_for_log("connected to the mqtt broker", WAIT);

    let (retained, agent) = broker.receive_one(&pki, &berth.topic("agent"));
    assert!(retained, "the agent document is retained: {agent}");
    assert_eq!(agent["state"], "online", "{agent}");
    assert_eq!(agent["version"], env!("CARGO_PKG_VERSION"), "{agent}");

    // Stopping says goodbye over the same connection.
    assert!(berth.sigterm().success(), "{}", berth.log());
    let (_, agent) = broker.receive_one(&pki, &berth.topic("agent"));
    assert_eq!(agent["state"], "offline", "{agent}");
    assert_no_secrets(&berth, &pki, &[BERTH_PASSWORD]);
}

/// `mqtts://[::1]:port`: an IPv6 address in brackets is the TCP peer and
/// the name the broker's certificate is checked against.
#[test]
fn mqtts_to_an_ipv6_address_in_brackets() {
    let pki = Pki::new();
    let broker = TlsBroker::new(&pki);
    let mut berth = berth_for(&broker, &pki, "ca.pem", BERTH_PASSWORD);
    berth.config_mut().mqtt_host = "[::1]".to_owned();
    berth.write_config();
    berth.start();
    berth.wait_for_log("connected to the mqtt broker", WAIT);
    let (retained, agent) = broker.receive_one(&pki, &berth.topic("agent"));
    assert!(retained, "the agent document is retained: {agent}");
    assert_eq!(agent["state"], "online", "{agent}");
    assert!(
        broker.log().contains("New connection from ::1"),
        "berth came over IPv6:\n{}",
        broker.log()
    );
    assert!(berth.sigterm().success(), "{}", berth.log());
}

#[test]
fn a_wrong_ca_is_named_and_retried_with_backoff() {
    let pki = Pki::new();
    let broker = TlsBroker::new(&pki);
    let mut berth = berth_for(&broker, &pki, "other-ca.pem", BERTH_PASSWORD);
    berth.start();
    // rustls: the broker's certificate does not chain to the CA in ca_file.
    assert_retries_with_backoff(
        &mut berth,
        &broker,
        "invalid peer certificate: UnknownIssuer",
    );
    assert!(berth.sigterm().success(), "{}", berth.log());
    assert_no_secrets(&berth, &pki, &[BERTH_PASSWORD]);
}

#[test]
fn a_wrong_password_is_named_and_retried_with_backoff() {
    const WRONG: &str = "pw-wrong-0c44e1";
    let pki = Pki::new();
    let broker = TlsBroker::new(&pki);
    let mut berth = berth_for(&broker, &pki, "ca.pem", WRONG);
    berth.start();
    // The broker refuses the login in its CONNACK.
    assert_retries_with_backoff(&mut berth, &broker, "NotAuthorized");
    assert!(berth.sigterm().success(), "{}", berth.log());
    assert_no_secrets(&berth, &pki, &[WRONG, BERTH_PASSWORD]);
}

/// Sanity check of the broker itself, so that the tests above fail for
/// berth's reasons only: it refuses a client without a certificate.
#[test]
fn the_broker_requires_a_client_certificate() {
    let pki = Pki::new();
    let broker = TlsBroker::new(&pki);
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .arg("--cafile")
        .arg(pki.path("ca.pem"))
        .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD])
        .args(["-t", "probe", "-m", "x"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run mosquitto_pub ({e}): {SETUP_HINT}"));
    assert!(
        !out.status.success(),
        "a client without a certificate got in; broker log:\n{}",
        broker.log()
    );
}
