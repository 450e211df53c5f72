//! The metrics registry of a process. Each component registers its own families into the
//! registry it is given (registering a name again returns the family already there, so a
//! config reload finds its counters where it left them), and takes rows that last as long as
//! the config that uses them: when the last config holding a row is dropped, the row leaves
//! `/metrics`, so a removed route or policy stops being reported.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prometheus::core::{Collector, Desc, MetricVec, MetricVecBuilder};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, TextEncoder};

/// The registry. Cloning it is cheap and shares it.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    registry: prometheus::Registry,
    /// Families by name, so a second registration returns the first.
    families: Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Counters with `labels`, registered under `name` once.
    pub fn counters(&self, name: &str, help: &str, labels: &[&str]) -> Family<IntCounter> {
        self.family(name, || {
            prometheus::IntCounterVec::new(Opts::new(name, help), labels).map(Family::new)
        })
    }

    /// Histograms with `labels` and `buckets` (upper bounds), registered under `name` once.
    pub fn histograms(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Family<Histogram> {
        self.family(name, || {
            prometheus::HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .map(Family::new)
        })
    }

    /// A process-wide counter without labels.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.family(name, || {
            IntCounter::new(name, help).map(|counter| Single(counter.clone(), Arc::new(counter)))
        })
        .0
    }

    /// A process-wide gauge without labels.
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.family(name, || {
            IntGauge::new(name, help).map(|gauge| Single(gauge.clone(), Arc::new(gauge)))
        })
        .0
    }

    /// Gauges whose values are read when `/metrics` is scraped, from state their owners keep.
    pub fn sampled(&self, name: &str, help: &str, labels: &[&str]) -> Sampled {
        self.family(name, || {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels.iter().map(ToString::to_string).collect(),
                HashMap::new(),
            )
            .map(|desc| Sampled {
                inner: Arc::new(SampledInner {
                    desc,
                    rows: Mutex::new(Vec::new()),
                }),
            })
        })
    }

    /// The text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut buffer = Vec::new();
        let families = self.inner.registry.gather();
        if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
            tracing::warn!(%error, "cannot encode the metrics");
        }
        buffer
    }

    /// The family registered under `name`, registered by `make` if there is none. A name taken
    /// by a family of another type is a programming error: it is logged, and the caller gets a
    /// family that is not exported, so the request path never fails over a metric.
    fn family<F, E>(&self, name: &str, make: impl FnOnce() -> Result<F, E>) -> F
    where
        F: Registrable + Clone + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        let mut families = self.inner.families.lock().expect("metrics registry lock");
        if let Some(existing) = families.get(name) {
            if let Some(family) = existing.downcast_ref::<F>() {
                return family.clone();
            }
            tracing::error!(
                metric = name,
                "a metric family of another type has this name"
            );
        }
        let family = match make() {
            Ok(family) => family,
            Err(error) => panic!("metric {name}: {error}"),
        };
        if families.contains_key(name) {
            return family;
        }
        if let Err(error) = self.inner.registry.register(family.collector()) {
            tracing::error!(metric = name, %error, "cannot register the metric family");
        }
        families.insert(name.to_string(), Arc::new(family.clone()));
        family
    }
}

/// Something the registry can export.
trait Registrable {
    fn collector(&self) -> Box<dyn Collector>;
}

/// A metric without labels, with the collector that exports it.
#[derive(Clone)]
struct Single<M>(M, Arc<dyn Collector>);

impl<M> Registrable for Single<M> {
    fn collector(&self) -> Box<dyn Collector> {
        Box::new(Shared(self.1.clone()))
    }
}

struct Shared(Arc<dyn Collector>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

/// A family of metrics of type `M` told apart by their label values.
pub struct Family<M: prometheus::core::Metric> {
    inner: Arc<FamilyInner<M>>,
}

impl<M: prometheus::core::Metric> Clone for Family<M> {
    fn clone(&self) -> Self {
        Family {
            inner: self.inner.clone(),
        }
    }
}

/// The live rows of a family by label values, with the id of the row that owns them.
type LiveRows<M> = HashMap<Vec<String>, (u64, Weak<RowInner<M>>)>;

struct FamilyInner<M> {
    rows: Box<dyn Rows<M>>,
    leases: Mutex<LiveRows<M>>,
    next_id: AtomicU64,
}

/// The label-value operations of a prometheus `MetricVec`, whatever its metric type.
trait Rows<M>: Send + Sync {
    fn get(&self, labels: &[&str]) -> M;
    fn remove(&self, labels: &[String]);
    fn collector(&self) -> Box<dyn Collector>;
}

impl<B> Rows<B::M> for MetricVec<B>
where
    B: MetricVecBuilder + 'static,
{
    fn get(&self, labels: &[&str]) -> B::M {
        self.with_label_values(labels)
    }

    fn remove(&self, labels: &[String]) {
        let _ = self.remove_label_values(labels);
    }

    fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.clone())
    }
}

