//! `headers`: set, add, append to, remove and rename the headers of the request the upstream
//! receives and of the response the client gets, with values templated from the request.
//!
//! The request operations run in the upstream-request phase: after every filter of the chain
//! has decided (so `${consumer.id}` and `${jwt.claim.NAME}` are known wherever the filter
//! stands, and removing `authorization` cannot starve an auth filter), after the gateway has
//! written its forwarding and identity headers, and again for each retry on a fresh copy of the
//! request. The response operations run in the response phase; the request values their
//! templates read are captured in the request phase, as the request arrived.
//!
//! Headers the gateway owns cannot be named: hop-by-hop headers and the body's framing on both
//! sides; on the request side also `Host` (the `rewrite` filter's), the forwarding headers and
//! the gateway's identity and request id headers. The build refuses them with their config
//! path (see [`refusal`]).

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use smallvec::SmallVec;

use crate::template::{Captured, Reads, RequestSource, Template};
use crate::{BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, RequestContext};

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Operations on the request the upstream receives.
    pub request: Section,
    /// Operations on the response the client gets.
    pub response: Section,
}

/// The operations on one side. They run in this order: `remove`, `rename`, `set`, `add`,
/// `append`. Values may use `${...}` variables; they are rendered from the request as it
/// reached the filter, before any of its operations.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Section {
    /// Headers to set, replacing every value already there.
    pub set: BTreeMap<String, String>,
    /// Headers to add as another field line, keeping those already there.
    pub add: BTreeMap<String, String>,
    /// Headers to append to as a comma-separated list (`a, b`), created when absent.
    pub append: BTreeMap<String, String>,
    /// Headers to remove.
    pub remove: Vec<String>,
    /// Headers to rename (`from: to`); the values move, replacing any under the new name.
    pub rename: BTreeMap<String, String>,
}

impl Section {
    fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.add.is_empty()
            && self.append.is_empty()
            && self.remove.is_empty()
            && self.rename.is_empty()
    }
}

/// A value: its template, and the header value itself when it has no variables.
struct Value {
    template: Template,
    literal: Option<HeaderValue>,
}

/// A header name to write: the name, and the same as written in the config (its case kept on
/// the wire), made once so a request copies neither.
#[derive(Clone)]
struct Named {
    name: HeaderName,
    case: Bytes,
}

impl Named {
    fn new(name: HeaderName, written: &str) -> Named {
        Named {
            name,
            case: Bytes::from(written.to_string()),
        }
    }
}

/// The writing operations, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    Set,
    Add,
    Append,
}

/// One side's operations, compiled.
#[derive(Default)]
pub(crate) struct Operations {
    remove: Vec<HeaderName>,
    rename: Vec<(HeaderName, Named)>,
    write: Vec<(Write, Named, Value)>,
    /// How many values are templates (rendered per request).
    templated: usize,
    /// What the templates read from the request head.
    reads: Reads,
}

