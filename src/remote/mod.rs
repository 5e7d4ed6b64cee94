//! Remote commands (SPEC 10): the signed envelope, its verification, and
//! what each command does on the device.
//!
//! A command arrives on `<prefix>/<device>/commands/<name>` as a JSON
//! [`Envelope`]. [`Verifier::verify`] checks, in this order, that it is
//! signed, that the key is one of `trusted_keys_dir`, that the ed25519
//! signature covers `<device_id>\n<command>\n<request_id>\n<issued_at>\n<payload>`,
//! that it is neither older than five minutes nor from the future, and that
//! its request id was not seen before ([`replay::SeenRequests`], kept in
//! `state_dir` across restarts). `files` then checks an `apply` against the
//! `[remote]` limits and validates it as `check-config` does before writing
//! it; `service` is the daemon's task that ties these to the MQTT reporter
//! and to the supervisor's operator actions.
//!
//! Nothing here logs a payload or a signature: only request ids, command
//! names and key ids.

pub mod files;
pub mod keys;
pub mod replay;
pub mod service;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier as _};
use serde::{Deserialize, Serialize};

pub use replay::SeenRequests;

/// A command older than this is refused (SPEC 10).
pub const MAX_AGE: Duration = Duration::from_secs(5 * 60);
/// How far in the future `issued_at` may be: the clocks of the operator's
/// machine and of the robot never agree exactly. A few seconds, no more: a
/// command "from the future" could otherwise be kept and replayed later.
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(5);
/// How long berth waits for an `apply` or `remove` to take effect before it
/// replies anyway, unless the command names its own `timeout_secs`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest `timeout_secs` a command may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The most characters of a value from a command that a refusal quotes. A
/// refusal is an `error` event and the command's one reply, and berth
/// publishes at most 256 KiB in one message: quoting the input whole (a
/// `key_id` of 250 KB) made a reply too large to publish, so the command
/// got none.
pub const QUOTE_MAX: usize = 64;
/// The longest refusal message, whatever it holds (a deployment file's
/// errors): what is cut is marked.
pub const MESSAGE_MAX: usize = 4096;

/// `text`, cut to at most `max` characters; a cut is marked with `…`.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// A value from a command as a refusal quotes it: [`clip`] to
/// [`QUOTE_MAX`].
pub fn quote(text: &str) -> String {
    clip(text, QUOTE_MAX)
}

/// The command names of SPEC 10, the last level of `commands/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandName {
    Apply,
    Remove,
    Restart,
    Stop,
    Start,
}

impl CommandName {
    pub const ALL: [CommandName; 5] = [
        CommandName::Apply,
        CommandName::Remove,
        CommandName::Restart,
        CommandName::Stop,
        CommandName::Start,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Apply => "apply",
            CommandName::Remove => "remove",
            CommandName::Restart => "restart",
            CommandName::Stop => "stop",
            CommandName::Start => "start",
        }
    }

    pub fn parse(name: &str) -> Option<CommandName> {
        CommandName::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for CommandName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A remote command, exactly as it travels (SPEC 10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub request_id: String,
    /// RFC 3339, UTC.
    pub issued_at: String,
    /// `apply`: the deployment file's TOML text; `remove`: the deployment
    /// id; `restart`, `stop`, `start`: the deployment id or
    /// `deployment/component/executable`.
    pub payload: String,
    /// Names `<trusted_keys_dir>/<key_id>.pem`; empty when unsigned.
    #[serde(default)]
    pub key_id: String,
    /// Standard base64 of the ed25519 signature; empty when unsigned.
    #[serde(default)]
    pub signature: String,
    /// Bounds the wait for the reply of an `apply` or `remove`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// The bytes a command's signature covers.
pub fn signed_message(device_id: &str, command: CommandName, envelope: &Envelope) -> Vec<u8> {
    format!(
        "{device_id}\n{command}\n{}\n{}\n{}",
        envelope.request_id, envelope.issued_at, envelope.payload
    )
    .into_bytes()
}

/// berth's one answer to a command, on `replies/<request_id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub request_id: String,
    pub ok: bool,
    pub error: Option<String>,
    /// The deployment's document after the command took effect.
    pub deployment: Option<serde_json::Value>,
}

/// Why a command was refused: each is an `error` event and the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a command envelope: {0}")]
    Malformed(String),
    #[error("unknown command {0:?}; use apply, remove, restart, stop or start")]
    UnknownCommand(String),
    #[error("invalid request_id: use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'")]
    BadRequestId,
    #[error("unsigned command: key_id and signature are required")]
    Unsigned,
    #[error("invalid key_id {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'")]
    BadKeyId(String),
    #[error("unknown key {key_id}: no {key_id}.pem in the trusted keys directory")]
    UnknownKey { key_id: String },
    #[error("trusted key {key_id} cannot be used: {reason}")]
    BadKey { key_id: String, reason: String },
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("invalid issued_at {0:?}: use RFC 3339 UTC, such as 2026-11-28T16:00:00Z")]
    BadTime(String),
    #[error("expired: issued {age_secs} s ago, more than {} s", MAX_AGE.as_secs())]
    Expired { age_secs: u64 },
    #[error("issued {ahead_secs} s in the future; check the clocks")]
    FromTheFuture { ahead_secs: u64 },
    #[error("request id {0} was already used")]
    Replayed(String),
    #[error("too many recent commands ({0}); try again in a few minutes")]
    TooMany(usize),
    #[error("the record of request ids cannot be written: {0}")]
    Store(String),
    #[error("{0}")]
    Limits(String),
    #[error("invalid deployment: {0}")]
    Invalid(String),
    #[error("invalid target {0:?}: use a deployment id or deployment/component/executable")]
    BadTarget(String),
    #[error("deployment {deployment} has no file {deployment}.toml in deployments_dir")]
    NoFile { deployment: String },
    #[error("cannot write the deployment file {0}")]
    Write(String),
}

