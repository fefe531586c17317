//! MQTT devices (rumqttc): each signal is read from a topic (a number, or a dotted field
//! of a JSON payload, with an optional timestamp field); each set-point is published as
//! a JSON number. Subscriptions are QoS 1 in a persistent session (`clean_session =
//! false`, a client id stable across restarts), so what the broker queued while the
//! gateway or the broker was away is delivered when they meet again. Messages are
//! acknowledged to the broker only once buffered for the gateway; a full buffer stops
//! the reading (back-pressure to the broker), and packets are bounded in bytes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS};
use serde::{Deserialize, Serialize};

use twinmesh_actors::ports::{DeviceStatus, SetpointOutcome};
use twinmesh_actors::tasks::TaskController;
use twinmesh_twins::kind::SignalSpec;
use twinmesh_twins::AssetKind;

use super::{now_ns, property_spec, signal_spec, Backoff, DeviceHandle, Feed, Refusal};

/// Largest payload taken as a value; larger ones are refused (`too_large`).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Largest MQTT packet read from the broker at all (bounds the memory one message can
/// take). A larger one breaks the connection: brokers should cap messages below it
/// (mosquitto: `message_size_limit`).
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// Keep-alive with the broker: a broker that went away is noticed within 1.5 of it.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Requests (acks, subscriptions, set-points) waiting for the event loop.
const REQUEST_CAPACITY: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` (default port 1883) or `mqtts://host:port` (8883) with `ca_file`.
    pub url: String,
    /// PEM CA certificate(s) the broker's certificate must chain to (`mqtts://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The session's client id; default `twinmesh-{node}-{site}-{asset}`. It must stay
    /// the same across restarts for the broker to keep the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default)]
    pub signals: Vec<MqttSignal>,
    #[serde(default)]
    pub setpoints: Vec<MqttSetpoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSignal {
    pub signal: String,
    /// Topic (or topic filter with `+`/`#`) the values arrive on.
    pub topic: String,
    /// Dotted field of a JSON payload (`a.b.0.c`); absent: the payload is the number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Dotted field with the time of the value: RFC 3339 text or epoch milliseconds;
    /// absent: the time the message arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSetpoint {
    pub property: String,
    /// Topic the value is published on, as a JSON number (QoS 1).
    pub topic: String,
}

/// A checked MQTT device.
#[derive(Debug, Clone)]
pub struct MqttPlan {
    pub host: String,
    pub port: u16,
    /// CA certificates (PEM) when the URL is `mqtts://`.
    pub tls_ca: Option<Vec<u8>>,
    pub credentials: Option<(String, String)>,
    pub client_id: Option<String>,
    pub signals: Vec<SignalPlan>,
    pub setpoints: BTreeMap<&'static str, String>,
}

#[derive(Debug, Clone)]
pub struct SignalPlan {
    pub spec: &'static SignalSpec,
    pub filter: String,
    pub path: Option<Vec<String>>,
    pub timestamp_path: Option<Vec<String>>,
}

/// `(tls, host, port)` of an `mqtt://` or `mqtts://` URL.
pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let bad = |why: &str| format!("invalid url {url:?}: {why}");
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(bad("expected mqtt://host:port or mqtts://host:port"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#']) {
        return Err(bad(
            "only host and port (credentials go in username and password)",
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        (h, p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("port must be 1..=65535"))?,
        None if tls => 8883,
        None => 1883,
    };
    Ok((tls, host.to_owned(), port))
}

fn dotted(path: &str) -> Result<Vec<String>, String> {
    let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("invalid path {path:?}: empty segment"));
    }
    Ok(parts)
}

fn check_topic(topic: &str, filter: bool) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 1024 || topic.contains('\0') {
        return Err(format!("invalid topic {topic:?}"));
    }
    let levels: Vec<&str> = topic.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let wild = l.contains(['+', '#']);
        if wild && !filter {
            return Err(format!(
                "invalid topic {topic:?}: wildcards only in signal topics"
            ));
        }
        if wild && !(*l == "+" || (*l == "#" && i == levels.len() - 1)) {
            return Err(format!(
                "invalid topic filter {topic:?}: `+` is a whole level, `#` the last one"
            ));
        }
    }
    Ok(())
}

