//! TLS of the worker gRPC connection (and of any other link between a job's tasks): rustls
//! on ring, as tonic's `tls-ring` feature uses it.
//!
//! Two ways to get the material:
//!
//! - **Your own files** ([`TlsFiles`]: `--tls_cert_file`, `--tls_key_file`, `--tls_ca_file`):
//!   PEM certificate chain and private key; a CA file turns on mutual TLS: a server then
//!   requires client certificates signed by it, a client verifies its server against it.
//! - **A per-job certificate authority** ([`JobCa`]): derived from the job secret with
//!   HKDF-SHA256, so every task that holds the secret builds the same CA (same name, same
//!   Ed25519 key) without any exchange, and mints its own leaf certificate signed by it.
//!   Every leaf names [`JOB_SERVER_NAME`]; clients verify that name, so a task's host name or
//!   address never has to match what a URL says. Whoever holds the job secret can mint a
//!   leaf: the CA is exactly as strong as the secret, which already authenticates every call.
//!
//! Either way the result is a [`TransportTls`], which makes tonic's server and client
//! configurations and rustls' own (for HTTPS listeners and clients).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::Sha256;
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The DNS name every job-CA leaf certificate carries and every job client verifies.
pub const JOB_SERVER_NAME: &str = "llmapi-job.internal";

/// How long a TLS client may take over its handshake before a server drops it.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// HKDF label of the job CA's key: changing it changes every job's CA.
const JOB_CA_LABEL: &[u8] = b"llmapi job CA Ed25519 key v1";

/// Why TLS material cannot be used. Each message names the file and what to change.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {flag} {}: {source}; fix the path or its permissions", path.display())]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind, or a malformed one.
    #[error("{flag} {} {what}; give a PEM file ({expected})", path.display())]
    BadPem {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
        /// What the file should hold.
        expected: &'static str,
    },
    /// The key does not belong to the certificate, or cannot sign.
    #[error(
        "--tls_key_file {} does not fit --tls_cert_file {}: {reason}; give the key the certificate was issued for",
        key.display(), cert.display()
    )]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// Only some of the flags that must come together were given.
    #[error("{0}")]
    Incomplete(String),
    /// Certificate generation failed (an rcgen error: a bug, or a name rcgen refuses).
    #[error("generating the job's TLS certificates failed: {0}")]
    Generate(String),
    /// rustls or tonic refused the configuration.
    #[error("the TLS configuration was refused: {0}")]
    Config(String),
}

/// A certificate chain and its private key, in PEM, checked to belong together.
#[derive(Clone)]
pub struct TlsIdentity {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(<certificate and key>)")
    }
}

impl TlsIdentity {
    /// The certificate chain, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PEM (keep it out of logs).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn rustls_parts(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok((certs, key))
    }
}

