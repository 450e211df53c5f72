//! The conversions of `grpc_json`, apart from the proxy phases: the bindings of HTTP requests to
//! gRPC methods (from `google.api.http` annotations, the config's `mappings`, and the default
//! `POST /pkg.Service/Method`), request JSON with path and query values to one gRPC frame, and
//! gRPC frames to JSON (one message, a JSON array, or NDJSON).

use bytes::{Bytes, BytesMut};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, SerializeOptions, Value,
};

use super::template::PathTemplate;
use super::{Mapping, Streaming};
use crate::grpc::{self, Code, FrameDecoder, FrameError};
use crate::{BuildError, Problem, ProblemType};

/// The extension of `google.protobuf.MethodOptions` that holds a method's `google.api.HttpRule`.
const HTTP_EXTENSION: &str = "google.api.http";

/// A method some binding calls.
#[derive(Debug)]
pub struct MethodInfo {
    /// `pkg.Service/Method`.
    pub name: String,
    /// The gRPC request path, `/pkg.Service/Method`.
    pub path: String,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub server_streaming: bool,
}

/// Which part of the request message the HTTP body is.
#[derive(Debug)]
pub enum BodyRule {
    /// No body: the message is made of path and query values only.
    None,
    /// `*`: the body is the whole message.
    Whole,
    /// The body is this (top-level) field of the message.
    Field(FieldDescriptor),
}

/// An HTTP method and path template bound to a gRPC method.
#[derive(Debug)]
pub struct Binding {
    pub http_method: http::Method,
    pub template: PathTemplate,
    /// The fields the template's variables set, in the order of its variables.
    pub variables: Vec<Vec<FieldDescriptor>>,
    /// Index into [`Transcoder::methods`].
    pub method: usize,
    pub body: BodyRule,
    /// The field of the reply that is the response body (`response_body`), if not the whole.
    pub response_body: Option<FieldDescriptor>,
}

/// Values from the path and the query, for one field path of the request message.
#[derive(Clone, Debug)]
struct Assignment {
    path: Vec<FieldDescriptor>,
    values: Vec<Value>,
}

/// A request matched to a binding, with its path and query values converted to field values.
#[derive(Clone, Debug)]
pub struct Bound {
    pub binding: usize,
    assignments: Vec<Assignment>,
}

/// A gRPC status: a code and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    pub fn ok() -> Status {
        Status::new(Code::Ok, "")
    }

    /// The status a gRPC answer's headers or trailers carry (`UNKNOWN` without `grpc-status`).
    pub fn from_headers(headers: &http::HeaderMap) -> Status {
        match headers.get(grpc::STATUS) {
            Some(value) => Status {
                code: Code::parse(value.as_bytes()),
                message: headers
                    .get(grpc::MESSAGE)
                    .map(|message| grpc::decode_message(message.as_bytes()))
                    .unwrap_or_default(),
            },
            None => Status::new(
                Code::Unknown,
                "the upstream's answer ended without a grpc-status",
            ),
        }
    }

    /// The problem document a REST client gets for this status.
    pub fn problem(&self) -> Problem {
        let problem = Problem {
            status: self.code.http_status(),
            ..Problem::new(ProblemType::GrpcError)
        };
        let problem = if self.message.is_empty() {
            problem
        } else {
            problem.detail(self.message.clone())
        };
        problem
            .member("grpc_status", self.code.name())
            .member("grpc_code", self.code.number())
    }

    /// The error element of a streamed answer:
    /// `{"error":{"code":N,"status":"NAME","message":"…","http_status":H}}`.
    pub fn error_json(&self) -> String {
        serde_json::json!({
            "error": {
                "code": self.code.number(),
                "status": self.code.name(),
                "message": self.message,
                "http_status": self.code.http_status(),
            }
        })
        .to_string()
    }
}

/// How the transcoder writes and reads JSON.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub ignore_unknown_query_parameters: bool,
    pub preserve_proto_field_names: bool,
    pub emit_defaults: bool,
}