impl Refusal {
    /// The error code of the refusal's event, where SPEC 5 has one: a
    /// deployment outside the `[remote]` limits or invalid is `DEP_E303`.
    pub fn error_code(&self) -> Option<crate::model::ErrorCode> {
        use crate::model::ErrorCode;
        match self {
            Refusal::Limits(_) | Refusal::Invalid(_) => Some(ErrorCode::InvalidDeployment),
            Refusal::Store(_) => Some(ErrorCode::StateStore),
            _ => None,
        }
    }
}

/// `[A-Za-z0-9._:-]{1,128}`: one topic level, safe in a file and a log.
pub fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
}

/// `[A-Za-z0-9._-]{1,64}` not starting with `.`: a file name in
/// `trusted_keys_dir`, never a path.
pub fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A command refused before its signature is checked: why, the request id
/// to reply to when the payload names a valid one, and the key it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub request_id: Option<String>,
    pub key_id: String,
    pub refusal: Refusal,
}

/// Decodes a command as it comes off the broker: `command` is the last
/// level of its topic, `payload` the JSON envelope. What this accepts still
/// has to pass [`Verifier::verify`].
pub fn decode(command: &str, payload: &[u8]) -> Result<(CommandName, Envelope), Rejected> {
    let envelope: Envelope = match serde_json::from_slice(payload) {
        Ok(envelope) => envelope,
        Err(e) => {
            // Without a request id there is no topic to reply on; the
            // refusal is an event only.
            let request_id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("request_id")?.as_str().map(str::to_string))
                .filter(|id| valid_request_id(id));
            return Err(Rejected {
                request_id,
                key_id: String::new(),
                refusal: Refusal::Malformed(clip(&e.to_string(), 2 * QUOTE_MAX)),
            });
        }
    };
    match CommandName::parse(command) {
        Some(name) => Ok((name, envelope)),
        None => Err(Rejected {
            request_id: valid_request_id(&envelope.request_id).then(|| envelope.request_id.clone()),
            key_id: envelope.key_id,
            refusal: Refusal::UnknownCommand(quote(command)),
        }),
    }
}

/// Checks the signature, the time and the request id of commands for one
/// device.
#[derive(Debug)]
pub struct Verifier {
    device_id: String,
    trusted_keys_dir: PathBuf,
    seen: SeenRequests,
}

impl Verifier {
    pub fn new(device_id: &str, trusted_keys_dir: &Path, seen: SeenRequests) -> Verifier {
        Verifier {
            device_id: device_id.to_string(),
            trusted_keys_dir: trusted_keys_dir.to_path_buf(),
            seen,
        }
    }

    /// Accepts `envelope` as command `command` at `now`, or says why not.
    /// An accepted request id is recorded (durably) before this returns, so
    /// the same command is never carried out twice.
    pub fn verify(
        &mut self,
        command: CommandName,
        envelope: &Envelope,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        if !valid_request_id(&envelope.request_id) {
            return Err(Refusal::BadRequestId);
        }
        if envelope.key_id.is_empty() || envelope.signature.is_empty() {
            return Err(Refusal::Unsigned);
        }
        if !valid_key_id(&envelope.key_id) {
            return Err(Refusal::BadKeyId(quote(&envelope.key_id)));
        }
        let key = keys::trusted_key(&self.trusted_keys_dir, &envelope.key_id)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(envelope.signature.trim())
            .map_err(|e| Refusal::BadSignature(format!("not standard base64 ({e})")))?;
        let signature = Signature::from_slice(&bytes).map_err(|_| {
            Refusal::BadSignature(format!(
                "an ed25519 signature is 64 bytes, this one {}",
                bytes.len()
            ))
        })?;
        key.verify(
            &signed_message(&self.device_id, command, envelope),
            &signature,
        )
        .map_err(|_| {
            Refusal::BadSignature(format!(
                "it does not match the command and key {}",
                envelope.key_id
            ))
        })?;
        let issued = parse_utc(&envelope.issued_at)?;
        match now.duration_since(issued) {
            Ok(age) if age > MAX_AGE => {
                return Err(Refusal::Expired {
                    age_secs: age.as_secs(),
                })
            }
            Ok(_) => {}
            Err(ahead) if ahead.duration() > FUTURE_TOLERANCE => {
                return Err(Refusal::FromTheFuture {
                    ahead_secs: ahead.duration().as_secs(),
                })
            }
            Err(_) => {}
        }
        self.seen.record(&envelope.request_id, issued, now)
    }
}

/// An RFC 3339 time in UTC (`Z` or `+00:00`).
fn parse_utc(text: &str) -> Result<SystemTime, Refusal> {
    let utc = text.ends_with('Z') || text.ends_with('z') || text.ends_with("+00:00");
    if !utc {
        return Err(Refusal::BadTime(quote(text)));
    }
    let normalized = match text.strip_suffix("+00:00") {
        Some(rest) => format!("{rest}Z"),
        None => text.to_string(),
    };
    humantime::parse_rfc3339_weak(&normalized).map_err(|_| Refusal::BadTime(quote(text)))
}

#[cfg(test)]
mod tests;
