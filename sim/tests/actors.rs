//! The actors one at a time, on the in-memory fabric and store and tokio's paused clock:
//! the twin (admission and acknowledgement after the flush, freeze and release,
//! passivation and wake), the placement authority (placement choice, fencing of
//! replicas), the node supervisor (restart limit) and the gateway (spool truncation).
//!
//! The test stands in for the gateway where it needs exact frames: it publishes them
//! through an observer that the network never cuts off. Every wait polls a predicate
//! under a deadline of virtual time.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use ractor::ActorRef;

use twinmesh_actors::gateway::{GatewayConfig, GatewayMsg};
use twinmesh_actors::mesh::{MeshMsg, MeshSnapshot};
use twinmesh_actors::node::{NodeMsg, NodeSnapshot};
use twinmesh_actors::ports::{
    Fabric, PlacementStore, Qos, SeriesStore, SnapshotStore, SpoolStore, Subscription,
};
use twinmesh_actors::twin::TwinMsg;
use twinmesh_sim::mesh::cluster::{NodeSpec, SimCluster};
use twinmesh_sim::mesh::fabric::{NetConfig, Network, SimFabric};
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, FreezeRequest, GetTwinRequest, Placement, PlacementRequest,
    SetDesiredRequest, TelemetryFrame, TwinReply, TwinRequest, TwinSnapshot, Watermark,
};
use twinmesh_twins::{keys, AssetKind, Tier, TwinId};

/// Longest any single wait may take, in virtual time.
const WAIT: Duration = Duration::from_secs(30);
/// How long "nothing happens" is watched for, in virtual time.
const QUIET: Duration = Duration::from_secs(3);
const SIGNAL: &str = "spindle_speed";

/// Polls `f` every 20 ms of virtual time until it gives a value; panics after `WAIT`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Rig {
    c: SimCluster,
    obs: SimFabric,
    /// The observer's keys: those of an edge of site `a` (it proves frames as the site's
    /// gateway would, and vouches for its calls as a mesh node).
    trust: twinmesh_actors::trust::Trust,
}

fn spec(id: &str, tier: Tier, site: &str) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        tier,
        site: site.into(),
        devices: vec![],
    }
}

/// A cloud node and `edges` (name, site), with the authority seeing every one of them.
async fn rig(edges: &[(&str, &str)], passivate_after: Option<Duration>) -> Rig {
    let net = Network::new(
        7,
        NetConfig {
            min_delay: Duration::from_micros(100),
            max_delay: Duration::from_millis(2),
            lease: Duration::from_secs(2),
        },
    );
    let obs = net.observer("observer");
    let mut c = SimCluster::new(net, 7);
    c.twin_config.passivate_after = passivate_after;
    c.add(spec("cloud", Tier::Cloud, "cloud")).await.unwrap();
    for (id, site) in edges {
        c.add(spec(id, Tier::Edge, site)).await.unwrap();
    }
    let trust = twinmesh_sim::mesh::cluster::sim_trust(
        &spec("observer", Tier::Edge, "a"),
        &["a".to_owned()],
    );
    let r = Rig { c, obs, trust };
    let n = edges.len() + 1;
    let rr = &r;
    eventually("every node to join the authority", || async move {
        (rr.mesh().await.members.len() == n).then_some(())
    })
    .await;
    r
}

impl Rig {
    fn mesh_ref(&self) -> ActorRef<MeshMsg> {
        self.c.nodes["cloud"].mesh().expect("cloud is up")
    }

    async fn mesh(&self) -> MeshSnapshot {
        ractor::call_t!(self.mesh_ref(), MeshMsg::Inspect, 5000).unwrap()
    }

    async fn node(&self, node: &str) -> NodeSnapshot {
        let sup = self.c.nodes[node].supervisor().expect("node is up");
        ractor::call_t!(sup, NodeMsg::Inspect, 5000).unwrap()
    }

    async fn register(&self, id: &TwinId, kind: AssetKind) -> Placement {
        let req = PlacementRequest {
            twin_id: id.to_string(),
            kind: kind.to_string(),
            gateway: "test".into(),
            chain: None,
            thing_model: String::new(),
            // (Sent to the authority's actor: the proof is checked on the fabric.)
            proof: None,
        };
        ractor::call_t!(self.mesh_ref(), MeshMsg::Register, 5000, req)
            .unwrap()
            .unwrap()
    }

    /// The actor of `id` on `node`, once it runs there.
    async fn twin(&self, node: &str, id: &TwinId) -> ActorRef<TwinMsg> {
        let sup = self.c.nodes[node].supervisor().expect("node is up");
        eventually("the twin to run", || {
            let sup = sup.clone();
            async move {
                ractor::call_t!(sup, NodeMsg::Lookup, 5000, id.clone())
                    .ok()
                    .flatten()
            }
        })
        .await
    }

    /// The spindle `a/sp-01`, running on `edge-a`, and its acknowledgements.
    async fn spindle(&self) -> (TwinId, Subscription) {
        let id: TwinId = "a/sp-01".parse().unwrap();
        self.register(&id, AssetKind::Spindle).await;
        self.twin("edge-a", &id).await;
        let acks = self.obs.subscribe(&keys::acks(&id), 1024).await.unwrap();
        (id, acks)
    }

    async fn send_frame(&self, id: &TwinId, seq: u64) {
        let mut frame = TelemetryFrame {
            twin_id: id.to_string(),
            signal: SIGNAL.into(),
            seq,
            start_ns: 1_767_268_800_000_000_000 + seq as i64 * 1_000_000_000,
            sample_period_ns: 1_000_000_000,
            samples: vec![1000.0 + seq as f64],
            spool_base_seq: 1,
            ..Default::default()
        };
        assert!(self.trust.prove(id.site(), &mut frame));
        self.obs
            .publish(
                &keys::telemetry(id, SIGNAL),
                Bytes::from(frame.encode_to_vec()),
                <twinmesh_proto::v1::TelemetryFrame as twinmesh_proto::Wire>::ENCODING,
                Qos::Reliable,
            )
            .await
            .unwrap();
    }

