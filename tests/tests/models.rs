//! End-to-end test of anomaly models across tiers (issue 6): a model trained in the cloud
//! on a twin's archived features is deployed to the edge twin, scores there (its `health`
//! through gRPC), raises an alarm when the simulated fault starts, survives the edge's
//! restart and travels with a migration; corrupt and incompatible models are refused
//! and the twin keeps the model it has.

use std::time::Duration;

use ndarray::Array2;
use prost::Message;
use tonic::Code;

use twinmesh_proto::v1::model_service_client::ModelServiceClient;
use twinmesh_proto::v1::{
    DeployModelRequest, Health, ImportModelRequest, ListModelsRequest, ModelInfo, ModelRecord,
    QueryHistoryRequest, TrainModelRequest, TwinEvent,
};
use twinmesh_tests::{
    eventually, get_twin, migrate_twin, now_ns, twin_client, zenoh_client, Mesh, NodeProc,
};
use twinmesh_twins::model::{Algorithm, Model, TrainParams};

const WAIT: Duration = Duration::from_secs(90);
/// Seconds after the test starts when the harmonic distortion begins.
const FAULT_AFTER_S: i64 = 75;
/// Feature windows (1 s each) to train on.
const TRAIN_WINDOWS: u64 = 40;
const ID: &str = "site-a/pm-01";

async fn models(endpoint: &str) -> ModelServiceClient<tonic::transport::Channel> {
    ModelServiceClient::connect(endpoint.to_owned())
        .await
        .expect("model service")
}

async fn import(endpoint: &str, req: ImportModelRequest) -> Result<ModelInfo, tonic::Status> {
    models(endpoint)
        .await
        .import_model(req)
        .await
        .map(|r| r.into_inner())
}

/// `DeployModel` of the newest version of `model_id` to the twin `ID`: each deployment.
async fn deploy_to_twin(endpoint: &str, model_id: &str) -> Vec<twinmesh_proto::v1::Deployment> {
    let req = DeployModelRequest {
        model_id: model_id.into(),
        twin_ids: vec![ID.into()],
        ..Default::default()
    };
    let d = models(endpoint).await.deploy_model(req).await.unwrap();
    d.into_inner().deployments
}

/// Every model of the registry, as `ListModels` through `endpoint` lists them.
async fn registry(endpoint: &str) -> Result<Vec<ModelInfo>, tonic::Status> {
    let list = models(endpoint)
        .await
        .list_models(ListModelsRequest::default())
        .await?;
    Ok(list.into_inner().models)
}

/// `ImportModel` of the serialised `model` as `model_id`, for twins of `kind`.
async fn import_bytes(
    endpoint: &str,
    model_id: &str,
    model: Vec<u8>,
    kind: &str,
) -> Result<ModelInfo, tonic::Status> {
    let req = ImportModelRequest {
        model_id: model_id.into(),
        model,
        kind: kind.into(),
        ..Default::default()
    };
    import(endpoint, req).await
}

