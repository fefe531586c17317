//! End-to-end attacks on the fabric (issue 20): what anyone who reaches Zenoh can send —
//! a forged caller, a forged mesh request, forged control messages and frames — against
//! real node processes. Each test also shows that the same path works for whoever holds
//! the right key, so a refusal is the trust model at work, not a broken path.

use std::path::Path;
use std::time::Duration;

use prost::Message;
use zenoh::bytes::Encoding;

use twinmesh_actors::seal::KeyRing;
use twinmesh_actors::trust::Trust;
use twinmesh_proto::v1::{
    self as proto, mesh_reply, mesh_request, twin_reply, twin_request, Caller, MeshReply,
    MeshRequest, TwinReply, TwinRequest,
};
use twinmesh_proto::Wire;
use twinmesh_tests::{eventually, get_placement, get_twin, zenoh_client, zenoh_peer, Cluster};

const WAIT: Duration = Duration::from_secs(60);
const METER: &str = "site-a/pm-01";
const PERSONAL: &str = "household_energy";
const PUBLIC: &str = "voltage";

fn now_ms() -> i64 {
    twinmesh_tests::now_ns() / 1_000_000
}

fn ring(path: &Path) -> KeyRing {
    twinmesh_nodes::config::load_key_ring(path, "key").unwrap()
}

/// A caller as an attacker writes it: the twin's own site, the highest role, a made-up
/// tag and a valid-looking expiry.
fn forged_caller() -> Caller {
    Caller {
        site: "site-a".into(),
        role: "data_owner".into(),
        subject: "mallory".into(),
        node: "edge-a".into(),
        expires_ms: now_ms() + 10_000,
        mesh_tag: vec![0x42; 32],
        site_tag: vec![0x42; 32],
        ..Default::default()
    }
}

/// Sends a twin request on the twin's RPC key from `session`, as it is (no vouching).
async fn ask_twin(session: &zenoh::Session, twin: &str, req: &TwinRequest) -> twin_reply::Reply {
    try_ask_twin(session, twin, req)
        .await
        .expect("the twin answers")
}

/// [`ask_twin`], `None` while no twin answers.
async fn try_ask_twin(
    session: &zenoh::Session,
    twin: &str,
    req: &TwinRequest,
) -> Option<twin_reply::Reply> {
    let replies = session
        .get(format!("twinmesh/rpc/twins/{twin}"))
        .payload(req.encode_to_vec())
        .encoding(Encoding::from(TwinRequest::ENCODING))
        .timeout(Duration::from_secs(10))
        .await
        .unwrap();
    let reply = replies.recv_async().await.ok()?;
    let sample = reply.result().ok()?;
    TwinReply::decode(&*sample.payload().to_bytes()).ok()?.reply
}

async fn ask_mesh(session: &zenoh::Session, req: &MeshRequest) -> mesh_reply::Reply {
    let replies = session
        .get("twinmesh/mesh/requests")
        .payload(req.encode_to_vec())
        .encoding(Encoding::from(MeshRequest::ENCODING))
        .timeout(Duration::from_secs(10))
        .await
        .unwrap();
    let reply = replies.recv_async().await.expect("the authority answers");
    let sample = reply.result().expect("an answer, not an error");
    MeshReply::decode(&*sample.payload().to_bytes())
        .unwrap()
        .reply
        .unwrap()
}

fn twin_request(caller: Caller, r: twin_request::Request) -> TwinRequest {
    TwinRequest {
        caller: Some(caller),
        request: Some(r),
    }
}

fn get_twin_request(caller: Caller) -> TwinRequest {
    twin_request(
        caller,
        twin_request::Request::GetTwin(proto::GetTwinRequest {
            twin_id: METER.into(),
        }),
    )
}

fn denied(reply: &twin_reply::Reply, what: &str) {
    match reply {
        twin_reply::Reply::Error(e) => assert_eq!(
            e.code,
            proto::ErrorCode::PermissionDenied as i32,
            "{what}: {e:?}"
        ),
        other => panic!("{what} was not refused: {other:?}"),
    }
}

fn mesh_denied(reply: &mesh_reply::Reply, what: &str) {
    match reply {
        mesh_reply::Reply::Error(e) => assert_eq!(
            e.code,
            proto::ErrorCode::PermissionDenied as i32,
            "{what}: {e:?}"
        ),
        other => panic!("{what} was not refused: {other:?}"),
    }
}

fn twin_of(reply: twin_reply::Reply) -> proto::Twin {
    match reply {
        twin_reply::Reply::Twin(t) => t,
        other => panic!("not a twin: {other:?}"),
    }
}

