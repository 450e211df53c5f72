//! A chain: the filters one request runs through, compiled once per config. The request phase
//! is a list of steps in chain order, the route's `auth` gate among them; every other phase has
//! the list of the filters that take part in it, so a phase no filter wants costs nothing.

use std::sync::Arc;

use bytes::Bytes;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::{Consumer, Decision, Filter, Phases, Problem, RequestContext, Stage};

/// A route's `auth` setting, checked once every filter that identifies callers has run.
#[derive(Clone, Debug)]
pub enum AuthGate {
    /// A request no filter identified is refused with 401.
    Required,
    /// A request no filter identified goes on as this consumer (or as nobody).
    Optional { anonymous: Option<Consumer> },
}

impl AuthGate {
    fn check(&self, ctx: &mut RequestContext) -> Option<Problem> {
        if ctx.consumer.is_some() {
            return None;
        }
        match self {
            AuthGate::Required => {
                ctx.auth_failure
                    .get_or_insert(("route", "missing_credentials"));
                Some(Problem::credentials_required())
            }
            AuthGate::Optional { anonymous } => {
                ctx.consumer.clone_from(anonymous);
                if ctx.consumer.is_some() {
                    ctx.auth_method = Some("anonymous");
                }
                None
            }
        }
    }
}

enum Step {
    /// The filter at this position runs its request phase.
    Filter(usize),
    Gate(AuthGate),
}

/// The filters of a route (the global ones, then its own, ordered by stage), ready for the
/// request path.
pub struct Chain {
    filters: Vec<Arc<dyn Filter>>,
    steps: Vec<Step>,
    request_body: Vec<usize>,
    upstream_request: Vec<usize>,
    response: Vec<usize>,
    response_body: Vec<usize>,
    response_trailers: Vec<usize>,
    log: Vec<usize>,
    phases: Phases,
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new(Vec::new(), None)
    }
}

impl Chain {
    /// A chain of `filters` in request order, each [`Stage`] before the next (the sort is
    /// stable: within a stage the given order holds). `auth` is checked right after the last
    /// filter that identifies callers (before the first filter of the main stage when there is
    /// none), so CORS preflights and admission checks never wait for credentials.
    pub fn new(mut filters: Vec<Arc<dyn Filter>>, auth: Option<AuthGate>) -> Chain {
        filters.sort_by_key(|filter| filter.stage());
        let declared: Vec<Phases> = filters.iter().map(|filter| filter.phases()).collect();
        let taking_part = |phase: Phases| -> Vec<usize> {
            (0..filters.len())
                .filter(|&index| declared[index].contains(phase))
                .collect()
        };
        let gate_at = filters
            .iter()
            .rposition(|filter| filter.is_auth())
            .map_or_else(
                || {
                    filters
                        .iter()
                        .position(|filter| filter.stage() >= Stage::Main)
                        .unwrap_or(filters.len())
                },
                |last| last + 1,
            );
        let mut steps = Vec::new();
        let mut auth = auth;
        for (index, phases) in declared.iter().enumerate() {
            if index == gate_at {
                steps.extend(auth.take().map(Step::Gate));
            }
            if phases.contains(Phases::REQUEST) {
                steps.push(Step::Filter(index));
            }
        }
        steps.extend(auth.map(Step::Gate));
        let phases = declared
            .iter()
            .fold(Phases::NONE, |all, phases| all | *phases);
        Chain {
            request_body: taking_part(Phases::REQUEST_BODY),
            upstream_request: taking_part(Phases::UPSTREAM_REQUEST),
            response: taking_part(Phases::RESPONSE),
            response_body: taking_part(Phases::RESPONSE_BODY),
            response_trailers: taking_part(Phases::RESPONSE_TRAILERS),
            log: taking_part(Phases::LOG),
            filters,
            steps,
            phases,
        }
    }

    /// The filters, in request order (by stage, then as listed).
    pub fn filters(&self) -> &[Arc<dyn Filter>] {
        &self.filters
    }

    /// Whether any filter takes part in `phase`.
    pub fn wants(&self, phase: Phases) -> bool {
        self.phases.contains(phase)
    }

    /// Whether every filter can serve.
    pub fn ready(&self) -> bool {
        self.filters.iter().all(|filter| filter.ready())
    }

