//! Rewrites one top-level field of JSON answers: the whole body is read (the host buffers it
//! while the plugin pauses), the field is set, and the new body replaces the old one.
//!
//! plugin_config: {"field": "secret", "value": "[redacted]"}

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize)]
struct Config {
    field: String,
    value: serde_json::Value,
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
        Some(Box::new(JsonField { config: self.config.clone()?, json: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct JsonField {
    config: Rc<Config>,
    json: bool,
}

impl Context for JsonField {}

impl HttpContext for JsonField {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.json = self
            .get_http_response_header("content-type")
            .is_some_and(|value| value.starts_with("application/json"));
        if self.json {
            // The new body has another length.
            self.set_http_response_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.json {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let Some(body) = self.get_http_response_body(0, body_size) else {
            return Action::Continue;
        };
        let Ok(mut document) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return Action::Continue;
        };
        if let Some(object) = document.as_object_mut() {
            if object.contains_key(&self.config.field) {
                object.insert(self.config.field.clone(), self.config.value.clone());
                let rewritten = serde_json::to_vec(&document).unwrap_or(body);
                self.set_http_response_body(0, body_size, &rewritten);
            }
        }
        Action::Continue
    }
}
