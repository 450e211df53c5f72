//! TLS on the client side (listener), TLS to upstreams with SNI and verification, and HTTP/2
//! upstreams.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::support::{parse_response, request_bytes, spawn_echo, Gateway};

struct TestCertificate {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn certificate(name: &str) -> TestCertificate {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    TestCertificate {
        cert_pem: certified.cert.pem(),
        key_pem: certified.key_pair.serialize_pem(),
        cert_der: certified.cert.der().clone(),
        key_der: certified.key_pair.serialize_der(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS upstream that answers every request with the server name the client asked for.
fn spawn_tls_upstream(certificate: &TestCertificate) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certificate.cert_der.clone()],
            PrivateKeyDer::Pkcs8(certificate.key_der.clone().into()),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let connection = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(connection, stream);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let sni = tls.conn.server_name().unwrap_or("").to_string();
                let body = serde_json::json!({ "upstream": "tls", "sni": sni }).to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    address
}

fn tls_get(
    address: SocketAddr,
    server_name: &str,
    root: &CertificateDer<'static>,
    path: &str,
) -> crate::support::Reply {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connection = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(server_name.to_string()).unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(connection, TcpStream::connect(address).unwrap());
    tls.write_all(&request_bytes("GET", path, &[("Host", server_name)], b""))
        .unwrap();
    let mut buffer = Vec::new();
    let _ = tls.read_to_end(&mut buffer);
    parse_response(&buffer).unwrap()
}

#[test]
fn tls_listener_serves_https_and_tells_the_upstream() {
    let echo = spawn_echo("echo");
    let certificate = certificate("localhost");
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, &certificate.cert_pem).unwrap();
    std::fs::write(&key, &certificate.key_pem).unwrap();
    let tls_port = crate::support::free_port();
    let gateway = Gateway::start_full(
        &format!(
            ", {{ name: public-tls, address: \"127.0.0.1:{tls_port}\", tls: {{ cert: {}, key: {} }} }}",
            cert.display(),
            key.display()
        ),
        "",
        &format!(
            "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nroutes: [{{ name: all, upstream: echo, match: {{ paths: [{{ prefix: / }}] }} }}]\n"
        ),
    );
    let tls_address: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let reply = tls_get(tls_address, "localhost", &certificate.cert_der, "/hello");
    drop(gateway);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["headers"]["x-forwarded-proto"], "https");
    assert_eq!(reply.json()["path"], "/hello");
}

#[test]
fn tls_upstream_sends_sni_and_verifies_the_certificate() {
    let certificate = certificate("users.internal");
    let upstream = spawn_tls_upstream(&certificate);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certificate.cert_pem).unwrap();
    let pool = |name: &str, sni: &str, verify: bool| {
        format!(
            "  - {{ name: {name}, targets: [{{ address: \"{upstream}\" }}], tls: {{ sni: {sni}, verify: {verify}, ca_file: {} }} }}\n",
            ca.display()
        )
    };
    let gateway = Gateway::start(&format!(
        "upstreams:\n{}{}{}routes:\n  - {{ name: good, upstream: good, match: {{ paths: [{{ prefix: /good }}] }} }}\n  - {{ name: wrong, upstream: wrong, match: {{ paths: [{{ prefix: /wrong }}] }} }}\n  - {{ name: unverified, upstream: unverified, match: {{ paths: [{{ prefix: /unverified }}] }} }}\n",
        pool("good", "users.internal", true),
        pool("wrong", "other.internal", true),
        pool("unverified", "other.internal", false),
    ));
    let reply = gateway.get("/good");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["sni"], "users.internal");

    // The certificate does not name other.internal: verification refuses it.
    let reply = gateway.get("/wrong");
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:upstream-unavailable"
    );

    // Switched off explicitly, it goes through.
    let reply = gateway.get("/unverified");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["sni"], "other.internal");
}

/// An HTTP/2 (prior knowledge, no TLS) upstream that reports the protocol version it saw.
fn spawn_h2_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |request: hyper::Request<hyper::body::Incoming>| async move {
                            let body = serde_json::json!({
                                "upstream": "h2",
                                "version": format!("{:?}", request.version()),
                                "path": request.uri().path(),
                            })
                            .to_string();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
    });
    address
}

#[test]
fn http2_upstream() {
    let upstream = spawn_h2_upstream();
    let gateway = Gateway::start(&format!(
        "upstreams: [{{ name: h2, protocol: h2, targets: [{{ address: \"{upstream}\" }}] }}]\nroutes: [{{ name: all, upstream: h2, match: {{ paths: [{{ prefix: / }}] }} }}]\n"
    ));
    for _ in 0..3 {
        let reply = gateway.get("/over-h2");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["version"], "HTTP/2.0");
        assert_eq!(reply.json()["path"], "/over-h2");
    }
}
