//! What a module can call: the proxy-wasm ABI 0.2.1 `env` functions and the few WASI functions
//! the SDKs import, over the per-instance [`Host`] state. A call a module makes with a bad
//! pointer, or past a size cap, traps; a call Gatehouse does not support answers a status its
//! SDK expects and is logged once per module.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gatehouse_filters::Response;
use http::{HeaderName, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};
use wasmtime::{Caller, Linker, Memory, ResourceLimiter, TypedFunc};

use crate::abi::{self, BufferType, MapType, Status};
use crate::plugin::Plugin;

/// The most headers a map may hold after a module's changes.
pub const MAX_HEADERS: usize = 500;
/// The longest header name and value (together) a module may write.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The longest serialised header map a module may hand over.
pub const MAX_MAP_BYTES: usize = 256 * 1024;
/// A log line is cut at this length.
pub const MAX_LOG_BYTES: usize = 4096;
/// The most a body buffer may grow to through `set_buffer_bytes`.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

type Result<T> = wasmtime::Result<T>;

/// The state of one instance, reached from the host functions.
pub struct Host {
    pub plugin: Arc<Plugin>,
    pub memory: Option<Memory>,
    pub allocate: Option<TypedFunc<u32, u32>>,
    pub limits: Limits,
    /// The request head while a request callback runs (swapped in and out, never copied).
    pub request: RequestHeader,
    pub request_live: bool,
    /// The response head while a response callback runs.
    pub response: ResponseHeader,
    pub response_live: bool,
    /// The body buffer of the callback under way, and which body it is.
    pub body: Vec<u8>,
    pub body_kind: Option<BufferType>,
    /// What properties answer from for the request under way.
    pub props: Props,
    /// A local response the module asked for in the callback under way.
    pub local: Option<Response>,
    /// The period the root context asked ticks at (0: none).
    pub tick_period_ms: u32,
    /// An `http_call` the module dispatched in the callback under way.
    pub call: Option<crate::call::Dispatched>,
    /// The answer to the last `http_call`, while `on_http_call_response` runs.
    pub call_response: Option<crate::call::Answer>,
    /// The module asked to resume a paused request (`proxy_continue_stream`).
    pub resumed: bool,
    pub next_call_token: u32,
    /// When the call under way started, a sample of this thread's CPU time taken at most a
    /// millisecond before, and the CPU time the call may use.
    pub call_started: std::time::Instant,
    pub cpu_sample: Option<crate::instance::CpuSample>,
    pub cpu_budget: std::time::Duration,
}

