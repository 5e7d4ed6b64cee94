//! `berth fleet`: the operator's side of SPEC 10, in the same binary. It
//! talks to a broker only (the fleet's central one, or any broker of a
//! bridge tree), never to a server of berth's own.
//!
//! - [`collect`] reads the retained `agent` and `deployments/+` documents of
//!   every device under a prefix; [`render`] prints them as one table
//!   (devices, then deployments with those in `Error` first), [`to_json`]
//!   as documents. A broker sends every retained message that matches a
//!   subscription right after acknowledging it, back to back; the view is
//!   complete once that burst is over, which [`collect`] takes to be
//!   [`QUIET`] without a message (the burst itself has no end marker in
//!   MQTT 3.1.1).
//! - [`send_command`] signs a command with the operator's ed25519 key,
//!   publishes it on `commands/<name>`, and waits for its reply on
//!   `replies/<request_id>`.
//!
//! This is the one file besides `report/mqtt.rs` that speaks MQTT (rumqttc):
//! the daemon's reporter and the operator's client have nothing else in
//! common.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::remote::{keys, signed_message, CommandName, Envelope, Reply};
use crate::report::timestamp;

/// The end of the retained burst: this long without a message.
pub const QUIET: Duration = Duration::from_millis(300);
/// The longest a collection runs, however chatty the broker is.
const MAX_COLLECT: Duration = Duration::from_secs(30);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the command's own timeout the reply is still awaited.
const REPLY_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Url(String),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the broker {broker}: {message}")]
    Broker { broker: String, message: String },
    #[error("the broker {broker} refused the subscription to {filter}; check the account's ACL")]
    SubscribeRefused { broker: String, filter: String },
    #[error(transparent)]
    Key(#[from] keys::KeyError),
}

/// Where the broker is and how to log in.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub url: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// For `mqtts://`: the CA of the broker's certificate (else the system's).
    pub ca_file: Option<PathBuf>,
}

/// What the broker holds about every device under a prefix.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fleet {
    pub devices: BTreeMap<String, Device>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Device {
    pub agent: Option<Value>,
    pub deployments: BTreeMap<String, Value>,
}

impl Fleet {
    /// Takes in one retained message; returns whether anything changed.
    pub fn apply(&mut self, prefix: &str, topic: &str, payload: &[u8]) -> bool {
        let Some(rest) = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        // An empty payload clears a retained topic.
        let doc = if payload.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Value>(payload) {
                Ok(doc) => Some(doc),
                Err(_) => return false,
            }
        };
        match (parts.as_slice(), doc) {
            ([device, "agent"], doc) => {
                let entry = self.devices.entry(device.to_string()).or_default();
                let changed = entry.agent != doc;
                entry.agent = doc;
                changed
            }
            ([device, "deployments", id], Some(doc)) => {
                let entry = self.devices.entry(device.to_string()).or_default();
                entry.deployments.insert(id.to_string(), doc.clone()) != Some(doc)
            }
            ([device, "deployments", id], None) => self
                .devices
                .get_mut(*device)
                .is_some_and(|d| d.deployments.remove(*id).is_some()),
            _ => false,
        }
    }
}

fn mqtt_options(broker: &BrokerOptions, client_id: &str) -> Result<MqttOptions, FleetError> {
    let endpoint: crate::config::MqttEndpoint = broker
        .url
        .parse()
        .map_err(|e: crate::config::MqttUrlError| FleetError::Url(e.to_string()))?;
    let mut options = MqttOptions::new(client_id, endpoint.connect_host(), endpoint.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(username) = &broker.username {
        let password = match &broker.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| FleetError::Read {
                    path: path.clone(),
                    source,
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            None => String::new(),
        };
        options.set_credentials(username.clone(), password);
    }
    if endpoint.tls {
        let ca_path = broker
            .ca_file
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
        let ca = std::fs::read(&ca_path).map_err(|source| FleetError::Read {
            path: ca_path,
            source,
        })?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        }));
    }
    Ok(options)
}

fn client_id(what: &str) -> String {
    format!("berth-fleet-{what}-{}", random_hex(6))
}

