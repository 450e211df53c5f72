//! The one wasmtime `Engine` of the process, its epoch ticker, and the compiled modules, kept
//! once per module content: a reload that names the same module (by its SHA-256) reuses the
//! compiled code and its linked `InstancePre`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use wasmtime::{Config, Engine, InstancePre, Linker, Module};

use crate::host::Host;

/// How often the epoch advances: the unit of `max_cpu_per_call`.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The engine, with epoch interruption on and its ticker thread started.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config).expect("the wasm engine's settings are valid");
        let ticking = engine.weak();
        std::thread::Builder::new()
            .name("gatehouse-wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticking.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .expect("the epoch thread starts");
        engine
    })
}

/// How many times this process compiled the module whose SHA-256 is `sha256` (a reload naming
/// a module still in use reuses it and adds nothing).
pub fn times_compiled(sha256: &str) -> u64 {
    cache()
        .lock()
        .ok()
        .and_then(|cache| cache.get(sha256).map(|(_, times)| *times))
        .unwrap_or(0)
}

/// The compiled modules by SHA-256, with how many times each was compiled.
type Cache = Mutex<HashMap<String, (Weak<Compiled>, u64)>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// A module compiled and linked against the host functions.
pub struct Compiled {
    pub pre: InstancePre<Host>,
}

/// The compiled module for `bytes` (whose SHA-256 is `sha256`), compiled now or found from an
/// earlier build.
pub fn compile(bytes: &[u8], sha256: &str) -> Result<Arc<Compiled>, String> {
    let cache = cache();
    if let Some(compiled) = cache
        .lock()
        .ok()
        .and_then(|cache| cache.get(sha256).and_then(|(kept, _)| kept.upgrade()))
    {
        return Ok(compiled);
    }
    let engine = engine();
    let module = Module::from_binary(engine, bytes)
        .map_err(|error| format!("not a valid WebAssembly module: {}", root_cause(&error)))?;
    if module.get_export("proxy_abi_version_0_2_1").is_none() {
        let other = module
            .exports()
            .map(|export| export.name())
            .find(|name| name.starts_with("proxy_abi_version_"));
        return Err(match other {
            Some(other) => format!(
                "the module speaks {other}; Gatehouse hosts proxy-wasm ABI 0.2.1 \
                 (proxy_abi_version_0_2_1)"
            ),
            None => "the module is not a proxy-wasm module (it exports no \
                     proxy_abi_version_0_2_1)"
                .to_string(),
        });
    }
    let mut linker = Linker::new(engine);
    crate::host::link(&mut linker).map_err(|error| error.to_string())?;
    let pre = linker.instantiate_pre(&module).map_err(|error| {
        format!(
            "the module needs what Gatehouse does not provide: {}",
            root_cause(&error)
        )
    })?;
    let compiled = Arc::new(Compiled { pre });
    if let Ok(mut cache) = cache.lock() {
        let entry = cache
            .entry(sha256.to_string())
            .or_insert_with(|| (Weak::new(), 0));
        *entry = (Arc::downgrade(&compiled), entry.1 + 1);
    }
    Ok(compiled)
}

/// The innermost message of a wasmtime error chain.
pub fn root_cause(error: &wasmtime::Error) -> String {
    error
        .chain()
        .last()
        .map(|cause| cause.to_string())
        .unwrap_or_else(|| error.to_string())
}
