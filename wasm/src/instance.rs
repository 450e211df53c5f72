//! One instance of a module: its store, the callbacks it exports, and the proxy-wasm context
//! lifecycle (root context at start, one HTTP context per request). Every call into the module
//! runs under the epoch deadline and the memory limiter; a failed call says why.

use std::sync::Arc;

use gatehouse_filters::Response;
use pingora_http::{RequestHeader, ResponseHeader};
use std::cell::Cell;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap, TypedFunc, UpdateDeadline, WasmParams, WasmResults};

use crate::abi::{Action, BufferType};
use crate::call::{Answer, Dispatched};
use crate::engine::{Compiled, EPOCH_TICK};
use crate::host::{Host, HostTrap, Props};
use crate::plugin::Plugin;

/// The root context's id in every instance.
const ROOT: u32 = 1;

/// Why a call into a module failed.
#[derive(Debug)]
pub enum Failure {
    /// The module trapped (a panic, `unreachable`, a bad memory access, a stack overflow).
    Trap(String),
    /// It ran past `max_cpu_per_call`.
    Timeout,
    /// It tried to grow its memory past `max_memory`.
    Memory,
    /// It went past one of the host's size caps.
    Limit(&'static str),
    /// It could not be started: instantiation failed, or it refused its configuration.
    Start(String),
    /// It paused a request with nothing to wait for (no call, no answer), so the request
    /// would never go on.
    Stalled,
    /// No instance: the last start failed and its backoff runs, or `max_instances` are alive.
    Unavailable,
}

impl Failure {
    /// The `reason` label of `gatehouse_wasm_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Trap(_) => "trap",
            Failure::Timeout => "timeout",
            Failure::Memory => "memory",
            Failure::Limit(_) => "limit",
            Failure::Start(_) => "start",
            Failure::Stalled => "stalled",
            Failure::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Trap(message) => write!(formatter, "trapped: {message}"),
            Failure::Timeout => formatter.write_str("ran past max_cpu_per_call"),
            Failure::Memory => formatter.write_str("tried to grow its memory past max_memory"),
            Failure::Limit(what) => write!(formatter, "{what} over its size cap"),
            Failure::Start(message) => write!(formatter, "could not start: {message}"),
            Failure::Stalled => formatter.write_str("paused the request with nothing to wait for"),
            Failure::Unavailable => formatter
                .write_str("no instance: a start failed and is backed off, or all are busy"),
        }
    }
}

/// How calls into instances are bounded.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub max_memory: usize,
    /// The CPU time a callback may use.
    pub call_cpu: Duration,
    /// The CPU time each start-up call (`_initialize`, `on_vm_start`, `on_configure`) may use.
    pub start_cpu: Duration,
}

/// Epoch ticks (wall time) until the CPU time used is next checked, for `remaining` CPU time.
fn ticks(remaining: Duration) -> u64 {
    (remaining.as_micros().div_ceil(EPOCH_TICK.as_micros()) as u64).max(1)
}

/// This thread's CPU time at a moment.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    at: Instant,
    cpu: Duration,
}

/// How old a thread's CPU time sample may be when a call starts: the slack of the CPU count.
const SAMPLE_AGE: Duration = Duration::from_millis(1);

thread_local! {
    static SAMPLE: Cell<Option<CpuSample>> = const { Cell::new(None) };
}

/// A sample of this thread's CPU time at most [`SAMPLE_AGE`] old (reading the CPU clock is a
/// system call; a call into a module is far cheaper than that, so it is read once per
/// millisecond per thread, not per call).
fn recent_sample(now: Instant) -> Option<CpuSample> {
    SAMPLE.with(|sample| {
        if let Some(kept) = sample.get() {
            if now.duration_since(kept.at) <= SAMPLE_AGE {
                return Some(kept);
            }
        }
        let fresh = CpuSample {
            at: now,
            cpu: thread_cpu_time()?,
        };
        sample.set(Some(fresh));
        Some(fresh)
    })
}

/// Arms the deadline of the next call: `budget` of this thread's CPU time. When the epoch
/// deadline (wall time) passes, the CPU time used decides: over budget, the call is
/// interrupted; under it (the thread was preempted), the deadline moves by what is left.
fn arm(store: &mut Store<Host>, budget: Duration) {
    let now = Instant::now();
    let host = store.data_mut();
    host.cpu_budget = budget;
    host.call_started = now;
    host.cpu_sample = recent_sample(now);
    host.limits.memory_refused = false;
    store.set_epoch_deadline(ticks(budget));
}

