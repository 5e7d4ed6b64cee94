//! ed25519 keys as PEM files, in the formats the `openssl` CLI writes:
//! a `PUBLIC KEY` (SubjectPublicKeyInfo, `openssl pkey -pubout`) for each
//! trusted key on the device, a `PRIVATE KEY` (PKCS#8, `openssl genpkey
//! -algorithm ed25519`) for the operator. `berth fleet keygen` writes the
//! same pair, so either tool can make keys for the other.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use super::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no ed25519 PEM PRIVATE KEY ({reason}); make one with `berth fleet keygen` or `openssl genpkey -algorithm ed25519`", path.display())]
    NotPrivateKey { path: PathBuf, reason: String },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read random bytes from /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// The public key `<dir>/<key_id>.pem`; `key_id` is already checked to be
/// a plain file name.
pub fn trusted_key(dir: &Path, key_id: &str) -> Result<VerifyingKey, Refusal> {
    let path = dir.join(format!("{key_id}.pem"));
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Refusal::UnknownKey {
                key_id: key_id.to_string(),
            })
        }
        Err(e) => {
            return Err(Refusal::BadKey {
                key_id: key_id.to_string(),
                reason: format!("cannot read {}: {e}", path.display()),
            })
        }
    };
    VerifyingKey::from_public_key_pem(&text).map_err(|e| Refusal::BadKey {
        key_id: key_id.to_string(),
        reason: format!("{} is not an ed25519 PEM PUBLIC KEY ({e})", path.display()),
    })
}

/// The operator's private key, a PKCS#8 PEM file.
pub fn signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::NotPrivateKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Standard base64 of the signature of `message`.
pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.sign(message).to_bytes())
}

/// Writes a new pair: `<dir>/<key_id>.key` (the private key, mode 0600) and
/// `<dir>/<key_id>.pem` (the public key, to copy into each device's
/// `trusted_keys_dir`). Existing files are never overwritten. Returns both
/// paths.
pub fn keygen(dir: &Path, key_id: &str) -> Result<(PathBuf, PathBuf), KeyError> {
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(KeyError::Random)?;
    let key = SigningKey::from_bytes(&seed);
    // PKCS#8 v1 (the private key alone), as openssl writes it: OpenSSL 3.0
    // does not read the v2 form that carries the public key too.
    let private = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .expect("an ed25519 key encodes");
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("an ed25519 key encodes");
    let private_path = dir.join(format!("{key_id}.key"));
    let public_path = dir.join(format!("{key_id}.pem"));
    write_new(&private_path, private.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&public_path, public.as_bytes(), 0o644) {
        let _ = fs::remove_file(&private_path);
        return Err(e);
    }
    Ok((private_path, public_path))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let write = || {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    })
}
