//! End-to-end tests of a mesh whose nodes reach each other only through Zenoh routers
//! (issue 21, point 3): every node listens nowhere and connects only to a router process
//! (`twinmesh router`, a real Zenoh session in router mode), so nothing but the routers
//! can carry liveliness, placements, telemetry, RPCs, acks and failover between them.
//!
//! Nodes run with `--mode router`: Zenoh routers do not forward between the peers
//! connected to them (the failure the issue reports), which
//! `a_peer_mode_node_behind_a_router_is_told_to_run_in_router_mode` pins down as the
//! warning a peer-mode node and its router print. The last test joins a node to
//! `twinmesh up` through up's own Zenoh endpoint (up's nodes are routers).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use prost::Message;

use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_proto::v1::{
    DeliveryStatus, GetTwinRequest, ListNodesRequest, SetDesiredRequest, Twin, TwinSnapshot,
    TwinState, Watermark,
};
use twinmesh_tests::{
    args, eventually, get_twin, mesh_client, recv_until, routed_node_args, set_desired, site_key,
    tls_args, zenoh_client, zenoh_tls_client, NodeProc, ANY_PORT,
};

const WAIT: Duration = Duration::from_secs(60);
const TWIN: &str = "site-a/wt-01";

fn vib_seq(t: &Twin) -> u64 {
    t.reported.get("bearing_vibration").map_or(0, |v| v.seq)
}

/// A router process named `name` listening on any loopback port, connected to
/// `connect` (other routers).
fn start_router(dir: &Path, name: &str, connect: &[&str]) -> NodeProc {
    let mut a = args(["--id", name, "--listen", ANY_PORT, "--lease-ms", "1000"]);
    for c in connect {
        a.extend(args(["--connect", c]));
    }
    let router = NodeProc::start_router(&a, &dir.join("logs"), name).unwrap();
    assert_eq!(router.ready.zenoh.len(), 1, "{:?}", router.ready);
    router
}

