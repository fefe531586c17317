//! End-to-end tests of twins that move (issue 4): live migration while streaming,
//! failover after `kill -9`, the privacy-constrained twin that must wait for its site,
//! and a gateway killed with `kill -9` whose twin goes on after its restart.

use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;

use twinmesh_actors::ports::{PlacementStore, SeriesStore};
use twinmesh_proto::v1::{watch_twin_response, NodeLoad};
use twinmesh_tests::{
    eventually, get_placement, get_twin, list_twins, mesh_client, migrate_twin, recv_until,
    set_desired, watch_twin, zenoh_client, Cluster,
};

const WAIT: Duration = Duration::from_secs(60);

fn vib_seq(t: &twinmesh_proto::v1::Twin) -> u64 {
    t.reported.get("bearing_vibration").map_or(0, |v| v.seq)
}

/// Every stored seq of `signal` on `node`, read from its database after it stopped.
fn stored_seqs(c: &Cluster, node: &str, id: &str, signal: &str) -> Vec<u64> {
    let store = twinmesh_nodes::store::SledStore::open(&c.data(node), 8).unwrap();
    store.frame_seqs(&id.parse().unwrap(), signal).unwrap()
}

fn assert_exactly_once(seqs: &[u64], upto: u64, what: &str) {
    assert!(
        seqs.len() as u64 >= upto,
        "{what}: {} frames stored, expected at least {upto}",
        seqs.len()
    );
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "{what}: every seq exactly once, from 1, without gaps"
    );
}

/// Stops the gateway, reads the settled twin `id` through `cloud`, stops `nodes`, and
/// checks that `home` stored every seq of every reported signal exactly once.
async fn stop_and_check_history(
    c: &mut Cluster,
    cloud: &str,
    id: &str,
    nodes: &[&str],
    home: &str,
) {
    assert!(c.nodes.get_mut("iot-a").unwrap().stop().unwrap().success());
    let settled = get_twin(cloud, id).await.unwrap();
    for n in nodes {
        assert!(c.nodes.get_mut(*n).unwrap().stop().unwrap().success());
    }
    for (signal, v) in &settled.reported {
        let seqs = stored_seqs(c, home, id, signal);
        assert_exactly_once(&seqs, v.seq, &format!("{signal} on {home}"));
    }
}

