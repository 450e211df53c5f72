//! End-to-end tests through the real `gatehouse` binary, with real upstream servers.

#[path = "../support/mod.rs"]
mod support;

mod auth;
mod balancing;
mod container;
mod discovery;
mod edge;
mod fleet;
mod grpc;
mod grpc_json;
mod grpc_web;
mod http2;
mod introspection;
mod json_body;
mod lifecycle;
mod limits;
mod login;
mod observability;
mod postgres;
mod proxy_protocol;
mod rate_limit;
mod redis_cluster;
mod reload;
mod resilience;
mod routing;
mod smuggling;
mod tls;
mod tls_edge;
mod tracing;
mod transform;
mod wasm;
mod websocket;
