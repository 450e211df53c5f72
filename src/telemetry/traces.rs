//! OpenTelemetry traces: a SERVER span per request, a CLIENT span per upstream attempt (so
//! retries show as siblings), and the filters' decisions as span events.
//!
//! A caller's W3C `traceparent` is continued (unless `trust_incoming: false`), an invalid one
//! starts a new trace, and the upstream gets a `traceparent` naming our CLIENT span; `tracestate`
//! passes through untouched. Sampling is parent-based with a ratio for new traces, read from an
//! atomic so that a reload changes it.
//!
//! Finished spans go into a bounded queue that the request path never waits on: a full queue
//! drops the span and counts it. One exporter thread sends them in batches to the OTLP/HTTP
//! endpoint, woken when a batch is full or every second, never once per span, with the blocking
//! HTTP client (the thread has no async runtime, so an async client could not run there). The thread starts with the first span, so it runs in the process that serves
//! (a `--daemon` start forks after this module is set up), and [`shutdown`] flushes the queue.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use once_cell::sync::OnceCell;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::Link;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample, SpanData,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;

use super::worker::{Shards, Worker};
use crate::config::model::TracingConfig;

static TRACING: OnceCell<Tracing> = OnceCell::new();

/// The process's tracing, when `telemetry.tracing` was set at start.
pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    ratio: Arc<AtomicU64>,
    trust_incoming: AtomicBool,
    /// What was fixed at start, to warn when a reload changes it.
    started_with: TracingConfig,
}

/// Sets tracing up from the config at start; without a `tracing` section it stays off for the
/// life of the process.
pub fn init(config: Option<&TracingConfig>, metrics: &gatehouse_filters::Metrics) {
    let Some(config) = config else {
        return;
    };
    let ratio = Arc::new(AtomicU64::new(config.sample_ratio.to_bits()));
    let queue = Queue::new(config, metrics);
    let provider = SdkTracerProvider::builder()
        .with_sampler(Decided)
        .with_span_processor(queue)
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("gatehouse");
    let _ = TRACING.set(Tracing {
        tracer,
        provider,
        ratio,
        trust_incoming: AtomicBool::new(config.trust_incoming),
        started_with: config.clone(),
    });
}

/// What a reload changes: the sample ratio and `trust_incoming`. The rest is fixed at start.
pub fn apply(config: Option<&TracingConfig>) {
    let Some(tracing) = TRACING.get() else {
        if config.is_some() {
            tracing::warn!(
                "telemetry.tracing was added by a reload: tracing starts with the next restart"
            );
        }
        return;
    };
    let Some(config) = config else {
        tracing::warn!(
            "telemetry.tracing was removed by a reload: new traces are no longer sampled; the exporter stops with the next restart"
        );
        tracing.ratio.store(0f64.to_bits(), Ordering::Relaxed);
        tracing.trust_incoming.store(false, Ordering::Relaxed);
        return;
    };
    tracing
        .ratio
        .store(config.sample_ratio.to_bits(), Ordering::Relaxed);
    tracing
        .trust_incoming
        .store(config.trust_incoming, Ordering::Relaxed);
    let fixed = &tracing.started_with;
    if config.traces_url() != fixed.traces_url()
        || config.service_name != fixed.service_name
        || config.max_queue != fixed.max_queue
        || config.max_batch != fixed.max_batch
        || config.export_timeout != fixed.export_timeout
    {
        tracing::warn!("telemetry.tracing: endpoint, service_name, max_queue, max_batch and export_timeout apply at the next restart");
    }
}

/// Flushes the spans still queued, waiting up to `limit`.
pub fn shutdown(limit: Duration) {
    if let Some(tracing) = TRACING.get() {
        if let Err(error) = tracing.provider.shutdown_with_timeout(limit) {
            tracing::warn!(%error, "traces not all exported at shutdown");
        }
    }
}