impl Operations {
    /// Compiles `section`; `base` is its config path ("request", or "" for the alias kind).
    pub(crate) fn build(
        base: &str,
        side: Side,
        section: &Section,
        ctx: &BuildCtx,
        errors: &mut Vec<BuildError>,
    ) -> Operations {
        let path = |rest: String| {
            if base.is_empty() {
                rest
            } else {
                format!("{base}.{rest}")
            }
        };
        let name = |path: String, text: &str, errors: &mut Vec<BuildError>| {
            header_name(path, text, side, &ctx.gateway_headers, errors)
        };
        let mut operations = Operations::default();
        let scope = ctx.template_scope();
        for (key, write, entries) in [
            ("set", Write::Set, &section.set),
            ("add", Write::Add, &section.add),
            ("append", Write::Append, &section.append),
        ] {
            for (header, text) in entries {
                let entry = path(format!("{key}.{header}"));
                let written = header.as_str();
                let Some(header) = name(entry.clone(), header, errors) else {
                    continue;
                };
                let header = Named::new(header, written);
                let template = match Template::parse_in(text, &scope) {
                    Ok(template) => template,
                    Err(message) => {
                        errors.push(BuildError::new(entry, message));
                        continue;
                    }
                };
                let literal = match template.as_literal() {
                    Some(text) => match HeaderValue::from_str(text) {
                        Ok(value) => Some(value),
                        Err(_) => {
                            errors.push(BuildError::new(entry, "not a valid header value"));
                            continue;
                        }
                    },
                    None => None,
                };
                if literal.is_none() {
                    operations.templated += 1;
                    template.collect_reads(&mut operations.reads);
                }
                operations
                    .write
                    .push((write, header, Value { template, literal }));
            }
        }
        for (index, header) in section.remove.iter().enumerate() {
            if let Some(header) = name(path(format!("remove[{index}]")), header, errors) {
                operations.remove.push(header);
            }
        }
        for (from, to) in &section.rename {
            let entry = path(format!("rename.{from}"));
            let from = name(entry.clone(), from, errors);
            let to_name = name(entry, to, errors);
            if let (Some(from), Some(to_name)) = (from, to_name) {
                operations.rename.push((from, Named::new(to_name, to)));
            }
        }
        operations
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.rename.is_empty() && self.write.is_empty()
    }

    /// The templated values, rendered from `source` and the context before any operation
    /// runs, so they read the head as it was before this filter changed it.
    fn render(
        &self,
        ctx: &mut RequestContext,
        source: &dyn RequestSource,
    ) -> SmallVec<[Option<HeaderValue>; 4]> {
        let mut rendered = SmallVec::new();
        if self.templated == 0 {
            return rendered;
        }
        for (_, _, value) in &self.write {
            if value.literal.is_none() {
                let text = value.template.render_from(ctx, source);
                // A value that is not a valid header value (a decoded query parameter with a
                // line break, say) skips its operation rather than reaching the wire.
                rendered.push(HeaderValue::from_maybe_shared(Bytes::from(text)).ok());
            }
        }
        rendered
    }

    fn apply_rendered<H: Head>(&self, head: &mut H, rendered: SmallVec<[Option<HeaderValue>; 4]>) {
        for name in &self.remove {
            head.remove(name);
        }
        for (from, to) in &self.rename {
            if !head.map().contains_key(from) {
                continue;
            }
            let values: SmallVec<[HeaderValue; 2]> =
                head.map().get_all(from).iter().cloned().collect();
            head.remove(from);
            head.remove(&to.name);
            for value in values {
                head.append(to.case.clone(), value);
            }
        }
        let mut rendered = rendered.into_iter();
        for (write, name, value) in &self.write {
            let value = match &value.literal {
                Some(literal) => literal.clone(),
                None => match rendered.next().flatten() {
                    Some(value) => value,
                    None => continue,
                },
            };
            match write {
                Write::Set => head.insert(name.case.clone(), value),
                Write::Add => head.append(name.case.clone(), value),
                Write::Append => {
                    let joined = joined(head.map(), &name.name, &value);
                    head.insert(name.case.clone(), joined.unwrap_or(value));
                }
            }
        }
    }
}

