//! The MQTT side of reporting (SPEC 9), and the only file that talks to
//! rumqttc. `publish` only records: the latest document of each retained
//! topic, and a bounded queue of events. One task owns the connection: it
//! polls rumqttc's event loop, backs off between reconnections (rumqttc has
//! no back-off of its own), republishes every latest document on each
//! connection (clean session, so nothing depends on the broker keeping one),
//! and publishes only while connected. On shutdown it publishes the offline
//! document itself and disconnects; if it vanishes without that, the broker
//! publishes the same document as the last will.
//!
//! With remote commands on (`start_with_commands`), it also subscribes to
//! `<prefix>/<device>/commands/+` on every connection, hands each command to
//! the remote service through a channel, and publishes the service's
//! replies on `replies/<request_id>` (QoS 1, not retained), queued like
//! events while the broker is away.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{offline_doc, Reporter, Topic};
use crate::config::MqttSettings;
use crate::remote::service::Incoming;

/// Events kept while the broker is away; older ones are dropped first.
const MAX_QUEUED_EVENTS: usize = 1000;
/// Publishes handed to rumqttc and not yet acknowledged. It is also the
/// capacity of rumqttc's request channel, so `try_publish` never finds it
/// full and the task never waits on it.
const MAX_IN_FLIGHT: u16 = 64;
/// Large enough for a deployment document with many executables.
const MAX_PACKET_SIZE: usize = 256 * 1024;
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(30);
/// How long stopping waits for the broker to acknowledge the offline
/// document; past it berth leaves without `DISCONNECT`, so that the broker
/// publishes the last will instead.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// Where Linux distributions keep the system CA bundle, for `mqtts://`
/// without `ca_file`.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot read the mqtt {what} {}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the mqtt {what} {} holds no PEM {expected}", path.display())]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("mqtt password_file is set without username; set username too")]
    PasswordWithoutUsername,
    #[error("mqtt cert_file and key_file go together; set both for mutual TLS, or neither")]
    HalfClientAuth,
    #[error(
        "no system CA bundle found (looked for {}); set mqtt ca_file",
        SYSTEM_CA_BUNDLES.join(", ")
    )]
    NoSystemCa,
    #[error("mqtt keep alive of {0:?} must be 0 (none) or 1 to 65535 whole seconds")]
    KeepAlive(Duration),
    #[error("invalid mqtt topic {0:?}: topic_prefix and device_id must not hold '+' or '#'")]
    Topic(String),
}

/// Reports to an MQTT broker: the handle on the task that owns the
/// connection. Every method returns at once except `shutdown`.
pub struct MqttReporter {
    shared: Arc<Shared>,
    /// Cancelled by `shutdown`, or with the token given to `start`.
    stop: CancellationToken,
    /// Cancelled by the task when it ends.
    done: CancellationToken,
    broker: String,
}

impl std::fmt::Debug for MqttReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttReporter")
            .field("broker", &self.broker)
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

impl MqttReporter {
    /// Reads the secrets and certificates the settings name, then spawns on
    /// `tracker` the task that connects and reports. `last_will` is
    /// published, retained, on the agent topic if berth disappears without
    /// saying goodbye. Cancelling `shutdown` stops it as `shutdown()` does.
    pub fn start(
        settings: &MqttSettings,
        device_id: &str,
        last_will: Value,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<MqttReporter, MqttError> {
        Self::start_with_commands(settings, device_id, last_will, None, shutdown, tracker)
    }

    /// As `start`; with `commands`, also subscribes to this device's
    /// `commands/+` topics and sends each command received there into it.
    pub fn start_with_commands(
        settings: &MqttSettings,
        device_id: &str,
        last_will: Value,
        commands: Option<tokio::sync::mpsc::Sender<Incoming>>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<MqttReporter, MqttError> {
        let options = options(settings, device_id, &last_will)?;
        let (client, eventloop) = AsyncClient::new(options, usize::from(MAX_IN_FLIGHT));
        let shared = Arc::new(Shared::default());
        let stop = shutdown.child_token();
        let done = CancellationToken::new();
        let task = Task {
            eventloop,
            link: Link {
                client,
                shared: Arc::clone(&shared),
                prefix: settings.topic_prefix.clone(),
                device_id: device_id.to_owned(),
                connected: false,
                unwritten: VecDeque::new(),
                unacked: HashMap::new(),
                next_seq: 0,
                stopping: None,
                commands,
            },
            stop: stop.clone(),
            broker: settings.endpoint.to_string(),
            delay: RECONNECT_DELAY_MIN,
            warned: None,
        };
        let task_done = done.clone();
        let task_shared = Arc::clone(&shared);
        tracker.spawn(async move {
            task.run().await;
            task_shared.connected.store(false, Ordering::Relaxed);
            task_done.cancel();
        });
        Ok(MqttReporter {
            shared,
            stop,
            done,
            broker: settings.endpoint.to_string(),
        })
    }

    /// Whether the broker has accepted the connection and not lost it since.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Publishes the offline document, waits (at most two seconds) for the
    /// broker to acknowledge it, and disconnects. Returns at once when the
    /// broker is unreachable; its last will says the same. Documents
    /// published after this are ignored.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.done.cancelled().await;
    }

    /// Queues the reply to remote command `request_id`, for
    /// `replies/<request_id>` (QoS 1, not retained).
    pub fn reply(&self, request_id: &str, payload: Value) {
        let mut pending = self.shared.lock();
        if pending.closed {
            return;
        }
        if pending.replies.len() >= MAX_QUEUED_EVENTS {
            warn!(request_id, "mqtt reply queue full; reply dropped");
            return;
        }
        pending.replies.push_back((request_id.to_string(), payload));
        drop(pending);
        self.shared.wake.notify_one();
    }
}

impl Reporter for MqttReporter {
    fn publish(&self, topic: Topic, payload: Value) {
        let mut pending = self.shared.lock();
        if pending.closed {
            return;
        }
        if topic.retained() {
            pending.set_latest(topic, payload);
        } else {
            pending.push_event(payload);
        }
        drop(pending);
        self.shared.wake.notify_one();
    }
}

/// What `publish` leaves for the task.
#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
    connected: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // The data stays consistent even if a holder panicked: every
        // critical section is a handful of collection operations.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// Kept as the text sent: a document as a `Value` takes several times
    /// its size in memory, and a robot keeps one per deployment.
    latest: BTreeMap<Topic, String>,
    /// Retained topics whose latest document the broker has not been sent.
    dirty: BTreeSet<Topic>,
    events: VecDeque<Value>,
    /// Events dropped since the last connection.
    dropped: u64,
    /// Set once stopping began: the offline document is the last word.
    closed: bool,
    /// Replies to remote commands: request id and payload.
    replies: VecDeque<(String, Value)>,
}