impl MqttConfig {
    pub fn check(&self, kind: AssetKind) -> Result<MqttPlan, String> {
        let (tls, host, port) = parse_url(&self.url).map_err(|e| format!("mqtt url: {e}"))?;
        let tls_ca = match (tls, &self.ca_file) {
            (true, Some(path)) => Some(
                std::fs::read(path)
                    .map_err(|e| format!("mqtt ca_file: cannot read {}: {e}", path.display()))?,
            ),
            (true, None) => {
                return Err("mqtt ca_file: mqtts:// needs the CA of the broker".to_owned())
            }
            (false, Some(_)) => return Err("mqtt ca_file: a CA is for mqtts:// URLs".to_owned()),
            (false, None) => None,
        };
        let credentials = match (&self.username, &self.password) {
            (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
            (None, Some(_)) => return Err("mqtt password: given without a username".to_owned()),
            (None, None) => None,
        };
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 256 {
                return Err(format!("mqtt client_id {id:?}: 1 to 256 characters"));
            }
        }
        if self.signals.is_empty() {
            return Err("mqtt signals: none configured".to_owned());
        }
        let mut signals = Vec::new();
        for s in &self.signals {
            let at = |e: String| format!("mqtt signal {:?}: {e}", s.signal);
            let spec = signal_spec(kind, &s.signal).map_err(at)?;
            check_topic(&s.topic, true).map_err(at)?;
            signals.push(SignalPlan {
                spec,
                filter: s.topic.clone(),
                path: s.path.as_deref().map(dotted).transpose().map_err(at)?,
                timestamp_path: s
                    .timestamp_path
                    .as_deref()
                    .map(dotted)
                    .transpose()
                    .map_err(at)?,
            });
        }
        let mut setpoints = BTreeMap::new();
        for p in &self.setpoints {
            let at = |e: String| format!("mqtt setpoint {:?}: {e}", p.property);
            let spec = property_spec(kind, &p.property).map_err(at)?;
            check_topic(&p.topic, false).map_err(at)?;
            if setpoints.insert(spec.name, p.topic.clone()).is_some() {
                return Err(at("configured twice".to_owned()));
            }
        }
        Ok(MqttPlan {
            host,
            port,
            tls_ca,
            credentials,
            client_id: self.client_id.clone(),
            signals,
            setpoints,
        })
    }
}

/// Whether `topic` matches the subscription `filter` (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn field<'a>(json: &'a serde_json::Value, path: &[String]) -> Option<&'a serde_json::Value> {
    path.iter().try_fold(json, |v, key| match v {
        serde_json::Value::Object(m) => m.get(key),
        serde_json::Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// A timestamp field: RFC 3339 text or epoch milliseconds.
pub fn parse_timestamp(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(ms) = n.as_i64() {
                return (0..9_200_000_000_000).contains(&ms).then(|| ms * 1_000_000);
            }
            let ms = n.as_f64()?;
            // Epoch ms from 1970 to 2262 (what fits in i64 ns).
            (ms.is_finite() && (0.0..9.2e12).contains(&ms)).then(|| (ms * 1e6).round() as i64)
        }
        serde_json::Value::String(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()?;
            i64::try_from(t.unix_timestamp_nanos()).ok()
        }
        _ => None,
    }
}