/// Twin `id` once 20 vibration frames have reached it, and the edge of site-a it is not on.
async fn streaming_on_site_a(cloud: &str, id: &str) -> (twinmesh_proto::v1::Twin, &'static str) {
    let twin = eventually(WAIT, "streaming", || async {
        let t = get_twin(cloud, id).await.ok()?;
        (vib_seq(&t) >= 20).then_some(t)
    })
    .await;
    let other = match twin.placement.as_ref().map(|p| p.node.as_str()) {
        Some("edge-a1") => "edge-a2",
        _ => "edge-a1",
    };
    (twin, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_while_streaming_keeps_every_seq_exactly_once() {
    let mut c = Cluster::two_edges_of_site_a("wind_turbine:1").unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let id = "site-a/wt-01";
    let (before, target) = streaming_on_site_a(&cloud, id).await;
    let p0 = before.placement.clone().unwrap();

    // A watcher opened before the move keeps receiving after it.
    let mut watch = watch_twin(&cloud, id).await;

    let moved = migrate_twin(&cloud, id, target).await.unwrap();
    let p1 = moved.placement.unwrap();
    assert_eq!((p1.node.as_str(), p1.epoch), (target, p0.epoch + 1));
    assert!(moved.duration_ns > 0);

    let mut saw_new_home = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline && !saw_new_home {
        if let Ok(Ok(Some(u))) = tokio::time::timeout(Duration::from_secs(5), watch.message()).await
        {
            if let Some(watch_twin_response::Update::State(s)) = u.update {
                saw_new_home = s
                    .twin
                    .and_then(|t| t.placement)
                    .is_some_and(|p| p.node == target);
            }
        }
    }
    assert!(saw_new_home, "the watch stream went on across the move");

    // Ingestion goes on at the new home.
    let after = eventually(WAIT, "ingestion on the new node", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (t.placement.as_ref()?.node == target && vib_seq(&t) >= vib_seq(&before) + 30).then_some(t)
    })
    .await;
    assert!(after.revision > before.revision);

    // Stop the gateway, let the twin settle, stop the nodes and read the target's history.
    stop_and_check_history(&mut c, &cloud, id, &["edge-a1", "edge-a2", "cloud"], target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_edge_fails_over_within_five_seconds_and_history_is_complete() {
    let mut c = Cluster::two_edges_of_site_a("wind_turbine:1").unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let id = "site-a/wt-01";
    let (before, survivor) = streaming_on_site_a(&cloud, id).await;
    let p0 = before.placement.clone().unwrap();
    // A set-point, delivered and replicated, must survive the failover.
    set_desired(&cloud, id, "yaw_offset", 2.5, None)
        .await
        .unwrap();
    let outside = zenoh_client(&c.node("cloud").ready.zenoh[0]).await;
    let replicas = outside
        .declare_subscriber(format!("twinmesh/snapshots/{id}"))
        .await
        .unwrap();
    recv_until(
        WAIT,
        "a replicated snapshot holding the delivered set-point",
        &replicas,
        |s| {
            twinmesh_proto::v1::TwinSnapshot::decode(&*s.payload().to_bytes()).is_ok_and(|snap| {
                snap.twin.is_some_and(|t| {
                    t.desired.get("yaw_offset").is_some_and(|d| {
                        d.status == twinmesh_proto::v1::DeliveryStatus::Delivered as i32
                    })
                })
            })
        },
    )
    .await;

    c.kill9(&p0.node);
    let killed_at = Instant::now();
    let served = eventually(
        Duration::from_secs(5),
        "the twin serving from the other edge",
        || async {
            let t = get_twin(&cloud, id).await.ok()?;
            (t.placement.as_ref()?.node == survivor).then_some(t)
        },
    )
    .await;
    let failover = killed_at.elapsed();
    assert!(served.placement.unwrap().epoch > p0.epoch);
    let yaw = &served.desired["yaw_offset"];
    assert_eq!(yaw.value, 2.5, "state resumed from the replicated snapshot");
    assert_eq!(
        yaw.status,
        twinmesh_proto::v1::DeliveryStatus::Delivered as i32
    );
    eprintln!("failover took {failover:?}");

    let after = eventually(WAIT, "ingestion on the survivor", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (vib_seq(&t) >= vib_seq(&before) + 30).then_some(t)
    })
    .await;
    assert!(
        after.lost_frames.is_empty(),
        "nothing lost: {:?}",
        after.lost_frames
    );
    stop_and_check_history(&mut c, &cloud, id, &[survivor, "cloud"], survivor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twin_whose_data_must_stay_on_site_waits_for_its_site_and_never_reaches_the_cloud() {
    let mut c = Cluster::new(1000).unwrap();
    c.start_site("site-b", &["edge-b"], &[], "iot-b", "power_meter:1")
        .unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let id = "site-b/pm-01";
    let before = eventually(WAIT, "streaming", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (t.reported.get("voltage")?.seq >= 3).then_some(t)
    })
    .await;
    let epoch0 = before.placement.unwrap().epoch;

    c.kill9("edge-b");
    // Stale, with the reason, and never moved to the cloud.
    let p = eventually(WAIT, "a stale placement", || async {
        let p = get_placement(&cloud, id).await.ok()?;
        (p.status == "stale").then_some(p)
    })
    .await;
    assert!(p.node.is_empty(), "{p:?}");
    assert!(
        p.reason.contains("must stay on site site-b"),
        "{}",
        p.reason
    );
    let e = get_twin(&cloud, id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("stale"), "{}", e.message());
    let list = list_twins(&cloud, "site-b").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].twin_id.as_str(), list[0].status.as_str()),
        (id, "stale")
    );

    // The gateway keeps spooling meanwhile.
    let outside = zenoh_client(&c.node("cloud").ready.zenoh[0]).await;
    let load = outside
        .declare_subscriber("twinmesh/nodes/iot-b/load")
        .await
        .unwrap();
    let mut spooled = Vec::new();
    recv_until(WAIT, "the spool growing", &load, |s| {
        spooled.extend(
            NodeLoad::decode(&*s.payload().to_bytes())
                .ok()
                .map(|l| l.spool_frames),
        );
        spooled.len() >= 3 && spooled[spooled.len() - 1] > spooled[0]
    })
    .await;

    // The site's edge comes back: so does the twin, at a newer epoch.
    c.restart("edge-b").unwrap();
    let back = eventually(WAIT, "the twin back on its site", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        let p = t.placement.clone()?;
        (p.node == "edge-b" && t.reported.get("voltage")?.seq > before.reported["voltage"].seq + 3)
            .then_some(t)
    })
    .await;
    assert!(back.placement.unwrap().epoch > epoch0);
    // Read through the cloud, the personal signal is withheld, never shown.
    assert!(!back.reported.contains_key("household_energy"));
    assert!(back.withheld.contains(&"household_energy".to_owned()));

    // Nothing of it ever lived on, or was stored by, the cloud node.
    let on_cloud = twinmesh_tests::Cluster::node(&c, "cloud")
        .ready
        .node
        .clone();
    assert_eq!(on_cloud, "cloud");
    for n in ["iot-b", "edge-b", "cloud"] {
        assert!(c.nodes.get_mut(n).unwrap().stop().unwrap().success());
    }
    let cloud_store = twinmesh_nodes::store::SledStore::open(&c.data("cloud"), 8).unwrap();
    let twin_id = id.parse().unwrap();
    for signal in ["voltage", "current", "household_energy"] {
        assert!(
            cloud_store.frame_seqs(&twin_id, signal).unwrap().is_empty(),
            "{signal} stored on the cloud"
        );
    }
    assert!(
        cloud_store.hosted().unwrap().is_empty(),
        "the cloud hosted a twin"
    );
}