impl Pending {
    fn set_latest(&mut self, topic: Topic, payload: Value) {
        self.dirty.insert(topic.clone());
        self.latest.insert(topic, payload.to_string());
    }

    fn push_event(&mut self, payload: Value) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.note_dropped();
        }
        self.events.push_back(payload);
    }

    /// Puts events that were sent but not acknowledged back in front of the
    /// queue, oldest first, within its bound.
    fn requeue_events(&mut self, events: Vec<Value>) {
        for payload in events.into_iter().rev() {
            if self.events.len() >= MAX_QUEUED_EVENTS {
                self.note_dropped();
                continue;
            }
            self.events.push_front(payload);
        }
    }

    fn note_dropped(&mut self) {
        if self.dropped == 0 {
            warn!(
                limit = MAX_QUEUED_EVENTS,
                "mqtt broker unreachable and event queue full; dropping the oldest events"
            );
        }
        self.dropped += 1;
    }
}

/// One publish handed to rumqttc, remembered until the broker acknowledges
/// it.
#[derive(Debug)]
enum Sent {
    /// A retained document: nothing to keep, every connection sends the
    /// latest again.
    Retained,
    /// `seq` keeps the order of events put back after a lost connection.
    Event { seq: u64, payload: Value },
    /// A reply to a remote command, put back after a lost connection.
    Reply { request_id: String, payload: Value },
}

/// The task's side: the event loop, and when to try it again.
struct Task {
    eventloop: EventLoop,
    link: Link,
    stop: CancellationToken,
    broker: String,
    /// The wait before the next connection attempt.
    delay: Duration,
    /// The last error logged as a warning during this outage, so that a
    /// retry failing the same way logs at debug level only.
    warned: Option<String>,
}

/// What happens after an event of the loop.
enum Flow {
    Continue,
    Retry,
    Stop,
}

