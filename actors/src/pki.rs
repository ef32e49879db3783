//! The fleet's certificate authority and the certificates of its nodes and people, for Zenoh's
//! TLS with mutual authentication (a launch file's `[security]` table).
//!
//! Everything lives in `DIR/tls/` beside the fleet's signing keys (`DIR` is usually
//! `state/{fleet}/keys`): `ca.pem` (every party gets a copy), `ca.key` (the authority's secret:
//! keep it where certificates are made), and one `NAME.pem` + `NAME.key` per identity. `NAME`
//! is the certificate's common name and carries the role: `node.sim`, `operator.alice`,
//! `engineer.bob`. Zenoh's access control matches that name (`cert_common_names`), so what a
//! party may do follows from the certificate it holds. Secret files are written 0600 from
//! their first byte, atomically, and nothing is ever overwritten.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::write_secret;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("identity {0:?}: write ROLE.NAME with ROLE node, operator or engineer and NAME letters, digits, '-', '_' (e.g. operator.alice)")]
    BadIdentity(String),
    #[error("certificate for {identity}: {reason}")]
    Issue { identity: String, reason: String },
}

fn file_err(path: &Path, reason: impl ToString) -> PkiError {
    PkiError::File {
        file: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// What a certificate's holder is to the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A node of the launch file: sends what its actors send.
    Node,
    /// A person who may change the rollout (promote, roll back) and watch everything.
    Operator,
    /// A person who watches: subscribes to everything, reads `ckpt list`, changes nothing.
    Engineer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Operator => "operator",
            Role::Engineer => "engineer",
        }
    }
}

/// A certificate's subject: its role and name, written `role.name` (its common name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    pub fn new(role: Role, name: &str) -> Result<Identity, PkiError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        if !ok {
            return Err(PkiError::BadIdentity(format!("{}.{name}", role.as_str())));
        }
        Ok(Identity {
            role,
            name: name.to_string(),
        })
    }
    pub fn node(name: &str) -> Result<Identity, PkiError> {
        Identity::new(Role::Node, name)
    }
    pub fn operator(name: &str) -> Result<Identity, PkiError> {
        Identity::new(Role::Operator, name)
    }
    pub fn engineer(name: &str) -> Result<Identity, PkiError> {
        Identity::new(Role::Engineer, name)
    }
    /// The certificate's common name, which access control matches.
    pub fn common_name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.role.as_str(), self.name)
    }
}

impl FromStr for Identity {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Identity, PkiError> {
        let bad = || PkiError::BadIdentity(s.to_string());
        let (role, name) = s.split_once('.').ok_or_else(bad)?;
        let role = match role {
            "node" => Role::Node,
            "operator" => Role::Operator,
            "engineer" => Role::Engineer,
            _ => return Err(bad()),
        };
        Identity::new(role, name).map_err(|_| bad())
    }
}

/// The three files a TLS party opens: the authority that vouches for every party, its own
/// certificate, and its own secret key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The first of the three that is missing, if any.
    pub fn missing(&self) -> Option<&Path> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .find(|p| !p.is_file())
            .map(PathBuf::as_path)
    }
}

/// `DIR/tls`, where the authority and the certificates live.
pub fn tls_dir(keys_dir: &Path) -> PathBuf {
    keys_dir.join("tls")
}

/// The files of `id` under the fleet key directory `keys_dir`.
pub fn files(keys_dir: &Path, id: &Identity) -> TlsFiles {
    let d = tls_dir(keys_dir);
    TlsFiles {
        ca: d.join("ca.pem"),
        cert: d.join(format!("{id}.pem")),
        key: d.join(format!("{id}.key")),
    }
}

/// The certificate a tool on this machine connects with when nobody said which: the first
/// engineer's in `keys_dir/tls` (by name), else the first operator's. `None` when the directory
/// holds no authority (the fleet is not secured, or its keys are elsewhere).
pub fn discover(keys_dir: &Path) -> Option<(Identity, TlsFiles)> {
    let d = tls_dir(keys_dir);
    if !d.join("ca.pem").is_file() {
        return None;
    }
    let mut ids: Vec<Identity> = std::fs::read_dir(&d)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".pem")?.parse().ok())
        .filter(|id: &Identity| id.role != Role::Node)
        .collect();
    // Engineers first (least privilege), then operators; by name within a role.
    ids.sort_by(|a, b| (a.role == Role::Operator, &a.name).cmp(&(b.role == Role::Operator, &b.name)));
    ids.into_iter()
        .map(|id| (files(keys_dir, &id), id))
        .find(|(f, _)| f.missing().is_none())
        .map(|(f, id)| (id, f))
}