/// Frozen old owner (SIGSTOP, a partition as far as the mesh can tell): the twin fails
/// over after the lease; when the old owner wakes up its copy is stopped, its writes are
/// refused, and no epoch ever had two owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_old_owner_is_fenced_and_no_epoch_has_two_owners() {
    let c = Cluster::two_edges_of_site_a("wind_turbine:1").unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let id = "site-a/wt-01";
    let outside = zenoh_client(&c.node("cloud").ready.zenoh[0]).await;
    let states = outside
        .declare_subscriber(format!("twinmesh/twins/{id}/state"))
        .await
        .unwrap();
    let (before, new_home) = streaming_on_site_a(&cloud, id).await;
    let p0 = before.placement.clone().unwrap();
    let old_pid = c.node(&p0.node).pid().to_string();

    std::process::Command::new("kill")
        .args(["-STOP", &old_pid])
        .status()
        .unwrap();
    let moved = eventually(WAIT, "failover after the lease", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (t.placement.as_ref()?.node == new_home).then_some(t)
    })
    .await;
    let p1 = moved.placement.unwrap();
    assert!(p1.epoch > p0.epoch);
    std::process::Command::new("kill")
        .args(["-CONT", &old_pid])
        .status()
        .unwrap();

    // The woken old owner stops its stale copy.
    eventually(WAIT, "the old owner dropping its stale copy", || async {
        let nodes = mesh_client(&cloud)
            .await
            .list_nodes(twinmesh_proto::v1::ListNodesRequest {})
            .await
            .ok()?
            .into_inner()
            .nodes;
        let old = nodes.iter().find(|n| n.node == p0.node)?;
        (old.twins == 0).then_some(())
    })
    .await;
    // The cloud kept the new owner's snapshots, not the old one's.
    let replica = eventually(WAIT, "a replica of the new epoch", || async {
        let replies = outside.get(format!("twinmesh/snapshots/{id}")).await.ok()?;
        let r = replies.recv_async().await.ok()?;
        let snap =
            twinmesh_proto::v1::TwinSnapshot::decode(&*r.result().ok()?.payload().to_bytes())
                .ok()?;
        (snap.epoch == p1.epoch).then_some(snap)
    })
    .await;
    assert_eq!(replica.twin.unwrap().placement.unwrap().node, new_home);
    // Ingestion goes on at the new owner.
    eventually(WAIT, "ingestion at the new owner", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (t.placement.as_ref()?.node == new_home && vib_seq(&t) > vib_seq(&before) + 20)
            .then_some(())
    })
    .await;
    // Every state publication so far: one owner per epoch.
    let mut owners: std::collections::BTreeMap<u64, std::collections::BTreeSet<String>> =
        Default::default();
    while let Ok(Some(s)) = states.try_recv() {
        if let Some(p) = twinmesh_proto::v1::TwinState::decode(&*s.payload().to_bytes())
            .ok()
            .and_then(|st| st.twin)
            .and_then(|t| t.placement)
        {
            owners.entry(p.epoch).or_default().insert(p.node);
        }
    }
    assert!(owners.len() >= 2, "{owners:?}");
    for (epoch, nodes) in &owners {
        assert_eq!(nodes.len(), 1, "epoch {epoch} had owners {nodes:?}");
    }
}

