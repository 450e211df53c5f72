//! `mtls`: identify the caller by the client certificate the listener verified (a TLS
//! listener with `client_auth`). A consumer's `mtls` credential names the certificate's
//! subject common name or one of its subject alternative names. A verified certificate that
//! matches no consumer is 401; a connection without one leaves the decision to the route's
//! `auth` setting.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_http::RequestHeader;
use serde::Deserialize;

use crate::consumers::ConsumerRegistry;
use crate::{BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, RequestContext};

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {}

pub struct Mtls {
    consumers: Arc<ConsumerRegistry>,
}

impl FilterKind for Mtls {
    const KIND: &'static str = "mtls";
    type Config = Config;

    fn build(_config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        Ok(Mtls {
            consumers: ctx.consumers.clone(),
        })
    }
}

impl Mtls {
    fn identify(&self, ctx: &mut RequestContext) -> Decision {
        let Some(connection) = ctx.connection.clone() else {
            return Decision::Continue;
        };
        if !connection.client_cert_verified || connection.client_cert_subject.is_none() {
            return Decision::Continue;
        }
        let by_name = connection
            .client_cert_cn
            .as_deref()
            .and_then(|name| self.consumers.mtls_subject_consumer(name));
        let consumer = by_name.or_else(|| {
            connection
                .client_cert_sans
                .iter()
                .find_map(|name| self.consumers.mtls_san_consumer(name))
        });
        match consumer {
            Some(consumer) => {
                ctx.consumer = Some(consumer.clone());
                ctx.subject = connection.client_cert_subject.as_deref().map(Arc::from);
                ctx.auth_method = Some(Self::KIND);
                Decision::Continue
            }
            None => {
                ctx.auth_failure = Some((Self::KIND, "unknown_certificate"));
                Decision::Reject(Problem::invalid_token())
            }
        }
    }
}

#[async_trait]
impl Filter for Mtls {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn is_auth(&self) -> bool {
        true
    }

    fn try_request(
        &self,
        _request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        Some(self.identify(ctx))
    }
}
