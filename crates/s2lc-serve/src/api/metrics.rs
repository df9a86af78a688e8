//! `/metrics`: the server's counters and gauges in Prometheus' text format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// A monotonic counter (or, with [`Counter::dec`], a gauge).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes one away (gauges only).
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters behind `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Completion requests received.
    pub requests: Counter,
    /// Completion requests answered with an error (overload and deadline included).
    pub errors: Counter,
    /// Requests refused with 429 because the queue was full.
    pub rejected: Counter,
    /// Requests that ran past their deadline.
    pub deadline_exceeded: Counter,
    /// Requests refused for a missing or wrong API key.
    pub unauthorized: Counter,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub completion_tokens: Counter,
    /// Connections open now (gauge).
    pub connections: Counter,
    /// Connections refused because `max_connections` were open.
    pub connections_refused: Counter,
}

/// The `/metrics` route.
pub async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let c = s.cache.stats();
    let m = &s.metrics;
    let admitted = s.admitted_limit - s.admission.available_permits();
    let occ = s.engine.batcher.occupancy();
    let get = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
    let (running, waiting) = (get(&occ.running), get(&occ.waiting));
    let series: [(&str, &str, &str, f64); 20] = [
        (
            "s2lc_kv_cache_resident_bytes",
            "Bytes the running sequences' KV caches hold.",
            "gauge",
            get(&occ.kv_bytes),
        ),
        (
            "s2lc_kv_cache_reserved_bytes",
            "Bytes reserved for the running sequences' KV caches at their full length.",
            "gauge",
            get(&occ.kv_reserved),
        ),
        (
            "s2lc_sequences_running",
            "Sequences holding a KV cache (prefilling or decoding).",
            "gauge",
            running,
        ),
        (
            "s2lc_sequences_waiting",
            "Sequences waiting for a batch row.",
            "gauge",
            waiting,
        ),
        (
            "s2lc_requests_total",
            "Completion requests received.",
            "counter",
            m.requests.get() as f64,
        ),
        (
            "s2lc_request_errors_total",
            "Completion requests answered with an error.",
            "counter",
            m.errors.get() as f64,
        ),
        (
            "s2lc_requests_rejected_total",
            "Requests refused with 429 (queue full).",
            "counter",
            m.rejected.get() as f64,
        ),
        (
            "s2lc_requests_deadline_exceeded_total",
            "Requests past their deadline.",
            "counter",
            m.deadline_exceeded.get() as f64,
        ),
        (
            "s2lc_requests_unauthorized_total",
            "Requests refused for a missing or wrong API key.",
            "counter",
            m.unauthorized.get() as f64,
        ),
        (
            "s2lc_requests_admitted",
            "Requests admitted now (decoding or queued).",
            "gauge",
            admitted as f64,
        ),
        (
            "s2lc_prompt_tokens_total",
            "Prompt tokens processed.",
            "counter",
            m.prompt_tokens.get() as f64,
        ),
        (
            "s2lc_completion_tokens_total",
            "Tokens generated.",
            "counter",
            m.completion_tokens.get() as f64,
        ),
        (
            "s2lc_connections_open",
            "HTTP connections open.",
            "gauge",
            m.connections.get() as f64,
        ),
        (
            "s2lc_connections_refused_total",
            "Connections refused at the connection limit.",
            "counter",
            m.connections_refused.get() as f64,
        ),
        (
            "s2lc_adapter_cache_hits_total",
            "Adapter requests served from the cache.",
            "counter",
            (c.hits + c.coalesced) as f64,
        ),
        (
            "s2lc_adapter_cache_misses_total",
            "Adapter requests that loaded the adapter.",
            "counter",
            c.misses as f64,
        ),
        (
            "s2lc_adapter_cache_evictions_total",
            "Adapters evicted to stay within the budget.",
            "counter",
            c.evictions as f64,
        ),
        (
            "s2lc_adapter_cache_resident_bytes",
            "Bytes of adapters resident, in their resident form (PEFT factors in --adapter-dtype; pack bases, cores and views).",
            "gauge",
            c.resident_bytes as f64,
        ),
        (
            "s2lc_adapter_cache_budget_bytes",
            "The adapter cache's byte budget.",
            "gauge",
            s.cache.budget() as f64,
        ),
        (
            "s2lc_adapter_cache_resident",
            "Adapters resident.",
            "gauge",
            c.resident as f64,
        ),
    ];
    let mut out = String::new();
    for (name, help, kind, v) in series {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    out.push_str(
        "# HELP s2lc_adapter_resident_bytes Bytes of the adapter cache by kind: peft (factors), \
         bases and cores (of packs, each once), views (members and morphs of packs).\n\
         # TYPE s2lc_adapter_resident_bytes gauge\n",
    );
    let by_kind = s.cache.bytes_by(|r| r.kind());
    for kind in ["peft", "bases", "cores", "views"] {
        let v = by_kind.get(kind).copied().unwrap_or(0);
        out.push_str(&format!(
            "s2lc_adapter_resident_bytes{{kind=\"{kind}\"}} {v}\n"
        ));
    }
    let bounds = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
    let (counts, n, sum) = s.cache.load_histogram(&bounds);
    out.push_str("# HELP s2lc_adapter_load_seconds Time to pull and unpack an adapter.\n");
    out.push_str("# TYPE s2lc_adapter_load_seconds histogram\n");
    for (b, c) in bounds.iter().zip(counts) {
        out.push_str(&format!(
            "s2lc_adapter_load_seconds_bucket{{le=\"{b}\"}} {c}\n"
        ));
    }
    out.push_str(&format!(
        "s2lc_adapter_load_seconds_bucket{{le=\"+Inf\"}} {n}\ns2lc_adapter_load_seconds_sum {sum}\ns2lc_adapter_load_seconds_count {n}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
