//! OPC UA devices (async-opcua client): each signal is a monitored item of one
//! subscription (the server reports changes; nothing is polled); each set-point is a
//! write of the node's value (as a Double). The session reconnects by itself, with
//! backoff, and carries its subscription over to the new session. Security: none
//! (sign-and-encrypt is not offered yet; a config asking for it is refused at start).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, Session, SessionPollResult};
use opcua::types::{
    AttributeId, DataValue, MessageSecurityMode, MonitoredItemCreateRequest, NodeId, NumericRange,
    ReadValueId, TimestampsToReturn, UserTokenPolicy, Variant, WriteValue,
};
use serde::{Deserialize, Serialize};

use twinmesh_actors::ports::{DeviceStatus, SetpointOutcome};
use twinmesh_actors::tasks::TaskController;
use twinmesh_twins::kind::{PropertySpec, SignalSpec};
use twinmesh_twins::AssetKind;

use super::{now_ns, property_spec, signal_spec, Backoff, DeviceHandle, Feed, Refusal};

fn default_publishing_ms() -> u64 {
    100
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaConfig {
    /// `opc.tcp://host:port[/path]`.
    pub endpoint: String,
    /// How often the server sends the changes of the monitored items.
    #[serde(default = "default_publishing_ms")]
    pub publishing_ms: u64,
    #[serde(default)]
    pub signals: Vec<OpcuaSignal>,
    #[serde(default)]
    pub setpoints: Vec<OpcuaSetpoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaSignal {
    pub signal: String,
    /// Node id, e.g. `ns=2;s=Press.Force`.
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaSetpoint {
    pub property: String,
    pub node: String,
}

#[derive(Debug, Clone)]
pub struct OpcuaPlan {
    pub endpoint: String,
    pub publishing: Duration,
    pub signals: Vec<(&'static SignalSpec, NodeId)>,
    pub setpoints: Vec<(&'static PropertySpec, NodeId)>,
}

fn parse_node(node: &str) -> Result<NodeId, String> {
    NodeId::from_str(node).map_err(|_| {
        format!("invalid node id {node:?}: expected e.g. ns=2;s=Press.Force or ns=2;i=1001")
    })
}

impl OpcuaConfig {
    pub fn check(&self, kind: AssetKind) -> Result<OpcuaPlan, String> {
        let rest = self.endpoint.strip_prefix("opc.tcp://").ok_or_else(|| {
            format!(
                "opcua endpoint: invalid endpoint {:?}: expected opc.tcp://host:port",
                self.endpoint
            )
        })?;
        let authority = rest.split('/').next().unwrap_or_default();
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(format!(
                "opcua endpoint: invalid endpoint {:?}: expected opc.tcp://host:port",
                self.endpoint
            ));
        }
        if !(10..=60_000).contains(&self.publishing_ms) {
            return Err(format!(
                "opcua publishing_ms: {} is outside 10..=60000",
                self.publishing_ms
            ));
        }
        if self.signals.is_empty() {
            return Err("opcua signals: none configured".to_owned());
        }
        let mut signals = Vec::new();
        for s in &self.signals {
            let at = |e: String| format!("opcua signal {:?}: {e}", s.signal);
            let spec = signal_spec(kind, &s.signal).map_err(at)?;
            let node = parse_node(&s.node).map_err(at)?;
            if signals.iter().any(|(_, n)| *n == node) {
                return Err(at(format!("node {} is mapped twice", s.node)));
            }
            signals.push((spec, node));
        }
        let mut setpoints = Vec::new();
        for p in &self.setpoints {
            let at = |e: String| format!("opcua setpoint {:?}: {e}", p.property);
            let spec = property_spec(kind, &p.property).map_err(at)?;
            setpoints.push((spec, parse_node(&p.node).map_err(at)?));
        }
        Ok(OpcuaPlan {
            endpoint: self.endpoint.clone(),
            publishing: Duration::from_millis(self.publishing_ms),
            signals,
            setpoints,
        })
    }
}

/// Starts the device's session task; `pki_dir` holds what the client keeps on disk.
pub fn start(
    plan: OpcuaPlan,
    feed: Arc<Feed>,
    pki_dir: std::path::PathBuf,
    tasks: &TaskController,
) -> DeviceHandle {
    let (handle, setpoints) = DeviceHandle::new(feed.clone());
    tasks.spawn_until_cancelled(run(plan, feed, pki_dir, setpoints, tasks.clone()));
    handle
}

/// The number a data change carries, or why it carries none.
fn value_of(dv: &DataValue) -> Result<(f64, Option<i64>), (Refusal, String)> {
    if let Some(status) = dv.status.filter(|s| !s.is_good()) {
        return Err((Refusal::ReadError, format!("status {status}")));
    }
    let t = dv
        .source_timestamp
        .and_then(|t| t.as_chrono().timestamp_nanos_opt());
    match dv.value.as_ref() {
        Some(v) => match v.as_f64() {
            Some(x) => Ok((x, t)),
            None => Err((Refusal::WrongField, format!("value {v:?} is not a number"))),
        },
        None => Err((Refusal::WrongField, "no value".to_owned())),
    }
}

async fn run(
    plan: OpcuaPlan,
    feed: Arc<Feed>,
    pki_dir: std::path::PathBuf,
    mut setpoints: tokio::sync::mpsc::Receiver<super::SetpointRequest>,
    tasks: TaskController,
) {
    let mut backoff = Backoff::default();
    let source = plan.endpoint.clone();
    loop {
        let client = ClientBuilder::new()
            .application_name("twinmesh gateway")
            .application_uri("urn:twinmesh:gateway")
            .product_uri("urn:twinmesh")
            .pki_dir(pki_dir.clone())
            .create_sample_keypair(false)
            .trust_server_certs(true)
            // The session reconnects by itself, forever, with backoff.
            .session_retry_limit(-1)
            .session_retry_initial(Duration::from_millis(100))
            .session_retry_max(Backoff::MAX)
            .keep_alive_interval(Duration::from_secs(1))
            .request_timeout(Duration::from_secs(5))
            .client();
        let mut client = match client {
            Ok(c) => c,
            Err(e) => {
                feed.set_status(DeviceStatus::Unreachable(format!(
                    "opc ua client: {}",
                    e.join("; ")
                )));
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let endpoint = (
            plan.endpoint.as_str(),
            "None",
            MessageSecurityMode::None,
            UserTokenPolicy::anonymous(),
        );
        let (session, event_loop) =
            match client.connect_to_endpoint_directly(endpoint, IdentityToken::Anonymous) {
                Ok(s) => s,
                Err(e) => {
                    feed.set_status(DeviceStatus::Unreachable(format!(
                        "opc ua server {}: {e}",
                        plan.endpoint
                    )));
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
        let (events_tx, mut events) = tokio::sync::mpsc::channel::<Result<bool, String>>(16);
        let endpoint_name = plan.endpoint.clone();
        // The session's event loop: connects, reconnects, keeps alive, publishes.
        tasks.spawn_until_cancelled(async move {
            let stream = event_loop.enter();
            tokio::pin!(stream);
            while let Some(r) = stream.next().await {
                let event = match r {
                    Ok(SessionPollResult::Reconnected(_)) => Some(Ok(true)),
                    Ok(SessionPollResult::ConnectionLost(s)) => Some(Err(format!(
                        "opc ua server {endpoint_name}: connection lost: {s}"
                    ))),
                    Ok(SessionPollResult::ReconnectFailed(s)) => {
                        Some(Err(format!("opc ua server {endpoint_name}: {s}")))
                    }
                    Ok(_) => None,
                    Err(s) => {
                        let _ = events_tx
                            .send(Err(format!(
                                "opc ua server {endpoint_name}: session ended: {s}"
                            )))
                            .await;
                        return;
                    }
                };
                if let Some(e) = event {
                    if events_tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
        });
        let mut subscribed = false;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(_)) => {
                        backoff.reset();
                        if !subscribed {
                            match subscribe(&session, &plan, &feed, &source).await {
                                Ok(()) => subscribed = true,
                                Err(e) => {
                                    feed.set_status(DeviceStatus::Unreachable(e));
                                    continue;
                                }
                            }
                        }
                        tracing::info!(twin = %feed.twin, endpoint = plan.endpoint, "opc ua connected");
                        feed.set_status(DeviceStatus::Reachable);
                    }
                    Some(Err(reason)) => {
                        if feed.status() != DeviceStatus::Unreachable(reason.clone()) {
                            tracing::warn!(twin = %feed.twin, "{reason}; reconnecting");
                        }
                        feed.set_status(DeviceStatus::Unreachable(reason));
                    }
                    // The session ended for good: start a new one.
                    None => break,
                },
                req = setpoints.recv() => {
                    let Some(req) = req else { return };
                    let outcome = write(&session, &plan, &req).await;
                    feed.outcome(req.ticket, outcome);
                }
            }
        }
        let _ = session.disconnect().await;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One subscription with a monitored item per signal.
async fn subscribe(
    session: &Arc<Session>,
    plan: &OpcuaPlan,
    feed: &Arc<Feed>,
    source: &str,
) -> Result<(), String> {
    let by_node: HashMap<NodeId, &'static SignalSpec> =
        plan.signals.iter().map(|(s, n)| (n.clone(), *s)).collect();
    let last = Arc::new(Mutex::new(HashMap::new()));
    let (cb_feed, cb_last, cb_source) = (feed.clone(), last.clone(), source.to_owned());
    let callback = DataChangeCallback::new(move |dv, item| {
        let node = &item.item_to_monitor().node_id;
        if let Some(spec) = by_node.get(node) {
            take(&cb_feed, &cb_last, spec, node, &dv, &cb_source);
        }
    });
    let id = session
        .create_subscription(plan.publishing, 100, 10, 0, 0, true, callback)
        .await
        .map_err(|s| format!("opc ua server {}: subscription refused: {s}", plan.endpoint))?;
    let items: Vec<MonitoredItemCreateRequest> =
        plan.signals.iter().map(|(_, n)| n.clone().into()).collect();
    let created = session
        .create_monitored_items(id, TimestampsToReturn::Both, items)
        .await
        .map_err(|s| {
            format!(
                "opc ua server {}: monitored items refused: {s}",
                plan.endpoint
            )
        })?;
    for (c, (spec, node)) in created.iter().zip(&plan.signals) {
        if !c.result.status_code.is_good() {
            tracing::warn!(twin = %feed.twin, signal = spec.name, %node, status = %c.result.status_code, "opc ua server refused a monitored item");
        }
    }
    // The first notification of an item (its current value) can arrive before the
    // client knows the item and be dropped — for a value that never changes, for good:
    // read the current values once; `last` drops the one that came both ways.
    let reads: Vec<ReadValueId> = plan.signals.iter().map(|(_, n)| n.clone().into()).collect();
    match session.read(&reads, TimestampsToReturn::Both, 0.0).await {
        Ok(values) => {
            for (dv, (spec, node)) in values.iter().zip(&plan.signals) {
                take(feed, &last, spec, node, dv, source);
            }
        }
        Err(s) => tracing::debug!(twin = %feed.twin, "opc ua initial read failed: {s}"),
    }
    Ok(())
}

/// Source timestamp of the last value taken per node.
type Last = Arc<Mutex<HashMap<NodeId, i64>>>;

/// Whether `dv` of `node` is new (not the value with the same source timestamp again).
fn first_time(last: &Last, node: &NodeId, dv: &DataValue) -> bool {
    let Some(t) = dv
        .source_timestamp
        .and_then(|t| t.as_chrono().timestamp_nanos_opt())
    else {
        return true;
    };
    last.lock().expect("last lock").insert(node.clone(), t) != Some(t)
}

/// Buffers one data value of `node` for the gateway, or counts why not.
fn take(
    feed: &Feed,
    last: &Last,
    spec: &'static SignalSpec,
    node: &NodeId,
    dv: &DataValue,
    source: &str,
) {
    if !first_time(last, node, dv) {
        return;
    }
    let at = format!("{source} {node}");
    match value_of(dv) {
        Ok((v, t)) => {
            if !feed.push(spec, t.unwrap_or_else(now_ns), v, &at) {
                feed.counters.refuse(
                    &feed.twin,
                    &at,
                    Refusal::BufferFull,
                    "the gateway is not keeping up; a change was dropped",
                );
            }
        }
        Err((why, detail)) => feed.counters.refuse(&feed.twin, &at, why, &detail),
    }
}

async fn write(
    session: &Session,
    plan: &OpcuaPlan,
    req: &super::SetpointRequest,
) -> SetpointOutcome {
    let Some((_, node)) = plan
        .setpoints
        .iter()
        .find(|(p, _)| p.name == req.property.name)
    else {
        return SetpointOutcome::Refused(format!(
            "no opc ua node is configured for set-point {}",
            req.property.name
        ));
    };
    let value = WriteValue {
        node_id: node.clone(),
        attribute_id: AttributeId::Value as u32,
        index_range: NumericRange::None,
        value: DataValue::new_now(Variant::Double(req.value)),
    };
    match tokio::time::timeout(Duration::from_secs(10), session.write(&[value])).await {
        Ok(Ok(codes)) => match codes.first() {
            Some(c) if c.is_good() => SetpointOutcome::Delivered,
            Some(c) => {
                SetpointOutcome::Refused(format!("opc ua server refused writing {node}: {c}"))
            }
            None => {
                SetpointOutcome::Refused(format!("opc ua server answered no status for {node}"))
            }
        },
        Ok(Err(s)) => SetpointOutcome::Unreachable(format!("opc ua server {}: {s}", plan.endpoint)),
        Err(_) => SetpointOutcome::Unreachable(format!(
            "opc ua server {}: no answer to the write within 10s",
            plan.endpoint
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked_against_the_kind() {
        let mut c = OpcuaConfig {
            endpoint: "opc.tcp://127.0.0.1:4840".into(),
            publishing_ms: 100,
            signals: vec![OpcuaSignal {
                signal: "spindle_speed".into(),
                node: "ns=2;s=Spindle.Speed".into(),
            }],
            setpoints: vec![OpcuaSetpoint {
                property: "speed_override".into(),
                node: "ns=2;s=Spindle.Override".into(),
            }],
        };
        let plan = c.check(AssetKind::Spindle).unwrap();
        assert_eq!(plan.signals[0].1, NodeId::new(2, "Spindle.Speed"));
        c.signals[0].node = "Spindle.Speed".into();
        let e = c.check(AssetKind::Spindle).unwrap_err();
        assert!(
            e.starts_with("opcua signal \"spindle_speed\": invalid node id"),
            "{e}"
        );
        c.endpoint = "http://x".into();
        assert!(c
            .check(AssetKind::Spindle)
            .unwrap_err()
            .starts_with("opcua endpoint"));
    }

    #[test]
    fn data_values_become_numbers_or_refusals() {
        let dv = DataValue::new_now(Variant::Float(2.5));
        let (v, t) = value_of(&dv).unwrap();
        assert_eq!(v, 2.5);
        assert!(t.is_some());
        let s = DataValue::new_now(Variant::from("hot"));
        assert_eq!(value_of(&s).unwrap_err().0, Refusal::WrongField);
    }
}
