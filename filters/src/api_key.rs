//! `api_key`: identify the caller by a key in a header or query parameter. Keys are stored only
//! as hashes (see `gatehouse keygen`); a present but unknown, disabled or expired key is 401, an
//! absent one leaves the decision to the route's `auth` setting.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::HeaderName;
use pingora_http::RequestHeader;
use serde::Deserialize;

use crate::consumers::{ConsumerRegistry, KeyRefusal};
use crate::util::decode_query_component;
use crate::{BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, RequestContext};

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Header carrying the key. Empty to read only the query parameter.
    pub header: String,
    /// Query parameter carrying the key, if keys may come in the URL.
    pub query: Option<String>,
    /// Remove the key from the request before it goes upstream.
    pub hide_credential: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: "x-api-key".into(),
            query: None,
            hide_credential: true,
        }
    }
}

pub struct ApiKey {
    header: Option<HeaderName>,
    query: Option<String>,
    hide_credential: bool,
    consumers: Arc<ConsumerRegistry>,
}

impl FilterKind for ApiKey {
    const KIND: &'static str = "api_key";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let header = if config.header.is_empty() {
            None
        } else {
            Some(
                HeaderName::from_bytes(config.header.as_bytes()).map_err(|_| {
                    vec![BuildError::new(
                        "header",
                        format!("\"{}\" is not a valid header name", config.header),
                    )]
                })?,
            )
        };
        if header.is_none() && config.query.is_none() {
            return Err(vec![BuildError::new(
                "",
                "give a `header`, a `query` parameter, or both",
            )]);
        }
        Ok(ApiKey {
            header,
            query: config.query,
            hide_credential: config.hide_credential,
            consumers: ctx.consumers.clone(),
        })
    }
}

/// The value of query parameter `name` and the query without it.
fn take_query_param(query: &str, name: &str) -> Option<(String, String)> {
    let mut found = None;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if found.is_none() && key == name {
            found = Some(decode_query_component(value));
        } else if !pair.is_empty() {
            rest.push(pair);
        }
    }
    found.map(|value| (value, rest.join("&")))
}

impl ApiKey {
    /// Looks the presented key up; an absent key leaves the decision to the route.
    fn identify(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        let mut key = None;
        if let Some(header) = &self.header {
            let mut values = request.headers.get_all(header).iter();
            if let Some(value) = values.next() {
                if values.next().is_some() {
                    ctx.auth_failure = Some((Self::KIND, "ambiguous"));
                    return Decision::Reject(Problem::invalid_token());
                }
                key = Some(value.as_bytes().to_vec());
            }
            if key.is_some() && self.hide_credential {
                request.remove_header(header);
            }
        }
        if key.is_none() {
            if let (Some(name), Some(query)) = (&self.query, request.uri.query()) {
                if let Some((value, rest)) = take_query_param(query, name) {
                    if self.hide_credential {
                        let path = request.uri.path().to_string();
                        let target = if rest.is_empty() {
                            path
                        } else {
                            format!("{path}?{rest}")
                        };
                        if let Ok(uri) = target.parse::<http::Uri>() {
                            request.set_uri(uri);
                        }
                    }
                    key = Some(value.into_bytes());
                }
            }
        }
        let Some(key) = key else {
            return Decision::Continue;
        };
        if key.is_empty() {
            ctx.auth_failure = Some((Self::KIND, "malformed"));
            return Decision::Reject(Problem::invalid_token());
        }
        match self.consumers.api_key_consumer(&key, SystemTime::now()) {
            Ok(consumer) => {
                ctx.consumer = Some(consumer.clone());
                ctx.auth_method = Some(Self::KIND);
                Decision::Continue
            }
            Err(refusal) => {
                ctx.auth_failure = Some((
                    Self::KIND,
                    match refusal {
                        KeyRefusal::Unknown => "unknown_key",
                        KeyRefusal::Disabled => "disabled_key",
                        KeyRefusal::Expired => "expired_key",
                    },
                ));
                Decision::Reject(Problem::invalid_token())
            }
        }
    }
}

#[async_trait]
impl Filter for ApiKey {
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
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        Some(self.identify(request, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumers::{sha256, ApiKeyCredential, KeyHashKind};
    use crate::Consumer;
    use std::time::Instant;

    fn filter(config: Config) -> ApiKey {
        let mut registry = ConsumerRegistry::new(None);
        registry.add_api_key(
            KeyHashKind::Sha256,
            ApiKeyCredential {
                consumer: Consumer::new("acme"),
                hash: sha256(b"k-123"),
                disabled: false,
                expires_at: None,
            },
        );
        ApiKey::build(
            config,
            &BuildCtx {
                consumers: Arc::new(registry),
                ..BuildCtx::default()
            },
        )
        .unwrap()
    }

    async fn run(
        filter: &ApiKey,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Decision, RequestContext, RequestHeader) {
        let mut request = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        for (name, value) in headers {
            request.append_header(name.to_string(), *value).unwrap();
        }
        let mut ctx = RequestContext::new(Instant::now());
        let decision = filter.request(&mut request, &mut ctx).await;
        (decision, ctx, request)
    }

    #[tokio::test]
    async fn header_and_query_keys_identify_and_are_hidden() {
        let filter = filter(Config {
            query: Some("apikey".into()),
            ..Config::default()
        });
        let (decision, ctx, request) = run(&filter, "/x", &[("x-api-key", "k-123")]).await;
        assert!(matches!(decision, Decision::Continue));
        assert_eq!(&*ctx.consumer.unwrap().id, "acme");
        assert!(request.headers.get("x-api-key").is_none());

        let (decision, ctx, request) = run(&filter, "/x?a=1&apikey=k-123&b=2", &[]).await;
        assert!(matches!(decision, Decision::Continue));
        assert!(ctx.consumer.is_some());
        assert_eq!(request.uri.to_string(), "/x?a=1&b=2");
    }

    #[tokio::test]
    async fn absent_passes_wrong_or_doubled_is_401() {
        let filter = filter(Config::default());
        let (decision, ctx, _) = run(&filter, "/x", &[]).await;
        assert!(matches!(decision, Decision::Continue));
        assert!(ctx.consumer.is_none());
        let (decision, ctx, _) = run(&filter, "/x", &[("x-api-key", "wrong")]).await;
        match decision {
            Decision::Reject(problem) => assert_eq!(problem.status, 401),
            other => panic!("{other:?}"),
        }
        assert_eq!(ctx.auth_failure, Some(("api_key", "unknown_key")));
        let (decision, _, _) = run(
            &filter,
            "/x",
            &[("x-api-key", "k-123"), ("x-api-key", "wrong")],
        )
        .await;
        assert!(matches!(decision, Decision::Reject(_)));
    }
}
