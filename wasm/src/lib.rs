//! The proxy-wasm host of Gatehouse: the `wasm` filter kind runs modules built with the
//! proxy-wasm SDKs (ABI 0.2.1) on wasmtime, in every phase of a request.
//!
//! - A module is compiled once per content (by SHA-256) and linked once (`InstancePre`).
//! - Instances are started ahead and pooled; a request checks one out for its whole life.
//! - Every callback runs under an epoch deadline (`max_cpu_per_call`) and a memory limit
//!   (`max_memory`); a module that traps, runs over or grows too much loses that instance, the
//!   request gets the fail policy's answer, and other requests never notice.
//!
//! Register it with `registry.register::<gatehouse_wasm::Wasm>()`.

pub mod abi;
mod call;
mod engine;
mod filter;
mod headers;
mod host;
mod instance;
mod plugin;
mod pool;
mod properties;

pub use call::{Answer, Dispatched, HttpCaller};
pub use engine::times_compiled;
pub use filter::{set_http_caller, Config, FailPolicy, Isolation, Wasm};
