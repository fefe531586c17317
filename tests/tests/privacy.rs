//! End-to-end tests of privacy (issue 5): sentinel values of a `site_only` signal never
//! reach the cloud (fabric, gRPC), DP releases do; the ledger charges OpenDP's privacy
//! loss, stops exactly at the budget, and survives a restart and a migration; set
//! releases over a site's twins and micro-aggregation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tonic::Code;

use twinmesh_actors::seal::KeyRing;
use twinmesh_proto::v1::privacy_service_client::PrivacyServiceClient;
use twinmesh_proto::v1::{
    self as proto, GetBudgetRequest, GetPolicyRequest, QueryHistoryRequest,
    ReleaseAggregateRequest, SetPolicyRequest, TelemetryFrame,
};
use twinmesh_tests::{
    eventually, get_placement, get_twin, migrate_twin, now_ns, publish, register, site_key,
    twin_client, zenoh_client, zenoh_peer, Cluster, Mesh,
};
use twinmesh_twins::privacy::{mean_parts, plan, privacy_loss, Noise, ReleaseSpec, Statistic};

const WAIT: Duration = Duration::from_secs(60);
/// Exactly representable, inside cycle_time's range [0, 600] s, and unlike anything the
/// simulators produce.
const SENTINEL: f64 = 437.0615234375;
const SIGNAL: &str = "cycle_time";

/// Every (key, payload) an outside subscriber received.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

async fn privacy(endpoint: &str) -> PrivacyServiceClient<tonic::transport::Channel> {
    PrivacyServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect to gRPC")
}

const HOUR_NS: i64 = 3_600_000_000_000;

/// The last hour of `SIGNAL` of twin `id` through `endpoint`, in buckets of `bucket_ns`.
async fn last_hour(
    endpoint: &str,
    id: &str,
    bucket_ns: i64,
    aggregation: proto::Aggregation,
) -> Result<proto::QueryHistoryResponse, tonic::Status> {
    twin_client(endpoint)
        .await
        .query_history(QueryHistoryRequest {
            twin_id: id.into(),
            signal: SIGNAL.into(),
            start_ns: now_ns() - HOUR_NS,
            end_ns: now_ns(),
            bucket_ns,
            aggregation: aggregation as i32,
        })
        .await
        .map(|r| r.into_inner())
}

/// `GetPolicy` of twin `id` through `endpoint`.
async fn get_policy(endpoint: &str, id: &str) -> proto::PrivacyPolicy {
    privacy(endpoint)
        .await
        .get_policy(GetPolicyRequest { twin_id: id.into() })
        .await
        .expect("GetPolicy")
        .into_inner()
}

/// `ReleaseAggregate` of `req` through `endpoint`.
async fn release_aggregate(
    endpoint: &str,
    req: ReleaseAggregateRequest,
) -> Result<proto::ReleaseAggregateResponse, tonic::Status> {
    privacy(endpoint)
        .await
        .release_aggregate(req)
        .await
        .map(|r| r.into_inner())
}

/// `SetPolicy` through `endpoint`.
async fn set_policy(
    endpoint: &str,
    policy: proto::PrivacyPolicy,
    expected_version: Option<u64>,
) -> Result<proto::PrivacyPolicy, tonic::Status> {
    privacy(endpoint)
        .await
        .set_policy(SetPolicyRequest {
            policy: Some(policy),
            expected_version,
        })
        .await
        .map(|r| r.into_inner())
}

