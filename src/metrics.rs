//! Process-wide Prometheus metrics: one registry, handles every layer increments, the text
//! `/metrics` serves.
//!
//! Hot paths (every RTP packet, every SIP message) touch only atomics: counters whose label
//! values are known up front are resolved once and kept, and histograms are [`AtomicHistogram`]s
//! (prometheus-client's own histogram takes a lock per observation). Families are used only
//! where an event is already per call or per run (a map lookup under a read lock is noise there).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock, OnceLock,
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{
        counter::Counter, family::Family, gauge::Gauge, info::Info, MetricType, TypedMetric,
    },
    registry::{Registry, Unit},
};

type Labels = Vec<(&'static str, String)>;

/// A histogram whose observations are a few relaxed atomic adds (no lock). Clones share
/// their counts, so the registry holds one and the code observes through another.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistInner>);

#[derive(Debug)]
struct HistInner {
    bounds: &'static [f64],
    /// One per bound plus +Inf; not cumulative (the encoder accumulates).
    counts: Box<[AtomicU64]>,
    count: AtomicU64,
    /// Sum in nanoseconds, so it can be added atomically.
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram(Arc::new(HistInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        let h = &*self.0;
        let secs = d.as_secs_f64();
        let i = h
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(h.bounds.len());
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &*self.0;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Latencies of call setup and script runs: 1 ms .. 30 s.
const LATENCY: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// How late a 20 ms RTP frame left relative to its due time: 0.1 ms .. 100 ms.
const PACING: &[f64] = &[0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.1];
/// A frame sent this much after its due time counts as a late send (a quarter frame).
pub const LATE_SEND: Duration = Duration::from_millis(5);

/// SIP methods counted with a pre-resolved counter each; others count as `OTHER`.
const METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "INFO",
    "UPDATE",
    "REFER",
    "NOTIFY",
    "MESSAGE",
    "PRACK",
    "SUBSCRIBE",
    "OTHER",
];

/// Counters by SIP method, resolved once.
pub struct MethodCounters(Vec<Counter>);

impl MethodCounters {
    fn new(family: &Family<Labels, Counter>) -> Self {
        MethodCounters(
            METHODS
                .iter()
                .map(|m| {
                    family
                        .get_or_create(&vec![("method", m.to_string())])
                        .clone()
                })
                .collect(),
        )
    }

    /// Counts one message whose method is `method` (matched case-sensitively, as SIP does).
    pub fn inc(&self, method: &str) {
        let i = METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(METHODS.len() - 1);
        self.0[i].inc();
    }
}

/// Counters by status code 100..=699, each resolved on first use and kept.
pub struct CodeCounters {
    family: Family<Labels, Counter>,
    codes: Box<[OnceLock<Counter>]>,
}

impl CodeCounters {
    fn new(family: Family<Labels, Counter>) -> Self {
        CodeCounters {
            family,
            codes: (100..700).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn inc(&self, code: u16) {
        let Some(slot) = self.codes.get(usize::from(code).wrapping_sub(100)) else {
            return;
        };
        slot.get_or_init(|| {
            self.family
                .get_or_create(&vec![("code", code.to_string())])
                .clone()
        })
        .inc();
    }
}

/// Every metric callforge exports.
pub struct Metrics {
    registry: Registry,
    pub sip_requests_received: MethodCounters,
    pub sip_requests_sent: MethodCounters,
    pub sip_responses_received: CodeCounters,
    pub sip_responses_sent: CodeCounters,
    pub sip_transactions: Gauge,
    pub sip_dialogs: Gauge,
    /// Requests refused before routing, by reason (`acl`, `rate`, `concurrent`, `draining`,
    /// `auth`, `route_acl`).
    pub sip_rejected: Family<Labels, Counter>,
    pub calls_active: Gauge,
    pub calls_ended: Family<Labels, Counter>,
    /// INVITE received → first final response sent (2xx answer, 3xx redirect or refusal).
    pub call_setup: AtomicHistogram,
    pub class4_decisions: CodeCounters,
    pub script_runs: Family<Labels, Counter>,
    script_duration: Vec<(&'static str, AtomicHistogram)>,
    pub limit_hits: Family<Labels, Counter>,
    pub rtp_packets_received: Counter,
    pub rtp_packets_sent: Counter,
    pub rtp_packets_lost: Counter,
    pub rtp_late_sends: Counter,
    pub rtp_pacing_error: AtomicHistogram,
    pub host_calls: Family<Labels, Counter>,
    pub host_errors: Family<Labels, Counter>,
    pub draining: Gauge,
    pub config_reloads: Family<Labels, Counter>,
}

/// Modes whose run durations get a histogram each (`script::Mode::as_str`).
const MODES: &[&str] = &["script", "app", "class4", "form", "driver", "class5"];

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("callforge");
        let family = |r: &mut Registry, name: &str, help: &str| {
            let f = Family::<Labels, Counter>::default();
            r.register(name, help, f.clone());
            f
        };
        let requests_received = family(
            &mut r,
            "sip_requests_received",
            "SIP requests received, by method (retransmissions included)",
        );
        let requests_sent = family(
            &mut r,
            "sip_requests_sent",
            "SIP requests sent, by method (retransmissions included)",
        );
        let responses_received = family(
            &mut r,
            "sip_responses_received",
            "SIP responses received, by status code",
        );
        let responses_sent = family(
            &mut r,
            "sip_responses_sent",
            "SIP responses sent, by status code (retransmissions included)",
        );
        let sip_transactions = Gauge::default();
        r.register(
            "sip_transactions",
            "Live SIP transactions",
            sip_transactions.clone(),
        );
        let sip_dialogs = Gauge::default();
        r.register(
            "sip_dialogs",
            "Live SIP calls and dialogs (inbound and outbound legs)",
            sip_dialogs.clone(),
        );
        let sip_rejected = family(
            &mut r,
            "sip_rejected",
            "SIP requests refused before routing, by reason",
        );
        let calls_active = Gauge::default();
        r.register(
            "calls_active",
            "Class 5 calls in progress",
            calls_active.clone(),
        );
        let calls_ended = family(&mut r, "calls_ended", "Class 5 calls ended, by outcome");
        let call_setup = AtomicHistogram::new(LATENCY);
        r.register_with_unit(
            "call_setup",
            "INVITE received to first final response sent",
            Unit::Seconds,
            call_setup.clone(),
        );
        let class4_decisions = family(
            &mut r,
            "class4_decisions",
            "Class 4 routing answers, by SIP status code",
        );
        let script_runs = family(&mut r, "script_runs", "Script runs, by mode and outcome");
        let limit_hits = family(&mut r, "limit_hits", "Limits reached, by kind");
        let rtp_packets_received = Counter::default();
        r.register(
            "rtp_packets_received",
            "RTP packets received and accepted",
            rtp_packets_received.clone(),
        );
        let rtp_packets_sent = Counter::default();
        r.register(
            "rtp_packets_sent",
            "RTP packets sent",
            rtp_packets_sent.clone(),
        );
        let rtp_packets_lost = Counter::default();
        r.register(
            "rtp_packets_lost",
            "RTP packets given up as lost",
            rtp_packets_lost.clone(),
        );
        let rtp_late_sends = Counter::default();
        r.register(
            "rtp_late_sends",
            "RTP frames sent 5 ms or more after their due time",
            rtp_late_sends.clone(),
        );
        let rtp_pacing_error = AtomicHistogram::new(PACING);
        r.register_with_unit(
            "rtp_pacing_error",
            "How late RTP frames were sent after their due time",
            Unit::Seconds,
            rtp_pacing_error.clone(),
        );
        let durations =
            Family::<Labels, AtomicHistogram, fn() -> AtomicHistogram>::new_with_constructor(
                || AtomicHistogram::new(LATENCY),
            );
        r.register_with_unit(
            "script_run_duration",
            "Script run wall time, by mode",
            Unit::Seconds,
            durations.clone(),
        );
        // Resolved once per mode, so a run's observation takes no lock.
        let script_duration = MODES
            .iter()
            .map(|m| {
                (
                    *m,
                    durations
                        .get_or_create(&vec![("mode", m.to_string())])
                        .clone(),
                )
            })
            .collect();
        let host_calls = family(
            &mut r,
            "host_calls",
            "Host module calls from scripts, by module",
        );
        let host_errors = family(
            &mut r,
            "host_errors",
            "Host module calls that failed, by module",
        );
        let draining = Gauge::default();
        r.register(
            "draining",
            "1 while the engine drains (refusing new calls)",
            draining.clone(),
        );
        let config_reloads = family(&mut r, "config_reloads", "Configuration reloads, by result");
        r.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]),
        );
        Metrics {
            sip_requests_received: MethodCounters::new(&requests_received),
            sip_requests_sent: MethodCounters::new(&requests_sent),
            sip_responses_received: CodeCounters::new(responses_received),
            sip_responses_sent: CodeCounters::new(responses_sent),
            sip_transactions,
            sip_dialogs,
            sip_rejected,
            calls_active,
            calls_ended,
            call_setup,
            class4_decisions: CodeCounters::new(class4_decisions),
            script_runs,
            script_duration,
            limit_hits,
            rtp_packets_received,
            rtp_packets_sent,
            rtp_packets_lost,
            rtp_late_sends,
            rtp_pacing_error,
            host_calls,
            host_errors,
            draining,
            config_reloads,
            registry: r,
        }
    }

    /// One finished script run.
    pub fn script_run(&self, mode: &'static str, outcome: &'static str, took: Duration) {
        self.script_runs
            .get_or_create(&vec![
                ("mode", mode.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        if let Some((_, h)) = self.script_duration.iter().find(|(m, _)| *m == mode) {
            h.observe(took);
        }
    }

    /// One RTP frame sent `error` after its due time.
    pub fn rtp_paced(&self, error: Duration) {
        self.rtp_pacing_error.observe(error);
        if error >= LATE_SEND {
            self.rtp_late_sends.inc();
        }
    }

    pub fn inc(family: &Family<Labels, Counter>, key: &'static str, value: &str) {
        family.get_or_create(&vec![(key, value.to_string())]).inc();
    }

    /// The text exposition (OpenMetrics 1.0, which Prometheus scrapes).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_land_in_their_bucket_and_render() {
        let m = metrics();
        m.rtp_paced(Duration::from_micros(300));
        m.rtp_paced(Duration::from_millis(30));
        m.sip_requests_received.inc("INVITE");
        m.sip_requests_received.inc("FOO");
        m.sip_responses_sent.inc(302);
        m.sip_responses_sent.inc(42);
        m.script_run("class4", "ok", Duration::from_millis(2));
        let text = m.render();
        assert!(
            text.contains("callforge_sip_requests_received_total{method=\"INVITE\"}"),
            "{text}"
        );
        assert!(
            text.contains("callforge_sip_requests_received_total{method=\"OTHER\"}"),
            "{text}"
        );
        assert!(
            text.contains("callforge_sip_responses_sent_total{code=\"302\"}"),
            "{text}"
        );
        assert!(!text.contains("code=\"42\""), "{text}");
        assert!(
            text.contains("callforge_rtp_pacing_error_seconds_bucket{le=\"0.0005\"}"),
            "{text}"
        );
        assert!(text.contains("callforge_rtp_late_sends_total"), "{text}");
        assert!(
            text.contains("callforge_script_run_duration_seconds_count{mode=\"class4\"}"),
            "{text}"
        );
        assert!(text.contains("callforge_build_info{version="), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
