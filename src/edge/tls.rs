//! TLS listeners: certificates chosen by the name a client asks for (SNI), with a default or a
//! refusal for unknown names; certificate files reloaded without a restart (a broken file keeps
//! the certificate in use, and says why); and optional client certificates (mTLS) whose
//! verified subject and names reach the request.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use gatehouse_filters::ConnectionInfo;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::model::{ListenerConfig, ListenerTlsConfig, UnknownSni};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One certificate and key, loaded and checked to belong together.
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    /// The names it serves: its DNS subject alternative names (or, without any, its subject's
    /// common name), unless the config names them.
    pub names: Vec<String>,
    pub serial: String,
}

/// Reads a PEM certificate chain and its private key. Every error says which file and why.
pub fn load_certificate(
    cert: &str,
    key: &str,
    names: &[String],
) -> Result<LoadedCertificate, String> {
    let chain = read_certificates(cert)?;
    let key_der = read_key(key)?;
    let certified = CertifiedKey::from_der(chain.clone(), key_der, &provider())
        .map_err(|error| format!("\"{key}\" is not the key of \"{cert}\": {error}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|error| format!("\"{cert}\": not an X.509 certificate: {error}"))?;
    let names = if names.is_empty() {
        let mut found = Vec::new();
        if let Ok(Some(alternatives)) = parsed.subject_alternative_name() {
            for name in &alternatives.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                    found.push(dns.to_ascii_lowercase());
                }
            }
        }
        if found.is_empty() {
            if let Some(common) = parsed
                .subject()
                .iter_common_name()
                .next()
                .and_then(|name| name.as_str().ok())
            {
                found.push(common.to_ascii_lowercase());
            }
        }
        found
    } else {
        names.iter().map(|name| name.to_ascii_lowercase()).collect()
    };
    Ok(LoadedCertificate {
        key: Arc::new(certified),
        names,
        serial: parsed.raw_serial_as_string(),
    })
}

fn read_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("cannot read \"{path}\": {error}"))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|error| format!("\"{path}\": malformed PEM: {error}"))?;
    if chain.is_empty() {
        return Err(format!("\"{path}\" holds no PEM certificate"));
    }
    Ok(chain)
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("cannot read \"{path}\": {error}"))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|error| format!("\"{path}\": malformed PEM: {error}"))?
        .ok_or_else(|| format!("\"{path}\" holds no PEM private key"))
}

