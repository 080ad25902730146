//! How clients reach the service: the listen-address policy, TLS (rustls), the connection cap and
//! the accept loop with its timeouts.
//!
//! - **Listen policy.** Plain HTTP only on a loopback address, unless the operator says
//!   `--insecure-plain-http`; anything else needs `--tls-cert` and `--tls-key`. Checked before
//!   anything is bound or opened.
//! - **TLS.** rustls with the `ring` provider, TLS 1.2 and 1.3, ALPN `http/1.1`, no client
//!   certificates. The private key file must be readable by its owner only, like the token files;
//!   neither its content nor a parser's view of it reaches an error message or a log.
//! - **Connection cap.** At most `--max-connections` connections are open at once (a TLS handshake in
//!   progress counts). At the cap the accept loop stops accepting until one closes: further
//!   connections wait in the kernel's listen backlog, unanswered, rather than being accepted and
//!   dropped. Each pause is counted (`vram_connection_limit_reached_total`).
//! - **Timeouts.** `--header-timeout` bounds the TLS handshake and the arrival of each request's
//!   headers (an idle keep-alive connection is closed after it too); `--body-timeout` (in `api`)
//!   bounds the body; `--request-timeout` the whole request.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use vram_residency::VramError;
use vram_residency::keys::read_secret_file;

use super::metrics::ConnectionMetrics;

/// Largest certificate chain file read.
const MAX_CERT_FILE_LEN: u64 = 1 << 20;
/// Largest private key file read (a 16384-bit RSA key in PEM is about 13 KiB).
const MAX_KEY_FILE_LEN: usize = 64 << 10;

/// What clients speak to the service, by the listen policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS (any listen address).
    Https,
    /// Plain HTTP on a loopback address.
    Http,
    /// Plain HTTP on a non-loopback address, by `--insecure-plain-http`.
    InsecurePlainHttp,
}

impl Transport {
    /// The URL scheme of the `listening on` line.
    pub const fn scheme(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Http | Self::InsecurePlainHttp => "http",
        }
    }

    /// The name `GET /v1/worker` reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Http => "http",
            Self::InsecurePlainHttp => "insecure-plain-http",
        }
    }
}

/// Decides the transport for `listen`: TLS when configured; plain HTTP on a loopback address;
/// plain HTTP elsewhere only with `insecure_plain_http`.
///
/// # Errors
/// A non-loopback address without TLS and without `--insecure-plain-http`; the message names both.
pub fn choose(
    listen: SocketAddr,
    tls: bool,
    insecure_plain_http: bool,
) -> anyhow::Result<Transport> {
    if tls {
        return Ok(Transport::Https);
    }
    if listen.ip().is_loopback() {
        return Ok(Transport::Http);
    }
    if insecure_plain_http {
        return Ok(Transport::InsecurePlainHttp);
    }
    anyhow::bail!(
        "--listen {listen} is not a loopback address: serving the API there needs TLS (--tls-cert \
         FILE --tls-key FILE), or --insecure-plain-http to serve plain HTTP anyway (API tokens then \
         cross the network in clear text: only behind a TLS-terminating proxy on a trusted network)"
    )
}

/// Reads the certificate chain (PEM, leaf first) and the private key (PEM: PKCS#8, PKCS#1 RSA or
/// SEC1 EC; readable by its owner only) and builds the TLS acceptor: TLS 1.2 and 1.3 with the
/// `ring` provider's suites, ALPN `http/1.1`, no client certificates.
///
/// # Errors
/// A file that cannot be read, a key file accessible to group or others (with the `chmod 600` fix),
/// no certificate or no key in the files, or a key that does not belong to the certificate. Messages
/// name the files, never the key's content.
pub fn load_tls(cert_path: &Path, key_path: &Path) -> anyhow::Result<TlsAcceptor> {
    let cert_text = read_public_file(cert_path, MAX_CERT_FILE_LEN)
        .with_context(|| format!("reading the TLS certificate chain {}", cert_path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&cert_text)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "{}: not a PEM certificate chain (-----BEGIN CERTIFICATE----- blocks)",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "{}: no certificate in it (expected PEM -----BEGIN CERTIFICATE----- blocks, the server's \
             own certificate first)",
            cert_path.display()
        );
    }
    let key_text = read_secret_file(key_path, MAX_KEY_FILE_LEN)
        .map_err(|error| match error {
            // Its Display says "worker token"; the reason alone fits a key file.
            VramError::InvalidToken { reason } => anyhow::anyhow!(reason),
            other => anyhow::Error::new(other),
        })
        .with_context(|| format!("reading the TLS private key {}", key_path.display()))?;
    // The parser's error can quote a line of the file: it is not passed on.
    let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|_| {
        anyhow::anyhow!(
            "{}: no private key in it (expected one PEM block: BEGIN PRIVATE KEY, BEGIN RSA PRIVATE \
             KEY or BEGIN EC PRIVATE KEY)",
            key_path.display()
        )
    })?;
    drop(key_text);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("configuring TLS 1.2 and 1.3")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "the TLS certificate {} and key {} are not a usable pair",
                cert_path.display(),
                key_path.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reads a file of public data of at most `max_len` bytes.