/// The authority's parameters: its name is the fleet's, and a certificate it issued names it
/// as issuer (the same parameters and key sign certificates in any later process).
fn ca_params(fleet: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "NanoBot");
    dn.push(DnType::CommonName, format!("nanobot fleet {fleet} CA"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

fn leaf_params(id: &Identity) -> Result<CertificateParams, PkiError> {
    let issue_err = |e: rcgen::Error| PkiError::Issue {
        identity: id.to_string(),
        reason: e.to_string(),
    };
    // Peers connect by address and Zenoh does not check the name (the authority and the
    // common name are what count); the names are there for tools that do.
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).map_err(issue_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "NanoBot");
    dn.push(DnType::CommonName, id.common_name());
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A node both listens and connects: it is a TLS server and a client.
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(730);
    Ok(p)
}

fn write_public(path: &Path, text: &str) -> Result<(), PkiError> {
    nanobot_dataset::write_atomic(path, text.as_bytes()).map_err(|e| file_err(path, e))
}

/// Make the fleet's authority in `keys_dir/tls` unless it exists. Returns whether it made one.
pub fn init_ca(keys_dir: &Path, fleet: &str) -> Result<bool, PkiError> {
    let d = tls_dir(keys_dir);
    let (cert, key) = (d.join("ca.pem"), d.join("ca.key"));
    if cert.exists() || key.exists() {
        if !(cert.is_file() && key.is_file()) {
            let missing = if cert.is_file() { &key } else { &cert };
            return Err(file_err(
                missing,
                "missing while the other half of the authority exists",
            ));
        }
        return Ok(false);
    }
    std::fs::create_dir_all(&d).map_err(|e| file_err(&d, e))?;
    let issue_err = |e: rcgen::Error| PkiError::Issue {
        identity: "the fleet CA".into(),
        reason: e.to_string(),
    };
    let pair = KeyPair::generate().map_err(issue_err)?;
    let ca = ca_params(fleet).self_signed(&pair).map_err(issue_err)?;
    write_secret(&key, pair.serialize_pem().as_bytes()).map_err(|e| file_err(&key, e))?;
    write_public(&cert, &ca.pem())?;
    Ok(true)
}

/// Issue `id`'s certificate, signed by the fleet's authority, unless it exists. Returns its
/// files and whether they were made now.
pub fn issue(keys_dir: &Path, fleet: &str, id: &Identity) -> Result<(TlsFiles, bool), PkiError> {
    let f = files(keys_dir, id);
    if f.cert.exists() || f.key.exists() {
        if let Some(m) = [&f.cert, &f.key].into_iter().find(|p| !p.is_file()) {
            return Err(file_err(m, "missing while the other half of the certificate exists"));
        }
        return Ok((f, false));
    }
    let ca_key_path = tls_dir(keys_dir).join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| {
        file_err(
            &ca_key_path,
            format!("{e} (make the authority with `nanobot keys init`)"),
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_pem).map_err(|e| file_err(&ca_key_path, e))?;
    let issuer = Issuer::new(ca_params(fleet), ca_key);
    let issue_err = |e: rcgen::Error| PkiError::Issue {
        identity: id.to_string(),
        reason: e.to_string(),
    };
    let pair = KeyPair::generate().map_err(issue_err)?;
    let cert = leaf_params(id)?.signed_by(&pair, &issuer).map_err(issue_err)?;
    write_secret(&f.key, pair.serialize_pem().as_bytes()).map_err(|e| file_err(&f.key, e))?;
    write_public(&f.cert, &cert.pem())?;
    Ok((f, true))
}

/// The authority and every identity's certificate, made where missing. Returns what was made.
pub fn ensure(keys_dir: &Path, fleet: &str, ids: &[Identity]) -> Result<Vec<String>, PkiError> {
    let mut made = Vec::new();
    if init_ca(keys_dir, fleet)? {
        made.push("the fleet CA".to_string());
    }
    for id in ids {
        if issue(keys_dir, fleet, id)?.1 {
            made.push(id.to_string());
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nanobot-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn identities_carry_their_role_in_the_common_name_and_bad_ones_are_named() {
        let id: Identity = "operator.alice".parse().unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Operator, "alice"));
        assert_eq!(Identity::node("sim").unwrap().common_name(), "node.sim");
        for bad in [
            "alice",
            "root.alice",
            "operator.",
            "operator.a/b",
            "engineer.a.b",
            "node.../x",
        ] {
            let e = bad.parse::<Identity>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn certificates_are_made_once_secrets_0600_and_name_their_holder() {
        let dir = temp("issue");
        let alice = Identity::operator("alice").unwrap();
        // No authority yet: the error says how to make one.
        let e = issue(&dir, "nb", &alice).unwrap_err().to_string();
        assert!(e.contains("ca.key") && e.contains("keys init"), "{e}");
        let made = ensure(&dir, "nb", &[Identity::node("sim").unwrap(), alice.clone()]).unwrap();
        assert_eq!(made, ["the fleet CA", "node.sim", "operator.alice"]);
        let f = files(&dir, &alice);
        assert_eq!(f.missing(), None);
        #[cfg(unix)]
        for secret in [&f.key, &tls_dir(&dir).join("ca.key")] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(secret).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", secret.display());
        }
        // Made once: a second run changes no byte.
        let before = std::fs::read(&f.cert).unwrap();
        assert!(ensure(&dir, "nb", std::slice::from_ref(&alice)).unwrap().is_empty());
        assert_eq!(std::fs::read(&f.cert).unwrap(), before);
        // The certificate is PEM and its subject is the common name access control matches.
        let pem = String::from_utf8(before).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        let der = base64_body(&pem);
        assert!(
            der.windows(b"operator.alice".len()).any(|w| w == b"operator.alice"),
            "the subject names operator.alice"
        );
        // A tool finds the least-privileged person's certificate: no engineer yet, the operator.
        assert_eq!(discover(&dir).map(|(id, _)| id), Some(alice.clone()));
        let bob = Identity::engineer("bob").unwrap();
        issue(&dir, "nb", &bob).unwrap();
        assert_eq!(discover(&dir).map(|(id, _)| id), Some(bob));
        assert!(discover(&dir.join("elsewhere")).is_none());
        // Half a certificate is an error that names the missing file.
        std::fs::remove_file(&f.key).unwrap();
        let e = issue(&dir, "nb", &alice).unwrap_err().to_string();
        assert!(e.contains("operator.alice.key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn base64_body(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }
}