/// The trace of one request: its SERVER span (in a context, the parent of the CLIENT spans)
/// and the CLIENT span of the current upstream attempt.
pub struct RequestTrace {
    /// The recorded SERVER span, in a context; `None` for a trace that is not recorded.
    server: Option<Context>,
    /// The ids of a trace that is not recorded: passed on to the upstream, unsampled, with
    /// the caller's trace id and `tracestate`.
    unrecorded: SpanContext,
    client: Option<opentelemetry_sdk::trace::Span>,
}

/// The request's headers, for the W3C propagator.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Starts the SERVER span of a request that just arrived, when tracing is on.
pub fn start(request: &pingora_http::RequestHeader) -> Option<Box<RequestTrace>> {
    let tracing = TRACING.get()?;
    let parent = if tracing.trust_incoming.load(Ordering::Relaxed) {
        TraceContextPropagator::new().extract(&Headers(&request.headers))
    } else {
        Context::new()
    };
    // Parent-based: a caller's sampled flag decides; a trace that starts here is recorded with
    // probability `sample_ratio`.
    let (record, trace_id, trace_state) = {
        let span = parent.span();
        let context = span.span_context();
        if context.is_valid() {
            (
                context.is_sampled(),
                context.trace_id(),
                context.trace_state().clone(),
            )
        } else {
            let ratio = f64::from_bits(tracing.ratio.load(Ordering::Relaxed));
            (
                ratio >= 1.0 || (ratio > 0.0 && fastrand::f64() < ratio),
                TraceId::INVALID,
                TraceState::default(),
            )
        }
    };
    if !record {
        let trace_id = if trace_id == TraceId::INVALID {
            TraceId::from_bytes(fastrand::u128(1..).to_be_bytes())
        } else {
            trace_id
        };
        return Some(Box::new(RequestTrace {
            server: None,
            unrecorded: SpanContext::new(
                trace_id,
                SpanId::from_bytes(fastrand::u64(1..).to_be_bytes()),
                TraceFlags::default(),
                false,
                trace_state,
            ),
            client: None,
        }));
    }
    let span = tracing
        .tracer
        .span_builder(method_name(&request.method))
        .with_kind(SpanKind::Server)
        .start_with_context(&tracing.tracer, &parent);
    Some(Box::new(RequestTrace {
        server: Some(parent.with_span(span)),
        unrecorded: SpanContext::empty_context(),
        client: None,
    }))
}

/// A span name for `method` without an allocation for the usual ones.
fn method_name(method: &http::Method) -> std::borrow::Cow<'static, str> {
    let name = match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => return method.as_str().to_string().into(),
    };
    name.into()
}

impl RequestTrace {
    /// Whether the trace is recorded: spans, attributes and events are built only then.
    pub fn recording(&self) -> bool {
        self.server.is_some()
    }