fn read_public_file(path: &Path, max_len: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max_len.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_len {
        anyhow::bail!("larger than {max_len} bytes");
    }
    Ok(bytes)
}

/// Limits the accept loop applies to every connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: u32,
    /// Longest a TLS handshake, or the arrival of a request's headers, may take.
    pub header_timeout: Duration,
}

/// One of the `--max-connections` slots, held for a connection's whole life (handshake included);
/// `vram_connections_open` counts them.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Serves connections (HTTP/1.1, over TLS when `tls` is given) until SIGTERM or SIGINT, never more
/// than `limits.max_connections` at once; then stops accepting and lets open connections finish for
/// up to `grace`. Returns the signal's name.
pub async fn accept_until_signal(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    grace: Duration,
) -> &'static str {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(
        usize::try_from(limits.max_connections).unwrap_or(1).max(1),
    ));
    let mut signal = std::pin::pin!(super::shutdown_signal());
    let name = loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // At the cap: accept nothing until a connection closes. New connections wait in
                // the kernel's backlog (and are refused by it once that is full).
                metrics.limit_reached.inc();
                tracing::info!(
                    max_connections = limits.max_connections,
                    "connection limit reached; accepting again when one closes"
                );
                tokio::select! {
                    name = &mut signal => break name,
                    permit = Arc::clone(&slots).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // The semaphore is never closed; should it be, wait for the signal.
                        Err(_) => break (&mut signal).await,
                    },
                }
            }
        };
        tokio::select! {
            name = &mut signal => break name,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = Slot::new(permit, metrics.open.clone());
                let watcher = graceful.watcher();
                let router = router.clone();
                let tls = tls.clone();
                let handshake_failures = metrics.tls_handshake_failures.clone();
                let header_timeout = limits.header_timeout;
                tokio::spawn(async move {
                    let _slot = slot;
                    let Some(acceptor) = tls else {
                        return serve_http(stream, router, watcher, header_timeout).await;
                    };
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_http(stream, router, watcher, header_timeout).await,
                        Ok(Err(error)) => {
                            handshake_failures.inc();
                            tracing::debug!(%error, "TLS handshake failed");
                        }
                        Err(_) => {
                            handshake_failures.inc();
                            tracing::debug!("TLS handshake timed out (--header-timeout)");
                        }
                    }
                });
            }
        }
    };
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period");
    }
    name
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it closes, with the header read timeout,
/// under the graceful-shutdown `watcher`.
async fn serve_http<I>(io: I, router: axum::Router, watcher: Watcher, header_timeout: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%error, "connection ended with an error");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Transport, choose};

    #[test]
    fn plain_http_off_loopback_needs_tls_or_the_explicit_insecure_flag_and_the_refusal_names_both()
    {
        let loopback = "127.0.0.1:8470".parse().unwrap();
        let loopback6 = "[::1]:8470".parse().unwrap();
        let any = "0.0.0.0:8470".parse().unwrap();
        let any6 = "[::]:8470".parse().unwrap();
        let mapped = "[::ffff:127.0.0.1]:8470".parse().unwrap();
        assert_eq!(choose(loopback, false, false).unwrap(), Transport::Http);
        assert_eq!(choose(loopback6, false, false).unwrap(), Transport::Http);
        assert_eq!(choose(loopback, true, false).unwrap(), Transport::Https);
        assert_eq!(choose(any, true, false).unwrap(), Transport::Https);
        assert_eq!(
            choose(any, false, true).unwrap(),
            Transport::InsecurePlainHttp
        );
        for refused in [any, any6, mapped] {
            let message = choose(refused, false, false).unwrap_err().to_string();
            for flag in ["--tls-cert", "--tls-key", "--insecure-plain-http"] {
                assert!(message.contains(flag), "{message}");
            }
        }
        assert_eq!(Transport::InsecurePlainHttp.scheme(), "http");
        assert_eq!(Transport::Https.scheme(), "https");
    }
}
