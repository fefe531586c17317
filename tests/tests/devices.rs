//! Real devices behind a gateway, against real counterpart processes started here: a
//! mosquitto broker, a Modbus TCP server (pymodbus) and an OPC UA server (asyncua).
//! Values reach GetTwin and history; set-points go back over the protocol and the twin
//! shows them delivered; a device that is down makes its twin stale with the reason and
//! comes back without a restart; malformed values are counted per reason and stop
//! nothing.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_proto::v1::{Aggregation, DeliveryStatus, QueryHistoryRequest, Twin};
use twinmesh_tests::devices::{free_port, metrics, refused, start_gateway, Mosquitto, PyServer};
use twinmesh_tests::{eventually, get_twin, now_ns, set_desired, Mesh};

const WAIT: Duration = Duration::from_secs(60);

fn reported(t: &Twin, signal: &str) -> Option<f64> {
    t.reported.get(signal).map(|v| v.value)
}

fn status(t: &Twin) -> (String, String) {
    let h = t.health.clone().unwrap_or_default();
    (h.status, h.reason)
}

fn desired_status(t: &Twin, property: &str) -> Option<(DeliveryStatus, String)> {
    t.desired.get(property).map(|d| {
        (
            DeliveryStatus::try_from(d.status).unwrap_or(DeliveryStatus::Unspecified),
            d.reason.clone(),
        )
    })
}

/// Samples of `signal` of `twin` in history.
async fn history_count(endpoint: &str, twin: &str, signal: &str) -> u64 {
    let mut c = TwinServiceClient::connect(endpoint.to_owned())
        .await
        .unwrap();
    let end = now_ns() + 3_600_000_000_000;
    match c
        .query_history(QueryHistoryRequest {
            twin_id: twin.into(),
            signal: signal.into(),
            start_ns: 0,
            end_ns: end,
            bucket_ns: end,
            aggregation: Aggregation::Count as i32,
        })
        .await
    {
        Ok(r) => r.into_inner().buckets.iter().map(|b| b.count).sum(),
        Err(_) => 0,
    }
}

/// Publishes every message with QoS 1 and returns once the broker acknowledged them all.
async fn publish_all(port: u16, id: &str, messages: &[(&str, Vec<u8>)]) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, messages.len() + 10);
    for (topic, payload) in messages {
        client
            .publish(*topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        while acked < messages.len() {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("test publisher: {e}"),
            }
        }
    })
    .await
    .expect("broker acknowledged every message");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

/// A subscriber of `filter` (QoS 1) collecting `(topic, payload)` into a channel.
async fn subscribe(
    port: u16,
    id: &str,
    filter: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _client = client;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(("$suback".into(), String::new()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

async fn next_message(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    what: &str,
) -> (String, String) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("subscriber alive")
}

/// A persistent session of the gateway's client id left over with a subscription the
/// configuration no longer has: what arrives on it is on an unknown topic.
async fn leave_stale_session(port: u16, client_id: &str, filter: &str) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(opts, 10);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = events.poll().await {
                return;
            }
        }
    })
    .await
    .expect("stale subscription acknowledged");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

