//! Asks an auth service about every request before it goes on: the plugin calls the service
//! (an upstream of the gateway) with the request's `Authorization` header and lets the request
//! through when the service answers 200, or answers 403 itself otherwise.
//!
//! plugin_config: {"upstream": "auth", "path": "/check", "timeout_ms": 1000}

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;
use std::time::Duration;

#[derive(Deserialize)]
struct Config {
    upstream: String,
    path: String,
    #[serde(default = "second")]
    timeout_ms: u64,
}

fn second() -> u64 {
    1000
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
        Some(Box::new(Check { config: self.config.clone()? }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Check {
    config: Rc<Config>,
}

impl HttpContext for Check {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let authorization = self.get_http_request_header("authorization").unwrap_or_default();
        let dispatched = self.dispatch_http_call(
            &self.config.upstream,
            vec![
                (":method", "GET"),
                (":path", &self.config.path),
                (":authority", &self.config.upstream),
                ("authorization", &authorization),
            ],
            None,
            vec![],
            Duration::from_millis(self.config.timeout_ms),
        );
        match dispatched {
            Ok(_) => Action::Pause,
            Err(status) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("auth call failed: {status:?}")).ok();
                self.send_http_response(503, vec![("content-type", "text/plain")], Some(b"auth service unavailable\n"));
                Action::Pause
            }
        }
    }
}

impl Context for Check {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body_size: usize, _trailers: usize) {
        let status = self.get_http_call_response_header(":status");
        if status.as_deref() == Some("200") {
            if let Some(consumer) = self.get_http_call_response_header("x-consumer") {
                self.set_http_request_header("x-consumer", Some(&consumer));
            }
            self.resume_http_request();
        } else {
            self.send_http_response(403, vec![("content-type", "text/plain")], Some(b"denied by the auth service\n"));
        }
    }
}
