//! The systemd notify protocol (`sd_notify`): `READY=1` after the first
//! reconcile, `STATUS=` lines, `WATCHDOG=1` from the supervisor loop itself,
//! `STOPPING=1`. Each is one datagram to the unix socket that systemd names
//! in `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without
//! that variable (not under systemd, or `Type=simple`) every call is a
//! no-op. A notification that cannot be sent is logged at debug level and
//! otherwise ignored: systemd's bookkeeping must never stop berth.
//!
//! Written with std alone rather than a crate: the protocol is a handful of
//! `KEY=value` lines in a datagram.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tracing::debug;

use crate::model::Status;

/// Sends notifications to the socket named by `NOTIFY_SOCKET`, if any.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
    /// `WatchdogSec=` as systemd passed it in `WATCHDOG_USEC`.
    watchdog: Option<Duration>,
    /// The last `STATUS=` line sent, so that an unchanged one is not sent
    /// again on every turn of the supervisor loop.
    last_status: Mutex<Option<String>>,
}

/// Where notifications go, and the unbound socket they leave from.
#[derive(Debug)]
struct Target {
    /// As given in `NOTIFY_SOCKET`, for log messages.
    name: String,
    addr: SocketAddr,
    socket: UnixDatagram,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the
    /// environment. The variables are left in place: berth starts no child
    /// that could mistake them for its own.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok();
        Notifier::from_vars(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier::default()
    }

    /// `from_env` without the environment, for tests.
    fn from_vars(
        notify_socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Self {
        let target = notify_socket
            .filter(|name| !name.is_empty())
            .and_then(|name| match Target::open(name) {
                Ok(target) => Some(target),
                Err(e) => {
                    debug!(notify_socket = name, error = %e, "cannot use NOTIFY_SOCKET; not notifying systemd");
                    None
                }
            });
        let watchdog = target
            .as_ref()
            .and_then(|_| watchdog_timeout(watchdog_usec, watchdog_pid, own_pid));
        Notifier {
            target,
            watchdog,
            last_status: Mutex::new(None),
        }
    }

    /// How often `watchdog()` must be called: half of `WatchdogSec`, as
    /// sd_watchdog_enabled(3) advises. `None` when systemd watches nothing.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Start-up is complete: `systemctl start` returns, and units ordered
    /// after berth start.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// One line for `systemctl status`; sent only when it differs from the
    /// last one.
    pub fn status(&self, line: &str) {
        if self.target.is_none() {
            return;
        }
        // A newline would end the STATUS= assignment and start another.
        let line = line.replace('\n', " ");
        let mut last = self
            .last_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.as_deref() == Some(line.as_str()) {
            return;
        }
        // One that could not be sent goes again with the next call.
        if self.send(&format!("STATUS={line}")) {
            *last = Some(line);
        }
    }

    /// The loop is alive; systemd restarts berth if this stops coming.
    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// Shutdown has begun.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// Whether the message left; false without a socket.
    fn send(&self, message: &str) -> bool {
        let Some(target) = &self.target else {
            return false;
        };
        match target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            Ok(_) => true,
            Err(e) => {
                debug!(notify_socket = %target.name, message, error = %e, "cannot notify systemd");
                false
            }
        }
    }
}

impl Target {
    fn open(name: &str) -> io::Result<Target> {
        let addr = match name.strip_prefix('@') {
            // Linux abstract namespace: systemd writes the leading NUL as '@'.
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            // systemd also knows vsock: addresses, for VMs; berth runs on
            // the host.
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "neither an absolute path nor an @abstract name",
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        // A receiver that falls behind must not stall the supervisor loop:
        // a full queue drops the notification instead.
        socket.set_nonblocking(true)?;
        Ok(Target {
            name: name.to_owned(),
            addr,
            socket,
        })
    }
}

/// `WatchdogSec=` from `WATCHDOG_USEC`, unless `WATCHDOG_PID` says it is meant
/// for another process (a parent that exec'd without passing it on).
fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            debug!(
                watchdog_pid = pid,
                own_pid, "WATCHDOG_PID is another process; no watchdog"
            );
            return None;
        }
    }
    let usec = usec?;
    match usec.trim().parse::<u64>() {
        Ok(usec) if usec > 0 => Some(Duration::from_micros(usec)),
        _ => {
            debug!(
                watchdog_usec = usec,
                "WATCHDOG_USEC is not a positive number; no watchdog"
            );
            None
        }
    }
}