/// The CPU time this thread has used.
fn thread_cpu_time() -> Option<Duration> {
    cpu_time::ThreadTime::try_now()
        .ok()
        .map(|now| now.as_duration())
}

fn on_deadline(store: wasmtime::StoreContextMut<'_, Host>) -> wasmtime::Result<UpdateDeadline> {
    let host = store.data();
    let (Some(sample), Some(now)) = (host.cpu_sample, thread_cpu_time()) else {
        return Ok(UpdateDeadline::Interrupt);
    };
    // The thread's CPU time since the sample, less what it could have used before the call.
    let before_call = host.call_started.saturating_duration_since(sample.at);
    let used = now.saturating_sub(sample.cpu).saturating_sub(before_call);
    if used >= host.cpu_budget {
        Ok(UpdateDeadline::Interrupt)
    } else {
        Ok(UpdateDeadline::Continue(ticks(host.cpu_budget - used)))
    }
}

type Callback3 = TypedFunc<(u32, u32, u32), u32>;
/// `on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponse = TypedFunc<(u32, u32, u32, u32, u32), ()>;

struct Exports {
    on_context_create: TypedFunc<(u32, u32), ()>,
    on_request_headers: Option<Callback3>,
    on_request_body: Option<Callback3>,
    on_response_headers: Option<Callback3>,
    on_response_body: Option<Callback3>,
    on_done: Option<TypedFunc<u32, u32>>,
    on_log: Option<TypedFunc<u32, ()>>,
    on_delete: Option<TypedFunc<u32, ()>>,
    on_tick: Option<TypedFunc<u32, ()>>,
    on_http_call_response: Option<CallResponse>,
}

/// What a request or response callback decided.
pub struct Outcome {
    pub action: Action,
    /// The module answered the request itself.
    pub local: Option<Response>,
    /// The module called out and waits for the answer.
    pub call: Option<Dispatched>,
}

pub struct Instance {
    store: Store<Host>,
    exports: Exports,
    next_context: u32,
    bounds: Bounds,
    /// Counts the instance among its pool's live ones while it exists.
    pub live: Option<Live>,
}

