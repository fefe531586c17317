//! End-to-end tests of security (issue 5): nodes with mutual TLS refuse plaintext
//! clients and certificates of another CA; gRPC over TLS; bearer tokens that are
//! expired, forged or for another audience are refused, and a viewer cannot command a
//! set-point.

use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tonic::Code;

use twinmesh_proto::v1::mesh_service_client::MeshServiceClient;
use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_proto::v1::{GetTwinRequest, ListNodesRequest, SetDesiredRequest};
use twinmesh_tests::{eventually, tls_args, twin_client, zenoh_tls_client, Cluster};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_nodes_refuse_plaintext_and_certificates_of_another_ca() {
    let mut c = Cluster::new(1000).unwrap();
    let certs = c.dir.path().join("certs");
    twinmesh_nodes::certs::init_ca(&certs, "test CA", 30).unwrap();
    for n in ["cloud", "edge-a", "client"] {
        twinmesh_nodes::certs::issue(&certs, n, &[], 30).unwrap();
    }
    let foreign = c.dir.path().join("foreign");
    twinmesh_nodes::certs::init_ca(&foreign, "another CA", 30).unwrap();
    twinmesh_nodes::certs::issue(&foreign, "intruder", &[], 30).unwrap();

    let cloud_tls = tls_args(&certs, "cloud");
    let cloud_tls: Vec<&str> = cloud_tls.iter().map(String::as_str).collect();
    c.start("cloud", "cloud", None, Some("tls/127.0.0.1:0"), &cloud_tls)
        .unwrap();
    let edge_tls = tls_args(&certs, "edge-a");
    let edge_tls: Vec<&str> = edge_tls.iter().map(String::as_str).collect();
    c.start(
        "edge",
        "edge-a",
        Some("site-a"),
        Some("tls/127.0.0.1:0"),
        &edge_tls,
    )
    .unwrap();
    let zenoh_ep = c.node("cloud").ready.zenoh[0].clone();
    assert!(zenoh_ep.starts_with("tls/"), "{zenoh_ep}");

    // The edge joined over mutual TLS; gRPC answers over TLS with the CA.
    let https = c
        .node("cloud")
        .grpc_endpoint()
        .replace("http://", "https://");
    let ca = certs.join("ca.pem");
    let channel = twinmesh_nodes::client::connect_tls(&https, Duration::from_secs(10), Some(&ca))
        .await
        .unwrap();
    let nodes = eventually(WAIT, "the edge seen by the cloud over TLS", || {
        let channel = channel.clone();
        async move {
            let n = MeshServiceClient::new(channel)
                .list_nodes(ListNodesRequest::default())
                .await
                .ok()?
                .into_inner()
                .nodes;
            (n.len() == 2).then_some(n)
        }
    })
    .await;
    assert!(nodes.iter().any(|n| n.node == "edge-a"));
    assert!(nodes
        .iter()
        .all(|n| n.locators.iter().all(|l| l.starts_with("tls/"))));

    // Plaintext gRPC to the TLS port is no gRPC at all.
    let plain = TwinServiceClient::connect(c.node("cloud").grpc_endpoint()).await;
    if let Ok(mut client) = plain {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_twin(GetTwinRequest {
                twin_id: "site-a/x".into(),
            }),
        )
        .await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "a plaintext gRPC call was answered"
        );
    }
    // Without the CA, the client does not trust the server.
    assert!(twinmesh_nodes::client::connect_tls(
        &https,
        Duration::from_secs(5),
        Some(&foreign.join("ca.pem"))
    )
    .await
    .is_err());

    // Zenoh: with a certificate of the site CA a client connects ...
    let ok = zenoh_tls_client(
        &zenoh_ep,
        &ca,
        Some((&certs.join("client.pem"), &certs.join("client.key"))),
    )
    .await;
    assert!(ok.is_ok(), "a client with a site certificate was refused");
    drop(ok);
    // ... plaintext TCP to the same port does not ...
    let plain_ep = zenoh_ep.replace("tls/", "tcp/");
    let mut plain = zenoh::Config::default();
    plain.insert_json5("mode", "\"client\"").unwrap();
    plain
        .insert_json5("connect/endpoints", &format!("[{plain_ep:?}]"))
        .unwrap();
    plain
        .insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    assert!(
        zenoh::open(plain).await.is_err(),
        "a plaintext zenoh client connected"
    );
    // ... nor TLS without a client certificate, nor one signed by another CA.
    assert!(zenoh_tls_client(&zenoh_ep, &ca, None).await.is_err());
    assert!(
        zenoh_tls_client(
            &zenoh_ep,
            &ca,
            Some((&foreign.join("intruder.pem"), &foreign.join("intruder.key"))),
        )
        .await
        .is_err(),
        "a certificate of another CA was accepted"
    );
}

const SECRET: &[u8] = b"an-hs256-secret-of-32-bytes-or-more!";

