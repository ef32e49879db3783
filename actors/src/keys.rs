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

/// The signing half, on the promoter's node.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Make a new key pair in `dir`; an existing key is never overwritten.
    pub fn generate(dir: &Path) -> Result<SigningKey, KeyError> {
        let (secret, public) = key_paths(dir);
        if secret.exists() {
            return Err(file_err(&secret, "exists: a fleet key is never overwritten"));
        }
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| file_err(&secret, "no randomness"))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| file_err(&secret, e))?;
        write_atomic(&secret, doc.as_ref()).map_err(|e| file_err(&secret, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| file_err(&secret, e))?;
        }
        let key = SigningKey { pair };
        write_atomic(&public, format!("{}\n", key.public_hex()).as_bytes()).map_err(|e| file_err(&public, e))?;
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