/// One live instance of a pool: the count goes down when the instance is dropped.
pub struct Live(pub Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Instance {
    /// Instantiates the module and runs `_initialize`, `on_vm_start` and `on_configure`.
    pub fn start(
        compiled: &Compiled,
        plugin: Arc<Plugin>,
        bounds: Bounds,
    ) -> Result<Instance, Failure> {
        let configuration_size = plugin.configuration.len() as u32;
        let mut store = Store::new(
            crate::engine::engine(),
            Host::new(plugin, bounds.max_memory),
        );
        store.limiter(|host| &mut host.limits);
        store.epoch_deadline_callback(on_deadline);
        arm(&mut store, bounds.start_cpu);
        let instance = compiled
            .pre
            .instantiate(&mut store)
            .map_err(|error| start_failure(&mut store, error))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| Failure::Start("the module exports no memory".into()))?;
        let allocate = instance
            .get_typed_func::<u32, u32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<u32, u32>(&mut store, "malloc"))
            .map_err(|_| Failure::Start("the module exports no proxy_on_memory_allocate".into()))?;
        store.data_mut().memory = Some(memory);
        store.data_mut().allocate = Some(allocate);
        if let Ok(initialize) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            arm(&mut store, bounds.start_cpu);
            initialize
                .call(&mut store, ())
                .map_err(|error| start_failure(&mut store, error))?;
        }
        let optional3 = |store: &mut Store<Host>, name: &str| {
            instance
                .get_typed_func::<(u32, u32, u32), u32>(store, name)
                .ok()
        };
        let exports = Exports {
            on_context_create: instance
                .get_typed_func(&mut store, "proxy_on_context_create")
                .map_err(|_| {
                    Failure::Start("the module exports no proxy_on_context_create".into())
                })?,
            on_request_headers: optional3(&mut store, "proxy_on_request_headers"),
            on_request_body: optional3(&mut store, "proxy_on_request_body"),
            on_response_headers: optional3(&mut store, "proxy_on_response_headers"),
            on_response_body: optional3(&mut store, "proxy_on_response_body"),
            on_done: instance.get_typed_func(&mut store, "proxy_on_done").ok(),
            on_log: instance.get_typed_func(&mut store, "proxy_on_log").ok(),
            on_delete: instance.get_typed_func(&mut store, "proxy_on_delete").ok(),
            on_tick: instance.get_typed_func(&mut store, "proxy_on_tick").ok(),
            on_http_call_response: instance
                .get_typed_func(&mut store, "proxy_on_http_call_response")
                .ok(),
        };
        let vm_start = instance
            .get_typed_func::<(u32, u32), u32>(&mut store, "proxy_on_vm_start")
            .ok();
        let configure = instance
            .get_typed_func::<(u32, u32), u32>(&mut store, "proxy_on_configure")
            .ok();
        let mut started = Instance {
            store,
            exports,
            next_context: ROOT + 1,
            bounds,
            live: None,
        };
        let create = started.exports.on_context_create.clone();
        started.call_start(&create, (ROOT, 0))?;
        if let Some(vm_start) = vm_start {
            if started.call_start(&vm_start, (ROOT, 0))? == 0 {
                return Err(Failure::Start("on_vm_start returned false".into()));
            }
        }
        if let Some(configure) = configure {
            if started.call_start(&configure, (ROOT, configuration_size))? == 0 {
                return Err(Failure::Start(
                    "the plugin refused its plugin_config (on_configure returned false)".into(),
                ));
            }
        }
        Ok(started)
    }

    /// Whether the module reads request bodies (exports `proxy_on_request_body`).
    pub fn wants_request_body(&self) -> bool {
        self.exports.on_request_body.is_some()
    }

    /// The tick period the root context asked for, if any.
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    fn call_start<P: WasmParams, R: WasmResults>(
        &mut self,
        func: &TypedFunc<P, R>,
        args: P,
    ) -> Result<R, Failure> {
        arm(&mut self.store, self.bounds.start_cpu);
        func.call(&mut self.store, args)
            .map_err(|error| match classify(&mut self.store, error) {
                Failure::Trap(message) => Failure::Start(message),
                other => other,
            })
    }

    /// Creates the HTTP context of a new request; its id.
    pub fn begin(&mut self, props: Props) -> Result<u32, Failure> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT + 1);
        let host = self.store.data_mut();
        host.props = props;
        host.local = None;
        host.call = None;
        host.call_response = None;
        host.resumed = false;
        invoke(
            &mut self.store,
            self.bounds.call_cpu,
            &self.exports.on_context_create,
            (id, ROOT),
        )?;
        Ok(id)
    }

    /// `on_request_headers` with `request` lent to the module.
    pub fn request_headers(
        &mut self,
        context: u32,
        request: &mut RequestHeader,
        end_of_stream: bool,
    ) -> Result<Outcome, Failure> {
        let Some(callback) = self.exports.on_request_headers.as_ref() else {
            return Ok(self.outcome(Action::Continue));
        };
        let count = request.headers.len() as u32 + 4;
        lend_request(&mut self.store, request);
        let result = invoke(
            &mut self.store,
            self.bounds.call_cpu,
            callback,
            (context, count, end_of_stream as u32),
        );
        take_back_request(&mut self.store, request);
        Ok(self.outcome(Action::from_code(result?)))
    }

    /// `on_response_headers` with `response` lent to the module.
    pub fn response_headers(
        &mut self,
        context: u32,
        response: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<Outcome, Failure> {
        let Some(callback) = self.exports.on_response_headers.as_ref() else {
            return Ok(self.outcome(Action::Continue));
        };
        let count = response.headers.len() as u32 + 1;
        let host = self.store.data_mut();
        std::mem::swap(&mut host.response, response);
        host.response_live = true;
        let result = invoke(
            &mut self.store,
            self.bounds.call_cpu,
            callback,
            (context, count, end_of_stream as u32),
        );
        let host = self.store.data_mut();
        std::mem::swap(&mut host.response, response);
        host.response_live = false;
        host.props.status = Some(response.status.as_u16());
        Ok(self.outcome(Action::from_code(result?)))
    }

    /// `on_request_body` or `on_response_body` over `body` (all of the body the module has
    /// paused for so far, with this piece).
    pub fn body(
        &mut self,
        context: u32,
        kind: BufferType,
        body: &mut Vec<u8>,
        end_of_stream: bool,
    ) -> Result<Outcome, Failure> {
        let callback = match kind {
            BufferType::RequestBody => self.exports.on_request_body.as_ref(),
            _ => self.exports.on_response_body.as_ref(),
        };
        let Some(callback) = callback else {
            return Ok(self.outcome(Action::Continue));
        };
        let size = body.len() as u32;
        let host = self.store.data_mut();
        std::mem::swap(&mut host.body, body);
        host.body_kind = Some(kind);
        let result = invoke(
            &mut self.store,
            self.bounds.call_cpu,
            callback,
            (context, size, end_of_stream as u32),
        );
        let host = self.store.data_mut();
        std::mem::swap(&mut host.body, body);
        host.body_kind = None;
        host.body.clear();
        Ok(self.outcome(Action::from_code(result?)))
    }

    /// `on_http_call_response` with the call's answer, `request` lent to the module.
    pub fn call_response(
        &mut self,
        context: u32,
        token: u32,
        answer: Answer,
        request: &mut RequestHeader,
    ) -> Result<Outcome, Failure> {
        let Some(callback) = self.exports.on_http_call_response.as_ref() else {
            return Ok(self.outcome(Action::Continue));
        };
        let headers = answer.headers.len() as u32;
        let body = answer.body.len() as u32;
        let host = self.store.data_mut();
        host.call_response = Some(answer);
        host.resumed = false;
        lend_request(&mut self.store, request);
        let result = invoke(
            &mut self.store,
            self.bounds.call_cpu,
            callback,
            (context, token, headers, body, 0),
        );
        take_back_request(&mut self.store, request);
        self.store.data_mut().call_response = None;
        result?;
        let resumed = std::mem::take(&mut self.store.data_mut().resumed);
        Ok(self.outcome(if resumed {
            Action::Continue
        } else {
            Action::Pause
        }))
    }

    /// `on_done`, `on_log` and `on_delete`: the request is over.
    pub fn end(&mut self, context: u32) -> Result<(), Failure> {
        if let Some(done) = self.exports.on_done.as_ref() {
            invoke(&mut self.store, self.bounds.call_cpu, done, context)?;
        }
        if let Some(log) = self.exports.on_log.as_ref() {
            invoke(&mut self.store, self.bounds.call_cpu, log, context)?;
        }
        if let Some(delete) = self.exports.on_delete.as_ref() {
            invoke(&mut self.store, self.bounds.call_cpu, delete, context)?;
        }
        let host = self.store.data_mut();
        host.props = Props::default();
        host.local = None;
        host.call = None;
        Ok(())
    }

    /// `on_tick` of the root context.
    pub fn tick(&mut self) -> Result<(), Failure> {
        match self.exports.on_tick.as_ref() {
            Some(tick) => invoke(&mut self.store, self.bounds.call_cpu, tick, ROOT),
            None => Ok(()),
        }
    }

    fn outcome(&mut self, action: Action) -> Outcome {
        let host = self.store.data_mut();
        Outcome {
            action,
            local: host.local.take(),
            call: host.call.take(),
        }
    }
}

