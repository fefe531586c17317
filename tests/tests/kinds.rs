//! End-to-end tests of asset kinds from W3C WoT Thing Models (issue 21, point 1), with
//! real node processes: a bad model stops a node with the file, the property and the
//! reason; a twin of a kind from a gateway's `--models` folder is placed, fed, and
//! served by edge and cloud nodes started without that folder (GetTwin,
//! GetThingDescription, `ctl kinds`); another site cannot redefine the kind; a
//! restarted edge knows the kind with the cloud down.

use std::path::Path;
use std::time::Duration;

use prost::Message;

use twinmesh_proto::v1::{GetThingDescriptionRequest, PlacementRequest, TelemetryFrame, Watermark};
use twinmesh_tests::{
    eventually, gateway_trust, get_twin, proven_frame, publish, run_cli, twin_client, twinmesh_bin,
    zenoh_peer, Cluster,
};

const WAIT: Duration = Duration::from_secs(60);
const TWIN: &str = "site-a/comp-01";

fn example_models() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("models")
}

fn example_model() -> String {
    std::fs::read_to_string(example_models().join("compressor.tm.json")).unwrap()
}

fn ctl_json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["ctl", "--endpoint", endpoint, "--json"];
    a.extend_from_slice(args);
    let (status, out, err) = run_cli(&a);
    assert!(status.success(), "ctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?} printed {out}: {e}"))
}

/// The kind `name` in `ctl kinds --json` of `endpoint`.
fn listed_kind(endpoint: &str, name: &str) -> Option<serde_json::Value> {
    ctl_json(endpoint, &["kinds"])["kinds"]
        .as_array()?
        .iter()
        .find(|k| k["kind"] == name)
        .cloned()
}