const TWIN_MQ: &str = "site-a/hpc-mq";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_device_feeds_its_twin_takes_set_points_and_survives_a_broker_restart() {
    let mesh = Mesh::start(None, &[]).unwrap();
    let endpoint = mesh.edge.grpc_endpoint();
    let mut broker = Mosquitto::start(&mesh.dir.path().join("mosquitto")).unwrap();
    let port = broker.port;
    let client_id = "twinmesh-test-hpc-mq";
    leave_stale_session(port, client_id, "plant/hpc-mq/legacy/#").await;
    let config = format!(
        r#"
[[devices]]
twin = "{TWIN_MQ}"
kind = "hpc_node"
[devices.mqtt]
url = "{url}"
client_id = "{client_id}"
[[devices.mqtt.signals]]
signal = "cpu_temperature"
topic = "plant/hpc-mq/telemetry"
path = "cpu.temp"
timestamp_path = "ts"
[[devices.mqtt.signals]]
signal = "power"
topic = "plant/hpc-mq/power"
[[devices.mqtt.setpoints]]
property = "power_cap"
topic = "plant/hpc-mq/set/power_cap"
[[devices.mqtt.setpoints]]
property = "fan_min"
topic = "plant/hpc-mq/set/fan_min"
"#,
        url = broker.url()
    );
    let gateway = start_gateway(&mesh, &config).unwrap();
    let http = gateway.ready.http.expect("gateway serves /metrics");
    eventually(WAIT, "the gateway's mqtt session", || async {
        let twin = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        (status(&twin).0 != "stale").then_some(())
    })
    .await;

    // Values, with the device's own timestamp, reach GetTwin and history.
    let ts_ms = now_ns() / 1_000_000 - 5_000;
    let telemetry = format!(r#"{{"cpu":{{"temp":61.5}},"ts":{ts_ms}}}"#);
    let powers: Vec<(&str, Vec<u8>)> = (1..=20)
        .map(|i| ("plant/hpc-mq/power", format!("{}", 100 + i).into_bytes()))
        .collect();
    publish_all(
        port,
        "test-pub-1",
        &[("plant/hpc-mq/telemetry", telemetry.into_bytes())],
    )
    .await;
    publish_all(port, "test-pub-2", &powers).await;
    let twin = eventually(WAIT, "published values in GetTwin", || async {
        let t = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        (reported(&t, "power") == Some(120.0) && reported(&t, "cpu_temperature").is_some())
            .then_some(t)
    })
    .await;
    assert_eq!(reported(&twin, "cpu_temperature"), Some(61.5));
    assert_eq!(
        twin.reported["cpu_temperature"].timestamp_ns,
        ts_ms * 1_000_000,
        "the payload's timestamp, not the arrival time"
    );
    eventually(WAIT, "20 power samples in history", || async {
        (history_count(&endpoint, TWIN_MQ, "power").await == 20).then_some(())
    })
    .await;

    // Malformed payloads are counted per reason; the gateway goes on.
    let big = vec![b'1'; 100 * 1024];
    publish_all(
        port,
        "test-pub-3",
        &[
            ("plant/hpc-mq/telemetry", b"not json".to_vec()),
            (
                "plant/hpc-mq/telemetry",
                br#"{"cpu":{"t":1},"ts":1}"#.to_vec(),
            ),
            ("plant/hpc-mq/power", b"NaN".to_vec()),
            ("plant/hpc-mq/power", b"99999".to_vec()),
            ("plant/hpc-mq/power", big),
            ("plant/hpc-mq/legacy/x", b"1".to_vec()),
            ("plant/hpc-mq/power", b"321".to_vec()),
        ],
    )
    .await;
    eventually(WAIT, "the value after the malformed ones", || async {
        let t = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        (reported(&t, "power") == Some(321.0)).then_some(())
    })
    .await;
    let m = metrics(http).unwrap();
    for reason in [
        "not_json",
        "wrong_field",
        "not_a_number",
        "out_of_range",
        "too_large",
        "unknown_topic",
    ] {
        assert_eq!(refused(&m, reason), 1, "{reason} in\n{m}");
    }
    assert_eq!(history_count(&endpoint, TWIN_MQ, "power").await, 21);

    // A set-point is published on its command topic and shows delivered.
    let mut commands = subscribe(port, "test-sub", "plant/hpc-mq/set/#").await;
    assert_eq!(next_message(&mut commands, "suback").await.0, "$suback");
    set_desired(&endpoint, TWIN_MQ, "power_cap", 1200.0, None)
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut commands, "the power_cap command").await,
        ("plant/hpc-mq/set/power_cap".into(), "1200.0".into())
    );
    eventually(WAIT, "power_cap delivered", || async {
        let t = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        (desired_status(&t, "power_cap")?.0 == DeliveryStatus::Delivered).then_some(())
    })
    .await;

    // The broker goes away: the twin is stale, with the reason; a set-point is
    // unreachable meanwhile.
    broker.stop().unwrap();
    let twin = eventually(WAIT, "the twin stale", || async {
        let t = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        (status(&t).0 == "stale").then_some(t)
    })
    .await;
    let reason = status(&twin).1;
    assert!(
        reason.contains(&format!("mqtt broker 127.0.0.1:{port}")),
        "{reason}"
    );
    set_desired(&endpoint, TWIN_MQ, "fan_min", 40.0, None)
        .await
        .unwrap();
    eventually(WAIT, "fan_min unreachable", || async {
        let t = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        let (s, why) = desired_status(&t, "fan_min")?;
        (s == DeliveryStatus::Unreachable && why.contains("mqtt broker")).then_some(())
    })
    .await;

    // Back with its persisted sessions: what the broker takes while the gateway has not
    // reconnected yet is delivered, all of it; the twin is no longer stale, and the
    // waiting set-point goes out.
    broker.restart().unwrap();
    let mut commands = subscribe(port, "test-sub-2", "plant/hpc-mq/set/#").await;
    assert_eq!(next_message(&mut commands, "suback").await.0, "$suback");
    let burst: Vec<(&str, Vec<u8>)> = (1..=50)
        .map(|i| ("plant/hpc-mq/power", format!("{}", 1000 + i).into_bytes()))
        .collect();
    publish_all(port, "test-pub-4", &burst).await;
    // At least once: a message whose acknowledgement the broker lost comes again.
    eventually(WAIT, "every power sample the broker took", || async {
        (history_count(&endpoint, TWIN_MQ, "power").await >= 71).then_some(())
    })
    .await;
    let twin = eventually(WAIT, "the twin no longer stale", || async {
        let t = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        (status(&t).0 != "stale").then_some(t)
    })
    .await;
    assert_eq!(reported(&twin, "power"), Some(1050.0));
    assert_eq!(
        next_message(&mut commands, "the fan_min command").await,
        ("plant/hpc-mq/set/fan_min".into(), "40.0".into())
    );
    eventually(WAIT, "fan_min delivered", || async {
        let t = get_twin(&endpoint, TWIN_MQ).await.ok()?;
        (desired_status(&t, "fan_min")?.0 == DeliveryStatus::Delivered).then_some(())
    })
    .await;
    drop(gateway);
}

