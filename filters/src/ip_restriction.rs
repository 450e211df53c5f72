//! `ip_restriction`: allow and deny lists of IPv4 and IPv6 CIDR blocks, checked against the
//! trusted client address: the TCP peer, or the address a trusted proxy forwarded, never a raw
//! `X-Forwarded-For` from anyone else. A refused request gets 403 `address-not-allowed`.

use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use pingora_http::RequestHeader;
use serde::Deserialize;

use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext, Stage,
};

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// CIDR blocks (or single addresses) that may pass. When given, every other address is
    /// refused.
    pub allow: Vec<String>,
    /// CIDR blocks (or single addresses) that are refused, even when `allow` lists them too.
    pub deny: Vec<String>,
}

pub struct IpRestriction {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

/// The blocks of one list, merged where they overlap; a bad entry is an error at its index.
fn blocks(key: &str, entries: &[String], errors: &mut Vec<BuildError>) -> Vec<IpNet> {
    let mut blocks = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let text = entry.trim();
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(block) if block.trunc() != block => errors.push(BuildError::new(
                format!("{key}[{index}]"),
                format!(
                    "\"{text}\" has bits set below its prefix length: write the block as {} or the single address as {}/{}",
                    block.trunc(),
                    block.addr(),
                    block.max_prefix_len()
                ),
            )),
            Ok(block) => blocks.push(block),
            Err(_) => errors.push(BuildError::new(
                format!("{key}[{index}]"),
                format!(
                    "\"{text}\" is not a CIDR block or an IP address (like \"10.0.0.0/8\", \"2001:db8::/32\" or \"192.0.2.7\")"
                ),
            )),
        }
    }
    IpNet::aggregate(&blocks)
}

impl FilterKind for IpRestriction {
    const KIND: &'static str = "ip_restriction";
    type Config = Config;

    fn build(config: Config, _ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        if config.allow.is_empty() && config.deny.is_empty() {
            errors.push(BuildError::new("", "give `allow`, `deny` or both"));
        }
        let allow = blocks("allow", &config.allow, &mut errors);
        let deny = blocks("deny", &config.deny, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(IpRestriction { allow, deny })
    }
}

impl IpRestriction {
    /// Deny wins; then, when there is an allow list, only what it lists passes. An IPv4-mapped
    /// IPv6 address (`::ffff:192.0.2.7`, as a dual-stack listener reports IPv4 peers) is held
    /// against the IPv4 rules too. A request without a client address (a Unix socket) passes
    /// only when there is no allow list.
    pub fn allows(&self, client: Option<IpAddr>) -> bool {
        let Some(address) = client else {
            return self.allow.is_empty();
        };
        let mapped = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let listed = |blocks: &[IpNet]| {
            blocks.iter().any(|block| {
                block.contains(&address) || mapped.is_some_and(|v4| block.contains(&v4))
            })
        };
        !listed(&self.deny) && (self.allow.is_empty() || listed(&self.allow))
    }
}

#[async_trait]
impl Filter for IpRestriction {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn stage(&self) -> Stage {
        Stage::Admission
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn try_request(
        &self,
        _request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        Some(if self.allows(ctx.client_addr) {
            Decision::Continue
        } else {
            Decision::Reject(Problem::new(ProblemType::AddressNotAllowed))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn build(config: serde_json::Value) -> Result<IpRestriction, Vec<BuildError>> {
        IpRestriction::build(
            serde_json::from_value(config).unwrap(),
            &BuildCtx::default(),
        )
    }

    fn address(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn deny_wins_over_allow_and_allow_lists_close_everything_else() {
        let filter = build(serde_json::json!({
            "allow": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"],
            "deny": ["10.9.0.0/16", "2001:db8:bad::/48"],
        }))
        .unwrap();
        assert!(filter.allows(address("10.1.2.3")));
        assert!(!filter.allows(address("10.9.2.3")), "deny wins");
        assert!(filter.allows(address("192.0.2.7")));
        assert!(!filter.allows(address("192.0.2.8")));
        assert!(filter.allows(address("2001:db8:1::1")));
        assert!(!filter.allows(address("2001:db8:bad::1")));
        assert!(!filter.allows(address("2001:db9::1")));
        assert!(!filter.allows(None), "no address, and an allow list");
    }

    #[test]
    fn ipv4_mapped_ipv6_addresses_meet_the_ipv4_rules() {
        let filter =
            build(serde_json::json!({"allow": ["10.0.0.0/8"], "deny": ["10.9.0.0/16"]})).unwrap();
        assert!(filter.allows(address("::ffff:10.1.2.3")));
        assert!(!filter.allows(address("::ffff:10.9.2.3")));
        assert!(!filter.allows(address("::ffff:192.0.2.1")));
        // An IPv6 client is not an IPv4 one: IPv4-only rules do not admit it.
        assert!(!filter.allows(address("::1")));
        assert!(!filter.allows(address("2001:db8::10:1:2:3")));

        let deny_only = build(serde_json::json!({"deny": ["203.0.113.0/24"]})).unwrap();
        assert!(!deny_only.allows(address("::ffff:203.0.113.9")));
        assert!(deny_only.allows(address("2001:db8::1")));
        assert!(deny_only.allows(None));
    }

    #[test]
    fn refusals_are_403_problems() {
        let filter = build(serde_json::json!({"deny": ["127.0.0.0/8"]})).unwrap();
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request
            .insert_header("x-forwarded-for", "198.51.100.1")
            .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.client_addr = address("127.0.0.1");
        match filter.try_request(&mut request, &mut ctx) {
            Some(Decision::Reject(problem)) => {
                assert_eq!(problem.status, 403);
                assert_eq!(problem.kind, ProblemType::AddressNotAllowed);
            }
            other => panic!("{other:?}"),
        }
        ctx.client_addr = address("198.51.100.1");
        assert!(matches!(
            filter.try_request(&mut request, &mut ctx),
            Some(Decision::Continue)
        ));
    }

    #[test]
    fn every_bad_entry_is_reported_with_its_path() {
        let errors = build(serde_json::json!({
            "allow": ["10.0.0.0/8", "10.0.0.0/33", "not-an-address"],
            "deny": ["192.168.1.10/24", "fe80::/10"],
        }))
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(paths, ["allow[1]", "allow[2]", "deny[0]"]);
        assert!(errors[2].message.contains("192.168.1.0/24"), "{errors:?}");
        let errors = build(serde_json::json!({})).err().unwrap();
        assert!(errors[0].message.contains("`allow`, `deny`"));
    }
}
