//! The node's Prometheus metrics, through TiKV's `prometheus` client: every scrape builds a
//! registry with the node's labels (`node`, `site`, `tier`), the counters and gauges read
//! from [`NodeMetrics`] and the store, and the node's latency histograms
//! ([`twinmesh_actors::metrics::Latencies`]). Names follow the conventions: the
//! `twinmesh_` prefix, `_total` for counters, the unit in the name (`_seconds`, `_bytes`).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use twinmesh_actors::context::NodeContext;
use twinmesh_actors::metrics::NodeMetrics;
use twinmesh_actors::ports::{PlacementStore, SpoolStore};

use crate::store::SledStore;

fn bad(e: prometheus::Error) -> crate::Error {
    crate::Error::internal(format!("metrics: {e}"))
}

/// The exposition of one scrape.
pub fn exposition(
    ctx: &NodeContext,
    store: &SledStore,
    devices: &crate::devices::DeviceCounters,
) -> crate::Result<String> {
    let labels: HashMap<String, String> = [
        ("node".to_owned(), ctx.node.to_string()),
        ("site".to_owned(), ctx.site.clone()),
        ("tier".to_owned(), ctx.tier.to_string()),
    ]
    .into_iter()
    .collect();
    let r = Registry::new_custom(Some("twinmesh".to_owned()), Some(labels)).map_err(bad)?;
    let m = &ctx.metrics;
    let counters: [(&str, &str, &AtomicU64); 19] = [
        ("frames_in_total", "Telemetry frames received by twins.", &m.frames_in),
        ("samples_in_total", "Samples applied by twins.", &m.samples_in),
        ("frames_duplicate_total", "Frames dropped as already applied.", &m.frames_duplicate),
        ("frames_gap_total", "Frames held back until missing ones arrive.", &m.frames_gap),
        ("frames_overflow_total", "Frames dropped because a twin's ingest queue was full (the gateway re-sends them).", &m.frames_overflow),
        ("frames_withheld_total", "Frames of protected signals a gateway did not publish (it has no site key).", &m.frames_withheld),
        ("identifiers_withheld_total", "Identifier records a gateway did not publish (suppressed, or no site key to pseudonymise them).", &m.identifiers_withheld),
        ("identifiers_rejected_total", "Identifier records a twin refused (not pseudonymised as its policy demands).", &m.identifiers_rejected),
        ("published_total", "Messages published.", &m.frames_published),
        ("published_bytes_total", "Payload bytes published.", &m.bytes_published),
        ("rpc_served_total", "Twin RPCs served.", &m.rpc_served),
        ("rpc_cached_total", "Twin RPCs (GetTwin) answered from a twin's read cache by the node's router.", &m.rpc_cached),
        ("twin_restarts_total", "Twin actors restarted after a failure.", &m.twin_restarts),
        ("twins_passivated_total", "Idle twins stopped until their next frame or call.", &m.twins_passivated),
        ("twins_woken_total", "Dormant twins started again by a frame or a call.", &m.twins_woken),
        ("features_archived_total", "Feature values kept by the cloud archive.", &m.features_archived),
        ("windows_scored_total", "Feature windows scored by twins' anomaly models.", &m.windows_scored),
        ("alarms_total", "Alarms raised by twins' anomaly models.", &m.alarms_raised),
        ("messages_malformed_total", "Fabric messages that did not decode or lacked a valid proof: dropped.", &m.messages_malformed),
    ];
    for (name, help, value) in counters {
        let c = IntCounter::with_opts(Opts::new(name, help)).map_err(bad)?;
        c.inc_by(NodeMetrics::get(value));
        r.register(Box::new(c)).map_err(bad)?;
    }
    let gauges: [(&str, &str, u64); 3] = [
        (
            "twins",
            "Twins hosted on this node (running or dormant).",
            ctx.directory.len() as u64,
        ),
        (
            "spool_frames",
            "Frames in the gateway spool.",
            store.spool_len(),
        ),
        (
            "store_bytes",
            "Bytes the node's database occupies on disk.",
            store.size_on_disk(),
        ),
    ];
    for (name, help, value) in gauges {
        let g = IntGauge::with_opts(Opts::new(name, help)).map_err(bad)?;
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        r.register(Box::new(g)).map_err(bad)?;
    }
    let rejected = IntCounterVec::new(
        Opts::new(
            "frames_rejected_total",
            "Frames dropped as bad input, by reason.",
        ),
        &["reason"],
    )
    .map_err(bad)?;
    // Every reason from zero, so a dashboard's series exist before the first drop.
    for reason in twinmesh_twins::frame::FrameRejection::REASONS {
        rejected.with_label_values(&[reason]);
    }
    for (reason, n) in m.rejected() {
        rejected.with_label_values(&[reason]).inc_by(n);
    }
    r.register(Box::new(rejected)).map_err(bad)?;
    let refused = IntCounterVec::new(
        Opts::new(
            "device_values_rejected_total",
            "Values from devices (MQTT, Modbus, OPC UA) refused, by reason.",
        ),
        &["reason"],
    )
    .map_err(bad)?;
    for (reason, n) in devices.refused() {
        refused.with_label_values(&[reason]).inc_by(n);
    }
    r.register(Box::new(refused)).map_err(bad)?;
    // The site ledgers the placement authority keeps (cloud nodes; empty elsewhere).
    let (spent, total) = (
        GaugeVec::new(
            Opts::new(
                "site_epsilon_spent",
                "Privacy budget (epsilon) a site's set releases spent this period.",
            ),
            &["ledger_site"],
        )
        .map_err(bad)?,
        GaugeVec::new(
            Opts::new(
                "site_epsilon_total",
                "Privacy budget (epsilon) a site may spend on set releases per period.",
            ),
            &["ledger_site"],
        )
        .map_err(bad)?,
    );
    for b in store.site_budgets().unwrap_or_default() {
        spent
            .with_label_values(&[b.site.as_str()])
            .set(b.epsilon_spent);
        total
            .with_label_values(&[b.site.as_str()])
            .set(b.epsilon_total);
    }
    r.register(Box::new(spent)).map_err(bad)?;
    r.register(Box::new(total)).map_err(bad)?;
    for h in m.latency.all() {
        r.register(Box::new(h.clone())).map_err(bad)?;
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&r.gather(), &mut out)
        .map_err(bad)?;
    String::from_utf8(out).map_err(|e| crate::Error::internal(format!("metrics: {e}")))
}