/// The `--tls_cert_file` / `--tls_key_file` / `--tls_ca_file` flags of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain this process presents (as a server, and as a client under mTLS).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates: servers require client certificates signed by them, clients
    /// verify servers against them.
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether no file was given.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.ca.is_none()
    }

    /// Reads and checks the files: a certificate needs its key and the other way round, the
    /// key must belong to the certificate, and every file must hold what its flag says.
    pub fn load(&self) -> Result<TransportTls, TlsError> {
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(load_identity(cert, key)?),
            (None, None) => None,
            (Some(_), None) => {
                return Err(TlsError::Incomplete(
                    "--tls_cert_file is given without --tls_key_file; give both (the key the certificate was issued for)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::Incomplete(
                    "--tls_key_file is given without --tls_cert_file; give both".into(),
                ));
            }
        };
        let ca_pem = self.ca.as_deref().map(load_ca).transpose()?;
        Ok(TransportTls {
            identity,
            ca_pem,
            server_name: None,
        })
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn parse_certs(
    flag: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |what: String| TlsError::BadPem {
        flag,
        path: path.to_owned(),
        what,
        expected: "one or more -----BEGIN CERTIFICATE----- blocks",
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("is not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

/// ring, the provider tonic's `tls-ring` gives its own configurations. rustls 0.23.48 marks
/// it deprecated for lacking post-quantum key exchange; aws-lc-rs, which has it, needs a
/// cmake/C build this project avoids (STACK.md).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_identity(cert: &Path, key: &Path) -> Result<TlsIdentity, TlsError> {
    let cert_bytes = read("--tls_cert_file", cert)?;
    let key_bytes = read("--tls_key_file", key)?;
    let certs = parse_certs("--tls_cert_file", cert, &cert_bytes)?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::BadPem {
        flag: "--tls_key_file",
        path: key.to_owned(),
        what: format!("holds no usable private key ({e})"),
        expected: "a -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY block",
    })?;
    let signer = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| TlsError::BadPem {
            flag: "--tls_key_file",
            path: key.to_owned(),
            what: format!("holds a key rustls cannot use ({e})"),
            expected: "an RSA, ECDSA P-256/P-384 or Ed25519 key",
        })?;
    rustls::sign::CertifiedKey::new(certs, signer)
        .keys_match()
        .map_err(|e| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(TlsIdentity {
        cert_pem: String::from_utf8_lossy(&cert_bytes).into_owned(),
        key_pem: String::from_utf8_lossy(&key_bytes).into_owned(),
    })
}

fn load_ca(path: &Path) -> Result<String, TlsError> {
    let bytes = read("--tls_ca_file", path)?;
    let certs = parse_certs("--tls_ca_file", path, &bytes)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| TlsError::BadPem {
            flag: "--tls_ca_file",
            path: path.to_owned(),
            what: format!("holds a certificate that cannot be a trust anchor ({e})"),
            expected: "CA certificates",
        })?;
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// HKDF-SHA256 (RFC 5869) of `ikm` with an empty salt, 32 bytes of output for `info`.
fn hkdf_sha256(ikm: &[u8], info: &[u8]) -> [u8; 32] {
    // Extract: PRK = HMAC(salt = 32 zero bytes, IKM); expand: T(1) = HMAC(PRK, info || 0x01).
    let mut extract = <Hmac<Sha256> as KeyInit>::new_from_slice(&[0u8; 32])
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    extract.update(ikm);
    let prk = extract.finalize().into_bytes();
    let mut expand = <Hmac<Sha256> as KeyInit>::new_from_slice(&prk)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    expand.update(info);
    expand.update(&[1]);
    let mut out = [0u8; 32];
    out.copy_from_slice(&expand.finalize().into_bytes());
    out
}

/// An Ed25519 private key from its 32-byte seed, as PKCS#8 v1 DER (RFC 8410).
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

/// The job's certificate authority, the same in every task that holds the job secret.
pub struct JobCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for JobCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobCa(<derived from the job secret>)")
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "llmapi job CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[1]));
    params
}

impl JobCa {
    /// The CA every holder of `secret` derives: its Ed25519 key is HKDF-SHA256 of the secret.
    pub fn derive(secret: &[u8]) -> Result<Self, TlsError> {
        let seed = hkdf_sha256(secret, JOB_CA_LABEL);
        let der = ed25519_pkcs8(&seed);
        let key =
            KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_ED25519)
                .map_err(|e| TlsError::Generate(e.to_string()))?;
        let params = ca_params();
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A fresh leaf certificate (new Ed25519 key) for this task, good as a TLS server and a
    /// TLS client, naming [`JOB_SERVER_NAME`] and `names` (host names or IP addresses).
    pub fn leaf(&self, names: &[String]) -> Result<TlsIdentity, TlsError> {
        let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ED25519).map_err(generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "llmapi job task");
        params.distinguished_name = dn;
        let mut sans = vec![SanType::DnsName(
            JOB_SERVER_NAME.try_into().map_err(generate)?,
        )];
        for name in names {
            if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            } else if let Ok(dns) = name.as_str().try_into() {
                sans.push(SanType::DnsName(dns));
            }
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        Ok(TlsIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// This task's transport TLS: a fresh leaf for `names`, mutual TLS against this CA, and
    /// clients verifying [`JOB_SERVER_NAME`].
    pub fn transport(&self, names: &[String]) -> Result<TransportTls, TlsError> {
        Ok(TransportTls {
            identity: Some(self.leaf(names)?),
            ca_pem: Some(self.cert_pem.clone()),
            server_name: Some(JOB_SERVER_NAME.to_owned()),
        })
    }
}

/// What one process uses for TLS between a job's tasks: its identity, the CA it trusts
/// (mutual TLS when set) and, for the job CA, the name clients verify.
#[derive(Debug, Clone)]
pub struct TransportTls {
    identity: Option<TlsIdentity>,
    ca_pem: Option<String>,
    server_name: Option<String>,
}

impl TransportTls {
    /// From parts: `identity` presented, `ca_pem` trusted, `server_name` verified by clients
    /// instead of the URL's host.
    pub fn new(
        identity: Option<TlsIdentity>,
        ca_pem: Option<String>,
        server_name: Option<String>,
    ) -> Self {
        Self {
            identity,
            ca_pem,
            server_name,
        }
    }

