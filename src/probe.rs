//! The liveness probes berth runs itself: `tcp` (a connect succeeds) and
//! `http` (a GET answers 2xx or 3xx), against the executable's network: on
//! the host network at 127.0.0.1, on an isolated component network at the
//! container's own address (`ContainerInfo::probe_host`). `exec` probes are
//! not run here: the engine runs them as the container's healthcheck and
//! reports `health_status` events (`runtime::EventAction::Health`).
//!
//! The checks are plain async functions; [`Prober`] is the pure bookkeeping
//! of one executable's probe (initial delay, period, consecutive failures),
//! and [`watch`] drives it on tokio's clock, so that its timing is tested in
//! paused time. Nothing here talks to the engine.

use std::future::Future;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::model::{Probe, ProbeCheck};

/// Why one check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection to {address} failed: {message}")]
    Connect { address: String, message: String },
    #[error("GET {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url} failed: {message}")]
    Http { url: String, message: String },
    /// An `exec` probe given to berth: the engine runs those.
    #[error("exec probes are run by the engine, not by berth")]
    NotBerths,
}

/// A parsed `http` probe url: `http://host[:port][/path][?query]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl HttpTarget {
    /// Reads a probe url; the message says what is wrong.
    pub fn parse(url: &str) -> Result<HttpTarget, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "\"{url}\" must start with http:// (berth probes plain http)"
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(format!("\"{url}\" must not hold a user"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            match bracketed.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, after)) => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("\"{url}\": expected ':' after ']'")),
                },
                None => return Err(format!("\"{url}\": missing ']' after the ipv6 host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("\"{url}\" names no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("\"{url}\": the port must be from 1 to 65535")),
            },
        };
        Ok(HttpTarget {
            host: host.to_string(),
            port,
            path,
        })
    }

    /// Whether the url names the executable itself (a loopback host), which
    /// on an isolated network is reached at the container's address.
    pub fn is_loopback(&self) -> bool {
        matches!(self.host.as_str(), "127.0.0.1" | "localhost" | "::1")
    }

    fn url(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("http://{}:{}{}", self.host, self.port, self.path)
        }
    }

    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A TCP connect to `host:port` succeeds within `timeout`.
pub async fn check_tcp(host: &str, port: u16, timeout: Duration) -> Result<(), ProbeError> {
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    match tokio::time::timeout(timeout, TcpStream::connect(&address)).await {
        Err(_) => Err(ProbeError::Timeout(timeout)),
        Ok(Err(e)) => Err(ProbeError::Connect {
            address,
            message: e.to_string(),
        }),
        Ok(Ok(_)) => Ok(()),
    }
}

/// A GET of `target` answers 2xx or 3xx within `timeout` (connection and
/// response headers; the body is not read).
pub async fn check_http(target: &HttpTarget, timeout: Duration) -> Result<(), ProbeError> {
    let url = target.url();
    let get = async {
        let address = target.address();
        let stream = TcpStream::connect(&address)
            .await
            .map_err(|e| ProbeError::Connect {
                address,
                message: e.to_string(),
            })?;
        let http_error = |e: hyper::Error| ProbeError::Http {
            url: url.clone(),
            message: e.to_string(),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_error)?;
        let connection = tokio::spawn(connection);
        let authority = if target.port == 80 {
            target.host.clone()
        } else {
            format!("{}:{}", target.host, target.port)
        };
        let request = hyper::Request::get(target.path.as_str())
            .header("Host", authority)
            .header("User-Agent", concat!("berth/", env!("CARGO_PKG_VERSION")))
            .header("Connection", "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Http {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http_error);
        connection.abort();
        let status = response?.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(ProbeError::Status {
                url: url.clone(),
                status: status.as_u16(),
            })
        }
    };
    tokio::time::timeout(timeout, get)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

/// Runs one check of a `tcp` or `http` probe against an executable reached
/// at `host` (`ContainerInfo::probe_host`). An http url naming a loopback
/// host is sent to `host` instead, so that one url works on the host network
/// and on an isolated one.
pub async fn check(probe: &Probe, host: &str) -> Result<(), ProbeError> {
    match &probe.check {
        ProbeCheck::Tcp(port) => check_tcp(host, *port, probe.timeout()).await,
        ProbeCheck::Http(url) => {
            let mut target = HttpTarget::parse(url).map_err(|message| ProbeError::Http {
                url: url.clone(),
                message,
            })?;
            if target.is_loopback() {
                target.host = host.to_string();
            }
            check_http(&target, probe.timeout()).await
        }
        ProbeCheck::Exec(_) => Err(ProbeError::NotBerths),
    }
}

/// A change of an executable's health, as its probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A check passed after a start, or after failures.
    Healthy,
    /// `failure_threshold` checks in a row failed; the last one's reason.
    Unhealthy { failures: u32, reason: String },
}