const TWIN_MB: &str = "site-a/hpc-mb";
const TWIN_WT: &str = "site-a/wt-mb";
const TWIN_DOWN: &str = "site-a/hpc-down";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_registers_of_each_type_map_to_scaled_values_and_set_points_write_them() {
    let mesh = Mesh::start(None, &[]).unwrap();
    let endpoint = mesh.edge.grpc_endpoint();
    let port = free_port();
    let mut server = PyServer::start("modbus_server.py", port).unwrap();
    let closed = free_port();
    let config = format!(
        r#"
[[devices]]
twin = "{TWIN_MB}"
kind = "hpc_node"
[devices.modbus]
address = "127.0.0.1:{port}"
unit = 1
period_ms = 100
timeout_ms = 500
[[devices.modbus.signals]]
signal = "cpu_temperature"
register = 0
type = "i16"
scale = 0.1
[[devices.modbus.signals]]
signal = "fan_speed"
register = 1
type = "u16"
[[devices.modbus.signals]]
signal = "power"
register = 2
type = "u32"
scale = 0.01
[[devices.modbus.signals]]
signal = "job_load"
register = 6
type = "f32"
[[devices.modbus.setpoints]]
property = "power_cap"
register = 10
scale = 0.5

[[devices]]
twin = "{TWIN_WT}"
kind = "wind_turbine"
[devices.modbus]
address = "127.0.0.1:{port}"
period_ms = 100
[[devices.modbus.signals]]
signal = "power"
register = 4
type = "i32"
scale = 0.1
[[devices.modbus.signals]]
signal = "rotor_speed"
register = 8
[[devices.modbus.signals]]
signal = "wind_speed"
register = 500

[[devices]]
twin = "{TWIN_DOWN}"
kind = "hpc_node"
[devices.modbus]
address = "127.0.0.1:{closed}"
period_ms = 100
timeout_ms = 300
[[devices.modbus.signals]]
signal = "power"
register = 0
"#
    );
    let gateway = start_gateway(&mesh, &config).unwrap();
    let http = gateway.ready.http.unwrap();
    let twin = eventually(WAIT, "every register type in GetTwin", || async {
        let t = get_twin(&endpoint, TWIN_MB).await.ok()?;
        (t.reported.len() == 4).then_some(t)
    })
    .await;
    assert_eq!(reported(&twin, "cpu_temperature"), Some(65.5));
    assert_eq!(reported(&twin, "fan_speed"), Some(4321.0));
    assert_eq!(reported(&twin, "power"), Some(700.0));
    assert_eq!(reported(&twin, "job_load"), Some(0.25));
    let wt = eventually(WAIT, "the i32 register in GetTwin", || async {
        let t = get_twin(&endpoint, TWIN_WT).await.ok()?;
        reported(&t, "power").map(|_| t)
    })
    .await;
    assert_eq!(reported(&wt, "power"), Some(-50.0));
    assert!(
        reported(&wt, "rotor_speed").is_none(),
        "65000 rpm is out of range"
    );
    eventually(WAIT, "history of the polled registers", || async {
        (history_count(&endpoint, TWIN_MB, "fan_speed").await >= 5).then_some(())
    })
    .await;
    eventually(WAIT, "the bad registers counted per reason", || async {
        let m = metrics(http).ok()?;
        (refused(&m, "out_of_range") >= 1 && refused(&m, "read_error") >= 1).then_some(())
    })
    .await;

    // A server nobody runs: stale with the reason, and the gateway goes on.
    let down = eventually(WAIT, "the unreachable device's twin stale", || async {
        let t = get_twin(&endpoint, TWIN_DOWN).await.ok()?;
        (status(&t).0 == "stale").then_some(t)
    })
    .await;
    let reason = status(&down).1;
    assert!(
        reason.contains(&format!("modbus server 127.0.0.1:{closed}")),
        "{reason}"
    );

    // A set-point writes its register (read back from the server).
    set_desired(&endpoint, TWIN_MB, "power_cap", 1500.0, None)
        .await
        .unwrap();
    eventually(WAIT, "power_cap delivered", || async {
        let t = get_twin(&endpoint, TWIN_MB).await.ok()?;
        (desired_status(&t, "power_cap")?.0 == DeliveryStatus::Delivered).then_some(())
    })
    .await;
    {
        use tokio_modbus::client::Reader;
        let mut ctx = tokio_modbus::client::tcp::connect(([127, 0, 0, 1], port).into())
            .await
            .unwrap();
        let words = ctx.read_holding_registers(10, 1).await.unwrap().unwrap();
        assert_eq!(words, vec![3000], "1500 W at scale 0.5");
    }

    // The server goes away and comes back: stale, then fresh values without a restart.
    server.stop().unwrap();
    let t = eventually(WAIT, "the twin stale", || async {
        let t = get_twin(&endpoint, TWIN_MB).await.ok()?;
        (status(&t).0 == "stale").then_some(t)
    })
    .await;
    assert!(status(&t).1.contains("modbus server"), "{:?}", status(&t));
    let before = history_count(&endpoint, TWIN_MB, "fan_speed").await;
    server.restart().unwrap();
    eventually(WAIT, "the twin reading again", || async {
        let t = get_twin(&endpoint, TWIN_MB).await.ok()?;
        (status(&t).0 != "stale" && history_count(&endpoint, TWIN_MB, "fan_speed").await > before)
            .then_some(())
    })
    .await;
    drop(gateway);
}