    /// The identity this process presents, if any.
    pub fn identity(&self) -> Option<&TlsIdentity> {
        self.identity.as_ref()
    }

    /// Whether servers require client certificates signed by the CA (a CA is set).
    pub fn mutual(&self) -> bool {
        self.ca_pem.is_some()
    }

    /// The name clients verify in place of the URL's host (the job CA's), if any.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// tonic's server configuration: this identity; with a CA, client certificates signed by
    /// it are required.
    pub fn grpc_server(&self) -> Result<ServerTlsConfig, TlsError> {
        let id = self.identity.as_ref().ok_or_else(|| {
            TlsError::Incomplete(
                "a TLS server needs a certificate: give --tls_cert_file and --tls_key_file".into(),
            )
        })?;
        // tonic runs handshakes concurrently; the timeout frees a silent client's task.
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&id.cert_pem, &id.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }

    /// tonic's client configuration: servers verified against the CA (required: a client
    /// without one has nothing to trust), this identity presented for mutual TLS.
    pub fn grpc_client(&self) -> Result<ClientTlsConfig, TlsError> {
        let ca = self.ca_pem.as_ref().ok_or_else(|| {
            TlsError::Incomplete(
                "connecting to a TLS worker needs the CA that signed its certificate: give --tls_ca_file".into(),
            )
        })?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(id) = &self.identity {
            config = config.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }

    fn roots(&self) -> Result<Option<rustls::RootCertStore>, TlsError> {
        let Some(ca) = &self.ca_pem else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Config(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Config(e.to_string()))?;
        }
        Ok(Some(roots))
    }

    /// A rustls server configuration for an HTTPS listener between tasks (HTTP/1.1): this
    /// identity; with a CA, client certificates signed by it are required.
    pub fn rustls_server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let id = self.identity.as_ref().ok_or_else(|| {
            TlsError::Incomplete(
                "a TLS server needs a certificate: give --tls_cert_file and --tls_key_file".into(),
            )
        })?;
        let (certs, key) = id.rustls_parts()?;
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?;
        let builder = match self.roots()? {
            Some(roots) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_single_cert(certs, key).map_err(config)?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(server))
    }

    /// A rustls client configuration for HTTPS between tasks: servers verified against the
    /// CA, this identity presented.
    pub fn rustls_client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let roots = self.roots()?.ok_or_else(|| {
            TlsError::Incomplete(
                "an HTTPS client between tasks needs the CA that signed the server's certificate: give --tls_ca_file".into(),
            )
        })?;
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots);
        let mut client = match &self.identity {
            Some(id) => {
                let (certs, key) = id.rustls_parts()?;
                builder.with_client_auth_cert(certs, key).map_err(config)?
            }
            None => builder.with_no_client_auth(),
        };
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(client))
    }
}

/// Reads `--ssl_certfile` and `--ssl_keyfile` (the HTTP front's certificate, vLLM's spelling)
/// into a rustls server configuration for HTTP/1.1, checking that the key fits.
pub fn https_front(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let relabel = |e: TlsError| match e {
        TlsError::Read { flag, path, source } => TlsError::Read {
            flag: front_flag(flag),
            path,
            source,
        },
        TlsError::BadPem {
            flag,
            path,
            what,
            expected,
        } => TlsError::BadPem {
            flag: front_flag(flag),
            path,
            what,
            expected,
        },
        TlsError::Mismatch { cert, key, reason } => TlsError::Incomplete(format!(
            "--ssl_keyfile {} does not fit --ssl_certfile {}: {reason}; give the key the certificate was issued for",
            key.display(),
            cert.display()
        )),
        other => other,
    };
    let identity = load_identity(cert, key).map_err(relabel)?;
    TransportTls::new(Some(identity), None, None).rustls_server()
}

