//! Echo upstream for Gatehouse load runs and integration tests: a small HTTP/1.1 server that
//! reflects each request back as JSON, or answers one fixed body in benchmark mode.
//!
//! Default mode replies with
//! `{"upstream", "port", "method", "path", "headers", "body_bytes", "body"}` as
//! `application/json` and an `x-upstream-name` response header. Request headers steer it:
//!
//! - `x-echo-status: 503` answers with that status;
//! - `x-echo-delay-ms: 200` waits that long before answering;
//! - `x-echo-body-bytes: N` answers with N bytes of `a` instead of JSON.
//!
//! `GET /healthz` answers `200 ok`. Benchmark mode ([`EchoOptions::small`]) answers every
//! request with `200` and [`SMALL_BODY`] and computes nothing else.
//!
//! ```no_run
//! let address = gatehouse_loadtest::spawn_echo("billing");
//! // point a Gatehouse upstream at `address`; replies carry `x-upstream-name: billing`
//! ```

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value};
use tokio::net::TcpListener;

/// The body of every reply in benchmark mode.
pub const SMALL_BODY: &[u8] = b"hello, world\n";

/// Request bodies smaller than this are echoed back as text; larger ones only by size, so a
/// large upload does not turn into an equally large JSON reply.
const ECHO_BODY_LIMIT: usize = 64 * 1024;

/// Cap on `x-echo-body-bytes`, so one mistyped header cannot exhaust the test machine's memory.
const MAX_GENERATED_BODY: usize = 256 * 1024 * 1024;

const UPSTREAM_NAME: HeaderName = HeaderName::from_static("x-upstream-name");
const ECHO_STATUS: HeaderName = HeaderName::from_static("x-echo-status");
const ECHO_DELAY_MS: HeaderName = HeaderName::from_static("x-echo-delay-ms");
const ECHO_BODY_BYTES: HeaderName = HeaderName::from_static("x-echo-body-bytes");

/// How an echo server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoOptions {
    /// Reported as `upstream` in the JSON reply and in the `x-upstream-name` header, so a test
    /// can tell which upstream served a request.
    pub name: String,
    /// Benchmark mode: answer every request with `200`, `text/plain` and [`SMALL_BODY`].
    pub small: bool,
    /// Benchmark mode: wait this long before each answer (a slower target of a pool).
    pub small_delay: Duration,
    /// Benchmark mode: answer with a JSON object of this many bytes (`application/json`)
    /// instead of [`SMALL_BODY`]; 0 for the plain text.
    pub small_json_bytes: usize,
    /// Benchmark mode: a gRPC service over HTTP/2 (prior knowledge) that answers every call
    /// with the message it was sent and `grpc-status: 0`.
    pub grpc: bool,
}

impl Default for EchoOptions {
    fn default() -> Self {
        EchoOptions {
            name: "echo".to_owned(),
            small: false,
            small_delay: Duration::ZERO,
            small_json_bytes: 0,
            grpc: false,
        }
    }
}

impl EchoOptions {
    /// Default-mode options with the given upstream name.
    pub fn named(name: &str) -> Self {
        EchoOptions {
            name: name.to_owned(),
            ..EchoOptions::default()
        }
    }
}

/// What every connection of one server shares.
struct Upstream {
    name: String,
    name_header: HeaderValue,
    port: u16,
}

/// Serves HTTP/1.1 on `listener` until the task is dropped.
///
/// Each connection runs on its own task, so this needs a Tokio runtime with a reactor and,
/// for `x-echo-delay-ms`, a timer. Failed accepts (for example out of file descriptors) are
/// retried after a short pause rather than ending the server.
///
/// # Errors
///
/// Returns an error only when the listener's local address cannot be read, or when
/// [`EchoOptions::name`] cannot be a header value.
pub async fn serve(listener: TcpListener, options: EchoOptions) -> io::Result<()> {
    let name_header = HeaderValue::from_str(&options.name)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let upstream = Arc::new(Upstream {
        name: options.name,
        name_header,
        port: listener.local_addr()?.port(),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) if is_per_connection(&error) => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Small replies must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        if options.grpc {
            tokio::spawn(async move {
                let service = service_fn(grpc_echo);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            });
        } else if options.small {
            let delay = options.small_delay;
            let json = (options.small_json_bytes > 0).then(|| json_body(options.small_json_bytes));
            tokio::spawn(async move {
                let service = service_fn(move |_request: Request<Incoming>| {
                    let json = json.clone();
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        Ok::<_, Infallible>(match json {
                            Some(body) => json_response(body),
                            None => small_response(),
                        })
                    }
                });
                let _ = http1::Builder::new().serve_connection(io, service).await;
            });
        } else {
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move {
                let service = service_fn(move |request| echo(request, Arc::clone(&upstream)));
                let _ = http1::Builder::new().serve_connection(io, service).await;
            });
        }
    }
}