const TWIN_UA: &str = "site-a/sp-ua";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_monitored_items_feed_the_twin_and_set_points_write_the_node() {
    let mesh = Mesh::start(None, &[]).unwrap();
    let endpoint = mesh.edge.grpc_endpoint();
    let port = free_port();
    let server = PyServer::start("opcua_server.py", port).unwrap();
    let config = format!(
        r#"
[[devices]]
twin = "{TWIN_UA}"
kind = "spindle"
[devices.opcua]
endpoint = "opc.tcp://127.0.0.1:{port}"
[[devices.opcua.signals]]
signal = "spindle_speed"
node = "ns=2;s=Spindle.Speed"
[[devices.opcua.signals]]
signal = "spindle_load"
node = "ns=2;s=Spindle.Load"
[[devices.opcua.signals]]
signal = "temperature"
node = "ns=2;s=Spindle.Status"
[[devices.opcua.signals]]
signal = "vibration"
node = "ns=2;s=Spindle.Vibration"
[[devices.opcua.setpoints]]
property = "speed_override"
node = "ns=2;s=Spindle.Override"
"#
    );
    let gateway = start_gateway(&mesh, &config).unwrap();
    let http = gateway.ready.http.unwrap();
    // The server counts Speed up every 100 ms: changes keep arriving.
    for _ in 0..50 {
        if get_twin(&endpoint, TWIN_UA)
            .await
            .ok()
            .and_then(|t| reported(&t, "spindle_speed"))
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if get_twin(&endpoint, TWIN_UA)
        .await
        .ok()
        .and_then(|t| reported(&t, "spindle_speed"))
        .is_none()
    {
        panic!(
            "DEBUG {}",
            gateway
                .log()
                .lines()
                .filter(|l| l.contains("opc") || l.contains("device"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let first = eventually(WAIT, "spindle_speed from the monitored item", || async {
        let t = get_twin(&endpoint, TWIN_UA).await.ok()?;
        reported(&t, "spindle_speed")
    })
    .await;
    let later = eventually(WAIT, "spindle_speed changes", || async {
        let t = get_twin(&endpoint, TWIN_UA).await.ok()?;
        reported(&t, "spindle_speed").filter(|v| *v >= first + 5.0)
    })
    .await;
    assert!(later >= 1000.0 && later.fract() == 0.0, "{later}");
    eventually(WAIT, "spindle_speed history", || async {
        (history_count(&endpoint, TWIN_UA, "spindle_speed").await >= 5).then_some(())
    })
    .await;
    let t = get_twin(&endpoint, TWIN_UA).await.unwrap();
    for s in ["spindle_load", "temperature", "vibration"] {
        assert!(reported(&t, s).is_none(), "{s} should have been refused");
    }
    eventually(WAIT, "the malformed items counted per reason", || async {
        let m = metrics(http).ok()?;
        ["out_of_range", "wrong_field", "not_a_number"]
            .iter()
            .all(|r| refused(&m, r) >= 1)
            .then_some(())
    })
    .await;

    set_desired(&endpoint, TWIN_UA, "speed_override", 80.0, None)
        .await
        .unwrap();
    eventually(WAIT, "speed_override delivered", || async {
        let t = get_twin(&endpoint, TWIN_UA).await.ok()?;
        (desired_status(&t, "speed_override")?.0 == DeliveryStatus::Delivered).then_some(())
    })
    .await;
    let line = server
        .lines
        .recv_timeout(WAIT)
        .expect("the server saw the write");
    assert_eq!(line, "override=80.0");
    drop(gateway);
}

const TWIN_COMP: &str = "site-a/comp-01";

/// Issue 21's acceptance for a kind that is not built in: the compressor of
/// `examples/models/compressor.tm.json` (a public, a site-only and a personal signal and
/// a set-point), known only to the gateway's models folder, fed over MQTT by a real
/// mosquitto. Values reach GetTwin and history on the site; off the site (through the
/// cloud) the protected signals are withheld as for built-in kinds; a set-point goes out
/// on its command topic and shows delivered; a broker restart makes the twin stale with
/// the reason and loses nothing the broker took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_kind_over_mqtt_is_served_gated_actuated_and_survives_a_broker_restart() {
    let mesh = Mesh::start(None, &[]).unwrap();
    let edge = mesh.edge.grpc_endpoint();
    let cloud = mesh.cloud.grpc_endpoint();
    let models = mesh.dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models/compressor.tm.json"),
        models.join("compressor.tm.json"),
    )
    .unwrap();
    let mut broker = Mosquitto::start(&mesh.dir.path().join("mosquitto")).unwrap();
    let port = broker.port;
    let config = format!(
        r#"
models_dir = {models:?}

[[devices]]
twin = "{TWIN_COMP}"
kind = "compressor"
[devices.mqtt]
url = "{url}"
client_id = "twinmesh-test-comp-01"
[[devices.mqtt.signals]]
signal = "discharge_pressure"
topic = "plant/comp-01/telemetry"
path = "p_out"
[[devices.mqtt.signals]]
signal = "motor_current"
topic = "plant/comp-01/telemetry"
path = "i_motor"
[[devices.mqtt.signals]]
signal = "operator_badges"
topic = "plant/comp-01/badges"
[[devices.mqtt.setpoints]]
property = "pressure_limit"
topic = "plant/comp-01/set/pressure_limit"
"#,
        models = models.display().to_string(),
        url = broker.url()
    );
    let gateway = start_gateway(&mesh, &config).unwrap();
    eventually(
        WAIT,
        "the compressor's twin, its device connected",
        || async {
            let t = get_twin(&edge, TWIN_COMP).await.ok()?;
            (t.kind == "compressor" && status(&t).0 != "stale").then_some(())
        },
    )
    .await;

    let telemetry: Vec<(&str, Vec<u8>)> = (1..=10)
        .map(|i| {
            (
                "plant/comp-01/telemetry",
                format!(
                    r#"{{"p_out": {}, "i_motor": {}}}"#,
                    7.0 + i as f64 * 0.1,
                    100 + i
                )
                .into_bytes(),
            )
        })
        .collect();
    publish_all(port, "comp-pub-1", &telemetry).await;
    publish_all(
        port,
        "comp-pub-2",
        &[("plant/comp-01/badges", b"3".to_vec())],
    )
    .await;
    let on_site = eventually(WAIT, "the compressor's values on its site", || async {
        let t = get_twin(&edge, TWIN_COMP).await.ok()?;
        (reported(&t, "motor_current") == Some(110.0)
            && reported(&t, "operator_badges") == Some(3.0))
        .then_some(t)
    })
    .await;
    assert_eq!(reported(&on_site, "discharge_pressure"), Some(8.0));
    eventually(WAIT, "10 pressure samples in history", || async {
        (history_count(&edge, TWIN_COMP, "discharge_pressure").await == 10).then_some(())
    })
    .await;
    // Off the site: the public signal only, the others withheld and named.
    let off_site = eventually(WAIT, "the compressor through the cloud", || async {
        let t = get_twin(&cloud, TWIN_COMP).await.ok()?;
        reported(&t, "discharge_pressure").map(|_| t)
    })
    .await;
    for protected in ["motor_current", "operator_badges"] {
        assert!(
            !off_site.reported.contains_key(protected),
            "{protected} left the site: {:?}",
            off_site.reported
        );
        assert!(
            off_site.withheld.iter().any(|w| w == protected),
            "{:?}",
            off_site.withheld
        );
    }

    // The set-point: on its command topic, delivered.
    let mut commands = subscribe(port, "comp-sub", "plant/comp-01/set/#").await;
    assert_eq!(next_message(&mut commands, "suback").await.0, "$suback");
    set_desired(&edge, TWIN_COMP, "pressure_limit", 9.5, None)
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut commands, "the pressure_limit command").await,
        ("plant/comp-01/set/pressure_limit".into(), "9.5".into())
    );
    eventually(WAIT, "pressure_limit delivered", || async {
        let t = get_twin(&edge, TWIN_COMP).await.ok()?;
        (desired_status(&t, "pressure_limit")?.0 == DeliveryStatus::Delivered).then_some(())
    })
    .await;

    // The broker restarts: stale with the reason meanwhile; what it took while the
    // gateway was away all arrives (QoS 1, persistent session).
    broker.stop().unwrap();
    let t = eventually(WAIT, "the compressor stale", || async {
        let t = get_twin(&edge, TWIN_COMP).await.ok()?;
        (status(&t).0 == "stale").then_some(t)
    })
    .await;
    assert!(status(&t).1.contains("mqtt broker"), "{:?}", status(&t));
    broker.restart().unwrap();
    let more: Vec<(&str, Vec<u8>)> = (1..=20)
        .map(|i| {
            (
                "plant/comp-01/telemetry",
                format!(r#"{{"p_out": {}, "i_motor": 50}}"#, 10.0 + i as f64 * 0.1).into_bytes(),
            )
        })
        .collect();
    publish_all(port, "comp-pub-3", &more).await;
    eventually(WAIT, "every pressure sample the broker took", || async {
        (history_count(&edge, TWIN_COMP, "discharge_pressure").await >= 30).then_some(())
    })
    .await;
    let t = eventually(WAIT, "the compressor no longer stale", || async {
        let t = get_twin(&edge, TWIN_COMP).await.ok()?;
        (status(&t).0 != "stale").then_some(t)
    })
    .await;
    assert_eq!(reported(&t, "discharge_pressure"), Some(12.0));
    drop(gateway);
}
