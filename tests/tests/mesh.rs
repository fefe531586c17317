//! End-to-end tests of the walking skeleton: real `twinmesh node` processes (cloud, edge,
//! iot) on loopback, reached through gRPC and plain Zenoh sessions.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;
use tonic::Code;

use twinmesh_actors::ports::SeriesStore;
use twinmesh_proto::v1::{
    self as proto, GetPlacementRequest, GetThingDescriptionRequest, ListNodesRequest,
    ListTwinsRequest, NodeLoad, QueryHistoryRequest, TelemetryFrame, TwinState, Watermark,
};
use twinmesh_tests::{
    eventually, get_placement, get_twin, list_twins, mesh_client, node_args, proven_frame, publish,
    register, run_cli, set_desired, twin_client, zenoh_client, zenoh_peer, Mesh, NodeProc,
    ANY_PORT, CLOUD, EDGE_A,
};
use twinmesh_twins::stats::{Accumulator, Aggregation};

const WAIT: Duration = Duration::from_secs(60);

fn frame(
    twin: &str,
    signal: &str,
    seq: u64,
    start_ns: i64,
    period: i64,
    samples: Vec<f64>,
) -> TelemetryFrame {
    TelemetryFrame {
        sealed: Vec::new(),
        twin_id: twin.into(),
        signal: signal.into(),
        seq,
        start_ns,
        sample_period_ns: period,
        samples,
        spool_base_seq: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_telemetry_reaches_twin_on_edge_readable_from_cloud() {
    let mesh = Mesh::start(Some("wind_turbine:1"), &[]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let outside = zenoh_client(&mesh.cloud.ready.zenoh[0]).await;
    let states = outside
        .declare_subscriber("twinmesh/twins/**")
        .await
        .unwrap();
    let controls = outside
        .declare_subscriber("twinmesh/control/site-a/*")
        .await
        .unwrap();

    // Telemetry from the gateway becomes twin state, read through the *cloud* node while
    // the twin lives on the edge.
    let twin = eventually(WAIT, "vibration frames in the twin", || async {
        let t = get_twin(&cloud, "site-a/wt-01").await.ok()?;
        (t.reported.get("bearing_vibration")?.seq >= 3 && t.reported.contains_key("power"))
            .then_some(t)
    })
    .await;
    let placement = twin.placement.clone().unwrap();
    assert_eq!(placement.node, "edge-a");
    assert_eq!(placement.tier, "edge");
    assert_eq!(placement.epoch, 1);
    assert_eq!(twin.kind, "wind_turbine");
    assert!(twin.derived.contains_key("bearing_vibration.rms"));
    let vib = twin.reported["bearing_vibration"];
    assert!(vib.value.is_finite() && vib.timestamp_ns > 0);

    // The placement authority agrees and the listing shows the twin where it lives.
    let mut mesh_api = mesh_client(&cloud).await;
    let p = mesh_api
        .get_placement(GetPlacementRequest {
            twin_id: "site-a/wt-01".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (p.node.as_str(), p.epoch, p.status.as_str()),
        ("edge-a", 1, "active")
    );
    let nodes = mesh_api
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let tiers: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.node.clone(), n.tier.clone()))
        .collect();
    assert_eq!(tiers.get("cloud").map(String::as_str), Some("cloud"));
    assert_eq!(tiers.get("edge-a").map(String::as_str), Some("edge"));
    assert_eq!(tiers.get("iot-a").map(String::as_str), Some("iot"));
    let list = list_twins(&cloud, "site-a").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].twin_id, "site-a/wt-01");
    assert_eq!(list[0].node, "edge-a");
    let td = twin_client(&cloud)
        .await
        .get_thing_description(GetThingDescriptionRequest {
            twin_id: "site-a/wt-01".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let td: serde_json::Value = serde_json::from_str(&td.json).unwrap();
    assert_eq!(td["title"], "site-a/wt-01");
    assert_eq!(td["properties"]["bearing_vibration"]["unit"], "m/s2");
    assert_eq!(td["properties"]["power_limit"]["readOnly"], false);

    // A plain Zenoh client attached to the cloud node decodes TwinState with the proto.
    let state = eventually(WAIT, "a TwinState sample on the cloud endpoint", || async {
        let s = states.recv_async().await.ok()?;
        if !s.key_expr().as_str().ends_with("/state") {
            return None;
        }
        assert_eq!(
            s.encoding().to_string(),
            <twinmesh_proto::v1::TwinState as twinmesh_proto::Wire>::ENCODING
        );
        let st = TwinState::decode(&*s.payload().to_bytes()).expect("TwinState decodes");
        st.twin.filter(|t| !t.reported.is_empty())
    })
    .await;
    assert_eq!(state.twin_id, "site-a/wt-01");
    assert_eq!(state.kind, "wind_turbine");

    // SetDesired reaches the gateway on twinmesh/control/... and the twin reports it
    // delivered; the simulated turbine then respects the limit.
    let resp = set_desired(&cloud, "site-a/wt-01", "power_limit", 900.0, None)
        .await
        .unwrap();
    assert_eq!(
        resp.desired.unwrap().status,
        proto::DeliveryStatus::Pending as i32
    );
    let update = eventually(WAIT, "the set-point on the control key", || async {
        let s = controls.recv_async().await.ok()?;
        let u = proto::DesiredUpdate::decode(&*s.payload().to_bytes()).ok()?;
        (u.property == "power_limit").then_some(u)
    })
    .await;
    assert_eq!(
        (update.twin_id.as_str(), update.value),
        ("site-a/wt-01", 900.0)
    );
    assert_eq!(update.revision, resp.revision);
    let twin = eventually(WAIT, "delivery confirmed and power limited", || async {
        let t = get_twin(&cloud, "site-a/wt-01").await.ok()?;
        let d = t.desired.get("power_limit")?;
        let delivered = d.status == proto::DeliveryStatus::Delivered as i32;
        let limited = t.reported.get("power")?.value <= 900.0 + 1e-9;
        (delivered && limited).then_some(t)
    })
    .await;
    assert_eq!(twin.desired["power_limit"].value, 900.0);

    // Bad commands change nothing.
    let err = set_desired(&cloud, "site-a/wt-01", "power_limit", 1e9, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "value 1000000000 of property power_limit is outside [0, 3000]"
    );
    let err = set_desired(&cloud, "site-a/wt-01", "power_limit", 100.0, Some(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("revision mismatch on site-a/wt-01: expected 1"),
        "{}",
        err.message()
    );
    let t = get_twin(&cloud, "site-a/wt-01").await.unwrap();
    assert_eq!(t.desired["power_limit"].value, 900.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_history_returns_exact_aggregates_of_sent_samples() {
    let mesh = Mesh::start(None, &[]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let gw = mesh.gateway_peer().await;
    let twin = "site-a/pm-99";
    register(&gw, mesh.dir.path(), twin, "power_meter").await;
    // The first answer may be `stale` if the authority has not yet seen the edge join;
    // it places the twin on its site's edge as soon as it does.
    let running = eventually(WAIT, "twin running on the edge", || async {
        get_twin(&cloud, twin).await.ok()
    })
    .await;
    assert_eq!(running.placement.unwrap().node, "edge-a");

    let acks = gw
        .declare_subscriber(format!("twinmesh/acks/{twin}"))
        .await
        .unwrap();
    // 20 frames of 100 samples at 1 kHz.
    let t0: i64 = 1_700_000_000_000_000_000;
    let period = 1_000_000;
    let mut all: Vec<(i64, f64)> = Vec::new();
    for seq in 1..=20u64 {
        let start = t0 + (seq as i64 - 1) * 100 * period;
        let samples: Vec<f64> = (0..100)
            .map(|i| ((seq * 100 + i) as f64 * 0.37).sin() * 300.0 + seq as f64)
            .collect();
        all.extend(
            samples
                .iter()
                .enumerate()
                .map(|(i, &x)| (start + i as i64 * period, x)),
        );
        let f = frame(twin, "voltage", seq, start, period, samples);
        publish(
            &gw,
            &format!("twinmesh/telemetry/{twin}/voltage"),
            proven_frame(mesh.dir.path(), f),
        )
        .await;
    }
    eventually(WAIT, "ack of frame 20", || async {
        let s = acks.recv_async().await.ok()?;
        let wm = Watermark::decode(&*s.payload().to_bytes()).ok()?;
        (wm.signal == "voltage" && wm.seq == 20).then_some(())
    })
    .await;

    // A range that starts and ends inside frames, in buckets that straddle frames.
    let (start, end, bucket) = (t0 + 123 * period, t0 + 1_901 * period, 350 * period);
    let mut expected: BTreeMap<i64, Accumulator> = BTreeMap::new();
    for &(t, x) in &all {
        if t >= start && t < end {
            expected.entry((t - start) / bucket).or_default().push(x);
        }
    }
    let mut client = twin_client(&cloud).await;
    for agg in [
        Aggregation::Mean,
        Aggregation::Min,
        Aggregation::Max,
        Aggregation::Rms,
        Aggregation::Count,
    ] {
        let resp = client
            .query_history(QueryHistoryRequest {
                twin_id: twin.into(),
                signal: "voltage".into(),
                start_ns: start,
                end_ns: end,
                bucket_ns: bucket,
                aggregation: proto::Aggregation::from(agg) as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.buckets.len(), expected.len(), "{agg:?}");
        for (b, (idx, acc)) in resp.buckets.iter().zip(&expected) {
            assert_eq!(b.start_ns, start + idx * bucket);
            assert_eq!(b.count, acc.count);
            let want = acc.value(agg);
            assert!(
                (b.value - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{agg:?} bucket {idx}: {} vs {want}",
                b.value
            );
        }
    }
    // Whole range, one bucket: every sample exactly once.
    let resp = client
        .query_history(QueryHistoryRequest {
            twin_id: twin.into(),
            signal: "voltage".into(),
            start_ns: t0,
            end_ns: t0 + 2_000 * period,
            bucket_ns: 2_000 * period,
            aggregation: proto::Aggregation::Count as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.buckets.len(), 1);
    assert_eq!(resp.buckets[0].count, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_killed_and_restarted_recovers_state_and_history_without_duplicates() {
    let mut mesh = Mesh::start(Some("wind_turbine:1"), &[]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let id = "site-a/wt-01";
    let before = eventually(WAIT, "some vibration frames", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (t.reported.get("bearing_vibration")?.seq >= 10).then_some(t)
    })
    .await;

    // kill -9, then restart on the same data directory and Zenoh port.
    let port = mesh.edge.ready.zenoh[0]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let mut restart_args = mesh.edge.args.clone();
    let listen = restart_args.iter().position(|a| a == "--listen").unwrap();
    restart_args[listen + 1] = format!("tcp/127.0.0.1:{port}");
    mesh.edge.kill9();
    let new_edge =
        NodeProc::start(&restart_args, &mesh.logs(), "edge-a-restarted").expect("edge restarts");
    mesh.edge = new_edge;

    // State comes back (the twin may wait on the cloud meanwhile: its data may leave the
    // site), it returns to its site's edge, and ingestion resumes with re-sent frames.
    let after = eventually(WAIT, "ingestion resumed on the restarted edge", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        let home = t.placement.as_ref()?.node == "edge-a";
        (home
            && t.reported.get("bearing_vibration")?.seq
                >= before.reported["bearing_vibration"].seq + 30)
            .then_some(t)
    })
    .await;
    assert!(
        after.revision > before.revision,
        "revision {} after {}",
        after.revision,
        before.revision
    );
    for (signal, v) in &before.reported {
        assert!(after.reported[signal].seq >= v.seq, "{signal} went back");
    }
    assert!(
        after.lost_frames.is_empty(),
        "no frame may be lost: {:?}",
        after.lost_frames
    );

    // Stop the gateway, let the twin settle, stop the edge, then read its database: every
    // stored seq of every signal exactly once, from 1 without gaps.
    let iot = mesh.iot.as_mut().unwrap();
    assert!(iot.stop().unwrap().success());
    let settled = get_twin(&cloud, id).await.unwrap();
    assert_eq!(settled.placement.as_ref().unwrap().node, "edge-a");
    assert!(mesh.edge.stop().unwrap().success(), "{}", mesh.edge.log());
    let store = twinmesh_nodes::store::SledStore::open(&mesh.data("edge-a"), 8).unwrap();
    let twin_id = id.parse().unwrap();
    for (signal, v) in &settled.reported {
        let seqs = store.frame_seqs(&twin_id, signal).unwrap();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "{signal}: stored seqs must be 1..=n exactly once"
        );
        assert!(
            seqs.len() as u64 >= v.seq,
            "{signal}: {} stored, reported seq {}",
            seqs.len(),
            v.seq
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_telemetry_is_dropped_counted_and_logged_once() {
    let mesh = Mesh::start(None, &["--max-frame-bytes", "4096"]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let gw = mesh.gateway_peer().await;
    let twin = "site-a/wt-98";
    register(&gw, mesh.dir.path(), twin, "wind_turbine").await;
    register(&gw, mesh.dir.path(), "site-a/wt-97", "wind_turbine").await;
    eventually(WAIT, "twins running", || async {
        get_twin(&cloud, twin).await.ok()?;
        get_twin(&cloud, "site-a/wt-97").await.ok()
    })
    .await;
    let load = gw
        .declare_subscriber("twinmesh/nodes/edge-a/load")
        .await
        .unwrap();
    let key = |s: &str| format!("twinmesh/telemetry/{twin}/{s}");
    let t0 = 1_700_000_000_000_000_000;

    publish(&gw, &key("power"), vec![0xff, 0x01, 0x02]).await;
    publish(&gw, &key("power"), vec![0xff, 0x01, 0x02]).await;
    publish(
        &gw,
        &key("power"),
        proven_frame(
            mesh.dir.path(),
            frame("site-a/wt-97", "power", 1, t0, 1, vec![1.0]),
        ),
    )
    .await;
    publish(
        &gw,
        &key("power"),
        frame(twin, "power", 1, t0, 1_000, vec![0.5; 1000]).encode_to_vec(),
    )
    .await;
    publish(
        &gw,
        &key("power"),
        proven_frame(
            mesh.dir.path(),
            frame(twin, "power", 1, t0, 1_000, vec![1.0, f64::NAN]),
        ),
    )
    .await;
    publish(
        &gw,
        &key("power"),
        proven_frame(
            mesh.dir.path(),
            frame(twin, "power", 1, t0, 1_000, vec![f64::INFINITY]),
        ),
    )
    .await;
    publish(
        &gw,
        &key("flux"),
        proven_frame(
            mesh.dir.path(),
            frame(twin, "flux", 1, t0, 1_000, vec![1.0]),
        ),
    )
    .await;
    publish(
        &gw,
        &key("power"),
        proven_frame(
            mesh.dir.path(),
            frame(twin, "power", 1, t0, 1_000_000_000, vec![1234.5]),
        ),
    )
    .await;

    // A well-formed frame without its gateway's proof: dropped as invalid.
    publish(
        &gw,
        &key("power"),
        frame(twin, "power", 1, t0, 1_000, vec![7.0]).encode_to_vec(),
    )
    .await;

    let rejected = eventually(WAIT, "all bad frames counted", || async {
        let s = load.recv_async().await.ok()?;
        let l = NodeLoad::decode(&*s.payload().to_bytes()).ok()?;
        let r = l.frames_rejected;
        let n = |k: &str| r.get(k).copied().unwrap_or(0);
        (n("malformed") >= 2
            && n("key_mismatch") >= 1
            && n("oversized") >= 1
            && n("non_finite") >= 2
            && n("unknown_signal") >= 1
            && n("invalid") >= 1)
            .then_some(r)
    })
    .await;
    assert_eq!(rejected["malformed"], 2);
    assert_eq!(rejected["oversized"], 1);

    // Only the good frame was applied; the other twin saw nothing.
    let t = eventually(WAIT, "the good frame applied", || async {
        let t = get_twin(&cloud, twin).await.ok()?;
        t.reported.contains_key("power").then_some(t)
    })
    .await;
    assert_eq!(t.reported.len(), 1);
    assert_eq!(t.reported["power"].value, 1234.5);
    assert_eq!(t.reported["power"].seq, 1);
    assert!(get_twin(&cloud, "site-a/wt-97")
        .await
        .unwrap()
        .reported
        .is_empty());

    // The node keeps working.
    publish(
        &gw,
        &key("power"),
        proven_frame(
            mesh.dir.path(),
            frame(
                twin,
                "power",
                2,
                t0 + 1_000_000_000,
                1_000_000_000,
                vec![99.0],
            ),
        ),
    )
    .await;
    eventually(WAIT, "a later good frame applied", || async {
        let t = get_twin(&cloud, twin).await.ok()?;
        (t.reported.get("power")?.seq == 2).then_some(())
    })
    .await;
    // Logged once per source and reason, however often it happens.
    let log = mesh.edge.log();
    assert_eq!(log.matches("malformed frame").count(), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_are_precise_and_health_and_reflection_answer() {
    let mesh = Mesh::start(None, &[]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let gw = zenoh_peer(&[mesh.edge.ready.zenoh[0].clone()]).await;
    register(&gw, mesh.dir.path(), "site-a/hpc-01", "hpc_node").await;
    eventually(WAIT, "twin running", || async {
        get_twin(&cloud, "site-a/hpc-01").await.ok()
    })
    .await;
    let mut c = twin_client(&cloud).await;

    let e = get_twin(&cloud, "site-a/ghost").await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "unknown twin site-a/ghost")
    );
    let e = get_twin(&cloud, "Bad Id").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"Bad Id\""), "{}", e.message());
    let history = |start_ns, end_ns, bucket_ns| QueryHistoryRequest {
        twin_id: "site-a/hpc-01".into(),
        signal: "power".into(),
        start_ns,
        end_ns,
        bucket_ns,
        aggregation: proto::Aggregation::Mean as i32,
    };
    // Invalid ranges: (start, end, bucket), what the message is or (`..`) starts with.
    for ((start_ns, end_ns, bucket_ns), message) in [
        (
            (10, 5, 1),
            "invalid time range: start_ns 10 must be before end_ns 5",
        ),
        ((5, 5, 1), ".."),
        ((0, 10, 0), "invalid bucket_ns 0: must be positive"),
        ((0, 1_000_000, 1), "too many buckets.."),
    ] {
        let e = c
            .query_history(history(start_ns, end_ns, bucket_ns))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{start_ns}..{end_ns}");
        match message.strip_suffix("..") {
            Some(prefix) => assert!(e.message().starts_with(prefix), "{}", e.message()),
            None => assert_eq!(e.message(), message),
        }
    }
    let mut ghost = history(0, 10, 1);
    ghost.twin_id = "site-a/ghost".into();
    assert_eq!(
        c.query_history(ghost).await.unwrap_err().code(),
        Code::NotFound
    );
    let e = get_placement(&cloud, "site-a/ghost").await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "unknown twin site-a/ghost")
    );
    let e = c
        .list_twins(ListTwinsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Standard health checking and reflection.
    let channel = tonic::transport::Channel::from_shared(cloud.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "twinmesh.v1.TwinService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"twinmesh.v1.TwinService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"twinmesh.v1.MeshService".to_owned()),
        "{names:?}"
    );
}

#[test]
fn bad_config_exits_non_zero_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let check = |argv: &[&str], expect: &str| {
        let (status, _out, err) = run_cli(argv);
        assert!(!status.success(), "{argv:?} must fail");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{argv:?}: one line expected, got:\n{err}");
        assert!(lines[0].starts_with("error: "), "{}", lines[0]);
        assert!(
            lines[0].contains(expect),
            "{argv:?}: {:?} not in {:?}",
            expect,
            lines[0]
        );
        assert!(!err.contains("panicked"));
    };
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "id = \"edge-a\"\ntier = \"edge\"\nsite = [").unwrap();
    check(
        &["node", "--config", bad.to_str().unwrap()],
        "invalid config",
    );
    std::fs::write(&bad, "id = \"edge-a\"\ntier = \"fog\"\nsite = \"s\"\n").unwrap();
    check(
        &["node", "--config", bad.to_str().unwrap()],
        "unknown variant `fog`",
    );
    check(
        &["node", "--config", "/nonexistent/twinmesh.toml"],
        "cannot read config /nonexistent/twinmesh.toml",
    );
    check(
        &["node", "--tier", "fog", "--id", "x", "--site", "s"],
        "invalid tier \"fog\"",
    );
    check(
        &["node", "--tier", "edge", "--id", "Edge A", "--site", "s"],
        "invalid node id \"Edge A\"",
    );
    check(
        &["node", "--tier", "edge", "--id", "e", "--site", "Site A"],
        "invalid site \"Site A\"",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("d").display().to_string();
    check(
        &[
            "node", "--tier", "edge", "--id", "e", "--site", "s", "--grpc", &addr, "--data", &data,
        ],
        &format!("cannot bind gRPC address {addr}"),
    );
    check(
        &[
            "node",
            "--tier",
            "edge",
            "--id",
            "e",
            "--site",
            "s",
            "--listen",
            &format!("tcp/{addr}"),
            "--data",
            &data,
        ],
        &format!("cannot listen on zenoh endpoint tcp/{addr}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_starts_while_cloud_is_down_and_joins_when_it_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cloud_ep = format!("tcp/127.0.0.1:{port}");
    let d = |n: &str| dir.path().join(n).display().to_string();
    let _edge = NodeProc::start(
        &node_args(EDGE_A, ANY_PORT, &[&cloud_ep], &d("edge")),
        &logs,
        "edge",
    )
    .expect("edge starts without its cloud");
    let cloud = NodeProc::start(
        &node_args(CLOUD, &cloud_ep, &[], &d("cloud")),
        &logs,
        "cloud",
    )
    .unwrap();
    let endpoint = cloud.grpc_endpoint();
    eventually(WAIT, "the edge in the cloud's node list", || async {
        let nodes = mesh_client(&endpoint)
            .await
            .list_nodes(ListNodesRequest {})
            .await
            .ok()?
            .into_inner()
            .nodes;
        nodes
            .iter()
            .any(|n| n.node == "edge-a" && n.site == "site-a")
            .then_some(())
    })
    .await;
}

/// In-process: a twin actor that fails is restarted by its NodeSupervisor from its last
/// persisted state, and keeps ingesting where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_twin_is_restarted_from_its_persisted_state() {
    use twinmesh_actors::metrics::NodeMetrics;
    use twinmesh_actors::node::NodeMsg;
    use twinmesh_actors::twin::TwinMsg;
    use twinmesh_nodes::config::NodeConfig;
    use twinmesh_nodes::RunningNode;
    use twinmesh_twins::Tier;

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    twinmesh_tests::key_args(&keys, "edge", Some("site-a")).unwrap();
    let mut cloud_cfg = NodeConfig::new("cloud".parse().unwrap(), Tier::Cloud, "cloud");
    cloud_cfg.listen = vec!["tcp/127.0.0.1:0".into()];
    cloud_cfg.data = dir.path().join("cloud");
    cloud_cfg.mesh_key_file = Some(keys.join("mesh.key"));
    cloud_cfg.control_keys_dir = Some(keys.clone());
    let cloud = RunningNode::start(cloud_cfg).await.unwrap();
    let mut edge_cfg = NodeConfig::new("edge-a".parse().unwrap(), Tier::Edge, "site-a");
    edge_cfg.listen = vec!["tcp/127.0.0.1:0".into()];
    edge_cfg.connect = cloud.locators.clone();
    edge_cfg.grpc = Some("127.0.0.1:0".parse().unwrap());
    edge_cfg.data = dir.path().join("edge");
    edge_cfg.mesh_key_file = Some(keys.join("mesh.key"));
    edge_cfg.control_keys_dir = Some(keys.clone());
    let edge = RunningNode::start(edge_cfg).await.unwrap();
    let endpoint = format!("http://{}", edge.grpc_addr.unwrap());

    let gw = zenoh_peer(&[edge.locators[0].clone(), cloud.locators[0].clone()]).await;
    let id = "site-a/sp-01";
    register(&gw, dir.path(), id, "spindle").await;
    // A spindle may start on the cloud (its data is public) if the edge's liveliness
    // reaches the authority later, and move to the edge after: wait until it is there.
    eventually(WAIT, "twin running on the edge", || async {
        let t = get_twin(&endpoint, id).await.ok()?;
        (t.placement?.node == "edge-a").then_some(())
    })
    .await;
    let key = format!("twinmesh/telemetry/{id}/spindle_speed");
    let t0 = 1_700_000_000_000_000_000;
    // Publishes the spindle-speed frames `seqs` and waits until the last is applied.
    let send = |seqs: std::ops::RangeInclusive<u64>, what: &'static str| {
        let (gw, key, endpoint, last, dir) = (&gw, &key, &endpoint, *seqs.end(), dir.path());
        async move {
            for seq in seqs {
                let f = frame(
                    id,
                    "spindle_speed",
                    seq,
                    t0 + seq as i64 * 100_000_000,
                    100_000_000,
                    vec![1000.0 * seq as f64],
                );
                publish(gw, key, proven_frame(dir, f)).await;
            }
            eventually(WAIT, what, || async {
                let t = get_twin(endpoint, id).await.ok()?;
                (t.reported.get("spindle_speed")?.seq == last).then_some(t)
            })
            .await
        }
    };
    let before = send(1..=3, "three frames applied").await;

    let supervisor = edge.supervisor().unwrap();
    let actor = ractor::call_t!(supervisor, NodeMsg::Lookup, 5000, id.parse().unwrap())
        .unwrap()
        .expect("twin hosted on the edge");
    actor
        .send_message(TwinMsg::Fail("injected fault".into()))
        .unwrap();
    eventually(WAIT, "the supervisor restarted the twin", || async {
        (NodeMetrics::get(&edge.ctx.metrics.twin_restarts) == 1).then_some(())
    })
    .await;
    let after = eventually(WAIT, "the restarted twin answers", || async {
        get_twin(&endpoint, id).await.ok()
    })
    .await;
    assert!(after.revision >= before.revision);
    assert_eq!(after.reported["spindle_speed"].seq, 3);
    assert_eq!(after.reported["spindle_speed"].value, 3000.0);

    // It resumes at seq 4: a re-sent seq 3 is a duplicate, seq 4 is applied.
    let t = send(3..=4, "frame 4 applied after the restart").await;
    assert_eq!(t.duplicate_frames.get("spindle_speed"), Some(&1));
    let _ = gw.close().await;
    edge.stop().await.unwrap();
    cloud.stop().await.unwrap();
}

/// `twinmesh up` starts the whole mesh in one process, serves gRPC, the dashboard and
/// metrics, and stops cleanly on Ctrl-C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twinmesh_up_runs_the_whole_mesh_and_stops_cleanly() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(twinmesh_tests::twinmesh_bin())
        .args([
            "up",
            "--assets-per-kind",
            "1",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--zenoh",
            "tcp/127.0.0.1:0",
            "--data",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut grpc = None;
    let mut http = None;
    let mut lines = Vec::new();
    while grpc.is_none() || http.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("up prints its nodes");
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"cloud") {
            grpc = words
                .iter()
                .position(|w| *w == "grpc")
                .map(|i| words[i + 1].to_owned());
            http = line.split("http://").nth(1).map(|s| s.trim().to_owned());
        }
        lines.push(line);
    }
    let endpoint = format!("http://{}", grpc.unwrap());
    let twins = eventually(
        WAIT,
        "one twin of each kind per site, with data",
        || async {
            let twins = list_twins(&endpoint, "").await.ok()?;
            (twins.len() == 16 && twins.iter().all(|t| t.revision > 0)).then_some(twins)
        },
    )
    .await;
    let ids: Vec<&str> = twins.iter().map(|t| t.twin_id.as_str()).collect();
    for site in ["site-a", "site-b"] {
        for asset in [
            "ap-01", "cl-01", "cs-01", "hpc-01", "pm-01", "sp-01", "tg-01", "wt-01",
        ] {
            let id = format!("{site}/{asset}");
            assert!(ids.contains(&id.as_str()), "{id} missing: {ids:?}");
        }
    }
    for t in &twins {
        let site = t.twin_id.split('/').next().unwrap();
        assert_eq!(t.node, format!("edge-{}", site.trim_start_matches("site-")));
    }
    let nodes = mesh_client(&endpoint)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["cloud", "edge-a", "edge-b", "iot-a", "iot-b"]);

    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(http.as_deref().unwrap()).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let metrics = get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("twinmesh_frames_in_total{") && l.contains("node=\"cloud\"")),
        "{metrics}"
    );
    assert!(get("/").contains("<title>twinmesh</title>"));
    let api = get("/api/twins");
    assert!(api.contains("\"twinId\":\"site-a/wt-01\""), "{api}");

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "twinmesh up did not exit after SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped; storage flushed")),
        "{rest:?}"
    );
}
