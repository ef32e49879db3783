//! The fleet's signing keys (ed25519). `nanobot keys init DIR` makes `DIR/fleet.key` (the
//! secret, PKCS#8, readable by its owner only: it stays on the node that promotes) and
//! `DIR/fleet.pub` (the public key, hex: every robot gets a copy). The promoter signs each
//! promoted adapter's manifest; a policy actor loads nothing whose signature does not verify
//! against the public key it trusts.

use std::path::{Path, PathBuf};

use nanobot_dataset::{hex, write_atomic};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("signature does not verify against the fleet key {key}")]
    BadSignature { key: String },
    #[error("signature is not hex of 64 bytes")]
    MalformedSignature,
}

fn file_err(path: &Path, reason: impl ToString) -> KeyError {
    KeyError::File {
        file: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The secret key's and the public key's files in `dir`.
pub fn key_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("fleet.key"), dir.join("fleet.pub"))
}

/// An operator's key files in the fleet key directory `dir`: `operators/NAME.key` (stays with
/// the operator) and `operators/NAME.pub` (the promoter's `operators` lists it).
pub fn operator_key_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let d = dir.join("operators");
    (d.join(format!("{name}.key")), d.join(format!("{name}.pub")))
}

/// An operator's name: what the ledger records and key files are named after.
pub fn validate_operator(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then_some(())
        .ok_or_else(|| format!("operator name {name:?}: letters, digits, '-', '_' and '.', not starting with '.'"))
}

/// Write a secret atomically, readable by its owner only from its first byte: a temporary file
/// created with mode 0600 (never wider, whatever the umask), fsynced, renamed into place.
pub(crate) fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = nanobot_dataset::tmp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    let mut f = open.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The signing half, on the promoter's node.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Make a new key pair in `dir`; an existing key is never overwritten.
    pub fn generate(dir: &Path) -> Result<SigningKey, KeyError> {
        let (secret, public) = key_paths(dir);
        SigningKey::generate_at(&secret, &public)
    }

    /// Make operator `name`'s key pair in the fleet key directory `dir` (never overwritten).
    pub fn generate_operator(dir: &Path, name: &str) -> Result<SigningKey, KeyError> {
        let (secret, public) = operator_key_paths(dir, name);
        validate_operator(name).map_err(|e| file_err(&secret, e))?;
        SigningKey::generate_at(&secret, &public)
    }

    /// A new key pair: the secret at `secret` (mode 0600 from its first byte), the public key
    /// (hex) at `public`.
    fn generate_at(secret: &Path, public: &Path) -> Result<SigningKey, KeyError> {
        if secret.exists() {
            return Err(file_err(secret, "exists: a key is never overwritten"));
        }
        if let Some(parent) = secret.parent() {
            std::fs::create_dir_all(parent).map_err(|e| file_err(parent, e))?;
        }
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| file_err(secret, "no randomness"))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| file_err(secret, e))?;
        write_secret(secret, doc.as_ref()).map_err(|e| file_err(secret, e))?;
        let key = SigningKey { pair };
        write_atomic(public, format!("{}\n", key.public_hex()).as_bytes()).map_err(|e| file_err(public, e))?;
        Ok(key)
    }

    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes)
            .map_err(|e| file_err(path, format!("not an ed25519 PKCS#8 key: {e}")))?;
        Ok(SigningKey { pair })
    }

    /// Load `dir`'s key, or make one there if it has none (for a development fleet; a real one
    /// runs `nanobot keys init` once and copies `fleet.pub` to its robots).
    pub fn load_or_generate(dir: &Path) -> Result<SigningKey, KeyError> {
        let (secret, _) = key_paths(dir);
        if secret.exists() {
            SigningKey::load(&secret)
        } else {
            SigningKey::generate(dir)
        }
    }

    /// Operator `name`'s key in the fleet key directory `dir`, made there if it has none (the
    /// development fleet's operator; a real one runs `nanobot keys init --operator NAME`).
    pub fn load_or_generate_operator(dir: &Path, name: &str) -> Result<SigningKey, KeyError> {
        let (secret, _) = operator_key_paths(dir, name);
        if secret.exists() {
            SigningKey::load(&secret)
        } else {
            SigningKey::generate_operator(dir, name)
        }
    }

    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    /// The signature of `text`, hex.
    pub fn sign(&self, text: &str) -> String {
        hex(self.pair.sign(text.as_bytes()).as_ref())
    }
}

/// The verifying half, on every robot.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    public: Vec<u8>,
    hex: String,
}

impl TrustedKey {
    /// Read a `fleet.pub` (64 hex digits).
    pub fn load(path: &Path) -> Result<TrustedKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        TrustedKey::from_hex(text.trim()).ok_or_else(|| file_err(path, "not an ed25519 public key (64 hex digits)"))
    }

    pub fn from_hex(text: &str) -> Option<TrustedKey> {
        let public = unhex(text).filter(|b| b.len() == 32)?;
        Some(TrustedKey {
            public,
            hex: text.to_ascii_lowercase(),
        })
    }

    pub fn verify(&self, text: &str, signature_hex: &str) -> Result<(), KeyError> {
        let sig = unhex(signature_hex)
            .filter(|s| s.len() == 64)
            .ok_or(KeyError::MalformedSignature)?;
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(text.as_bytes(), &sig)
            .map_err(|_| KeyError::BadSignature {
                key: self.hex[..16].to_string(),
            })
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys_are_private_from_their_first_byte_and_operators_have_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = SigningKey::generate(dir.path()).unwrap();
        let alice = SigningKey::generate_operator(dir.path(), "alice").unwrap();
        let (secret, public) = operator_key_paths(dir.path(), "alice");
        #[cfg(unix)]
        for f in [key_paths(dir.path()).0, secret.clone()] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        let trusted = TrustedKey::load(&public).unwrap();
        assert!(trusted.verify("x", &alice.sign("x")).is_ok());
        assert!(trusted.verify("x", &fleet.sign("x")).is_err());
        assert!(
            SigningKey::generate_operator(dir.path(), "alice").is_err(),
            "never overwritten"
        );
        assert!(SigningKey::generate_operator(dir.path(), "../bob").is_err());
        assert_eq!(
            SigningKey::load_or_generate_operator(dir.path(), "alice")
                .unwrap()
                .public_hex(),
            alice.public_hex()
        );
    }

    #[test]
    fn a_signature_verifies_only_for_its_text_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(dir.path()).unwrap();
        assert!(
            SigningKey::generate(dir.path()).is_err(),
            "an existing key is never overwritten"
        );
        let trusted = TrustedKey::load(&key_paths(dir.path()).1).unwrap();
        let sig = key.sign("adapter a, sha 1");
        trusted.verify("adapter a, sha 1", &sig).unwrap();
        assert!(matches!(
            trusted.verify("adapter a, sha 2", &sig),
            Err(KeyError::BadSignature { .. })
        ));
        assert!(matches!(trusted.verify("x", "zz"), Err(KeyError::MalformedSignature)));
        let other = tempfile::tempdir().unwrap();
        let stranger = SigningKey::generate(other.path()).unwrap();
        assert!(trusted
            .verify("adapter a, sha 1", &stranger.sign("adapter a, sha 1"))
            .is_err());
        // The same key comes back from its file.
        let again = SigningKey::load_or_generate(dir.path()).unwrap();
        assert_eq!(again.public_hex(), key.public_hex());
    }
}