/// The meter's last applied seq of `signal`, as its site sees it.
async fn seq_of(edge_grpc: &str, signal: &str) -> u64 {
    get_twin(edge_grpc, METER)
        .await
        .ok()
        .and_then(|t| t.reported.get(signal).map(|r| r.seq))
        .unwrap_or(0)
}

/// Waits until the meter has applied `more` frames of `signal` beyond what it had.
async fn applies_more(edge_grpc: &str, signal: &str, more: u64, what: &str) -> u64 {
    let from = seq_of(edge_grpc, signal).await;
    eventually(WAIT, what, || async move {
        let s = seq_of(edge_grpc, signal).await;
        (s >= from + more).then_some(s)
    })
    .await
}

/// The attacks of a caller who reaches the fabric with `session` but holds no mesh key:
/// reads see public values only, and no write, ledger step, move or drain happens.
async fn forged_callers_change_nothing(c: &Cluster, session: &zenoh::Session) {
    let edge = c.node("edge-a").grpc_endpoint();
    let cloud = c.node("cloud").grpc_endpoint();

    // Read: the personal value is not in the answer (its name is listed as withheld).
    let t = twin_of(ask_twin(session, METER, &get_twin_request(forged_caller())).await);
    assert!(!t.reported.contains_key(PERSONAL), "{:?}", t.reported);
    assert!(
        t.withheld.contains(&PERSONAL.to_owned()),
        "{:?}",
        t.withheld
    );
    assert!(
        t.reported.contains_key(PUBLIC),
        "public values stay readable"
    );

    // Writes, each refused by the twin itself.
    let mut policy = get_twin(&edge, METER).await.unwrap().policy.unwrap();
    let sp = policy.signals.get_mut(PERSONAL).unwrap();
    sp.sensitivity = proto::Sensitivity::Public as i32;
    sp.mechanism.clear();
    let writes = [
        (
            "SetPolicy",
            twin_request::Request::SetPolicy(proto::SetPolicyRequest {
                policy: Some(policy),
                ..Default::default()
            }),
        ),
        (
            "SetDesired",
            twin_request::Request::SetDesired(proto::SetDesiredRequest {
                twin_id: METER.into(),
                property: "tariff_limit".into(),
                value: 1.0,
                expected_revision: None,
            }),
        ),
        (
            "Freeze",
            twin_request::Request::Freeze(proto::FreezeRequest {
                twin_id: METER.into(),
                epoch: get_placement(&cloud, METER).await.unwrap().epoch,
                release: false,
                timeout_ms: 60_000,
            }),
        ),
        (
            "Contribute refund",
            twin_request::Request::Contribute(proto::ContributeRequest {
                twin_id: METER.into(),
                signal: PERSONAL.into(),
                start_ns: 0,
                end_ns: twinmesh_tests::now_ns(),
                epsilon: 5.0,
                delta: 0.0,
                refund: true,
                release_id: "forged".into(),
            }),
        ),
    ];
    for (what, r) in writes {
        denied(
            &ask_twin(session, METER, &twin_request(forged_caller(), r)).await,
            what,
        );
    }
    // ... so the policy is unchanged and the twin, not frozen, goes on applying frames.
    let p = get_twin(&edge, METER).await.unwrap().policy.unwrap();
    assert_eq!(
        p.signals[PERSONAL].sensitivity,
        proto::Sensitivity::Personal as i32
    );
    applies_more(&edge, PUBLIC, 3, "frames applied after the forged freeze").await;

    // Mesh requests: ledger steps, a move and a drain.
    let placed = get_placement(&cloud, METER).await.unwrap();
    let mesh = [
        (
            "SiteBudget refund",
            mesh_request::Request::SiteBudget(proto::SiteBudgetRequest {
                site: "site-a".into(),
                release_id: "forged".into(),
                epsilon: 100.0,
                delta: 0.0,
                refund: true,
            }),
        ),
        (
            "SiteBudget charge",
            mesh_request::Request::SiteBudget(proto::SiteBudgetRequest {
                site: "site-a".into(),
                release_id: "forged".into(),
                epsilon: 5.0,
                delta: 0.0,
                refund: false,
            }),
        ),
        (
            "MigrateTwin",
            mesh_request::Request::Migrate(proto::MigrateTwinRequest {
                twin_id: METER.into(),
                target_node: "cloud".into(),
                target_tier: String::new(),
                unpin: false,
            }),
        ),
        (
            "DrainNode",
            mesh_request::Request::Drain(proto::DrainNodeRequest {
                node: "edge-a".into(),
            }),
        ),
    ];
    for (what, r) in mesh {
        let req = MeshRequest {
            request: Some(r),
            caller: Some(forged_caller()),
        };
        mesh_denied(&ask_mesh(session, &req).await, what);
    }
    let now = get_placement(&cloud, METER).await.unwrap();
    assert_eq!(
        (now.node.as_str(), now.epoch),
        (placed.node.as_str(), placed.epoch)
    );
}