/// A value of a signal at a time, or why a message gave none.
pub type Decoded = Result<(&'static SignalSpec, i64, f64), (Refusal, String)>;

/// Turns one message into values of the signals whose filter its topic matches, or
/// says why not. Pure: the adapter's task and the tests call it.
pub fn decode(
    signals: &[SignalPlan],
    topic: &str,
    payload: &[u8],
    arrival_ns: i64,
) -> Vec<Decoded> {
    let matching: Vec<&SignalPlan> = signals
        .iter()
        .filter(|s| topic_matches(&s.filter, topic))
        .collect();
    if matching.is_empty() {
        return vec![Err((
            Refusal::UnknownTopic,
            format!("no signal is mapped to topic {topic:?}"),
        ))];
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return vec![Err((
            Refusal::TooLarge,
            format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
                payload.len()
            ),
        ))];
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return vec![Err((Refusal::NotJson, "payload is not UTF-8".to_owned()))];
    };
    let needs_json = matching
        .iter()
        .any(|s| s.path.is_some() || s.timestamp_path.is_some());
    let json = if needs_json {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(j) => Some(j),
            Err(e) => return vec![Err((Refusal::NotJson, format!("payload is not JSON: {e}")))],
        }
    } else {
        None
    };
    matching
        .into_iter()
        .map(|s| {
            let value = match (&s.path, &json) {
                (Some(path), Some(json)) => match field(json, path).map(|v| (v, v.as_f64())) {
                    Some((_, Some(v))) => v,
                    Some((v, None)) => {
                        return Err((
                            Refusal::WrongField,
                            format!("field {} is not a number: {v}", path.join(".")),
                        ))
                    }
                    None => {
                        return Err((
                            Refusal::WrongField,
                            format!("payload has no field {}", path.join(".")),
                        ))
                    }
                },
                // The payload is the number (`NaN` and `inf` read, then refused as such).
                _ => {
                    let number = text.trim().parse::<f64>().ok();
                    match number {
                        Some(v) => v,
                        None => {
                            return Err((Refusal::NotJson, "payload is not a number".to_owned()))
                        }
                    }
                }
            };
            let t = match (&s.timestamp_path, &json) {
                (Some(path), Some(json)) => match field(json, path).and_then(parse_timestamp) {
                    Some(t) => t,
                    None => {
                        return Err((
                            Refusal::BadTimestamp,
                            format!(
                                "field {} is not an RFC 3339 time or epoch milliseconds",
                                path.join(".")
                            ),
                        ))
                    }
                },
                _ => arrival_ns,
            };
            Ok((s.spec, t, value))
        })
        .collect()
}

/// Starts the device's event-loop and set-point tasks.
pub fn start(plan: MqttPlan, node: &str, feed: Arc<Feed>, tasks: &TaskController) -> DeviceHandle {
    let (handle, setpoints) = DeviceHandle::new(feed.clone());
    let client_id = plan
        .client_id
        .clone()
        .unwrap_or_else(|| format!("twinmesh-{node}-{}-{}", feed.twin.site(), feed.twin.asset()));
    let mut options = MqttOptions::new(client_id, plan.host.clone(), plan.port);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if let Some((user, password)) = &plan.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    if let Some(ca) = &plan.tls_ca {
        options.set_transport(rumqttc::Transport::tls(ca.clone(), None, None));
    }
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    // Tickets of set-points handed to the event loop, in order, until it numbers them.
    let queued = Arc::new(Mutex::new(VecDeque::new()));
    let plan = Arc::new(plan);
    tasks.spawn_until_cancelled(run_events(
        plan.clone(),
        feed.clone(),
        client.clone(),
        eventloop,
        queued.clone(),
    ));
    tasks.spawn_until_cancelled(run_setpoints(plan, feed, client, setpoints, queued));
    handle
}