/// Whether `bytes` holds the sentinel, as an f64 or as text.
fn has_sentinel(bytes: &[u8]) -> bool {
    let raw = SENTINEL.to_le_bytes();
    let text = SENTINEL.to_string();
    bytes.windows(8).any(|w| w == raw) || bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

/// Publishes `frames` frames of 10 sentinel samples at 1 Hz for `id`, sealed with the
/// site key as a gateway of the site does.
async fn feed_sentinels(
    session: &zenoh::Session,
    ring: &KeyRing,
    dir: &std::path::Path,
    id: &str,
    frames: u64,
) -> i64 {
    feed(session, ring, dir, id, SIGNAL, SENTINEL, frames).await
}

/// Publishes `frames` frames of 10 samples of `value` at 1 Hz on `signal` of `id`,
/// sealed with the site key and proven with the site's control key as a gateway of the
/// site does. Returns the first sample's time.
async fn feed(
    session: &zenoh::Session,
    ring: &KeyRing,
    dir: &std::path::Path,
    id: &str,
    signal: &str,
    value: f64,
    frames: u64,
) -> i64 {
    let start = now_ns() - 120_000_000_000;
    let key = format!("twinmesh/telemetry/{id}/{signal}");
    for seq in 1..=frames {
        let mut f = TelemetryFrame {
            twin_id: id.into(),
            signal: signal.into(),
            seq,
            start_ns: start + (seq as i64 - 1) * 10_000_000_000,
            sample_period_ns: 1_000_000_000,
            spool_base_seq: 1,
            ..Default::default()
        };
        let inner = proto::SealedSamples {
            samples: vec![value; 10],
            packed: Vec::new(),
        };
        f.sealed = ring.seal(
            &twinmesh_twins::frame::seal_context(&f),
            &inner.encode_to_vec(),
        );
        publish(session, &key, twinmesh_tests::proven_frame(dir, f)).await;
    }
    start
}

fn release(id: &[&str], statistic: Statistic, epsilon: f64) -> ReleaseAggregateRequest {
    ReleaseAggregateRequest {
        twin_ids: id.iter().map(|s| s.to_string()).collect(),
        signal: SIGNAL.into(),
        start_ns: now_ns() - 3_600_000_000_000,
        end_ns: now_ns() + 60_000_000_000,
        statistic: match statistic {
            Statistic::Count => proto::Statistic::Count,
            Statistic::Sum => proto::Statistic::Sum,
            Statistic::Mean => proto::Statistic::Mean,
        } as i32,
        epsilon,
    }
}

async fn try_budget(endpoint: &str, req: GetBudgetRequest) -> Option<proto::Budget> {
    privacy(endpoint)
        .await
        .get_budget(req)
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn twin_budget(id: &str) -> GetBudgetRequest {
    GetBudgetRequest {
        twin_id: id.into(),
        ..Default::default()
    }
}

fn site_budget(site: &str) -> GetBudgetRequest {
    GetBudgetRequest {
        site: site.into(),
        ..Default::default()
    }
}

async fn budget(endpoint: &str, id: &str) -> proto::Budget {
    try_budget(endpoint, twin_budget(id))
        .await
        .expect("GetBudget")
}

/// Records every (key, payload) that `session` receives on `twinmesh/**`; keep the
/// subscriber alive as long as the recording should run.
async fn record_everything(session: &zenoh::Session) -> (Seen, zenoh::pubsub::Subscriber<()>) {
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    let sub = session
        .declare_subscriber("twinmesh/**")
        .callback(move |s| {
            seen2.lock().unwrap().push((
                s.key_expr().to_string(),
                s.payload().to_bytes().into_owned(),
            ));
        })
        .await
        .unwrap();
    (seen, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_only_values_stay_on_site_and_releases_spend_exactly_their_budget() {
    // Two edges and a real gateway: its crankshaft line's protected signals must travel
    // sealed.
    let mut c = Cluster::two_edges_of_site_a("crankshaft_line:1").unwrap();
    let cloud_grpc = c.node("cloud").grpc_endpoint();
    let cloud_zenoh = c.node("cloud").ready.zenoh[0].clone();

    // An outside client on the cloud's endpoint sees everything published on twinmesh/**.
    let outside = zenoh_client(&cloud_zenoh).await;
    let (seen, _sub) = record_everything(&outside).await;

    let id = "site-a/sentinel-01";
    let ring = KeyRing::parse(
        &std::fs::read_to_string(site_key(c.dir.path(), "site-a").unwrap()).unwrap(),
    )
    .unwrap();
    let site = zenoh_peer(&c.endpoints()).await;
    let placement = register(&site, c.dir.path(), id, "crankshaft_line").await;
    let edge = c.node(&placement.node).grpc_endpoint();
    eventually(WAIT, "the twin on its edge", || async {
        get_twin(&edge, id).await.ok()
    })
    .await;
    let first_sample = feed_sentinels(&site, &ring, c.dir.path(), id, 5).await;

    // On the site, a data operator sees the raw values.
    let on_site = eventually(WAIT, "the sentinels applied", || async {
        let t = get_twin(&edge, id).await.ok()?;
        (t.reported.get(SIGNAL)?.seq == 5).then_some(t)
    })
    .await;
    assert_eq!(on_site.reported[SIGNAL].value, SENTINEL);
    // Through the cloud: withheld, never the value.
    let off_site = get_twin(&cloud_grpc, id).await.unwrap();
    assert!(!off_site.reported.contains_key(SIGNAL));
    assert!(off_site.withheld.contains(&SIGNAL.to_owned()));
    assert!(!off_site.derived.keys().any(|k| k.starts_with("cycle_time")));
    assert!(!has_sentinel(&off_site.encode_to_vec()));
    let history = |endpoint: String| async move {
        last_hour(&endpoint, id, HOUR_NS, proto::Aggregation::Max).await
    };
    let refused = history(cloud_grpc.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("stays on site site-a"),
        "{refused:?}"
    );
    let raw = history(edge.clone()).await.unwrap();
    assert_eq!(raw.buckets.iter().map(|b| b.count).sum::<u64>(), 50);
    assert_eq!(raw.buckets[0].value, SENTINEL);

    // A budget of 1 per period; releases of ε 0.3 stop after exactly 3.
    let policy = get_policy(&cloud_grpc, id).await;
    assert_eq!(
        policy.signals[SIGNAL].sensitivity,
        proto::Sensitivity::SiteOnly as i32
    );
    let mut p = policy.clone();
    p.epsilon_per_period = 1.0;
    let set = set_policy(&cloud_grpc, p, Some(policy.version))
        .await
        .unwrap();
    assert_eq!(set.version, policy.version + 1);
    let stale = set_policy(&cloud_grpc, set.clone(), Some(policy.version))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);

    let mut spent = 0.0;
    for i in 0..3 {
        let r = release_aggregate(&cloud_grpc, release(&[id], Statistic::Mean, 0.3))
            .await
            .unwrap_or_else(|e| panic!("release {i}: {e:?}"));
        // The mean is sized on a noisy count: the exact 50 is not reported.
        assert!(r.records >= 1);
        assert_eq!(r.mechanism, "dp_laplace_mean");
        // The ledger records OpenDP's privacy maps of these very measurements (the
        // noisy count, then the mean at the size it gave).
        let spec = ReleaseSpec {
            statistic: Statistic::Mean,
            noise: Noise::Laplace,
            lower: set.signals[SIGNAL].lower,
            upper: set.signals[SIGNAL].upper,
            epsilon: 0.3,
            delta: set.delta,
            d_in: set.max_contributions,
        };
        let (count, mean) = mean_parts(&spec);
        let (eps, _) = privacy_loss(&mean, r.records as usize, r.noise_scale).unwrap();
        let eps = plan(&count, 0).unwrap().epsilon + eps;
        assert!(
            (r.epsilon_spent - eps).abs() <= 1e-12,
            "{} {eps}",
            r.epsilon_spent
        );
        assert!(eps <= 0.3);
        spent += eps;
        let b = budget(&cloud_grpc, id).await;
        assert_eq!(b.epsilon_spent, spent);
        assert_eq!(b.releases, i + 1);
        assert!((r.epsilon_remaining - (1.0 - spent)).abs() < 1e-12);
        // Noisy, not exact, and still not the raw value on the wire.
        assert_ne!(r.value, SENTINEL);
    }
    let refused = release_aggregate(&cloud_grpc, release(&[id], Statistic::Mean, 0.3))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("budget"), "{refused:?}");
    assert_eq!(budget(&cloud_grpc, id).await.epsilon_spent, spent);

    // The releases were audited on the fabric, values included.
    eventually(
        WAIT,
        "three privacy_release events seen off-site",
        || async {
            let n = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, p)| {
                    k.ends_with("sentinel-01/events")
                        && proto::TwinEvent::decode(p.as_slice()).is_ok_and(|e| {
                            e.kind == "privacy_release" && e.attributes.contains_key("value")
                        })
                })
                .count();
            (n >= 3).then_some(())
        },
    )
    .await;

    // The budget survives a restart of the twin's node (stopping it fails the twin over
    // to the other edge, from the cloud's replica) ...
    let node = placement.node.clone();
    c.nodes.get_mut(&node).unwrap().stop().unwrap();
    c.restart(&node).unwrap();
    let after = eventually(WAIT, "the budget after a restart", || {
        try_budget(&cloud_grpc, twin_budget(id))
    })
    .await;
    assert_eq!(after.epsilon_spent, spent);
    assert_eq!(after.epsilon_total, 1.0);

    // ... and a migration to the site's other edge (the restart may have failed the
    // twin over already: move it from wherever it is now).
    let now_on = get_placement(&cloud_grpc, id).await.unwrap().node;
    let target = if now_on == "edge-a1" {
        "edge-a2"
    } else {
        "edge-a1"
    };
    let moved = eventually(WAIT, "a migration", || async {
        migrate_twin(&cloud_grpc, id, target).await.ok()
    })
    .await;
    assert_eq!(moved.placement.unwrap().node, target);
    let p = get_placement(&cloud_grpc, id).await.unwrap();
    assert_eq!(p.node, target);
    let b = budget(&cloud_grpc, id).await;
    assert_eq!(b.epsilon_spent, spent);
    assert_eq!(b.releases, 3);

    // The real gateway's protected frames travel sealed, its public ones in clear.
    eventually(WAIT, "frames of the simulated line", || async {
        let seen = seen.lock().unwrap();
        let frames: Vec<TelemetryFrame> = seen
            .iter()
            .filter(|(k, _)| k.starts_with("twinmesh/telemetry/site-a/cs-01/"))
            .filter_map(|(_, p)| TelemetryFrame::decode(p.as_slice()).ok())
            .collect();
        (frames.len() >= 4).then_some(frames)
    })
    .await
    .iter()
    .for_each(|f| {
        assert!(
            f.samples.is_empty() && f.packed.is_empty(),
            "{} in clear",
            f.signal
        );
        assert!(!f.sealed.is_empty());
    });

    // Nothing the outside client saw carried a sentinel.
    {
        let seen = seen.lock().unwrap();
        assert!(seen.len() > 20, "only {} samples seen", seen.len());
        for (key, payload) in seen.iter() {
            assert!(!has_sentinel(payload), "sentinel seen off-site on {key}");
        }
    }

    // Minimisation: with `coarsen` at 1 h the signal's history leaves the site as means
    // (or counts) over buckets of at least an hour, and still not finer, nor as a max.
    let mut p = set.clone();
    let sp = p.signals.get_mut(SIGNAL).unwrap();
    sp.mechanism = "coarsen".into();
    sp.resolution_ns = 3_600_000_000_000;
    set_policy(&cloud_grpc, p, None).await.unwrap();
    // Off the site only whole buckets on the grid of multiples of the bucket length
    // are answered: ask from three hours back to two ahead, which holds whole ones.
    let coarse = |bucket_ns: i64, aggregation: proto::Aggregation| {
        let endpoint = cloud_grpc.clone();
        async move {
            twin_client(&endpoint)
                .await
                .query_history(QueryHistoryRequest {
                    twin_id: id.into(),
                    signal: SIGNAL.into(),
                    start_ns: now_ns() - 3 * HOUR_NS,
                    end_ns: now_ns() + 2 * HOUR_NS,
                    bucket_ns,
                    aggregation: aggregation as i32,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let hourly = coarse(HOUR_NS, proto::Aggregation::Mean).await.unwrap();
    assert_eq!(hourly.buckets.iter().map(|b| b.count).sum::<u64>(), 50);
    assert!(hourly.buckets.iter().all(|b| b.start_ns % HOUR_NS == 0));
    // The attack: a range of one nanosecond around a sample gets nothing back.
    let one_ns = twin_client(&cloud_grpc)
        .await
        .query_history(QueryHistoryRequest {
            twin_id: id.into(),
            signal: SIGNAL.into(),
            start_ns: first_sample,
            end_ns: first_sample + 1,
            bucket_ns: HOUR_NS,
            aggregation: proto::Aggregation::Mean as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(one_ns.code(), Code::InvalidArgument, "{one_ns:?}");
    for (bucket_ns, agg) in [
        (60_000_000_000, proto::Aggregation::Mean),
        (HOUR_NS, proto::Aggregation::Max),
    ] {
        let e = coarse(bucket_ns, agg).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("at least 3600 s"), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_releases_charge_every_twin_and_the_site_and_micro_aggregates_need_k() {
    let mut c = Cluster::new(1000).unwrap();
    // Each site may spend ε 1 on set releases per period.
    c.start("cloud", "cloud", None, None, &["--site-epsilon", "1"])
        .unwrap();
    c.start("edge", "edge-a", Some("site-a"), None, &[])
        .unwrap();
    let cloud_grpc = c.node("cloud").grpc_endpoint();
    let edge = c.node("edge-a").grpc_endpoint();
    let ring = KeyRing::parse(
        &std::fs::read_to_string(site_key(c.dir.path(), "site-a").unwrap()).unwrap(),
    )
    .unwrap();
    let site = zenoh_peer(&c.endpoints()).await;
    let ids = ["site-a/line-01", "site-a/line-02", "site-a/line-03"];
    for id in ids {
        register(&site, c.dir.path(), id, "crankshaft_line").await;
        eventually(WAIT, "the twin", || async {
            get_twin(&edge, id).await.ok()
        })
        .await;
        feed_sentinels(&site, &ring, c.dir.path(), id, 2).await;
    }
    for id in ids {
        eventually(WAIT, "frames applied", || async {
            (get_twin(&edge, id).await.ok()?.reported.get(SIGNAL)?.seq == 2).then_some(())
        })
        .await;
    }
    let r = release_aggregate(&cloud_grpc, release(&ids, Statistic::Sum, 0.5))
        .await
        .unwrap();
    assert_eq!(r.records, 3);
    assert_eq!(r.mechanism, "dp_laplace_sum");
    assert!(r.epsilon_spent <= 0.5 && r.epsilon_spent > 0.49);
    // Each twin's clamped mean is the sentinel: the sum is 3× it, plus noise of scale
    // 600/ε (one twin changes the sum by at most the bound).
    assert!((r.noise_scale - 1200.0).abs() < 1.0, "{}", r.noise_scale);
    for id in ids {
        assert_eq!(budget(&cloud_grpc, id).await.epsilon_spent, r.epsilon_spent);
    }
    // The site's ledger holds the same ε, and so says the release.
    let sb = try_budget(&edge, site_budget("site-a")).await.unwrap();
    assert_eq!(sb.site, "site-a");
    assert_eq!(sb.epsilon_total, 1.0);
    assert_eq!(sb.epsilon_spent, r.epsilon_spent);
    assert_eq!(sb.releases, 1);
    assert_eq!(r.site_epsilon_remaining, Some(1.0 - r.epsilon_spent));
    // A second release of ε 0.6 fits each twin's budget (10) but not the site's (1 − ε
    // spent): refused, and neither the site nor any twin is charged.
    let e = release_aggregate(&cloud_grpc, release(&ids, Statistic::Sum, 0.6))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("site site-a"), "{e:?}");
    let sb = try_budget(&cloud_grpc, site_budget("site-a"))
        .await
        .unwrap();
    assert_eq!(sb.epsilon_spent, r.epsilon_spent);
    for id in ids {
        assert_eq!(budget(&cloud_grpc, id).await.epsilon_spent, r.epsilon_spent);
    }
    // What fits the site's rest is released, and the site ledger survives a restart of
    // the cloud node that keeps it.
    let r2 = release_aggregate(&cloud_grpc, release(&ids, Statistic::Sum, 0.4))
        .await
        .unwrap();
    let spent = r.epsilon_spent + r2.epsilon_spent;
    c.restart("cloud").unwrap();
    let cloud_grpc = c.node("cloud").grpc_endpoint();
    let sb = eventually(WAIT, "the site ledger after a restart", || {
        try_budget(&cloud_grpc, site_budget("site-a"))
    })
    .await;
    assert!((sb.epsilon_spent - spent).abs() < 1e-12, "{sb:?}");
    assert_eq!(sb.releases, 2);
    for id in ids {
        // Through the restarted cloud, once the edge's link to it is back.
        let b = eventually(WAIT, "a twin's budget through the cloud", || {
            try_budget(&cloud_grpc, twin_budget(id))
        })
        .await;
        assert!((b.epsilon_spent - spent).abs() < 1e-12, "{b:?}");
    }
    // A set across sites is refused.
    let e = release_aggregate(
        &cloud_grpc,
        release(&["site-a/line-01", "site-b/x"], Statistic::Sum, 0.5),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Micro-aggregation with k = 5 over the site's 3 twins: refused, nothing charged.
    let micro = |id: &'static str, k: u32| {
        let endpoint = cloud_grpc.clone();
        async move {
            let mut p = get_policy(&endpoint, id).await;
            let sp = p.signals.get_mut(SIGNAL).unwrap();
            sp.mechanism = "micro_aggregate".into();
            sp.k = k;
            set_policy(&endpoint, p, None).await.unwrap();
        }
    };
    micro(ids[0], 5).await;
    let e = release_aggregate(&cloud_grpc, release(&ids, Statistic::Mean, 0.5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("smaller than k = 5"), "{e:?}");
    for id in ids {
        assert!((budget(&cloud_grpc, id).await.epsilon_spent - spent).abs() < 1e-12);
    }
    // With k = 3 on the first twin only, the others' policy (dp) is stricter: the
    // release over the site's one group is noisy and charged to them, not to it.
    micro(ids[0], 3).await;
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for id in ids {
            v.push(budget(&cloud_grpc, id).await.epsilon_spent);
        }
        v
    };
    let e = release_aggregate(&cloud_grpc, release(&ids[..2], Statistic::Mean, 0.05))
        .await
        .unwrap();
    assert_eq!(e.mechanism, "dp_laplace_mean");
    assert_eq!(e.records, 3, "the whole group, not the two twins asked for");
    assert_eq!(budget(&cloud_grpc, ids[0]).await.epsilon_spent, before[0]);
    for (i, id) in ids.iter().enumerate().skip(1) {
        let b = budget(&cloud_grpc, id).await.epsilon_spent;
        assert!((b - before[i] - e.epsilon_spent).abs() < 1e-12, "{id}");
    }
    // With k = 3 on every twin the exact mean of the site's one group is released,
    // whichever of its twins are asked for.
    for id in &ids[1..] {
        micro(id, 3).await;
    }
    for set in [&ids[..], &ids[..1], &ids[1..]] {
        let m = release_aggregate(&cloud_grpc, release(set, Statistic::Mean, 0.5))
            .await
            .unwrap();
        assert_eq!(m.mechanism, "micro_aggregate");
        assert_eq!(m.value, SENTINEL);
        assert_eq!(m.records, 3);
        assert_eq!(m.epsilon_spent, 0.0);
    }
    // Bad requests name what is wrong.
    let e = release_aggregate(&cloud_grpc, release(&[ids[1]], Statistic::Mean, -1.0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = release_aggregate(&cloud_grpc, ReleaseAggregateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

/// The attack of issue 20 against real processes: an analyst who picks the sets asks for
/// six micro-aggregated means of the personal `people_in` of six turnstiles (k = 5),
/// each leaving one gate out. Over the caller's sets, 6 × mean(all) − 5 × mean(all but
/// i) would be gate i's own count. The site forms the groups, so every answer is the
/// mean of the same whole group and the differences give nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_one_out_micro_aggregates_over_six_turnstiles_give_no_gate_back() {
    const PEOPLE_IN: &str = "people_in";
    let mut c = Cluster::new(1000).unwrap();
    c.start("cloud", "cloud", None, None, &[]).unwrap();
    c.start("edge", "edge-a", Some("site-a"), None, &[])
        .unwrap();
    let cloud_grpc = c.node("cloud").grpc_endpoint();
    let edge = c.node("edge-a").grpc_endpoint();
    let ring = KeyRing::parse(
        &std::fs::read_to_string(site_key(c.dir.path(), "site-a").unwrap()).unwrap(),
    )
    .unwrap();
    let site = zenoh_peer(&c.endpoints()).await;
    let ids: Vec<String> = (1..=6).map(|i| format!("site-a/gate-0{i}")).collect();
    // Gate i counts 10 i + 3 people per second: every gate's value is distinct.
    let value = |i: usize| (10 * (i + 1) + 3) as f64;
    for (i, id) in ids.iter().enumerate() {
        register(&site, c.dir.path(), id, "turnstile_gate").await;
        eventually(WAIT, "the gate", || async {
            get_twin(&edge, id).await.ok()
        })
        .await;
        feed(&site, &ring, c.dir.path(), id, PEOPLE_IN, value(i), 2).await;
    }
    for id in &ids {
        eventually(WAIT, "frames applied", || async {
            (get_twin(&edge, id).await.ok()?.reported.get(PEOPLE_IN)?.seq == 2).then_some(())
        })
        .await;
        let mut p = get_policy(&cloud_grpc, id).await;
        let sp = p.signals.get_mut(PEOPLE_IN).unwrap();
        sp.mechanism = "micro_aggregate".into();
        sp.k = 5;
        set_policy(&cloud_grpc, p, None).await.unwrap();
    }
    let mean_of_all = (0..6).map(value).sum::<f64>() / 6.0;
    for leave in 0..6 {
        let set: Vec<&str> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leave)
            .map(|(_, id)| id.as_str())
            .collect();
        let r = release_aggregate(
            &cloud_grpc,
            ReleaseAggregateRequest {
                signal: PEOPLE_IN.into(),
                ..release(&set, Statistic::Mean, 0.5)
            },
        )
        .await
        .unwrap();
        assert_eq!(r.mechanism, "micro_aggregate", "{r:?}");
        assert_eq!(
            r.records, 6,
            "the site's whole group, not the five asked for"
        );
        assert!((r.value - mean_of_all).abs() < 1e-9, "{r:?}");
        // The differencing attack gets the group's mean back, never gate `leave`'s count.
        let guess = 6.0 * mean_of_all - 5.0 * r.value;
        assert!(
            (guess - value(leave)).abs() > 1.0,
            "gate {leave} recovered: {guess}"
        );
        // Had the five been averaged as asked, the attack would have worked.
        let asked = (0..6).filter(|i| *i != leave).map(value).sum::<f64>() / 5.0;
        assert!((6.0 * mean_of_all - 5.0 * asked - value(leave)).abs() < 1e-9);
    }
}

/// The lineage attack of issue 20 against real processes: a `bearing` stage on the public
/// `voltage` waveform of a power meter reads the personal `household_energy` as its shaft
/// signal, so `voltage.shaft_hz` is the household's energy × ratio / 60. By name it was a
/// voltage feature and left the site. By lineage it is personal: the twin computes it on
/// the site (the edge shows it), and nothing of it reaches the cloud's gRPC, its history
/// or any publication on the fabric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_feature_computed_from_a_personal_signal_stays_on_the_site() {
    let mesh = Mesh::start(Some("power_meter:1"), &[]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let edge = mesh.edge.grpc_endpoint();
    let id = "site-a/pm-01";
    let outside = zenoh_client(&mesh.cloud.ready.zenoh[0]).await;
    let (seen, _sub) = record_everything(&outside).await;
    let twin = eventually(WAIT, "the meter's twin with its chain", || async {
        get_twin(&edge, id).await.ok().filter(|t| t.chain.is_some())
    })
    .await;
    let mut stages = twin.chain.unwrap().stages;
    let at = stages
        .iter()
        .position(|s| s.tier == "cloud")
        .unwrap_or(stages.len());
    stages.insert(
        at,
        proto::ChainStage {
            op: "bearing".into(),
            tier: "edge".into(),
            signal: "voltage".into(),
            params: [
                ("shaft_signal".to_owned(), "household_energy".to_owned()),
                ("band".to_owned(), "500,2000".to_owned()),
            ]
            .into_iter()
            .collect(),
        },
    );
    twin_client(&cloud)
        .await
        .set_chain(proto::SetChainRequest {
            twin_id: id.into(),
            chain: Some(proto::Chain { stages }),
            expected_revision: None,
        })
        .await
        .expect("SetChain");
    // On the site the feature is computed, from the household's energy counter once it
    // has counted anything: the attack is real.
    eventually(WAIT, "voltage.shaft_hz > 0 on the site", || async {
        let t = get_twin(&edge, id).await.ok()?;
        t.derived
            .get("voltage.shaft_hz")
            .filter(|v| **v > 0.0)
            .copied()
    })
    .await;
    let mark = seen.lock().unwrap().len();
    // Off the site, over several more windows: the meter's current features keep coming
    // (so the cloud does see this twin's windows), none computed from household_energy
    // (by lineage, every feature of `voltage` now is).
    let windows = Mutex::new(std::collections::BTreeSet::new());
    let (windows, cloud_ep) = (&windows, cloud.as_str());
    eventually(
        WAIT,
        "three more windows seen through the cloud",
        || async move {
            let t = get_twin(cloud_ep, id).await.ok()?;
            assert!(
                !t.derived.keys().any(|k| k.starts_with("voltage.")),
                "a feature derived from household_energy left the site: {:?}",
                t.derived
            );
            let mut w = windows.lock().unwrap();
            w.insert(t.derived.get("current.thd").map(|v| v.to_bits())?);
            (w.len() >= 3).then_some(())
        },
    )
    .await;
    let e = twin_client(&cloud)
        .await
        .query_history(QueryHistoryRequest {
            twin_id: id.into(),
            signal: "voltage.shaft_hz".into(),
            start_ns: now_ns() - HOUR_NS,
            end_ns: now_ns(),
            bucket_ns: HOUR_NS,
            aggregation: proto::Aggregation::Mean as i32,
        })
        .await;
    match e {
        Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{e:?}"),
        Ok(r) => assert!(
            r.into_inner().buckets.is_empty(),
            "history of voltage.shaft_hz"
        ),
    }
    let seen = seen.lock().unwrap();
    let after = &seen[mark..];
    let contains = |b: &[u8], what: &str| b.windows(what.len()).any(|w| w == what.as_bytes());
    assert!(
        after.iter().any(|(_, b)| contains(b, "current.thd")),
        "the outside client saw no feature at all"
    );
    for (key, bytes) in after {
        assert!(
            !contains(bytes, "shaft_hz") && !contains(bytes, "bpfo_amp"),
            "{key} carries a feature derived from household_energy"
        );
    }
}

/// Whether `bytes` holds a (synthetic, locally administered) MAC address as text:
/// `02:` and five more `:hex` pairs.
fn has_mac(bytes: &[u8]) -> bool {
    bytes.windows(17).any(|w| {
        w.starts_with(b"02:")
            && w.chunks(3).enumerate().all(|(i, c)| {
                c[0].is_ascii_hexdigit()
                    && c[1].is_ascii_hexdigit()
                    && (i == 5 || c.get(2) == Some(&b':'))
            })
    })
}

/// The identifiers of the `device_associations` events seen so far, and their events'
/// mechanisms.
fn association_events(seen: &Seen, id: &str) -> Vec<proto::TwinEvent> {
    let key = format!("twinmesh/twins/{id}/events");
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k == key)
        .filter_map(|(_, p)| proto::TwinEvent::decode(p.as_slice()).ok())
        .filter(|e| e.kind == "device_associations")
        .collect()
}

fn identifiers_of(e: &proto::TwinEvent) -> Vec<String> {
    ["present", "left"]
        .iter()
        .flat_map(|a| {
            e.attributes
                .get(*a)
                .cloned()
                .unwrap_or_default()
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_addresses_leave_the_access_point_only_as_site_keyed_pseudonyms() {
    let mut c = Cluster::new(1000).unwrap();
    c.start_site("site-a", &["edge-a"], &[], "iot-a", "wifi_ap:1")
        .unwrap();
    let cloud_grpc = c.node("cloud").grpc_endpoint();
    let outside = zenoh_client(&c.node("cloud").ready.zenoh[0]).await;
    let (seen, _sub) = record_everything(&outside).await;
    let ring = KeyRing::parse(
        &std::fs::read_to_string(site_key(c.dir.path(), "site-a").unwrap()).unwrap(),
    )
    .unwrap();
    let key_id = ring.pseudonymiser().key_id().to_owned();
    let id = "site-a/ap-01";

    // Devices come to the simulated access point; off the site their addresses appear
    // only as pseudonyms under the site key.
    let events = eventually(WAIT, "association events off the site", || async {
        let ev = association_events(&seen, id);
        (ev.iter().map(|e| identifiers_of(e).len()).sum::<usize>() >= 3).then_some(ev)
    })
    .await;
    for e in &events {
        assert_eq!(e.attributes["mechanism"], "pseudonymise", "{e:?}");
        for p in identifiers_of(e) {
            assert!(
                twinmesh_twins::privacy::Pseudonymiser::is_pseudonym(&p),
                "{p}"
            );
            assert_eq!(p.split_once(':').unwrap().0, key_id, "{p}");
        }
    }
    // The gateway's batches reached the cloud pseudonymised too, and no payload of any
    // key holds an address.
    let batches: Vec<proto::IdentifierBatch> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k == &format!("twinmesh/telemetry/{id}/device_associations"))
        .filter_map(|(_, p)| proto::IdentifierBatch::decode(p.as_slice()).ok())
        .collect();
    for b in &batches {
        for r in &b.records {
            assert!(r.identifier.starts_with(&format!("{key_id}:")), "{r:?}");
        }
    }
    assert!(!seen.lock().unwrap().iter().any(|(_, p)| has_mac(p)));

    // The twin refuses a batch that is not pseudonymised as its policy demands: a forged
    // raw address published on the site, then a well-formed pseudonym after it on the
    // same key; only the second becomes an event.
    let site = zenoh_peer(&c.endpoints()).await;
    // (Proven as the site's gateway would: a batch without a proof is dropped first.)
    let gateway = twinmesh_tests::gateway_trust(c.dir.path(), "site-a").unwrap();
    let forged = |identifier: &str| {
        let mut b = proto::IdentifierBatch {
            twin_id: id.into(),
            stream: "device_associations".into(),
            records: vec![proto::IdentifierRecord {
                timestamp_ns: now_ns(),
                identifier: identifier.into(),
                present: true,
            }],
            proof: None,
        };
        assert!(gateway.prove("site-a", &mut b));
        b
    };
    let marker = format!("{key_id}:00112233445566778899aabbccddeeff");
    let key = format!("twinmesh/telemetry/{id}/device_associations");
    publish(&site, &key, forged("02:de:ad:be:ef:01").encode_to_vec()).await;
    publish(&site, &key, forged(&marker).encode_to_vec()).await;
    eventually(WAIT, "the well-formed forged batch as an event", || async {
        association_events(&seen, id)
            .iter()
            .any(|e| identifiers_of(e).contains(&marker))
            .then_some(())
    })
    .await;
    // (The forged raw batch itself reached the outside subscriber: it was published by
    // hand on the fabric. What the twin published is what counts.)
    assert!(!seen
        .lock()
        .unwrap()
        .iter()
        .any(|(k, p)| k.starts_with("twinmesh/twins/") && has_mac(p)));

    // The policy decides: once the stream is public, addresses leave raw (which the
    // checks above would have caught).
    let mut p = get_policy(&cloud_grpc, id).await;
    let sp = p.signals.get_mut("device_associations").unwrap();
    assert_eq!(sp.mechanism, "pseudonymise");
    sp.sensitivity = proto::Sensitivity::Public as i32;
    sp.mechanism.clear();
    set_policy(&cloud_grpc, p, None).await.unwrap();
    let raw = eventually(WAIT, "raw addresses once public", || async {
        association_events(&seen, id)
            .into_iter()
            .find(|e| e.attributes["mechanism"].is_empty())
    })
    .await;
    assert!(
        identifiers_of(&raw).iter().all(|m| has_mac(m.as_bytes())),
        "{raw:?}"
    );
}