/// Positive controls: an edge of the site, holding the mesh key and the site key, does
/// see the personal value; a holder of the mesh key alone (the cloud) claiming site-a
/// does not.
async fn only_the_sites_edge_proves_the_site(c: &Cluster, session: &zenoh::Session) {
    let keys = c.dir.path().join("keys");
    let mesh_key = ring(&keys.join("mesh.key"));
    let site_key = ring(&keys.join("site-a.key"));
    let edge = Trust::new("edge-a", "site-a")
        .with_mesh_key(&mesh_key)
        .with_site_key(&site_key);
    let mut on_site = get_twin_request(Caller {
        role: "data_operator".into(),
        ..Default::default()
    });
    edge.vouch(&mut on_site, now_ms());
    let t = twin_of(ask_twin(session, METER, &on_site).await);
    assert!(t.reported.contains_key(PERSONAL), "{:?}", t.reported);

    let cloud_as_site_a = Trust::new("cloud", "site-a").with_mesh_key(&mesh_key);
    let mut claimed = get_twin_request(Caller {
        role: "data_owner".into(),
        ..Default::default()
    });
    cloud_as_site_a.vouch(&mut claimed, now_ms());
    let t = twin_of(ask_twin(session, METER, &claimed).await);
    assert!(!t.reported.contains_key(PERSONAL), "{:?}", t.reported);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_client_with_a_forged_caller_reads_no_personal_value_and_changes_nothing() {
    let mut c = Cluster::new(1000).unwrap();
    c.start_site("site-a", &["edge-a"], &[], "iot-a", "power_meter:1")
        .unwrap();
    let edge = c.node("edge-a").grpc_endpoint();
    applies_more(&edge, PERSONAL, 2, "the meter's personal signal applied").await;
    // A Zenoh client of the cloud's listener, as anyone on the network could open.
    let outside = zenoh_client(&c.node("cloud").ready.zenoh[0]).await;
    forged_callers_change_nothing(&c, &outside).await;
    only_the_sites_edge_proves_the_site(&c, &outside).await;
}

/// A node's `--tls-*` arguments with the ACL roster.
fn tls_acl_args(certs: &Path, name: &str, roster: &Path) -> Vec<String> {
    let mut a = twinmesh_tests::tls_args(certs, name);
    a.extend(["--acl".to_owned(), roster.display().to_string()]);
    a
}

/// A mutual-TLS Zenoh client with the certificate `name`.
async fn tls_client(endpoint: &str, certs: &Path, name: &str) -> zenoh::Session {
    let (cert, key) = (
        certs.join(format!("{name}.pem")),
        certs.join(format!("{name}.key")),
    );
    twinmesh_tests::zenoh_tls_client(endpoint, &certs.join("ca.pem"), Some((&cert, &key)))
        .await
        .unwrap()
}

/// The secure shape of `up --secure`: mutual TLS, the generated access-control list, a
/// read-only certificate. The reader may query twins (dashboards do), but its requests
/// are an anonymous viewer's; a gateway's certificate registers only its own site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_certificate_and_a_gateway_certificate_cannot_act_beyond_their_place() {
    let mut c = Cluster::new(1000).unwrap();
    let certs = c.dir.path().join("certs");
    twinmesh_nodes::certs::init_ca(&certs, "test CA", 30).unwrap();
    for n in ["cloud", "edge-a", "iot-a", "reader"] {
        twinmesh_nodes::certs::issue(&certs, n, &[], 30).unwrap();
    }
    let roster = c.dir.path().join("acl.toml");
    std::fs::write(
        &roster,
        "mesh = [\"cloud\", \"edge-a\"]\nreaders = [\"reader\"]\n\
         [gateways]\nsite-a = [\"iot-a\"]\n",
    )
    .unwrap();
    let quic = Some("quic/127.0.0.1:0");
    let a = tls_acl_args(&certs, "cloud", &roster);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    c.start("cloud", "cloud", None, quic, &a).unwrap();
    let a = tls_acl_args(&certs, "edge-a", &roster);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    c.start("edge", "edge-a", Some("site-a"), quic, &a).unwrap();
    let mut a = tls_acl_args(&certs, "iot-a", &roster);
    a.extend(["--simulate".to_owned(), "power_meter:1".to_owned()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    c.start("iot", "iot-a", Some("site-a"), quic, &a).unwrap();

    // The test's own gRPC reads go over TLS; the edge's gRPC is on its site.
    let edge_zenoh = c.node("edge-a").ready.zenoh[0].clone();
    let reader = tls_client(&edge_zenoh, &certs, "reader").await;
    // The meter streams: the reader's view shows its public signal moving.
    eventually(WAIT, "the meter streaming under the ACL", || async {
        match try_ask_twin(&reader, METER, &get_twin_request(Caller::default())).await? {
            twin_reply::Reply::Twin(t) => t.reported.get(PUBLIC).filter(|r| r.seq >= 3).map(|_| ()),
            _ => None,
        }
    })
    .await;
    let t = twin_of(ask_twin(&reader, METER, &get_twin_request(forged_caller())).await);
    assert!(!t.reported.contains_key(PERSONAL), "{:?}", t.reported);
    let policy = |forged: bool| {
        let mut p = t.policy.clone().unwrap();
        if forged {
            let sp = p.signals.get_mut(PERSONAL).unwrap();
            sp.sensitivity = proto::Sensitivity::Public as i32;
            sp.mechanism.clear();
        }
        p
    };
    denied(
        &ask_twin(
            &reader,
            METER,
            &twin_request(
                forged_caller(),
                twin_request::Request::SetPolicy(proto::SetPolicyRequest {
                    policy: Some(policy(true)),
                    ..Default::default()
                }),
            ),
        )
        .await,
        "SetPolicy from the reader",
    );
    let req = MeshRequest {
        request: Some(mesh_request::Request::Drain(proto::DrainNodeRequest {
            node: "edge-a".into(),
        })),
        caller: Some(forged_caller()),
    };
    mesh_denied(&ask_mesh(&reader, &req).await, "DrainNode from the reader");
    let after = twin_of(ask_twin(&reader, METER, &get_twin_request(Caller::default())).await);
    assert_eq!(after.policy, Some(policy(false)));

    // The site-a gateway's certificate registers a site-b twin: not through a site-b
    // key (the ACL), not by naming it in the payload of a site-a key (the authority).
    let gateway = tls_client(&edge_zenoh, &certs, "iot-a").await;
    let register = |key: &str| {
        let req = proto::PlacementRequest {
            twin_id: "site-b/pm-66".into(),
            kind: "power_meter".into(),
            gateway: "iot-a".into(),
            chain: None,
            thing_model: String::new(),
            proof: None,
        };
        let (gateway, key) = (&gateway, key.to_owned());
        async move {
            let replies = gateway
                .get(key)
                .payload(req.encode_to_vec())
                .encoding(Encoding::from(proto::PlacementRequest::ENCODING))
                .timeout(Duration::from_secs(5))
                .await
                .unwrap();
            let mut n = 0;
            while let Ok(r) = replies.recv_async().await {
                n += usize::from(r.result().is_ok());
            }
            n
        }
    };
    assert_eq!(register("twinmesh/placement/site-b/pm-66").await, 0);
    assert_eq!(register("twinmesh/placement/site-a/pm-66").await, 0);
    // The reader may query placement keys (dashboards do): its registration of a
    // site-a twin carries no proof under the site's control key.
    let req = proto::PlacementRequest {
        twin_id: "site-a/pm-77".into(),
        kind: "power_meter".into(),
        gateway: "reader".into(),
        ..Default::default()
    };
    let replies = reader
        .get("twinmesh/placement/site-a/pm-77")
        .payload(req.encode_to_vec())
        .encoding(Encoding::from(proto::PlacementRequest::ENCODING))
        .timeout(Duration::from_secs(5))
        .await
        .unwrap();
    let mut answered = 0;
    while let Ok(r) = replies.recv_async().await {
        answered += usize::from(r.result().is_ok());
    }
    assert_eq!(answered, 0, "the reader registered a twin");
    // Nothing was placed: the authority does not know the twin.
    let placements = reader
        .get("twinmesh/placement/**")
        .timeout(Duration::from_secs(5))
        .await
        .unwrap();
    let mut ids = Vec::new();
    while let Ok(r) = placements.recv_async().await {
        if let Ok(s) = r.result() {
            if let Ok(p) = proto::Placement::decode(&*s.payload().to_bytes()) {
                ids.push(p.twin_id);
            }
        }
    }
    assert!(ids.contains(&METER.to_owned()), "{ids:?}");
    assert!(
        !ids.iter()
            .any(|i| i.contains("pm-66") || i.contains("pm-77")),
        "{ids:?}"
    );
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn frame(signal: &str, seq: u64, samples: Vec<f64>, packed: Vec<u8>) -> proto::TelemetryFrame {
    proto::TelemetryFrame {
        twin_id: METER.into(),
        signal: signal.into(),
        seq,
        start_ns: twinmesh_tests::now_ns(),
        sample_period_ns: 1_000_000,
        samples,
        spool_base_seq: seq,
        scale: 1.0,
        packed,
        ..Default::default()
    }
}

async fn put<M: Message + Wire>(session: &zenoh::Session, key: &str, m: &M) {
    session
        .put(key, m.encode_to_vec())
        .encoding(Encoding::from(M::ENCODING))
        .await
        .unwrap();
}

/// Frames and control messages as anyone on the fabric (no key) and as an insider
/// gateway of the site (its control key) could send them: nothing is lost, nothing is
/// unsealed, and a frame's samples are bounded whatever its bytes say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_frames_and_control_messages_lose_nothing_and_unseal_nothing() {
    let mut c = Cluster::new(1000).unwrap();
    c.start_site("site-a", &["edge-a"], &[], "iot-a", "power_meter:1")
        .unwrap();
    let edge = c.node("edge-a").grpc_endpoint();
    applies_more(&edge, PERSONAL, 2, "the meter streaming").await;
    let attacker = zenoh_peer(&c.endpoints()).await;
    let insider = twinmesh_tests::gateway_trust(c.dir.path(), "site-a").unwrap();
    let personal_frames = attacker
        .declare_subscriber(format!("twinmesh/telemetry/{METER}/{PERSONAL}"))
        .await
        .unwrap();

    // No key: a chain update that would make the personal signal travel raw, a
    // watermark of the highest epoch (it would fence out every real one) and one past
    // every frame (it would truncate the spool), a set-point.
    put(
        &attacker,
        &format!("twinmesh/chains/{METER}"),
        &proto::ChainUpdate {
            twin_id: METER.into(),
            revision: u64::MAX,
            sealed_signals: vec![],
            ..Default::default()
        },
    )
    .await;
    for (seq, epoch) in [(1_000_000_000, u64::MAX), (u64::MAX, 1)] {
        for signal in [PERSONAL, PUBLIC] {
            put(
                &attacker,
                &format!("twinmesh/acks/{METER}"),
                &proto::Watermark {
                    twin_id: METER.into(),
                    signal: signal.into(),
                    seq,
                    epoch,
                    proof: None,
                },
            )
            .await;
        }
    }
    // An insider gateway's frames: seq 10^12 (with a matching spool base), seq u64::MAX,
    // and a packed frame of 10^8 samples in under 1 MiB; the same without a proof.
    let rss_before = rss_bytes(c.node("edge-a").pid());
    let mut huge = Vec::new();
    twinmesh_twins::dsp::codec::encode(&vec![0.0; 100_000_000], 1.0, &mut huge);
    assert!(huge.len() < 1 << 20);
    let key = format!("twinmesh/telemetry/{METER}/{PUBLIC}");
    let next = seq_of(&edge, PUBLIC).await + 1;
    for (f, prove) in [
        (frame(PUBLIC, 1_000_000_000_000, vec![1.0], vec![]), true),
        (frame(PUBLIC, u64::MAX, vec![1.0], vec![]), true),
        (frame(PUBLIC, next, vec![], huge.clone()), true),
        (frame(PUBLIC, next, vec![], huge), false),
        (frame(PUBLIC, next, vec![9.0e9], vec![]), false),
    ] {
        let mut f = f;
        if prove {
            assert!(insider.prove("site-a", &mut f));
        }
        put(&attacker, &key, &f).await;
    }

    // Later real frames are applied and acknowledged as before: the gateway's numbers
    // go on from where they were, for both signals.
    let public = applies_more(&edge, PUBLIC, 5, "real frames after the forged ones").await;
    assert!(public < 1_000_000, "a forged seq was applied: {public}");
    applies_more(&edge, PERSONAL, 5, "personal frames after the forged ones").await;
    let t = get_twin(&edge, METER).await.unwrap();
    assert!(t.reported[PUBLIC].value < 1.0e9, "{:?}", t.reported[PUBLIC]);
    let grown = rss_bytes(c.node("edge-a").pid()).saturating_sub(rss_before);
    assert!(grown < 50 << 20, "the edge grew by {grown} bytes");

    // The personal signal's frames still travel sealed.
    let mut sealed = 0;
    while sealed < 3 {
        let s = tokio::time::timeout(WAIT, personal_frames.recv_async())
            .await
            .expect("personal frames keep coming")
            .unwrap();
        let f = proto::TelemetryFrame::decode(&*s.payload().to_bytes()).unwrap();
        assert!(
            f.samples.is_empty() && f.packed.is_empty(),
            "raw on the fabric: {f:?}"
        );
        assert!(!f.sealed.is_empty());
        sealed += 1;
    }
    // (What the forged watermarks would have done to the gateway's spool is asserted
    // in sim/tests/actors.rs, gateway_truncates_its_spool_on_a_valid_watermark.)
    let placed = get_placement(&c.node("cloud").grpc_endpoint(), METER)
        .await
        .unwrap();
    assert_eq!(placed.node, "edge-a");
}

/// The default mesh, as `twinmesh up` runs it: an outside Zenoh client on the cloud's
/// listener, forging an on-site data owner, gets no personal value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_plain_up_an_outside_client_with_a_forged_caller_reads_no_personal_value() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let zenoh = format!("tcp/127.0.0.1:{port}");
    let _up = twinmesh_tests::UpProc::start(
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
    let outside = zenoh_client(&zenoh).await;
    let t = eventually(
        WAIT,
        "the meter's public signal through the fabric",
        || async {
            match try_ask_twin(&outside, METER, &get_twin_request(forged_caller())).await? {
                twin_reply::Reply::Twin(t) => t
                    .reported
                    .get(PUBLIC)
                    .filter(|r| r.seq >= 2)
                    .map(|_| t.clone()),
                _ => None,
            }
        },
    )
    .await;
    assert!(!t.reported.contains_key(PERSONAL), "{:?}", t.reported);
    assert!(
        t.withheld.contains(&PERSONAL.to_owned()),
        "{:?}",
        t.withheld
    );
}

/// A replica forged with the highest revision (and a policy that makes the personal
/// signal public) does not survive the next failover: the cloud keeps only replicas its
/// owner proves at its epoch, so the new owner starts from the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_replica_does_not_survive_the_next_failover() {
    let mut c = Cluster::two_edges_of_site_a("power_meter:1").unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let owner = eventually(WAIT, "the meter placed and streaming", || async {
        let p = get_placement(&cloud, METER).await.ok()?;
        let edge = c.node(&p.node).grpc_endpoint();
        (seq_of(&edge, PUBLIC).await >= 3).then_some(p.node)
    })
    .await;
    let edge = c.node(&owner).grpc_endpoint();
    let real = get_twin(&edge, METER).await.unwrap();
    let mut forged = real.clone();
    forged.revision = u64::MAX;
    let p = forged.policy.as_mut().unwrap();
    let sp = p.signals.get_mut(PERSONAL).unwrap();
    sp.sensitivity = proto::Sensitivity::Public as i32;
    sp.mechanism.clear();
    let placed = get_placement(&cloud, METER).await.unwrap();
    let attacker = zenoh_peer(&c.endpoints()).await;
    for (epoch, node) in [(placed.epoch, owner.as_str()), (u64::MAX, "edge-evil")] {
        put(
            &attacker,
            &format!("twinmesh/snapshots/{METER}"),
            &proto::TwinSnapshot {
                twin: Some(forged.clone()),
                epoch,
                saved_ns: twinmesh_tests::now_ns(),
                node: node.into(),
                site_only: false,
                proof: Some(proto::Proof {
                    node: node.into(),
                    tag: vec![0x42; 32],
                }),
            },
        )
        .await;
    }
    // The owner goes on replicating (frames change it); then it dies.
    applies_more(&edge, PUBLIC, 3, "the owner applying frames").await;
    c.kill9(&owner);
    let survivor = if owner == "edge-a1" {
        "edge-a2"
    } else {
        "edge-a1"
    };
    let new_edge = c.node(survivor).grpc_endpoint();
    let t = eventually(WAIT, "the meter failed over", || async {
        let t = get_twin(&new_edge, METER).await.ok()?;
        (t.placement.as_ref()?.node == survivor).then_some(t)
    })
    .await;
    assert!(t.revision < u64::MAX / 2, "revision {}", t.revision);
    let p = t.policy.unwrap();
    assert_eq!(
        p.signals[PERSONAL].sensitivity,
        proto::Sensitivity::Personal as i32
    );
}

/// Starts the cloud of `c` with the store failpoint `name` set to `value` (in its
/// process only).
fn start_cloud_with(c: &mut Cluster, name: &str, value: &str) {
    let data = c.data("cloud").display().to_string();
    let mut args = twinmesh_tests::node_args(twinmesh_tests::CLOUD, "tcp/127.0.0.1:0", &[], &data);
    args.extend(["--lease-ms".to_owned(), "1000".to_owned()]);
    let cloud =
        twinmesh_tests::NodeProc::start_with_env(&args, &c.logs(), "cloud", &[(name, value)])
            .unwrap();
    c.nodes.insert("cloud".into(), cloud);
}

/// The placement authority's store fails one write (the placement a join makes): the
/// authority is restarted, placements go on, and gRPC health says NOT_SERVING while it is
/// down (real processes; the failpoint is `TWINMESH_FAILPOINT_PLACEMENT_SAVES`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placement_authority_is_restarted_after_a_store_failure_and_health_says_so() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut c = Cluster::new(1000).unwrap();
    // The gateway's registration (a stale placement: no edge yet) goes through; the
    // placement of the edge's join fails.
    start_cloud_with(
        &mut c,
        twinmesh_nodes::store::FAILPOINT_PLACEMENT_SAVES,
        "1:1",
    );
    c.start(
        "iot",
        "iot-a",
        Some("site-a"),
        None,
        &["--simulate", "crankshaft_line:1"],
    )
    .unwrap();
    let grpc = c.node("cloud").grpc_endpoint();
    let id = "site-a/cs-01";
    eventually(
        WAIT,
        "the twin registered, stale without an edge",
        || async {
            let p = get_placement(&grpc, id).await.ok()?;
            (p.status == "stale").then_some(())
        },
    )
    .await;
    // Watch the cloud's health from now on.
    let channel = tonic::transport::Channel::from_shared(grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let w = watching.clone();
    let poller = tokio::spawn(async move {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while w.load(std::sync::atomic::Ordering::Relaxed) && tokio::time::Instant::now() < deadline
        {
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                let s = r.into_inner().status;
                if seen.last() != Some(&s) {
                    seen.push(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    });
    c.start("edge", "edge-a", Some("site-a"), None, &[])
        .unwrap();
    let edge = c.node("edge-a").grpc_endpoint();
    // Placements go on: the restarted authority places the twin on the edge.
    eventually(
        WAIT,
        "the twin placed on the edge and streaming",
        || async {
            let p = get_placement(&grpc, id).await.ok()?;
            let t = get_twin(&edge, id).await.ok()?;
            (p.node == "edge-a" && p.status == "active" && !t.reported.is_empty()).then_some(())
        },
    )
    .await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = poller.await.unwrap();
    let (serving, not_serving) = (
        ServingStatus::Serving as i32,
        ServingStatus::NotServing as i32,
    );
    let down = seen.iter().position(|s| *s == not_serving);
    assert!(down.is_some(), "health never said NOT_SERVING: {seen:?}");
    assert_eq!(seen.last(), Some(&serving), "{seen:?}");
    assert!(
        c.node("cloud").log().contains("placement write failed"),
        "the failpoint was not hit"
    );
}

/// A migration whose commit becomes durable only after its deadline (the cloud's flush
/// after the move's placement write is held back past it): the move is refused, the
/// twin stays where it was, unfrozen, and goes on applying frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_committed_after_its_deadline_leaves_the_twin_unfrozen_and_acking() {
    let mut c = Cluster::new(1000).unwrap();
    // Two placement writes go through (the registration, and the record of the twin's
    // site-only policy); the flush after the third (the move's) waits 12 s, past the
    // migration's 10 s deadline.
    start_cloud_with(
        &mut c,
        twinmesh_nodes::store::FAILPOINT_PLACEMENT_FLUSH_DELAY,
        "2:12000",
    );
    for e in ["edge-a1", "edge-a2"] {
        c.start("edge", e, Some("site-a"), None, &[]).unwrap();
    }
    c.start(
        "iot",
        "iot-a",
        Some("site-a"),
        None,
        &["--simulate", "crankshaft_line:1"],
    )
    .unwrap();
    let grpc = c.node("cloud").grpc_endpoint();
    let id = "site-a/cs-01";
    let placed = eventually(WAIT, "the twin placed, its policy recorded", || async {
        let p = get_placement(&grpc, id).await.ok()?;
        (p.status == "active" && p.site_only).then_some(p)
    })
    .await;
    let edge = c.node(&placed.node).grpc_endpoint();
    let signal = eventually(WAIT, "the twin applying frames", || async {
        let t = get_twin(&edge, id).await.ok()?;
        t.reported.keys().next().cloned()
    })
    .await;
    let other = if placed.node == "edge-a1" {
        "edge-a2"
    } else {
        "edge-a1"
    };
    let moved = twinmesh_tests::migrate_twin(&grpc, id, other).await;
    assert!(moved.is_err(), "a late commit was accepted: {moved:?}");
    // The twin runs on where it was, at its epoch, and applies (and so acknowledges:
    // its gateway goes on sending new frames only within its spool) new frames.
    let seq = |t: &proto::Twin| t.reported.get(&signal).map_or(0, |r| r.seq);
    let before = seq(&get_twin(&edge, id).await.unwrap());
    eventually(WAIT, "frames applied after the refused move", || async {
        let t = get_twin(&edge, id).await.ok()?;
        (seq(&t) >= before + 5).then_some(())
    })
    .await;
    let now = eventually(WAIT, "the authority answering again", || async {
        get_placement(&grpc, id).await.ok()
    })
    .await;
    assert_eq!(
        (now.node.as_str(), now.epoch),
        (placed.node.as_str(), placed.epoch)
    );
    // The twin unfroze by its own deadline (the commit was late, not refused early).
    assert!(
        c.node(&placed.node)
            .log()
            .contains("freeze expired before the move was committed"),
        "the twin did not thaw by its deadline"
    );
}

/// Plain mode lets anyone declare a queryable on a twin's RPC key, so a rogue receives
/// the requests that nodes vouch for (a query goes to every queryable of its key) and
/// may answer before the twin. Replayed, a captured request is an anonymous viewer's (no
/// personal value, no write); a forged answer is never what a gRPC caller gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_queryable_can_neither_replay_vouched_requests_nor_answer_for_the_twin() {
    use std::sync::{Arc, Mutex};
    use zenoh::Wait;
    let mut c = Cluster::new(1000).unwrap();
    c.start_site("site-a", &["edge-a"], &[], "iot-a", "power_meter:1")
        .unwrap();
    let edge = c.node("edge-a").grpc_endpoint();
    let cloud = c.node("cloud").grpc_endpoint();
    applies_more(&edge, PERSONAL, 2, "the meter's personal signal applied").await;

    // The rogue: captures every request on the meter's key and answers each with a twin
    // of its own making.
    let rogue = zenoh_client(&c.node("cloud").ready.zenoh[0]).await;
    let captured: Arc<Mutex<Vec<TwinRequest>>> = Arc::default();
    let forged = TwinReply {
        reply: Some(twin_reply::Reply::Twin(proto::Twin {
            twin_id: METER.into(),
            derived: [("forged".to_owned(), 4242.0)].into_iter().collect(),
            ..Default::default()
        })),
        proof: None,
    }
    .encode_to_vec();
    let sink = captured.clone();
    let queryable = rogue
        .declare_queryable(format!("twinmesh/rpc/twins/{METER}"))
        .callback(move |q: zenoh::query::Query| {
            if let Some(p) = q.payload() {
                if let Ok(r) = TwinRequest::decode(&*p.to_bytes()) {
                    sink.lock().unwrap().push(r);
                }
            }
            let _ = q.reply(q.key_expr().clone(), forged.clone()).wait();
        })
        .await
        .unwrap();

    // gRPC callers on the site and through the cloud get the twin, never the rogue's.
    for round in 0..5 {
        for endpoint in [&edge, &cloud] {
            let t = get_twin(endpoint, METER).await.unwrap();
            assert!(
                !t.derived.contains_key("forged"),
                "round {round}: the rogue answered for the twin through {endpoint}"
            );
            assert!(t.reported.contains_key(PUBLIC), "{:?}", t.reported);
        }
    }
    assert!(get_twin(&edge, METER)
        .await
        .unwrap()
        .reported
        .contains_key(PERSONAL));
    // A data operator's set-point through the site's edge, captured on its way.
    let set = |value: f64| {
        let edge = edge.clone();
        async move {
            twinmesh_tests::twin_client(&edge)
                .await
                .set_desired(proto::SetDesiredRequest {
                    twin_id: METER.into(),
                    property: "demand_limit".into(),
                    value,
                    expected_revision: None,
                })
                .await
                .unwrap()
        }
    };
    set(7.0).await;
    set(9.0).await;
    drop(queryable);

    let captured = captured.lock().unwrap().clone();
    let on_site_get = captured
        .iter()
        .find(|r| {
            matches!(r.request, Some(twin_request::Request::GetTwin(_)))
                && r.caller
                    .as_ref()
                    .is_some_and(|c| c.node == "edge-a" && !c.mesh_tag.is_empty())
        })
        .expect("a GetTwin the site's edge vouched for was captured")
        .clone();
    let set_7 = captured
        .iter()
        .find(
            |r| matches!(&r.request, Some(twin_request::Request::SetDesired(s)) if s.value == 7.0),
        )
        .expect("the set-point was captured")
        .clone();
    // Replayed within its lifetime: a viewer's view, and the write is refused.
    let t = twin_of(ask_twin(&rogue, METER, &on_site_get).await);
    assert!(!t.reported.contains_key(PERSONAL), "{:?}", t.reported);
    assert!(
        t.withheld.contains(&PERSONAL.to_owned()),
        "{:?}",
        t.withheld
    );
    denied(
        &ask_twin(&rogue, METER, &set_7).await,
        "a replayed set-point",
    );
    let t = get_twin(&edge, METER).await.unwrap();
    assert_eq!(t.desired["demand_limit"].value, 9.0, "{:?}", t.desired);
}