/// A gRPC call answered with the message it carried (and `grpc-status: 0` in the trailers).
async fn grpc_echo(
    request: Request<Incoming>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let message = request
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = Full::new(message)
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let mut response = Response::new(body);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// Starts a default-mode echo server named `name` on `127.0.0.1` and a free port, and returns
/// its address. See [`spawn_echo_with`].
///
/// # Panics
///
/// As [`spawn_echo_with`].
pub fn spawn_echo(name: &str) -> SocketAddr {
    spawn_echo_with(EchoOptions::named(name))
}

/// Starts an echo server on `127.0.0.1` and a free port, on a background thread with its own
/// single-threaded Tokio runtime, and returns its address once it accepts connections.
///
/// The caller need not be async, and the server is independent of any runtime the caller
/// has. It runs until the process exits.
///
/// # Panics
///
/// Panics when no port can be bound, the thread or runtime cannot start, or the name cannot
/// be a header value: in a test, that is a broken machine rather than a result.
pub fn spawn_echo_with(options: EchoOptions) -> SocketAddr {
    spawn_echo_on(options, SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Starts an echo server on the given address (port 0: a free one), as [`spawn_echo_with`].
/// Other loopback addresses (`127.0.0.2`) give several servers one port, as the addresses of
/// one host name.
///
/// # Panics
///
/// As [`spawn_echo_with`], and when the address cannot be bound.
pub fn spawn_echo_on(options: EchoOptions, bind: SocketAddr) -> SocketAddr {
    assert!(
        HeaderValue::from_str(&options.name).is_ok(),
        "echo upstream name {:?} is not a valid header value",
        options.name
    );
    let listener =
        std::net::TcpListener::bind(bind).unwrap_or_else(|error| panic!("bind {bind}: {error}"));
    listener
        .set_nonblocking(true)
        .expect("make the echo listener non-blocking");
    let address = listener.local_addr().expect("echo listener address");
    std::thread::Builder::new()
        .name(format!("echo-{}", options.name))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("start the echo upstream runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("register echo listener");
                if let Err(error) = serve(listener, options).await {
                    eprintln!("echo upstream on {address} stopped: {error}");
                }
            });
        })
        .expect("start the echo upstream thread");
    address
}

/// Accept errors that concern one aborted connection only; the listener itself is fine.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// A JSON object of exactly `size` bytes (at least 100): a few members of several types, then
/// string members padding it out.
pub fn json_body(size: usize) -> Bytes {
    let mut body = String::from(
        r#"{"id":12345,"status":"shipped","total":99.5,"paid":true,"items":["a","b"]"#,
    );
    let mut index = 0;
    while body.len() + 2 < size {
        let room = size - body.len() - 1;
        let member = format!(r#","f{index}":""#);
        if room < member.len() + 1 {
            body.push_str(&" ".repeat(room));
            break;
        }
        let pad = (room - member.len() - 1).min(40);
        body.push_str(&member);
        body.push_str(&"x".repeat(pad));
        body.push('"');
        index += 1;
    }
    body.push('}');
    Bytes::from(body)
}

fn json_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn small_response() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(SMALL_BODY)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

async fn echo(
    request: Request<Incoming>,
    upstream: Arc<Upstream>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();

    if parts.method == Method::GET && parts.uri.path() == "/healthz" {
        return Ok(reply(
            &upstream,
            StatusCode::OK,
            "text/plain",
            Bytes::from_static(b"ok"),
        ));
    }

    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(reply(
                &upstream,
                StatusCode::BAD_REQUEST,
                "text/plain",
                Bytes::from_static(b"request body could not be read\n"),
            ));
        }
    };

    let status = header_number::<u16>(&parts.headers, &ECHO_STATUS)
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(delay) = header_number::<u64>(&parts.headers, &ECHO_DELAY_MS) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    if let Some(size) = header_number::<usize>(&parts.headers, &ECHO_BODY_BYTES) {
        let generated = Bytes::from(vec![b'a'; size.min(MAX_GENERATED_BODY)]);
        return Ok(reply(&upstream, status, "text/plain", generated));
    }

    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |path| path.as_str());
    let echoed_body = if body.len() < ECHO_BODY_LIMIT {
        Value::String(String::from_utf8_lossy(&body).into_owned())
    } else {
        Value::Null
    };
    let mut document = Map::new();
    document.insert("upstream".into(), Value::from(upstream.name.as_str()));
    document.insert("port".into(), Value::from(upstream.port));
    document.insert("method".into(), Value::from(parts.method.as_str()));
    document.insert("path".into(), Value::from(path));
    document.insert("headers".into(), headers_document(&parts.headers));
    document.insert("body_bytes".into(), Value::from(body.len()));
    document.insert("body".into(), echoed_body);
    let json = serde_json::to_vec(&Value::Object(document)).unwrap_or_default();
    Ok(reply(
        &upstream,
        status,
        "application/json",
        Bytes::from(json),
    ))
}