    /// An event on the SERVER span.
    pub fn event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        if let Some(server) = &self.server {
            server.span().add_event(name, attributes);
        }
    }

    /// Starts the CLIENT span of an upstream attempt, ending the previous attempt's. A trace
    /// that is not recorded gets none: the upstream is then told the SERVER span, unsampled.
    pub fn attempt(&mut self, method: &http::Method, attributes: Vec<KeyValue>) {
        self.end_attempt(None);
        let (Some(tracing), Some(server)) = (TRACING.get(), &self.server) else {
            return;
        };
        let span = tracing
            .tracer
            .span_builder(method_name(method))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&tracing.tracer, server);
        self.client = Some(span);
    }

    /// The `traceparent` for the upstream: the current CLIENT span, else the SERVER span.
    pub fn traceparent(&self) -> Option<http::HeaderValue> {
        let server = self.server.as_ref().map(|server| server.span());
        let context = match (&self.client, &server) {
            (Some(span), _) => span.span_context(),
            (None, Some(server)) => server.span_context(),
            (None, None) => &self.unrecorded,
        };
        if !context.is_valid() {
            return None;
        }
        // 00-<32 hex>-<16 hex>-<2 hex>
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        let _ = hex::encode_to_slice(context.trace_id().to_bytes(), &mut text[3..35]);
        text[35] = b'-';
        let _ = hex::encode_to_slice(context.span_id().to_bytes(), &mut text[36..52]);
        text[52] = b'-';
        let _ = hex::encode_to_slice([context.trace_flags().to_u8()], &mut text[53..55]);
        http::HeaderValue::from_bytes(&text).ok()
    }

    /// The current attempt's upstream answered with `status`.
    pub fn attempt_answered(&mut self, status: u16) {
        if let Some(span) = self.client.as_mut() {
            if span.is_recording() {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 500 {
                    span.set_status(Status::error(status.to_string()));
                }
            }
        }
    }

    /// Ends the current attempt's CLIENT span; `error` marks it failed (a refused connection,
    /// a reset, a timeout).
    pub fn end_attempt(&mut self, error: Option<&str>) {
        if let Some(mut span) = self.client.take() {
            if let Some(error) = error {
                if span.is_recording() {
                    span.set_attribute(KeyValue::new("error.type", error.to_string()));
                    span.set_status(Status::error(error.to_string()));
                }
            }
            span.end();
        }
    }

    /// Ends the request: the SERVER span gets its name, its attributes and, for a 5xx, an
    /// error status.
    pub fn finish(&mut self, name: String, status: u16, attributes: Vec<KeyValue>) {
        self.end_attempt(None);
        let Some(server) = &self.server else {
            return;
        };
        let span = server.span();
        if span.is_recording() {
            span.update_name(name);
            span.set_attributes(attributes);
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 500 {
                span.set_status(Status::error(status.to_string()));
            }
        }
        span.end();
    }

    /// The SERVER span's trace and span ids, for the access log.
    pub fn ids(&self) -> Option<([u8; 16], [u8; 8])> {
        let server = self.server.as_ref().map(|server| server.span());
        let context = match &server {
            Some(server) => server.span_context(),
            None => &self.unrecorded,
        };
        context
            .is_valid()
            .then(|| (context.trace_id().to_bytes(), context.span_id().to_bytes()))
    }
}

/// The SDK's sampler: a parent's sampled flag is followed; a span without a parent is a trace
/// that [`start`] already chose to record (the ratio is applied there, before any span is
/// built, so that the traces not recorded cost no SDK span at all).
#[derive(Clone, Debug)]
struct Decided;

impl ShouldSample for Decided {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        _trace_id: TraceId,
        _name: &str,
        _kind: &SpanKind,
        _attributes: &[KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        if let Some(parent) = parent.filter(|parent| parent.has_active_span()) {
            let span = parent.span();
            let context = span.span_context();
            if context.is_valid() {
                return SamplingResult {
                    decision: if context.is_sampled() {
                        SamplingDecision::RecordAndSample
                    } else {
                        SamplingDecision::Drop
                    },
                    attributes: Vec::new(),
                    trace_state: context.trace_state().clone(),
                };
            }
        }
        SamplingResult {
            decision: SamplingDecision::RecordAndSample,
            attributes: Vec::new(),
            trace_state: Default::default(),
        }
    }
}

/// The span processor: a bounded queue in front of the exporter thread. A finished span is
/// pushed onto its thread's shard; the exporter is woken only when a batch is full (or by its
/// timer), not for every span.
struct Queue {
    shared: Arc<Shared>,
    max_queue: usize,
    max_batch: usize,
    dropped: prometheus::IntCounter,
    /// The exporter, until its thread starts with the first span.
    pending: Mutex<Option<ExportThread>>,
}

struct Shared {
    /// Finished spans, one queue per request thread; `queued` counts them all.
    spans: Shards<Vec<SpanData>>,
    queued: AtomicUsize,
    worker: Worker,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Queue")
    }
}

struct ExportThread {
    shared: Arc<Shared>,
    endpoint: String,
    timeout: Duration,
    max_batch: usize,
    resource: Option<Resource>,
    exported: prometheus::IntCounter,
    failed: prometheus::IntCounter,
}