fn token(key: &[u8], claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key).unwrap(),
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_roles_limit_what_callers_do() {
    let mut c = Cluster::new(1000).unwrap();
    let secret = c.dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let secret = secret.display().to_string();
    let auth = [
        "--auth-hs256-secret",
        secret.as_str(),
        "--auth-issuer",
        "https://idp.example",
        "--auth-audience",
        "twinmesh",
    ];
    c.start("cloud", "cloud", None, None, &auth).unwrap();
    let ep = c.node("cloud").grpc_endpoint();
    let claims = |role: &str, exp: u64| {
        serde_json::json!({"sub": format!("{role}-user"), "iss": "https://idp.example",
            "aud": "twinmesh", "exp": exp, "roles": [role]})
    };
    let call = |token: Option<String>, set: bool| {
        let ep = ep.clone();
        async move {
            let mut client = twin_client(&ep).await;
            if set {
                let mut req = tonic::Request::new(SetDesiredRequest {
                    twin_id: "site-a/wt-01".into(),
                    property: "power_limit".into(),
                    value: 1000.0,
                    expected_revision: None,
                });
                if let Some(t) = token {
                    req.metadata_mut()
                        .insert("authorization", format!("Bearer {t}").parse().unwrap());
                }
                client.set_desired(req).await.map(|_| ()).unwrap_err()
            } else {
                let mut req = tonic::Request::new(GetTwinRequest {
                    twin_id: "site-a/wt-01".into(),
                });
                if let Some(t) = token {
                    req.metadata_mut()
                        .insert("authorization", format!("Bearer {t}").parse().unwrap());
                }
                client.get_twin(req).await.map(|_| ()).unwrap_err()
            }
        }
    };
    let future = now() + 600;
    // No token, expired, forged, wrong audience: unauthenticated.
    let e = call(None, false).await;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = call(
        Some(token(SECRET, claims("data_owner", now() - 3600))),
        false,
    )
    .await;
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{e:?}");
    let e = call(
        Some(token(
            b"not-the-secret-not-the-secret-xxxx",
            claims("data_owner", future),
        )),
        false,
    )
    .await;
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("signature"), "{e:?}");
    let mut wrong_aud = claims("data_owner", future);
    wrong_aud["aud"] = "another-service".into();
    let e = call(Some(token(SECRET, wrong_aud)), false).await;
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("audience"), "{e:?}");
    // A viewer may read (the twin is unknown: NOT_FOUND, past authentication) but not
    // command a set-point.
    let viewer = token(SECRET, claims("viewer", future));
    let e = call(Some(viewer.clone()), false).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = call(Some(viewer), true).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("data_operator"), "{e:?}");
    // A data operator may.
    let e = call(Some(token(SECRET, claims("data_operator", future))), true).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // The secret never shows in the node's log.
    let log = c.node("cloud").log();
    assert!(!log.contains(std::str::from_utf8(SECRET).unwrap()));
}

/// Samples of one subscriber, kept for later assertions.
fn collect(
    sub: &zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>,
) -> Vec<String> {
    let mut keys = Vec::new();
    while let Ok(Some(s)) = sub.try_recv() {
        keys.push(s.key_expr().to_string());
    }
    keys
}