    async fn call(&self, id: &TwinId, request: twin_request::Request) -> twin_reply::Reply {
        let mut payload = TwinRequest {
            request: Some(request),
            caller: Some(twinmesh_proto::v1::Caller {
                role: "data_owner".into(),
                ..Default::default()
            }),
        };
        let now_ms = twinmesh_actors::ports::Clock::now_ns(&*self.c.clock) / 1_000_000;
        self.trust.vouch(&mut payload, now_ms);
        let payload = payload.encode_to_vec();
        let replies = self
            .obs
            .query(
                &keys::twin_rpc(id),
                Some((
                    Bytes::from(payload),
                    <twinmesh_proto::v1::TwinRequest as twinmesh_proto::Wire>::ENCODING,
                )),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let reply = replies.into_iter().next().expect("the twin answers");
        TwinReply::decode(reply.payload).unwrap().reply.unwrap()
    }
}

/// The applied seq of `SIGNAL` in the twin's state (0: none).
async fn applied(actor: &ActorRef<TwinMsg>) -> u64 {
    let t = ractor::call_t!(actor, TwinMsg::Inspect, 5000).unwrap();
    t.reported.get(SIGNAL).map_or(0, |r| r.seq)
}

/// The next watermark of `SIGNAL` at `seq` or above, if one comes within `within`.
async fn ack_at_least(acks: &Subscription, seq: u64, within: Duration) -> Option<Watermark> {
    tokio::time::timeout(within, async {
        loop {
            let s = acks.rx.recv_async().await.ok()?;
            let wm = Watermark::decode(s.payload).ok()?;
            if wm.signal == SIGNAL && wm.seq >= seq {
                return Some(wm);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test(start_paused = true)]
async fn twin_acknowledges_a_frame_only_after_the_flush_that_covers_it() {
    let r = rig(&[("edge-a", "a")], None).await;
    let id: TwinId = "a/sp-01".parse().unwrap();
    let placed = r.register(&id, AssetKind::Spindle).await;
    assert_eq!(placed.node, "edge-a");
    let twin = r.twin("edge-a", &id).await;
    let acks = r.obs.subscribe(&keys::acks(&id), 1024).await.unwrap();
    let store = r.c.nodes["edge-a"].store.clone();

    r.send_frame(&id, 1).await;
    let wm = ack_at_least(&acks, 1, WAIT)
        .await
        .expect("frame 1 acknowledged");
    assert_eq!((wm.seq, wm.epoch), (1, placed.epoch));
    assert!(store.is_durable(&id, SIGNAL, 1));

    // A stalled disk: frame 2 is applied to the state, but not acknowledged.
    let held = store.hold_flushes().await;
    r.send_frame(&id, 2).await;
    let t = &twin;
    eventually("frame 2 applied", || async move {
        (applied(t).await == 2).then_some(())
    })
    .await;
    assert_eq!(ack_at_least(&acks, 2, QUIET).await, None);
    assert!(!store.is_durable(&id, SIGNAL, 2));
    drop(held);
    let wm = ack_at_least(&acks, 2, WAIT)
        .await
        .expect("frame 2 acknowledged");
    assert_eq!(wm.seq, 2);
    assert!(store.is_durable(&id, SIGNAL, 2));

    // Admission by seq: a duplicate and a frame after a gap change nothing; the
    // watermark stays at the last applied seq.
    r.send_frame(&id, 2).await;
    r.send_frame(&id, 4).await;
    let wm = ack_at_least(&acks, 2, WAIT).await.expect("a watermark");
    assert_eq!(wm.seq, 2);
    assert_eq!(ack_at_least(&acks, 3, QUIET).await, None);
    assert_eq!(applied(&twin).await, 2);
    let t = ractor::call_t!(twin, TwinMsg::Inspect, 5000).unwrap();
    assert_eq!(t.duplicate_frames.get(SIGNAL), Some(&1));
    r.send_frame(&id, 3).await;
    let wm = ack_at_least(&acks, 3, WAIT)
        .await
        .expect("frame 3 acknowledged");
    assert_eq!(wm.seq, 3);
}

#[tokio::test(start_paused = true)]
async fn frozen_twin_applies_nothing_until_released() {
    let r = rig(&[("edge-a", "a")], None).await;
    let id: TwinId = "a/sp-01".parse().unwrap();
    let placed = r.register(&id, AssetKind::Spindle).await;
    let twin = r.twin("edge-a", &id).await;
    let acks = r.obs.subscribe(&keys::acks(&id), 1024).await.unwrap();
    r.send_frame(&id, 1).await;
    ack_at_least(&acks, 1, WAIT)
        .await
        .expect("frame 1 acknowledged");

    let freeze = |epoch, release| {
        twin_request::Request::Freeze(FreezeRequest {
            twin_id: id.to_string(),
            epoch,
            release,
            timeout_ms: 0,
        })
    };
    // Only at the twin's own epoch.
    match r.call(&id, freeze(placed.epoch + 1, false)).await {
        twin_reply::Reply::Error(e) => assert_eq!(e.code, proto::ErrorCode::InvalidArgument as i32),
        other => panic!("freeze at another epoch answered {other:?}"),
    }
    match r.call(&id, freeze(placed.epoch, false)).await {
        twin_reply::Reply::Snapshot(s) => {
            assert_eq!(s.epoch, placed.epoch);
            assert_eq!(s.twin.unwrap().reported[SIGNAL].seq, 1);
        }
        other => panic!("freeze answered {other:?}"),
    }
    r.send_frame(&id, 2).await;
    assert_eq!(ack_at_least(&acks, 2, QUIET).await, None);
    assert_eq!(applied(&twin).await, 1);
    let set = twin_request::Request::SetDesired(SetDesiredRequest {
        twin_id: id.to_string(),
        property: "speed_override".into(),
        value: 90.0,
        expected_revision: None,
    });
    match r.call(&id, set.clone()).await {
        twin_reply::Reply::Error(e) => {
            assert_eq!(
                e.code,
                proto::ErrorCode::Unavailable as i32,
                "{}",
                e.message
            )
        }
        other => panic!("set-point on a frozen twin answered {other:?}"),
    }

    // Released (the move did not happen): the re-sent frame is applied and acknowledged.
    assert!(matches!(
        r.call(&id, freeze(placed.epoch, true)).await,
        twin_reply::Reply::Snapshot(_)
    ));
    r.send_frame(&id, 2).await;
    let wm = ack_at_least(&acks, 2, WAIT)
        .await
        .expect("frame 2 acknowledged");
    assert_eq!(wm.seq, 2);
    assert_eq!(applied(&twin).await, 2);
    assert!(matches!(
        r.call(&id, set).await,
        twin_reply::Reply::SetDesired(_)
    ));
}

const IDLE: Duration = Duration::from_secs(2);

/// Waits until `id` is dormant on `node`; returns how long that took.
async fn until_dormant(r: &Rig, node: &str, id: &TwinId) -> Duration {
    let start = tokio::time::Instant::now();
    eventually("the twin to passivate", || async move {
        let n = r.node(node).await;
        n.twins
            .iter()
            .any(|t| t.twin_id == id.to_string() && t.dormant && !t.running)
            .then_some(())
    })
    .await;
    start.elapsed()
}

#[tokio::test(start_paused = true)]
async fn idle_twin_passivates_and_wakes_on_a_frame_or_a_call() {
    let r = rig(&[("edge-a", "a")], Some(IDLE)).await;
    let (id, acks) = r.spindle().await;
    r.send_frame(&id, 1).await;
    ack_at_least(&acks, 1, WAIT)
        .await
        .expect("frame 1 acknowledged");

    let slept_after = until_dormant(&r, "edge-a", &id).await;
    assert!(
        slept_after >= IDLE - Duration::from_millis(100),
        "passivated {slept_after:?} after its last frame, before its idle time of {IDLE:?}"
    );
    // Its state is durable on the node before it stops.
    let snap: TwinSnapshot = r.c.nodes["edge-a"]
        .store
        .load_snapshot(&id)
        .unwrap()
        .unwrap();
    assert_eq!(snap.twin.unwrap().reported[SIGNAL].seq, 1);

    // A frame wakes it; it goes on from its snapshot (seq 2 follows 1).
    r.send_frame(&id, 2).await;
    let wm = ack_at_least(&acks, 2, WAIT)
        .await
        .expect("frame 2 acknowledged");
    assert_eq!(wm.seq, 2);
    let twin = r.twin("edge-a", &id).await;
    assert_eq!(applied(&twin).await, 2);

    // Idle again; a call wakes it and is answered by the woken twin.
    until_dormant(&r, "edge-a", &id).await;
    match r
        .call(
            &id,
            twin_request::Request::GetTwin(GetTwinRequest {
                twin_id: id.to_string(),
            }),
        )
        .await
    {
        twin_reply::Reply::Twin(t) => assert_eq!(t.reported[SIGNAL].seq, 2),
        other => panic!("get twin answered {other:?}"),
    }
    let n = r.node("edge-a").await;
    assert!(n.twins.iter().any(|t| t.running && !t.dormant));
}

#[tokio::test(start_paused = true)]
async fn mesh_places_on_the_least_loaded_feasible_node() {
    let r = rig(
        &[("edge-a1", "a"), ("edge-a2", "a"), ("edge-b1", "b")],
        None,
    )
    .await;
    let public = AssetKind::Spindle;
    let site_only = AssetKind::CrankshaftLine;
    let is_public = |k: AssetKind| {
        k.schema()
            .signals
            .iter()
            .all(|s| s.sensitivity == twinmesh_twins::kind::Sensitivity::Public)
    };
    assert!(is_public(public) && !is_public(site_only));
    let r = &r;
    let place = |id: &'static str, kind| async move {
        let p = r.register(&id.parse().unwrap(), kind).await;
        (p.node, p.status)
    };
    let active = |n: &str| (n.to_owned(), "active".to_owned());
    // Least loaded first; the name only breaks ties.
    assert_eq!(place("a/sp-01", public).await, active("edge-a1"));
    assert_eq!(place("a/sp-02", public).await, active("edge-a2"));
    assert_eq!(place("a/sp-03", public).await, active("edge-a1"));
    assert_eq!(place("a/cs-01", site_only).await, active("edge-a2"));
    // Site affinity: an edge of the twin's own site, never another site's.
    assert_eq!(place("b/cs-01", site_only).await, active("edge-b1"));
    // No edge on site c: public data may go to the cloud, site-only data nowhere.
    assert_eq!(place("c/sp-01", public).await, active("cloud"));
    let (node, status) = place("c/cs-01", site_only).await;
    assert_eq!((node.as_str(), status.as_str()), ("", "stale"));
    let m = r.mesh().await;
    let stale = m
        .placements
        .iter()
        .find(|p| p.twin_id == "c/cs-01")
        .unwrap();
    assert!(stale.reason.contains("site c"), "{}", stale.reason);
    let load: Vec<(&str, usize)> = m.load.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    assert_eq!(
        load,
        [("cloud", 1), ("edge-a1", 2), ("edge-a2", 2), ("edge-b1", 1)]
    );
}

#[tokio::test(start_paused = true)]
async fn mesh_refuses_replicas_of_an_older_epoch() {
    let r = rig(&[("edge-a", "a")], None).await;
    let id: TwinId = "a/sp-01".parse().unwrap();
    let placed = r.register(&id, AssetKind::Spindle).await;
    assert!(placed.epoch >= 1);
    r.twin("edge-a", &id).await;
    // A frame changes the state: the twin replicates it to the cloud.
    r.send_frame(&id, 1).await;
    let cloud = r.c.nodes["cloud"].store.clone();
    let (cl, i) = (&cloud, &id);
    eventually("the twin's own replica", || async move {
        cl.load_replica(i).unwrap().map(|_| ())
    })
    .await;
    // (Sent to the authority's actor: the proof's tag was checked on the fabric; the
    // sender it names is checked here.)
    let replica = |epoch, revision, from: &str| {
        let mut twin = cloud.load_replica(&id).unwrap().unwrap().twin.unwrap();
        twin.revision = revision;
        TwinSnapshot {
            twin: Some(twin),
            epoch,
            saved_ns: 0,
            node: from.into(),
            proof: Some(twinmesh_proto::v1::Proof {
                node: from.into(),
                tag: vec![1],
            }),
            site_only: false,
        }
    };
    // An owner of an older epoch may not overwrite the state, whatever its revision.
    r.mesh_ref()
        .cast(MeshMsg::Replica(replica(
            placed.epoch - 1,
            1_000_000,
            "edge-old",
        )))
        .unwrap();
    assert_eq!(r.mesh().await.fenced_replicas, 1);
    let kept = cloud.load_replica(&id).unwrap().unwrap();
    assert_eq!(kept.epoch, placed.epoch);
    assert_ne!(kept.node, "edge-old");
    // Nor may a node that is not the owner, at the current epoch or a future one.
    for epoch in [placed.epoch, placed.epoch + 1, u64::MAX] {
        r.mesh_ref()
            .cast(MeshMsg::Replica(replica(epoch, u64::MAX, "edge-old")))
            .unwrap();
    }
    r.mesh().await;
    let kept = cloud.load_replica(&id).unwrap().unwrap();
    assert_eq!(kept.epoch, placed.epoch);
    assert_ne!(kept.twin.unwrap().revision, u64::MAX);
    // The current owner's newer revision is kept.
    r.mesh_ref()
        .cast(MeshMsg::Replica(replica(placed.epoch, 1_000_000, "edge-a")))
        .unwrap();
    assert_eq!(r.mesh().await.fenced_replicas, 1);
    let kept = cloud.load_replica(&id).unwrap().unwrap();
    assert_eq!(
        (kept.epoch, kept.node.as_str(), kept.twin.unwrap().revision),
        (placed.epoch, "edge-a", 1_000_000)
    );
}

#[tokio::test(start_paused = true)]
async fn node_supervisor_gives_up_on_a_twin_that_keeps_failing() {
    let r = rig(&[("edge-a", "a")], None).await;
    let id: TwinId = "a/sp-01".parse().unwrap();
    r.register(&id, AssetKind::Spindle).await;
    let mut twin = r.twin("edge-a", &id).await;
    // Five failures within the window: restarted each time.
    for n in 1..=5 {
        twin.cast(TwinMsg::Fail(format!("injected failure {n}")))
            .unwrap();
        let failed = twin.get_id();
        let (rr, i) = (&r, &id);
        twin = eventually("the twin to be restarted", || async move {
            let t = rr.twin("edge-a", i).await;
            (t.get_id() != failed).then_some(t)
        })
        .await;
        let node = r.node("edge-a").await;
        assert_eq!(node.twins.len(), 1);
        assert_eq!(node.twins[0].restarts, n);
        assert!(node.twins[0].running);
    }
    // The sixth: given up, not restarted, not hosted any more.
    twin.cast(TwinMsg::Fail("injected failure 6".into()))
        .unwrap();
    let rr = &r;
    let node = eventually("the supervisor to give up", || async move {
        let n = rr.node("edge-a").await;
        (!n.given_up.is_empty()).then_some(n)
    })
    .await;
    assert_eq!(node.given_up, vec![id.to_string()]);
    assert!(node.twins.is_empty(), "{:?}", node.twins);
    // ... and it stays so (reconciliation with the authority does not bring it back).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let node = r.node("edge-a").await;
    assert!(node.twins.is_empty(), "{:?}", node.twins);
    let sup = r.c.nodes["edge-a"].supervisor().unwrap();
    assert!(ractor::call_t!(sup, NodeMsg::Lookup, 5000, id.clone())
        .unwrap()
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn gateway_truncates_its_spool_on_a_valid_watermark() {
    let net = Network::new(11, NetConfig::default());
    let obs = net.observer("observer");
    let mut c = SimCluster::new(net, 11);
    c.gateway_config = GatewayConfig {
        retain_frames: 2,
        ..GatewayConfig::default()
    };
    // Site-only data and no edge on its site: the twin is placed nowhere, so the only
    // watermarks the gateway sees are the test's.
    let id: TwinId = "a/cs-01".parse().unwrap();
    c.add(spec("cloud", Tier::Cloud, "cloud")).await.unwrap();
    c.add(NodeSpec {
        devices: vec![(id.clone(), AssetKind::CrankshaftLine)],
        ..spec("iot", Tier::Iot, "a")
    })
    .await
    .unwrap();
    let gw = c.nodes["iot"].gateway().unwrap();
    let store = c.nodes["iot"].store.clone();
    let signal = AssetKind::CrankshaftLine.schema().signals[0].name;
    let (gw, id, obs) = (&gw, &id, &obs);
    let status = || async move {
        ractor::call_t!(gw, GatewayMsg::Inspect, 5000)
            .unwrap()
            .into_iter()
            .find(|s| s.twin_id == id.to_string() && s.signal == signal)
    };
    eventually("six frames spooled", || async move {
        status().await.filter(|s| s.last_seq >= 6).map(|_| ())
    })
    .await;
    let mesh = c.nodes["cloud"].mesh().unwrap();
    let placed = eventually("the stale placement", || {
        let mesh = mesh.clone();
        async move {
            ractor::call_t!(mesh, MeshMsg::Get, 5000, id.clone())
                .unwrap()
                .filter(|p| p.status == "stale")
        }
    })
    .await;
    assert_eq!(store.spool_first(id, signal).unwrap(), Some(1));

    // Watermarks proven as an edge of the site would (the observer holds its keys);
    // `forge` sends one without, as anyone on the fabric could.
    let edge =
        twinmesh_sim::mesh::cluster::sim_trust(&spec("edge-a", Tier::Edge, "a"), &["a".to_owned()]);
    let edge = &edge;
    let send = |seq: u64, epoch: u64, proven: bool| async move {
        let mut wm = Watermark {
            twin_id: id.to_string(),
            signal: signal.into(),
            seq,
            epoch,
            proof: None,
        };
        if proven {
            assert!(edge.prove("a", &mut wm));
        }
        obs.publish(
            &keys::acks(id),
            Bytes::from(wm.encode_to_vec()),
            <twinmesh_proto::v1::Watermark as twinmesh_proto::Wire>::ENCODING,
            Qos::Reliable,
        )
        .await
        .unwrap();
    };
    let ack = |seq: u64, epoch: u64| send(seq, epoch, true);
    let acked = |seq: u64, what: &'static str| {
        eventually(what, move || async move {
            status().await.filter(|s| s.acked == seq)
        })
    };
    // Acknowledged up to 5: all but the last `retain_frames` of them go.
    let epoch = placed.epoch + 1;
    ack(5, epoch).await;
    let s = acked(5, "the acknowledgement").await;
    assert_eq!(s.spool_base, 4);
    assert_eq!(store.spool_first(id, signal).unwrap(), Some(4));
    // A watermark of an older owner (fenced) moves nothing; the next valid one, which
    // comes after it on the same link, does.
    ack(9, epoch - 1).await;
    ack(6, epoch).await;
    let s = acked(6, "the valid acknowledgement").await;
    assert_eq!(s.spool_base, 5);
    assert_eq!(store.spool_first(id, signal).unwrap(), Some(5));
    // A forged watermark past every frame sent (far past, and the largest seq) neither
    // truncates the spool nor stops the gateway; the next valid one still counts.
    let s = eventually("frame 7 sent", || async move {
        status().await.filter(|s| s.last_seq >= 7)
    })
    .await;
    ack(s.last_seq + 1_000_000, epoch).await;
    ack(u64::MAX, epoch).await;
    ack(7, epoch).await;
    let s = acked(7, "the valid acknowledgement after the forged ones").await;
    assert_eq!(s.spool_base, 6);
    assert_eq!(store.spool_first(id, signal).unwrap(), Some(6));
    // Without a proof under the site's control key: neither a valid-looking watermark
    // nor one of the highest epoch (which would fence out every real one) counts.
    eventually("frame 8 sent", || async move {
        status().await.filter(|s| s.last_seq >= 8)
    })
    .await;
    send(8, epoch, false).await;
    send(8, u64::MAX, false).await;
    ack(8, epoch).await;
    let s = acked(8, "the proven acknowledgement after the unproven ones").await;
    assert_eq!(s.spool_base, 7);
    let malformed = c.nodes["iot"].ctx().map(|ctx| {
        ctx.metrics
            .messages_malformed
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    assert!(malformed >= Some(2), "{malformed:?}");
}

/// A gateway publishes at most `window` frames past the last acknowledged one; the rest
/// wait in its spool and go out as acknowledgements come back, in order, none skipped.
/// (Without the window a device's burst overflowed the twin's ingest queue: frames were
/// dropped and re-sent a second later, ~300 samples/s from an MQTT broker.)
#[tokio::test(start_paused = true)]
async fn gateway_keeps_at_most_its_window_of_frames_unacknowledged() {
    let net = Network::new(12, NetConfig::default());
    let obs = net.observer("observer");
    let mut c = SimCluster::new(net, 12);
    c.gateway_config = GatewayConfig {
        window: 4,
        ..GatewayConfig::default()
    };
    // Public signals (published readable: the simulated gateway holds no site key to
    // seal with) and no placement authority: no twin exists, only the test acknowledges.
    let id: TwinId = "a/sp-01".parse().unwrap();
    c.add(NodeSpec {
        devices: vec![(id.clone(), AssetKind::Spindle)],
        ..spec("iot", Tier::Iot, "a")
    })
    .await
    .unwrap();
    let signal = AssetKind::Spindle.schema().signals[0].name;
    let frames = obs
        .subscribe(&keys::telemetry(&id, signal), 100_000)
        .await
        .unwrap();
    let gw = c.nodes["iot"].gateway().unwrap();
    let (gw, idr) = (&gw, &id);
    let status = || async move {
        ractor::call_t!(gw, GatewayMsg::Inspect, 5000)
            .unwrap()
            .into_iter()
            .find(|s| s.twin_id == idr.to_string() && s.signal == signal)
    };
    let published = |rx: &flume::Receiver<twinmesh_actors::ports::Sample>| {
        rx.drain()
            .map(|s| TelemetryFrame::decode(s.payload).unwrap().seq)
            .collect::<Vec<u64>>()
    };
    // Many more frames spooled than the window: only seqs 1..=4 were ever sent (some
    // of them again, as resends).
    eventually("twelve frames spooled", || async move {
        status().await.filter(|s| s.last_seq >= 12).map(|_| ())
    })
    .await;
    let seen = published(&frames.rx);
    assert!(!seen.is_empty(), "nothing published");
    assert!(seen.iter().all(|&q| (1..=4).contains(&q)), "{seen:?}");
    assert!((1..=4).all(|q| seen.contains(&q)), "{seen:?}");

    let edge =
        twinmesh_sim::mesh::cluster::sim_trust(&spec("edge-a", Tier::Edge, "a"), &["a".to_owned()]);
    let mut wm = Watermark {
        twin_id: id.to_string(),
        signal: signal.into(),
        seq: 3,
        epoch: 1,
        proof: None,
    };
    assert!(edge.prove("a", &mut wm));
    obs.publish(
        &keys::acks(&id),
        Bytes::from(wm.encode_to_vec()),
        <twinmesh_proto::v1::Watermark as twinmesh_proto::Wire>::ENCODING,
        Qos::Reliable,
    )
    .await
    .unwrap();
    // Acknowledged up to 3: the window moves to 4..=7, and 5, 6, 7 go out at once.
    let mut more: Vec<u64> = Vec::new();
    let start = tokio::time::Instant::now();
    while !(5..=7).all(|q| more.contains(&q)) {
        assert!(
            start.elapsed() < WAIT,
            "frames 5..=7 not published: {more:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        more.extend(published(&frames.rx));
    }
    tokio::time::sleep(QUIET).await;
    more.extend(published(&frames.rx));
    assert!(more.iter().all(|&q| (4..=7).contains(&q)), "{more:?}");
    assert_eq!(
        frames.dropped.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the observer missed frames"
    );
}

/// A gateway killed mid-block restarts with a hole in its numbering (the rest of the
/// block it had reserved, and frames spooled but not flushed). Its frames say the hole
/// is gone once the twin has everything before it, so the stream goes on; before, the
/// twin waited for the missing numbers forever.
#[tokio::test(start_paused = true)]
async fn a_gateway_killed_mid_block_goes_on_past_the_numbers_it_lost() {
    let mut r = rig(&[("edge-a", "a")], None).await;
    let id: TwinId = "a/sp-01".parse().unwrap();
    r.c.add(NodeSpec {
        devices: vec![(id.clone(), AssetKind::Spindle)],
        ..spec("iot", Tier::Iot, "a")
    })
    .await
    .unwrap();
    let status = |r: &Rig| {
        let gw = r.c.nodes["iot"].gateway().unwrap();
        let id = id.clone();
        async move {
            ractor::call_t!(gw, GatewayMsg::Inspect, 5000)
                .unwrap()
                .into_iter()
                .find(|s| s.twin_id == id.to_string() && s.signal == SIGNAL)
        }
    };
    let rr = &r;
    let before = eventually("frames acknowledged", || async move {
        status(rr).await.filter(|s| s.acked >= 10)
    })
    .await;
    let block = GatewayConfig::default().seq_block;
    assert!(before.last_seq < block, "{before:?}");

    r.c.kill("iot").await;
    r.c.start("iot").await.unwrap();
    let rr = &r;
    let after = eventually("frames past the lost numbers acknowledged", || async move {
        status(rr).await.filter(|s| s.acked > block + 5)
    })
    .await;
    assert!(after.last_seq > block, "{after:?}");
    // The twin counts the skipped numbers as lost and applies what comes after them.
    let owner = placement_of(&r, &id).await.node;
    let twin = r.twin(&owner, &id).await;
    assert!(applied(&twin).await > block + 5);
}

/// The simulation's nodes are the production assembly: a cloud node archives the feature
/// sets that ask for it, serves its model registry on the fabric, and every node
/// publishes its load.
#[tokio::test(start_paused = true)]
async fn the_cloud_node_archives_features_and_serves_its_registry() {
    let r = rig(&[("edge-a", "a")], None).await;
    let obs = &r.obs;
    let load = obs
        .subscribe(&keys::node_load(&"edge-a".parse().unwrap()), 8)
        .await
        .unwrap();
    let twin: TwinId = "a/pm-01".parse().unwrap();
    let set = |archive: bool, end_s: i64, v: f64| proto::FeatureSet {
        twin_id: twin.to_string(),
        signal: "voltage".into(),
        window_start_ns: (end_s - 1) * 1_000_000_000,
        window_end_ns: end_s * 1_000_000_000,
        features: [
            ("voltage.rms".to_owned(), v),
            ("voltage.thd".to_owned(), f64::NAN),
        ]
        .into_iter()
        .collect(),
        epoch: 1,
        archive,
    };
    for s in [
        set(true, 10, 230.5),
        set(false, 11, 231.0),
        set(true, 12, 229.5),
    ] {
        obs.publish(
            &keys::twin_features(&twin),
            Bytes::from(s.encode_to_vec()),
            <twinmesh_proto::v1::FeatureSet as twinmesh_proto::Wire>::ENCODING,
            Qos::Reliable,
        )
        .await
        .unwrap();
    }
    let cloud = r.c.nodes["cloud"].store.clone();
    let points = eventually("the archived features", || {
        let cloud = cloud.clone();
        let twin = twin.clone();
        async move {
            let p = cloud
                .read_points(&twin, "voltage.rms", 0, i64::MAX)
                .unwrap();
            (p.len() >= 2).then_some(p)
        }
    })
    .await;
    // Only the sets that ask for it, only finite values.
    assert_eq!(points, [(10_000_000_000, 230.5), (12_000_000_000, 229.5)]);
    assert!(cloud
        .read_points(&twin, "voltage.thd", 0, i64::MAX)
        .unwrap()
        .is_empty());
    assert!(r.c.nodes["edge-a"].registry().is_none());

    let registry = r.c.nodes["cloud"]
        .registry()
        .expect("cloud registry")
        .clone();
    let record = proto::ModelRecord {
        info: Some(proto::ModelInfo {
            model_id: "pm".into(),
            ..Default::default()
        }),
        model: vec![1, 2, 3],
    };
    assert_eq!(registry.add(record).unwrap().version, 1);
    let replies = obs
        .query(&keys::model("pm", 1), None, Duration::from_secs(2))
        .await
        .unwrap();
    let got: Vec<proto::ModelRecord> = replies
        .into_iter()
        .filter_map(|r| proto::ModelRecord::decode(r.payload).ok())
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].model, [1, 2, 3]);
    assert_eq!(got[0].info.as_ref().unwrap().version, 1);
    assert!(obs
        .query(&keys::model("pm", 2), None, Duration::from_secs(2))
        .await
        .unwrap()
        .is_empty());

    let sample = tokio::time::timeout(WAIT, load.rx.recv_async())
        .await
        .expect("a load report")
        .unwrap();
    let l = proto::NodeLoad::decode(sample.payload).unwrap();
    assert_eq!(l.node, "edge-a");
    // A clean stop of the whole mesh, as production stops a node.
    let mut r = r;
    r.c.shutdown().await;
    assert!(!r.c.is_up("cloud"));
}

#[tokio::test(start_paused = true)]
async fn router_answers_a_repeated_get_twin_until_the_twin_changes() {
    let r = rig(&[("edge-a", "a")], Some(IDLE)).await;
    let (id, acks) = r.spindle().await;
    let metrics = r.c.nodes["edge-a"].ctx().unwrap().metrics.clone();
    let cached = || twinmesh_actors::metrics::NodeMetrics::get(&metrics.rpc_cached);
    let get = || {
        r.call(
            &id,
            twin_request::Request::GetTwin(GetTwinRequest {
                twin_id: id.to_string(),
            }),
        )
    };
    let twin = |reply: twin_reply::Reply| match reply {
        twin_reply::Reply::Twin(t) => t,
        other => panic!("get twin answered {other:?}"),
    };

    // The twin answers the first call after a frame (which changed it: the call sees
    // the frame); the router the same call again.
    for seq in 1..=2 {
        r.send_frame(&id, seq).await;
        ack_at_least(&acks, seq, WAIT)
            .await
            .expect("frame acknowledged");
        assert_eq!(twin(get().await).reported[SIGNAL].seq, seq);
        assert_eq!(cached(), seq - 1);
        assert_eq!(twin(get().await).reported[SIGNAL].seq, seq);
        assert_eq!(cached(), seq);
    }

    // A twin polled often is served mostly by the router (its ticks empty the cache
    // now and then) and stays awake: calls answered from the cache count as activity.
    let before = cached();
    for _ in 0..60 {
        tokio::time::sleep(IDLE / 20).await;
        assert_eq!(twin(get().await).reported[SIGNAL].seq, 2);
    }
    assert!(
        cached() - before >= 30,
        "{} of 60 calls answered from the cache",
        cached() - before
    );
    let passivated = || twinmesh_actors::metrics::NodeMetrics::get(&metrics.twins_passivated);
    assert_eq!(passivated(), 0);
    // Left alone, it sleeps.
    until_dormant(&r, "edge-a", &id).await;
    assert_eq!(passivated(), 1);

    // A set-point (which wakes it) changes it too.
    let before = cached();
    let set = twin_request::Request::SetDesired(SetDesiredRequest {
        twin_id: id.to_string(),
        property: "speed_override".into(),
        value: 90.0,
        expected_revision: None,
    });
    assert!(matches!(
        r.call(&id, set).await,
        twin_reply::Reply::SetDesired(_)
    ));
    assert_eq!(twin(get().await).desired["speed_override"].value, 90.0);
    assert_eq!(cached(), before);
}

#[tokio::test(start_paused = true)]
async fn an_idle_twin_on_an_edge_holds_no_task() {
    let r = rig(&[("edge-a", "a")], None).await;
    let ctx = r.c.nodes["edge-a"].ctx().unwrap().clone();
    tokio::time::sleep(QUIET).await;
    let before = ctx.tasks.len();
    let (id, acks) = r.spindle().await;
    // A frame starts the twin's task; done, it ends: the node runs the tasks it ran
    // before the twin came.
    r.send_frame(&id, 1).await;
    ack_at_least(&acks, 1, WAIT)
        .await
        .expect("frame 1 acknowledged");
    let c = &ctx;
    eventually("the twin's task to end", || async move {
        (c.tasks.len() == before).then_some(())
    })
    .await;
    // And the next frame starts it again.
    r.send_frame(&id, 2).await;
    let wm = ack_at_least(&acks, 2, WAIT)
        .await
        .expect("frame 2 acknowledged");
    assert_eq!(wm.seq, 2);
}

/// The placement of `id` as the authority holds it.
async fn placement_of(r: &Rig, id: &TwinId) -> Placement {
    r.mesh()
        .await
        .placements
        .into_iter()
        .find(|p| p.twin_id == id.to_string())
        .expect("placed")
}

#[tokio::test(start_paused = true)]
async fn placement_authority_is_restarted_after_a_store_failure_and_places_on() {
    let mut r = rig(&[], None).await;
    // Site-only data and no edge on its site yet: stale until one joins.
    let id: TwinId = "a/cs-01".parse().unwrap();
    assert_eq!(
        r.register(&id, AssetKind::CrankshaftLine).await.status,
        "stale"
    );
    let cloud = r.c.nodes["cloud"].assembly().unwrap();
    let (health, kept) = (cloud.health.clone(), cloud.mesh.clone().unwrap());
    let first = r.mesh_ref();
    assert!(health.is_serving());
    let mut changes = health.subscribe();
    // The join places the twin: that write fails, and the authority with it.
    let store = r.c.nodes["cloud"].store.clone();
    store.fail_placement_saves(1);
    r.c.add(spec("edge-a", Tier::Edge, "a")).await.unwrap();
    tokio::time::timeout(
        WAIT,
        changes.wait_for(|d| d.contains("placement authority")),
    )
    .await
    .expect("health goes down while the authority is down")
    .unwrap();
    assert!(!health.is_serving());
    assert_eq!(
        store.placement_saves_to_fail(),
        0,
        "the injected failure was hit"
    );
    let next = kept
        .restarted(&first, WAIT)
        .await
        .expect("the authority is restarted");
    tokio::time::timeout(WAIT, changes.wait_for(|d| d.is_empty()))
        .await
        .expect("health comes back")
        .unwrap();
    assert!(health.is_serving());
    assert_ne!(next.get_id(), first.get_id());
    // The restarted authority took its placements from the store and places on.
    let rr = &r;
    let i = &id;
    let placed = eventually("the twin placed on the edge that joined", || async move {
        let p = placement_of(rr, i).await;
        (p.status == "active").then_some(p)
    })
    .await;
    assert_eq!(placed.node, "edge-a");
    assert_eq!(placed.epoch, 1, "{placed:?}");
    r.twin("edge-a", &id).await;
    let k = ractor::call_t!(
        kept.keeper(),
        twinmesh_actors::keeper::KeeperMsg::Inspect,
        5000
    )
    .unwrap();
    assert_eq!((k.up, k.restarts, k.given_up), (true, 1, false));
    // The durable record agrees.
    let stored = twinmesh_actors::ports::PlacementStore::placements(&*store).unwrap();
    let stored = stored.iter().find(|p| p.twin_id == id.to_string()).unwrap();
    assert_eq!(
        (stored.node.as_str(), stored.epoch),
        ("edge-a", placed.epoch)
    );
}

#[tokio::test(start_paused = true)]
async fn a_freeze_expires_and_a_late_commit_is_refused() {
    let r = rig(&[("edge-a", "a"), ("edge-b", "a")], None).await;
    let (id, acks) = r.spindle().await;
    let placed = placement_of(&r, &id).await;
    assert_eq!(placed.node, "edge-a");
    r.send_frame(&id, 1).await;
    ack_at_least(&acks, 1, WAIT)
        .await
        .expect("frame 1 acknowledged");

    // A migration freezes the twin for 3 s, and its commit does not come in time.
    let timeout = Duration::from_secs(3);
    let frozen_at = tokio::time::Instant::now();
    let freeze = twin_request::Request::Freeze(FreezeRequest {
        twin_id: id.to_string(),
        epoch: placed.epoch,
        release: false,
        timeout_ms: timeout.as_millis() as u64,
    });
    assert!(matches!(
        r.call(&id, freeze).await,
        twin_reply::Reply::Snapshot(_)
    ));
    r.send_frame(&id, 2).await;
    assert_eq!(ack_at_least(&acks, 2, Duration::from_secs(1)).await, None);
    // The twin unfreezes itself: the re-sent frame is applied and acknowledged, by the
    // same owner at the same epoch.
    let (rr, i, a) = (&r, &id, &acks);
    let wm = eventually("the twin to unfreeze and acknowledge", || async move {
        rr.send_frame(i, 2).await;
        ack_at_least(a, 2, Duration::from_millis(500)).await
    })
    .await;
    assert!(frozen_at.elapsed() >= timeout, "{:?}", frozen_at.elapsed());
    assert_eq!((wm.seq, wm.epoch), (2, placed.epoch));

    // The late commit is refused: the twin stays where it is, at its epoch.
    let target = r
        .mesh()
        .await
        .members
        .into_iter()
        .find(|n| n.node == "edge-b")
        .unwrap();
    let late = ractor::call_t!(
        r.mesh_ref(),
        |reply| MeshMsg::CommitMove {
            twin: id.clone(),
            node: target,
            epoch: placed.epoch,
            deadline: frozen_at + timeout,
            pin: true,
            reply,
        },
        5000
    )
    .unwrap();
    let err = late.expect_err("a commit after the freeze expired");
    assert!(err.to_string().contains("expired"), "{err}");
    let now = placement_of(&r, &id).await;
    assert_eq!(
        (now.node.as_str(), now.epoch, now.pinned),
        ("edge-a", placed.epoch, false)
    );
    assert!(r.node("edge-b").await.twins.is_empty());
    r.send_frame(&id, 3).await;
    let wm = ack_at_least(&acks, 3, WAIT)
        .await
        .expect("frame 3 acknowledged");
    assert_eq!(wm.epoch, placed.epoch);
}

#[tokio::test(start_paused = true)]
async fn an_operators_move_pins_the_twin_against_rebalancing() {
    let mut r = rig(&[("edge-a1", "a"), ("edge-a2", "a")], None).await;
    let (one, two): (TwinId, TwinId) = ("a/sp-01".parse().unwrap(), "a/sp-02".parse().unwrap());
    // sp-02 first: it goes to edge-a1, sp-01 to edge-a2.
    assert_eq!(r.register(&two, AssetKind::Spindle).await.node, "edge-a1");
    assert_eq!(r.register(&one, AssetKind::Spindle).await.node, "edge-a2");
    r.twin("edge-a1", &two).await;
    r.twin("edge-a2", &one).await;
    // The operator moves sp-01 next to sp-02: pinned there.
    let ctx = r.c.nodes["cloud"].ctx().unwrap().clone();
    let moved = twinmesh_actors::mesh::migrate(
        &r.mesh_ref(),
        &ctx,
        one.clone(),
        "edge-a1".into(),
        String::new(),
        true,
    )
    .await
    .unwrap()
    .placement
    .unwrap();
    assert_eq!((moved.node.as_str(), moved.pinned), ("edge-a1", true));
    // A new edge joins: rebalancing moves one twin off edge-a1 (two there, none on the
    // others), and never the pinned one (which comes first in twin order).
    r.c.add(spec("edge-a3", Tier::Edge, "a")).await.unwrap();
    let (rr, t) = (&r, &two);
    let away = eventually("rebalancing to move the unpinned twin", || async move {
        let p = placement_of(rr, t).await;
        (p.node != "edge-a1").then_some(p)
    })
    .await;
    assert!(!away.pinned);
    tokio::time::sleep(QUIET).await;
    let pinned = placement_of(&r, &one).await;
    assert_eq!(
        (pinned.node.as_str(), pinned.epoch, pinned.pinned),
        ("edge-a1", moved.epoch, true)
    );
    // The operator unpins it: it stays, unpinned (durably).
    let reply = twinmesh_actors::mesh::ask_authority(
        &r.obs,
        &r.trust,
        proto::Caller {
            role: "data_manager".into(),
            ..Default::default()
        },
        proto::mesh_request::Request::Migrate(proto::MigrateTwinRequest {
            twin_id: one.to_string(),
            unpin: true,
            ..Default::default()
        }),
        Duration::from_secs(10),
        twinmesh_actors::ports::Clock::now_ns(&*r.c.clock) / 1_000_000,
    )
    .await
    .unwrap();
    let proto::mesh_reply::Reply::Migrate(m) = reply else {
        panic!("unpin answered {reply:?}")
    };
    let p = m.placement.unwrap();
    assert_eq!(
        (p.node.as_str(), p.epoch, p.pinned),
        ("edge-a1", moved.epoch, false)
    );
    assert!(!placement_of(&r, &one).await.pinned);
}

#[tokio::test(start_paused = true)]
async fn a_twin_made_personal_never_fails_over_to_the_cloud() {
    let mut r = rig(&[("edge-a", "a")], None).await;
    let (id, _acks) = r.spindle().await;
    let twin = r.twin("edge-a", &id).await;
    // A public kind: the cloud may host it by default. Its owner makes the signal personal.
    let owner = proto::Caller {
        site: "a".into(),
        role: "data_owner".into(),
        subject: "owner".into(),
        ..Default::default()
    };
    let ask = |request| {
        let twin = twin.clone();
        let caller = owner.clone();
        async move {
            ractor::call_t!(
                twin,
                TwinMsg::Request,
                5000,
                TwinRequest {
                    caller: Some(caller),
                    request: Some(request),
                }
            )
            .unwrap()
            .reply
            .unwrap()
        }
    };
    let twin_reply::Reply::Policy(mut policy) =
        ask(twin_request::Request::GetPolicy(proto::GetPolicyRequest {
            twin_id: id.to_string(),
        }))
        .await
    else {
        panic!("no policy")
    };
    let signal = policy.signals.get_mut(SIGNAL).unwrap();
    signal.sensitivity = proto::Sensitivity::Personal as i32;
    signal.mechanism = "dp".into();
    let set = ask(twin_request::Request::SetPolicy(proto::SetPolicyRequest {
        policy: Some(policy),
        expected_version: None,
    }))
    .await;
    assert!(matches!(set, twin_reply::Reply::Policy(_)), "{set:?}");
    // The authority learns it from the twin's replica, and keeps it with the placement.
    let (rr, i) = (&r, &id);
    eventually("the placement to follow the policy", || async move {
        placement_of(rr, i).await.site_only.then_some(())
    })
    .await;
    let before = placement_of(&r, &id).await;
    // Its edge dies: no failover to the cloud, stale with the reason.
    r.c.kill("edge-a").await;
    let (rr, i) = (&r, &id);
    let stale = eventually("the failover", || async move {
        let p = placement_of(rr, i).await;
        (p.epoch > before.epoch).then_some(p)
    })
    .await;
    assert_eq!(
        (stale.status.as_str(), stale.node.as_str()),
        ("stale", ""),
        "{stale:?}"
    );
    assert!(
        stale.reason.contains("policy keeps raw data on site a"),
        "{}",
        stale.reason
    );
    assert!(r.node("cloud").await.twins.is_empty());
    let stored =
        twinmesh_actors::ports::PlacementStore::placements(&*r.c.nodes["cloud"].store).unwrap();
    assert!(stored
        .iter()
        .any(|p| p.twin_id == id.to_string() && p.site_only));
}

/// A Thing Model in a registration defines a kind on the authority, which keeps it with
/// its placements and places the twin by the model's sensitivities (a personal signal:
/// the site's edge, never the cloud); a conflicting definition, or one of a built-in
/// name, is refused and changes nothing.
#[tokio::test(start_paused = true)]
async fn a_registration_brings_its_kind_and_cannot_redefine_one() {
    let r = rig(&[("edge-a", "a")], None).await;
    let text = include_str!("../../examples/models/compressor.tm.json")
        .replace("\"compressor\"", "\"sim_compressor\"");
    assert!(text.contains("\"twinmesh:kind\": \"sim_compressor\""));
    let ask = |twin: &str, kind: &str, thing_model: String| {
        let req = PlacementRequest {
            twin_id: twin.into(),
            kind: kind.into(),
            gateway: "test".into(),
            chain: None,
            thing_model,
            proof: None,
        };
        let mesh = r.mesh_ref();
        async move { ractor::call_t!(mesh, MeshMsg::Register, 5000, req).unwrap() }
    };
    let placed = ask("a/comp-01", "sim_compressor", text.clone())
        .await
        .unwrap();
    assert_eq!(
        (placed.kind.as_str(), placed.node.as_str()),
        ("sim_compressor", "edge-a")
    );
    r.twin("edge-a", &"a/comp-01".parse().unwrap()).await;
    let kept = r.c.nodes["cloud"].store.kinds().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].kind.as_str(), kept[0].site.as_str()),
        ("sim_compressor", "a")
    );
    assert_eq!(kept[0].thing_model, text);

    // Another site's gateway makes the personal signal public: refused.
    let public = text.replace(
        "\"twinmesh:sensitivity\": \"personal\"",
        "\"twinmesh:sensitivity\": \"public\"",
    );
    assert_ne!(public, text);
    let e = ask("b/comp-01", "sim_compressor", public.clone())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("kind sim_compressor is already defined differently (by fabric (site a))"),
        "{e}"
    );
    // Even for a twin already placed.
    assert!(ask("a/comp-01", "sim_compressor", public).await.is_err());
    // A built-in name.
    let pm = text.replace("\"sim_compressor\"", "\"power_meter\"");
    let e = ask("a/pm-77", "power_meter", pm).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("kind power_meter is built in and cannot be redefined"),
        "{e}"
    );
    // A model that names another kind than the registration.
    let e = ask("a/comp-02", "other_kind", text.clone())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("the registration names other_kind"),
        "{e}"
    );
    let snap = r.mesh().await;
    let ids: Vec<_> = snap.placements.iter().map(|p| p.twin_id.as_str()).collect();
    assert_eq!(ids, ["a/comp-01"]);
    assert_eq!(
        "sim_compressor"
            .parse::<AssetKind>()
            .unwrap()
            .schema()
            .signal("operator_badges")
            .unwrap()
            .sensitivity,
        twinmesh_twins::kind::Sensitivity::Personal
    );
    assert_eq!(r.c.nodes["cloud"].store.kinds().unwrap().len(), 1);
}