/// The values of `name` and `value` as one comma-separated list, when `name` has values.
fn joined(headers: &HeaderMap, name: &HeaderName, value: &HeaderValue) -> Option<HeaderValue> {
    if !headers.contains_key(name) {
        return None;
    }
    let mut list = Vec::new();
    for existing in headers.get_all(name) {
        list.extend_from_slice(existing.as_bytes());
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(value.as_bytes());
    HeaderValue::from_maybe_shared(Bytes::from(list)).ok()
}

/// A request or response head; Pingora's own methods keep the header case map in step.
trait Head {
    fn map(&self) -> &HeaderMap;
    fn insert(&mut self, name: Bytes, value: HeaderValue);
    fn append(&mut self, name: Bytes, value: HeaderValue);
    fn remove(&mut self, name: &HeaderName);
}

macro_rules! head {
    ($type:ty) => {
        impl Head for $type {
            fn map(&self) -> &HeaderMap {
                &self.headers
            }
            fn insert(&mut self, name: Bytes, value: HeaderValue) {
                self.insert_header(name, value).ok();
            }
            fn append(&mut self, name: Bytes, value: HeaderValue) {
                self.append_header(name, value).ok();
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
        }
    };
}

head!(RequestHeader);
head!(ResponseHeader);

/// Hop-by-hop headers (RFC 9110 section 7.6.1, and the `proxy-` ones): each connection's own.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers the gateway writes on every forwarded request.
const FORWARDING: &[&str] = &["forwarded", "x-real-ip"];

/// The identity and request id headers under their default names; refused even when the
/// config renames them, so a config change cannot turn a refused name into an allowed one.
const IDENTITY_DEFAULTS: &[&str] = &[
    "x-consumer-id",
    "x-consumer-username",
    "x-authenticated-subject",
    "x-request-id",
];

/// Which head a header operation works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The request the upstream receives.
    Request,
    /// The response the client gets.
    Response,
}

/// Why the gateway keeps `name` to itself on `side`, if it does. Both sides: hop-by-hop
/// headers and `Content-Length`. The request side also: `Host`, the forwarding headers, and
/// the identity and request id headers, which the upstream must be able to trust. (On the
/// response side the gateway writes none of those but the request id, which a config may
/// override.)
pub fn refusal(
    name: &HeaderName,
    side: Side,
    gateway_headers: &[HeaderName],
) -> Option<&'static str> {
    let text = name.as_str();
    if HOP_BY_HOP.contains(&text) || text.starts_with("proxy-") {
        Some("is a hop-by-hop header, which the gateway manages per connection")
    } else if text == "content-length" {
        Some("frames the body, which the gateway does")
    } else if side == Side::Response {
        None
    } else if text == "host" {
        Some("is chosen by the `rewrite` filter's `host`")
    } else if FORWARDING.contains(&text) || text.starts_with("x-forwarded-") {
        Some("is a forwarding header the gateway sets itself")
    } else if IDENTITY_DEFAULTS.contains(&text) || gateway_headers.contains(name) {
        Some("is an identity or request id header the gateway sets itself")
    } else {
        None
    }
}

/// A header name from the config: valid, and not one the gateway keeps to itself.
pub(crate) fn header_name(
    path: String,
    text: &str,
    side: Side,
    gateway_headers: &[HeaderName],
    errors: &mut Vec<BuildError>,
) -> Option<HeaderName> {
    let Ok(name) = HeaderName::from_bytes(text.as_bytes()) else {
        errors.push(BuildError::new(
            path,
            format!("\"{text}\" is not a valid header name"),
        ));
        return None;
    };
    if let Some(reason) = refusal(&name, side, gateway_headers) {
        errors.push(BuildError::new(
            path,
            format!("\"{name}\" {reason}; a filter cannot set, remove or rename it"),
        ));
        return None;
    }
    Some(name)
}

/// The `headers` filter (and, through `response_headers`, its response half alone).
pub struct Headers {
    kind: &'static str,
    request: Operations,
    response: Operations,
}

impl Headers {
    /// The filter of `request` and `response` operations, reporting as `kind`.
    pub(crate) fn new(kind: &'static str, request: Operations, response: Operations) -> Headers {
        Headers {
            kind,
            request,
            response,
        }
    }
}

impl FilterKind for Headers {
    const KIND: &'static str = "headers";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        if config.request.is_empty() && config.response.is_empty() {
            errors.push(BuildError::new(
                "",
                "give `request` or `response` operations (set, add, append, remove, rename)",
            ));
        }
        let request =
            Operations::build("request", Side::Request, &config.request, ctx, &mut errors);
        let response = Operations::build(
            "response",
            Side::Response,
            &config.response,
            ctx,
            &mut errors,
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Headers::new(Self::KIND, request, response))
    }
}