/// The `STATUS=` line: how many deployments there are, how many are in each
/// status, and their restarts, as in
/// `3 deployments: 2 running, 1 pending; 5 restarts`. Takes each
/// deployment's status and restart count.
pub fn summary(deployments: impl IntoIterator<Item = (Status, u64)>) -> String {
    // Healthy first: the line is read left to right in `systemctl status`.
    const ORDER: [(Status, &str); 6] = [
        (Status::Running, "running"),
        (Status::Completed, "completed"),
        (Status::Pending, "pending"),
        (Status::Stopped, "stopped"),
        (Status::Unknown, "unknown"),
        (Status::Error, "error"),
    ];
    let mut counts = [0u64; ORDER.len()];
    let (mut total, mut restarts) = (0u64, 0u64);
    for (status, restart_count) in deployments {
        total += 1;
        restarts += restart_count;
        if let Some(i) = ORDER.iter().position(|(s, _)| *s == status) {
            counts[i] += 1;
        }
    }
    let plural = |n: u64, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let mut line = plural(total, "deployment");
    let parts: Vec<String> = ORDER
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|((_, word), n)| format!("{n} {word}"))
        .collect();
    if !parts.is_empty() {
        line.push_str(": ");
        line.push_str(&parts.join(", "));
    }
    line.push_str("; ");
    line.push_str(&plural(restarts, "restart"));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket the test owns, as systemd's would be, and a notifier aimed
    /// at it.
    struct Systemd {
        _dir: tempfile::TempDir,
        socket: UnixDatagram,
        path: String,
    }

    impl Systemd {
        fn new() -> Systemd {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            Systemd {
                _dir: dir,
                socket,
                path: path.to_str().unwrap().to_owned(),
            }
        }

        fn notifier(&self, watchdog_usec: Option<&str>) -> Notifier {
            Notifier::from_vars(Some(&self.path), watchdog_usec, None, std::process::id())
        }

        fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).expect("a notification");
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }

        fn nothing_waiting(&self) -> bool {
            self.socket.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 16];
            let empty = matches!(self.socket.recv(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            self.socket.set_nonblocking(false).unwrap();
            empty
        }
    }

    #[test]
    fn each_call_sends_its_line() {
        let systemd = Systemd::new();
        let notifier = systemd.notifier(Some("2000000"));
        notifier.ready();
        assert_eq!(systemd.recv(), "READY=1");
        notifier.status("1 deployment: 1 running; 0 restarts");
        assert_eq!(systemd.recv(), "STATUS=1 deployment: 1 running; 0 restarts");
        notifier.watchdog();
        assert_eq!(systemd.recv(), "WATCHDOG=1");
        notifier.stopping();
        assert_eq!(systemd.recv(), "STOPPING=1");
        assert!(systemd.nothing_waiting());
    }

    #[test]
    fn an_unchanged_status_is_sent_once() {
        let systemd = Systemd::new();
        let notifier = systemd.notifier(None);
        notifier.status("a");
        notifier.status("a");
        notifier.status("b\nREADY=1");
        notifier.status("a");
        assert_eq!(systemd.recv(), "STATUS=a");
        assert_eq!(systemd.recv(), "STATUS=b READY=1");
        assert_eq!(systemd.recv(), "STATUS=a");
        assert!(systemd.nothing_waiting());
    }

    #[test]
    fn an_abstract_socket_is_reached() {
        let name = format!("berth-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let notifier = Notifier::from_vars(Some(&format!("@{name}")), None, None, 1);
        notifier.ready();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn the_watchdog_interval_is_half_of_watchdog_usec() {
        let systemd = Systemd::new();
        assert_eq!(
            systemd.notifier(Some("30000000")).watchdog_interval(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(systemd.notifier(None).watchdog_interval(), None);
        assert_eq!(systemd.notifier(Some("0")).watchdog_interval(), None);
        assert_eq!(systemd.notifier(Some("soon")).watchdog_interval(), None);

        let pid = std::process::id();
        let with_pid = |watchdog_pid: &str| {
            Notifier::from_vars(
                Some(&systemd.path),
                Some("2000000"),
                Some(watchdog_pid),
                pid,
            )
            .watchdog_interval()
        };
        assert_eq!(with_pid(&pid.to_string()), Some(Duration::from_secs(1)));
        assert_eq!(with_pid(&(pid + 1).to_string()), None);
        assert_eq!(with_pid("x"), None);
    }

    #[test]
    fn without_a_watchdog_no_watchdog_message_is_sent() {
        let systemd = Systemd::new();
        let notifier = systemd.notifier(None);
        notifier.watchdog();
        assert!(systemd.nothing_waiting());
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_nothing_fails() {
        for notifier in [
            Notifier::disabled(),
            Notifier::from_vars(None, Some("2000000"), None, 1),
            Notifier::from_vars(Some(""), None, None, 1),
            Notifier::from_vars(Some("relative/path"), None, None, 1),
            Notifier::from_vars(Some("vsock:2:1234"), None, None, 1),
        ] {
            assert_eq!(notifier.watchdog_interval(), None);
            notifier.ready();
            notifier.status("x");
            notifier.watchdog();
            notifier.stopping();
        }
    }

    #[test]
    fn a_missing_or_full_socket_is_not_fatal() {
        let systemd = Systemd::new();
        let notifier = systemd.notifier(Some("1000000"));
        // Far more than the receive queue holds, and nobody reads: the
        // sends fail at once instead of blocking.
        for _ in 0..10_000 {
            notifier.watchdog();
        }
        drop(systemd);
        notifier.ready();
        notifier.stopping();
    }

    #[test]
    fn the_summary_counts_statuses_and_restarts() {
        assert_eq!(summary([]), "0 deployments; 0 restarts");
        assert_eq!(
            summary([(Status::Running, 1)]),
            "1 deployment: 1 running; 1 restart"
        );
        assert_eq!(
            summary([
                (Status::Pending, 0),
                (Status::Running, 3),
                (Status::Running, 2),
            ]),
            "3 deployments: 2 running, 1 pending; 5 restarts"
        );
        assert_eq!(
            summary([
                (Status::Error, 7),
                (Status::Completed, 0),
                (Status::Stopped, 0),
                (Status::Unknown, 0),
            ]),
            "4 deployments: 1 completed, 1 stopped, 1 unknown, 1 error; 7 restarts"
        );
    }
}