async fn health(endpoint: &str) -> Option<Health> {
    get_twin(endpoint, ID).await.ok().and_then(|t| t.health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_trained_in_the_cloud_scores_at_the_edge_and_moves_with_its_twin() {
    twinmesh_tests::twinmesh_bin();
    let fault_ns = (now_ns() / 1_000_000_000 + FAULT_AFTER_S) * 1_000_000_000;
    let fault = format!("pm-01=harmonic_distortion@{}", fault_ns / 1_000_000_000);
    let mut mesh =
        Mesh::start_with(Some("power_meter:1"), &[], &["--fault", &fault]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let edge = mesh.edge.grpc_endpoint();
    let t0 = now_ns();

    // The edge keeps every window's features; wait until enough windows exist.
    let windows = eventually(WAIT, "training windows archived", || async {
        let r = twin_client(&cloud)
            .await
            .query_history(QueryHistoryRequest {
                twin_id: ID.into(),
                signal: "voltage.thd".into(),
                start_ns: t0 - 60_000_000_000,
                end_ns: now_ns(),
                bucket_ns: 3_600_000_000_000,
                aggregation: 5, // count
            })
            .await
            .ok()?
            .into_inner();
        let n: u64 = r.buckets.iter().map(|b| b.count).sum();
        (n >= TRAIN_WINDOWS).then_some(n)
    })
    .await;
    let train_end = now_ns() - 2_000_000_000;
    assert!(train_end < fault_ns, "training must end before the fault");

    // Training runs on the cloud only; an edge says where to go.
    let e = registry(&edge).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("cloud"), "{}", e.message());

    let mut stream = models(&cloud)
        .await
        .train_model(TrainModelRequest {
            twin_ids: vec![ID.into()],
            start_ns: t0 - 60_000_000_000,
            end_ns: train_end,
            // No algorithm named: the default, the PCA + pca_normal ensemble.
            ..Default::default()
        })
        .await
        .expect("training starts")
        .into_inner();
    let mut phases = Vec::new();
    let mut info = None;
    while let Some(p) = stream.message().await.expect("training progresses") {
        phases.push(p.phase.clone());
        if let Some(m) = p.model {
            info = Some(m);
        }
    }
    let info = info.expect("the last message carries the model");
    assert!(phases.contains(&"reading".to_owned()), "{phases:?}");
    assert_eq!(phases.last().map(String::as_str), Some("done"));
    assert_eq!(
        (info.model_id.as_str(), info.version),
        ("power_meter-ensemble", 1)
    );
    assert!(
        info.features.iter().any(|f| f == "voltage.thd"),
        "{:?}",
        info.features
    );
    assert!(info
        .features
        .iter()
        .all(|f| f.starts_with("voltage.") || f.starts_with("current.")));
    assert!(
        info.trained_rows >= TRAIN_WINDOWS - 5 && info.trained_rows <= windows * 3,
        "{} rows from {windows} windows per signal",
        info.trained_rows
    );
    assert_eq!(info.algorithm, "ensemble");
    let mut members: Vec<(&str, f64)> = info
        .member_thresholds
        .iter()
        .map(|(a, t)| (a.as_str(), *t))
        .collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(
        members.iter().map(|m| m.0).collect::<Vec<_>>(),
        ["pca", "pca_normal"]
    );
    assert!(
        members.iter().all(|m| m.1.is_finite() && m.1 > 0.0),
        "{members:?}"
    );
    assert!(info.threshold.is_finite() && info.threshold > 0.0);
    assert!(info.size_bytes > 0);
    let listed = registry(&cloud).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].model_id, info.model_id);

    // Deploy to the edge twin: it scores every window from now on.
    let outside = zenoh_client(&mesh.cloud.ready.zenoh[0]).await;
    let events = outside
        .declare_subscriber(format!("twinmesh/twins/{ID}/events"))
        .await
        .unwrap();
    let d = deploy_to_twin(&cloud, &info.model_id).await;
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].twin_id.as_str(), d[0].status.as_str()),
        (ID, "installed")
    );
    // The registry answers on the key space too (twins that move fetch from it).
    let replies = outside
        .get("twinmesh/models/power_meter-ensemble/1")
        .await
        .unwrap();
    let mut records = Vec::new();
    while let Ok(r) = replies.recv_async().await {
        match r.result() {
            Ok(s) => records.push(ModelRecord::decode(s.payload().to_bytes().as_ref()).unwrap()),
            Err(e) => panic!("registry error reply: {:?}", e.payload().to_bytes()),
        }
    }
    assert_eq!(
        records.len(),
        1,
        "one registry reply; cloud log:\n{}",
        mesh.cloud
            .log()
            .lines()
            .filter(|l| l.contains("model") || l.contains("registry"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(records[0].info.as_ref().unwrap().version, 1);
    let scored = eventually(WAIT, "twin scores with the model", || async {
        let h = health(&edge).await?;
        (h.model_id == info.model_id && h.model_version == 1 && h.anomaly_score > 0.0).then_some(h)
    })
    .await;
    assert!(
        ["ok", "warn", "alarm"].contains(&scored.status.as_str()),
        "{scored:?}"
    );
    let listed = registry(&cloud).await.unwrap();
    assert_eq!(listed[0].deployments.len(), 1);
    assert_eq!(listed[0].deployments[0].status, "installed");

    // A corrupt file is refused by the registry; a model of another kind by the twin,
    // which keeps the one it has.
    let features = vec!["bearing_vibration.rms".to_owned(), "power.mean".to_owned()];
    let rows = Array2::from_shape_fn((50, 2), |(i, j)| (i * (j + 1)) as f64 % 7.0);
    let foreign = Model::train(
        &features,
        rows.view(),
        &TrainParams::for_algorithm(Algorithm::Robust),
    )
    .unwrap()
    .to_bytes();
    let mut corrupt = foreign.clone();
    let last = corrupt.len() - 3;
    corrupt[last] ^= 0x20;
    let e = import_bytes(&cloud, "broken", corrupt, "wind_turbine")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("checksum"), "{}", e.message());
    let e = import_bytes(&cloud, "turbine", foreign.clone(), "power_meter")
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("not a feature of a power_meter signal"),
        "{}",
        e.message()
    );
    let imported = import_bytes(&cloud, "turbine", foreign, "wind_turbine")
        .await
        .unwrap();
    assert_eq!(
        (imported.version, imported.algorithm.as_str()),
        (1, "robust")
    );
    let d = deploy_to_twin(&cloud, "turbine").await;
    assert!(
        d[0].status.contains("model rejected")
            && d[0].status.contains("keeps power_meter-ensemble v1"),
        "{}",
        d[0].status
    );
    let h = health(&edge).await.unwrap();
    assert_eq!(
        (h.model_id.as_str(), h.model_version),
        ("power_meter-ensemble", 1)
    );

    // An ONNX model trained in Python goes into the registry like any other; a
    // truncated one is refused.
    let onnx = include_bytes!("../../twins/tests/fixtures/pca_autoencoder.onnx").to_vec();
    let onnx_request = |model: Vec<u8>| ImportModelRequest {
        model_id: "spindle-ae".into(),
        model,
        kind: "spindle".into(),
        onnx: true,
        features: [
            "vibration.rms",
            "vibration.std",
            "spindle_load.mean",
            "temperature.mean",
        ]
        .map(String::from)
        .to_vec(),
        threshold: 1.5,
        ..Default::default()
    };
    let imported = import(&cloud, onnx_request(onnx.clone())).await.unwrap();
    assert_eq!((imported.algorithm.as_str(), imported.version), ("onnx", 1));
    let e = import(&cloud, onnx_request(onnx[..onnx.len() / 2].to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("onnx"), "{}", e.message());

    // The fault: the model's alarm names the features that moved. An alarm is raised on
    // the way into `alarm` only, so one raised before the fault (a model trained on 40
    // windows may see one) and still holding while the fault is on counts too: the twin
    // is then in alarm during the fault, which is what the fault must cause.
    let alarm = tokio::time::timeout(WAIT, async {
        let mut earlier: Option<TwinEvent> = None;
        loop {
            if let Ok(s) = tokio::time::timeout(Duration::from_secs(1), events.recv_async()).await {
                let s = s.expect("events");
                let e = TwinEvent::decode(s.payload().to_bytes().as_ref()).unwrap();
                if e.kind == "alarm" && e.timestamp_ns >= fault_ns {
                    return e;
                }
                if e.kind == "alarm" {
                    earlier = Some(e);
                }
            }
            if now_ns() > fault_ns + 5_000_000_000 {
                if let Some(e) = &earlier {
                    if health(&edge).await.is_some_and(|h| h.status == "alarm") {
                        return e.clone();
                    }
                }
            }
        }
    })
    .await
    .expect("an alarm after the fault, or one that holds through it");
    assert!(alarm.attributes["features"].contains('='), "{alarm:?}");
    assert!(alarm.attributes["score"].parse::<f64>().unwrap() > info.threshold);
    let h = health(&edge).await.unwrap();
    assert!(h.last_alarm.contains("score"), "{h:?}");
    drop(events.undeclare().await);

    // The edge restarts: the twin comes back with its model and goes on scoring.
    let revision_before = get_twin(&cloud, ID).await.unwrap().revision;
    mesh.edge.stop().expect("edge stops");
    mesh.edge = NodeProc::start(&mesh.edge.args.clone(), &mesh.logs(), "edge-a-2").unwrap();
    let edge = mesh.edge.grpc_endpoint();
    eventually(WAIT, "twin scores after the restart", || async {
        let t = get_twin(&edge, ID).await.ok()?;
        let h = t.health.clone()?;
        (t.revision > revision_before + 5
            && t.placement.as_ref()?.tier == "edge"
            && h.model_id == "power_meter-ensemble"
            && h.model_version == 1)
            .then_some(())
    })
    .await;

    // Migrated to a second edge of the site (personal data keeps a power meter off the
    // cloud), it fetches the model from the registry and scores there.
    let second_args: Vec<String> = mesh
        .edge
        .args
        .iter()
        .map(|a| {
            if a == "edge-a" {
                "edge-a2".to_owned()
            } else if a.ends_with("/edge-a") {
                format!("{a}2")
            } else {
                a.clone()
            }
        })
        .collect();
    let second = NodeProc::start(&second_args, &mesh.logs(), "edge-a2").unwrap();
    let moved = eventually(WAIT, "migration to edge-a2", || async {
        migrate_twin(&cloud, ID, "edge-a2").await.ok()
    })
    .await;
    assert_eq!(moved.placement.unwrap().node, "edge-a2");
    let first = health(&cloud).await.unwrap();
    assert_eq!(
        (first.model_id.as_str(), first.model_version),
        ("power_meter-ensemble", 1)
    );
    let scored_there = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(h) = health(&cloud).await {
                if h.model_id == "power_meter-ensemble" && h.anomaly_score != first.anomaly_score {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        scored_there.is_ok(),
        "twin does not score on edge-a2 ({:?}); its log:\n{}",
        health(&cloud).await,
        second.log()
    );
    let log = second.log();
    assert!(
        !log.contains("model unusable") && !log.contains("scoring paused"),
        "{log}"
    );
}