/// The bookkeeping of one executable's probe from one start: when the next
/// check is due, and what a result changes. Pure: the caller owns the clock.
#[derive(Debug, Clone)]
pub struct Prober {
    period: Duration,
    threshold: u32,
    next_at: Instant,
    failures: u32,
    /// The last verdict given, so that each is given once per change.
    reported: Option<bool>,
}

impl Prober {
    /// A probe of a container that started at `started`: the first check is
    /// due once `initial_delay_secs` have passed.
    pub fn new(probe: &Probe, started: Instant) -> Self {
        Prober {
            period: probe.period(),
            threshold: probe.failure_threshold.max(1),
            next_at: started + probe.initial_delay(),
            failures: 0,
            reported: None,
        }
    }

    /// When the next check is due.
    pub fn next_at(&self) -> Instant {
        self.next_at
    }

    /// Takes the result of the check that was due; the next one is due one
    /// period after it was due (a slow check does not shift the schedule,
    /// a late one does not make checks pile up). Returns a verdict when the
    /// health changed.
    pub fn record(&mut self, result: Result<(), ProbeError>, now: Instant) -> Option<Verdict> {
        self.next_at = (self.next_at + self.period).max(now);
        match result {
            Ok(()) => {
                self.failures = 0;
                (self.reported != Some(true)).then(|| {
                    self.reported = Some(true);
                    Verdict::Healthy
                })
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                (self.failures >= self.threshold && self.reported != Some(false)).then(|| {
                    self.reported = Some(false);
                    Verdict::Unhealthy {
                        failures: self.failures,
                        reason: e.to_string(),
                    }
                })
            }
        }
    }
}

