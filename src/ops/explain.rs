//! `explain`: which route a request would match, the candidates it beat and why, the target
//! forwarded and the filter chain that would run. Shared by `/explain` and `gatehouse explain`.
//! The request is built as the proxy would receive it and goes through the proxy's own resolve
//! step, so the answer is the route live traffic takes.

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::config::Snapshot;
use crate::proxy::resolve::resolve;

pub struct Query {
    pub method: Method,
    pub host: Option<String>,
    pub path: String,
    pub headers: HeaderMap,
}

impl Query {
    /// The request as the proxy would receive it.
    fn request(&self) -> Result<pingora_http::RequestHeader, String> {
        let mut request = pingora_http::RequestHeader::build(
            self.method.clone(),
            self.path.as_bytes(),
            Some(self.headers.len() + 1),
        )
        .map_err(|_| format!("\"{}\" is not a valid request target", self.path))?;
        if let Some(host) = &self.host {
            let value = HeaderValue::from_str(host)
                .map_err(|_| format!("\"{host}\" is not a valid host"))?;
            request
                .insert_header(http::header::HOST, value)
                .map_err(|error| error.to_string())?;
        }
        for (name, value) in &self.headers {
            request
                .append_header(name.clone(), value.clone())
                .map_err(|error| error.to_string())?;
        }
        Ok(request)
    }

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
    let path = query
        .path
        .split_once('?')
        .map_or(query.path.as_str(), |(path, _)| path);
    let request = match query.request() {
        Ok(request) => request,
        Err(reason) => {
            return serde_json::json!({ "path": path, "result": "rejected with 400", "reason": reason })
        }
    };
    let resolution = match resolve(snapshot, &request) {
        Ok(resolution) => resolution,
        Err(problem) => {
            return serde_json::json!({
                "path": path,
                "result": format!("rejected with {}", problem.status),
                "reason": problem.detail.unwrap_or_else(|| problem.kind.title().to_string()),
            })
        }
    };
    let (_, candidates) = snapshot.router.explain(&resolution.view(&request));
    let kinds = |chain: &gatehouse_filters::Chain| -> Vec<&'static str> {
        chain.filters().iter().map(|filter| filter.kind()).collect()
    };
    match &resolution.matched {
        Some(_) if resolution.forwarded_target().is_none() => serde_json::json!({
            "path": path,
            "result": "rejected with 400",
            "reason": "the route's rewrite makes a request target that is not a valid URI",
        }),
        Some(matched) => {
            let route = &snapshot.routes[matched.route];
            serde_json::json!({
                "method": query.method.as_str(),
                "host": resolution.host,
                "path": path,
                "normalized_path": resolution.path(),
                "route": route.name.as_ref(),
                "upstream": snapshot.upstreams[route.upstream].name.as_ref(),
                "forwarded_path": resolution.forwarded_target(),
                "filters": kinds(&route.chain),
                "candidates": candidates,
            })
        }
        None => serde_json::json!({
            "method": query.method.as_str(),
            "host": resolution.host,
            "path": path,
            "normalized_path": resolution.path(),
            "route": null,
            "result": if snapshot.serving { "404 no route matches" } else { "503 no config loaded yet" },
            "filters": kinds(&snapshot.global_chain),
            "candidates": candidates,
        }),
    }
}