/// `n` random bytes from /dev/urandom, in hex (the time and pid if it
/// cannot be read).
fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return format!("{nanos:x}{:x}", std::process::id());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A connection with its subscriptions acknowledged.
struct Session {
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
    broker: String,
    /// Messages that came before the subscription was acknowledged.
    early: std::collections::VecDeque<rumqttc::Publish>,
}

impl Session {
    async fn open(
        broker: &BrokerOptions,
        what: &str,
        filters: &[String],
        qos: QoS,
    ) -> Result<Session, FleetError> {
        let options = mqtt_options(broker, &client_id(what))?;
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let fail = |message: String| FleetError::Broker {
            broker: broker.url.clone(),
            message,
        };
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut early = std::collections::VecDeque::new();
        loop {
            let event = tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .map_err(|_| fail("no answer in time".into()))?
                .map_err(|e| fail(e.to_string()))?;
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    // One SUBSCRIBE for all filters: one acknowledgement.
                    let filters = filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos));
                    client
                        .subscribe_many(filters)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                }
                Event::Incoming(Packet::Publish(publish)) => early.push_back(publish),
                Event::Incoming(Packet::SubAck(ack)) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        return Err(FleetError::SubscribeRefused {
                            broker: broker.url.clone(),
                            filter: filters.join(" "),
                        });
                    }
                    return Ok(Session {
                        client,
                        eventloop,
                        broker: broker.url.clone(),
                        early,
                    });
                }
                _ => {}
            }
        }
    }

    /// The next incoming publish, or `None` at `deadline`.
    async fn next_publish(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<rumqttc::Publish>, FleetError> {
        if let Some(publish) = self.early.pop_front() {
            return Ok(Some(publish));
        }
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Ok(Some(p)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(FleetError::Broker {
                        broker: self.broker.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
    }
}

fn fleet_filters(prefix: &str) -> Vec<String> {
    vec![
        format!("{prefix}/+/agent"),
        format!("{prefix}/+/deployments/+"),
    ]
}

/// Reads the retained documents of every device under `prefix`, until the
/// retained burst is over (see the module's note).
pub async fn collect(broker: &BrokerOptions, prefix: &str) -> Result<Fleet, FleetError> {
    // QoS 0: the broker sends retained messages at the lower of the two
    // QoS, so no acknowledgement per document slows the burst down.
    let mut session =
        Session::open(broker, "view", &fleet_filters(prefix), QoS::AtMostOnce).await?;
    let mut fleet = Fleet::default();
    let end = Instant::now() + MAX_COLLECT;
    loop {
        let quiet = (Instant::now() + QUIET).min(end);
        match session.next_publish(quiet).await? {
            Some(publish) => {
                fleet.apply(prefix, &publish.topic, &publish.payload);
            }
            None => break,
        }
    }
    let _ = session.client.try_disconnect();
    Ok(fleet)
}

/// Keeps the view current: calls `draw` with the whole fleet after the
/// retained burst, then after every change (at most every 200 ms). Runs
/// until the broker is lost or `draw` returns false.
pub async fn watch(
    broker: &BrokerOptions,
    prefix: &str,
    mut draw: impl FnMut(&Fleet) -> bool,
) -> Result<(), FleetError> {
    let mut session =
        Session::open(broker, "watch", &fleet_filters(prefix), QoS::AtMostOnce).await?;
    let mut fleet = Fleet::default();
    let mut dirty = true;
    let mut burst_over = false;
    loop {
        let wait = if burst_over && !dirty {
            Instant::now() + Duration::from_secs(3600)
        } else {
            Instant::now()
                + if burst_over {
                    Duration::from_millis(200)
                } else {
                    QUIET
                }
        };
        match session.next_publish(wait).await? {
            Some(publish) => {
                dirty |= fleet.apply(prefix, &publish.topic, &publish.payload);
            }
            None => {
                burst_over = true;
                if dirty {
                    dirty = false;
                    if !draw(&fleet) {
                        return Ok(());
                    }
                }
            }
        }
    }
}

// --- output ------------------------------------------------------------------------

/// `{"devices": [{"device_id", "agent", "deployments": [ … ]}]}`.
pub fn to_json(fleet: &Fleet) -> Value {
    let devices: Vec<Value> = fleet
        .devices
        .iter()
        .map(|(id, d)| {
            json!({
                "device_id": id,
                "agent": d.agent,
                "deployments": d.deployments.values().collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "devices": devices })
}

fn text(doc: &Value, name: &str) -> String {
    match doc.get(name) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
        Some(other) => other.to_string(),
    }
}

fn columns(rows: &[Vec<String>]) -> Vec<String> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count()));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

/// The fleet as one table: every device (online or offline, since when,
/// its deployments, restarts and errors), then every deployment, those in
/// `Error` first.
pub fn render(fleet: &Fleet) -> String {
    if fleet.devices.is_empty() {
        return "no devices on this broker under this prefix\n".to_string();
    }
    let mut rows = vec![[
        "DEVICE",
        "STATE",
        "SINCE",
        "DOCKER",
        "DEPLOYMENTS",
        "ERRORS",
        "RESTARTS",
    ]
    .map(str::to_string)
    .to_vec()];
    for (id, device) in &fleet.devices {
        let agent = device.agent.clone().unwrap_or(Value::Null);
        let state = match agent.get("state").and_then(Value::as_str) {
            Some("online") => "online".to_string(),
            Some(other) => format!("{other} ({})", text(&agent, "error_code")),
            None => "unknown".to_string(),
        };
        let errors = device
            .deployments
            .values()
            .filter(|d| d["status"] == "Error")
            .count();
        let restarts: u64 = device
            .deployments
            .values()
            .filter_map(|d| d["restart_count"].as_u64())
            .sum();
        rows.push(vec![
            id.clone(),
            state,
            text(&agent, "since"),
            text(&agent, "docker"),
            device.deployments.len().to_string(),
            errors.to_string(),
            restarts.to_string(),
        ]);
    }
    let mut lines = columns(&rows);
    let mut deployments: Vec<(&String, &Value)> = fleet
        .devices
        .iter()
        .flat_map(|(id, d)| d.deployments.values().map(move |doc| (id, doc)))
        .collect();
    // Error first; then by device and id (the order of the map).
    deployments.sort_by_key(|(_, doc)| doc["status"] != "Error");
    if !deployments.is_empty() {
        let mut rows = vec![[
            "DEVICE",
            "DEPLOYMENT",
            "PHASE",
            "STATUS",
            "RESTARTS",
            "ERROR",
            "REASON",
        ]
        .map(str::to_string)
        .to_vec()];
        for (device, doc) in deployments {
            rows.push(vec![
                device.clone(),
                text(doc, "deployment_id"),
                text(doc, "phase"),
                text(doc, "status"),
                text(doc, "restart_count"),
                text(doc, "error_code"),
                text(doc, "reason"),
            ]);
        }
        lines.push(String::new());
        lines.extend(columns(&rows));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

// --- commands ----------------------------------------------------------------------

/// What `berth fleet apply|remove|restart|stop|start` sends.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub device: String,
    pub prefix: String,
    pub command: CommandName,
    pub payload: String,
    pub key_file: PathBuf,
    /// The trusted key's name on the devices: `<key_id>.pem`.
    pub key_id: String,
    /// The `timeout_secs` of the envelope.
    pub timeout: Duration,
}

/// The envelope of `request`, signed with `key`.
pub fn envelope(
    request: &CommandRequest,
    key: &ed25519_dalek::SigningKey,
    request_id: String,
    issued_at: SystemTime,
) -> Envelope {
    let mut envelope = Envelope {
        request_id,
        issued_at: timestamp(issued_at),
        payload: request.payload.clone(),
        key_id: request.key_id.clone(),
        signature: String::new(),
        timeout_secs: Some(request.timeout.as_secs()),
    };
    let message = signed_message(&request.device, request.command, &envelope);
    envelope.signature = keys::sign(key, &message);
    envelope
}

/// Signs and publishes a command, then waits for its reply; `Ok(None)`
/// when none came in time.
pub async fn send_command(
    broker: &BrokerOptions,
    request: &CommandRequest,
) -> Result<Option<Reply>, FleetError> {
    let key = keys::signing_key(&request.key_file)?;
    let request_id = format!("{}-{}", timestamp_id(), random_hex(8));
    let reply_topic = format!("{}/{}/replies/{request_id}", request.prefix, request.device);
    let mut session = Session::open(
        broker,
        "cmd",
        std::slice::from_ref(&reply_topic),
        QoS::AtLeastOnce,
    )
    .await?;
    let envelope = envelope(request, &key, request_id.clone(), SystemTime::now());
    let topic = format!(
        "{}/{}/commands/{}",
        request.prefix, request.device, request.command
    );
    session
        .client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&envelope).expect("envelopes serialize"),
        )
        .await
        .map_err(|e| FleetError::Broker {
            broker: broker.url.clone(),
            message: e.to_string(),
        })?;
    let deadline = Instant::now() + request.timeout + REPLY_MARGIN;
    while let Some(publish) = session.next_publish(deadline).await? {
        if publish.topic != reply_topic {
            continue;
        }
        if let Ok(reply) = serde_json::from_slice::<Reply>(&publish.payload) {
            let _ = session.client.try_disconnect();
            return Ok(Some(reply));
        }
    }
    let _ = session.client.try_disconnect();
    Ok(None)
}

/// `20261128T160000Z`-like, so request ids sort by time in logs.
fn timestamp_id() -> String {
    timestamp(SystemTime::now())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_documents_build_the_fleet_and_empty_payloads_clear_them() {
        let mut fleet = Fleet::default();
        let online =
            br#"{"state":"online","since":"2026-11-28T16:00:00.000Z","docker":"connected"}"#;
        assert!(fleet.apply("berth", "berth/r1/agent", online));
        assert!(
            !fleet.apply("berth", "berth/r1/agent", online),
            "same document"
        );
        let doc = br#"{"deployment_id":"a","status":"Running","restart_count":2}"#;
        assert!(fleet.apply("berth", "berth/r1/deployments/a", doc));
        let err = br#"{"deployment_id":"b","status":"Error","error_code":"DEP_E152","restart_count":1,"reason":"main/app: exited"}"#;
        assert!(fleet.apply("berth", "berth/r2/deployments/b", err));
        assert!(
            !fleet.apply("other", "berth/r3/agent", online),
            "another prefix"
        );
        assert!(
            !fleet.apply("berth", "berth/r3/events", b"{}"),
            "not a retained topic"
        );
        assert_eq!(fleet.devices.len(), 2);

        let table = render(&fleet);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("DEVICE"), "{table}");
        assert!(
            lines[1].starts_with("r1") && lines[1].contains("online"),
            "{table}"
        );
        assert!(lines[1].contains("2026-11-28T16:00:00.000Z"), "{table}");
        assert!(
            lines[2].starts_with("r2") && lines[2].contains("unknown"),
            "{table}"
        );
        // The deployments: the one in Error first.
        let first = lines
            .iter()
            .skip(1)
            .position(|l| l.starts_with("DEVICE"))
            .unwrap()
            + 2;
        assert!(
            lines[first].starts_with("r2") && lines[first].contains("DEP_E152"),
            "{table}"
        );
        assert!(lines[first + 1].starts_with("r1"), "{table}");

        assert!(fleet.apply("berth", "berth/r1/deployments/a", b""));
        assert!(fleet.devices["r1"].deployments.is_empty());
        let json = to_json(&fleet);
        assert_eq!(json["devices"][0]["device_id"], "r1");
        assert_eq!(json["devices"][1]["deployments"][0]["deployment_id"], "b");
    }

    #[test]
    fn an_envelope_verifies_on_the_device_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = keys::keygen(dir.path(), "ops").unwrap();
        let key = keys::signing_key(&private).unwrap();
        let request = CommandRequest {
            device: "robot-1".into(),
            prefix: "berth".into(),
            command: CommandName::Restart,
            payload: "talker".into(),
            key_file: private,
            key_id: "ops".into(),
            timeout: Duration::from_secs(30),
        };
        let now = SystemTime::now();
        let envelope = envelope(&request, &key, "req-1".into(), now);
        let state = tempfile::tempdir().unwrap();
        let mut verifier = crate::remote::Verifier::new(
            "robot-1",
            dir.path(),
            crate::remote::SeenRequests::open(state.path()),
        );
        verifier
            .verify(CommandName::Restart, &envelope, now)
            .unwrap();
        let mut other = crate::remote::Verifier::new(
            "robot-2",
            dir.path(),
            crate::remote::SeenRequests::open(state.path()),
        );
        assert!(matches!(
            other.verify(CommandName::Restart, &envelope, now),
            Err(crate::remote::Refusal::BadSignature(_))
        ));
    }
}