/// Probes one executable from its start (`started`) on, forever: each due
/// check runs `check_once`, and each change of health goes to `report`.
/// Cancel it by dropping the future (the executable stopped or restarted).
pub async fn watch<C, F>(
    probe: &Probe,
    started: Instant,
    mut check_once: C,
    mut report: impl FnMut(Verdict),
) where
    C: FnMut() -> F,
    F: Future<Output = Result<(), ProbeError>>,
{
    let mut prober = Prober::new(probe, started);
    loop {
        tokio::time::sleep_until(prober.next_at()).await;
        let result = check_once().await;
        if let Some(verdict) = prober.record(result, Instant::now()) {
            report(verdict);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn probe(check: ProbeCheck) -> Probe {
        Probe {
            check,
            initial_delay_secs: 5,
            period_secs: 10,
            timeout_secs: 2,
            failure_threshold: 3,
        }
    }

    fn failed() -> Result<(), ProbeError> {
        Err(ProbeError::Timeout(Duration::from_secs(2)))
    }

    #[test]
    fn http_urls_are_parsed() {
        let t = HttpTarget::parse("http://127.0.0.1:8080/healthz?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/healthz?x=1")
        );
        assert!(t.is_loopback());
        let t = HttpTarget::parse("http://localhost").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        let t = HttpTarget::parse("http://[::1]:81?q").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 81, "/?q")
        );
        for bad in [
            "https://x/",
            "ftp://x",
            "http://",
            "http://x:0/",
            "http://x:http/",
            "http://u@x/",
        ] {
            assert!(HttpTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn prober_waits_the_initial_delay_then_every_period() {
        let start = Instant::now();
        let mut p = Prober::new(&probe(ProbeCheck::Tcp(80)), start);
        assert_eq!(p.next_at(), start + Duration::from_secs(5));
        assert_eq!(p.record(Ok(()), p.next_at()), Some(Verdict::Healthy));
        assert_eq!(p.next_at(), start + Duration::from_secs(15));
        assert_eq!(p.record(Ok(()), p.next_at()), None, "said once");
        assert_eq!(p.next_at(), start + Duration::from_secs(25));
    }

    #[tokio::test(start_paused = true)]
    async fn prober_is_unhealthy_after_threshold_failures_in_a_row() {
        let start = Instant::now();
        let mut p = Prober::new(&probe(ProbeCheck::Tcp(80)), start);
        assert_eq!(p.record(failed(), p.next_at()), None);
        assert_eq!(p.record(failed(), p.next_at()), None);
        assert_eq!(p.record(Ok(()), p.next_at()), Some(Verdict::Healthy));
        assert_eq!(p.record(failed(), p.next_at()), None);
        assert_eq!(p.record(failed(), p.next_at()), None);
        assert_eq!(
            p.record(failed(), p.next_at()),
            Some(Verdict::Unhealthy {
                failures: 3,
                reason: "no answer within 2s".into()
            })
        );
        assert_eq!(p.record(failed(), p.next_at()), None, "said once");
        assert_eq!(p.record(Ok(()), p.next_at()), Some(Verdict::Healthy));
    }

    /// Runs `watch` with checks that fail from `fail_from` on, and returns
    /// the verdicts with the time since the start they were given at.
    async fn watched(fail_from: Duration, run_for: Duration) -> Vec<(Duration, Verdict)> {
        let start = Instant::now();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let probe = probe(ProbeCheck::Tcp(80));
        let watching = watch(
            &probe,
            start,
            || async move {
                // A check takes a second of the probe's 2 s timeout.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if start.elapsed() >= fail_from {
                    failed()
                } else {
                    Ok(())
                }
            },
            |v| sink.lock().unwrap().push((start.elapsed(), v)),
        );
        let _ = tokio::time::timeout(run_for, watching).await;
        let out = seen.lock().unwrap().clone();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn watch_reports_at_exact_times() {
        // Checks are due at 5, 15, 25, 35 ... and each ends a second later.
        let verdicts = watched(Duration::from_secs(20), Duration::from_secs(60)).await;
        assert_eq!(
            verdicts,
            [
                (Duration::from_secs(6), Verdict::Healthy),
                // Failures at 25, 35, 45: the third ends at 46.
                (
                    Duration::from_secs(46),
                    Verdict::Unhealthy {
                        failures: 3,
                        reason: "no answer within 2s".into()
                    }
                ),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn watch_says_nothing_within_the_initial_delay() {
        let verdicts = watched(Duration::ZERO, Duration::from_millis(5_999)).await;
        assert!(verdicts.is_empty(), "{verdicts:?}");
        let verdicts = watched(Duration::ZERO, Duration::from_secs(27)).await;
        assert_eq!(verdicts.len(), 1, "{verdicts:?}");
        assert_eq!(verdicts[0].0, Duration::from_secs(26));
    }

    #[tokio::test]
    async fn tcp_check_passes_on_a_listener_and_fails_without_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        check_tcp("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        drop(listener);
        let err = check_tcp("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
    }

    /// A one-connection-at-a-time server answering every request with
    /// `status`, or never answering when `status` is `None`.
    async fn http_server(status: Option<u16>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 2048];
                let _ = conn.read(&mut buf).await;
                match status {
                    Some(status) => {
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        let _ = conn.write_all(answer.as_bytes()).await;
                    }
                    None => {
                        tokio::spawn(async move {
                            while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                        });
                    }
                }
            }
        });
        port
    }

    #[tokio::test]
    async fn http_check_wants_2xx_or_3xx_in_time() {
        let timeout = Duration::from_millis(500);
        for (status, healthy) in [(200, true), (302, true), (404, false), (503, false)] {
            let port = http_server(Some(status)).await;
            let probe = Probe {
                timeout_secs: 2,
                ..probe(ProbeCheck::Http(format!("http://localhost:{port}/healthz")))
            };
            // The loopback host of the url is replaced by the executable's.
            let result = check(&probe, "127.0.0.1").await;
            assert_eq!(result.is_ok(), healthy, "{status}: {result:?}");
            if !healthy {
                assert_eq!(
                    result.unwrap_err(),
                    ProbeError::Status {
                        url: format!("http://127.0.0.1:{port}/healthz"),
                        status
                    }
                );
            }
        }
        let silent = http_server(None).await;
        let target = HttpTarget::parse(&format!("http://127.0.0.1:{silent}/")).unwrap();
        let started = std::time::Instant::now();
        let result = check_http(&target, timeout).await;
        assert_eq!(result, Err(ProbeError::Timeout(timeout)));
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(2),
            "{took:?}"
        );
    }
}
