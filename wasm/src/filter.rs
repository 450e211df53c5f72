//! The `wasm` filter kind: a proxy-wasm module run in each phase of a request. Its config, its
//! build (read, check the SHA-256, compile once per content, start a first instance), and the
//! per-request stream: the checked-out instance and the body it holds while the module pauses.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use gatehouse_filters::units::ByteSize;
use gatehouse_filters::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext, Response,
};
use http::HeaderValue;
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::abi::{Action, BufferType};
use crate::call::{Answer, Dispatched, HttpCaller};
use crate::engine::EPOCH_TICK;
use crate::host::Props;
use crate::instance::{Bounds, Failure, Instance, Outcome};
use crate::plugin::Plugin;
use crate::pool::Pool;

/// What a request gets when its plugin fails.
#[derive(Clone, Copy, Debug, Default, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// A 500 `plugin-failed` problem (or, once the answer's head has gone out, a cut answer).
    #[default]
    Closed,
    /// The plugin is skipped for the rest of that request.
    Open,
}

/// Whether a request gets an instance that served others before it.
#[derive(Clone, Copy, Debug, Default, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Instances are started ahead and reused, one request at a time each.
    #[default]
    Pooled,
    /// Each request gets a fresh instance, dropped after it: nothing one request leaves in the
    /// module's memory is seen by another.
    PerRequest,
}

/// A proxy-wasm (ABI 0.2.1) module, as built by the proxy-wasm SDKs.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The module file (`.wasm`) on this node's disk.
    pub path: String,
    /// The module's SHA-256, in hex. A module with another digest is refused.
    pub sha256: String,
    /// The plugin's name in logs and metrics (`plugin` label) and its `plugin_name` property;
    /// by default the file's name without `.wasm`.
    #[serde(default)]
    pub name: Option<String>,
    /// Handed to the plugin's `on_configure`: a string as it is, anything else as JSON.
    #[serde(default)]
    pub plugin_config: Option<serde_json::Value>,
    /// `closed` (default): a failing plugin answers 500; `open`: it is skipped for that request.
    #[serde(default)]
    pub fail_policy: FailPolicy,
    /// The most memory an instance may grow to (default 16MiB).
    #[serde(default)]
    pub max_memory: Option<ByteSize>,
    /// The longest one callback may run (default 5ms); a start-up call may run 1s or this,
    /// whichever is longer.
    #[serde(default)]
    pub max_cpu_per_call: Option<String>,
    /// `pooled` (default) or `per_request`.
    #[serde(default)]
    pub isolation: Isolation,
    /// How many started instances wait for requests at most (default 64).
    #[serde(default)]
    pub max_idle_instances: Option<usize>,
    /// How many instances may be alive at once, idle or serving (default 1024). A request
    /// that finds them all busy gets the fail policy's answer (`unavailable`).
    #[serde(default)]
    pub max_instances: Option<usize>,
}

const DEFAULT_MAX_MEMORY: u64 = 16 << 20;
const DEFAULT_MAX_CPU: std::time::Duration = std::time::Duration::from_millis(5);
const MIN_START_TIME: std::time::Duration = std::time::Duration::from_secs(1);
const DEFAULT_MAX_IDLE: usize = 64;
const DEFAULT_MAX_INSTANCES: usize = 1024;

/// The `wasm` filter.
pub struct Wasm {
    pool: Arc<Pool>,
    fail_open: bool,
}

impl Wasm {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.pool.plugin.name
    }

    /// Instances waiting for requests.
    pub fn idle_instances(&self) -> usize {
        self.pool.idle()
    }
}

/// Makes the `http_call`s of every plugin (set once by the gateway at start). Without one, a
/// call fails as a refused connection would.
pub fn set_http_caller(caller: Arc<dyn HttpCaller>) {
    let _ = CALLER.set(caller);
}

static CALLER: OnceLock<Arc<dyn HttpCaller>> = OnceLock::new();