/// The ACL generated from the roster (item 6): the mesh runs under it; a gateway's
/// certificate publishes only its own site's telemetry and receives only its site's
/// control keys; a reader reads but cannot publish; a CA-signed name not in the roster
/// gets nothing. Every "nothing arrived" is checked after something sent later on the
/// same path did arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_acl_confines_gateways_to_their_site_and_readers_to_reading() {
    let mut c = Cluster::new(1000).unwrap();
    let certs = c.dir.path().join("certs");
    twinmesh_nodes::certs::init_ca(&certs, "test CA", 30).unwrap();
    for n in [
        "cloud", "edge-a", "iot-a", "iot-a2", "iot-b", "reader", "reader2", "stranger",
    ] {
        twinmesh_nodes::certs::issue(&certs, n, &[], 30).unwrap();
    }
    let roster = c.dir.path().join("acl.toml");
    std::fs::write(
        &roster,
        "mesh = [\"cloud\", \"edge-a\"]\nreaders = [\"reader\", \"reader2\"]\n\
         [gateways]\nsite-a = [\"iot-a\", \"iot-a2\"]\nsite-b = [\"iot-b\"]\n",
    )
    .unwrap();
    let roster = roster.display().to_string();
    let with_acl = |name: &str| {
        let mut a = tls_args(&certs, name);
        a.extend(["--acl".to_owned(), roster.clone()]);
        a
    };
    // Over QUIC (the same certificates; the ACL reads the name off either link).
    let tls = Some("quic/127.0.0.1:0");
    let a = with_acl("cloud");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    c.start("cloud", "cloud", None, tls, &a).unwrap();
    let a = with_acl("edge-a");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    c.start("edge", "edge-a", Some("site-a"), tls, &a).unwrap();
    let mut a = with_acl("iot-a");
    a.extend(["--simulate".to_owned(), "wind_turbine:1".to_owned()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    c.start("iot", "iot-a", Some("site-a"), tls, &a).unwrap();

    // The mesh works under the ACL: the gateway registers, streams and is acknowledged.
    let ca = certs.join("ca.pem");
    let https = c
        .node("cloud")
        .grpc_endpoint()
        .replace("http://", "https://");
    let channel = twinmesh_nodes::client::connect_tls(&https, Duration::from_secs(10), Some(&ca))
        .await
        .unwrap();
    let id = "site-a/wt-01";
    eventually(WAIT, "the twin streaming under the ACL", || {
        let channel = channel.clone();
        async move {
            let t = TwinServiceClient::new(channel)
                .get_twin(GetTwinRequest { twin_id: id.into() })
                .await
                .ok()?
                .into_inner();
            let seq = t.reported.get("bearing_vibration").map_or(0, |r| r.seq);
            (seq >= 10).then_some(())
        }
    })
    .await;

    let edge = c.node("edge-a").ready.zenoh[0].clone();
    let client = |name: &str| {
        let (cert, key) = (
            certs.join(format!("{name}.pem")),
            certs.join(format!("{name}.key")),
        );
        let (edge, ca) = (edge.clone(), ca.clone());
        async move {
            zenoh_tls_client(&edge, &ca, Some((&cert, &key)))
                .await
                .unwrap()
        }
    };
    let reader = client("reader").await;
    let everything = reader.declare_subscriber("twinmesh/**").await.unwrap();
    let stranger = client("stranger").await;
    let stranger_sees = stranger.declare_subscriber("twinmesh/**").await.unwrap();
    let gateway = client("iot-a2").await;
    let beyond_its_keys = gateway
        .declare_subscriber("twinmesh/twins/**")
        .await
        .unwrap();
    let its_control = gateway
        .declare_subscriber("twinmesh/control/site-a/*")
        .await
        .unwrap();

    // The reader sees the twin's state: its subscription reached the edge (and so, on
    // the same path, did the stranger's and the gateway's, declared after it).
    recv_state(&everything, id).await;

    // Denied publications first, then an allowed one on the same link (from a second
    // session of the gateway's certificate: a session's own subscribers would see its
    // publications locally).
    let forger = client("iot-a2").await;
    for key in [
        "twinmesh/telemetry/site-b/wt-01/bearing_vibration",
        "twinmesh/snapshots/site-a/wt-01",
        "twinmesh/twins/site-a/wt-01/state",
        "twinmesh/placement/site-a/wt-01",
    ] {
        forger.put(key, vec![1u8, 2, 3]).await.unwrap();
    }
    let reader2 = client("reader2").await;
    reader2
        .put("twinmesh/telemetry/site-a/fake-02/x", vec![7u8])
        .await
        .unwrap();
    forger
        .put("twinmesh/telemetry/site-a/fake-01/x", vec![4u8, 5, 6])
        .await
        .unwrap();
    let allowed = "twinmesh/telemetry/site-a/fake-01/x";
    let mut seen = Vec::new();
    twinmesh_tests::recv_until(WAIT, "the gateway's own-site telemetry", &everything, |s| {
        let key = s.key_expr().to_string();
        seen.push((key.clone(), s.payload().to_bytes().to_vec()));
        key == allowed
    })
    .await;
    // (The twin's own states, snapshots and placements are legitimate publications on
    // those keys; the forged payload is in none of them.)
    let forged: Vec<&String> = seen
        .iter()
        .filter(|(k, p)| p == &[1u8, 2, 3] || k.contains("site-b") || k.contains("fake-02"))
        .map(|(k, _)| k)
        .collect();
    assert!(
        forged.is_empty(),
        "denied publications got through: {forged:?}"
    );

    // A set-point: the gateway certificate receives its site's control key ...
    let mut req = tonic::Request::new(SetDesiredRequest {
        twin_id: id.into(),
        property: "power_limit".into(),
        value: 1500.0,
        expected_revision: None,
    });
    req.set_timeout(Duration::from_secs(10));
    TwinServiceClient::new(channel.clone())
        .set_desired(req)
        .await
        .unwrap();
    twinmesh_tests::recv_until(WAIT, "the control key at the gateway", &its_control, |s| {
        s.key_expr().as_str() == "twinmesh/control/site-a/wt-01"
    })
    .await;
    // ... and, while the reader sees several more states of the twin, nothing of
    // twinmesh/twins/** reaches the gateway, nor anything at all the stranger.
    for _ in 0..3 {
        recv_state(&everything, id).await;
    }
    let leaked = collect(&beyond_its_keys);
    assert!(leaked.is_empty(), "the gateway received {leaked:?}");
    let leaked = collect(&stranger_sees);
    assert!(leaked.is_empty(), "the stranger received {leaked:?}");
}

async fn recv_state(
    sub: &zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>,
    id: &str,
) {
    let key = format!("twinmesh/twins/{id}/state");
    twinmesh_tests::recv_until(WAIT, "a state of the twin", sub, |s| {
        s.key_expr().as_str() == key
    })
    .await;
}
