//! Answers a request itself, with a local response, when one of its headers has a denied value;
//! other requests go on to the upstream.
//!
//! plugin_config: {"header": "x-tenant", "deny": ["blocked"], "status": 403}

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize)]
struct Config {
    header: String,
    deny: Vec<String>,
    #[serde(default = "forbidden")]
    status: u32,
}

fn forbidden() -> u32 {
    403
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(config) => {
                self.config = Some(Rc::new(config));
                true
            }
            Err(error) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("bad plugin_config: {error}")).ok();
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Deny { config: self.config.clone()? }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Deny {
    config: Rc<Config>,
}

impl Context for Deny {}

impl HttpContext for Deny {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let value = self.get_http_request_header(&self.config.header);
        match value {
            Some(value) if self.config.deny.iter().any(|denied| *denied == value) => {
                proxy_wasm::hostcalls::log(LogLevel::Info, &format!("denied {}: {value}", self.config.header)).ok();
                self.send_http_response(
                    self.config.status,
                    vec![("content-type", "text/plain"), ("x-denied-by", "deny_by_header")],
                    Some(b"denied by policy\n"),
                );
                Action::Pause
            }
            _ => Action::Continue,
        }
    }
}