#[async_trait]
impl Filter for Headers {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn phases(&self) -> Phases {
        let mut phases = Phases::NONE;
        if !self.request.is_empty() {
            phases = phases | Phases::UPSTREAM_REQUEST;
        }
        if !self.response.is_empty() {
            phases = phases | Phases::RESPONSE;
        }
        if !self.response.reads.is_empty() {
            phases = phases | Phases::REQUEST;
        }
        phases
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        if !self.response.reads.is_empty() {
            let captured = self.response.reads.capture(request);
            ctx.set_instance_state(self, captured);
        }
        Some(Decision::Continue)
    }

    fn upstream_request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) {
        let rendered = self.request.render(ctx, &*request);
        self.request.apply_rendered(request, rendered);
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        let captured = if self.response.reads.is_empty() {
            None
        } else {
            ctx.take_instance_state::<_, Captured>(self)
        };
        let source = captured.unwrap_or_default();
        let rendered = self.response.render(ctx, &source);
        self.response.apply_rendered(response, rendered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn build(config: serde_json::Value) -> Result<Headers, Vec<BuildError>> {
        Headers::build(
            serde_json::from_value(config).unwrap(),
            &BuildCtx::default(),
        )
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/orders?id=7", None).unwrap();
        for (name, value) in headers {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn request_operations_run_in_order_on_the_upstream_request() {
        let filter = build(serde_json::json!({
            "request": {
                "set": { "x-tenant": "${consumer.id}", "x-order": "${query.id}", "x-copy": "${request.header.x-old}" },
                "add": { "x-tag": "two" },
                "append": { "x-list": "c", "x-new-list": "only" },
                "remove": ["authorization"],
                "rename": { "x-old": "x-new" },
            }
        }))
        .unwrap();
        assert_eq!(filter.phases(), Phases::UPSTREAM_REQUEST);
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(crate::Consumer::new("acme"));
        let mut upstream = request(&[
            ("authorization", "Bearer secret"),
            ("x-old", "moved"),
            ("x-new", "replaced"),
            ("x-tenant", "spoofed"),
            ("x-tag", "one"),
            ("x-list", "a"),
            ("x-list", "b"),
        ]);
        filter.upstream_request(&mut upstream, &mut ctx);
        let headers = &upstream.headers;
        assert!(headers.get("authorization").is_none());
        assert!(headers.get("x-old").is_none());
        assert_eq!(values(headers, "x-new"), ["moved"]);
        // Rendered before the rename: the template read the request as it reached the filter.
        assert_eq!(values(headers, "x-copy"), ["moved"]);
        assert_eq!(values(headers, "x-tenant"), ["acme"]);
        assert_eq!(values(headers, "x-order"), ["7"]);
        assert_eq!(values(headers, "x-tag"), ["one", "two"]);
        assert_eq!(values(headers, "x-list"), ["a, b, c"]);
        assert_eq!(values(headers, "x-new-list"), ["only"]);
    }

    #[test]
    fn response_operations_render_what_the_request_phase_captured() {
        let filter = build(serde_json::json!({
            "response": {
                "set": { "x-served-by": "gatehouse", "x-echo": "${method} ${host} ${request.header.x-tenant} ${status}" },
                "remove": ["server"],
                "rename": { "x-internal": "x-public" },
            }
        }))
        .unwrap();
        assert_eq!(filter.phases(), Phases::REQUEST | Phases::RESPONSE);
        let mut ctx = RequestContext::new(Instant::now());
        let mut client = request(&[("host", "API.example"), ("x-tenant", "t1")]);
        assert!(matches!(
            filter.try_request(&mut client, &mut ctx),
            Some(Decision::Continue)
        ));
        ctx.status = Some(200);
        let mut response = ResponseHeader::build(200, None).unwrap();
        response.insert_header("server", "upstream").unwrap();
        response.insert_header("x-internal", "v").unwrap();
        filter.response(&mut response, &mut ctx);
        assert!(response.headers.get("server").is_none());
        assert_eq!(values(&response.headers, "x-public"), ["v"]);
        assert_eq!(values(&response.headers, "x-served-by"), ["gatehouse"]);
        assert_eq!(
            values(&response.headers, "x-echo"),
            ["GET api.example t1 200"]
        );
    }

    #[test]
    fn a_missing_value_renders_empty_and_an_invalid_one_skips_its_operation() {
        let filter = build(serde_json::json!({
            "request": { "set": { "x-tenant": "${request.header.x-missing}", "x-q": "${query.q}" } }
        }))
        .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        let mut upstream = RequestHeader::build("GET", b"/?q=a%0Ab", None).unwrap();
        filter.upstream_request(&mut upstream, &mut ctx);
        assert_eq!(values(&upstream.headers, "x-tenant"), [""]);
        assert!(upstream.headers.get("x-q").is_none());
    }

    #[test]
    fn two_instances_keep_their_captures_apart() {
        let first =
            build(serde_json::json!({ "response": { "set": { "x-a": "${request.header.x-a}" } } }))
                .unwrap();
        let second = build(
            serde_json::json!({ "response": { "set": { "x-b": "${request.header.x-a}!" } } }),
        )
        .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        let mut client = request(&[("x-a", "one")]);
        first.try_request(&mut client, &mut ctx);
        client.insert_header("x-a", "two").unwrap();
        second.try_request(&mut client, &mut ctx);
        let mut response = ResponseHeader::build(200, None).unwrap();
        second.response(&mut response, &mut ctx);
        first.response(&mut response, &mut ctx);
        assert_eq!(values(&response.headers, "x-a"), ["one"]);
        assert_eq!(values(&response.headers, "x-b"), ["two!"]);
    }

    #[test]
    fn refuses_the_gateways_own_headers_with_their_paths() {
        let ctx = BuildCtx {
            gateway_headers: Arc::from(vec![HeaderName::from_static("x-caller")]),
            path_captures: Some(Arc::from(vec!["id".to_string()])),
            ..BuildCtx::default()
        };
        let errors = Headers::build(
            serde_json::from_value(serde_json::json!({
                "request": {
                    "set": { "x-forwarded-for": "1.2.3.4", "connection": "close", "x-ok": "${path.nope}" },
                    "add": { "proxy-authorization": "x", "x-caller": "me" },
                    "remove": ["host", "x-request-id", "bad name"],
                    "rename": { "x-a": "forwarded" },
                },
                "response": { "append": { "transfer-encoding": "gzip", "x-v": "${nope}" }, "remove": ["content-length"] },
            }))
            .unwrap(),
            &ctx,
        )
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "request.set.connection",
                "request.set.x-forwarded-for",
                "request.set.x-ok",
                "request.add.proxy-authorization",
                "request.add.x-caller",
                "request.remove[0]",
                "request.remove[1]",
                "request.remove[2]",
                "request.rename.x-a",
                "response.append.transfer-encoding",
                "response.append.x-v",
                "response.remove[0]",
            ],
            "{errors:?}"
        );
        assert!(errors[1].message.contains("forwarding header"));
        assert!(errors[0].message.contains("hop-by-hop"));
        assert!(errors[2].message.contains("not a named capture"));
        assert!(errors[5].message.contains("`rewrite` filter"));
        assert!(errors[10].message.contains("unknown variable"));
    }

    #[test]
    fn the_response_side_may_name_the_request_id_but_not_hop_by_hop_headers() {
        assert!(build(serde_json::json!({
            "response": { "set": { "x-request-id": "${request_id}", "x-consumer-id": "${consumer.id}" } }
        }))
        .is_ok());
        let errors = build(serde_json::json!({ "response": { "remove": ["upgrade"] } }))
            .err()
            .unwrap();
        assert_eq!(errors[0].path, "response.remove[0]");
    }

    #[test]
    fn an_empty_config_is_refused() {
        let errors = build(serde_json::json!({})).err().unwrap();
        assert_eq!(errors[0].path, "");
    }
}
