//! `twinmesh bench privacy`: DP release latency through the cloud node's gRPC, for one
//! twin and for a set release over many twins of one site.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prost::Message;
use serde::Serialize;

use twinmesh_proto::v1::privacy_service_client::PrivacyServiceClient;
use twinmesh_twins::proto::{self, ReleaseAggregateRequest, TelemetryFrame};

use super::rig::Rig;

#[derive(Debug, Serialize)]
pub struct PrivacyReport {
    pub machine: String,
    pub single_records: u64,
    pub single_releases: usize,
    pub single_p50_ms: f64,
    pub single_p99_ms: f64,
    pub set_twins: usize,
    pub set_releases: usize,
    pub set_p50_ms: f64,
    pub set_max_ms: f64,
}

impl PrivacyReport {
    pub fn print(&self) {
        println!(
            "privacy: DP releases through the cloud's gRPC, {}",
            self.machine
        );
        println!(
            "  one twin, mean of {} samples : p50 {:.2} ms, p99 {:.2} ms over {} releases",
            self.single_records, self.single_p50_ms, self.single_p99_ms, self.single_releases
        );
        println!(
            "  site aggregate over {} twins : p50 {:.1} ms, max {:.1} ms over {} releases",
            self.set_twins, self.set_p50_ms, self.set_max_ms, self.set_releases
        );
    }
}

const SIGNAL: &str = "cycle_time";

/// Publishes one sealed frame of `n` samples for each twin, as its site's gateway would.
async fn feed(rig: &Rig, ids: &[String], n: usize, start_ns: i64) -> anyhow::Result<()> {
    for id in ids {
        let publisher = rig.frame_publisher(id, SIGNAL).await?;
        let mut f = TelemetryFrame {
            twin_id: id.clone(),
            signal: SIGNAL.into(),
            seq: 1,
            start_ns,
            sample_period_ns: 1_000_000,
            spool_base_seq: 1,
            ..Default::default()
        };
        let inner = proto::SealedSamples {
            samples: (0..n).map(|i| 30.0 + (i % 60) as f64).collect(),
            packed: Vec::new(),
        };
        f.sealed = rig.site_key.seal(
            &twinmesh_twins::frame::seal_context(&f),
            &inner.encode_to_vec(),
        );
        rig.gateway_trust.prove("bench", &mut f);
        publisher
            .put(f.encode_to_vec())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

fn request(ids: &[String], epsilon: f64, start_ns: i64) -> ReleaseAggregateRequest {
    ReleaseAggregateRequest {
        twin_ids: ids.to_vec(),
        signal: SIGNAL.into(),
        start_ns,
        end_ns: start_ns + 3_600_000_000_000,
        statistic: proto::Statistic::Mean as i32,
        epsilon,
    }
}

pub async fn bench_privacy(twins: usize, machine: String) -> anyhow::Result<PrivacyReport> {
    anyhow::ensure!(twins >= 2, "--twins must be at least 2 for a set release");
    let rig = Rig::start().await?;
    eprintln!("registering {twins} twins ...");
    let ids = rig.twins(twins, "crankshaft_line").await?;
    let start_ns = 1_700_000_000_000_000_000;
    feed(&rig, &ids[..1], 10_000, start_ns).await?;
    feed(&rig, &ids[1..], 10, start_ns).await?;
    let mut client = PrivacyServiceClient::new(rig.cloud_channel().await?);
    // Wait until every twin holds its frame (a mean reports its noisy size: with this ε
    // within a few hundred of the 10 000 records once they are there).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .release_aggregate(request(&ids[..1], 0.05, start_ns))
            .await;
        if r.as_ref().is_ok_and(|r| r.get_ref().records > 9_000) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the first twin never held its samples: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut single = Histogram::<u64>::new(3)?;
    let single_releases = 200;
    for _ in 0..single_releases {
        let t = Instant::now();
        client
            .release_aggregate(request(&ids[..1], 0.01, start_ns))
            .await?;
        single.record(t.elapsed().as_micros() as u64)?;
    }
    let mut set = Histogram::<u64>::new(3)?;
    let set_releases = 10;
    for _ in 0..set_releases {
        let t = Instant::now();
        let r = client
            .release_aggregate(request(&ids, 0.1, start_ns))
            .await?
            .into_inner();
        anyhow::ensure!(
            r.records as usize == twins,
            "set release over {} twins had {} records",
            twins,
            r.records
        );
        set.record(t.elapsed().as_micros() as u64)?;
    }
    rig.edge.stop().await?;
    rig.cloud.stop().await?;
    Ok(PrivacyReport {
        machine,
        single_records: 10_000,
        single_releases,
        single_p50_ms: single.value_at_quantile(0.5) as f64 / 1000.0,
        single_p99_ms: single.value_at_quantile(0.99) as f64 / 1000.0,
        set_twins: twins,
        set_releases,
        set_p50_ms: set.value_at_quantile(0.5) as f64 / 1000.0,
        set_max_ms: set.max() as f64 / 1000.0,
    })
}