impl Task {
    async fn run(mut self) {
        let shared = Arc::clone(&self.link.shared);
        loop {
            let event = {
                // The poll future lives across wake-ups: rumqttc does not
                // promise that dropping it half way is harmless, so it is
                // only dropped when the task ends.
                let poll = self.eventloop.poll();
                tokio::pin!(poll);
                loop {
                    let deadline = self.link.stopping;
                    tokio::select! {
                        biased;
                        () = self.stop.cancelled(), if deadline.is_none() => {
                            if !self.link.begin_goodbye() {
                                return;
                            }
                        }
                        () = sleep_until(deadline) => {
                            warn!(
                                broker = %self.broker,
                                "mqtt broker did not acknowledge the offline status in time; \
                                 leaving it to the last will"
                            );
                            return;
                        }
                        event = &mut poll => break event,
                        () = shared.wake.notified() => self.link.pump(),
                    }
                }
            };
            match self.handle(event) {
                Flow::Continue => {}
                Flow::Stop => return,
                Flow::Retry => {
                    let delay = self.delay;
                    self.delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn handle(&mut self, event: Result<Event, ConnectionError>) -> Flow {
        let link = &mut self.link;
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(broker = %self.broker, "connected to the mqtt broker");
                self.delay = RECONNECT_DELAY_MIN;
                self.warned = None;
                link.on_connected();
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => match link.unwritten.pop_front() {
                Some(sent) => {
                    link.unacked.insert(pkid, sent);
                }
                None => debug!(pkid, "mqtt publish written that berth did not send"),
            },
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                link.unacked.remove(&ack.pkid);
                link.pump();
                if link.stopping.is_some() && link.drained() {
                    // Everything, the offline document last on its topic,
                    // is with the broker: a clean DISCONNECT withdraws the
                    // will.
                    if link.client.try_disconnect().is_err() {
                        return Flow::Stop;
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => link.on_command(publish),
            Ok(Event::Outgoing(Outgoing::Disconnect)) if link.stopping.is_some() => {
                info!(broker = %self.broker, "disconnected from the mqtt broker");
                return Flow::Stop;
            }
            Ok(_) => {}
            Err(e) => {
                let was_connected = link.connected;
                link.on_disconnected();
                if link.stopping.is_some() {
                    return Flow::Stop;
                }
                let message = error_chain(&e);
                if self.warned.as_deref() == Some(message.as_str()) {
                    debug!(
                        broker = %self.broker,
                        error = %message,
                        "mqtt broker still unreachable"
                    );
                } else if was_connected {
                    warn!(
                        broker = %self.broker,
                        error = %message,
                        "lost the connection to the mqtt broker; reconnecting"
                    );
                } else {
                    warn!(
                        broker = %self.broker,
                        error = %message,
                        "cannot reach the mqtt broker; retrying"
                    );
                }
                self.warned = Some(message);
                return Flow::Retry;
            }
        }
        Flow::Continue
    }
}

/// The task's bookkeeping of what it handed to rumqttc.
struct Link {
    client: AsyncClient,
    shared: Arc<Shared>,
    prefix: String,
    device_id: String,
    connected: bool,
    /// Handed to rumqttc, in order, not yet written: rumqttc reports each
    /// write with the packet id it chose, in the same order.
    unwritten: VecDeque<Sent>,
    unacked: HashMap<u16, Sent>,
    next_seq: u64,
    /// Set when stopping began: the time it gives up waiting.
    stopping: Option<Instant>,
    /// Where remote commands go; `None`: no subscription.
    commands: Option<tokio::sync::mpsc::Sender<Incoming>>,
}

impl Link {
    fn in_flight(&self) -> usize {
        self.unwritten.len() + self.unacked.len()
    }

    fn on_connected(&mut self) {
        self.connected = true;
        self.shared.connected.store(true, Ordering::Relaxed);
        let mut pending = self.shared.lock();
        // A clean session: the broker may have lost every retained document
        // (a restart without persistence), so all of them go again.
        let topics: Vec<Topic> = pending.latest.keys().cloned().collect();
        pending.dirty.extend(topics);
        if pending.dropped > 0 {
            warn!(
                dropped = pending.dropped,
                "events dropped while the mqtt broker was unreachable"
            );
            pending.dropped = 0;
        }
        drop(pending);
        // A clean session forgets subscriptions: made again on each one.
        if self.commands.is_some() {
            let filter = format!("{}/{}/commands/+", self.prefix, self.device_id);
            if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                error!(error = %e, "cannot subscribe to remote commands");
            }
        }
        self.pump();
    }

    /// A message on `commands/<name>`: handed to the remote service.
    fn on_command(&mut self, publish: rumqttc::Publish) {
        let Some(commands) = &self.commands else {
            return;
        };
        let prefix = format!("{}/{}/commands/", self.prefix, self.device_id);
        let Some(name) = publish.topic.strip_prefix(&prefix) else {
            debug!(topic = %publish.topic, "mqtt message outside the command topics ignored");
            return;
        };
        let incoming = Incoming {
            command: name.to_string(),
            payload: publish.payload.to_vec(),
        };
        if commands.try_send(incoming).is_err() {
            warn!(
                command = name,
                "remote command queue full or closed; command dropped"
            );
        }
    }

    /// rumqttc discards what it was handed when the connection drops (clean
    /// session): retained topics are sent again on the next connection
    /// anyway; unacknowledged events go back in the queue.
    fn on_disconnected(&mut self) {
        self.connected = false;
        self.shared.connected.store(false, Ordering::Relaxed);
        let mut replies = Vec::new();
        let mut events: Vec<(u64, Value)> = self
            .unwritten
            .drain(..)
            .chain(self.unacked.drain().map(|(_, sent)| sent))
            .filter_map(|sent| match sent {
                Sent::Event { seq, payload } => Some((seq, payload)),
                Sent::Reply {
                    request_id,
                    payload,
                } => {
                    replies.push((request_id, payload));
                    None
                }
                Sent::Retained => None,
            })
            .collect();
        events.sort_by_key(|(seq, _)| *seq);
        let mut pending = self.shared.lock();
        pending.requeue_events(events.into_iter().map(|(_, payload)| payload).collect());
        for reply in replies.into_iter().rev() {
            pending.replies.push_front(reply);
        }
    }

    /// Starts stopping: the offline document replaces the agent document.
    /// Returns false when there is nobody to say it to.
    fn begin_goodbye(&mut self) -> bool {
        let mut pending = self.shared.lock();
        pending.closed = true;
        if !self.connected {
            return false;
        }
        pending.set_latest(Topic::Agent, offline_doc());
        drop(pending);
        self.stopping = Some(Instant::now() + GOODBYE_TIMEOUT);
        self.pump();
        true
    }

    fn drained(&self) -> bool {
        let pending = self.shared.lock();
        self.in_flight() == 0
            && pending.dirty.is_empty()
            && pending.events.is_empty()
            && pending.replies.is_empty()
    }

    /// Hands rumqttc the dirty documents, then the queued events, as far as
    /// the in-flight window allows. Never while disconnected: rumqttc would
    /// drop them on reconnection.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let mut pending = shared.lock();
        while self.in_flight() < usize::from(MAX_IN_FLIGHT) {
            if let Some(topic) = pending.dirty.pop_first() {
                let Some(payload) = pending.latest.get(&topic) else {
                    continue;
                };
                let payload = payload.clone();
                if self.send(&topic, payload, Sent::Retained).is_err() {
                    pending.dirty.insert(topic);
                    return;
                }
            } else if let Some(payload) = pending.events.pop_front() {
                let seq = self.next_seq;
                self.next_seq += 1;
                let text = payload.to_string();
                if let Err(Sent::Event { payload, .. }) =
                    self.send(&Topic::Events, text, Sent::Event { seq, payload })
                {
                    pending.events.push_front(payload);
                    return;
                }
            } else if let Some((request_id, payload)) = pending.replies.pop_front() {
                let path = format!("{}/{}/replies/{request_id}", self.prefix, self.device_id);
                let text = payload.to_string();
                let sent = Sent::Reply {
                    request_id,
                    payload,
                };
                if let Err(Sent::Reply {
                    request_id,
                    payload,
                }) = self.send_to(path, false, text, sent)
                {
                    pending.replies.push_front((request_id, payload));
                    return;
                }
            } else {
                return;
            }
        }
    }

    /// Hands one publish to rumqttc, or gives it back when rumqttc would not
    /// take it. A payload too large for a packet is dropped here, since
    /// rumqttc would fail the whole connection on it, again after every
    /// reconnection.
    fn send(&mut self, topic: &Topic, payload: String, sent: Sent) -> Result<(), Sent> {
        let path = topic.path(&self.prefix, &self.device_id);
        self.send_to(path, topic.retained(), payload, sent)
    }

    fn send_to(
        &mut self,
        path: String,
        retained: bool,
        payload: String,
        sent: Sent,
    ) -> Result<(), Sent> {
        // Fixed header (at most 5 bytes), topic length, packet id.
        let size = 5 + 2 + path.len() + 2 + payload.len();
        if size > MAX_PACKET_SIZE {
            error!(
                topic = %path,
                size,
                limit = MAX_PACKET_SIZE,
                "mqtt document too large to publish; dropped"
            );
            return Ok(());
        }
        match self
            .client
            .try_publish(path, QoS::AtLeastOnce, retained, payload)
        {
            Ok(()) => {
                self.unwritten.push_back(sent);
                Ok(())
            }
            Err(e) => {
                // The window keeps the channel from filling, and the event
                // loop outlives this client: not expected. The next wake-up
                // or acknowledgement tries again.
                error!(error = %e, "mqtt client refused a publish; will retry");
                Err(sent)
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// An error and its causes, `: `-separated, skipping a cause whose message
/// its parent already shows (rumqttc's errors repeat their sources).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// rumqttc's options from berth's settings. Reads the password, CA and
/// client certificate files.
fn options(
    settings: &MqttSettings,
    device_id: &str,
    last_will: &Value,
) -> Result<MqttOptions, MqttError> {
    let endpoint = &settings.endpoint;
    let will_topic = Topic::Agent.path(&settings.topic_prefix, device_id);
    if !rumqttc::valid_topic(&will_topic) {
        return Err(MqttError::Topic(will_topic));
    }
    let keep_alive = settings.keep_alive;
    // rumqttc panics below a second, and sends whole seconds as a u16.
    if keep_alive.subsec_nanos() != 0 || keep_alive.as_secs() > u64::from(u16::MAX) {
        return Err(MqttError::KeepAlive(keep_alive));
    }

    let mut options = MqttOptions::new(
        settings.client_id.clone(),
        endpoint.connect_host(),
        endpoint.port,
    );
    options
        .set_keep_alive(keep_alive)
        // berth republishes everything on each connection itself.
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE)
        .set_inflight(MAX_IN_FLIGHT)
        .set_request_channel_capacity(usize::from(MAX_IN_FLIGHT))
        .set_last_will(LastWill::new(
            will_topic,
            last_will.to_string(),
            QoS::AtLeastOnce,
            true,
        ));

    match (&settings.username, &settings.password_file) {
        (Some(username), Some(path)) => {
            let password = read_text("password file", path)?;
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            options.set_credentials(username.clone(), password);
        }
        (Some(username), None) => {
            options.set_credentials(username.clone(), "");
        }
        (None, Some(_)) => return Err(MqttError::PasswordWithoutUsername),
        (None, None) => {}
    }

    if endpoint.tls {
        options.set_transport(Transport::tls_with_config(tls_config(settings)?));
    } else if settings.ca_file.is_some()
        || settings.cert_file.is_some()
        || settings.key_file.is_some()
    {
        // As in SPEC 3's own example: the files wait for an mqtts:// url.
        tracing::warn!("mqtt ca_file, cert_file and key_file are ignored: the url is not mqtts://");
    }
    Ok(options)
}

fn tls_config(settings: &MqttSettings) -> Result<TlsConfiguration, MqttError> {
    const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";
    const KEY: &str = "PRIVATE KEY-----";
    let ca = match &settings.ca_file {
        Some(path) => read_pem("CA file", path, CERTIFICATE, "certificate")?,
        None => {
            let path = SYSTEM_CA_BUNDLES
                .iter()
                .map(Path::new)
                .find(|path| path.is_file())
                .ok_or(MqttError::NoSystemCa)?;
            read_pem("system CA bundle", path, CERTIFICATE, "certificate")?
        }
    };
    let client_auth = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => Some((
            read_pem("client certificate", cert, CERTIFICATE, "certificate")?,
            read_pem("client key", key, KEY, "private key")?,
        )),
        (None, None) => None,
        _ => return Err(MqttError::HalfClientAuth),
    };
    Ok(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    })
}

fn read_text(what: &'static str, path: &Path) -> Result<String, MqttError> {
    std::fs::read_to_string(path).map_err(|source| MqttError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads a PEM file, checking that it holds what it should: a swapped or
/// empty file is reported here rather than on every connection attempt.
fn read_pem(
    what: &'static str,
    path: &Path,
    marker: &str,
    expected: &'static str,
) -> Result<Vec<u8>, MqttError> {
    let text = read_text(what, path)?;
    if !text.contains(marker) {
        return Err(MqttError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicUsize;

    use rumqttc::Publish;
    use serde_json::json;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::{BrokerHost, MqttEndpoint};

    const PREFIX: &str = "berth-test";
    /// Long enough for the reporter's back-off and a local broker; every
    /// wait below is bounded by it.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// How many ports a test tries before it gives up.
    const PORT_ATTEMPTS: usize = 5;

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.local_addr().expect("local address").port()
    }

    /// The port a broker was to listen on was taken between finding it
    /// free and binding it (tests run side by side): try another.
    #[derive(Debug)]
    struct PortTaken(u16);

    /// Runs `scenario` on a free port, again on another one each time a
    /// broker finds its port taken.
    async fn on_a_free_port<F, Fut>(scenario: F)
    where
        F: Fn(u16) -> Fut,
        Fut: std::future::Future<Output = Result<(), PortTaken>>,
    {
        let mut taken = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            match scenario(free_port()).await {
                Ok(()) => return,
                Err(PortTaken(port)) => taken.push(port),
            }
        }
        panic!("every port tried was taken before mosquitto could bind it: {taken:?}");
    }

    /// A Mosquitto broker on a port of its own, killed on drop.
    struct Broker {
        child: Child,
        port: u16,
        _log: tempfile::TempDir,
    }

    impl Broker {
        /// A broker on a free port, trying another when one is taken.
        async fn start_anywhere() -> Broker {
            let mut taken = Vec::new();
            for _ in 0..PORT_ATTEMPTS {
                match Broker::start(free_port()).await {
                    Ok(broker) => return broker,
                    Err(PortTaken(port)) => taken.push(port),
                }
            }
            panic!("every port tried was taken before mosquitto could bind it: {taken:?}");
        }

        /// A broker on `port`, once it says it is running: a connection
        /// that succeeds may be to whoever took the port meanwhile.
        async fn start(port: u16) -> Result<Broker, PortTaken> {
            let dir = tempfile::tempdir().expect("temp dir for the mosquitto log");
            let log_path = dir.path().join("mosquitto.log");
            let log = std::fs::File::create(&log_path).expect("create the mosquitto log");
            let mut child = ["mosquitto", "/usr/sbin/mosquitto"]
                .iter()
                .find_map(|program| {
                    match Command::new(program)
                        .args(["-p", &port.to_string()])
                        .stdin(Stdio::null())
                        .stdout(log.try_clone().expect("mosquitto log handle"))
                        .stderr(log.try_clone().expect("mosquitto log handle"))
                        .spawn()
                    {
                        Ok(child) => Some(child),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                        Err(e) => panic!("cannot start mosquitto: {e}"),
                    }
                })
                .expect("mosquitto is not installed: run scripts/setup.sh");
            let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            let deadline = Instant::now() + PATIENCE;
            loop {
                // Printed once every listener is bound.
                if read_log().contains(" running") {
                    return Ok(Broker {
                        child,
                        port,
                        _log: dir,
                    });
                }
                if let Some(status) = child.try_wait().expect("mosquitto status") {
                    let log = read_log();
                    if log.contains("Address already in use") {
                        return Err(PortTaken(port));
                    }
                    panic!("mosquitto -p {port} exited with {status}:\n{log}");
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("mosquitto -p {port} is not running:\n{}", read_log());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    impl Drop for Broker {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A TCP relay in front of the broker that can be cut, like a robot's
    /// Wi-Fi: while shut, it closes every connection at once.
    struct Gate {
        port: u16,
        open: Arc<AtomicBool>,
        links: Arc<Mutex<Vec<JoinHandle<()>>>>,
        accept: JoinHandle<()>,
    }

    impl Gate {
        async fn new(broker_port: u16) -> Gate {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let open = Arc::new(AtomicBool::new(false));
            let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
            let accept = tokio::spawn({
                let open = Arc::clone(&open);
                let links = Arc::clone(&links);
                async move {
                    loop {
                        let Ok((mut inbound, _)) = listener.accept().await else {
                            return;
                        };
                        if !open.load(Ordering::SeqCst) {
                            continue;
                        }
                        let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                        else {
                            continue;
                        };
                        links.lock().unwrap().push(tokio::spawn(async move {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }));
                    }
                }
            });
            Gate {
                port,
                open,
                links,
                accept,
            }
        }

        fn open(&self) {
            self.open.store(true, Ordering::SeqCst);
        }

        fn shut(&self) {
            self.open.store(false, Ordering::SeqCst);
            for link in self.links.lock().unwrap().drain(..) {
                link.abort();
            }
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.shut();
            self.accept.abort();
        }
    }

    /// A rumqttc client subscribed to a filter, handing over what it gets.
    struct Subscriber {
        messages: mpsc::UnboundedReceiver<Publish>,
        task: JoinHandle<()>,
    }

    static CLIENTS: AtomicUsize = AtomicUsize::new(0);

    impl Subscriber {
        async fn new(port: u16, filter: &str) -> Subscriber {
            let id = format!(
                "berth-test-sub-{}-{}",
                std::process::id(),
                CLIENTS.fetch_add(1, Ordering::Relaxed)
            );
            let (client, mut eventloop) =
                AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 10);
            client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
            let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
            let (tx, messages) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                let _client = client;
                let mut subscribed_tx = Some(subscribed_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = subscribed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            let _ = tx.send(publish);
                        }
                        Ok(_) => {}
                        Err(e) => panic!("test subscriber lost the broker: {e}"),
                    }
                }
            });
            tokio::time::timeout(PATIENCE, subscribed)
                .await
                .expect("no SubAck in time")
                .expect("subscriber task ended");
            Subscriber { messages, task }
        }

        async fn next(&mut self) -> Publish {
            tokio::time::timeout(PATIENCE, self.messages.recv())
                .await
                .expect("no message in time")
                .expect("subscriber task ended")
        }
    }

    impl Drop for Subscriber {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// The retained documents below a filter, as a fresh subscriber sees
    /// them: retained messages arrive right after the SubAck.
    async fn retained(port: u16, filter: &str) -> BTreeMap<String, Value> {
        let mut subscriber = Subscriber::new(port, filter).await;
        let mut documents = BTreeMap::new();
        while let Ok(Some(publish)) =
            tokio::time::timeout(Duration::from_millis(200), subscriber.messages.recv()).await
        {
            if publish.retain {
                documents.insert(
                    publish.topic,
                    serde_json::from_slice(&publish.payload).unwrap(),
                );
            }
        }
        documents
    }

    /// Waits until the retained documents below `filter` are `want`.
    async fn expect_retained(port: u16, filter: &str, want: &BTreeMap<String, Value>) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let got = retained(port, filter).await;
            if &got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "retained documents below {filter}:\n got {got:#?}\nwant {want:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn settings(port: u16, device_id: &str) -> MqttSettings {
        MqttSettings {
            endpoint: MqttEndpoint {
                tls: false,
                host: BrokerHost::Ip([127, 0, 0, 1].into()),
                port,
            },
            client_id: format!("berth-{device_id}-{}", std::process::id()),
            topic_prefix: PREFIX.to_owned(),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive: Duration::from_secs(5),
        }
    }

    fn path(device_id: &str, topic: &Topic) -> String {
        topic.path(PREFIX, device_id)
    }

    fn all(device_id: &str) -> String {
        format!("{PREFIX}/{device_id}/#")
    }

    fn start(port: u16, device_id: &str, tracker: &TaskTracker) -> MqttReporter {
        MqttReporter::start(
            &settings(port, device_id),
            device_id,
            offline_doc(),
            CancellationToken::new(),
            tracker,
        )
        .expect("start reporter")
    }

    fn online(n: u32) -> Value {
        json!({"state": "online", "n": n})
    }

    fn deployment(id: &str, n: u32) -> (Topic, Value) {
        (
            Topic::Deployment(id.to_owned()),
            json!({"deployment_id": id, "restart_count": n}),
        )
    }

    #[tokio::test]
    async fn documents_published_before_the_broker_starts_arrive_retained_latest_only() {
        on_a_free_port(documents_published_before_the_broker_starts).await;
    }

    async fn documents_published_before_the_broker_starts(port: u16) -> Result<(), PortTaken> {
        let device = "retained-before-broker";
        let tracker = TaskTracker::new();
        let reporter = start(port, device, &tracker);

        let (talker, talker_old) = deployment("talker", 1);
        let (_, talker_new) = deployment("talker", 2);
        let (map, map_doc) = deployment("map-server", 0);
        reporter.publish(Topic::Agent, online(1));
        reporter.publish(talker.clone(), talker_old.clone());
        reporter.publish(map.clone(), map_doc.clone());
        reporter.publish(talker.clone(), talker_new.clone());
        reporter.publish(Topic::RosMaster, json!({"owner": "talker"}));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!reporter.connected());

        let broker = match Broker::start(port).await {
            Ok(broker) => broker,
            Err(taken) => {
                reporter.shutdown().await;
                return Err(taken);
            }
        };
        // Subscribed as early as possible: live or retained, the older
        // talker document must never show up.
        let mut watcher = Subscriber::new(broker.port, &path(device, &talker)).await;
        let want = BTreeMap::from([
            (path(device, &Topic::Agent), online(1)),
            (path(device, &talker), talker_new.clone()),
            (path(device, &map), map_doc),
            (path(device, &Topic::RosMaster), json!({"owner": "talker"})),
        ]);
        expect_retained(broker.port, &all(device), &want).await;
        assert!(reporter.connected());
        let first = watcher.next().await;
        assert_eq!(
            serde_json::from_slice::<Value>(&first.payload).unwrap(),
            talker_new
        );
        assert!(
            watcher.messages.try_recv().is_err(),
            "the talker document was published more than once"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_restarted_broker_gets_every_latest_document_again() {
        on_a_free_port(a_restarted_broker_gets_every_latest_document).await;
    }

    async fn a_restarted_broker_gets_every_latest_document(port: u16) -> Result<(), PortTaken> {
        let device = "broker-restart";
        let tracker = TaskTracker::new();
        let broker = Broker::start(port).await?;
        let reporter = start(port, device, &tracker);

        let (talker, _) = deployment("talker", 0);
        let (map, map_doc) = deployment("map-server", 0);
        reporter.publish(Topic::Agent, online(1));
        reporter.publish(map.clone(), map_doc.clone());
        reporter.publish(talker.clone(), deployment("talker", 0).1);
        let before = BTreeMap::from([
            (path(device, &Topic::Agent), online(1)),
            (path(device, &map), map_doc.clone()),
            (path(device, &talker), deployment("talker", 0).1),
        ]);
        expect_retained(port, &all(device), &before).await;

        // Mosquitto runs without persistence: the restart forgets every
        // retained document, so only a republish brings them back.
        drop(broker);
        until("the reporter sees the broker gone", || {
            !reporter.connected()
        })
        .await;
        reporter.publish(talker.clone(), deployment("talker", 1).1);
        reporter.publish(talker.clone(), deployment("talker", 2).1);
        let broker = match Broker::start(port).await {
            Ok(broker) => broker,
            Err(taken) => {
                reporter.shutdown().await;
                return Err(taken);
            }
        };
        reporter.publish(Topic::Agent, online(2));

        let after = BTreeMap::from([
            (path(device, &Topic::Agent), online(2)),
            (path(device, &map), map_doc),
            (path(device, &talker), deployment("talker", 2).1),
        ]);
        expect_retained(broker.port, &all(device), &after).await;
        assert!(reporter.connected());
        reporter.shutdown().await;
        Ok(())
    }

    /// `mqtt://[::1]:port`: the reporter reaches a broker by its IPv6
    /// address, as config validation gives it.
    #[tokio::test]
    async fn an_ipv6_broker_is_reached() {
        let device = "ipv6";
        let broker = Broker::start_anywhere().await;
        let tracker = TaskTracker::new();
        let mut s = settings(broker.port, device);
        s.endpoint = format!("mqtt://[::1]:{}", broker.port).parse().unwrap();
        let reporter = MqttReporter::start(
            &s,
            device,
            offline_doc(),
            CancellationToken::new(),
            &tracker,
        )
        .expect("start reporter");
        reporter.publish(Topic::Agent, online(1));
        let agent = path(device, &Topic::Agent);
        expect_retained(
            broker.port,
            &agent,
            &BTreeMap::from([(agent.clone(), online(1))]),
        )
        .await;
        assert!(reporter.connected());
        reporter.shutdown().await;
    }

    #[tokio::test]
    async fn the_last_will_marks_the_device_offline_when_berth_vanishes() {
        let device = "last-will";
        let broker = Broker::start_anywhere().await;
        let agent = path(device, &Topic::Agent);

        // The reporter runs on a runtime of its own, dropped without any
        // goodbye: its task and socket vanish as in a crash.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let tracker = TaskTracker::new();
        let reporter = {
            let _context = runtime.enter();
            start(broker.port, device, &tracker)
        };
        reporter.publish(Topic::Agent, online(1));
        let want = BTreeMap::from([(agent.clone(), online(1))]);
        expect_retained(broker.port, &agent, &want).await;

        tokio::task::spawn_blocking(move || drop(runtime))
            .await
            .unwrap();
        let want = BTreeMap::from([(
            agent.clone(),
            json!({"state": "offline", "error_code": "DEP_E151"}),
        )]);
        expect_retained(broker.port, &agent, &want).await;
    }

    #[tokio::test]
    async fn a_clean_shutdown_publishes_the_offline_document_itself() {
        let device = "clean-shutdown";
        let broker = Broker::start_anywhere().await;
        let agent = path(device, &Topic::Agent);
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        // A will that differs from the offline document tells them apart.
        let will = json!({"state": "offline", "error_code": "DEP_E151", "by": "will"});
        let reporter = MqttReporter::start(
            &settings(broker.port, device),
            device,
            will,
            shutdown.clone(),
            &tracker,
        )
        .unwrap();
        reporter.publish(Topic::Agent, online(1));
        let (talker, talker_doc) = deployment("talker", 3);
        reporter.publish(talker.clone(), talker_doc.clone());
        expect_retained(
            broker.port,
            &agent,
            &BTreeMap::from([(agent.clone(), online(1))]),
        )
        .await;

        // The supervisor's way: cancel the token, wait for the tracker.
        shutdown.cancel();
        tracker.close();
        tokio::time::timeout(GOODBYE_TIMEOUT + Duration::from_secs(1), tracker.wait())
            .await
            .expect("the reporter did not stop in time");
        assert!(!reporter.connected());
        // Acknowledged before the task ended: no waiting needed.
        let got = retained(broker.port, &all(device)).await;
        assert_eq!(
            got,
            BTreeMap::from([
                (agent.clone(), offline_doc()),
                (path(device, &talker), talker_doc)
            ])
        );
        // What comes after the goodbye is not published.
        reporter.publish(Topic::Agent, online(2));
        reporter.shutdown().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(retained(broker.port, &agent).await[&agent], offline_doc());
    }

    #[tokio::test]
    async fn shutdown_without_a_broker_returns_at_once() {
        let tracker = TaskTracker::new();
        let reporter = start(free_port(), "no-broker", &tracker);
        reporter.publish(Topic::Agent, online(1));
        tokio::time::sleep(Duration::from_millis(150)).await;
        tokio::time::timeout(Duration::from_millis(500), reporter.shutdown())
            .await
            .expect("shutdown waited for an unreachable broker");
    }

    #[tokio::test]
    async fn events_wait_for_the_connection_and_are_not_retained() {
        let device = "events";
        let broker = Broker::start_anywhere().await;
        let gate = Gate::new(broker.port).await;
        let events = path(device, &Topic::Events);
        let mut subscriber = Subscriber::new(broker.port, &events).await;
        let tracker = TaskTracker::new();
        let reporter = start(gate.port, device, &tracker);

        for n in 0..5 {
            reporter.publish(Topic::Events, json!({"n": n}));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!reporter.connected());
        assert!(subscriber.messages.try_recv().is_err());

        gate.open();
        for n in 0..5 {
            let publish = subscriber.next().await;
            assert_eq!(publish.topic, events);
            assert!(!publish.retain);
            assert_eq!(
                serde_json::from_slice::<Value>(&publish.payload).unwrap(),
                json!({"n": n})
            );
        }

        // Cut while connected: what is published meanwhile waits again.
        // Delivery is at least once: an event whose acknowledgement the cut
        // swallowed comes again, in order, before the new one.
        gate.shut();
        until("the reporter sees the cut", || !reporter.connected()).await;
        reporter.publish(Topic::Events, json!({"n": 5}));
        gate.open();
        let mut last = None;
        while last != Some(5) {
            let publish = subscriber.next().await;
            let n = serde_json::from_slice::<Value>(&publish.payload).unwrap()["n"]
                .as_u64()
                .unwrap();
            assert!(last.is_none_or(|last| n > last), "{n} after {last:?}");
            last = Some(n);
        }
        assert!(retained(broker.port, &events).await.is_empty());
    }

    #[test]
    fn the_event_queue_keeps_the_newest() {
        let mut pending = Pending::default();
        for n in 0..MAX_QUEUED_EVENTS + 5 {
            pending.push_event(json!(n));
        }
        assert_eq!(pending.events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(pending.events.front(), Some(&json!(5)));
        assert_eq!(pending.dropped, 5);

        // Unacknowledged events go back in front, oldest first, and the
        // bound still holds.
        let mut pending = Pending::default();
        pending.push_event(json!("c"));
        pending.requeue_events(vec![json!("a"), json!("b")]);
        assert_eq!(
            Vec::from(pending.events.clone()),
            [json!("a"), json!("b"), json!("c")]
        );
    }

    #[test]
    fn a_retained_topic_keeps_its_latest_document() {
        let mut pending = Pending::default();
        pending.set_latest(Topic::Agent, json!(1));
        pending.set_latest(Topic::Agent, json!(2));
        assert_eq!(pending.latest[&Topic::Agent], json!(2).to_string());
        assert_eq!(pending.dirty.len(), 1);
    }

    fn temp_file(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .and_then(|mut file| file.write_all(content.as_bytes()))
            .unwrap();
        path
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

    #[test]
    fn options_carry_identity_will_and_limits() {
        let mut s = settings(1883, "robot-42");
        s.keep_alive = Duration::from_secs(30);
        let options = options(&s, "robot-42", &offline_doc()).unwrap();
        assert_eq!(options.broker_address(), ("127.0.0.1".to_owned(), 1883));
        assert_eq!(options.client_id(), s.client_id);
        assert_eq!(options.keep_alive(), Duration::from_secs(30));
        assert!(options.clean_session());
        assert_eq!(options.max_packet_size(), MAX_PACKET_SIZE);
        assert_eq!(
            options.request_channel_capacity(),
            usize::from(MAX_IN_FLIGHT)
        );
        assert_eq!(options.inflight(), MAX_IN_FLIGHT);
        assert!(options.credentials().is_none());
        assert!(matches!(options.transport(), Transport::Tcp));
        let will = options.last_will().unwrap();
        assert_eq!(will.topic, "berth-test/robot-42/agent");
        assert_eq!(will.qos, QoS::AtLeastOnce);
        assert!(will.retain);
        assert_eq!(
            serde_json::from_slice::<Value>(&will.message).unwrap(),
            json!({"state": "offline", "error_code": "DEP_E151"})
        );
    }

    #[test]
    fn the_password_comes_from_its_file_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(1883, "robot-42");
        s.username = Some("robot-42".to_owned());
        s.password_file = Some(temp_file(&dir, "mqtt", "s3cret pass\n"));
        let login = options(&s, "robot-42", &offline_doc())
            .unwrap()
            .credentials()
            .unwrap();
        assert_eq!(login.username, "robot-42");
        assert_eq!(login.password, "s3cret pass");

        s.password_file = Some(temp_file(&dir, "crlf", "s3cret\r\n"));
        let login = options(&s, "robot-42", &offline_doc())
            .unwrap()
            .credentials()
            .unwrap();
        assert_eq!(login.password, "s3cret");

        let missing = dir.path().join("missing");
        s.password_file = Some(missing.clone());
        let error = options(&s, "robot-42", &offline_doc()).unwrap_err();
        assert!(matches!(&error, MqttError::ReadFile { path, .. } if *path == missing));
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );

        s.username = None;
        s.password_file = Some(temp_file(&dir, "mqtt", "s3cret\n"));
        assert!(matches!(
            options(&s, "robot-42", &offline_doc()),
            Err(MqttError::PasswordWithoutUsername)
        ));
    }

    #[test]
    fn the_password_never_shows() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(free_port(), "robot-42");
        s.username = Some("robot-42".to_owned());
        s.password_file = Some(temp_file(&dir, "mqtt", "hunter2-secret\n"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _context = runtime.enter();
        let reporter = MqttReporter::start(
            &s,
            "robot-42",
            offline_doc(),
            CancellationToken::new(),
            &TaskTracker::new(),
        )
        .unwrap();
        assert!(!format!("{reporter:?}").contains("hunter2"));
    }

    #[test]
    fn tls_options_use_the_ca_and_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(8883, "robot-42");
        s.endpoint = "mqtts://broker.example.com".parse().unwrap();
        s.ca_file = Some(temp_file(&dir, "ca.pem", CERT));
        let Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn,
            client_auth,
        }) = options(&s, "robot-42", &offline_doc()).unwrap().transport()
        else {
            panic!("mqtts:// without TLS");
        };
        assert_eq!(ca, CERT.as_bytes());
        assert_eq!(alpn, None);
        assert_eq!(client_auth, None);

        s.cert_file = Some(temp_file(&dir, "client.pem", CERT));
        s.key_file = Some(temp_file(&dir, "client.key", KEY));
        let options = options(&s, "robot-42", &offline_doc()).unwrap();
        assert_eq!(
            options.broker_address(),
            ("broker.example.com".to_owned(), 8883)
        );
        let Transport::Tls(TlsConfiguration::Simple { client_auth, .. }) = options.transport()
        else {
            panic!("mqtts:// without TLS");
        };
        assert_eq!(
            client_auth,
            Some((CERT.as_bytes().to_vec(), KEY.as_bytes().to_vec()))
        );
    }

    #[test]
    fn tls_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(8883, "robot-42");
        s.endpoint = "mqtts://broker.example.com".parse().unwrap();
        let check = |s: &MqttSettings| options(s, "robot-42", &offline_doc()).map(drop);

        let missing = dir.path().join("ca.pem");
        s.ca_file = Some(missing.clone());
        assert!(matches!(
            check(&s),
            Err(MqttError::ReadFile { what: "CA file", path, .. }) if path == missing
        ));

        // A key where the CA should be.
        let swapped = temp_file(&dir, "swapped.pem", KEY);
        s.ca_file = Some(swapped.clone());
        let error = check(&s).unwrap_err();
        assert!(matches!(&error, MqttError::NotPem { path, .. } if *path == swapped));
        assert!(error.to_string().contains("swapped.pem"), "{error}");

        s.ca_file = Some(temp_file(&dir, "ca.pem", CERT));
        s.cert_file = Some(temp_file(&dir, "client.pem", CERT));
        assert!(matches!(check(&s), Err(MqttError::HalfClientAuth)));
        s.key_file = Some(temp_file(&dir, "client.key", CERT));
        assert!(matches!(
            check(&s),
            Err(MqttError::NotPem {
                what: "client key",
                ..
            })
        ));

        // TLS files with a plain url are ignored (with a warning), as
        // `check-config` accepts them.
        s.endpoint = "mqtt://broker.example.com".parse().unwrap();
        s.cert_file = None;
        s.key_file = None;
        assert!(check(&s).is_ok());
    }

    #[test]
    fn settings_rumqttc_would_panic_on_are_errors() {
        let mut s = settings(1883, "robot-42");
        s.keep_alive = Duration::from_millis(500);
        assert!(matches!(
            options(&s, "robot-42", &offline_doc()),
            Err(MqttError::KeepAlive(_))
        ));
        s.keep_alive = Duration::ZERO;
        assert!(options(&s, "robot-42", &offline_doc()).is_ok());
        s.topic_prefix = "berth/+".to_owned();
        assert!(matches!(
            options(&s, "robot-42", &offline_doc()),
            Err(MqttError::Topic(_))
        ));
    }

    #[test]
    fn error_chains_skip_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(error_chain(&ConnectionError::Io(io)), "I/O: refused");
        let error = MqttError::ReadFile {
            what: "CA file",
            path: PathBuf::from("/etc/berth/ca.pem"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
        };
        assert_eq!(
            error_chain(&error),
            "cannot read the mqtt CA file /etc/berth/ca.pem: not found"
        );
    }
}