fn front_flag(flag: &'static str) -> &'static str {
    match flag {
        "--tls_cert_file" => "--ssl_certfile",
        "--tls_key_file" => "--ssl_keyfile",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_matches_rfc_5869_shape_and_is_deterministic() {
        let a = hkdf_sha256(b"secret", JOB_CA_LABEL);
        assert_eq!(a, hkdf_sha256(b"secret", JOB_CA_LABEL));
        assert_ne!(a, hkdf_sha256(b"secret2", JOB_CA_LABEL));
        assert_ne!(a, hkdf_sha256(b"secret", b"another label"));
    }

    #[test]
    fn every_holder_of_the_secret_derives_the_same_ca_and_no_one_else_does() {
        let a = JobCa::derive(b"job secret of at least 16 chars").expect("derive");
        let b = JobCa::derive(b"job secret of at least 16 chars").expect("derive");
        let other = JobCa::derive(b"another job's secret 1234").expect("derive");
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert_ne!(a.cert_pem(), other.cert_pem());
    }

    #[test]
    fn leaves_of_one_task_verify_under_another_tasks_ca_and_not_under_a_strangers() {
        use rustls::client::danger::ServerCertVerifier;
        let a = JobCa::derive(b"job secret of at least 16 chars").expect("derive");
        let b = JobCa::derive(b"job secret of at least 16 chars").expect("derive");
        let other = JobCa::derive(b"another job's secret 1234").expect("derive");
        let leaf = a.leaf(&["node01".into(), "10.0.0.5".into()]).expect("leaf");
        let cert = CertificateDer::from_pem_slice(leaf.cert_pem().as_bytes()).expect("pem");
        let verify = |ca: &JobCa| {
            let roots = TransportTls::new(None, Some(ca.cert_pem().to_owned()), None)
                .roots()
                .expect("roots")
                .expect("some");
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .expect("verifier");
            verifier.verify_server_cert(
                &cert,
                &[],
                &rustls_pki_types::ServerName::try_from(JOB_SERVER_NAME).expect("name"),
                &[],
                rustls_pki_types::UnixTime::now(),
            )
        };
        verify(&b).expect("the same job's CA accepts the leaf");
        assert!(verify(&other).is_err(), "another job's CA must refuse it");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = JobCa::derive(b"job secret of at least 16 chars").expect("derive");
        let one = ca.leaf(&[]).expect("leaf");
        let two = ca.leaf(&[]).expect("leaf");
        let cert = write(dir.path(), "cert.pem", one.cert_pem());
        let key = write(dir.path(), "key.pem", one.key_pem());
        let other_key = write(dir.path(), "other.pem", two.key_pem());
        let junk = write(dir.path(), "junk.pem", "not a pem file\n");
        let files = |c: &Path, k: &Path| TlsFiles {
            cert: Some(c.to_owned()),
            key: Some(k.to_owned()),
            ca: None,
        };
        files(&cert, &key).load().expect("a matching pair loads");

        let e = files(&cert, &other_key).load().unwrap_err().to_string();
        assert!(
            e.contains("does not fit") && e.contains("other.pem") && e.contains("cert.pem"),
            "{e}"
        );
        let e = files(&junk, &key).load().unwrap_err().to_string();
        assert!(
            e.contains("--tls_cert_file") && e.contains("junk.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = files(&cert, &junk).load().unwrap_err().to_string();
        assert!(
            e.contains("--tls_key_file") && e.contains("junk.pem"),
            "{e}"
        );
        let e = files(&cert, Path::new("/nonexistent/key.pem"))
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read --tls_key_file /nonexistent/key.pem"),
            "{e}"
        );
        let e = TlsFiles {
            ca: Some(junk.clone()),
            ..TlsFiles::default()
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--tls_ca_file") && e.contains("junk.pem"), "{e}");
        let e = TlsFiles {
            cert: Some(cert.clone()),
            ..TlsFiles::default()
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(e.contains("without --tls_key_file"), "{e}");
        let e = https_front(&cert, &other_key).unwrap_err().to_string();
        assert!(
            e.contains("--ssl_keyfile") && e.contains("does not fit"),
            "{e}"
        );
        let e = https_front(Path::new("/nonexistent/c.pem"), &key)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--ssl_certfile /nonexistent/c.pem"), "{e}");
    }
}