async fn run_events(
    plan: Arc<MqttPlan>,
    feed: Arc<Feed>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    queued: Arc<Mutex<VecDeque<u64>>>,
) {
    let broker = format!("{}:{}", plan.host, plan.port);
    let mut backoff = Backoff::default();
    // Set-points published and not yet acknowledged by the broker, by packet id.
    let mut inflight: BTreeMap<u16, u64> = BTreeMap::new();
    let mut filters: Vec<&str> = plan.signals.iter().map(|s| s.filter.as_str()).collect();
    filters.sort_unstable();
    filters.dedup();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                tracing::info!(twin = %feed.twin, broker, session_present = ack.session_present, "mqtt connected");
                // The broker keeps the subscriptions of a persistent session; subscribing
                // again is harmless and covers a session the broker lost.
                for f in &filters {
                    if let Err(e) = client.try_subscribe(*f, QoS::AtLeastOnce) {
                        tracing::warn!(twin = %feed.twin, filter = f, "mqtt subscribe not queued: {e}");
                    }
                }
                feed.set_status(DeviceStatus::Reachable);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                tracing::debug!(twin = %feed.twin, codes = ?ack.return_codes, "mqtt subscribed");
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    feed.set_status(DeviceStatus::Unreachable(format!(
                        "mqtt broker {broker} refused a subscription"
                    )));
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                take(&plan, &feed, &p).await;
                if let Err(e) = client.try_ack(&p) {
                    tracing::debug!(twin = %feed.twin, "mqtt ack not queued: {e}");
                }
            }
            // A packet id already in flight is a publish sent again after a reconnect,
            // not the next set-point.
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if !inflight.contains_key(&pkid) => {
                if let Some(ticket) = queued.lock().expect("queue lock").pop_front() {
                    inflight.insert(pkid, ticket);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(ticket) = inflight.remove(&ack.pkid) {
                    feed.outcome(ticket, SetpointOutcome::Delivered);
                }
            }
            Ok(_) => {}
            Err(e) => {
                let reason = format!("mqtt broker {broker}: {e}");
                if feed.status() != DeviceStatus::Unreachable(reason.clone()) {
                    tracing::warn!(twin = %feed.twin, "{reason}; reconnecting");
                }
                feed.set_status(DeviceStatus::Unreachable(reason));
                // Packets in flight are sent again on the next connection (persistent
                // session); their set-points are answered then, or time out.
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Buffers the values of one message for the gateway, waiting for room when the buffer
/// is full (the broker holds the rest: nothing is acknowledged meanwhile).
async fn take(plan: &MqttPlan, feed: &Feed, p: &Publish) {
    let arrival = now_ns();
    for r in decode(&plan.signals, &p.topic, &p.payload, arrival) {
        match r {
            Ok((spec, t, v)) => {
                while !feed.push(spec, t, v, &p.topic) {
                    feed.wait_for_room(Duration::from_millis(100)).await;
                }
            }
            Err((why, detail)) => feed.counters.refuse(&feed.twin, &p.topic, why, &detail),
        }
    }
}

async fn run_setpoints(
    plan: Arc<MqttPlan>,
    feed: Arc<Feed>,
    client: AsyncClient,
    mut setpoints: tokio::sync::mpsc::Receiver<super::SetpointRequest>,
    queued: Arc<Mutex<VecDeque<u64>>>,
) {
    while let Some(req) = setpoints.recv().await {
        let Some(topic) = plan.setpoints.get(req.property.name) else {
            feed.outcome(
                req.ticket,
                SetpointOutcome::Refused(format!(
                    "no mqtt topic is configured for set-point {}",
                    req.property.name
                )),
            );
            continue;
        };
        let payload = serde_json::Number::from_f64(req.value)
            .map(|n| n.to_string())
            .unwrap_or_default();
        // Queued before the request, so the event loop pairs it with its packet id.
        queued.lock().expect("queue lock").push_back(req.ticket);
        if let Err(e) = client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
            .await
        {
            queued.lock().expect("queue lock").pop_back();
            feed.outcome(
                req.ticket,
                SetpointOutcome::Unreachable(format!("mqtt publish failed: {e}")),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> MqttPlan {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            ca_file: None,
            username: None,
            password: None,
            client_id: None,
            signals: vec![
                MqttSignal {
                    signal: "cpu_temperature".into(),
                    topic: "hpc/n1/telemetry".into(),
                    path: Some("cpu.temp".into()),
                    timestamp_path: Some("ts".into()),
                },
                MqttSignal {
                    signal: "power".into(),
                    topic: "hpc/+/power".into(),
                    path: None,
                    timestamp_path: None,
                },
            ],
            setpoints: vec![MqttSetpoint {
                property: "power_cap".into(),
                topic: "hpc/n1/set/power_cap".into(),
            }],
        }
        .check(AssetKind::HpcNode)
        .unwrap()
    }

    fn refusal(r: &[Decoded]) -> Refusal {
        r[0].as_ref().unwrap_err().0
    }

    #[test]
    fn urls_are_parsed_and_bad_ones_named() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_url("mqtts://broker").unwrap(),
            (true, "broker".into(), 8883)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1883").unwrap(),
            (false, "::1".into(), 1883)
        );
        assert!(parse_url("http://x:1")
            .unwrap_err()
            .contains("expected mqtt://"));
        assert!(parse_url("mqtt://x:0").is_err());
        assert!(parse_url("mqtt://u:p@x:1").is_err());
    }

    #[test]
    fn values_timestamps_and_refusals() {
        let p = plan();
        let ok = decode(
            &p.signals,
            "hpc/n1/telemetry",
            br#"{"cpu":{"temp":61.5},"ts":"2025-01-02T03:04:05.5Z"}"#,
            7,
        );
        let (spec, t, v) = ok[0].clone().unwrap();
        assert_eq!((spec.name, v), ("cpu_temperature", 61.5));
        assert_eq!(t, 1_735_787_045_500_000_000);
        let ms = decode(
            &p.signals,
            "hpc/n1/telemetry",
            br#"{"cpu":{"temp":1},"ts":1700000000123}"#,
            7,
        );
        assert_eq!(ms[0].clone().unwrap().1, 1_700_000_000_123_000_000);
        let plain = decode(&p.signals, "hpc/n7/power", b" 1234.5 ", 99);
        assert_eq!(plain[0].clone().unwrap().1, 99);
        assert_eq!(plain[0].clone().unwrap().2, 1234.5);
        assert_eq!(
            refusal(&decode(&p.signals, "hpc/n1/telemetry", b"not json", 0)),
            Refusal::NotJson
        );
        assert_eq!(
            refusal(&decode(
                &p.signals,
                "hpc/n1/telemetry",
                br#"{"cpu":{"t":1},"ts":1}"#,
                0
            )),
            Refusal::WrongField
        );
        assert_eq!(
            refusal(&decode(
                &p.signals,
                "hpc/n1/telemetry",
                br#"{"cpu":{"temp":"hot"},"ts":1}"#,
                0
            )),
            Refusal::WrongField
        );
        assert_eq!(
            refusal(&decode(
                &p.signals,
                "hpc/n1/telemetry",
                br#"{"cpu":{"temp":1},"ts":"yesterday"}"#,
                0
            )),
            Refusal::BadTimestamp
        );
        assert_eq!(
            refusal(&decode(&p.signals, "hpc/n1/other", b"1", 0)),
            Refusal::UnknownTopic
        );
        assert_eq!(
            refusal(&decode(&p.signals, "hpc/n1/power", b"\"12\"", 0)),
            Refusal::NotJson
        );
        let big = vec![b'1'; MAX_PAYLOAD_BYTES + 1];
        assert_eq!(
            refusal(&decode(&p.signals, "hpc/n1/power", &big, 0)),
            Refusal::TooLarge
        );
        // NaN reads as a number and is refused by the feed as not_a_number.
        let nan = decode(&p.signals, "hpc/n1/power", b"NaN", 0);
        assert!(nan[0].clone().unwrap().2.is_nan());
    }

    #[test]
    fn topic_filters_match_like_a_broker() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("a/+/c", "a/b/d"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(check_topic("a/#/b", true).is_err());
        assert!(check_topic("a/x+", true).is_err());
        assert!(check_topic("a/+", false).is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = MqttConfig {
            url: "mqtt://127.0.0.1".into(),
            ca_file: None,
            username: None,
            password: None,
            client_id: None,
            signals: vec![MqttSignal {
                signal: "rpm".into(),
                topic: "t".into(),
                path: None,
                timestamp_path: None,
            }],
            setpoints: vec![],
        };
        let e = c.check(AssetKind::HpcNode).unwrap_err();
        assert!(e.starts_with("mqtt signal \"rpm\": unknown signal"), "{e}");
        c.signals[0].signal = "power".into();
        c.setpoints.push(MqttSetpoint {
            property: "warp".into(),
            topic: "t/set".into(),
        });
        let e = c.check(AssetKind::HpcNode).unwrap_err();
        assert!(
            e.starts_with("mqtt setpoint \"warp\": unknown property"),
            "{e}"
        );
        c.setpoints.clear();
        c.url = "mqtts://127.0.0.1".into();
        assert!(c
            .check(AssetKind::HpcNode)
            .unwrap_err()
            .contains("needs the CA"));
    }
}