/// A registration as the site's gateway makes it, proven under the site's control key;
/// the placement, or `None` when the authority does not answer within a few attempts
/// (it refuses a registration by not answering).
async fn register(
    session: &zenoh::Session,
    dir: &Path,
    twin: &str,
    kind: &str,
    thing_model: &str,
    attempts: usize,
) -> Option<twinmesh_proto::v1::Placement> {
    let site = twin.split('/').next().unwrap();
    let mut req = PlacementRequest {
        twin_id: twin.into(),
        kind: kind.into(),
        gateway: "iot-test".into(),
        chain: None,
        thing_model: thing_model.into(),
        proof: None,
    };
    assert!(gateway_trust(dir, site).unwrap().prove(site, &mut req));
    for _ in 0..attempts {
        if let Ok(Some(p)) = twinmesh_nodes::client::request_placement(session, &req).await {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

fn frame(signal: &str, seq: u64, value: f64) -> TelemetryFrame {
    TelemetryFrame {
        twin_id: TWIN.into(),
        signal: signal.into(),
        seq,
        start_ns: twinmesh_tests::now_ns(),
        sample_period_ns: 1_000_000_000,
        samples: vec![value],
        ..Default::default()
    }
}

#[test]
fn a_bad_model_stops_the_node_with_the_file_the_property_and_the_reason() {
    twinmesh_bin();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let bad = models.join("compressor.tm.json");
    std::fs::write(
        &bad,
        example_model().replace("\"site_only\"", "\"site-only\""),
    )
    .unwrap();
    let data = dir.path().join("data").display().to_string();
    let node = |models: &Path, extra: &[&str]| {
        let models = models.display().to_string();
        let mut a = vec![
            "node",
            "--tier",
            "iot",
            "--id",
            "iot-x",
            "--site",
            "site-a",
            "--data",
            &data,
            "--listen",
            "tcp/127.0.0.1:0",
            "--models",
            &models,
        ];
        a.extend_from_slice(extra);
        run_cli(&a)
    };
    let (status, _, err) = node(&models, &[]);
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "{}: property \"motor_current\": \"twinmesh:sensitivity\" \"site-only\" is not public, site_only or personal",
            bad.display()
        )),
        "{err}"
    );
    // A models folder that redefines a built-in kind.
    std::fs::write(
        &bad,
        example_model().replace("\"compressor\"", "\"power_meter\""),
    )
    .unwrap();
    let (status, _, err) = node(&models, &[]);
    assert!(!status.success());
    assert!(
        err.contains("kind power_meter is built in and cannot be redefined"),
        "{err}"
    );
    // A kind from a model has no simulator.
    let (status, _, err) = node(&example_models(), &["--simulate", "compressor:1"]);
    assert!(!status.success());
    assert!(
        err.contains("simulators exist for the built-in kinds only"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_from_a_gateways_models_is_served_by_nodes_without_the_folder() {
    twinmesh_bin();
    let mut c = Cluster::new(1000).unwrap();
    c.start("cloud", "cloud", None, None, &[]).unwrap();
    c.start("edge", "edge-a", Some("site-a"), None, &[])
        .unwrap();
    let models = example_models().display().to_string();
    c.start(
        "iot",
        "iot-a",
        Some("site-a"),
        None,
        &["--models", &models, "--simulate", "hpc_node:1"],
    )
    .unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    let edge = c.node("edge-a").grpc_endpoint();
    let gateway = c.node("iot-a").grpc_endpoint();
    let dir = c.dir.path().to_path_buf();

    // The gateway read the folder; the others know only the built-in kinds.
    let k = listed_kind(&gateway, "compressor").expect("the gateway lists its model");
    assert_eq!(k["source"], "file");
    assert!(listed_kind(&edge, "compressor").is_none());
    assert!(listed_kind(&cloud, "compressor").is_none());

    let text = example_model();
    let session = zenoh_peer(&c.endpoints()).await;
    let placed = register(&session, &dir, TWIN, "compressor", &text, 60)
        .await
        .expect("the authority places the twin of the new kind");
    // A personal signal: the twin stays on its site's edge.
    assert_eq!(
        (placed.kind.as_str(), placed.node.as_str()),
        ("compressor", "edge-a")
    );

    let acks = session
        .declare_subscriber(format!("twinmesh/acks/{TWIN}"))
        .await
        .unwrap();
    let gw = zenoh_peer(&c.endpoints()).await;
    let key = |s: &str| format!("twinmesh/telemetry/{TWIN}/{s}");
    publish(
        &gw,
        &key("discharge_pressure"),
        proven_frame(&dir, frame("discharge_pressure", 1, 7.5)),
    )
    .await;
    publish(
        &gw,
        &key("operator_badges"),
        proven_frame(&dir, frame("operator_badges", 1, 3.0)),
    )
    .await;
    eventually(WAIT, "the personal signal's frame acknowledged", || async {
        let s = acks.recv_async().await.ok()?;
        let wm = Watermark::decode(&*s.payload().to_bytes()).ok()?;
        (wm.signal == "operator_badges" && wm.seq == 1).then_some(())
    })
    .await;
    for endpoint in [&edge, &cloud] {
        let twin = eventually(WAIT, "the public value served", || async {
            get_twin(endpoint, TWIN)
                .await
                .ok()
                .filter(|t| t.reported.contains_key("discharge_pressure"))
        })
        .await;
        assert_eq!(twin.kind, "compressor");
        assert_eq!(twin.reported["discharge_pressure"].value, 7.5);
        if endpoint == &edge {
            // On the site: the raw personal value.
            assert_eq!(twin.reported["operator_badges"].value, 3.0);
        } else {
            // Through the cloud: withheld, as for a built-in kind's personal signal.
            assert!(!twin.reported.contains_key("operator_badges"), "{twin:?}");
            assert!(
                twin.withheld.contains(&"operator_badges".to_owned()),
                "{twin:?}"
            );
        }

        let td = twin_client(endpoint)
            .await
            .get_thing_description(GetThingDescriptionRequest {
                twin_id: TWIN.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let td: serde_json::Value = serde_json::from_str(&td.json).unwrap();
        assert_eq!(td["twinmesh:kind"], "compressor");
        assert_eq!(td["title"], TWIN);
        let props = td["properties"].as_object().unwrap();
        let names: Vec<&str> = props.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "discharge_pressure",
                "motor_current",
                "operator_badges",
                "pressure_limit"
            ]
        );
        assert_eq!(props["operator_badges"]["twinmesh:sensitivity"], "personal");
        assert_eq!(props["motor_current"]["twinmesh:sensitivity"], "site_only");
        assert_eq!(props["discharge_pressure"]["unit"], "bar");
        assert_eq!(props["pressure_limit"]["readOnly"], false);
        assert_eq!(props["pressure_limit"]["maximum"], 14.0);
        assert!(td["events"]["overpressure"].is_object());

        let k = listed_kind(endpoint, "compressor").expect("ctl kinds lists the kind");
        assert_eq!(k["source"], "fabric");
        assert_eq!(k["definedBy"], "site-a");
        assert_eq!(k["thingModel"], text.as_str());
    }

    // Another site's gateway makes the personal signal public: refused, no twin.
    let public = text.replace("\"personal\"", "\"public\"");
    assert_ne!(public, text);
    assert!(
        register(&session, &dir, "site-b/comp-01", "compressor", &public, 3)
            .await
            .is_none()
    );
    // A registration redefining a built-in kind: refused.
    let pm = text.replace("\"compressor\"", "\"power_meter\"");
    assert!(
        register(&session, &dir, "site-a/pm-99", "power_meter", &pm, 3)
            .await
            .is_none()
    );
    let log = c.node("cloud").log();
    assert!(
        log.contains("kind compressor is already defined differently"),
        "the cloud says why it refused: {log}"
    );
    let k = listed_kind(&cloud, "compressor").unwrap();
    assert_eq!(k["thingModel"], text.as_str());

    // The edge restarted while the cloud is down still knows the kind (its store).
    c.kill9("cloud");
    c.restart("edge-a").unwrap();
    let edge = c.node("edge-a").grpc_endpoint();
    let twin = eventually(WAIT, "the twin back on the restarted edge", || async {
        get_twin(&edge, TWIN)
            .await
            .ok()
            .filter(|t| t.reported.contains_key("discharge_pressure"))
    })
    .await;
    assert_eq!(twin.kind, "compressor");
    assert_eq!(twin.reported["discharge_pressure"].value, 7.5);
    let k = listed_kind(&edge, "compressor").expect("the restarted edge lists the kind");
    assert_eq!(k["source"], "fabric");
}
