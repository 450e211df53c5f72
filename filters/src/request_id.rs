//! `request_id`: give every request an id, keep a well-formed one the client or an inner proxy
//! sent, forward it upstream and return it to the client.

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use crate::{BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, RequestContext, Stage};

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The header that carries the id, to the upstream and back to the client.
    pub header: String,
    /// Keep an id the client sent when it is well formed (at most 128 visible ASCII characters).
    /// Set to false at an edge whose clients must not choose ids.
    pub trust_incoming: bool,
    /// Return the id to the client in a response header.
    pub echo_in_response: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: "x-request-id".into(),
            trust_incoming: true,
            echo_in_response: true,
        }
    }
}

pub struct RequestId {
    header: HeaderName,
    trust_incoming: bool,
    echo_in_response: bool,
}

const MAX_INCOMING_LENGTH: usize = 128;

fn well_formed(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_INCOMING_LENGTH
        || !bytes.iter().all(|byte| byte.is_ascii_graphic())
    {
        return None;
    }
    value.to_str().ok()
}

impl FilterKind for RequestId {
    const KIND: &'static str = "request_id";
    type Config = Config;

    fn build(config: Config, _ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let header = HeaderName::from_bytes(config.header.as_bytes()).map_err(|_| {
            vec![BuildError::new(
                "header",
                format!("\"{}\" is not a valid header name", config.header),
            )]
        })?;
        Ok(RequestId {
            header,
            trust_incoming: config.trust_incoming,
            echo_in_response: config.echo_in_response,
        })
    }
}

impl RequestId {
    /// Gives the request its id (a well-formed incoming one, or a new one) and forwards it.
    fn assign(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        // An id the connection gave (the L4 balancer's PROXY `UNIQUE_ID`) comes first: the
        // balancer's logs carry it too.
        let incoming = if let Some(id) = ctx.request_id_if_set() {
            Some(id.to_owned())
        } else if self.trust_incoming {
            request
                .headers
                .get(&self.header)
                .and_then(well_formed)
                .map(str::to_owned)
        } else {
            None
        };
        let id = match incoming {
            Some(id) => id,
            None => ctx.request_id().to_owned(),
        };
        if let Ok(value) = HeaderValue::from_str(&id) {
            request.insert_header(self.header.clone(), value).ok();
        }
        ctx.set_request_id(id);
        ctx.request_id_header = Some(self.header.clone());
        Decision::Continue
    }
}

#[async_trait]
impl Filter for RequestId {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    /// First of all, so every answer, an early refusal's too, carries the request's own id.
    fn stage(&self) -> Stage {
        Stage::Identify
    }

    fn phases(&self) -> Phases {
        if self.echo_in_response {
            Phases::REQUEST | Phases::RESPONSE
        } else {
            Phases::REQUEST
        }
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        Some(self.assign(request, ctx))
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        if !self.echo_in_response {
            return;
        }
        if let Ok(value) = HeaderValue::from_str(ctx.request_id()) {
            response.insert_header(self.header.clone(), value).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn filter(config: Config) -> RequestId {
        RequestId::build(config, &BuildCtx::default()).unwrap()
    }

    fn request(id: Option<&str>) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(id) = id {
            request.insert_header("x-request-id", id).unwrap();
        }
        request
    }

    #[tokio::test]
    async fn keeps_a_well_formed_incoming_id_and_echoes_it() {
        let filter = filter(Config::default());
        let mut ctx = RequestContext::new(Instant::now());
        let mut req = request(Some("abc-123"));
        filter.request(&mut req, &mut ctx).await;
        assert_eq!(ctx.request_id(), "abc-123");
        let mut response = ResponseHeader::build(200, None).unwrap();
        filter.response(&mut response, &mut ctx);
        assert_eq!(response.headers["x-request-id"], "abc-123");
    }

    #[tokio::test]
    async fn replaces_malformed_or_untrusted_ids() {
        let filter_trusting = filter(Config::default());
        let mut ctx = RequestContext::new(Instant::now());
        let long = "a".repeat(200);
        let mut req = request(Some(&long));
        filter_trusting.request(&mut req, &mut ctx).await;
        assert_ne!(ctx.request_id(), long);
        assert_eq!(req.headers["x-request-id"], ctx.request_id());

        let filter_untrusting = filter(Config {
            trust_incoming: false,
            ..Config::default()
        });
        let mut ctx = RequestContext::new(Instant::now());
        let mut req = request(Some("chosen-by-client"));
        filter_untrusting.request(&mut req, &mut ctx).await;
        assert_ne!(ctx.request_id(), "chosen-by-client");
    }

    #[test]
    fn rejects_invalid_header_name() {
        let error = RequestId::build(
            Config {
                header: "bad header".into(),
                ..Config::default()
            },
            &BuildCtx::default(),
        )
        .err()
        .unwrap();
        assert_eq!(error[0].path, "header");
    }
}
