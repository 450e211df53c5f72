//! The typed configuration model: one shape for every source (YAML file, PostgreSQL), with
//! `deny_unknown_fields` everywhere so a typo is an error, not a silently ignored key.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::units::{ByteSize, Duration, Percent};

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The config format version. Only 1 exists.
    pub version: u32,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub ops: OpsConfig,
    #[serde(default)]
    pub config: SourceConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The Redis server, for filters that share state across nodes (introspection cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// Who may call: consumers and their credentials.
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// The global filter chain, run before each route's own filters.
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listeners: Vec<ListenerConfig>,
    /// Worker threads of the proxy service. Defaults to the number of CPUs.
    pub threads: Option<usize>,
    /// Peers whose `X-Forwarded-For` / `Forwarded` / `X-Forwarded-Proto` are believed.
    #[schemars(with = "Vec<String>")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The forwarding headers written on every upstream request. From an untrusted peer, a
    /// client-sent copy of one left out here is removed (so it cannot be spoofed); from a
    /// trusted proxy it passes as it came. Default: all five.
    pub forwarded_headers: Vec<ForwardedHeader>,
    pub limits: LimitsConfig,
    /// Let idle worker threads take queued work from busy ones. Off: each connection stays on
    /// the thread that accepted it (one single-threaded runtime per thread).
    pub work_stealing: bool,
    /// Idle upstream connections kept for reuse, across all upstreams.
    pub upstream_keepalive_pool_size: usize,
    /// On SIGTERM: how long to keep serving in-flight requests before the final shutdown step.
    pub grace_period: Duration,
    /// The final shutdown step's own deadline.
    pub shutdown_timeout: Duration,
    /// The socket through which an upgrading process takes over the listeners (SIGQUIT).
    pub upgrade_socket: String,
    /// Where the process id is written.
    pub pid_file: String,
    /// How upstream targets given by host name are resolved.
    pub dns: DnsConfig,
    /// HTTP/2 from clients: on TLS listeners by ALPN, and on listeners with `h2c`.
    pub http2: Http2Config,
    /// Requests one HTTP/1.1 connection may carry; the answer to the last one closes it.
    /// Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

/// A forwarding header Gatehouse can write for the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum ForwardedHeader {
    #[serde(rename = "x-forwarded-for", alias = "X-Forwarded-For")]
    XForwardedFor,
    #[serde(rename = "x-forwarded-proto", alias = "X-Forwarded-Proto")]
    XForwardedProto,
    #[serde(rename = "x-forwarded-host", alias = "X-Forwarded-Host")]
    XForwardedHost,
    #[serde(rename = "forwarded", alias = "Forwarded")]
    Forwarded,
    #[serde(rename = "x-real-ip", alias = "X-Real-IP", alias = "X-Real-Ip")]
    XRealIp,
}

impl ForwardedHeader {
    pub const ALL: [ForwardedHeader; 5] = [
        ForwardedHeader::XForwardedFor,
        ForwardedHeader::XForwardedProto,
        ForwardedHeader::XForwardedHost,
        ForwardedHeader::Forwarded,
        ForwardedHeader::XRealIp,
    ];

    /// The header's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::XForwardedProto => "x-forwarded-proto",
            ForwardedHeader::XForwardedHost => "x-forwarded-host",
            ForwardedHeader::Forwarded => "forwarded",
            ForwardedHeader::XRealIp => "x-real-ip",
        }
    }
}

/// HTTP/2 settings toward clients. The defaults are Pingora's own (streams and header list) and
/// the `h2` crate's (reset budgets); a key left out keeps its default.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); one more is
    /// refused with RST_STREAM(REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// The decoded size of one request's header list (SETTINGS_MAX_HEADER_LIST_SIZE); a larger
    /// one (a CONTINUATION flood) ends the connection.
    pub max_header_list_size: ByteSize,
    /// A connection with no open stream for this long is closed with GOAWAY.
    pub idle_timeout: Duration,
    /// Streams a client may reset before the gateway has taken them up (the Rapid Reset
    /// attack, CVE-2023-44487); one more ends the connection with GOAWAY(ENHANCE_YOUR_CALM).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the gateway may reset because of the client's protocol errors (the
    /// MadeYouReset attack, CVE-2025-8671); one more ends the connection with GOAWAY.
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: 100,
            max_header_list_size: ByteSize(64 * 1024),
            idle_timeout: Duration::from_secs(300),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}

