//! `bench mqtt`: samples/s from a mosquitto broker through an IoT gateway's MQTT device
//! into a twin (acknowledged once durable, counted in the twin's history), against
//! mosquitto's own delivery rate of the same messages to a plain subscriber, in the same
//! run on the same broker. Bounded by `--samples` and by a time limit per phase.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;

use twinmesh_nodes::config::NodeConfig;
use twinmesh_nodes::devices::mqtt::{MqttConfig, MqttSignal};
use twinmesh_nodes::devices::DeviceConfig;
use twinmesh_nodes::RunningNode;
use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_proto::v1::{Aggregation, QueryHistoryRequest};
use twinmesh_twins::Tier;

use super::rig::Rig;

/// Longest a phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(120);

const TWIN: &str = "bench/hpc-mqtt";

#[derive(Debug, Serialize)]
pub(crate) struct MqttReport {
    pub samples: u64,
    /// mosquitto → a plain QoS 1 subscriber.
    pub broker_msgs_per_s: f64,
    /// mosquitto → gateway → Zenoh → twin, durable in the twin's history.
    pub gateway_samples_per_s: f64,
    pub ratio: f64,
    /// Samples that reached history within the phase limit.
    pub gateway_samples_stored: u64,
    pub machine: String,
}

struct Broker {
    child: Child,
    port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto` on the PATH, else where Debian puts it (`/usr/sbin`, often not on a
/// user's PATH).
fn mosquitto_bin() -> std::path::PathBuf {
    let sbin = std::path::Path::new("/usr/sbin/mosquitto");
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("mosquitto").is_file()));
    if !on_path && sbin.is_file() {
        sbin.to_owned()
    } else {
        "mosquitto".into()
    }
}

fn start_broker(dir: &std::path::Path) -> anyhow::Result<Broker> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n\
             max_inflight_messages 1000\nuser root\n"
        ),
    )?;
    let child = Command::new(mosquitto_bin())
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run mosquitto (apt-get install mosquitto): {e}"))?;
    let broker = Broker { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "mosquitto did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(broker)
}

/// Publishes `n` values on `topic` with QoS 1 as fast as the broker takes them.
async fn publish(port: u16, id: &str, topic: &str, n: u64) -> anyhow::Result<()> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_inflight(500);
    let (client, mut events) = AsyncClient::new(opts, 1000);
    let driver = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("bench publisher: {e}")),
            }
        }
        Ok(())
    });
    for i in 0..n {
        // Values inside the kind's range for `power` (0..3000 W).
        let v = 100.0 + (i % 2000) as f64;
        client
            .publish(topic, QoS::AtLeastOnce, false, v.to_string())
            .await?;
    }
    tokio::time::timeout(PHASE_LIMIT, driver).await???;
    Ok(())
}

/// The broker alone: messages/s delivered to a plain QoS 1 subscriber.
async fn broker_rate(port: u16, n: u64) -> anyhow::Result<f64> {
    let mut opts = MqttOptions::new("bench-sub", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(opts, 100);
    client
        .subscribe("bench/raw/power", QoS::AtLeastOnce)
        .await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
            break;
        }
    }
    let start = Instant::now();
    let publisher = tokio::spawn(publish(port, "bench-pub-raw", "bench/raw/power", n));
    let mut got = 0;
    let received = tokio::time::timeout(PHASE_LIMIT, async {
        while got < n {
            if let Event::Incoming(Packet::Publish(_)) = events.poll().await? {
                got += 1;
            }
        }
        anyhow::Ok(())
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    publisher.await??;
    received
        .map_err(|_| anyhow::anyhow!("the subscriber got {got} of {n} in {PHASE_LIMIT:?}"))??;
    Ok(n as f64 / secs)
}

async fn stored(client: &mut TwinServiceClient<tonic::transport::Channel>) -> u64 {
    let end = i64::MAX / 2;
    client
        .query_history(QueryHistoryRequest {
            twin_id: TWIN.into(),
            signal: "power".into(),
            start_ns: 0,
            end_ns: end,
            bucket_ns: end,
            aggregation: Aggregation::Count as i32,
        })
        .await
        .map(|r| r.into_inner().buckets.iter().map(|b| b.count).sum())
        .unwrap_or(0)
}

pub(crate) async fn bench_mqtt(samples: u64, machine: String) -> anyhow::Result<MqttReport> {
    let rig = Rig::start().await?;
    let dir = rig._dir.path().to_owned();
    let broker = start_broker(&dir)?;
    let broker_msgs_per_s = broker_rate(broker.port, samples).await?;

    let mut cfg = NodeConfig::new("bench-iot".parse()?, Tier::Iot, "bench");
    cfg.listen = vec!["tcp/127.0.0.1:0".into()];
    cfg.connect = [rig.edge.locators.clone(), rig.cloud.locators.clone()].concat();
    cfg.data = dir.join("iot");
    cfg.site_key_file = Some(dir.join("bench.key"));
    cfg.control_keys_dir = Some(dir.join("keys"));
    cfg.devices = vec![DeviceConfig {
        twin: TWIN.into(),
        kind: "hpc_node".into(),
        mqtt: Some(MqttConfig {
            url: format!("mqtt://127.0.0.1:{}", broker.port),
            ca_file: None,
            username: None,
            password: None,
            client_id: Some("bench-gateway".into()),
            signals: vec![MqttSignal {
                signal: "power".into(),
                topic: "bench/gw/power".into(),
                path: None,
                timestamp_path: None,
            }],
            setpoints: Vec::new(),
        }),
        modbus: None,
        opcua: None,
    }];
    cfg.normalize()?;
    let gateway = RunningNode::start(cfg).await?;
    let mut client = TwinServiceClient::new(rig.cloud_channel().await?);
    // The twin exists and the gateway's session is up before the clock starts.
    let deadline = Instant::now() + PHASE_LIMIT;
    loop {
        let ready = client
            .get_twin(twinmesh_proto::v1::GetTwinRequest {
                twin_id: TWIN.into(),
            })
            .await
            .is_ok_and(|t| t.into_inner().health.is_some_and(|h| h.status != "stale"));
        if ready {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the bench twin did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    publish(broker.port, "bench-pub-gw", "bench/gw/power", samples).await?;
    let mut got = stored(&mut client).await;
    while got < samples && start.elapsed() < PHASE_LIMIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = stored(&mut client).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let gateway_samples_per_s = got as f64 / secs;
    gateway.stop().await?;
    rig.stop().await?;
    drop(broker);
    Ok(MqttReport {
        samples,
        broker_msgs_per_s,
        gateway_samples_per_s,
        ratio: gateway_samples_per_s / broker_msgs_per_s.max(1e-9),
        gateway_samples_stored: got,
        machine,
    })
}
