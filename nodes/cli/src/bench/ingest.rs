//! `bench ingest` (and `tls`): samples/s from a gateway session into twins, acknowledged
//! once durable, against the raw Zenoh rate of the same frames.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prost::Message;
use serde::Serialize;
use tokio::sync::Notify;
use zenoh::bytes::ZBytes;
use zenoh::qos::CongestionControl;

use twinmesh_twins::proto::{TelemetryFrame, Watermark};

use super::rig::*;
use super::BenchArgs;

#[derive(Debug, Serialize)]
pub(crate) struct IngestReport {
    pub(crate) machine: String,
    pub(crate) twins: usize,
    pub(crate) frame_samples: usize,
    pub(crate) window_frames: u64,
    pub(crate) seconds: f64,
    pub(crate) end_to_end_samples_per_s: f64,
    pub(crate) end_to_end_frames_per_s: f64,
    pub(crate) ack_latency_p50_ms: f64,
    pub(crate) ack_latency_p99_ms: f64,
    pub(crate) raw_zenoh_msgs_per_s: f64,
    pub(crate) raw_zenoh_samples_per_s: f64,
    pub(crate) ratio_to_raw: f64,
    pub(crate) edge_store_bytes: u64,
    pub(crate) stored_bytes_per_sample: f64,
}

/// Resolution of the bench samples (counts × 0.001).
const SAMPLE_SCALE: f64 = 0.001;

/// Deterministic, vibration-like 16-bit ADC samples.
fn samples(n: usize, seed: u64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let t = (seed as usize * n + i) as f64;
            twinmesh_twins::dsp::codec::quantize(
                (t * 0.05).sin() * 12.0 + (t * 0.31).sin() * 3.0,
                SAMPLE_SCALE,
            )
        })
        .collect()
}

