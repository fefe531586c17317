//! End-to-end tests of processing chains across tiers (issue 3): bearing-fault detection
//! at the edge, THD of waveforms, IoT-tier decimation shrinking what the gateway
//! publishes, chain validation through the API, and idempotent history import.

use std::time::Duration;

use prost::Message;
use tonic::Code;

use twinmesh_proto::v1::{
    self as proto, watch_twin_response, ChainStage, FeatureSet, GetTwinRequest, NodeLoad,
    QueryHistoryRequest, SetChainRequest, TelemetryFrame,
};
use twinmesh_sim::models::power_meter::{configured_thd, CURRENT_HARMONICS, VOLTAGE_HARMONICS};
use twinmesh_tests::{
    eventually, get_twin, now_ns, recv_until, run_cli, twin_client, watch_twin, zenoh_client, Mesh,
};

const WAIT: Duration = Duration::from_secs(90);
/// Seconds after the test starts when the injected fault begins.
const FAULT_AFTER_S: i64 = 15;

fn stage(op: &str, tier: &str, signal: &str, params: &[(&str, &str)]) -> ChainStage {
    ChainStage {
        op: op.into(),
        tier: tier.into(),
        signal: signal.into(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

/// Shows the BPFO peak: the envelope-spectrum peak is in the bin of the outer-race
/// defect frequency or a neighbour (1 Hz bins for 1 s windows) — the bins the `bearing`
/// operator reads BPFO's amplitude from. (A peak at 75 Hz for a BPFO of 76.03 Hz is
/// 1.03 Hz away, yet one bin from BPFO's bin: the shaft speed moves within a window.)
fn at_bpfo(f: &std::collections::BTreeMap<String, f64>) -> bool {
    match (
        f.get("bearing_vibration.env_peak_hz"),
        f.get("bearing_vibration.bpfo_hz"),
    ) {
        // BPFO's bin or a neighbour, of the fundamental or its second harmonic: an outer
        // race defect shows lines at k·BPFO, and which is highest varies with the shaft
        // speed inside the window (a CI run saw 165 Hz for a BPFO of 82.4 Hz).
        (Some(peak), Some(bpfo)) => [1.0, 2.0]
            .iter()
            .any(|k| (peak - (k * bpfo).round()).abs() <= 1.0),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearing_fault_is_seen_at_bpfo_and_iot_decimation_shrinks_published_bytes() {
    twinmesh_tests::twinmesh_bin();
    // An absolute fault time (Unix seconds), so the test knows T exactly.
    let fault_ns = (now_ns() / 1_000_000_000 + FAULT_AFTER_S) * 1_000_000_000;
    let fault = format!("wt-01=outer_race@{}", fault_ns / 1_000_000_000);
    let mesh =
        Mesh::start_with(Some("wind_turbine:1"), &[], &["--fault", &fault]).expect("mesh starts");
    assert!(
        now_ns() + 5_000_000_000 < fault_ns,
        "the mesh took too long to start"
    );
    let cloud = mesh.cloud.grpc_endpoint();
    let id = "site-a/wt-01";

    // Observe features through a plain Zenoh subscriber and through gRPC WatchTwin.
    let outside = zenoh_client(&mesh.cloud.ready.zenoh[0]).await;
    let zsub = outside
        .declare_subscriber(format!("twinmesh/twins/{id}/features"))
        .await
        .unwrap();
    eventually(WAIT, "twin running", || async {
        get_twin(&cloud, id).await.ok()
    })
    .await;
    let mut watch = watch_twin(&cloud, id).await;
    let grpc_windows = tokio::spawn(async move {
        let mut after = Vec::new();
        let mut before = Vec::new();
        while let Ok(Some(u)) = watch.message().await {
            if let Some(watch_twin_response::Update::Features(f)) = u.update {
                if f.signal != "bearing_vibration" {
                    continue;
                }
                if f.window_end_ns <= fault_ns {
                    before.push(f);
                } else {
                    after.push(f);
                    if after.len() == 2 {
                        break;
                    }
                }
            }
        }
        (before, after)
    });
    let mut z_before: Vec<FeatureSet> = Vec::new();
    let mut z_after: Vec<FeatureSet> = Vec::new();
    recv_until(
        WAIT,
        "two analysis windows after the fault (Zenoh)",
        &zsub,
        |s| {
            let Ok(f) = FeatureSet::decode(&*s.payload().to_bytes()) else {
                return false;
            };
            if f.signal == "bearing_vibration" {
                if f.window_end_ns <= fault_ns {
                    z_before.push(f);
                } else {
                    z_after.push(f);
                }
            }
            z_after.len() >= 2
        },
    )
    .await;
    let (g_before, g_after) = tokio::time::timeout(WAIT, grpc_windows)
        .await
        .unwrap()
        .unwrap();
    for (path, before, after) in [
        ("zenoh", &z_before, &z_after),
        ("grpc", &g_before, &g_after),
    ] {
        // The window holding T and the next one.
        assert!(
            after.len() >= 2,
            "{path}: {} windows after the fault",
            after.len()
        );
        assert!(
            after[..2].iter().any(|f| at_bpfo(&f.features)),
            "{path}: no envelope peak at BPFO within two windows after the fault: {:?}",
            after[..2]
                .iter()
                .map(|f| (
                    f.features.get("bearing_vibration.env_peak_hz"),
                    f.features.get("bearing_vibration.bpfo_hz")
                ))
                .collect::<Vec<_>>()
        );
        let healthy = before
            .iter()
            .filter(|f| !f.features.is_empty())
            .collect::<Vec<_>>();
        assert!(
            !healthy.is_empty(),
            "{path}: no window before the fault at {fault_ns}; after: {:?}",
            after
                .iter()
                .map(|f| (f.window_start_ns - fault_ns, f.window_end_ns - fault_ns))
                .collect::<Vec<_>>()
        );
        assert!(
            healthy.iter().all(|f| !at_bpfo(&f.features)),
            "{path}: BPFO peak before the fault"
        );
        let amp = |f: &FeatureSet| f.features["bearing_vibration.bpfo_amp"];
        let worst_healthy = healthy.iter().map(|f| amp(f)).fold(0.0, f64::max);
        assert!(
            amp(&after[1]) > 5.0 * worst_healthy,
            "{path}: BPFO amplitude {} vs healthy {worst_healthy}",
            amp(&after[1])
        );
    }
    // The same features are in the twin's derived state.
    let twin = get_twin(&cloud, id).await.unwrap();
    assert!(twin.derived.contains_key("bearing_vibration.bpfo_amp"));
    assert!(twin.derived.contains_key("bearing_vibration.kurtosis"));

    // IoT decimation: the gateway's published bytes (its NodeLoad) drop.
    let load = outside
        .declare_subscriber("twinmesh/nodes/iot-a/load")
        .await
        .unwrap();
    // Bytes/s the gateway published, over its next four load reports.
    let published_rate = |what: &'static str| {
        let load = &load;
        async move {
            let mut loads = Vec::new();
            recv_until(WAIT, what, load, |s| {
                loads.extend(NodeLoad::decode(&*s.payload().to_bytes()).ok());
                loads.len() >= 4
            })
            .await;
            let (a, b) = (&loads[0], &loads[loads.len() - 1]);
            (b.bytes_published - a.bytes_published) as f64
                / ((b.timestamp_ns - a.timestamp_ns) as f64 * 1e-9)
        }
    };
    let before_rate = published_rate("four load reports").await;
    let chain = proto::Chain {
        stages: vec![
            stage(
                "lowpass",
                "iot",
                "bearing_vibration",
                &[("cutoff_hz", "1000"), ("order", "6")],
            ),
            stage("decimate", "iot", "bearing_vibration", &[("factor", "4")]),
            stage("compress", "iot", "bearing_vibration", &[]),
            stage("stats", "edge", "bearing_vibration", &[]),
        ],
    };
    let resp = twin_client(&cloud)
        .await
        .set_chain(SetChainRequest {
            twin_id: id.into(),
            chain: Some(chain.clone()),
            expected_revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.chain.unwrap().stages.len(), 4);
    // Wait until frames leave the gateway at the decimated rate (2.5 kHz).
    let frames = outside
        .declare_subscriber(format!("twinmesh/telemetry/{id}/bearing_vibration"))
        .await
        .unwrap();
    recv_until(WAIT, "decimated frames on the wire", &frames, |s| {
        TelemetryFrame::decode(&*s.payload().to_bytes())
            .is_ok_and(|f| f.sample_period_ns == 400_000)
    })
    .await;
    let after_rate = published_rate("four more load reports").await;
    assert!(
        after_rate < before_rate / 2.0,
        "gateway published {before_rate:.0} B/s before decimation, {after_rate:.0} B/s after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thd_matches_the_simulator_and_bad_chains_change_nothing_and_ingest_is_idempotent() {
    let mesh = Mesh::start(Some("power_meter:1"), &[]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let id = "site-a/pm-01";

    // THD features within 0.5 % (absolute THD points) of the configured content.
    let twin = eventually(WAIT, "thd features", || async {
        let t = get_twin(&cloud, id).await.ok()?;
        (t.derived.contains_key("voltage.thd") && t.derived.contains_key("current.thd"))
            .then_some(t)
    })
    .await;
    for (signal, harmonics) in [
        ("voltage", &VOLTAGE_HARMONICS[..]),
        ("current", &CURRENT_HARMONICS[..]),
    ] {
        let got = twin.derived[&format!("{signal}.thd")];
        let want = configured_thd(harmonics);
        assert!(
            (got - want).abs() < 0.005,
            "{signal} thd {got} vs configured {want}"
        );
    }

    // A malformed chain is refused with a precise message; the twin keeps its chain.
    let before = twin.chain.clone().unwrap();
    let mut c = twin_client(&cloud).await;
    for (chain, expect) in [
        (vec![stage("fftx", "edge", "voltage", &[])], "invalid chain: stage 1: unknown operator \"fftx\""),
        (vec![stage("psd", "iot", "voltage", &[])], "invalid chain: stage 1 (psd): psd cannot run on the iot tier (allowed: edge)"),
        (
            vec![stage("decimate", "iot", "voltage", &[("factor", "8")]), stage("thd", "edge", "voltage", &[("fundamental_hz", "500")])],
            "invalid chain: stage 2 (thd): fundamental 500 Hz is not below the Nyquist frequency 400 Hz left by decimation",
        ),
        (vec![stage("psd", "edge", "voltage", &[("nperseg", "many")])], "invalid chain: stage 1 (psd): parameter nperseg: expected a number"),
    ] {
        let e = c
            .set_chain(SetChainRequest { twin_id: id.into(), chain: Some(proto::Chain { stages: chain }), expected_revision: None })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(expect), "{} does not start with {expect}", e.message());
    }
    let after = c
        .get_twin(GetTwinRequest { twin_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .chain
        .unwrap();
    assert_eq!(after, before, "a refused chain must change nothing");

    // `twinmesh ingest` backfills history; running it twice stores the samples once.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("energy.csv");
    let start: i64 = 1_600_000_000_000_000_000;
    let rows: String = (0..20_000)
        .map(|i| format!("{},{}\n", start + i * 1_000_000_000, i as f64 * 0.25))
        .collect();
    std::fs::write(&csv, format!("timestamp_ns,value\n{rows}")).unwrap();
    let ingest = |signal: &str, csv: &std::path::Path| {
        run_cli(&[
            "ingest",
            "--endpoint",
            &cloud,
            "--twin",
            id,
            "--signal",
            signal,
            "--csv",
            csv.to_str().unwrap(),
            "--chunk",
            "3000",
        ])
    };
    for _ in 0..2 {
        let (status, out, err) = ingest("household_energy", &csv);
        assert!(status.success(), "{err}");
        assert!(
            out.contains("20000 samples of site-a/pm-01 household_energy stored"),
            "{out}"
        );
    }
    // Household energy is personal: its history is read on the site (the edge), and
    // refused through the cloud.
    let history = QueryHistoryRequest {
        twin_id: id.into(),
        signal: "household_energy".into(),
        start_ns: start,
        end_ns: start + 20_000 * 1_000_000_000,
        bucket_ns: 20_000 * 1_000_000_000,
        aggregation: proto::Aggregation::Count as i32,
    };
    let refused = c.query_history(history.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let count = twin_client(&mesh.edge.grpc_endpoint())
        .await
        .query_history(history)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count.buckets.len(), 1);
    assert_eq!(count.buckets[0].count, 20_000);
    // Bad files are refused naming the line; nothing is uploaded.
    std::fs::write(&csv, "timestamp_ns,value\n1,2\n2,oops\n").unwrap();
    let (status, _out, err) = ingest("household_energy", &csv);
    assert!(!status.success());
    assert!(err.contains("line 3: \"oops\" is not a number"), "{err}");
    let (status, _out, err) = ingest("flux", &dir.path().join("missing.csv"));
    assert!(!status.success());
    assert!(err.contains("cannot read"), "{err}");
}

/// A gateway's configuration (TOML `[[chains.KIND.stage]]`) gives its new twins their
/// chain; the IoT stages run in the gateway from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_from_the_gateway_configuration_apply_to_new_twins() {
    let mesh = Mesh::start(None, &[]).expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    let config = mesh.dir.path().join("iot.toml");
    std::fs::write(
        &config,
        format!(
            r#"
id = "iot-a"
tier = "iot"
site = "site-a"
listen = ["tcp/127.0.0.1:0"]
connect = [{edge:?}, {cloud:?}]
data = {data:?}
control_keys_dir = {keys:?}
simulate = ["wind_turbine:1"]

[[chains.wind_turbine.stage]]
op = "decimate"
signal = "bearing_vibration"
factor = 5
tier = "iot"

[[chains.wind_turbine.stage]]
op = "stats"
signal = "bearing_vibration"
tier = "edge"
"#,
            edge = mesh.edge.ready.zenoh[0],
            cloud = mesh.cloud.ready.zenoh[0],
            data = mesh.data("iot-a").display().to_string(),
            keys = mesh.dir.path().join("keys").display().to_string(),
        ),
    )
    .unwrap();
    let outside = zenoh_client(&mesh.cloud.ready.zenoh[0]).await;
    let frames = outside
        .declare_subscriber("twinmesh/telemetry/site-a/wt-01/bearing_vibration")
        .await
        .unwrap();
    let _iot = twinmesh_tests::NodeProc::start(
        &["--config".to_owned(), config.display().to_string()],
        &mesh.logs(),
        "iot-a",
    )
    .expect("gateway starts from its configuration");
    let twin = eventually(WAIT, "the twin with the configured chain", || async {
        let t = get_twin(&cloud, "site-a/wt-01").await.ok()?;
        (t.chain.as_ref()?.stages.len() == 2).then_some(t)
    })
    .await;
    let chain = twin.chain.unwrap();
    assert_eq!(chain.stages[0].op, "decimate");
    assert_eq!(chain.stages[0].params["factor"], "5");
    recv_until(WAIT, "frames decimated by 5 (2 kHz)", &frames, |s| {
        TelemetryFrame::decode(&*s.payload().to_bytes())
            .is_ok_and(|f| f.sample_period_ns == 500_000)
    })
    .await;
    eventually(WAIT, "stats features from the decimated stream", || async {
        let t = get_twin(&cloud, "site-a/wt-01").await.ok()?;
        t.derived
            .contains_key("bearing_vibration.rms")
            .then_some(())
    })
    .await;
}