/// With the cloud down an edge keeps ingesting, analysing and serving its twins; when
/// the cloud returns, its placements and replicated snapshots agree with the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cloud_down_the_edge_serves_and_reconciles_when_it_returns() {
    let mut c = Cluster::new(1000).unwrap();
    c.start_site("site-a", &["edge-a"], &[], "iot-a", "wind_turbine:1")
        .unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let edge = c.node("edge-a").grpc_endpoint();
    let id = "site-a/wt-01";
    let before = eventually(WAIT, "streaming", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (vib_seq(&t) >= 10 && t.derived.contains_key("bearing_vibration.rms")).then_some(t)
    })
    .await;
    let p0 = before.placement.clone().unwrap();

    c.kill9("cloud");
    // The edge serves on its own: ingestion, analysis and commands.
    let alone = eventually(WAIT, "ingestion and analysis without the cloud", || async {
        let t = get_twin(&edge, id).await.ok()?;
        let rms_changed =
            t.derived.get("bearing_vibration.rms") != before.derived.get("bearing_vibration.rms");
        (vib_seq(&t) > vib_seq(&before) + 30 && rms_changed).then_some(t)
    })
    .await;
    assert_eq!(alone.placement.as_ref().unwrap().epoch, p0.epoch);
    set_desired(&edge, id, "power_limit", 1500.0, None)
        .await
        .unwrap();
    eventually(
        WAIT,
        "the set-point delivered without the cloud",
        || async {
            let t = get_twin(&edge, id).await.ok()?;
            (t.desired.get("power_limit")?.status
                == twinmesh_proto::v1::DeliveryStatus::Delivered as i32)
                .then_some(())
        },
    )
    .await;

    // The cloud returns on its data: same placement, and its replica catches up.
    c.restart("cloud").unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let p = eventually(WAIT, "the placement from the restarted cloud", || async {
        get_placement(&cloud, id).await.ok()
    })
    .await;
    assert_eq!(
        (p.node.as_str(), p.epoch, p.status.as_str()),
        (p0.node.as_str(), p0.epoch, "active")
    );
    let outside = zenoh_client(&c.node("cloud").ready.zenoh[0]).await;
    let now = get_twin(&edge, id).await.unwrap();
    eventually(
        WAIT,
        "the cloud's replica agreeing with the edge",
        || async {
            let replies = outside.get(format!("twinmesh/snapshots/{id}")).await.ok()?;
            let r = replies.recv_async().await.ok()?;
            let snap =
                twinmesh_proto::v1::TwinSnapshot::decode(&*r.result().ok()?.payload().to_bytes())
                    .ok()?;
            let t = snap.twin?;
            (snap.epoch == p0.epoch
                && t.revision >= now.revision
                && t.desired.get("power_limit")?.value == 1500.0)
                .then_some(())
        },
    )
    .await;
    // And the API through the cloud sees the same twin as the edge.
    let via_cloud = eventually(WAIT, "the twin through the cloud again", || async {
        get_twin(&cloud, id).await.ok()
    })
    .await;
    assert_eq!(via_cloud.placement.unwrap().node, p0.node);
}