impl FilterKind for Wasm {
    const KIND: &'static str = "wasm";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        if config.path.is_empty() {
            errors.push(BuildError::new("path", "the module's path is required"));
        }
        let expected = config.sha256.trim().to_ascii_lowercase();
        if expected.len() != 64 || !expected.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            errors.push(BuildError::new(
                "sha256",
                "the module's SHA-256 is required, as 64 hex digits",
            ));
        }
        let max_memory = config.max_memory.map_or(DEFAULT_MAX_MEMORY, |size| size.0);
        if !(64 << 10..=4 << 30).contains(&max_memory) {
            errors.push(BuildError::new(
                "max_memory",
                "must be between 64KiB and 4GiB",
            ));
        }
        let max_cpu = match &config.max_cpu_per_call {
            None => DEFAULT_MAX_CPU,
            Some(text) => match humantime::parse_duration(text.trim()) {
                Ok(duration) if duration >= EPOCH_TICK && duration <= MIN_START_TIME * 10 => {
                    duration
                }
                Ok(_) => {
                    errors.push(BuildError::new(
                        "max_cpu_per_call",
                        "must be between 1ms and 10s",
                    ));
                    DEFAULT_MAX_CPU
                }
                Err(_) => {
                    errors.push(BuildError::new(
                        "max_cpu_per_call",
                        format!("\"{text}\" is not a duration (like \"5ms\")"),
                    ));
                    DEFAULT_MAX_CPU
                }
            },
        };
        let configuration = match &config.plugin_config {
            None | Some(serde_json::Value::Null) => Bytes::new(),
            Some(serde_json::Value::String(text)) => Bytes::from(text.clone()),
            Some(value) => Bytes::from(value.to_string()),
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let bytes = std::fs::read(&config.path).map_err(|error| {
            vec![BuildError::new(
                "path",
                format!("cannot read the module {}: {error}", config.path),
            )]
        })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != expected {
            return Err(vec![BuildError::new(
                "sha256",
                format!(
                    "the module {} has SHA-256 {actual}, not the configured {expected}; \
                     it is refused",
                    config.path
                ),
            )]);
        }
        let compiled = crate::engine::compile(&bytes, &actual)
            .map_err(|message| vec![BuildError::new("path", message)])?;
        let name = config.name.clone().unwrap_or_else(|| {
            std::path::Path::new(&config.path)
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_else(|| "wasm".to_string())
        });
        let failures = ctx.metrics.counters(
            "gatehouse_wasm_failures_total",
            "Calls into wasm plugins that failed, by plugin and reason (trap, timeout, memory, \
             limit, start, unavailable)",
            &["plugin", "reason"],
        );
        let plugin = Arc::new(Plugin::new(
            name,
            configuration,
            ctx.gateway_headers.clone(),
            failures,
        ));
        let bounds = Bounds {
            max_memory: max_memory as usize,
            call_cpu: max_cpu,
            start_cpu: max_cpu.max(MIN_START_TIME),
        };
        let first = Instance::start(&compiled, plugin.clone(), bounds).map_err(|failure| {
            vec![BuildError::new(
                "",
                format!("the plugin {} {failure}", plugin.name),
            )]
        })?;
        let pool = Pool::new(
            compiled,
            plugin,
            bounds,
            config.isolation == Isolation::Pooled,
            config.max_idle_instances.unwrap_or(DEFAULT_MAX_IDLE),
            config.max_instances.unwrap_or(DEFAULT_MAX_INSTANCES).max(1),
            first,
        );
        Ok(Wasm {
            pool,
            fail_open: config.fail_policy == FailPolicy::Open,
        })
    }
}

/// One request's use of the plugin.
struct Stream {
    pool: Arc<Pool>,
    /// `None` once the instance failed (it is dropped, never given back).
    instance: Option<Instance>,
    context: u32,
    /// The body the module paused for so far.
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    /// A body replacing the upstream's: the plugin answered, or failed, in the response phase.
    replacement: Option<Bytes>,
    /// An `http_call` the module waits for.
    pending: Option<Dispatched>,
    /// A call is under way (the request may be dropped while it waits).
    calling: bool,
    /// Calls made so far.
    calls: usize,
}

/// The most `http_call`s one request's plugin may make, one after the other.
const MAX_CALLS: usize = 8;
/// The most of an answer's body a plugin may hold while it pauses.
const MAX_HELD_RESPONSE: usize = 16 << 20;

impl Drop for Stream {
    fn drop(&mut self) {
        if self.calling || self.pending.is_some() {
            // The module still waits for an answer it will never get: its state for this
            // request would stay behind, so the instance goes with the request.
            return;
        }
        if let Some(mut instance) = self.instance.take() {
            match instance.end(self.context) {
                Ok(()) => self.pool.give_back(instance),
                Err(failure) => self
                    .pool
                    .plugin
                    .failed(failure.reason(), &format!("ending a request: {failure}")),
            }
        }
    }
}

fn request_has_no_body(request: &RequestHeader) -> bool {
    if request
        .headers
        .contains_key(http::header::TRANSFER_ENCODING)
    {
        return false;
    }
    match request.headers.get(http::header::CONTENT_LENGTH) {
        Some(length) => length.as_bytes() == b"0",
        None => true,
    }
}

impl Wasm {
    /// Counts and logs `failure`; the decision the fail policy gives the request.
    fn failed(&self, failure: &Failure) -> Decision {
        if !matches!(failure, Failure::Start(_)) {
            // A start failure was counted where the start failed.
            self.pool
                .plugin
                .failed(failure.reason(), &failure.to_string());
        }
        if self.fail_open {
            Decision::Continue
        } else {
            Decision::Reject(self.problem())
        }
    }