/// Upstream targets given by host name are resolved in the background: every address a name
/// has becomes a target, looked up again when its records' TTL runs out.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// DNS servers (`IP` or `IP:PORT`, port 53 by default). Empty: the system's
    /// (`/etc/resolv.conf`).
    pub resolvers: Vec<String>,
    /// A name is looked up again no sooner than this, whatever its TTL.
    pub min_ttl: Duration,
    /// A name is looked up again no later than this, whatever its TTL.
    pub max_ttl: Duration,
    /// How long one lookup may take before it counts as failed.
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            resolvers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listeners: vec![ListenerConfig {
                name: "public".into(),
                address: "0.0.0.0:8080".into(),
                tls: None,
                proxy_protocol: None,
                h2c: false,
            }],
            threads: None,
            trusted_proxies: Vec::new(),
            forwarded_headers: ForwardedHeader::ALL.to_vec(),
            limits: LimitsConfig::default(),
            work_stealing: true,
            upstream_keepalive_pool_size: 1024,
            grace_period: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
            upgrade_socket: "/tmp/gatehouse_upgrade.sock".into(),
            pid_file: "/tmp/gatehouse.pid".into(),
            dns: DnsConfig::default(),
            http2: Http2Config::default(),
            max_requests_per_connection: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    /// `IP:PORT` to listen on.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsConfig>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from an L4 load
    /// balancer, which names the client. Connections from elsewhere, or without a header, are
    /// closed without an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
    /// Accept HTTP/2 with prior knowledge on this plaintext listener (h2c). Off: a client that
    /// starts with the HTTP/2 preface is answered 400.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h2c: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// The balancers allowed to send the header (addresses or CIDRs).
    #[schemars(with = "Vec<String>")]
    pub trusted: Vec<ipnet::IpNet>,
    /// How long the whole header may take to arrive.
    #[serde(default = "default_proxy_protocol_timeout")]
    pub timeout: Duration,
}

fn default_proxy_protocol_timeout() -> Duration {
    Duration::from_secs(3)
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// PEM certificate chain: the default certificate.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// More certificates, each chosen for the names it serves (its DNS subject alternative
    /// names, or `names`) when a client asks for one of them (SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<SniCertificateConfig>,
    /// A name no certificate serves: answer with the default certificate, or refuse the
    /// handshake.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// Ask clients for a certificate signed by a CA of `ca` (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuthConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SniCertificateConfig {
    pub cert: String,
    pub key: String,
    /// The names this certificate serves (`*.example.com` for one label); default: its DNS
    /// subject alternative names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    #[default]
    Default,
    Refuse,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// PEM CA certificates client certificates must chain to.
    pub ca: String,
    /// Refuse the handshake without a client certificate (`false`: ask, and let filters
    /// decide: the `mtls` auth filter, `auth: required`).
    #[serde(default = "default_true")]
    pub required: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Total bytes of the request head's header fields (names and values). 431 above.
    pub max_header_bytes: ByteSize,
    /// Number of request header fields. 431 above.
    pub max_headers: usize,
    /// Length of the request target (path and query). 414 above.
    pub max_uri_bytes: ByteSize,
    /// Request body size. 413 above.
    pub max_body_bytes: ByteSize,
    /// Total time allowed to receive a request head, from the connection's start or the end of
    /// the previous response. Slow clients are disconnected when it passes.
    pub header_read_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: ByteSize(16 * 1024),
            max_headers: 100,
            max_uri_bytes: ByteSize(8 * 1024),
            max_body_bytes: ByteSize(10 * 1024 * 1024),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Address of the operations listener (/healthz /readyz /metrics /config /explain).
    /// Loopback by default; `off` disables it.
    pub address: String,
}