/// The certificates of one listener, by name.
struct CertificateSet {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` as `example.com`: one label in front of it.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    serials: Vec<String>,
}

/// Every certificate of a listener's `tls` section, or the first error.
fn load_set(tls: &ListenerTlsConfig) -> Result<CertificateSet, String> {
    let default = load_certificate(&tls.cert, &tls.key, &[])?;
    let mut set = CertificateSet {
        default: default.key.clone(),
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        serials: vec![default.serial.clone()],
    };
    // The default certificate also answers its own names; the `sni` entries after it, in
    // order (a name named twice goes to the first).
    let mut all = vec![default];
    for entry in &tls.sni {
        let loaded = load_certificate(&entry.cert, &entry.key, &entry.names)?;
        set.serials.push(loaded.serial.clone());
        all.push(loaded);
    }
    for loaded in all {
        for name in &loaded.names {
            match name.strip_prefix("*.") {
                Some(parent) => set
                    .wildcard
                    .entry(parent.to_string())
                    .or_insert_with(|| loaded.key.clone()),
                None => set
                    .exact
                    .entry(name.clone())
                    .or_insert_with(|| loaded.key.clone()),
            };
        }
    }
    Ok(set)
}

/// Chooses the certificate for a handshake by its SNI name.
#[derive(Debug)]
pub struct SniResolver {
    certificates: ArcSwap<CertificateSetHolder>,
    refuse_unknown: bool,
}

struct CertificateSetHolder(CertificateSet);

impl std::fmt::Debug for CertificateSetHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateSet")
            .field("serials", &self.0.serials)
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.certificates.load();
        let set = &set.0;
        let Some(name) = hello.server_name() else {
            // No name (a client that connects by address): the default certificate.
            return Some(set.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = set.exact.get(&name) {
            return Some(key.clone());
        }
        if let Some(key) = name
            .split_once('.')
            .and_then(|(_, parent)| set.wildcard.get(parent))
        {
            return Some(key.clone());
        }
        if self.refuse_unknown {
            tracing::debug!(sni = %name, "no certificate for this name: handshake refused");
            None
        } else {
            Some(set.default.clone())
        }
    }
}

/// Keeps what the client's verified certificate says with the connection.
struct ClientCertificate;

#[async_trait::async_trait]
impl TlsAccept for ClientCertificate {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut sans = Vec::new();
        if let Ok(Some(alternatives)) = parsed.subject_alternative_name() {
            for name in &alternatives.value.general_names {
                use x509_parser::extensions::GeneralName;
                match name {
                    GeneralName::DNSName(text)
                    | GeneralName::RFC822Name(text)
                    | GeneralName::URI(text) => sans.push(text.to_string()),
                    _ => {}
                }
            }
        }
        let info = ConnectionInfo {
            client_cert_cn: parsed
                .subject()
                .iter_common_name()
                .next()
                .and_then(|name| name.as_str().ok())
                .map(str::to_string),
            client_cert_subject: Some(parsed.subject().to_string()),
            client_cert_sans: sans,
            // Only a chain the listener's CA verified reaches this point.
            client_cert_verified: true,
            ..ConnectionInfo::default()
        };
        Some(Arc::new(Arc::new(info)))
    }
}

/// A TLS listener's settings for Pingora, and what reloads its certificates.
pub struct ListenerTls {
    pub settings: pingora_core::listeners::tls::TlsSettings,
    pub reloader: Reloadable,
}

/// The files of one listener, watched for changes.
pub struct Reloadable {
    listener: String,
    tls: ListenerTlsConfig,
    resolver: Arc<SniResolver>,
    fingerprint: Vec<u8>,
}

/// Builds a TLS listener. The certificates were checked when the config compiled, but the
/// files may have changed since: an error here stops the start with the reason.
pub fn listener(listener: &ListenerConfig, tls: &ListenerTlsConfig) -> Result<ListenerTls, String> {
    let set = load_set(tls)?;
    let resolver = Arc::new(SniResolver {
        certificates: ArcSwap::from_pointee(CertificateSetHolder(set)),
        refuse_unknown: tls.unknown_sni == UnknownSni::Refuse,
    });
    let mut settings =
        pingora_core::listeners::tls::TlsSettings::with_callbacks(Box::new(ClientCertificate))
            .map_err(|error| error.to_string())?;
    settings.set_cert_resolver(resolver.clone());
    if let Some(client_auth) = &tls.client_auth {
        settings.set_client_cert_verifier(client_verifier(&client_auth.ca, client_auth.required)?);
    }
    settings.enable_h2();
    Ok(ListenerTls {
        settings,
        reloader: Reloadable {
            listener: listener.name.clone(),
            fingerprint: fingerprint(tls),
            tls: tls.clone(),
            resolver,
        },
    })
}

/// The verifier of client certificates against the CA certificates in `ca`.
pub fn client_verifier(
    ca: &str,
    required: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(ca)? {
        roots
            .add(certificate)
            .map_err(|error| format!("\"{ca}\": not a usable CA certificate: {error}"))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|error| format!("\"{ca}\": {error}"))
}

/// The contents of every certificate and key file (a file that cannot be read counts as
/// empty, so that it changing back is noticed too).
fn fingerprint(tls: &ListenerTlsConfig) -> Vec<u8> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut files = vec![&tls.cert, &tls.key];
    for entry in &tls.sni {
        files.push(&entry.cert);
        files.push(&entry.key);
    }
    for file in files {
        hash.update(std::fs::read(Path::new(file)).unwrap_or_default());
        hash.update([0]);
    }
    hash.finalize().to_vec()
}

impl Reloadable {
    /// Loads the files again when they changed (or when `force`); a set that fails to load
    /// leaves the one in use.
    fn check(&mut self, force: bool) -> Option<Result<Vec<String>, String>> {
        let fingerprint = fingerprint(&self.tls);
        if fingerprint == self.fingerprint && !force {
            return None;
        }
        self.fingerprint = fingerprint;
        Some(load_set(&self.tls).map(|set| {
            let serials = set.serials.clone();
            self.resolver
                .certificates
                .store(Arc::new(CertificateSetHolder(set)));
            serials
        }))
    }
}

/// Checks every TLS listener's files each second, and at once on SIGHUP; a changed set is
/// swapped in for new handshakes (connections already open keep theirs). A background service
/// of the server, so that it runs in the process that serves (after `--daemon` forks).
pub struct Watcher {
    listeners: std::sync::Mutex<Vec<Reloadable>>,
    reloads: gatehouse_filters::metrics::Family<prometheus::IntCounter>,
}

impl Watcher {
    pub fn new(listeners: Vec<Reloadable>, metrics: &gatehouse_filters::Metrics) -> Watcher {
        Watcher {
            listeners: std::sync::Mutex::new(listeners),
            reloads: metrics.counters(
                "gatehouse_tls_certificate_reloads_total",
                "TLS certificate reloads, by listener and result (ok, failed: the old certificates stay)",
                &["listener", "result"],
            ),
        }
    }

    fn check_all(&self, force: bool) {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for listener in listeners.iter_mut() {
            match listener.check(force) {
                None => {}
                Some(Ok(serials)) => {
                    self.reloads.with_labels(&[&listener.listener, "ok"]).inc();
                    tracing::info!(listener = %listener.listener, serials = ?serials, "TLS certificates reloaded");
                }
                Some(Err(error)) => {
                    self.reloads
                        .with_labels(&[&listener.listener, "failed"])
                        .inc();
                    tracing::error!(listener = %listener.listener, "TLS certificates not reloaded, the ones in use stay: {error}");
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for Watcher {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        if self
            .listeners
            .lock()
            .map(|listeners| listeners.is_empty())
            .unwrap_or(true)
        {
            return;
        }
        let hangup = Arc::new(AtomicBool::new(false));
        if let Err(error) = signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())
        {
            tracing::warn!("SIGHUP will not reload TLS certificates: {error}");
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            // Small files, read once a second: not worth a blocking-pool hop.
            self.check_all(hangup.swap(false, Ordering::Relaxed));
        }
    }
}

/// Whether a listener's `tls` section loads: for `gatehouse validate` and every config
/// compile.
pub fn check(tls: &ListenerTlsConfig) -> Result<(), String> {
    load_set(tls)?;
    if let Some(client_auth) = &tls.client_auth {
        client_verifier(&client_auth.ca, client_auth.required)?;
    }
    Ok(())
}