    fn problem(&self) -> Problem {
        Problem::new(ProblemType::PluginFailed).detail(format!(
            "The plugin {} failed on this request",
            self.pool.plugin.name
        ))
    }

    /// After the request head went through the module: answer, wait for a call, or go on.
    fn after_request(
        &self,
        outcome: Outcome,
        mut stream: Stream,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        let decision = if let Some(mut local) = outcome.local {
            // The plugin's answer carries the request id, as the gateway's own answers do.
            let header = ctx
                .request_id_header
                .clone()
                .unwrap_or(http::HeaderName::from_static("x-request-id"));
            if let Ok(id) = HeaderValue::from_str(ctx.request_id()) {
                local.headers.push((header, id));
            }
            Some(Decision::Respond(local))
        } else if let Some(call) = outcome.call {
            stream.pending = Some(call);
            None
        } else if outcome.action == Action::Pause {
            // Paused with nothing to wait for: the request would never go on.
            stream.instance = None;
            Some(self.failed(&Failure::Stalled))
        } else {
            Some(Decision::Continue)
        };
        ctx.set_instance_state(self, stream);
        decision
    }

    fn body(
        &self,
        kind: BufferType,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<Option<Response>, Failure> {
        let Some(stream) = ctx.instance_state::<_, Stream>(self) else {
            return Ok(None);
        };
        if kind == BufferType::ResponseBody {
            if let Some(replacement) = &mut stream.replacement {
                *body = (!replacement.is_empty()).then(|| std::mem::take(replacement));
                return Ok(None);
            }
        }
        let context = stream.context;
        let Some(instance) = stream.instance.as_mut() else {
            return Ok(None);
        };
        let held = match kind {
            BufferType::RequestBody => &mut stream.request_body,
            _ => &mut stream.response_body,
        };
        if let Some(piece) = body.take() {
            if kind == BufferType::ResponseBody && held.len() + piece.len() > MAX_HELD_RESPONSE {
                stream.instance = None;
                stream.response_body = Vec::new();
                return Err(Failure::Limit("held answer body"));
            }
            held.extend_from_slice(&piece);
        }
        let mut buffer = std::mem::take(held);
        match instance.body(context, kind, &mut buffer, end_of_stream) {
            Ok(outcome) => {
                if outcome.action == Action::Pause && !end_of_stream {
                    *held = buffer;
                    if kind == BufferType::RequestBody {
                        // An empty piece, not none: the proxy reads none as the body's end.
                        *body = Some(Bytes::new());
                    }
                } else if !buffer.is_empty() {
                    *body = Some(Bytes::from(buffer));
                }
                Ok(outcome.local)
            }
            Err(failure) => {
                stream.instance = None;
                if self.fail_open && !buffer.is_empty() {
                    *body = Some(Bytes::from(buffer));
                }
                Err(failure)
            }
        }
    }
}

#[async_trait]
impl Filter for Wasm {
    fn kind(&self) -> &'static str {
        "wasm"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::REQUEST_BODY | Phases::RESPONSE | Phases::RESPONSE_BODY
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        let mut instance = match self.pool.checkout() {
            Ok(instance) => instance,
            Err(failure) => return Some(self.failed(&failure)),
        };
        let props = Props {
            method: Some(request.method.clone()),
            uri: Some(request.uri.clone()),
            host: request.headers.get(http::header::HOST).cloned(),
            https: ctx.client_tls,
            source: ctx.client_addr,
            route: ctx.route.clone(),
            upstream: ctx.upstream.clone(),
            consumer: ctx.consumer.as_ref().map(|consumer| consumer.id.clone()),
            request_id: ctx
                .request_id_if_set()
                .and_then(|id| HeaderValue::from_str(id).ok()),
            status: None,
            custom: Vec::new(),
        };
        let context = match instance.begin(props) {
            Ok(context) => context,
            Err(failure) => return Some(self.failed(&failure)),
        };
        let no_body = request_has_no_body(request);
        if !no_body && instance.wants_request_body() {
            // The module may change the body: its framing is settled after it.
            ctx.buffers_request_body = true;
        }
        let outcome = instance.request_headers(context, request, no_body);
        let stream = Stream {
            pool: self.pool.clone(),
            instance: Some(instance),
            context,
            request_body: Vec::new(),
            response_body: Vec::new(),
            replacement: None,
            pending: None,
            calling: false,
            calls: 0,
        };
        match outcome {
            Ok(outcome) => self.after_request(outcome, stream, ctx),
            Err(failure) => {
                let mut stream = stream;
                stream.instance = None;
                Some(self.failed(&failure))
            }
        }
    }

    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        let pending = ctx
            .instance_state::<_, Stream>(self)
            .and_then(|stream| stream.pending.take());
        let Some(mut call) = pending else {
            if let Some(decision) = self.try_request(request, ctx) {
                return decision;
            }
            return Box::pin(self.request(request, ctx)).await;
        };
        loop {
            let token = call.token;
            match ctx.instance_state::<_, Stream>(self) {
                Some(stream) if stream.calls < MAX_CALLS => {
                    stream.calls += 1;
                    stream.calling = true;
                }
                Some(stream) => {
                    stream.instance = None;
                    return self.failed(&Failure::Limit("http_calls per request"));
                }
                None => return Decision::Continue,
            }
            let answer = match CALLER.get() {
                Some(caller) => caller.call(call).await,
                None => Answer::default(),
            };
            let Some(mut stream) = ctx.take_instance_state::<_, Stream>(self) else {
                return Decision::Continue;
            };
            stream.calling = false;
            let Some(instance) = stream.instance.as_mut() else {
                return Decision::Continue;
            };
            match instance.call_response(stream.context, token, answer, request) {
                Ok(outcome) => {
                    if outcome.local.is_none() && outcome.call.is_none() {
                        if outcome.action == Action::Pause {
                            // Neither resumed nor answered: the request would wait forever.
                            stream.instance = None;
                            ctx.set_instance_state(self, stream);
                            return self.failed(&Failure::Stalled);
                        }
                        ctx.set_instance_state(self, stream);
                        return Decision::Continue;
                    }
                    match self.after_request(outcome, stream, ctx) {
                        Some(decision) => return decision,
                        None => {
                            call = match ctx
                                .instance_state::<_, Stream>(self)
                                .and_then(|stream| stream.pending.take())
                            {
                                Some(call) => call,
                                None => return Decision::Continue,
                            };
                        }
                    }
                }
                Err(failure) => {
                    stream.instance = None;
                    return self.failed(&failure);
                }
            }
        }
    }

    fn request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        match self.body(BufferType::RequestBody, body, end_of_stream, ctx) {
            Ok(None) => Ok(()),
            Ok(Some(local)) => Err(Problem::answer(local)),
            Err(failure) => match self.failed(&failure) {
                Decision::Reject(problem) => Err(problem),
                _ => Ok(()),
            },
        }
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        let own_answer = ctx.own_answer;
        let Some(stream) = ctx.instance_state::<_, Stream>(self) else {
            return;
        };
        let context = stream.context;
        let Some(instance) = stream.instance.as_mut() else {
            return;
        };
        let answer = match instance.response_headers(context, response, false) {
            Ok(outcome) => match outcome.local {
                Some(_) if own_answer => {
                    self.pool.plugin.unsupported(
                        "a local response in place of the gateway's own answer (it stands)",
                    );
                    return;
                }
                Some(local) => local,
                None => return,
            },
            Err(failure) if own_answer => {
                // The gateway's own answer (a refusal, an error) stands.
                stream.instance = None;
                self.failed(&failure);
                return;
            }
            Err(failure) => {
                stream.instance = None;
                match self.failed(&failure) {
                    Decision::Reject(problem) => {
                        let id = ctx.request_id().to_string();
                        let header = ctx
                            .request_id_header
                            .clone()
                            .unwrap_or(http::HeaderName::from_static("x-request-id"));
                        problem.into_response(&id, &header)
                    }
                    _ => return,
                }
            }
        };
        // The answer replaces the upstream's, head and body. An upstream answer without a body
        // (204, 304, a zero length) gets no body phase, so the new one has none either.
        let status = response.status.as_u16();
        let bodiless = status == 204
            || status == 304
            || response
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() == b"0");
        let names: Vec<http::HeaderName> = response.headers.keys().cloned().collect();
        for name in names {
            response.remove_header(&name);
        }
        let _ = response.set_status(answer.status);
        for (name, value) in answer.headers {
            let _ = response.append_header(name, value);
        }
        let body = if bodiless { Bytes::new() } else { answer.body };
        if answer.status != 204 && answer.status != 304 {
            let _ = response.insert_header(http::header::CONTENT_LENGTH, body.len());
        }
        if let Some(stream) = ctx.instance_state::<_, Stream>(self) {
            stream.replacement = Some(body);
        }
    }

    fn response_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) {
        match self.body(BufferType::ResponseBody, body, end_of_stream, ctx) {
            Ok(None) => {}
            Ok(Some(_)) => self
                .pool
                .plugin
                .unsupported("a local response after the answer's head went out"),
            Err(failure) => {
                if !self.fail_open {
                    // The head went out: all that is left is to cut the answer short, so
                    // the client sees it unfinished rather than missing a part.
                    *body = None;
                    ctx.abort_response = Some("a wasm plugin failed on the answer's body");
                }
                self.failed(&failure);
            }
        }
    }
}