impl OpsConfig {
    /// The address the operations listener binds, or `None` when it is `off`.
    pub fn listener_address(&self) -> Option<&str> {
        (self.address != "off").then_some(self.address.as_str())
    }
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            address: "127.0.0.1:9901".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    #[default]
    File,
    Postgres,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub source: SourceKind,
    /// Reload the file when it changes. SIGHUP always reloads.
    pub watch: bool,
    /// With `source: postgres`: where the config lives. The file then keeps only what the node
    /// itself owns (`server`, `ops`, `config`, `telemetry`); everything else comes from the
    /// database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSourceConfig>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            source: SourceKind::File,
            watch: true,
            postgres: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// `postgres://user[:password]@host[:port]/database`; may be a `${env:NAME}` reference. TLS is
    /// set with `tls`, not with `sslmode` in the URL.
    pub url: String,
    /// The schema holding the config tables (default: the server's search path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    #[serde(default)]
    pub tls: PostgresTlsConfig,
    /// A full read of the config even without a notification, to catch missed ones.
    #[serde(default = "default_resync_interval")]
    pub resync_interval: Duration,
    /// Notifications arriving within this time are read as one change.
    #[serde(default = "default_debounce")]
    pub debounce: Duration,
    #[serde(default = "default_postgres_connect_timeout")]
    pub connect_timeout: Duration,
    /// The last good config is written here after every applied version; a node that starts
    /// while PostgreSQL is unreachable serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_path: Option<String>,
    /// This node's name in `config_versions.decided_by` and `config_nodes.node` (default: the
    /// host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresTlsConfig {
    /// `disable`, or `require`: TLS is mandatory (never a plaintext fallback) and the server's
    /// certificate is verified, against `ca_file` when given, else against the system's roots.
    pub mode: PostgresTlsMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PostgresTlsMode {
    #[default]
    Disable,
    Require,
}

fn default_resync_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_debounce() -> Duration {
    Duration::from_millis(20)
}

fn default_postgres_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log: LogConfig,
    pub access_log: AccessLogConfig,
    /// Answer every response with `Server-Timing: gateway;dur=…, upstream;dur=…` (milliseconds
    /// spent in Gatehouse and waiting for the upstream's response head). Off by default: it
    /// tells clients how long the upstream took. A route's own `server_timing` overrides it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server_timing: bool,
    /// OpenTelemetry traces, exported over OTLP/HTTP; off without this section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingConfig>,
}

/// `telemetry.tracing`: a SERVER span per request and a CLIENT span per upstream attempt,
/// continued from the caller's W3C `traceparent` and passed on to the upstream.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The OTLP/HTTP (protobuf) traces endpoint, used as written: it usually ends in
    /// `/v1/traces` (as `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). Fixed at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Instead of `endpoint`: the collector's base URL, to which `/v1/traces` is added (as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`), e.g. `http://127.0.0.1:4318`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded (0.0 to 1.0); a request whose caller sent a
    /// `traceparent` follows its sampled flag. A reload applies a new ratio.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Continue the caller's trace. `false` starts every trace here, for a public entry point
    /// where clients should not choose trace ids. A reload applies it.
    #[serde(default = "default_true")]
    pub trust_incoming: bool,
    /// `service.name` of the spans. Fixed at start.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Finished spans waiting for export; past it new ones are dropped and counted in
    /// `gatehouse_trace_spans_dropped_total`, never waited for.
    #[serde(default = "default_trace_queue")]
    pub max_queue: usize,
    /// Spans per export request.
    #[serde(default = "default_trace_batch")]
    pub max_batch: usize,
    /// How long one export may take before it is given up.
    #[serde(default = "default_export_timeout")]
    pub export_timeout: Duration,
}

impl TracingConfig {
    /// Where spans are sent: `endpoint` as written, or `otlp_endpoint` + `/v1/traces`.
    pub fn traces_url(&self) -> Option<String> {
        match (&self.endpoint, &self.otlp_endpoint) {
            (Some(endpoint), None) => Some(endpoint.clone()),
            (None, Some(base)) => Some(format!("{}/v1/traces", base.trim_end_matches('/'))),
            _ => None,
        }
    }
}

fn default_sample_ratio() -> f64 {
    0.01
}

fn default_service_name() -> String {
    "gatehouse".into()
}

fn default_trace_queue() -> usize {
    2048
}

fn default_trace_batch() -> usize {
    512
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `error`, `warn`, `info`, `debug` or `trace`, or a tracing filter like `info,gatehouse=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// `stdout`, `off`, or a file path. One JSON line per request, written off the request path.
    pub path: String,
    /// Fraction of requests logged, 0.0 to 1.0.
    pub sample: f64,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            path: "off".into(),
            sample: 1.0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Weighted,
    LeastRequests,
    ConsistentHash,
    /// The lower of two random targets' recent latency (a peak-sensitive moving average) times
    /// their outstanding requests.
    PeakEwma,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp(bool),
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2: negotiated by ALPN over TLS, prior knowledge (h2c) over plain TCP.
    H2,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub balance: Balance,
    /// Only for `consistent_hash`: `{header: NAME}`, `{cookie: NAME}` or `{client_ip: true}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// TLS to the targets; omit for plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsConfig>,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Active checks: each target is probed on its own; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive checks: a target whose requests keep failing is ejected for a while (also
    /// `outlier`).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "outlier")]
    pub outlier_detection: Option<OutlierConfig>,
    /// Fast 503s instead of requests to a pool that is failing or at its concurrency limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerConfig>,
    /// How many retries the pool may take on top of its requests.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// Below this share of usable (healthy, not ejected) targets, every target is used again:
    /// a wrongly failing health check cannot take the whole pool down.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: Percent,
}