impl Queue {
    fn new(config: &TracingConfig, metrics: &gatehouse_filters::Metrics) -> Queue {
        let shared = Arc::new(Shared {
            spans: Shards::new(),
            queued: AtomicUsize::new(0),
            worker: Worker::new(),
        });
        Queue {
            shared: shared.clone(),
            max_queue: config.max_queue.max(1),
            max_batch: config.max_batch.max(1),
            dropped: metrics.counter(
                "gatehouse_trace_spans_dropped_total",
                "Finished spans dropped because the export queue was full (the collector is slow or unreachable)",
            ),
            pending: Mutex::new(Some(ExportThread {
                shared,
                endpoint: config.traces_url().unwrap_or_default(),
                timeout: config.export_timeout.get(),
                max_batch: config.max_batch.max(1),
                resource: None,
                exported: metrics.counter(
                    "gatehouse_trace_spans_exported_total",
                    "Spans the OTLP endpoint accepted",
                ),
                failed: metrics.counter(
                    "gatehouse_trace_export_failures_total",
                    "OTLP export requests that failed (their spans are lost)",
                ),
            })),
        }
    }

    fn started(&self) {
        self.shared.worker.start("trace-export", || {
            let thread = self.pending.lock().expect("trace exporter").take();
            thread.map(|thread| move || thread.run())
        });
    }

    /// Asks the exporter to send everything queued now, and waits up to `limit` for it.
    fn flush(&self, limit: Duration) -> OTelSdkResult {
        self.started();
        if self.shared.worker.flush(limit) {
            Ok(())
        } else {
            Err(OTelSdkError::Timeout(limit))
        }
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.started();
        let queued = self.shared.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= self.max_queue {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        self.shared.spans.local().push(span);
        // Woken once per full batch, not per span.
        if (queued + 1).is_multiple_of(self.max_batch) {
            self.shared.worker.wake();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(thread) = self.pending.get_mut().expect("trace exporter").as_mut() {
            thread.resource = Some(resource.clone());
        }
    }
}

/// How long spans wait for a batch to fill before they are sent anyway.
const BATCH_DELAY: Duration = Duration::from_secs(1);

impl ExportThread {
    fn run(self) {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        use opentelemetry_sdk::trace::SpanExporter as _;

        let built = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(self.endpoint.clone())
            .with_timeout(self.timeout)
            .with_headers(Default::default())
            .build();
        let mut exporter = match built {
            Ok(exporter) => Some(exporter),
            Err(error) => {
                tracing::error!(%error, endpoint = %self.endpoint, "cannot build the trace exporter; spans are dropped");
                None
            }
        };
        if let (Some(exporter), Some(resource)) = (exporter.as_mut(), &self.resource) {
            exporter.set_resource(resource);
        }
        let mut last_warning: Option<Instant> = None;
        let mut taken: Vec<SpanData> = Vec::new();
        loop {
            let flush = self.shared.worker.wait(BATCH_DELAY);
            self.shared.spans.each(|spans| taken.append(spans));
            self.shared.queued.fetch_sub(taken.len(), Ordering::Relaxed);
            while !taken.is_empty() {
                let rest = taken.split_off(taken.len().min(self.max_batch));
                let batch = std::mem::replace(&mut taken, rest);
                let count = batch.len() as u64;
                let Some(exporter) = exporter.as_ref() else {
                    self.failed.inc();
                    continue;
                };
                match futures_executor::block_on(exporter.export(batch)) {
                    Ok(()) => self.exported.inc_by(count),
                    Err(error) => {
                        self.failed.inc();
                        // One warning a minute at most: a collector that is down says so once.
                        if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                            tracing::warn!(%error, endpoint = %self.endpoint, spans = count, "trace export failed");
                            last_warning = Some(Instant::now());
                        }
                    }
                }
            }
            if flush {
                self.shared.worker.flushed();
            }
        }
    }
}