/// A node in Zenoh mode `mode` that listens nowhere and connects only to `router`.
fn start_node(
    dir: &Path,
    node: (&str, &str, Option<&str>),
    mode: &str,
    router: &NodeProc,
    extra: &[&str],
) -> NodeProc {
    let (tier, id, site) = node;
    let data = dir.join(id).display().to_string();
    let mut a = routed_node_args(node, mode, &[&router.ready.zenoh[0]], &data);
    a.extend(args(["--lease-ms", "1000"]));
    if let (Some(site), true) = (site, tier != "cloud") {
        a.extend(["--site-key".to_owned(), site_key(dir, site).unwrap()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    let n = NodeProc::start(&a, &dir.join("logs"), id).unwrap();
    assert!(
        n.ready.zenoh.is_empty(),
        "{id} must listen nowhere (no direct path to it): {:?}",
        n.ready.zenoh
    );
    n
}

/// Every node the cloud lists, by name.
async fn listed_nodes(cloud: &str) -> Option<BTreeSet<String>> {
    let nodes = mesh_client(cloud)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .ok()?
        .into_inner()
        .nodes;
    Some(nodes.into_iter().map(|n| n.node).collect())
}

/// What a mesh through routers must do, asked through the cloud's gRPC and a Zenoh
/// client of `router`: every node listed (liveliness and node infos), the twin streaming
/// on one of `edges`, the gateway's spool drained by acks, a set-point from the cloud
/// delivered to the twin and its device, then `kill -9` of the twin's edge and the twin
/// serving from the other edge at a newer epoch with its state and every frame.
async fn assert_mesh_and_failover(
    cloud: &str,
    router: &NodeProc,
    all_nodes: &[&str],
    edges: [&str; 2],
    mut kill9: impl FnMut(&str),
) {
    let expected: BTreeSet<String> = all_nodes.iter().map(|s| s.to_string()).collect();
    eventually(WAIT, "every node listed by the cloud", || async {
        let listed = listed_nodes(cloud).await?;
        expected.is_subset(&listed).then_some(())
    })
    .await;

    // Telemetry reaches a twin on an edge, and GetTwin through the cloud (an RPC to the
    // twin's queryable on that edge) returns it.
    let before = eventually(
        WAIT,
        "the twin streaming, read through the cloud",
        || async {
            let t = get_twin(cloud, TWIN).await.ok()?;
            (vib_seq(&t) >= 10).then_some(t)
        },
    )
    .await;
    let p0 = before.placement.clone().unwrap();
    assert!(edges.contains(&p0.node.as_str()), "placed on {p0:?}");
    let survivor = edges.into_iter().find(|e| *e != p0.node).unwrap();

    // Acks flow back through the routers: the twin's watermarks pass, and the gateway,
    // which re-sends every unacknowledged frame of a stream each second, re-sends next
    // to nothing: without acks every frame would come back as a duplicate, again each
    // second. (An ack later than a second on a loaded machine costs one re-send; the
    // gateway's spool keeps the last 4096 acknowledged frames of each stream for a
    // twin that moves, so its size is no measure here.)
    let outside = zenoh_client(&router.ready.zenoh[0]).await;
    let acks = outside
        .declare_subscriber(format!("twinmesh/acks/{TWIN}"))
        .await
        .unwrap();
    recv_until(WAIT, "a watermark of the twin's owner", &acks, |s| {
        Watermark::decode(&*s.payload().to_bytes()).is_ok_and(|wm| {
            wm.signal == "bearing_vibration" && wm.epoch == p0.epoch && wm.seq >= vib_seq(&before)
        })
    })
    .await;
    let start = get_twin(cloud, TWIN).await.unwrap();
    let acked = eventually(WAIT, "30 more frames ingested", || async {
        let t = get_twin(cloud, TWIN).await.ok()?;
        (vib_seq(&t) >= vib_seq(&start) + 30).then_some(t)
    })
    .await;
    for (signal, n) in &acked.duplicate_frames {
        let before = start.duplicate_frames.get(signal).copied().unwrap_or(0);
        assert!(
            n.saturating_sub(before) <= 3,
            "{signal}: {before} → {n} duplicates over 30 frames: acks are not reaching the gateway"
        );
    }

    // An RPC from the cloud reaches the twin on its edge; the set-point goes on to the
    // gateway's device and its delivery report comes back.
    let replicas = outside
        .declare_subscriber(format!("twinmesh/snapshots/{TWIN}"))
        .await
        .unwrap();
    let reply = set_desired(cloud, TWIN, "yaw_offset", 2.5, None)
        .await
        .unwrap();
    assert!(reply.revision > before.revision, "{reply:?}");
    recv_until(
        WAIT,
        "a replicated snapshot holding the delivered set-point",
        &replicas,
        |s| {
            TwinSnapshot::decode(&*s.payload().to_bytes()).is_ok_and(|snap| {
                snap.twin.is_some_and(|t| {
                    t.desired.get("yaw_offset").is_some_and(|d| {
                        d.value == 2.5 && d.status == DeliveryStatus::Delivered as i32
                    })
                })
            })
        },
    )
    .await;

    // kill -9 of the twin's edge: the twin fails over to the other edge, through the
    // routers, with its state.
    kill9(&p0.node);
    let served = eventually(WAIT, "the twin serving from the other edge", || async {
        let t = get_twin(cloud, TWIN).await.ok()?;
        (t.placement.as_ref()?.node == survivor).then_some(t)
    })
    .await;
    assert!(served.placement.as_ref().unwrap().epoch > p0.epoch);
    let yaw = &served.desired["yaw_offset"];
    assert_eq!(
        (yaw.value, yaw.status),
        (2.5, DeliveryStatus::Delivered as i32),
        "state resumed from the replicated snapshot"
    );
    let after = eventually(WAIT, "ingestion on the survivor", || async {
        let t = get_twin(cloud, TWIN).await.ok()?;
        (t.placement.as_ref()?.node == survivor && vib_seq(&t) >= vib_seq(&before) + 30)
            .then_some(t)
    })
    .await;
    assert!(
        after.lost_frames.is_empty(),
        "nothing lost: {:?}",
        after.lost_frames
    );
    let gone = eventually(WAIT, "the killed edge leaving the node list", || async {
        let listed = listed_nodes(cloud).await?;
        (!listed.contains(&p0.node)).then_some(listed)
    })
    .await;
    assert!(
        gone.contains(survivor) && gone.contains("iot-a"),
        "{gone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_forms_through_one_router_and_fails_over_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let router = start_router(d, "router", &[]);
    let cloud = start_node(d, ("cloud", "cloud", None), "router", &router, &[]);
    let mut edges = [
        start_node(
            d,
            ("edge", "edge-a1", Some("site-a")),
            "router",
            &router,
            &[],
        ),
        start_node(
            d,
            ("edge", "edge-a2", Some("site-a")),
            "router",
            &router,
            &[],
        ),
    ];
    let _iot = start_node(
        d,
        ("iot", "iot-a", Some("site-a")),
        "router",
        &router,
        &["--simulate", "wind_turbine:1"],
    );
    assert_mesh_and_failover(
        &cloud.grpc_endpoint(),
        &router,
        &["cloud", "edge-a1", "edge-a2", "iot-a"],
        ["edge-a1", "edge-a2"],
        |node| {
            let i = usize::from(node == "edge-a2");
            edges[i].kill9();
        },
    )
    .await;
}

/// Two routers chained (router-b connects to router-a); the cloud and one edge behind
/// router-a, the other edge and the gateway — a Zenoh client, as a constrained device
/// would be — behind router-b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_forms_through_two_chained_routers_and_fails_over_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let router_a = start_router(d, "router-a", &[]);
    let router_b = start_router(d, "router-b", &[&router_a.ready.zenoh[0]]);
    let cloud = start_node(d, ("cloud", "cloud", None), "router", &router_a, &[]);
    let mut edges = [
        start_node(
            d,
            ("edge", "edge-a1", Some("site-a")),
            "router",
            &router_a,
            &[],
        ),
        start_node(
            d,
            ("edge", "edge-a2", Some("site-a")),
            "router",
            &router_b,
            &[],
        ),
    ];
    let _iot = start_node(
        d,
        ("iot", "iot-a", Some("site-a")),
        "client",
        &router_b,
        &["--simulate", "wind_turbine:1"],
    );
    assert_mesh_and_failover(
        &cloud.grpc_endpoint(),
        &router_a,
        &["cloud", "edge-a1", "edge-a2", "iot-a"],
        ["edge-a1", "edge-a2"],
        |node| {
            let i = usize::from(node == "edge-a2");
            edges[i].kill9();
        },
    )
    .await;
}

/// The failure of issue 21: a node left in peer mode behind a router sees nothing
/// through it. Both ends say so, and what to do, instead of failing silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_mode_node_behind_a_router_is_told_to_run_in_router_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let router = start_router(d, "router", &[]);
    let cloud = start_node(d, ("cloud", "cloud", None), "peer", &router, &[]);
    eventually(WAIT, "the node's warning", || async {
        cloud
            .log()
            .contains("connected only to Zenoh routers")
            .then_some(())
    })
    .await;
    assert!(cloud.log().contains("--mode router"), "{}", cloud.log());
    eventually(WAIT, "the router's warning", || async {
        router
            .log()
            .contains("a peer-mode session connected to this router")
            .then_some(())
    })
    .await;
}

/// The secure shape through a router (docker-compose's): mutual TLS over QUIC on every
/// link and the ACL roster on every process, the router listed under `routers`. The
/// twin streams, a set-point from the cloud reaches the gateway's device, and a reader
/// connected to the router reads the twin's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secure_mesh_forms_through_a_router_under_the_acl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    twinmesh_nodes::certs::init_ca(&certs, "test CA", 30).unwrap();
    for n in ["router", "cloud", "edge-a", "iot-a", "reader"] {
        twinmesh_nodes::certs::issue(&certs, n, &[], 30).unwrap();
    }
    let roster = d.join("acl.toml");
    std::fs::write(
        &roster,
        "mesh = [\"cloud\", \"edge-a\"]\nrouters = [\"router\"]\nreaders = [\"reader\"]\n\
         [gateways]\nsite-a = [\"iot-a\"]\n",
    )
    .unwrap();
    let secure = |name: &str| {
        let mut a = tls_args(&certs, name);
        a.extend(["--acl".to_owned(), roster.display().to_string()]);
        a
    };
    let mut a = args(["--id", "router", "--listen", "quic/127.0.0.1:0"]);
    a.extend(secure("router"));
    let router = NodeProc::start_router(&a, &d.join("logs"), "router").unwrap();
    let cloud = start_node(
        d,
        ("cloud", "cloud", None),
        "router",
        &router,
        &strs(&secure("cloud")),
    );
    let _edge = start_node(
        d,
        ("edge", "edge-a", Some("site-a")),
        "router",
        &router,
        &strs(&secure("edge-a")),
    );
    let mut iot = secure("iot-a");
    iot.extend(args(["--simulate", "wind_turbine:1"]));
    let _iot = start_node(
        d,
        ("iot", "iot-a", Some("site-a")),
        "router",
        &router,
        &strs(&iot),
    );

    let ca = certs.join("ca.pem");
    let https = cloud.grpc_endpoint().replace("http://", "https://");
    let channel = twinmesh_nodes::client::connect_tls(&https, Duration::from_secs(10), Some(&ca))
        .await
        .unwrap();
    let twin = |channel: tonic::transport::Channel| async move {
        TwinServiceClient::new(channel)
            .get_twin(GetTwinRequest {
                twin_id: TWIN.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    let before = eventually(WAIT, "the twin streaming under the ACL", || {
        let channel = channel.clone();
        async move {
            let t = twin(channel).await?;
            (vib_seq(&t) >= 10).then_some(t)
        }
    })
    .await;
    assert_eq!(before.placement.unwrap().node, "edge-a");

    let mut req = tonic::Request::new(SetDesiredRequest {
        twin_id: TWIN.into(),
        property: "yaw_offset".into(),
        value: 1.5,
        expected_revision: None,
    });
    req.set_timeout(Duration::from_secs(10));
    TwinServiceClient::new(channel.clone())
        .set_desired(req)
        .await
        .unwrap();
    eventually(WAIT, "the set-point delivered through the router", || {
        let channel = channel.clone();
        async move {
            let t = twin(channel).await?;
            let d = t.desired.get("yaw_offset")?;
            (d.value == 1.5 && d.status == DeliveryStatus::Delivered as i32).then_some(())
        }
    })
    .await;

    let reader = zenoh_tls_client(
        &router.ready.zenoh[0],
        &ca,
        Some((&certs.join("reader.pem"), &certs.join("reader.key"))),
    )
    .await
    .unwrap();
    let states = reader
        .declare_subscriber(format!("twinmesh/twins/{TWIN}/state"))
        .await
        .unwrap();
    recv_until(
        WAIT,
        "the twin's state at a reader of the router",
        &states,
        |s| {
            TwinState::decode(&*s.payload().to_bytes())
                .is_ok_and(|st| st.twin.is_some_and(|t| t.twin_id == TWIN))
        },
    )
    .await;
}

fn strs(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

/// `twinmesh up` runs its nodes as routers: a node on another machine that reaches only
/// up's Zenoh endpoint (here: listens nowhere, connects only to it, in router mode)
/// joins the whole mesh through the cloud node, and serves its twins through its own
/// gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_node_joins_twinmesh_up_through_its_zenoh_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let zenoh = format!("tcp/127.0.0.1:{port}");
    let up = twinmesh_tests::UpProc::start(
        &[
            "--assets-per-kind",
            "1",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--zenoh",
            &zenoh,
        ],
        dir.path(),
    );
    let cloud = format!("http://{}", up.cloud_grpc);
    // Its keys are up's (under --data, as `twinmesh up` created them).
    let data = dir.path().join("mesh").join("edge-x");
    let mut a = routed_node_args(
        ("edge", "edge-x", Some("site-a")),
        "router",
        &[&zenoh],
        &data.display().to_string(),
    );
    let site_key = dir.path().join("mesh").join("keys").join("site-a.key");
    a.extend(["--site-key".to_owned(), site_key.display().to_string()]);
    let remote = NodeProc::start(&a, &dir.path().join("logs"), "edge-x").unwrap();
    assert!(remote.ready.zenoh.is_empty(), "{:?}", remote.ready);
    eventually(WAIT, "up's cloud listing the remote edge", || async {
        listed_nodes(&cloud).await?.contains("edge-x").then_some(())
    })
    .await;
    let remote_grpc = remote.grpc_endpoint();
    let t = eventually(
        WAIT,
        "a twin of up read through the remote edge",
        || async {
            let t = get_twin(&remote_grpc, TWIN).await.ok()?;
            (vib_seq(&t) >= 3).then_some(t)
        },
    )
    .await;
    assert_eq!(t.twin_id, TWIN);
}