/// A gateway's asset of a kind from its models folder: its registration carries the
/// Thing Model, the authority learns and keeps the kind, and the site's edge hosts the
/// twin with the model's schema and default chain.
#[tokio::test(start_paused = true)]
async fn a_gateway_asset_of_a_custom_kind_is_registered_with_its_model() {
    let text = include_str!("../../examples/models/compressor.tm.json")
        .replace("\"compressor\"", "\"gw_compressor\"");
    // What the gateway's `--models` folder did in its process.
    let kind = twinmesh_twins::kind::register_text(
        &text,
        "models/gw.tm.json",
        twinmesh_twins::kind::KindSource::File("models/gw.tm.json".into()),
    )
    .unwrap();
    let mut r = rig(&[("edge-a", "a")], None).await;
    let id: TwinId = "a/comp-01".parse().unwrap();
    r.c.add(NodeSpec {
        devices: vec![(id.clone(), kind)],
        ..spec("iot", Tier::Iot, "a")
    })
    .await
    .unwrap();
    let twin = r.twin("edge-a", &id).await;
    let snap = r.mesh().await;
    let p = snap
        .placements
        .iter()
        .find(|p| p.twin_id == id.to_string())
        .expect("placed");
    assert_eq!(
        (p.kind.as_str(), p.node.as_str()),
        ("gw_compressor", "edge-a")
    );
    let kept = r.c.nodes["cloud"].store.kinds().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].kind.as_str(), kept[0].site.as_str()),
        ("gw_compressor", "a")
    );
    assert_eq!(kept[0].thing_model, text);
    let state = ractor::call_t!(twin, TwinMsg::Inspect, 5000).unwrap();
    assert_eq!(state.kind, "gw_compressor");
    let chain = state.chain.expect("the twin's chain");
    let ops: Vec<_> = chain.stages.iter().map(|s| s.op.as_str()).collect();
    assert_eq!(ops, ["stats", "stats", "archive"]);
}