/// Calls `func` under the CPU `budget`.
fn invoke<P: WasmParams, R: WasmResults>(
    store: &mut Store<Host>,
    budget: Duration,
    func: &TypedFunc<P, R>,
    args: P,
) -> Result<R, Failure> {
    arm(store, budget);
    func.call(&mut *store, args)
        .map_err(|error| classify(store, error))
}

fn lend_request(store: &mut Store<Host>, request: &mut RequestHeader) {
    let host = store.data_mut();
    std::mem::swap(&mut host.request, request);
    host.request_live = true;
}

fn take_back_request(store: &mut Store<Host>, request: &mut RequestHeader) {
    let host = store.data_mut();
    std::mem::swap(&mut host.request, request);
    host.request_live = false;
}

fn classify(store: &mut Store<Host>, error: wasmtime::Error) -> Failure {
    let limits = &mut store.data_mut().limits;
    if let Some(what) = limits.over_cap.take() {
        return Failure::Limit(what);
    }
    if std::mem::take(&mut limits.memory_refused) {
        return Failure::Memory;
    }
    if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
        return Failure::Timeout;
    }
    if let Some(host) = error.downcast_ref::<HostTrap>() {
        return Failure::Trap(host.0.clone());
    }
    Failure::Trap(crate::engine::root_cause(&error))
}

fn start_failure(store: &mut Store<Host>, error: wasmtime::Error) -> Failure {
    match classify(store, error) {
        Failure::Trap(message) => Failure::Start(message),
        other => other,
    }
}
