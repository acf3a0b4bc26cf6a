//! TLS for both listeners (the HTTP API and the agent endpoint) and for their
//! clients (agents and the CLI): rustls, with ring as its crypto provider.
//!
//! A connection is a [`Stream`], plain or TLS, so everything above the
//! transport (hyper, tungstenite, the idle watch) is the same either way.
//! Plaintext stays the default on loopback; the binary refuses to listen
//! beyond loopback without TLS unless told to (`[tls] allow_plaintext`).
//!
//! Clients name the supervisor with a scheme, `https://` / `wss://` for TLS
//! and `http://` / `ws://` for plaintext, or as a bare `host:port`: TLS
//! unless the host is a loopback address or `localhost` and neither a CA
//! file nor a server name is given (a token never leaves the host in clear
//! by default). They verify the supervisor's certificate against the CA
//! file (or the system's bundle), for the host they connect to or the name
//! given.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
pub use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The system's bundle of trusted CAs (Debian's, RHEL's), used by a client
/// told to use TLS without a CA file of its own.
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// The `[tls]` table of the supervisor's configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain both listeners present (leaf first).
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM CA certificates the supervisor's own local agents and local CLI
    /// trust. [default: the cert file itself]
    pub ca: Option<PathBuf>,
    /// The name local agents and the local CLI verify the certificate
    /// against. [default: the IP address they connect to]
    pub server_name: Option<String>,
    /// Listen beyond loopback without TLS (behind a TLS-terminating proxy,
    /// or on a network that is trusted). Off: such a configuration is refused.
    pub allow_plaintext: bool,
}

/// One connection, plain or TLS, as either end sees it.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Accepted(Box<tokio_rustls::server::TlsStream<Prefixed>>),
    Connected(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The first byte of a TLS client's connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connection accepted on a listener.
#[derive(Debug)]
pub enum Accepted {
    /// Ready for the protocol above (after the TLS handshake, with TLS).
    Ready(Stream),
    /// A plaintext client on a TLS listener, its first byte read: for a
    /// plain answer that says to use TLS, and nothing else.
    Plaintext(TcpStream),
}

/// The server end of a connection just accepted: the TLS handshake if
/// `tls` is set (the caller bounds its time), the stream as it is if not.
pub async fn accept(mut stream: TcpStream, tls: Option<&TlsAcceptor>) -> io::Result<Accepted> {
    let Some(acceptor) = tls else {
        return Ok(Accepted::Ready(Stream::Plain(stream)));
    };
    let mut first = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut first).await?;
    if first[0] != TLS_HANDSHAKE_RECORD {
        return Ok(Accepted::Plaintext(stream));
    }
    let prefixed = Prefixed {
        first: Some(first[0]),
        inner: stream,
    };
    let tls = acceptor.accept(prefixed).await?;
    Ok(Accepted::Ready(Stream::Accepted(Box::new(tls))))
}

/// A stream with its first byte, already read to tell TLS from plaintext,
/// put back in front.
#[derive(Debug)]
pub struct Prefixed {
    first: Option<u8>,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(byte) = this.first {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            buf.put_slice(&[byte]);
            this.first = None;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Connects to `addr` (`host:port`) with Nagle off, and makes the TLS
/// handshake if `tls` is set. The caller bounds its time.
pub async fn connect(addr: &str, tls: Option<&ClientTls>) -> io::Result<Stream> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => Ok(Stream::Plain(stream)),
        Some(tls) => {
            let tls = tls
                .connector
                .connect(tls.name.clone(), stream)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS: {e}")))?;
            Ok(Stream::Connected(Box::new(tls)))
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listeners' TLS from a PEM certificate chain and its key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate {}: no PEM certificate in it",
            cert.display()
        ));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "TLS certificate {} and key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// Checks that a client trusting the CA certificates in `ca` and verifying
/// `name` accepts the chain in `cert` (the supervisor's own agents and CLI
/// must be able to connect): the error says why not.
pub fn check_trust(cert: &Path, ca: &Path, name: &str) -> Result<(), String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    let (leaf, intermediates) = chain.split_first().ok_or_else(|| {
        format!(
            "TLS certificate {}: no PEM certificate in it",
            cert.display()
        )
    })?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca)?),
        provider(),
    )
    .build()
    .map_err(|e| format!("TLS CA file {}: {e}", ca.display()))?;
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| format!("TLS server name {name:?}: {e}"))?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        leaf,
        intermediates,
        &server_name,
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .map(|_| ())
    .map_err(|e| {
        format!(
            "TLS: a client trusting {} cannot verify certificate {} for {name:?}: {e}",
            ca.display(),
            cert.display()
        )
    })
}

/// The PEM certificates in `ca` as trust anchors.
fn roots(ca: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS CA file {}: {e}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "TLS CA file {}: no usable PEM certificate in it",
            ca.display()
        ));
    }
    Ok(roots)
}

/// What a client needs for TLS: whom it trusts, and the name it verifies.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the PEM certificates in `ca` (the system's bundle if none),
    /// and verifies the name `name`.
    pub fn new(ca: Option<&Path>, name: &str) -> Result<ClientTls, String> {
        let ca = match ca {
            Some(ca) => ca.to_path_buf(),
            None => SYSTEM_BUNDLES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or("TLS: no CA file given (--tls-ca) and no system CA bundle found")?,
        };
        let roots = roots(&ca)?;
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("TLS server name {name:?}: {e}"))?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