/// A node learns a kind only from a definition proven under the mesh key: a gateway
/// (which holds its site's control key, not the mesh key) answering
/// `twinmesh/kinds/{kind}` with a model of its own teaches nothing; a mesh node's answer
/// is registered and kept.
#[tokio::test(start_paused = true)]
async fn a_kind_is_learned_only_from_a_mesh_nodes_proof() {
    use twinmesh_twins::proto::KindModel;
    let r = rig(&[("edge-a", "a")], None).await;
    let sites = ["a".to_owned()];
    let gateway = twinmesh_sim::mesh::cluster::sim_trust(&spec("iot-a", Tier::Iot, "a"), &sites);
    let mesh_node =
        twinmesh_sim::mesh::cluster::sim_trust(&spec("edge-z", Tier::Edge, "a"), &sites);
    let model = |name: &str| {
        include_str!("../../examples/models/compressor.tm.json")
            .replace("\"compressor\"", &format!("\"{name}\""))
    };
    let queries = r.obs.queryable("twinmesh/kinds/*", 16).await.unwrap();
    let answering = tokio::spawn(async move {
        while let Ok(q) = queries.rx.recv_async().await {
            let name = keys::parse_kind_model(&q.key).unwrap().to_owned();
            let mut m = KindModel {
                kind: name.clone(),
                thing_model: model(&name),
                site: "a".into(),
                proof: None,
            };
            if name == "forged_kind" {
                assert!(gateway.prove("a", &mut m));
            } else {
                assert!(mesh_node.prove_mesh(&mut m));
            }
            q.reply_with(&keys::kind_model(&name), &m);
        }
    });
    let ctx = r.c.nodes["edge-a"].ctx().expect("edge is up").clone();
    let e = twinmesh_actors::kinds::resolve(&ctx, "forged_kind")
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "unknown asset kind \"forged_kind\"");
    assert!(twinmesh_twins::kind::lookup("forged_kind").is_none());
    assert!(r.c.nodes["edge-a"].store.kinds().unwrap().is_empty());

    let k = twinmesh_actors::kinds::resolve(&ctx, "relayed_kind")
        .await
        .unwrap();
    assert_eq!(k.as_str(), "relayed_kind");
    assert_eq!(
        k.schema().source,
        twinmesh_twins::kind::KindSource::Fabric { site: "a".into() }
    );
    let kept = r.c.nodes["edge-a"].store.kinds().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].thing_model, model("relayed_kind"));
    answering.abort();
}