/// The bindings of one descriptor set, and the JSON mapping options.
pub struct Transcoder {
    pub methods: Vec<MethodInfo>,
    /// Most specific template first (see [`PathTemplate::specificity`]); among equals, explicit
    /// mappings, then annotations, then the default bindings, each in declaration order.
    pub bindings: Vec<Binding>,
    serialize: SerializeOptions,
    /// For a `response_body` binding: the reply's members are all written, so the one taken is
    /// there even when it holds its default.
    serialize_all: SerializeOptions,
    deserialize: DeserializeOptions,
    options: Options,
}

impl std::fmt::Debug for Transcoder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Transcoder")
            .field("methods", &self.methods)
            .field("bindings", &self.bindings.len())
            .finish()
    }
}

/// One binding of an `HttpRule`, before its names are resolved.
struct Rule {
    http_method: String,
    path: String,
    body: Option<String>,
    response_body: Option<String>,
}

/// The bindings of a `google.api.HttpRule` and its `additional_bindings`.
fn rules(rule: &DynamicMessage, nested: bool, out: &mut Vec<Rule>) -> Result<(), String> {
    let text = |number: u32| {
        rule.get_field_by_number(number)
            .and_then(|value| value.as_str().map(str::to_string))
            .filter(|text| !text.is_empty())
    };
    let mut pattern = None;
    for (number, method) in [
        (2, "GET"),
        (3, "PUT"),
        (4, "POST"),
        (5, "DELETE"),
        (6, "PATCH"),
    ] {
        if rule.has_field_by_number(number) {
            pattern = Some((method.to_string(), text(number).unwrap_or_default()));
        }
    }
    if rule.has_field_by_number(8) {
        if let Some(custom) = rule
            .get_field_by_number(8)
            .and_then(|value| value.as_message().cloned())
        {
            let field = |number: u32| {
                custom
                    .get_field_by_number(number)
                    .and_then(|value| value.as_str().map(str::to_string))
                    .unwrap_or_default()
            };
            pattern = Some((field(1), field(2)));
        }
    }
    match pattern {
        Some((http_method, path)) => out.push(Rule {
            http_method,
            path,
            body: text(7),
            response_body: text(12),
        }),
        None if nested => return Err("an additional binding has no pattern".into()),
        // A rule with bindings of its additional ones only.
        None => {}
    }
    if !nested {
        if let Some(list) = rule
            .get_field_by_number(11)
            .and_then(|value| value.as_list().map(<[Value]>::to_vec))
        {
            for additional in list {
                if let Some(additional) = additional.as_message() {
                    rules(additional, true, out)?;
                }
            }
        }
    }
    Ok(())
}

/// The fields a dotted path names in `message` (each name as in the `.proto` or its JSON
/// name): messages on the way, not repeated; no map at the end.
pub fn field_path(
    message: &MessageDescriptor,
    dotted: &str,
) -> Result<Vec<FieldDescriptor>, String> {
    let mut fields = Vec::new();
    let mut current = message.clone();
    let names: Vec<&str> = dotted.split('.').collect();
    for (index, name) in names.iter().enumerate() {
        let field = current
            .get_field_by_name(name)
            .or_else(|| current.get_field_by_json_name(name))
            .ok_or_else(|| format!("{} has no field \"{name}\"", current.full_name()))?;
        if field.is_map() {
            return Err(format!(
                "\"{dotted}\": the map field \"{name}\" cannot be bound"
            ));
        }
        if index + 1 < names.len() {
            match field.kind() {
                Kind::Message(next) if !field.is_list() => current = next,
                _ => {
                    return Err(format!(
                        "\"{dotted}\": \"{name}\" is not a (singular) message field"
                    ))
                }
            }
        }
        fields.push(field);
    }
    Ok(fields)
}

/// `pkg.Service/Method` in `pool`.
fn find_method(pool: &DescriptorPool, name: &str) -> Result<MethodDescriptor, String> {
    let Some((service, method)) = name.trim_start_matches('/').split_once('/') else {
        return Err(format!(
            "\"{name}\" is not a method name like \"pkg.Service/Method\""
        ));
    };
    let service = pool
        .get_service_by_name(service)
        .ok_or_else(|| format!("the descriptor set has no service \"{service}\""))?;
    let found = service
        .methods()
        .find(|candidate| candidate.name() == method);
    found.ok_or_else(|| {
        format!(
            "the service {} has no method \"{method}\"",
            service.full_name()
        )
    })
}

fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(message) => message.full_name().into(),
        Kind::Enum(enumeration) => format!("enum {}", enumeration.full_name()),
    }
}

/// A path or query value as a value of `field` (its element, for a repeated field).
pub fn parse_value(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    fn number<T: std::str::FromStr>(text: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        text.trim().parse::<T>().map_err(|error| error.to_string())
    }
    let float = |text: &str| match text {
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        other => number::<f64>(other),
    };
    Ok(match field.kind() {
        Kind::Double => Value::F64(float(text)?),
        Kind::Float => Value::F32(float(text)? as f32),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(number(text)?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(number(text)?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(number(text)?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(number(text)?),
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err("expected true or false".into()),
        },
        Kind::String => Value::String(text.to_string()),
        Kind::Bytes => {
            use base64::Engine;
            let engines = [
                base64::engine::general_purpose::STANDARD,
                base64::engine::general_purpose::URL_SAFE,
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            let decoded = engines.iter().find_map(|engine| engine.decode(text).ok());
            Value::Bytes(Bytes::from(decoded.ok_or("expected base64")?))
        }
        Kind::Enum(enumeration) => match enumeration.get_value_by_name(text) {
            Some(value) => Value::EnumNumber(value.number()),
            None => match text.parse::<i32>() {
                Ok(number) => Value::EnumNumber(number),
                Err(_) => {
                    let names: Vec<String> = enumeration
                        .values()
                        .map(|value| value.name().to_string())
                        .collect();
                    return Err(format!("expected one of {}", names.join(", ")));
                }
            },
        },
        Kind::Message(message) => {
            // Well-known types written as JSON strings (Timestamp, Duration, FieldMask, the
            // wrappers), or any message written as JSON.
            let as_string = DynamicMessage::deserialize(
                message.clone(),
                serde_json::Value::String(text.to_string()),
            );
            match as_string {
                Ok(parsed) => Value::Message(parsed),
                Err(error) => {
                    let json: serde_json::Value =
                        serde_json::from_str(text).map_err(|_| error.to_string())?;
                    Value::Message(
                        DynamicMessage::deserialize(message, json)
                            .map_err(|error| error.to_string())?,
                    )
                }
            }
        }
    })
}

/// Sets `values` at `path` in `message`: a repeated field gets them all (replacing what it
/// held), a singular one the last.
fn assign(message: &mut DynamicMessage, path: &[FieldDescriptor], values: &[Value]) {
    let Some((field, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        if field.is_list() {
            message.set_field(field, Value::List(values.to_vec()));
        } else if let Some(last) = values.last() {
            message.set_field(field, last.clone());
        }
        return;
    }
    if let Some(inner) = message.get_field_mut(field).as_message_mut() {
        assign(inner, rest, values);
    }
}

fn same_path(left: &[FieldDescriptor], right: &[FieldDescriptor]) -> bool {
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .all(|(left, right)| left.number() == right.number())
}

fn bad_request(detail: impl Into<String>) -> Problem {
    Problem::new(ProblemType::BadRequest).detail(detail)
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

impl Transcoder {
    /// The bindings of `pool`'s methods: the `google.api.http` annotations of the exposed
    /// services (`services`, or all), a default `POST /pkg.Service/Method` (body `*`) for each
    /// of their methods, and `mappings`. Errors name `services[i]`, `mappings[i].…`, or
    /// `descriptor` for an annotation.
    pub fn build(
        pool: &DescriptorPool,
        services: Option<&[String]>,
        mappings: &[Mapping],
        options: Options,
    ) -> Result<Transcoder, Vec<BuildError>> {
        let mut transcoder = Transcoder {
            methods: Vec::new(),
            bindings: Vec::new(),
            serialize: SerializeOptions::new()
                .stringify_64_bit_integers(true)
                .use_proto_field_name(options.preserve_proto_field_names)
                .skip_default_fields(!options.emit_defaults),
            serialize_all: SerializeOptions::new()
                .stringify_64_bit_integers(true)
                .use_proto_field_name(options.preserve_proto_field_names)
                .skip_default_fields(false),
            deserialize: DeserializeOptions::new().deny_unknown_fields(true),
            options,
        };
        let mut errors = Vec::new();
        let exposed: Vec<_> = match services {
            Some(names) => names
                .iter()
                .enumerate()
                .filter_map(|(index, name)| {
                    let found = pool.get_service_by_name(name.trim_start_matches('.'));
                    if found.is_none() {
                        errors.push(BuildError::new(
                            format!("services[{index}]"),
                            format!("the descriptor set has no service \"{name}\""),
                        ));
                    }
                    found
                })
                .collect(),
            None => pool.services().collect(),
        };
        let mut explicit = Vec::new();
        for (index, mapping) in mappings.iter().enumerate() {
            let here = |field: &str| format!("mappings[{index}].{field}");
            let verbs: Vec<(&str, &String)> = [
                ("get", &mapping.get),
                ("post", &mapping.post),
                ("put", &mapping.put),
                ("patch", &mapping.patch),
                ("delete", &mapping.delete),
            ]
            .into_iter()
            .filter_map(|(verb, path)| path.as_ref().map(|path| (verb, path)))
            .collect();
            let [(verb, path)] = verbs.as_slice() else {
                errors.push(BuildError::new(
                    format!("mappings[{index}]"),
                    "give exactly one of get, post, put, patch and delete, with a path template",
                ));
                continue;
            };
            let method = match find_method(pool, &mapping.method) {
                Ok(method) => method,
                Err(message) => {
                    errors.push(BuildError::new(here("method"), message));
                    continue;
                }
            };
            if method.is_client_streaming() {
                errors.push(BuildError::new(
                    here("method"),
                    format!(
                        "{} takes a stream of requests, which cannot be transcoded from one JSON body",
                        method.full_name()
                    ),
                ));
                continue;
            }
            let body = match (&mapping.body, *verb) {
                (Some(body), _) => Some(body.clone()),
                (None, "post" | "put" | "patch") => Some("*".to_string()),
                (None, _) => None,
            };
            let rule = Rule {
                http_method: verb.to_ascii_uppercase(),
                path: (*path).clone(),
                body,
                response_body: mapping.response_body.clone(),
            };
            if let Err((field, message)) = transcoder.add(&method, rule, &mut explicit) {
                errors.push(BuildError::new(here(field.unwrap_or(verb)), message));
            }
        }
        let extension = pool.get_extension_by_name(HTTP_EXTENSION);
        let mut annotated = Vec::new();
        let mut defaults = Vec::new();
        for service in &exposed {
            for method in service.methods() {
                let mut found = Vec::new();
                if let Some(extension) = &extension {
                    let options = method.options();
                    if options.has_extension(extension) {
                        if let Some(rule) = options.get_extension(extension).as_message() {
                            if let Err(message) = rules(rule, false, &mut found) {
                                errors.push(BuildError::new(
                                    "descriptor",
                                    format!("{}: google.api.http: {message}", method.full_name()),
                                ));
                            }
                        }
                    }
                }
                if method.is_client_streaming() {
                    if !found.is_empty() {
                        errors.push(BuildError::new(
                            "descriptor",
                            format!(
                                "{} takes a stream of requests, which cannot be transcoded from one JSON body; leave its service out of `services`",
                                method.full_name()
                            ),
                        ));
                    }
                    continue;
                }
                for rule in found {
                    if let Err((_, message)) = transcoder.add(&method, rule, &mut annotated) {
                        errors.push(BuildError::new(
                            "descriptor",
                            format!("{}: google.api.http: {message}", method.full_name()),
                        ));
                    }
                }
                let default = Rule {
                    http_method: "POST".into(),
                    path: format!("/{}/{}", service.full_name(), method.name()),
                    body: Some("*".into()),
                    response_body: None,
                };
                if let Err((_, message)) = transcoder.add(&method, default, &mut defaults) {
                    errors.push(BuildError::new(
                        "descriptor",
                        format!("{}: {message}", method.full_name()),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut bindings = explicit;
        bindings.append(&mut annotated);
        bindings.append(&mut defaults);
        bindings.sort_by(|left, right| left.template.specificity(&right.template));
        transcoder.bindings = bindings;
        Ok(transcoder)
    }

    /// Resolves `rule` for `method` into `out`. An error names the mapping field it is about
    /// (`None`: the path template).
    fn add(
        &mut self,
        method: &MethodDescriptor,
        rule: Rule,
        out: &mut Vec<Binding>,
    ) -> Result<(), (Option<&'static str>, String)> {
        let http_method = http::Method::from_bytes(rule.http_method.as_bytes()).map_err(|_| {
            (
                None,
                format!("\"{}\" is not an HTTP method", rule.http_method),
            )
        })?;
        let template = PathTemplate::parse(&rule.path).map_err(|message| (None, message))?;
        let input = method.input();
        let variables = template
            .variables
            .iter()
            .map(|variable| field_path(&input, &variable.field))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| (None, message))?;
        let body = match rule.body.as_deref() {
            None => BodyRule::None,
            Some("*") => BodyRule::Whole,
            Some(name) => {
                let field = input.get_field_by_name(name).ok_or_else(|| {
                    (
                        Some("body"),
                        format!("{} has no field \"{name}\"", input.full_name()),
                    )
                })?;
                BodyRule::Field(field)
            }
        };
        let output = method.output();
        let response_body = match rule.response_body.as_deref() {
            None => None,
            Some(name) => Some(output.get_field_by_name(name).ok_or_else(|| {
                (
                    Some("response_body"),
                    format!("{} has no field \"{name}\"", output.full_name()),
                )
            })?),
        };
        let name = format!("{}/{}", method.parent_service().full_name(), method.name());
        let index = match self.methods.iter().position(|known| known.name == name) {
            Some(index) => index,
            None => {
                self.methods.push(MethodInfo {
                    path: format!("/{name}"),
                    name,
                    input,
                    output,
                    server_streaming: method.is_server_streaming(),
                });
                self.methods.len() - 1
            }
        };
        out.push(Binding {
            http_method,
            template,
            variables,
            method: index,
            body,
            response_body,
        });
        Ok(())
    }

    /// The method a binding calls.
    pub fn method(&self, binding: usize) -> &MethodInfo {
        &self.methods[self.bindings[binding].method]
    }

    /// The first binding (most specific first) for this HTTP method and path (without query),
    /// with the values of its template's variables.
    pub fn find(&self, method: &http::Method, path: &str) -> Option<(usize, Vec<String>)> {
        self.bindings
            .iter()
            .enumerate()
            .filter(|(_, binding)| binding.http_method == *method)
            .find_map(|(index, binding)| {
                binding.template.matches(path).map(|values| (index, values))
            })
    }

    /// Converts the values of the path's variables and the query's parameters to field values;
    /// a path value overrides a query value for the same field. An unknown parameter (unless
    /// ignored) or a value that does not convert is a 400 naming the field.
    pub fn bind(
        &self,
        binding: usize,
        values: Vec<String>,
        query: Option<&str>,
    ) -> Result<Bound, Problem> {
        let found = &self.bindings[binding];
        let input = &self.methods[found.method].input;
        let mut assignments: Vec<Assignment> = Vec::new();
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = crate::util::decode_query_component(name);
            let value = crate::util::decode_query_component(value);
            let path = match field_path(input, &name) {
                Ok(path) => path,
                Err(_) if self.options.ignore_unknown_query_parameters => continue,
                Err(_) => {
                    return Err(bad_request(format!(
                        "unknown query parameter \"{name}\": {} has no such field",
                        input.full_name()
                    )))
                }
            };
            let leaf = path.last().expect("a field path has a field");
            let value = parse_value(leaf, &value).map_err(|why| {
                bad_request(format!(
                    "invalid value \"{value}\" for field \"{name}\" ({}) in the query: {why}",
                    describe(&leaf.kind())
                ))
            })?;
            match assignments
                .iter_mut()
                .find(|known| same_path(&known.path, &path))
            {
                Some(known) => known.values.push(value),
                None => assignments.push(Assignment {
                    path,
                    values: vec![value],
                }),
            }
        }
        for ((variable, path), value) in found
            .template
            .variables
            .iter()
            .zip(&found.variables)
            .zip(values)
        {
            let leaf = path.last().expect("a field path has a field");
            let converted = parse_value(leaf, &value).map_err(|why| {
                bad_request(format!(
                    "invalid value \"{value}\" for field \"{}\" ({}) in the path: {why}",
                    variable.field,
                    describe(&leaf.kind())
                ))
            })?;
            assignments.retain(|known| !same_path(&known.path, path));
            assignments.push(Assignment {
                path: path.clone(),
                values: vec![converted],
            });
        }
        Ok(Bound {
            binding,
            assignments,
        })
    }

    /// Whether the binding takes the HTTP body.
    pub fn has_body(&self, binding: usize) -> bool {
        !matches!(self.bindings[binding].body, BodyRule::None)
    }

    /// The request message: the JSON body (as the binding's `body` says; blank is an empty
    /// message) with the path and query values set on top.
    pub fn request_message(&self, bound: &Bound, body: &[u8]) -> Result<DynamicMessage, Problem> {
        let binding = &self.bindings[bound.binding];
        let input = self.methods[binding.method].input.clone();
        let mut message = match &binding.body {
            BodyRule::None => DynamicMessage::new(input),
            _ if is_blank(body) => DynamicMessage::new(input),
            BodyRule::Whole => self.parse_json(input, body)?,
            BodyRule::Field(field) => {
                // Validated as one JSON value, then read as the member of the message, so an
                // error's path starts at the field.
                let raw: &serde_json::value::RawValue = serde_json::from_slice(body)
                    .map_err(|error| bad_request(format!("invalid JSON: {error}")))?;
                let mut wrapped = Vec::with_capacity(body.len() + field.name().len() + 5);
                wrapped.extend_from_slice(b"{\"");
                wrapped.extend_from_slice(field.name().as_bytes());
                wrapped.extend_from_slice(b"\":");
                wrapped.extend_from_slice(raw.get().as_bytes());
                wrapped.push(b'}');
                self.parse_json(input, &wrapped)?
            }
        };
        for assignment in &bound.assignments {
            assign(&mut message, &assignment.path, &assignment.values);
        }
        Ok(message)
    }

    /// The request as one gRPC frame (uncompressed): see [`Transcoder::request_message`].
    pub fn request_to_frame(&self, bound: &Bound, body: &[u8]) -> Result<Bytes, Problem> {
        let message = self.request_message(bound, body)?;
        let encoded = message.encode_to_vec();
        let mut frame = BytesMut::with_capacity(encoded.len() + 5);
        grpc::encode_frame(0, &encoded, &mut frame);
        Ok(frame.freeze())
    }

    fn parse_json(&self, input: MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, Problem> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let mut track = serde_path_to_error::Track::new();
        let parsed = DynamicMessage::deserialize_with_options(
            input,
            serde_path_to_error::Deserializer::new(&mut deserializer, &mut track),
            &self.deserialize,
        );
        match parsed {
            Ok(message) => {
                deserializer
                    .end()
                    .map_err(|error| bad_request(format!("invalid JSON: {error}")))?;
                Ok(message)
            }
            Err(error) => {
                let path = track.path().to_string();
                Err(bad_request(if path == "." || path.is_empty() {
                    format!("invalid JSON: {error}")
                } else {
                    format!("invalid JSON at \"{path}\": {error}")
                }))
            }
        }
    }

    /// One reply message (its encoded bytes) as JSON, appended to `out`: the whole message, or
    /// the binding's `response_body` field.
    pub fn message_to_json(
        &self,
        binding: usize,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let found = &self.bindings[binding];
        let output = self.methods[found.method].output.clone();
        let name = output.full_name().to_string();
        let message = DynamicMessage::decode(output, data)
            .map_err(|error| format!("the upstream's message is not a valid {name}: {error}"))?;
        match &found.response_body {
            None => {
                let mut serializer = serde_json::Serializer::new(&mut *out);
                message
                    .serialize_with_options(&mut serializer, &self.serialize)
                    .map_err(|error| error.to_string())
            }
            Some(field) => {
                let whole = message
                    .serialize_with_options(serde_json::value::Serializer, &self.serialize_all)
                    .map_err(|error| error.to_string())?;
                let key = if self.options.preserve_proto_field_names {
                    field.name()
                } else {
                    field.json_name()
                };
                let member = whole.get(key).unwrap_or(&serde_json::Value::Null);
                serde_json::to_writer(&mut *out, member).map_err(|error| error.to_string())
            }
        }
    }
}

/// How a reply is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One message, as JSON.
    Unary,
    /// A server stream as one JSON array, each message an element as it arrives.
    JsonArray,
    /// A server stream as newline-delimited JSON, a line per message.
    Ndjson,
}

impl Mode {
    pub fn of(method: &MethodInfo, streaming: Streaming) -> Mode {
        match (method.server_streaming, streaming) {
            (false, _) => Mode::Unary,
            (true, Streaming::JsonArray) => Mode::JsonArray,
            (true, Streaming::Ndjson) => Mode::Ndjson,
        }
    }

    /// The `content-type` of a reply written this way.
    pub fn content_type(self) -> &'static str {
        match self {
            Mode::Unary | Mode::JsonArray => "application/json",
            Mode::Ndjson => "application/x-ndjson",
        }
    }
}

/// Turns the frames of a reply body, however it is cut, into JSON as they arrive, and writes
/// the end of the body for the status the reply ends with.
#[derive(Debug)]
pub struct ReplyWriter {
    binding: usize,
    mode: Mode,
    decoder: FrameDecoder,
    sent: usize,
    done: bool,
}

impl ReplyWriter {
    pub fn new(binding: usize, mode: Mode, max_message: usize) -> ReplyWriter {
        ReplyWriter {
            binding,
            mode,
            decoder: FrameDecoder::new(max_message),
            sent: 0,
            done: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How many messages were written.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Whether the end of the body was written.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Converts the whole messages `piece` completes, appending their JSON to `out`. An error
    /// (a message over the limit, compressed, or not of the method's type) is the status the
    /// body must end with ([`ReplyWriter::finish`]).
    pub fn push(
        &mut self,
        transcoder: &Transcoder,
        piece: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Status> {
        if self.done {
            return Ok(());
        }
        self.decoder.push(piece);
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(error) => return Err(Status::new(Code::Internal, error.to_string())),
            };
            if frame.flags & grpc::COMPRESSED_FLAG != 0 {
                return Err(Status::new(
                    Code::Internal,
                    "the upstream sent a compressed message, which the gateway does not decode",
                ));
            }
            if frame.flags & grpc::TRAILER_FLAG != 0 {
                return Err(Status::new(
                    Code::Internal,
                    "the upstream sent a gRPC-Web trailer frame",
                ));
            }
            if self.mode == Mode::Unary && self.sent > 0 {
                // A unary method answers with one message; later ones are dropped.
                continue;
            }
            let mark = out.len();
            match self.mode {
                Mode::JsonArray => out.push(if self.sent == 0 { b'[' } else { b',' }),
                Mode::Unary | Mode::Ndjson => {}
            }
            if let Err(message) = transcoder.message_to_json(self.binding, &frame.data, out) {
                out.truncate(mark);
                return Err(Status::new(Code::Internal, message));
            }
            if self.mode == Mode::Ndjson {
                out.push(b'\n');
            }
            self.sent += 1;
        }
    }

    /// Writes the end of the body for the reply's `status`: for OK, what closes it (`]`, or
    /// `{}`/`[]` when no message came); for an error, the error element or line of a stream,
    /// or for a unary reply without a message the problem document (the status line is gone
    /// already: the body is all that can tell). Nothing more is written afterwards.
    pub fn finish(&mut self, status: Status, request_id: &str, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.done = true;
        let status = match (status.code, self.decoder.finish()) {
            (Code::Ok, Err(FrameError::Truncated)) => {
                Status::new(Code::Internal, FrameError::Truncated.to_string())
            }
            _ => status,
        };
        match (self.mode, status.code == Code::Ok) {
            (Mode::Unary, true) => {
                if self.sent == 0 {
                    out.extend_from_slice(b"{}");
                }
            }
            (Mode::Unary, false) => {
                if self.sent == 0 {
                    out.extend_from_slice(status.problem().to_json(request_id).as_bytes());
                }
            }
            (Mode::JsonArray, true) => {
                out.extend_from_slice(if self.sent == 0 { b"[]" } else { b"]" });
            }
            (Mode::JsonArray, false) => {
                out.push(if self.sent == 0 { b'[' } else { b',' });
                out.extend_from_slice(status.error_json().as_bytes());
                out.push(b']');
            }
            (Mode::Ndjson, true) => {}
            (Mode::Ndjson, false) => {
                out.extend_from_slice(status.error_json().as_bytes());
                out.push(b'\n');
            }
        }
    }
}