pub(super) async fn bench_ingest(args: &BenchArgs, scheme: &str) -> anyhow::Result<IngestReport> {
    let rig = Rig::start_with(scheme, args.lease_ms).await?;
    let ids = rig.twins(args.parallel, "wind_turbine").await?;
    let measure = Duration::from_secs_f64(args.seconds);
    let warmup = Duration::from_secs(2);

    let period = 40_000; // 25 kHz
                         // Raw ceiling first, on an idle mesh: the same frames, same two sessions (gateway →
                         // edge node's session).
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let _raw = rig
        .edge
        .fabric
        .session()
        .declare_subscriber("bench/raw/**")
        .callback(move |_| {
            r.fetch_add(1, Relaxed);
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = TelemetryFrame {
        sealed: Vec::new(),
        twin_id: ids[0].clone(),
        signal: "bearing_vibration".into(),
        seq: 1,
        start_ns: 0,
        sample_period_ns: period,
        samples: samples(args.frame_samples, 7),
        spool_base_seq: 1,
        scale: SAMPLE_SCALE,
        packed: Vec::new(),
        proof: None,
    }
    .encode_to_vec();
    let payload = bytes::Bytes::from(payload);
    let raw_pub = rig
        .gateway
        .declare_publisher("bench/raw/frames")
        .congestion_control(CongestionControl::Block)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let raw_start = Instant::now();
    let raw_until = raw_start + measure.min(Duration::from_secs(5));
    let mut sent = 0u64;
    while Instant::now() < raw_until {
        for _ in 0..64 {
            raw_pub
                .put(ZBytes::from(payload.clone()))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sent += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let raw_msgs = received.load(Relaxed) as f64 / raw_start.elapsed().as_secs_f64();
    drop(raw_pub);

    // Acks from the twins (durable frames), per twin.
    let acked: Arc<HashMap<String, (AtomicU64, Notify)>> = Arc::new(
        ids.iter()
            .map(|id| (id.clone(), (AtomicU64::new(0), Notify::new())))
            .collect(),
    );
    let a = acked.clone();
    let _acks = rig
        .gateway
        .declare_subscriber("twinmesh/acks/bench/*")
        .callback(move |s| {
            if let Ok(wm) = Watermark::decode(&*s.payload().to_bytes()) {
                if let Some((seq, notify)) = a.get(&wm.twin_id) {
                    seq.fetch_max(wm.seq, Relaxed);
                    notify.notify_waiters();
                }
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let start = Instant::now();
    let stop_at = start + warmup + measure;
    let latencies = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3)?));
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let publisher = rig.frame_publisher(&id, "bearing_vibration").await?;
        let acked = acked.clone();
        let latencies = latencies.clone();
        let trust = rig.gateway_trust.clone();
        let n = args.frame_samples;
        let window = args.window;
        tasks.push(tokio::spawn(async move {
            let body = samples(n, 7);
            let mut seq = 0u64;
            let mut sent_at: std::collections::VecDeque<(u64, Instant)> = Default::default();
            let (ack, notify) = &acked[&id];
            while Instant::now() < stop_at {
                // Stay within the window of unacknowledged frames, like a gateway spool.
                while seq - ack.load(Relaxed) >= window {
                    let wait = notify.notified();
                    if seq - ack.load(Relaxed) < window {
                        break;
                    }
                    if tokio::time::timeout(Duration::from_secs(5), wait)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let acked_now = ack.load(Relaxed);
                while sent_at.front().is_some_and(|(s, _)| *s <= acked_now) {
                    let (_, t) = sent_at.pop_front().expect("front");
                    let _ = latencies
                        .lock()
                        .expect("hist")
                        .record(t.elapsed().as_micros() as u64);
                }
                seq += 1;
                let mut frame = TelemetryFrame {
                    sealed: Vec::new(),
                    twin_id: id.clone(),
                    signal: "bearing_vibration".into(),
                    seq,
                    start_ns: 1_700_000_000_000_000_000 + (seq as i64) * n as i64 * period,
                    sample_period_ns: period,
                    samples: body.clone(),
                    spool_base_seq: 1,
                    scale: SAMPLE_SCALE,
                    packed: Vec::new(),
                    proof: None,
                };
                // As a gateway does for every frame.
                trust.prove("bench", &mut frame);
                sent_at.push_back((seq, Instant::now()));
                if publisher.put(frame.encode_to_vec()).await.is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep_until((start + warmup).into()).await;
    let base: u64 = acked.values().map(|(a, _)| a.load(Relaxed)).sum();
    latencies.lock().expect("hist").reset();
    tokio::time::sleep_until(stop_at.into()).await;
    let frames: u64 = acked.values().map(|(a, _)| a.load(Relaxed)).sum::<u64>() - base;
    for t in tasks {
        let _ = t.await;
    }
    let secs = measure.as_secs_f64();
    let e2e_frames = frames as f64 / secs;
    let (p50, p99) = {
        let h = latencies.lock().expect("hist");
        (
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
        )
    };
    // Let the twins drain, then read the store size.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store_bytes = rig.edge.store.size_on_disk();
    let stored_samples: u64 =
        acked.values().map(|(a, _)| a.load(Relaxed)).sum::<u64>() * args.frame_samples as u64;

    rig.stop().await?;

    let e2e_samples = e2e_frames * args.frame_samples as f64;
    let raw_samples = raw_msgs * args.frame_samples as f64;
    Ok(IngestReport {
        machine: machine(),
        twins: ids.len(),
        frame_samples: args.frame_samples,
        window_frames: args.window,
        seconds: secs,
        end_to_end_samples_per_s: e2e_samples,
        end_to_end_frames_per_s: e2e_frames,
        ack_latency_p50_ms: p50,
        ack_latency_p99_ms: p99,
        raw_zenoh_msgs_per_s: raw_msgs,
        raw_zenoh_samples_per_s: raw_samples,
        ratio_to_raw: if raw_samples > 0.0 {
            e2e_samples / raw_samples
        } else {
            0.0
        },
        edge_store_bytes: store_bytes,
        stored_bytes_per_sample: store_bytes as f64 / stored_samples.max(1) as f64,
    })
}