    /// The request phase. `reached` is set to how many filters (by position) the request got
    /// to, so that an early answer runs the response phase of those only (onion order).
    pub async fn request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
        reached: &mut usize,
    ) -> Decision {
        for step in &self.steps {
            match step {
                Step::Filter(index) => {
                    *reached = index + 1;
                    let filter = &self.filters[*index];
                    let decision = match filter.try_request(request, ctx) {
                        Some(decision) => decision,
                        None => filter.request(request, ctx).await,
                    };
                    if !matches!(decision, Decision::Continue) {
                        return decision;
                    }
                }
                Step::Gate(gate) => {
                    if let Some(problem) = gate.check(ctx) {
                        return Decision::Reject(problem);
                    }
                }
            }
        }
        *reached = self.filters.len();
        Decision::Continue
    }

    /// A piece of the request body, in chain order; the first problem answers the request.
    pub fn request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        for &index in &self.request_body {
            self.filters[index].request_body(body, end_of_stream, ctx)?;
        }
        Ok(())
    }

    /// The request about to go upstream, in chain order.
    pub fn upstream_request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) {
        for &index in &self.upstream_request {
            self.filters[index].upstream_request(request, ctx);
        }
    }

    /// The response head, in reverse order, for the filters the request reached.
    pub fn response(
        &self,
        response: &mut ResponseHeader,
        ctx: &mut RequestContext,
        reached: usize,
    ) {
        for &index in self.response.iter().rev() {
            if index < reached {
                self.filters[index].response(response, ctx);
            }
        }
    }

    /// A piece of the response body, in reverse order.
    pub fn response_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) {
        for &index in self.response_body.iter().rev() {
            self.filters[index].response_body(body, end_of_stream, ctx);
        }
    }

    /// The upstream's trailers, in reverse order, until a filter turns them into the body's
    /// last piece.
    pub fn response_trailers(
        &self,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestContext,
    ) -> Option<Bytes> {
        for &index in self.response_trailers.iter().rev() {
            if let Some(last) = self.filters[index].response_trailers(trailers, ctx) {
                return Some(last);
            }
        }
        None
    }

    /// The request is over.
    pub fn log(&self, ctx: &RequestContext) {
        for &index in &self.log {
            self.filters[index].log(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use async_trait::async_trait;

    use super::*;
    use crate::ProblemType;

    /// Records which of its phases were called.
    struct Probe {
        name: &'static str,
        phases: Phases,
        auth: Option<&'static str>,
        stage: Stage,
        calls: Arc<std::sync::Mutex<Vec<String>>>,
        bodies: AtomicUsize,
    }

    impl Probe {
        fn new(
            name: &'static str,
            phases: Phases,
            calls: &Arc<std::sync::Mutex<Vec<String>>>,
        ) -> Probe {
            Probe {
                name,
                phases,
                auth: None,
                stage: Stage::Main,
                calls: calls.clone(),
                bodies: AtomicUsize::new(0),
            }
        }

        fn record(&self, phase: &str) {
            self.calls
                .lock()
                .unwrap()
                .push(format!("{}.{phase}", self.name));
        }
    }

    #[async_trait]
    impl Filter for Probe {
        fn kind(&self) -> &'static str {
            "probe"
        }

        fn phases(&self) -> Phases {
            self.phases
        }

        fn is_auth(&self) -> bool {
            self.auth.is_some()
        }

        fn stage(&self) -> Stage {
            self.stage
        }

        async fn request(
            &self,
            _request: &mut RequestHeader,
            ctx: &mut RequestContext,
        ) -> Decision {
            self.record("request");
            match self.auth {
                Some("alice") => ctx.consumer = Some(Consumer::new("alice")),
                Some("refuse") => return Decision::Reject(Problem::new(ProblemType::Forbidden)),
                _ => {}
            }
            Decision::Continue
        }

        fn request_body(
            &self,
            _body: &mut Option<Bytes>,
            _end_of_stream: bool,
            _ctx: &mut RequestContext,
        ) -> Result<(), Problem> {
            self.bodies.fetch_add(1, Ordering::Relaxed);
            self.record("request_body");
            Ok(())
        }

        fn response(&self, _response: &mut ResponseHeader, _ctx: &mut RequestContext) {
            self.record("response");
        }

        fn log(&self, _ctx: &RequestContext) {
            self.record("log");
        }
    }

    fn run(chain: &Chain) -> (Decision, usize, RequestContext) {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        let mut reached = 0;
        let decision = block_on(chain.request(&mut request, &mut ctx, &mut reached));
        (decision, reached, ctx)
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn phases_no_filter_wants_are_skipped_and_responses_run_in_reverse() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let chain = Chain::new(
            vec![
                Arc::new(Probe::new("a", Phases::REQUEST | Phases::RESPONSE, &calls)),
                Arc::new(Probe::new("b", Phases::RESPONSE | Phases::LOG, &calls)),
                Arc::new(Probe::new("c", Phases::REQUEST, &calls)),
            ],
            None,
        );
        assert!(!chain.wants(Phases::REQUEST_BODY));
        assert!(!chain.wants(Phases::UPSTREAM_REQUEST));
        let (decision, reached, mut ctx) = run(&chain);
        assert!(matches!(decision, Decision::Continue));
        assert_eq!(reached, 3);
        let mut response = ResponseHeader::build(200, None).unwrap();
        chain.response(&mut response, &mut ctx, reached);
        chain.request_body(&mut None, true, &mut ctx).unwrap();
        chain.log(&ctx);
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "a.request",
                "c.request",
                "b.response",
                "a.response",
                "b.log"
            ]
        );
    }

    /// Decides without waiting, or leaves it to the async phase.
    struct Quick {
        decide_now: bool,
        calls: Arc<std::sync::Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl Filter for Quick {
        fn kind(&self) -> &'static str {
            "quick"
        }

        fn phases(&self) -> Phases {
            Phases::REQUEST
        }

        fn try_request(
            &self,
            _request: &mut RequestHeader,
            _ctx: &mut RequestContext,
        ) -> Option<Decision> {
            self.calls.lock().unwrap().push("try_request".into());
            self.decide_now
                .then(|| Decision::Reject(Problem::new(ProblemType::Forbidden)))
        }

        async fn request(
            &self,
            _request: &mut RequestHeader,
            _ctx: &mut RequestContext,
        ) -> Decision {
            self.calls.lock().unwrap().push("request".into());
            Decision::Reject(Problem::new(ProblemType::RateLimited))
        }
    }

    #[test]
    fn a_filter_that_decides_at_once_is_not_awaited() {
        for (decide_now, status, called) in [
            (true, 403, vec!["try_request"]),
            (false, 429, vec!["try_request", "request"]),
        ] {
            let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
            let chain = Chain::new(
                vec![Arc::new(Quick {
                    decide_now,
                    calls: calls.clone(),
                })],
                None,
            );
            let (decision, _, _) = run(&chain);
            assert!(matches!(decision, Decision::Reject(problem) if problem.status == status));
            assert_eq!(*calls.lock().unwrap(), called);
        }
    }

    #[test]
    fn the_auth_gate_runs_after_the_last_auth_filter() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut identify = Probe::new("jwt", Phases::REQUEST | Phases::RESPONSE, &calls);
        identify.auth = Some("nobody");
        let chain = Chain::new(
            vec![
                Arc::new(Probe::new("id", Phases::REQUEST | Phases::RESPONSE, &calls)),
                Arc::new(identify),
                Arc::new(Probe::new(
                    "limit",
                    Phases::REQUEST | Phases::RESPONSE,
                    &calls,
                )),
            ],
            Some(AuthGate::Required),
        );
        let (decision, reached, mut ctx) = run(&chain);
        assert!(matches!(decision, Decision::Reject(problem) if problem.status == 401));
        assert_eq!(ctx.auth_failure, Some(("route", "missing_credentials")));
        assert_eq!(reached, 2, "the filter after the gate was not reached");
        let mut response = ResponseHeader::build(401, None).unwrap();
        chain.response(&mut response, &mut ctx, reached);
        assert_eq!(
            *calls.lock().unwrap(),
            ["id.request", "jwt.request", "jwt.response", "id.response"]
        );

        // Identified: the gate lets the request on to the next filter.
        let mut alice = Probe::new("jwt", Phases::REQUEST, &calls);
        alice.auth = Some("alice");
        let chain = Chain::new(
            vec![
                Arc::new(alice),
                Arc::new(Probe::new("limit", Phases::REQUEST, &calls)),
            ],
            Some(AuthGate::Required),
        );
        let (decision, reached, ctx) = run(&chain);
        assert!(matches!(decision, Decision::Continue));
        assert_eq!(reached, 2);
        assert_eq!(ctx.consumer.unwrap().id.as_ref(), "alice");
    }

    #[test]
    fn an_optional_route_names_the_anonymous_consumer_and_a_refusal_stops_the_chain() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let chain = Chain::new(
            vec![Arc::new(Probe::new("limit", Phases::REQUEST, &calls))],
            Some(AuthGate::Optional {
                anonymous: Some(Consumer::new("guest")),
            }),
        );
        let (_, _, ctx) = run(&chain);
        assert_eq!(ctx.consumer.unwrap().id.as_ref(), "guest");

        let mut refuse = Probe::new("refuse", Phases::REQUEST | Phases::RESPONSE, &calls);
        refuse.auth = Some("refuse");
        let chain = Chain::new(
            vec![
                Arc::new(refuse),
                Arc::new(Probe::new(
                    "after",
                    Phases::REQUEST | Phases::RESPONSE,
                    &calls,
                )),
            ],
            None,
        );
        calls.lock().unwrap().clear();
        let (decision, reached, _) = run(&chain);
        assert!(matches!(decision, Decision::Reject(problem) if problem.status == 403));
        assert_eq!(reached, 1);
        assert_eq!(*calls.lock().unwrap(), ["refuse.request"]);
    }

    #[test]
    fn earlier_stages_run_first_and_the_gate_comes_after_them() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let staged = |name, stage| {
            let mut probe = Probe::new(name, Phases::REQUEST | Phases::RESPONSE, &calls);
            probe.stage = stage;
            probe
        };
        let mut jwt = staged("jwt", Stage::Main);
        jwt.auth = Some("nobody");
        let chain = Chain::new(
            vec![
                Arc::new(staged("limit", Stage::Main)),
                Arc::new(jwt),
                Arc::new(staged("ip", Stage::Admission)),
                Arc::new(staged("cors", Stage::Preflight)),
                Arc::new(staged("id", Stage::Identify)),
                Arc::new(staged("methods", Stage::Admission)),
            ],
            Some(AuthGate::Required),
        );
        let kinds: Vec<_> = chain
            .filters()
            .iter()
            .map(|filter| filter.stage())
            .collect();
        assert!(kinds.is_sorted(), "{kinds:?}");
        let (decision, reached, mut ctx) = run(&chain);
        assert!(matches!(decision, Decision::Reject(problem) if problem.status == 401));
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "id.request",
                "cors.request",
                "ip.request",
                "methods.request",
                "limit.request",
                "jwt.request"
            ]
        );
        calls.lock().unwrap().clear();
        let mut response = ResponseHeader::build(401, None).unwrap();
        chain.response(&mut response, &mut ctx, reached);
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "jwt.response",
                "limit.response",
                "methods.response",
                "ip.response",
                "cors.response",
                "id.response"
            ]
        );

        // No auth filter: the gate comes after the early stages, not before them.
        calls.lock().unwrap().clear();
        let chain = Chain::new(
            vec![
                Arc::new(staged("limit", Stage::Main)),
                Arc::new(staged("cors", Stage::Preflight)),
            ],
            Some(AuthGate::Required),
        );
        let (decision, reached, _) = run(&chain);
        assert!(matches!(decision, Decision::Reject(problem) if problem.status == 401));
        assert_eq!(reached, 1);
        assert_eq!(*calls.lock().unwrap(), ["cors.request"]);
        // Only early stages: the gate runs last.
        calls.lock().unwrap().clear();
        let chain = Chain::new(
            vec![Arc::new(staged("cors", Stage::Preflight))],
            Some(AuthGate::Required),
        );
        let (decision, _, _) = run(&chain);
        assert!(matches!(decision, Decision::Reject(problem) if problem.status == 401));
        assert_eq!(*calls.lock().unwrap(), ["cors.request"]);
    }
}