/// Where a client connects: `host:port`, and TLS or not.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: String,
    pub tls: Option<ClientTls>,
}

impl Endpoint {
    /// Reads `text` (`host:port`, or with one of the `secure` or `plain`
    /// schemes). TLS is on for a secure scheme, and for a bare address
    /// unless it is on loopback with no CA file and no name given; `name`
    /// overrides the name verified (default: the host).
    pub fn parse(
        text: &str,
        secure: &str,
        plain: &str,
        ca: Option<&Path>,
        name: Option<&str>,
    ) -> Result<Endpoint, String> {
        let (addr, tls) = if let Some(rest) = text.strip_prefix(&format!("{secure}://")) {
            (rest, true)
        } else if let Some(rest) = text.strip_prefix(&format!("{plain}://")) {
            if ca.is_some() || name.is_some() {
                return Err(format!(
                    "{text}: a {plain}:// address is plaintext, but a TLS CA file or server name is given; use {secure}://"
                ));
            }
            (rest, false)
        } else if text.contains("://") {
            return Err(format!(
                "{text}: give host:port, {secure}://host:port or {plain}://host:port"
            ));
        } else {
            (text, true)
        };
        let addr = addr.trim_end_matches('/');
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(format!("{text}: no port (give host:port)"));
        };
        if port.parse::<u16>().is_err() || host.is_empty() {
            return Err(format!("{text}: not host:port"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let bare = !text.contains("://");
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        let tls = tls && !(bare && loopback && ca.is_none() && name.is_none());
        let tls = if tls {
            Some(ClientTls::new(ca, name.unwrap_or(host)).map_err(|e| {
                format!("{e} (for a supervisor without TLS, give {plain}://{addr})")
            })?)
        } else {
            None
        };
        Ok(Endpoint {
            addr: addr.to_string(),
            tls,
        })
    }
}

/// The address a process on this host reaches a listener bound to `addr`
/// at: loopback for an unspecified address (0.0.0.0, ::).
pub fn local_reach(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let loopback: IpAddr = if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(loopback, addr.port())
    } else {
        addr
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Accepted(s) => s.is_write_vectored(),
            Stream::Connected(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, ca: Option<&Path>) -> Result<Endpoint, String> {
        Endpoint::parse(text, "https", "http", ca, None)
    }

    #[test]
    fn a_bare_address_is_plaintext_only_on_loopback_without_a_ca() {
        for local in ["127.0.0.1:8470", "localhost:8470", "[::1]:8470"] {
            let e = parse(local, None).expect("parses");
            assert_eq!(e.addr, local);
            assert!(e.tls.is_none(), "{local}");
        }
        let e = parse("http://example.org:80/", None).expect("parses");
        assert_eq!(e.addr, "example.org:80");
        assert!(e.tls.is_none());
        // Elsewhere, a bare address is TLS: with a CA file that is missing,
        // that is the error, and it says how to ask for plaintext.
        let err = Endpoint::parse(
            "example.org:8470",
            "https",
            "http",
            Some(Path::new("/nonexistent/ca.pem")),
            None,
        )
        .expect_err("TLS, and no CA file");
        assert!(err.contains("http://example.org:8470"), "{err}");
        let err = Endpoint::parse("http://127.0.0.1:1", "https", "http", None, Some("x"))
            .expect_err("a name with plaintext");
        assert!(err.contains("use https://"), "{err}");
    }

    #[test]
    fn malformed_addresses_are_refused_with_what_to_give() {
        for bad in [
            "",
            "example.org",
            "example.org:http",
            ":8470",
            "ftp://example.org:21",
            "https://",
            "example.org:99999",
        ] {
            let err = parse(bad, None).expect_err(bad);
            assert!(err.contains("host:port"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_plain_scheme_with_a_ca_file_is_a_contradiction() {
        let err = parse("http://127.0.0.1:1", Some(Path::new("/nonexistent")))
            .expect_err("contradiction");
        assert!(err.contains("use https://"), "{err}");
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_refused() {
        let err = parse(
            "https://127.0.0.1:1",
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .expect_err("missing");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n\0\u{1}binary").expect("write");
        let err = parse("127.0.0.1:1", Some(&junk)).expect_err("no certificate");
        assert!(err.contains("no usable PEM certificate"), "{err}");
        let hostile = dir.path().join("hostile.pem");
        std::fs::write(
            &hostile,
            "-----BEGIN CERTIFICATE-----\n!!!!not base64!!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(parse("127.0.0.1:1", Some(&hostile)).is_err());
    }

    #[test]
    fn a_key_or_certificate_that_is_not_pem_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "nothing here").expect("write");
        std::fs::write(&key, "nor here").expect("write");
        let err = server_config(&cert, &key).expect_err("no certificate");
        assert!(err.contains("cert.pem"), "{err}");
        let err = server_config(Path::new("/nonexistent/c.pem"), &key).expect_err("missing");
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
    }

    #[test]
    fn an_unspecified_bind_is_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:8471".parse().expect("addr");
        assert_eq!(local_reach(any), "127.0.0.1:8471".parse().expect("addr"));
        let any6: SocketAddr = "[::]:8471".parse().expect("addr");
        assert_eq!(local_reach(any6), "[::1]:8471".parse().expect("addr"));
        let given: SocketAddr = "10.0.0.5:8471".parse().expect("addr");
        assert_eq!(local_reach(given), given);
    }
}
