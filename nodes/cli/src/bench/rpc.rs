//! `bench rpc`: GetTwin calls/s through one node's gRPC for a twin on another node, and
//! in the same run its ceiling: a bare tonic unary call (the cloud node's health check)
//! over the same channel and a bare Zenoh query from the cloud node's session to the
//! edge node's (its info queryable), with the same callers.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use twinmesh_actors::wire::TypedFabric;
use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_twins::keys;
use twinmesh_twins::privacy::Role;
use twinmesh_twins::proto::{
    twin_reply, twin_request, Caller, GetTwinRequest, TwinReply, TwinRequest,
};

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
    /// Bare tonic unary calls (health check) to the same server, same callers.
    pub(crate) grpc_ceiling: Loop,
    /// Bare Zenoh queries cloud session → edge session (node info), same callers.
    pub(crate) zenoh_ceiling: Loop,
    /// The GetTwin as a Zenoh query from the cloud session, without gRPC.
    pub(crate) twin_hop: Loop,
}

#[derive(Debug, Serialize)]
pub(crate) struct Loop {
    pub(crate) seconds: f64,
    pub(crate) calls: u64,
    pub(crate) calls_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// `parallel` closed loops of `call` (true when it succeeded) for `warmup + measure`;
/// the latencies of the calls started after the warm-up.
async fn closed_loop<F, Fut>(
    parallel: usize,
    warmup: Duration,
    measure: Duration,
    call: F,
) -> anyhow::Result<(Histogram<u64>, u64)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut calls = 0u64;
            loop {
                let t = Instant::now();
                if t >= start + warmup + measure {
                    break;
                }
                let ok = call().await;
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
    Ok((hist, calls))
}

fn summary(hist: &Histogram<u64>, calls: u64, measure: Duration) -> Loop {
    Loop {
        seconds: measure.as_secs_f64(),
        calls,
        calls_per_s: calls as f64 / measure.as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

pub(super) async fn bench_rpc(args: &BenchArgs) -> anyhow::Result<RpcReport> {
    let rig = Rig::start().await?;
    let ids = rig.twins(1, "wind_turbine").await?;
    let endpoint = format!("http://{}", rig.cloud.grpc_addr.expect("grpc"));
    let channel = tonic::transport::Channel::from_shared(endpoint)?
        .connect()
        .await?;
    let parallel = args.parallel.max(1);
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs_f64(args.seconds);
    let ceiling_measure = Duration::from_secs_f64(args.seconds.min(5.0));

    // The ceilings first, on the idle mesh.
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let (hist, calls) = closed_loop(parallel, warmup, ceiling_measure, move || {
        let mut client = health.clone();
        async move {
            client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
        }
    })
    .await?;
    let grpc_ceiling = summary(&hist, calls, ceiling_measure);

    let fabric = rig.cloud.ctx.fabric.clone();
    let info_key = keys::node_info(&rig.edge.ctx.node);
    let (hist, calls) = closed_loop(parallel, warmup, ceiling_measure, move || {
        let (fabric, key) = (fabric.clone(), info_key.clone());
        async move {
            fabric
                .query(&key, None, Duration::from_secs(2))
                .await
                .is_ok_and(|r| !r.is_empty())
        }
    })
    .await?;
    let zenoh_ceiling = summary(&hist, calls, ceiling_measure);

    // The same GetTwin as a Zenoh query from the cloud node, without gRPC: the twin hop.
    let fabric = rig.cloud.ctx.fabric.clone();
    let twin_key = keys::twin_rpc(&ids[0].parse()?);
    let trust = rig.cloud.ctx.trust.clone();
    let request = TwinRequest {
        caller: Some(Caller {
            role: Role::Viewer.as_str().into(),
            ..Default::default()
        }),
        request: Some(twin_request::Request::GetTwin(GetTwinRequest {
            twin_id: ids[0].clone(),
        })),
    };
    let (hist, calls) = closed_loop(parallel, warmup, ceiling_measure, move || {
        let (fabric, key, mut request) = (fabric.clone(), twin_key.clone(), request.clone());
        // As the cloud's API does for every call.
        trust.vouch(&mut request, twinmesh_nodes::api::now_ms());
        let trust = trust.clone();
        async move {
            // As the API does: only a reply proven for this request counts.
            let accept = |r: &twinmesh_actors::ports::Reply| {
                trust
                    .answer::<TwinReply>(request.caller.as_ref(), &r.payload)
                    .is_some_and(|r| matches!(r.reply, Some(twin_reply::Reply::Twin(_))))
            };
            let reply = fabric
                .ask_first(&key, &request, Duration::from_secs(2), &accept)
                .await;
            matches!(reply, Ok(Some(_)))
        }
    })
    .await?;
    let twin_hop = summary(&hist, calls, ceiling_measure);

    let client = TwinServiceClient::new(channel.clone());
    let id = ids[0].clone();
    let (hist, calls) = closed_loop(parallel, warmup, measure, move || {
        let (mut client, id) = (client.clone(), id.clone());
        async move {
            client
                .get_twin(GetTwinRequest { twin_id: id })
                .await
                .is_ok()
        }
    })
    .await?;
    rig.stop().await?;
    Ok(RpcReport {
        machine: machine(),
        callers: parallel,
        seconds: measure.as_secs_f64(),
        calls,
        calls_per_s: calls as f64 / measure.as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
        grpc_ceiling,
        zenoh_ceiling,
        twin_hop,
    })
}