impl<M: prometheus::core::Metric + 'static> Family<M> {
    fn new<B>(vec: MetricVec<B>) -> Family<M>
    where
        B: MetricVecBuilder<M = M> + 'static,
    {
        Family {
            inner: Arc::new(FamilyInner {
                rows: Box::new(vec),
                leases: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The row for `labels`, shared with every holder of the same labels. It stays in the
    /// export while any holder keeps it, and its value carries over between holders.
    pub fn row(&self, labels: &[&str]) -> Row<M> {
        let key: Vec<String> = labels.iter().map(ToString::to_string).collect();
        let mut leases = self.inner.leases.lock().expect("metric rows lock");
        if let Some(row) = leases.get(&key).and_then(|(_, weak)| weak.upgrade()) {
            return Row(row);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let row = Arc::new(RowInner {
            metric: self.inner.rows.get(labels),
            id,
            labels: key.clone(),
            family: Arc::downgrade(&self.inner),
        });
        leases.insert(key, (id, Arc::downgrade(&row)));
        Row(row)
    }

    /// The metric for `labels`, without a lease: the row stays for the life of the process.
    /// For labels known only per request (e.g. an authentication failure's reason), from a
    /// small fixed set.
    pub fn with_labels(&self, labels: &[&str]) -> M {
        self.inner.rows.get(labels)
    }
}

impl<M: prometheus::core::Metric + 'static> Registrable for Family<M> {
    fn collector(&self) -> Box<dyn Collector> {
        self.inner.rows.collector()
    }
}

/// A leased row of a [`Family`]; dereferences to the metric.
pub struct Row<M>(Arc<RowInner<M>>);

impl<M> Clone for Row<M> {
    fn clone(&self) -> Self {
        Row(self.0.clone())
    }
}

impl<M> std::ops::Deref for Row<M> {
    type Target = M;

    fn deref(&self) -> &M {
        &self.0.metric
    }
}

struct RowInner<M> {
    metric: M,
    id: u64,
    labels: Vec<String>,
    family: Weak<FamilyInner<M>>,
}

impl<M> Drop for RowInner<M> {
    fn drop(&mut self) {
        let Some(family) = self.family.upgrade() else {
            return;
        };
        let mut leases = family.leases.lock().expect("metric rows lock");
        // A new holder may have taken the same labels since this row's last holder let go;
        // then the labels are theirs.
        if leases.get(&self.labels).map(|(id, _)| *id) == Some(self.id) {
            leases.remove(&self.labels);
            family.rows.remove(&self.labels);
        }
    }
}

/// Gauges read from their owners' state at scrape time. A row is exported while the reader its
/// owner registered is alive.
#[derive(Clone)]
pub struct Sampled {
    inner: Arc<SampledInner>,
}

type Reader = dyn Fn() -> i64 + Send + Sync;

struct SampledInner {
    desc: Desc,
    rows: Mutex<Vec<(Vec<String>, Weak<Reader>)>>,
}

/// Keeps a sampled row exported; dropping it removes the row.
pub struct SampledRow(#[allow(dead_code)] Arc<Reader>);

impl Sampled {
    /// Exports `read()` under `labels` until the returned handle is dropped.
    pub fn row(
        &self,
        labels: &[&str],
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> SampledRow {
        let reader: Arc<Reader> = Arc::new(read);
        let mut rows = self.inner.rows.lock().expect("sampled metric rows lock");
        rows.retain(|(_, weak)| weak.strong_count() > 0);
        rows.push((
            labels.iter().map(ToString::to_string).collect(),
            Arc::downgrade(&reader),
        ));
        SampledRow(reader)
    }
}

impl Registrable for Sampled {
    fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.clone())
    }
}

impl Collector for Sampled {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto;
        let desc = &self.inner.desc;
        // Two live owners may export the same labels (a client still held by an old config
        // beside its successor): the newest is exported, once.
        let rows: Vec<(Vec<String>, Arc<Reader>)> = {
            let rows = self.inner.rows.lock().expect("sampled metric rows lock");
            let mut seen = std::collections::HashSet::new();
            let mut live: Vec<_> = rows
                .iter()
                .rev()
                .filter_map(|(labels, weak)| Some((labels.clone(), weak.upgrade()?)))
                .filter(|(labels, _)| seen.insert(labels.clone()))
                .collect();
            live.reverse();
            live
        };
        let mut family = proto::MetricFamily::default();
        family.set_name(desc.fq_name.clone());
        family.set_help(desc.help.clone());
        family.set_field_type(proto::MetricType::GAUGE);
        for (labels, read) in rows {
            let mut metric = proto::Metric::default();
            let mut pairs: Vec<proto::LabelPair> = desc
                .variable_labels
                .iter()
                .zip(labels)
                .map(|(name, value)| {
                    let mut pair = proto::LabelPair::default();
                    pair.set_name(name.clone());
                    pair.set_value(value);
                    pair
                })
                .collect();
            pairs.sort_by(|left, right| left.name().cmp(right.name()));
            metric.set_label(pairs);
            let mut gauge = proto::Gauge::default();
            gauge.set_value(read() as f64);
            metric.set_gauge(gauge);
            family.mut_metric().push(metric);
        }
        if family.get_metric().is_empty() {
            return Vec::new();
        }
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: &Metrics) -> String {
        String::from_utf8(metrics.render()).unwrap()
    }

    #[test]
    fn a_row_lives_while_a_config_holds_it_and_keeps_its_count() {
        let metrics = Metrics::new();
        let family = metrics.counters("test_total", "Test", &["route"]);
        let old = family.row(&["a"]);
        old.inc();
        // The next config registers the same family and takes the same row before the old
        // config lets go: the count carries over.
        let again = metrics.counters("test_total", "Test", &["route"]);
        let new = again.row(&["a"]);
        new.inc();
        drop(old);
        assert!(text(&metrics).contains("test_total{route=\"a\"} 2"));
        // A row nobody holds any more leaves the export.
        let removed = family.row(&["b"]);
        removed.inc();
        assert!(text(&metrics).contains("route=\"b\""));
        drop(removed);
        assert!(!text(&metrics).contains("route=\"b\""));
        drop(new);
        assert!(!text(&metrics).contains("route=\"a\""));
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        let row = metrics
            .counters("escape_total", "Test", &["policy"])
            .row(&["a\"b\\c\nd"]);
        row.inc();
        assert!(
            text(&metrics).contains("escape_total{policy=\"a\\\"b\\\\c\\nd\"} 1"),
            "{}",
            text(&metrics)
        );
    }

    #[test]
    fn sampled_rows_are_read_at_scrape_time_until_dropped() {
        let metrics = Metrics::new();
        let state = Arc::new(AtomicU64::new(0));
        let reader = state.clone();
        let row = metrics
            .sampled("up", "Test", &["url"])
            .row(&["redis://x"], move || {
                reader.load(Ordering::Relaxed) as i64
            });
        assert!(text(&metrics).contains("up{url=\"redis://x\"} 0"));
        state.store(1, Ordering::Relaxed);
        assert!(text(&metrics).contains("up{url=\"redis://x\"} 1"));
        drop(row);
        assert!(!text(&metrics).contains("up{"));
    }

    #[test]
    fn two_owners_of_the_same_sampled_labels_export_one_row() {
        let metrics = Metrics::new();
        let sampled = metrics.sampled("up", "Test", &["url"]);
        let old = sampled.row(&["redis://x"], || 0);
        let new = sampled.row(&["redis://x"], || 1);
        let output = text(&metrics);
        assert_eq!(
            output.matches("up{url=\"redis://x\"}").count(),
            1,
            "{output}"
        );
        assert!(output.contains("up{url=\"redis://x\"} 1"), "{output}");
        drop(new);
        assert!(text(&metrics).contains("up{url=\"redis://x\"} 0"));
        drop(old);
    }

    #[test]
    fn unlabelled_metrics_are_shared_by_name() {
        let metrics = Metrics::new();
        metrics.counter("single_total", "Test").inc();
        metrics.counter("single_total", "Test").inc();
        assert!(text(&metrics).contains("single_total 2"));
    }
}
