//! `bench rpc`: GetTwin calls/s through one node's gRPC for a twin on another node.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_twins::proto::GetTwinRequest;

use super::rig::*;
use super::BenchArgs;

#[derive(Debug, Serialize)]
pub(crate) struct RpcReport {
    pub(crate) machine: String,
    pub(crate) callers: usize,
    pub(crate) seconds: f64,
    pub(crate) calls: u64,
    pub(crate) calls_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

pub(super) async fn bench_rpc(args: &BenchArgs) -> anyhow::Result<RpcReport> {
    let rig = Rig::start().await?;
    let ids = rig.twins(1, "wind_turbine").await?;
    let endpoint = format!("http://{}", rig.cloud.grpc_addr.expect("grpc"));
    let channel = tonic::transport::Channel::from_shared(endpoint)?
        .connect()
        .await?;
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.parallel.max(1) {
        let mut client = TwinServiceClient::new(channel.clone());
        let id = ids[0].clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut calls = 0u64;
            loop {
                let t = Instant::now();
                if t >= start + warmup + measure {
                    break;
                }
                let ok = client
                    .get_twin(GetTwinRequest {
                        twin_id: id.clone(),
                    })
                    .await
                    .is_ok();
                if ok && t >= start + warmup {
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                    calls += 1;
                }
            }
            (hist, calls)
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let mut calls = 0;
    for t in tasks {
        let (h, c) = t.await?;
        hist.add(&h)?;
        calls += c;
    }
    rig.stop().await?;
    Ok(RpcReport {
        machine: machine(),
        callers: args.parallel.max(1),
        seconds: measure.as_secs_f64(),
        calls,
        calls_per_s: calls as f64 / measure.as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
    })
}