fn default_panic_threshold() -> Percent {
    Percent(0.5)
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// An HTTP request; the answer's status decides.
    #[default]
    Http,
    /// A TCP connection that opens.
    Tcp,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InitialHealth {
    /// A new target gets traffic at once.
    #[default]
    Healthy,
    /// A new target gets no traffic before its first passing probes.
    Unhealthy,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    /// `http`: the path probed.
    pub path: String,
    /// `http`: the statuses that pass, as codes or ranges (`"200-299"`, `"301"`).
    pub expect_status: Vec<String>,
    pub interval: Duration,
    /// Each wait is shortened or lengthened by up to this share, so probes of many targets do
    /// not move in step.
    pub jitter: Percent,
    pub timeout: Duration,
    /// Consecutive passing probes that make an unhealthy target healthy (also `healthy`).
    #[serde(alias = "healthy")]
    pub healthy_threshold: u32,
    /// Consecutive failing probes that make a healthy target unhealthy (also `unhealthy`).
    #[serde(alias = "unhealthy")]
    pub unhealthy_threshold: u32,
    pub initial: InitialHealth,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthCheckKind::Http,
            path: "/".into(),
            expect_status: vec!["200-399".into()],
            interval: Duration::from_secs(5),
            jitter: Percent(0.1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            initial: InitialHealth::Healthy,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive failed requests (a 5xx, a failed connection, a reset, a timeout) that eject
    /// a target.
    pub consecutive_failures: u32,
    /// The first ejection's length; each repeat doubles it, up to `max_ejection_time` (also
    /// `base_ejection`).
    #[serde(alias = "base_ejection")]
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// At most this share of the pool is ejected at once (one target always may be).
    pub max_ejection_percent: Percent,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: Percent(0.5),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Concurrent requests to the pool; beyond it a fast 503 (also `max_concurrent`).
    #[serde(alias = "max_concurrent")]
    pub max_requests: u32,
    /// Opens the breaker when this share of the window's requests failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRateConfig>,
    /// Opens the breaker after this many failed requests in a row (also `failure_threshold`).
    #[serde(skip_serializing_if = "Option::is_none", alias = "failure_threshold")]
    pub consecutive_failures: Option<u32>,
    /// How long the breaker stays open; doubles on each re-open, up to `max_open_duration`
    /// (also `open_for`).
    #[serde(alias = "open_for")]
    pub open_duration: Duration,
    pub max_open_duration: Duration,
    /// Requests let through at once while half-open, to find out whether the pool recovered.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            max_requests: 1024,
            failure_rate: None,
            consecutive_failures: None,
            open_duration: Duration::from_secs(10),
            max_open_duration: Duration::from_secs(300),
            half_open_probes: 3,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailureRateConfig {
    pub threshold: Percent,
    /// Requests the window must hold before the rate counts.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_failure_window")]
    pub window: Duration,
}

fn default_min_requests() -> u32 {
    20
}

fn default_failure_window() -> Duration {
    Duration::from_secs(10)
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Retries may add this share of the pool's requests...
    pub percent: Percent,
    /// ...and at least this many per second.
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: Percent(0.2),
            min_per_second: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `IP:PORT`, or `HOST:PORT`: a host name is resolved in the background (`server.dns`), and
    /// each of its addresses is a target with this weight.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Server name sent in the TLS handshake and checked against the certificate.
    pub sni: String,
    /// Verify the upstream's certificate chain and name. On unless set to false.
    #[serde(default = "default_true")]
    pub verify: bool,
    /// PEM file of CA certificates to trust instead of the system store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    pub connect: Duration,
    /// Longest wait for each read from the upstream.
    pub read: Duration,
    /// Longest wait for each write to the upstream.
    pub write: Duration,
    /// How long an idle pooled connection is kept.
    pub idle: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: Duration::from_secs(1),
            read: Duration::from_secs(30),
            write: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

/// A filter instance: the same `{kind, config}` shape in YAML and in PostgreSQL.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub kind: String,
    /// A name for this filter instance; the admin API addresses the global chain's filters by
    /// it (default: the kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
}

impl JsonSchema for FilterConfig {
    fn schema_name() -> String {
        "Filter".into()
    }

    /// Any registered kind with its config; the schema of each kind's config comes from the
    /// registry, in [`filter_schema`].
    fn json_schema(generator: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        filter_schema(&crate::filter_registry(), generator)
    }
}

/// What a filter's `name` may be: a letter or digit, then letters, digits, `_`, `.` and `-`.
pub const FILTER_NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]*$";

/// Whether `name` matches [`FILTER_NAME_PATTERN`].
pub fn is_filter_name(name: &str) -> bool {
    let mut characters = name.chars();
    characters
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && characters.all(|character| {
            character.is_ascii_alphanumeric() || matches!(character, '_' | '.' | '-')
        })
}

/// One `{kind, name, config}` variant per kind of `registry`, each with its own config schema.
pub fn filter_schema(
    registry: &gatehouse_filters::Registry,
    generator: &mut schemars::gen::SchemaGenerator,
) -> schemars::schema::Schema {
    use schemars::schema::{ObjectValidation, Schema, SchemaObject, SubschemaValidation};
    let variants = registry
        .kinds()
        .map(|kind| {
            let config = registry
                .schema(kind, generator)
                .unwrap_or(Schema::Bool(true));
            let kind_schema = SchemaObject {
                const_value: Some(serde_json::Value::String(kind.into())),
                ..Default::default()
            };
            let mut name_schema = SchemaObject {
                instance_type: Some(schemars::schema::InstanceType::String.into()),
                string: Some(Box::new(schemars::schema::StringValidation {
                    pattern: Some(FILTER_NAME_PATTERN.into()),
                    ..Default::default()
                })),
                ..Default::default()
            };
            name_schema.metadata().description = Some(
                "A name for this filter instance; the admin API addresses the global chain's filters by it (default: the kind)."
                    .into(),
            );
            let mut object = SchemaObject {
                instance_type: Some(schemars::schema::InstanceType::Object.into()),
                object: Some(Box::new(ObjectValidation {
                    properties: [
                        ("kind".to_string(), Schema::Object(kind_schema)),
                        ("name".to_string(), Schema::Object(name_schema)),
                        ("config".to_string(), config),
                    ]
                    .into_iter()
                    .collect(),
                    required: ["kind".to_string()].into_iter().collect(),
                    additional_properties: Some(Box::new(Schema::Bool(false))),
                    ..Default::default()
                })),
                ..Default::default()
            };
            object.metadata().title = Some(kind.to_string());
            Schema::Object(object)
        })
        .collect();
    Schema::Object(SchemaObject {
        subschemas: Some(Box::new(SubschemaValidation {
            one_of: Some(variants),
            ..Default::default()
        })),
        ..Default::default()
    })
}

/// A route's optional metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteMetricsConfig {
    /// Count requests by consumer too, in `gatehouse_consumer_requests_total{route,consumer,
    /// status_class}`. The label takes at most 1000 consumers per route; later ones are counted
    /// as `(other)`, and requests without a consumer as `(anonymous)`.
    #[serde(default)]
    pub per_consumer: bool,
}

impl RouteMetricsConfig {
    fn is_default(&self) -> bool {
        *self == RouteMetricsConfig::default()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Higher first; among equal priorities the most specific match wins.
    #[serde(default)]
    pub priority: i32,
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    pub upstream: String,
    /// Remove this prefix from the path before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_prefix: Option<String>,
    /// Replace the path, e.g. `/v${version}/u/${id}` with captures of a regex path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// `required`: a request no auth filter identified gets 401. `optional`: it goes on (as the
    /// anonymous consumer, if one is set). Unset: auth filters identify callers but nothing is
    /// enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
    /// The whole exchange with the upstream, across every attempt, until the response head;
    /// past it a 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Used when `upstream` has no usable target or its circuit breaker is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// When to try again, on another target. Without it, only a failed connection (nothing
    /// reached the upstream) is tried once more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    /// Shares of the traffic sent to other upstreams (percent weights); the rest goes to
    /// `upstream`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitConfig>,
    /// A copy of the requests, sent without waiting, whose answers are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorConfig>,
    /// `Server-Timing` on this route's responses (default: `telemetry.server_timing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_timing: Option<bool>,
    /// What this route adds to `/metrics` beyond its default rows.
    #[serde(default, skip_serializing_if = "RouteMetricsConfig::is_default")]
    pub metrics: RouteMetricsConfig,
    /// WebSocket upgrades: `true` (or `{idle_timeout, max_lifetime}`) accepts them on this
    /// route; elsewhere an `Upgrade` request is refused with 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocketConfig>,
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
}

/// A route's WebSocket setting: `true`/`false`, or the limits of its connections.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(untagged)]
pub enum WebSocketConfig {
    Enabled(bool),
    Limits(WebSocketLimits),
}

/// The limits of a route's WebSocket connections.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebSocketLimits {
    /// Closed (with a close frame, 1001) when neither side has sent anything for this long.
    #[serde(default = "default_websocket_idle")]
    pub idle_timeout: Duration,
    /// Closed (with a close frame, 1001) this long after the upgrade, however busy.
    #[serde(default = "default_websocket_lifetime")]
    pub max_lifetime: Duration,
}

impl Default for WebSocketLimits {
    fn default() -> Self {
        WebSocketLimits {
            idle_timeout: default_websocket_idle(),
            max_lifetime: default_websocket_lifetime(),
        }
    }
}

fn default_websocket_idle() -> Duration {
    Duration::from_secs(300)
}

fn default_websocket_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl WebSocketConfig {
    /// The limits, when upgrades are accepted.
    pub fn limits(&self) -> Option<WebSocketLimits> {
        match self {
            WebSocketConfig::Enabled(true) => Some(WebSocketLimits::default()),
            WebSocketConfig::Enabled(false) => None,
            WebSocketConfig::Limits(limits) => Some(limits.clone()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// The connection to the target failed: nothing reached it.
    ConnectFailure,
    /// The target closed or reset the connection before the response head.
    Reset,
    /// The target did not answer within `per_try_timeout` (or its read timeout).
    Timeout,
    /// The target answered 502, 503 or 504.
    GatewayError,
    /// The target answered this status.
    Status(u16),
}

impl RetryOn {
    const KINDS: [(&'static str, RetryOn); 4] = [
        ("connect_failure", RetryOn::ConnectFailure),
        ("reset", RetryOn::Reset),
        ("timeout", RetryOn::Timeout),
        ("gateway_error", RetryOn::GatewayError),
    ];
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u16),
            Text(String),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Number(status) => status.to_string(),
            Raw::Text(text) => text,
        };
        if let Some((_, kind)) = RetryOn::KINDS.iter().find(|(name, _)| *name == text) {
            return Ok(*kind);
        }
        match text.trim().parse::<u16>() {
            Ok(status) if (100..=599).contains(&status) => Ok(RetryOn::Status(status)),
            _ => Err(serde::de::Error::custom(format!(
                "\"{text}\" is not connect_failure, reset, timeout, gateway_error or an HTTP status"
            ))),
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryOn::Status(status) => serializer.serialize_str(&status.to_string()),
            kind => {
                let name = RetryOn::KINDS
                    .iter()
                    .find(|(_, known)| known == kind)
                    .map_or("", |(name, _)| name);
                serializer.serialize_str(name)
            }
        }
    }
}

impl JsonSchema for RetryOn {
    fn schema_name() -> String {
        "RetryOn".into()
    }
    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        use schemars::schema::{InstanceType, SchemaObject, SingleOrVec};
        let mut schema = SchemaObject {
            instance_type: Some(SingleOrVec::Vec(vec![
                InstanceType::String,
                InstanceType::Integer,
            ])),
            ..Default::default()
        };
        schema.metadata().description = Some(
            "connect_failure | reset | timeout | gateway_error (502, 503, 504), or a status like \"503\""
                .into(),
        );
        schemars::schema::Schema::Object(schema)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The failures tried again; a status (`"503"`) in the list is added to `statuses`.
    pub on: Vec<RetryOn>,
    /// Statuses that are tried again too.
    pub statuses: Vec<u16>,
    /// This route's share of retries on top of its requests, in place of the pool's
    /// `retry_budget.percent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<Percent>,
    /// Methods tried again after a target may have seen them; others only on a failed
    /// connection.
    pub methods: Vec<String>,
    /// Each try's deadline for the response head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    pub backoff: BackoffConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::Timeout,
                RetryOn::GatewayError,
            ],
            statuses: Vec::new(),
            budget_percent: None,
            methods: ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
                .map(String::from)
                .to_vec(),
            per_try_timeout: None,
            backoff: BackoffConfig::default(),
        }
    }
}

