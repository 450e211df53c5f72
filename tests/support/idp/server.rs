//! The identity provider's HTTP serving: the accept loop on its own thread and runtime, the
//! route table, the outage and delay switches every endpoint obeys, and the request counts.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use super::form::Form;
use super::{oauth, Shared};

pub(super) const JWKS_PATH: &str = "/.well-known/jwks.json";
pub(super) const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub(super) const INTROSPECTION_PATH: &str = "/introspect";
pub(super) const AUTHORIZATION_PATH: &str = "/authorize";
pub(super) const TOKEN_PATH: &str = "/token";

pub(super) type HttpReply = Response<Full<Bytes>>;

/// The switches a test sets to make the provider misbehave, and what it counts so a test can
/// tell whether the gateway called (or cached, or retried).
#[derive(Default)]
pub(super) struct Traffic {
    down: AtomicBool,
    delay_ms: AtomicU64,
    jwks_fetches: AtomicUsize,
    introspections: AtomicUsize,
    refreshes: AtomicUsize,
}

impl Traffic {
    pub(super) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub(super) fn set_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(millis, Ordering::SeqCst);
    }

    pub(super) fn jwks_fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    pub(super) fn introspections(&self) -> usize {
        self.introspections.load(Ordering::SeqCst)
    }

    pub(super) fn refreshes(&self) -> usize {
        self.refreshes.load(Ordering::SeqCst)
    }

    /// Counted on arrival, before the delay and the outage switch, so a test sees the calls a
    /// gateway made even when they failed or timed out.
    fn count(&self, path: &str, form: &Form) {
        let counter = match path {
            JWKS_PATH => &self.jwks_fetches,
            INTROSPECTION_PATH => &self.introspections,
            TOKEN_PATH if form.get("grant_type") == Some("refresh_token") => &self.refreshes,
            _ => return,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// Serves `listener` on a thread of its own with its own Tokio runtime, until the returned
/// sender is dropped.
pub(super) fn spawn(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) -> tokio::sync::oneshot::Sender<()> {
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("idp-{port}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("identity provider runtime");
            runtime.block_on(serve(listener, shared, stopped));
        })
        .expect("spawn identity provider thread");
    stop
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> HttpReply {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let form = Form::parse(&body);
    let traffic = &shared.traffic;
    traffic.count(path, &form);
    let delay = traffic.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if traffic.down.load(Ordering::SeqCst) {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": "temporarily_unavailable" }),
        );
    }
    match (&parts.method, path) {
        (&Method::GET, JWKS_PATH) => {
            let mut reply = json_reply(StatusCode::OK, &shared.keys.jwks());
            reply.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("max-age=300"),
            );
            reply
        }
        (&Method::GET, DISCOVERY_PATH) => json_reply(StatusCode::OK, &discovery(shared)),
        (&Method::POST, INTROSPECTION_PATH) => oauth::introspect(shared, &parts.headers, &form),
        (&Method::GET, AUTHORIZATION_PATH) => {
            let query = Form::parse(parts.uri.query().unwrap_or_default().as_bytes());
            oauth::authorize(shared, &query)
        }
        (&Method::POST, TOKEN_PATH) => oauth::token(shared, &parts.headers, &form),
        _ => json_reply(StatusCode::NOT_FOUND, &json!({ "error": "not_found" })),
    }
}

fn discovery(shared: &Shared) -> Value {
    json!({
        "issuer": shared.issuer,
        "authorization_endpoint": shared.url(AUTHORIZATION_PATH),
        "token_endpoint": shared.url(TOKEN_PATH),
        "introspection_endpoint": shared.url(INTROSPECTION_PATH),
        "jwks_uri": shared.url(JWKS_PATH),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
}

pub(super) fn json_reply(status: StatusCode, value: &Value) -> HttpReply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::client::{client_basic, fetch_jwks, form_post, request};
    use super::super::IdentityProvider;

    #[test]
    fn idp_down_delay_and_unknown_paths() {
        let idp = IdentityProvider::start();
        assert_eq!(request(idp.addr, "GET", "/nope", &[], b"").status, 404);
        let discovery = request(
            idp.addr,
            "GET",
            "/.well-known/openid-configuration",
            &[],
            b"",
        );
        assert_eq!(discovery.json()["jwks_uri"], idp.jwks_url());
        assert_eq!(discovery.json()["token_endpoint"], idp.token_url());

        idp.set_down(true);
        let jwks = request(idp.addr, "GET", "/.well-known/jwks.json", &[], b"");
        assert_eq!(jwks.status, 503);
        let token = idp.issue_opaque("alice", &[], Duration::from_secs(60));
        let reply = form_post(
            &idp,
            "/introspect",
            &client_basic(),
            &format!("token={token}"),
        );
        assert_eq!(reply.status, 503);
        assert_eq!((idp.jwks_fetches(), idp.introspections()), (1, 1));
        idp.set_down(false);
        fetch_jwks(&idp);

        idp.set_delay(Duration::from_millis(300));
        let started = Instant::now();
        fetch_jwks(&idp);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(idp.jwks_fetches(), 3);
    }
}