/// A header seen once maps to its value, a repeated header to the list of its values, so a
/// test can check both forwarding and duplication.
fn headers_document(headers: &HeaderMap) -> Value {
    let mut document = Map::new();
    for name in headers.keys() {
        let mut values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|value| Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.pop().unwrap_or(Value::Null)
        } else {
            Value::Array(values)
        };
        document.insert(name.as_str().to_owned(), value);
    }
    Value::Object(document)
}

fn header_number<T: FromStr>(headers: &HeaderMap, name: &HeaderName) -> Option<T> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn reply(
    upstream: &Upstream,
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(UPSTREAM_NAME, upstream.name_header.clone());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// Sends one request with `Connection: close` and returns the raw response.
    fn exchange(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).expect("connect to echo upstream");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set read timeout");
        stream.write_all(request.as_bytes()).expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read reply");
        response
    }

    fn body_of(response: &str) -> &str {
        response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
    }

    #[test]
    fn echoes_method_path_headers_and_body() {
        let address = spawn_echo("alpha");
        let response = exchange(
            address,
            "POST /items?page=2 HTTP/1.1\r\nHost: test\r\nX-Tag: one\r\nX-Tag: two\r\n\
             Content-Length: 5\r\nConnection: close\r\n\r\nhello",
        );
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("x-upstream-name: alpha"), "{response}");
        assert!(response.contains("content-type: application/json"));
        let document: Value = serde_json::from_str(body_of(&response)).expect("JSON body");
        assert_eq!(document["upstream"], "alpha");
        assert_eq!(document["port"], address.port());
        assert_eq!(document["method"], "POST");
        assert_eq!(document["path"], "/items?page=2");
        assert_eq!(document["headers"]["host"], "test");
        assert_eq!(
            document["headers"]["x-tag"],
            serde_json::json!(["one", "two"])
        );
        assert_eq!(document["body_bytes"], 5);
        assert_eq!(document["body"], "hello");
    }

    #[test]
    fn control_headers_set_status_delay_and_body_size() {
        let address = spawn_echo("beta");
        let started = std::time::Instant::now();
        let response = exchange(
            address,
            "GET / HTTP/1.1\r\nHost: test\r\nX-Echo-Status: 503\r\nX-Echo-Delay-Ms: 150\r\n\
             X-Echo-Body-Bytes: 10\r\nConnection: close\r\n\r\n",
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert_eq!(body_of(&response), "aaaaaaaaaa");
    }

    #[test]
    fn healthz_and_small_mode_answer_plain_text() {
        let address = spawn_echo("gamma");
        let response = exchange(
            address,
            "GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        assert!(response.starts_with("HTTP/1.1 200"));
        assert_eq!(body_of(&response), "ok");

        let small = spawn_echo_with(EchoOptions {
            name: "bench".into(),
            small: true,
            ..EchoOptions::default()
        });
        let response = exchange(
            small,
            "GET /anything HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        assert!(response.starts_with("HTTP/1.1 200"));
        assert!(response.contains("content-type: text/plain"));
        assert!(!response.contains("x-upstream-name"));
        assert_eq!(body_of(&response), "hello, world\n");

        let json = spawn_echo_with(EchoOptions {
            small: true,
            small_json_bytes: 1024,
            ..EchoOptions::default()
        });
        let response = exchange(
            json,
            "GET /anything HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        assert!(response.contains("content-type: application/json"));
        let body = body_of(&response);
        assert_eq!(body.len(), 1024);
        let document: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(document["status"], "shipped");
        for size in [100, 101, 1000, 1025, 65536] {
            let body = json_body(size);
            assert_eq!(body.len(), size);
            serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        }
    }
}