/// The wait before a retry: a random time up to `base × 2^(retry − 1)`, at most `max`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    pub base: Duration,
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub upstream: String,
    /// Percent of the route's requests.
    pub weight: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub upstream: String,
    /// Share of the route's requests copied.
    #[serde(default = "default_mirror_percent")]
    pub percent: Percent,
}

fn default_mirror_percent() -> Percent {
    Percent(1.0)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Exact host names or `*.example.com` wildcards. Empty: any host.
    pub hosts: Vec<String>,
    /// Any of these paths. Empty: any path.
    pub paths: Vec<PathMatch>,
    /// Any of these methods. Empty: any method.
    pub methods: Vec<String>,
    /// All of these header conditions.
    pub headers: Vec<ValueMatch>,
    /// All of these query parameter conditions.
    pub query: Vec<ValueMatch>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PathMatch {
    /// The path equals this.
    Exact(String),
    /// The path starts with this, at a segment boundary (`/users` matches `/users` and
    /// `/users/7`, not `/usersx`). A prefix that ends with `/` matches anything below it.
    Prefix(String),
    /// A regular expression matched against the whole path; named groups may be used by
    /// `rewrite`.
    Regex(String),
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A name → value map in config, kept ordered so hashes are stable.
pub type OrderedMap = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Required,
    Optional,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialConfig {
    /// An API key, stored only as `sha256:<hex>` or `hmac-sha256:<hex>` (see `gatehouse keygen`).
    ApiKey {
        hash: String,
        #[serde(default)]
        disabled: bool,
        /// RFC 3339 time after which the key is refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
    },
    /// Tokens from `issuer` whose subject claim is `subject` identify this consumer.
    Jwt { issuer: String, subject: String },
    /// A client certificate verified by a listener's `client_auth` identifies this consumer
    /// (the `mtls` filter): by its subject common name, or by one of its subject alternative
    /// names (DNS, URI such as a SPIFFE id, or email). Give one of the two.
    Mtls {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        san: Option<String>,
    },
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The consumer id given to requests no filter identified on `auth: optional` routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<String>,
    /// Server secret for `hmac-sha256:` API key hashes; give it as `${env:NAME}` or `${file:/path}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<String>,
    /// Headers that tell the upstream who called. Client-sent copies are always removed.
    pub upstream_headers: IdentityHeaders,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub consumer_id: Option<String>,
    pub consumer_username: Option<String>,
    /// The authenticated subject (e.g. the JWT `sub`).
    pub subject: Option<String>,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            consumer_id: Some("x-consumer-id".into()),
            consumer_username: Some("x-consumer-username".into()),
            subject: Some("x-authenticated-subject".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// One server: `redis://[user:password@]host:port[/db]` (`rediss://` for TLS). A Redis
    /// Cluster: `redis-cluster://[user:password@]host:port[,host:port...]` (seed nodes; the rest
    /// are discovered). Through Sentinel: `redis-sentinel://[user:password@]host:port[,...]/
    /// <service>[/db]`. The password may be a `${env:NAME}` reference.
    pub url: String,
    /// Deadline of every Redis command; past it the caller's failure policy applies.
    #[serde(default = "default_redis_command_timeout")]
    pub command_timeout: Duration,
    #[serde(default = "default_redis_connect_timeout")]
    pub connect_timeout: Duration,
    /// Commands allowed to wait for a connection while Redis is unreachable; beyond it a command
    /// fails at once (and the caller's failure policy applies).
    #[serde(default = "default_redis_max_queue")]
    pub max_queue: usize,
    /// A starting node reports ready only once Redis has connected, or once this has passed
    /// (it is then ready in fallback mode, and `/readyz` says so).
    #[serde(default = "default_redis_ready_timeout")]
    pub ready_timeout: Duration,
}

fn default_redis_ready_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_redis_max_queue() -> usize {
    10_000
}

fn default_redis_command_timeout() -> Duration {
    Duration::from_millis(5)
}

fn default_redis_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
