//! `explain`: which route a request would match, the candidates it beat and why, and the filter
//! chain that would run. Shared by `/explain` and `gatehouse explain`.

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::config::Snapshot;
use crate::router::normalize::normalize_path;
use crate::router::RequestView;

pub struct Query {
    pub method: Method,
    pub host: Option<String>,
    pub path: String,
    pub headers: HeaderMap,
}

impl Query {
    /// From `method=&host=&path=&header=name:value` (header may repeat).
    pub fn parse(query: &str) -> Result<Query, String> {
        let mut method = Method::GET;
        let mut host = None;
        let mut path = None;
        let mut headers = HeaderMap::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            match name {
                "method" => {
                    method = Method::from_bytes(value.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("\"{value}\" is not a method"))?
                }
                "host" => host = Some(value),
                "path" => path = Some(value),
                "header" => {
                    let (header, header_value) = value
                        .split_once(':')
                        .ok_or_else(|| format!("header \"{value}\" should be name:value"))?;
                    let header = HeaderName::from_bytes(header.trim().as_bytes())
                        .map_err(|_| format!("\"{header}\" is not a header name"))?;
                    let header_value = HeaderValue::from_str(header_value.trim())
                        .map_err(|_| "invalid header value".to_string())?;
                    headers.append(header, header_value);
                }
                other => {
                    return Err(format!(
                        "unknown parameter \"{other}\" (use method, host, path, header)"
                    ))
                }
            }
        }
        Ok(Query {
            method,
            host,
            path: path.ok_or("give the path: /explain?path=/users/7")?,
            headers,
        })
    }
}

pub fn explain(snapshot: &Snapshot, query: &Query) -> serde_json::Value {
    let (path, raw_query) = match query.path.split_once('?') {
        Some((path, raw_query)) => (path.to_string(), Some(raw_query.to_string())),
        None => (query.path.clone(), None),
    };
    let normalized = match normalize_path(&path) {
        Ok(Some(normalized)) => normalized,
        Ok(None) => path.clone(),
        Err(error) => {
            return serde_json::json!({ "path": path, "result": "rejected with 400", "reason": error.to_string() })
        }
    };
    let host = query
        .host
        .as_ref()
        .map(|host| host.split(':').next().unwrap_or(host).to_ascii_lowercase());
    let view = RequestView {
        method: &query.method,
        host: host.as_deref(),
        path: &normalized,
        query: raw_query.as_deref(),
        headers: &query.headers,
    };
    let (winner, candidates) = snapshot.router.explain(&view);
    let global: Vec<&str> = snapshot
        .global_chain
        .iter()
        .map(|filter| filter.kind())
        .collect();
    match winner {
        Some(route_index) => {
            let route = &snapshot.routes[route_index];
            let forwarded = route
                .rewrite
                .as_ref()
                .map(|rewrite| {
                    rewrite.apply(
                        &normalized,
                        &snapshot
                            .router
                            .find(&view)
                            .map(|found| found.captures)
                            .unwrap_or_default(),
                    )
                })
                .unwrap_or_else(|| normalized.clone());
            serde_json::json!({
                "method": query.method.as_str(),
                "host": host,
                "path": path,
                "normalized_path": normalized,
                "route": route.name.as_ref(),
                "upstream": snapshot.upstreams[route.upstream].name.as_ref(),
                "forwarded_path": forwarded,
                "filters": route.chain.iter().map(|filter| filter.kind()).collect::<Vec<_>>(),
                "candidates": candidates,
            })
        }
        None => serde_json::json!({
            "method": query.method.as_str(),
            "host": host,
            "path": path,
            "normalized_path": normalized,
            "route": null,
            "result": "404 no route matches",
            "filters": global,
            "candidates": candidates,
        }),
    }
}