/// The request facts properties answer with.
#[derive(Default)]
pub struct Props {
    pub method: Option<http::Method>,
    pub uri: Option<http::Uri>,
    pub host: Option<HeaderValue>,
    pub https: bool,
    pub source: Option<IpAddr>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub consumer: Option<Arc<str>>,
    pub request_id: Option<HeaderValue>,
    pub status: Option<u16>,
    /// What the module set with `proxy_set_property`, for this request.
    pub custom: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Caps the module's memory: the SDKs set no maximum of their own.
pub struct Limits {
    pub max_memory: usize,
    /// Set when a growth was refused, so the trap that follows is told apart.
    pub memory_refused: bool,
    /// Set when a host call went past a size cap.
    pub over_cap: Option<&'static str>,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        if desired > self.max_memory {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl Host {
    pub fn new(plugin: Arc<Plugin>, max_memory: usize) -> Host {
        Host {
            plugin,
            memory: None,
            allocate: None,
            limits: Limits {
                max_memory,
                memory_refused: false,
                over_cap: None,
            },
            request: RequestHeader::build("GET", b"/", None).expect("a valid head"),
            request_live: false,
            response: ResponseHeader::build(200, None).expect("a valid head"),
            response_live: false,
            body: Vec::new(),
            body_kind: None,
            props: Props::default(),
            local: None,
            tick_period_ms: 0,
            call: None,
            call_response: None,
            resumed: false,
            next_call_token: 1,
            call_started: std::time::Instant::now(),
            cpu_sample: None,
            cpu_budget: std::time::Duration::ZERO,
        }
    }
}

/// A trap raised by the host itself: a size cap, a bad pointer, `proc_exit`.
#[derive(Debug)]
pub struct HostTrap(pub String);

impl std::fmt::Display for HostTrap {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for HostTrap {}

fn trap<T>(message: impl Into<String>) -> Result<T> {
    Err(wasmtime::Error::new(HostTrap(message.into())))
}

fn over_cap<T>(caller: &mut Caller<'_, Host>, what: &'static str) -> Result<T> {
    caller.data_mut().limits.over_cap = Some(what);
    trap(format!("{what} over its size cap"))
}

fn memory(caller: &Caller<'_, Host>) -> Result<Memory> {
    match caller.data().memory {
        Some(memory) => Ok(memory),
        None => trap("the module exports no memory"),
    }
}

/// A copy of the module's bytes at `ptr..ptr+len`.
fn read(caller: &Caller<'_, Host>, ptr: u32, len: u32) -> Result<Vec<u8>> {
    let memory = memory(caller)?;
    let data = memory.data(caller);
    let start = ptr as usize;
    match data.get(start..start + len as usize) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => trap("a pointer outside the module's memory"),
    }
}

fn write(caller: &mut Caller<'_, Host>, ptr: u32, bytes: &[u8]) -> Result<()> {
    let memory = memory(caller)?;
    let data = memory.data_mut(caller);
    let start = ptr as usize;
    match data.get_mut(start..start + bytes.len()) {
        Some(place) => {
            place.copy_from_slice(bytes);
            Ok(())
        }
        None => trap("a pointer outside the module's memory"),
    }
}

fn write_u32(caller: &mut Caller<'_, Host>, ptr: u32, value: u32) -> Result<()> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `bytes` to the module: memory it allocates (`proxy_on_memory_allocate`), filled, its
/// address and length written at `ptr_out` and `len_out`. Nothing is allocated for no bytes.
fn give(caller: &mut Caller<'_, Host>, bytes: &[u8], ptr_out: u32, len_out: u32) -> Result<()> {
    let address = if bytes.is_empty() {
        0
    } else {
        let Some(allocate) = caller.data().allocate.clone() else {
            return trap("the module exports no proxy_on_memory_allocate");
        };
        let address = allocate.call(&mut *caller, bytes.len() as u32)?;
        if address == 0 {
            return trap("the module could not allocate memory");
        }
        write(caller, address, bytes)?;
        address
    };
    write_u32(caller, ptr_out, address)?;
    write_u32(caller, len_out, bytes.len() as u32)
}

/// Logs, once per module, that it called something Gatehouse does not support.
fn unsupported(caller: &Caller<'_, Host>, call: &'static str) {
    caller.data().plugin.unsupported(call);
}

fn status(status: Status) -> Result<u32> {
    Ok(status.code())
}

/// Every import a proxy-wasm module may have.
pub fn link(linker: &mut Linker<Host>) -> Result<()> {
    link_env(linker)?;
    link_wasi(linker)?;
    Ok(())
}

fn link_env(linker: &mut Linker<Host>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut caller: Caller<'_, Host>, level: u32, ptr: u32, len: u32| -> Result<u32> {
            let len = len.min(MAX_LOG_BYTES as u32);
            let message = read(&caller, ptr, len)?;
            caller
                .data_mut()
                .plugin
                .log(level, &String::from_utf8_lossy(&message));
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: Caller<'_, Host>, out: u32| -> Result<u32> {
            let level = crate::plugin::log_level();
            write_u32(&mut caller, out, level)?;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, Host>, out: u32| -> Result<u32> {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|since| since.as_nanos() as u64)
                .unwrap_or(0);
            write(&mut caller, out, &now.to_le_bytes())?;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut caller: Caller<'_, Host>, period: u32| -> Result<u32> {
            caller.data_mut().tick_period_ms = period;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: Caller<'_, Host>,
         kind: u32,
         start: u32,
         max: u32,
         ptr_out: u32,
         len_out: u32|
         -> Result<u32> {
            let Some(kind) = BufferType::from_code(kind) else {
                return status(Status::BadArgument);
            };
            let bytes: Bytes = match kind {
                BufferType::PluginConfiguration => caller.data().plugin.configuration.clone(),
                BufferType::VmConfiguration => Bytes::new(),
                BufferType::HttpCallResponseBody => match &caller.data().call_response {
                    Some(answer) => answer.body.clone(),
                    None => return status(Status::NotFound),
                },
                body => {
                    let host = caller.data();
                    if host.body_kind != Some(body) {
                        return status(Status::NotFound);
                    }
                    let from = (start as usize).min(host.body.len());
                    let to = from.saturating_add(max as usize).min(host.body.len());
                    let slice = host.body[from..to].to_vec();
                    give(&mut caller, &slice, ptr_out, len_out)?;
                    return status(Status::Ok);
                }
            };
            let from = (start as usize).min(bytes.len());
            let to = from.saturating_add(max as usize).min(bytes.len());
            give(&mut caller, &bytes[from..to], ptr_out, len_out)?;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: Caller<'_, Host>,
         kind: u32,
         start: u32,
         size: u32,
         ptr: u32,
         len: u32|
         -> Result<u32> {
            let Some(kind) = BufferType::from_code(kind) else {
                return status(Status::BadArgument);
            };
            let data = read(&caller, ptr, len)?;
            let host = caller.data_mut();
            if host.body_kind != Some(kind) {
                return status(Status::NotFound);
            }
            let body = &mut host.body;
            let from = (start as usize).min(body.len());
            let to = from.saturating_add(size as usize).min(body.len());
            if body.len() - (to - from) + data.len() > MAX_BODY_BYTES {
                return over_cap(&mut caller, "body");
            }
            body.splice(from..to, data);
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: Caller<'_, Host>, map: u32, ptr_out: u32, len_out: u32| -> Result<u32> {
            let Some(map) = MapType::from_code(map) else {
                return status(Status::BadArgument);
            };
            let encoded = crate::headers::pairs(caller.data(), map);
            give(&mut caller, &encoded, ptr_out, len_out)?;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: Caller<'_, Host>, map: u32, ptr: u32, len: u32| -> Result<u32> {
            let Some(map) = MapType::from_code(map) else {
                return status(Status::BadArgument);
            };
            if len as usize > MAX_MAP_BYTES {
                return over_cap(&mut caller, "header map");
            }
            let bytes = read(&caller, ptr, len)?;
            let Some(pairs) = abi::decode_map(&bytes) else {
                return trap("a header map that is not one");
            };
            if pairs.len() > MAX_HEADERS {
                return over_cap(&mut caller, "header map");
            }
            crate::headers::set_pairs(caller.data_mut(), map, &pairs);
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: Caller<'_, Host>,
         map: u32,
         key_ptr: u32,
         key_len: u32,
         ptr_out: u32,
         len_out: u32|
         -> Result<u32> {
            let Some(map) = MapType::from_code(map) else {
                return status(Status::BadArgument);
            };
            let key = read(&caller, key_ptr, key_len)?;
            match crate::headers::value(caller.data(), map, &key) {
                Some(value) => {
                    give(&mut caller, &value, ptr_out, len_out)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;
    for (name, op) in [
        (
            "proxy_replace_header_map_value",
            crate::headers::Op::Replace,
        ),
        ("proxy_add_header_map_value", crate::headers::Op::Add),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |mut caller: Caller<'_, Host>,
                  map: u32,
                  key_ptr: u32,
                  key_len: u32,
                  value_ptr: u32,
                  value_len: u32|
                  -> Result<u32> {
                let Some(map) = MapType::from_code(map) else {
                    return status(Status::BadArgument);
                };
                if key_len as usize + value_len as usize > MAX_HEADER_BYTES {
                    return over_cap(&mut caller, "header");
                }
                let key = read(&caller, key_ptr, key_len)?;
                let value = read(&caller, value_ptr, value_len)?;
                if !crate::headers::change(caller.data_mut(), map, op, &key, Some(&value)) {
                    return over_cap(&mut caller, "header map");
                }
                status(Status::Ok)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: Caller<'_, Host>, map: u32, key_ptr: u32, key_len: u32| -> Result<u32> {
            let Some(map) = MapType::from_code(map) else {
                return status(Status::BadArgument);
            };
            let key = read(&caller, key_ptr, key_len)?;
            crate::headers::change(
                caller.data_mut(),
                map,
                crate::headers::Op::Remove,
                &key,
                None,
            );
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut caller: Caller<'_, Host>,
         path_ptr: u32,
         path_len: u32,
         ptr_out: u32,
         len_out: u32|
         -> Result<u32> {
            let path = read(&caller, path_ptr, path_len)?;
            match crate::properties::get(caller.data(), &path) {
                Some(value) => {
                    give(&mut caller, &value, ptr_out, len_out)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: Caller<'_, Host>,
         path_ptr: u32,
         path_len: u32,
         value_ptr: u32,
         value_len: u32|
         -> Result<u32> {
            if path_len as usize + value_len as usize > MAX_HEADER_BYTES {
                return over_cap(&mut caller, "property");
            }
            let path = read(&caller, path_ptr, path_len)?;
            let value = read(&caller, value_ptr, value_len)?;
            let custom = &mut caller.data_mut().props.custom;
            if custom.len() >= MAX_HEADERS {
                return over_cap(&mut caller, "properties");
            }
            match custom.iter_mut().find(|(known, _)| *known == path) {
                Some((_, kept)) => *kept = value,
                None => custom.push((path, value)),
            }
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut caller: Caller<'_, Host>,
         key_ptr: u32,
         key_len: u32,
         ptr_out: u32,
         len_out: u32,
         cas_out: u32|
         -> Result<u32> {
            let key = read(&caller, key_ptr, key_len)?;
            match caller.data().plugin.shared.get(&key) {
                Some((value, cas)) => {
                    give(&mut caller, &value, ptr_out, len_out)?;
                    write_u32(&mut caller, cas_out, cas)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut caller: Caller<'_, Host>,
         key_ptr: u32,
         key_len: u32,
         value_ptr: u32,
         value_len: u32,
         cas: u32|
         -> Result<u32> {
            if key_len as usize + value_len as usize > MAX_HEADER_BYTES {
                return over_cap(&mut caller, "shared data");
            }
            let key = read(&caller, key_ptr, key_len)?;
            let value = read(&caller, value_ptr, value_len)?;
            match caller.data().plugin.shared.set(key, value, cas) {
                crate::plugin::Stored::Yes => status(Status::Ok),
                crate::plugin::Stored::CasMismatch => status(Status::CasMismatch),
                crate::plugin::Stored::Full => over_cap(&mut caller, "shared data"),
            }
        },
    )?;
    link_queues(linker)?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut caller: Caller<'_, Host>, _stream: u32| -> Result<u32> {
            caller.data_mut().resumed = true;
            status(Status::Ok)
        },
    )?;
    for name in ["proxy_continue_request", "proxy_continue_response"] {
        linker.func_wrap("env", name, |mut caller: Caller<'_, Host>| -> Result<u32> {
            caller.data_mut().resumed = true;
            status(Status::Ok)
        })?;
    }
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut caller: Caller<'_, Host>, _stream: u32| -> Result<u32> {
            // Closing is answering: the request gets a bare 502 if nothing else answered.
            let host = caller.data_mut();
            if host.local.is_none() {
                host.local = Some(Response::new(502));
            }
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: Caller<'_, Host>,
         code: u32,
         _details_ptr: u32,
         _details_len: u32,
         body_ptr: u32,
         body_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         _grpc_status: i32|
         -> Result<u32> {
            if body_len as usize > MAX_BODY_BYTES {
                return over_cap(&mut caller, "local response body");
            }
            if headers_len as usize > MAX_MAP_BYTES {
                return over_cap(&mut caller, "local response headers");
            }
            let body = read(&caller, body_ptr, body_len)?;
            let headers = read(&caller, headers_ptr, headers_len)?;
            let Some(pairs) = (if headers.is_empty() {
                Some(Vec::new())
            } else {
                abi::decode_map(&headers)
            }) else {
                return trap("a header map that is not one");
            };
            let code = match u16::try_from(code) {
                Ok(code) if (200..=599).contains(&code) => code,
                _ => return trap(format!("send_local_response with status {code}")),
            };
            let mut response = Response::new(code).body(body);
            let plugin = caller.data().plugin.clone();
            for (name, value) in pairs {
                if let (Ok(name), Ok(value)) =
                    (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
                {
                    if crate::headers::refused(&plugin, &name, false).is_none() {
                        response = response.header(name, value);
                    }
                }
            }
            caller.data_mut().local = Some(response);
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut caller: Caller<'_, Host>,
         upstream_ptr: u32,
         upstream_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         body_ptr: u32,
         body_len: u32,
         _trailers_ptr: u32,
         _trailers_len: u32,
         timeout_ms: u32,
         token_out: u32|
         -> Result<u32> {
            if headers_len as usize > MAX_MAP_BYTES || body_len as usize > MAX_BODY_BYTES {
                return over_cap(&mut caller, "http_call");
            }
            let upstream = read(&caller, upstream_ptr, upstream_len)?;
            let headers = read(&caller, headers_ptr, headers_len)?;
            let body = read(&caller, body_ptr, body_len)?;
            let host = caller.data_mut();
            if host.call.is_some() || !host.request_live {
                // One call at a time, from a request callback.
                return status(Status::BadArgument);
            }
            let token = host.next_call_token;
            match crate::call::Dispatched::new(token, &upstream, &headers, body, timeout_ms) {
                Some(call) => {
                    host.next_call_token = host.next_call_token.wrapping_add(1).max(1);
                    host.call = Some(call);
                    write_u32(&mut caller, token_out, token)?;
                    status(Status::Ok)
                }
                None => status(Status::BadArgument),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |caller: Caller<'_, Host>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32|
         -> Result<u32> {
            unsupported(&caller, "proxy_grpc_call");
            status(Status::InternalFailure)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |caller: Caller<'_, Host>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32|
         -> Result<u32> {
            unsupported(&caller, "proxy_grpc_stream");
            status(Status::InternalFailure)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |caller: Caller<'_, Host>, _: u32, _: u32, _: u32, _: u32| -> Result<u32> {
            unsupported(&caller, "proxy_grpc_send");
            status(Status::NotFound)
        },
    )?;
    for name in ["proxy_grpc_cancel", "proxy_grpc_close"] {
        linker.func_wrap(
            "env",
            name,
            move |caller: Caller<'_, Host>, _: u32| -> Result<u32> {
                unsupported(&caller, name);
                status(Status::NotFound)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut caller: Caller<'_, Host>, code_out: u32, ptr_out: u32, len_out: u32| -> Result<u32> {
            // Only gRPC calls have a status, and Gatehouse makes none: UNKNOWN, no message.
            unsupported(&caller, "proxy_get_status");
            write_u32(&mut caller, code_out, 2)?;
            give(&mut caller, &[], ptr_out, len_out)?;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |_caller: Caller<'_, Host>, _context: u32| -> Result<u32> {
            // Each instance serves one request at a time: its context is always the effective one.
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |caller: Caller<'_, Host>, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| -> Result<u32> {
            unsupported(&caller, "proxy_call_foreign_function");
            status(Status::NotFound)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_done",
        |_caller: Caller<'_, Host>| -> Result<u32> { status(Status::Ok) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: Caller<'_, Host>,
         _kind: u32,
         name_ptr: u32,
         name_len: u32,
         id_out: u32|
         -> Result<u32> {
            if name_len as usize > MAX_HEADER_BYTES {
                return over_cap(&mut caller, "metric name");
            }
            let name = read(&caller, name_ptr, name_len)?;
            let Some(id) = caller.data().plugin.define_metric(name) else {
                return over_cap(&mut caller, "metrics");
            };
            write_u32(&mut caller, id_out, id)?;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: Caller<'_, Host>, id: u32, offset: i64| -> Result<u32> {
            let found = caller
                .data()
                .plugin
                .update_metric(id, |value| value.saturating_add(offset));
            status(if found { Status::Ok } else { Status::NotFound })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: Caller<'_, Host>, id: u32, value: u64| -> Result<u32> {
            let found = caller
                .data()
                .plugin
                .update_metric(id, |_| i64::try_from(value).unwrap_or(i64::MAX));
            status(if found { Status::Ok } else { Status::NotFound })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: Caller<'_, Host>, id: u32, out: u32| -> Result<u32> {
            let mut read_value = None;
            caller.data().plugin.update_metric(id, |value| {
                read_value = Some(value);
                value
            });
            match read_value {
                Some(value) => {
                    write(&mut caller, out, &(value as u64).to_le_bytes())?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;
    Ok(())
}

fn link_queues(linker: &mut Linker<Host>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: Caller<'_, Host>,
         name_ptr: u32,
         name_len: u32,
         token_out: u32|
         -> Result<u32> {
            if name_len as usize > MAX_HEADER_BYTES {
                return over_cap(&mut caller, "queue name");
            }
            let name = read(&caller, name_ptr, name_len)?;
            let Some(token) = caller.data().plugin.shared.register_queue(name) else {
                return over_cap(&mut caller, "shared queues");
            };
            write_u32(&mut caller, token_out, token)?;
            status(Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: Caller<'_, Host>,
         _vm_ptr: u32,
         _vm_len: u32,
         name_ptr: u32,
         name_len: u32,
         token_out: u32|
         -> Result<u32> {
            let name = read(&caller, name_ptr, name_len)?;
            match caller.data().plugin.shared.resolve_queue(&name) {
                Some(token) => {
                    write_u32(&mut caller, token_out, token)?;
                    status(Status::Ok)
                }
                None => status(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut caller: Caller<'_, Host>, token: u32, ptr: u32, len: u32| -> Result<u32> {
            if len as usize > MAX_HEADER_BYTES {
                return over_cap(&mut caller, "queue item");
            }
            let item = read(&caller, ptr, len)?;
            match caller.data().plugin.shared.enqueue(token, item) {
                Some(true) => status(Status::Ok),
                Some(false) => over_cap(&mut caller, "queue"),
                None => status(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: Caller<'_, Host>, token: u32, ptr_out: u32, len_out: u32| -> Result<u32> {
            match caller.data().plugin.shared.dequeue(token) {
                Some(Some(item)) => {
                    give(&mut caller, &item, ptr_out, len_out)?;
                    status(Status::Ok)
                }
                Some(None) => status(Status::Empty),
                None => status(Status::NotFound),
            }
        },
    )?;
    Ok(())
}

/// WASI errno values.
const ERRNO_SUCCESS: u32 = 0;
const ERRNO_BADF: u32 = 8;

fn link_wasi(linker: &mut Linker<Host>) -> Result<()> {
    const WASI: &str = "wasi_snapshot_preview1";
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut caller: Caller<'_, Host>,
         fd: u32,
         iovs: u32,
         count: u32,
         written_out: u32|
         -> Result<u32> {
            let mut text = Vec::new();
            let vectors = read(&caller, iovs, count.saturating_mul(8))?;
            for vector in vectors.chunks_exact(8) {
                let ptr = u32::from_le_bytes(vector[..4].try_into().expect("four bytes"));
                let len = u32::from_le_bytes(vector[4..].try_into().expect("four bytes"));
                let room = MAX_LOG_BYTES.saturating_sub(text.len()) as u32;
                // What does not fit is counted as written and dropped, as a log line is cut.
                text.extend(read(&caller, ptr, len.min(room))?);
            }
            let total: u32 = vectors
                .chunks_exact(8)
                .map(|vector| u32::from_le_bytes(vector[4..].try_into().expect("four bytes")))
                .fold(0u32, |sum, len| sum.saturating_add(len));
            if fd != 1 && fd != 2 {
                return Ok(ERRNO_BADF);
            }
            let line = String::from_utf8_lossy(&text);
            let line = line.trim_end();
            if !line.is_empty() {
                caller
                    .data_mut()
                    .plugin
                    .log(if fd == 2 { 3 } else { 2 }, line);
            }
            write_u32(&mut caller, written_out, total)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        linker.func_wrap(
            WASI,
            name,
            |mut caller: Caller<'_, Host>, count_out: u32, size_out: u32| -> Result<u32> {
                write_u32(&mut caller, count_out, 0)?;
                write_u32(&mut caller, size_out, 0)?;
                Ok(ERRNO_SUCCESS)
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        linker.func_wrap(
            WASI,
            name,
            |_caller: Caller<'_, Host>, _: u32, _: u32| -> Result<u32> { Ok(ERRNO_SUCCESS) },
        )?;
    }
    linker.func_wrap(
        WASI,
        "proc_exit",
        |_caller: Caller<'_, Host>, code: u32| -> Result<()> {
            trap(format!("the module exited with code {code}"))
        },
    )?;
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut caller: Caller<'_, Host>, _clock: u32, _precision: u64, out: u32| -> Result<u32> {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|since| since.as_nanos() as u64)
                .unwrap_or(0);
            write(&mut caller, out, &now.to_le_bytes())?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        WASI,
        "random_get",
        |mut caller: Caller<'_, Host>, ptr: u32, len: u32| -> Result<u32> {
            if len as usize > MAX_HEADER_BYTES {
                return over_cap(&mut caller, "random bytes");
            }
            let mut bytes = vec![0u8; len as usize];
            crate::plugin::fill_random(&mut bytes);
            write(&mut caller, ptr, &bytes)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        WASI,
        "sched_yield",
        |_caller: Caller<'_, Host>| -> Result<u32> { Ok(ERRNO_SUCCESS) },
    )?;
    // No files: every descriptor is a bad one (which also ends a module's pre-open scan).
    linker.func_wrap(
        WASI,
        "fd_close",
        |_caller: Caller<'_, Host>, _: u32| -> Result<u32> { Ok(ERRNO_BADF) },
    )?;
    for name in ["fd_fdstat_get", "fd_prestat_get"] {
        linker.func_wrap(
            WASI,
            name,
            |_caller: Caller<'_, Host>, _: u32, _: u32| -> Result<u32> { Ok(ERRNO_BADF) },
        )?;
    }
    linker.func_wrap(
        WASI,
        "fd_prestat_dir_name",
        |_caller: Caller<'_, Host>, _: u32, _: u32, _: u32| -> Result<u32> { Ok(ERRNO_BADF) },
    )?;
    linker.func_wrap(
        WASI,
        "fd_read",
        |_caller: Caller<'_, Host>, _: u32, _: u32, _: u32, _: u32| -> Result<u32> {
            Ok(ERRNO_BADF)
        },
    )?;
    linker.func_wrap(
        WASI,
        "fd_seek",
        |_caller: Caller<'_, Host>, _: u32, _: i64, _: u32, _: u32| -> Result<u32> {
            Ok(ERRNO_BADF)
        },
    )?;
    Ok(())
}