/// Status of `id` in `ListTwins` through `endpoint`.
async fn listed_status(endpoint: &str, id: &str) -> Option<String> {
    list_twins(endpoint, "")
        .await
        .ok()?
        .into_iter()
        .find(|t| t.twin_id == id)
        .map(|t| t.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_twin_is_passivated_and_woken_by_its_next_frame_or_call() {
    let mut c = Cluster::new(1000).unwrap();
    c.start_site(
        "site-a",
        &["edge-a1"],
        &["--passivate-after", "2"],
        "iot-a",
        "hpc_node:1",
    )
    .unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let id = "site-a/hpc-01";
    let seqs = |t: &twinmesh_proto::v1::Twin| -> std::collections::BTreeMap<String, u64> {
        t.reported.iter().map(|(k, v)| (k.clone(), v.seq)).collect()
    };
    let min_seq = |t: &twinmesh_proto::v1::Twin| t.reported.values().map(|v| v.seq).min();
    eventually(WAIT, "streaming", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (min_seq(&t)? >= 3).then_some(())
    })
    .await;

    // The gateway stops: the twin idles, and the edge passivates it.
    assert!(c.nodes.get_mut("iot-a").unwrap().stop().unwrap().success());
    let idle = get_twin(&cloud, id).await.unwrap();
    eventually(WAIT, "the idle twin listed dormant", || async {
        (listed_status(&cloud, id).await? == "dormant").then_some(())
    })
    .await;

    // Its next frame wakes it (no call involved: the gateway's re-sent frames reach the
    // edge's watch of its site) and it ingests on from where it stopped.
    c.restart("iot-a").unwrap();
    eventually(WAIT, "woken by telemetry", || async {
        let status = listed_status(&cloud, id).await?;
        (status != "dormant").then_some(())
    })
    .await;
    let woken = eventually(WAIT, "ingesting again", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (min_seq(&t)? > idle.reported.values().map(|v| v.seq).max()?).then_some(t)
    })
    .await;
    assert!(woken.revision > idle.revision);

    // Dormant again; the edge restarts and keeps it registered but asleep; a call wakes
    // it with its state intact.
    assert!(c.nodes.get_mut("iot-a").unwrap().stop().unwrap().success());
    let last = get_twin(&cloud, id).await.unwrap();
    eventually(WAIT, "dormant again", || async {
        (listed_status(&cloud, id).await? == "dormant").then_some(())
    })
    .await;
    assert!(c
        .nodes
        .get_mut("edge-a1")
        .unwrap()
        .stop()
        .unwrap()
        .success());
    c.restart("edge-a1").unwrap();
    eventually(WAIT, "still dormant after the edge restarted", || async {
        (listed_status(&cloud, id).await? == "dormant").then_some(())
    })
    .await;
    let called = get_twin(&cloud, id)
        .await
        .expect("a call wakes a dormant twin within its deadline");
    assert_eq!(seqs(&called), seqs(&last), "state survives passivation");
    assert_eq!(called.placement.as_ref().unwrap().node, "edge-a1");
    assert_ne!(listed_status(&cloud, id).await.as_deref(), Some("dormant"));

    // Every frame stored exactly once across the naps.
    for n in ["edge-a1", "cloud"] {
        assert!(c.nodes.get_mut(n).unwrap().stop().unwrap().success());
    }
    for (signal, v) in &last.reported {
        let stored = stored_seqs(&c, "edge-a1", id, signal);
        assert_exactly_once(&stored, v.seq, &format!("{signal} on edge-a1"));
    }
}

/// A gateway killed with `kill -9` comes back and its twin goes on. The crash leaves a
/// hole in the gateway's numbering (the rest of the block it had reserved, and frames
/// spooled but not flushed); the restarted gateway's frames say the hole is gone once
/// the twin has everything before it. Before, the twin waited for the missing numbers
/// until the gateway's spool overflowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_sigkill_comes_back_and_its_twin_goes_on() {
    let mut c = Cluster::new(1000).unwrap();
    c.start_site("site-a", &["edge-a1"], &[], "iot-a", "wind_turbine:1")
        .unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let id = "site-a/wt-01";
    let before = eventually(WAIT, "streaming", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (vib_seq(&t) >= 20).then_some(t)
    })
    .await;
    let block = twinmesh_actors::gateway::GatewayConfig::default().seq_block;
    assert!(vib_seq(&before) < block, "still in the first block");

    c.kill9("iot-a");
    c.restart("iot-a").unwrap();
    // The restarted gateway numbers from its next block; the twin applies those frames.
    eventually(WAIT, "frames of the restarted gateway applied", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (vib_seq(&t) > block + 10).then_some(())
    })
    .await;
}
