//! Device adapters of an IoT gateway (DESIGN §3): real devices over MQTT, Modbus TCP and
//! OPC UA, configured as `[[devices]]` tables, each a [`Device`] behind the same spool,
//! numbering, sealing and chains as the simulators.
//!
//! # Layout
//!
//! - this file: the configuration (validated at start, errors name the device and the
//!   field), the seam to the kinds' schemas ([`resolve_kind`], [`signal_spec`],
//!   [`property_spec`]), the bounded [`Feed`] an adapter's I/O task fills and
//!   [`Device::poll`] drains, and the per-reason counters of values that were refused.
//! - [`mqtt`]: rumqttc, QoS 1 subscriptions in a persistent session, reconnect with
//!   backoff; set-points published as JSON numbers.
//! - [`modbus`]: tokio-modbus over TCP, holding registers read every period with
//!   retries; set-points written to registers.
//! - [`opcua`]: async-opcua, monitored items in a subscription; set-points written to
//!   nodes.
//!
//! Each adapter runs its I/O in one task of the node's device [`TaskController`]; the
//! gateway actor never waits on a device.

pub mod modbus;
pub mod mqtt;
pub mod opcua;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use twinmesh_actors::ports::{Block, Device, DeviceStatus, SetpointOutcome};
use twinmesh_actors::tasks::TaskController;
use twinmesh_twins::kind::{PropertySpec, SignalSpec};
use twinmesh_twins::{AssetKind, TwinId};

/// Most samples an adapter buffers between two polls of the gateway; an MQTT device
/// beyond it stops reading from the broker (back-pressure), a polled one skips a read.
pub const MAX_BUFFERED_SAMPLES: usize = 65_536;

/// Most set-point outcomes kept until the gateway collects them.
const MAX_OUTCOMES: usize = 4096;

/// Most distinct (source, reason) pairs remembered so each is logged once.
const MAX_LOGGED_SOURCES: usize = 10_000;

/// Longest source name remembered (and logged).
const MAX_SOURCE_CHARS: usize = 256;

// --- the seam to the kinds' schemas ---
//
// Adapters know kinds only through these three functions, so kinds loaded from Thing
// Models replace the built-in enum here and nowhere else in this module.

/// The kind a device's `kind` names.
pub fn resolve_kind(name: &str) -> Result<AssetKind, String> {
    name.parse::<AssetKind>().map_err(|e| e.to_string())
}

/// The schema of one signal of a kind.
pub fn signal_spec(kind: AssetKind, signal: &str) -> Result<&'static SignalSpec, String> {
    kind.schema().signal(signal).map_err(|e| {
        let known: Vec<&str> = kind.schema().signals.iter().map(|s| s.name).collect();
        format!("{e} (signals of {kind}: {})", known.join(", "))
    })
}

/// The schema of one set-point of a kind.
pub fn property_spec(kind: AssetKind, property: &str) -> Result<&'static PropertySpec, String> {
    kind.schema().property(property).map_err(|e| e.to_string())
}

// --- configuration ---

/// One `[[devices]]` table: a real device and the twin it feeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// `{site}/{asset}`; the site is the gateway's.
    pub twin: String,
    /// The asset kind (its schema names the signals and set-points).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<mqtt::MqttConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modbus: Option<modbus::ModbusConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opcua: Option<opcua::OpcuaConfig>,
}

/// A device configuration checked against its kind.
#[derive(Debug, Clone)]
pub struct CheckedDevice {
    pub twin: TwinId,
    pub kind: AssetKind,
    pub protocol: Protocol,
}

#[derive(Debug, Clone)]
pub enum Protocol {
    Mqtt(mqtt::MqttPlan),
    Modbus(modbus::ModbusPlan),
    Opcua(opcua::OpcuaPlan),
}

impl DeviceConfig {
    /// Checks the device against its kind and the gateway's site. Errors name the
    /// device and the field: `device site-a/comp-01: mqtt signal "p": unknown signal ...`.
    pub fn check(&self, site: &str) -> Result<CheckedDevice, String> {
        let name = &self.twin;
        let fail = |what: String| format!("device {name}: {what}");
        let twin: TwinId = self
            .twin
            .parse()
            .map_err(|e| fail(format!("invalid twin id: {e}")))?;
        if twin.site() != site {
            return Err(fail(format!(
                "twin is on site {:?}, but this gateway serves site {site:?}",
                twin.site()
            )));
        }
        let kind = resolve_kind(&self.kind).map_err(|e| fail(format!("kind: {e}")))?;
        let protocol = match (&self.mqtt, &self.modbus, &self.opcua) {
            (Some(c), None, None) => Protocol::Mqtt(c.check(kind).map_err(fail)?),
            (None, Some(c), None) => Protocol::Modbus(c.check(kind).map_err(fail)?),
            (None, None, Some(c)) => Protocol::Opcua(c.check(kind).map_err(fail)?),
            (None, None, None) => {
                return Err(fail(
                    "no protocol: add one of [devices.mqtt], [devices.modbus], [devices.opcua]"
                        .to_owned(),
                ))
            }
            _ => {
                return Err(fail(
                    "more than one protocol: a device has one of [devices.mqtt], \
                     [devices.modbus], [devices.opcua]"
                        .to_owned(),
                ))
            }
        };
        Ok(CheckedDevice {
            twin,
            kind,
            protocol,
        })
    }
}

/// Checks every device of a gateway: each is valid and names its own twin.
pub fn check_all(devices: &[DeviceConfig], site: &str) -> Result<Vec<CheckedDevice>, String> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(devices.len());
    for d in devices {
        let checked = d.check(site)?;
        if !seen.insert(checked.twin.clone()) {
            return Err(format!(
                "device {}: configured twice (one [[devices]] table per twin)",
                d.twin
            ));
        }
        out.push(checked);
    }
    Ok(out)
}

/// Starts every device's I/O task on `tasks` and returns the devices for the gateway.
/// `data` is the node's data directory (OPC UA keeps its PKI folder there).
pub fn start(
    devices: Vec<CheckedDevice>,
    node: &str,
    data: &std::path::Path,
    counters: &Arc<DeviceCounters>,
    tasks: &TaskController,
) -> Vec<Box<dyn Device>> {
    devices
        .into_iter()
        .map(|d| {
            let feed = Arc::new(Feed::new(d.twin.clone(), d.kind, counters.clone()));
            let handle: Box<dyn Device> = match d.protocol {
                Protocol::Mqtt(plan) => Box::new(mqtt::start(plan, node, feed, tasks)),
                Protocol::Modbus(plan) => Box::new(modbus::start(plan, feed, tasks)),
                Protocol::Opcua(plan) => {
                    Box::new(opcua::start(plan, feed, data.join("opcua-pki"), tasks))
                }
            };
            handle
        })
        .collect()
}

// --- what was refused ---

/// Why a value from a device was not taken. Counted per reason on `/metrics`
/// (`twinmesh_device_values_rejected_total`) and logged once per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// The payload is not JSON (or not UTF-8, or not a number where one is expected).
    NotJson,
    /// The JSON has no number at the configured path.
    WrongField,
    /// NaN or infinite.
    NotANumber,
    /// Outside the kind's range for the signal.
    OutOfRange,
    /// A message on a topic no signal is mapped to.
    UnknownTopic,
    /// The configured timestamp field is missing or not RFC 3339 / epoch ms.
    BadTimestamp,
    /// The payload is larger than [`mqtt::MAX_PAYLOAD_BYTES`].
    TooLarge,
    /// The device answered a read with an error (e.g. a Modbus exception).
    ReadError,
    /// The adapter's buffer was full (the gateway is not keeping up).
    BufferFull,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotJson => "not_json",
            Refusal::WrongField => "wrong_field",
            Refusal::NotANumber => "not_a_number",
            Refusal::OutOfRange => "out_of_range",
            Refusal::UnknownTopic => "unknown_topic",
            Refusal::BadTimestamp => "bad_timestamp",
            Refusal::TooLarge => "too_large",
            Refusal::ReadError => "read_error",
            Refusal::BufferFull => "buffer_full",
        }
    }
}

/// Values refused by a node's device adapters, by reason.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    refused: Mutex<BTreeMap<&'static str, u64>>,
    logged: Mutex<HashSet<(String, &'static str)>>,
}

impl DeviceCounters {
    /// Counts a refused value and logs it once per (source, reason).
    pub fn refuse(&self, twin: &TwinId, source: &str, why: Refusal, detail: &str) {
        *self
            .refused
            .lock()
            .expect("counters lock")
            .entry(why.as_str())
            .or_default() += 1;
        // Sources come from the device (an MQTT topic may be 64 KiB): what is remembered
        // is bounded in count and length.
        let source: String = source.chars().take(MAX_SOURCE_CHARS).collect();
        let source = source.as_str();
        let mut logged = self.logged.lock().expect("counters lock");
        if logged.len() < MAX_LOGGED_SOURCES && logged.insert((source.to_owned(), why.as_str())) {
            tracing::warn!(twin = %twin, source, reason = why.as_str(), "value from device refused: {detail} (further values like this from this source are counted, not logged)");
        }
    }

    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused.lock().expect("counters lock").clone()
    }
}

// --- the buffer between an adapter's task and the gateway ---

/// What an adapter's I/O task hands the gateway: samples (bounded), its status and
/// the outcomes of set-points.
pub struct Feed {
    pub twin: TwinId,
    pub kind: AssetKind,
    pub counters: Arc<DeviceCounters>,
    inner: Mutex<FeedInner>,
    /// Signalled when the gateway drained the samples (room again).
    room: tokio::sync::Notify,
}

struct FeedInner {
    samples: VecDeque<(&'static SignalSpec, i64, f64)>,
    status: DeviceStatus,
    outcomes: VecDeque<(u64, SetpointOutcome)>,
}

impl Feed {
    pub fn new(twin: TwinId, kind: AssetKind, counters: Arc<DeviceCounters>) -> Self {
        Feed {
            twin,
            kind,
            counters,
            inner: Mutex::new(FeedInner {
                samples: VecDeque::new(),
                status: DeviceStatus::Unreachable("not connected yet".to_owned()),
                outcomes: VecDeque::new(),
            }),
            room: tokio::sync::Notify::new(),
        }
    }

    /// Checks a value against its signal's range and buffers it; false when the
    /// buffer is full (nothing buffered).
    pub fn push(&self, spec: &'static SignalSpec, t_ns: i64, value: f64, source: &str) -> bool {
        if !value.is_finite() {
            self.counters.refuse(
                &self.twin,
                source,
                Refusal::NotANumber,
                &format!("{} is {value}", spec.name),
            );
            return true;
        }
        if value < spec.min || value > spec.max {
            self.counters.refuse(
                &self.twin,
                source,
                Refusal::OutOfRange,
                &format!(
                    "{} = {value} is outside [{}, {}]",
                    spec.name, spec.min, spec.max
                ),
            );
            return true;
        }
        let mut inner = self.inner.lock().expect("feed lock");
        if inner.samples.len() >= MAX_BUFFERED_SAMPLES {
            return false;
        }
        inner.samples.push_back((spec, t_ns, value));
        true
    }

    /// Whether another sample fits.
    pub fn has_room(&self) -> bool {
        self.inner.lock().expect("feed lock").samples.len() < MAX_BUFFERED_SAMPLES
    }

    /// Waits until the gateway drains the buffer (or `bound` passes).
    pub async fn wait_for_room(&self, bound: std::time::Duration) {
        if self.has_room() {
            return;
        }
        let _ = tokio::time::timeout(bound, self.room.notified()).await;
    }

    pub fn set_status(&self, status: DeviceStatus) {
        self.inner.lock().expect("feed lock").status = status;
    }

    pub fn status(&self) -> DeviceStatus {
        self.inner.lock().expect("feed lock").status.clone()
    }

    pub fn outcome(&self, ticket: u64, outcome: SetpointOutcome) {
        let mut inner = self.inner.lock().expect("feed lock");
        if inner.outcomes.len() >= MAX_OUTCOMES {
            // The gateway times the oldest out as unreachable.
            inner.outcomes.pop_front();
        }
        inner.outcomes.push_back((ticket, outcome));
    }

    fn drain(&self) -> Vec<Block> {
        let samples = std::mem::take(&mut self.inner.lock().expect("feed lock").samples);
        self.room.notify_waiters();
        // One block per run of samples of a signal that sit on its nominal grid: a
        // device that timestamps at its sample rate makes multi-sample frames.
        let mut blocks: Vec<Block> = Vec::new();
        for (spec, t, v) in samples {
            let period = (1e9 / spec.rate_hz).round().max(1.0) as i64;
            if let Some(b) = blocks.last_mut().filter(|b| {
                b.signal == spec.name
                    && b.start_ns + b.samples.len() as i64 * b.sample_period_ns == t
            }) {
                b.samples.push(v);
                continue;
            }
            blocks.push(Block {
                signal: spec.name,
                start_ns: t,
                sample_period_ns: period,
                samples: vec![v],
                // Values from a real device are not on a known grid.
                scale: 0.0,
            });
        }
        blocks
    }

    fn take_outcomes(&self) -> Vec<(u64, SetpointOutcome)> {
        self.inner
            .lock()
            .expect("feed lock")
            .outcomes
            .drain(..)
            .collect()
    }
}

/// The gateway's handle on a running adapter: the feed it drains and the channel its
/// set-points go down.
pub struct DeviceHandle {
    feed: Arc<Feed>,
    setpoints: tokio::sync::mpsc::Sender<SetpointRequest>,
}

/// A set-point on its way to an adapter's task.
#[derive(Debug, Clone)]
pub struct SetpointRequest {
    pub ticket: u64,
    pub property: &'static PropertySpec,
    pub value: f64,
}

/// Set-points waiting for an adapter's task at once.
const SETPOINT_QUEUE: usize = 64;

impl DeviceHandle {
    pub fn new(feed: Arc<Feed>) -> (Self, tokio::sync::mpsc::Receiver<SetpointRequest>) {
        let (tx, rx) = tokio::sync::mpsc::channel(SETPOINT_QUEUE);
        (
            DeviceHandle {
                feed,
                setpoints: tx,
            },
            rx,
        )
    }
}

impl Device for DeviceHandle {
    fn twin_id(&self) -> &TwinId {
        &self.feed.twin
    }

    fn kind(&self) -> AssetKind {
        self.feed.kind
    }

    fn poll(&mut self, _now_ns: i64) -> Vec<Block> {
        self.feed.drain()
    }

    fn submit_setpoint(
        &mut self,
        ticket: u64,
        property: &str,
        value: f64,
    ) -> Option<SetpointOutcome> {
        let kind = self.feed.kind;
        let spec = match property_spec(kind, property).and_then(|_| {
            kind.schema()
                .validate_desired(property, value)
                .map_err(|e| e.to_string())
        }) {
            Ok(spec) => spec,
            Err(e) => return Some(SetpointOutcome::Refused(e)),
        };
        if let DeviceStatus::Unreachable(reason) = self.feed.status() {
            return Some(SetpointOutcome::Unreachable(reason));
        }
        match self.setpoints.try_send(SetpointRequest {
            ticket,
            property: spec,
            value,
        }) {
            Ok(()) => None,
            Err(_) => Some(SetpointOutcome::Unreachable(
                "the device's set-point queue is full".to_owned(),
            )),
        }
    }

    fn setpoint_outcomes(&mut self) -> Vec<(u64, SetpointOutcome)> {
        self.feed.take_outcomes()
    }

    fn status(&self) -> Option<DeviceStatus> {
        Some(self.feed.status())
    }
}

/// Reconnect delays: from 100 ms, doubling, at most 5 s.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: std::time::Duration::from_millis(100),
        }
    }
}

impl Backoff {
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Wall-clock time in ns.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed() -> Feed {
        Feed::new(
            "site-a/hpc-01".parse().unwrap(),
            AssetKind::HpcNode,
            Arc::new(DeviceCounters::default()),
        )
    }

    #[test]
    fn values_are_range_checked_and_counted_per_reason() {
        let f = feed();
        let spec = signal_spec(AssetKind::HpcNode, "cpu_temperature").unwrap();
        assert!(f.push(spec, 1, 55.5, "t"));
        assert!(f.push(spec, 2, f64::NAN, "t"));
        assert!(f.push(spec, 3, 500.0, "t"));
        assert!(f.push(spec, 4, -1.0, "t"));
        let blocks = f.drain();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].samples, vec![55.5]);
        assert_eq!(blocks[0].start_ns, 1);
        let refused = f.counters.refused();
        assert_eq!(refused.get("not_a_number"), Some(&1));
        assert_eq!(refused.get("out_of_range"), Some(&2));
    }

    #[test]
    fn samples_on_the_nominal_grid_make_one_block_and_the_buffer_is_bounded() {
        let f = feed();
        let spec = signal_spec(AssetKind::HpcNode, "power").unwrap(); // 1 Hz
        for i in 0..3 {
            assert!(f.push(spec, i * 1_000_000_000, i as f64, "t"));
        }
        assert!(f.push(spec, 3_500_000_000, 9.0, "t"));
        let blocks = f.drain();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].samples, vec![0.0, 1.0, 2.0]);
        assert_eq!(blocks[1].samples, vec![9.0]);
        for i in 0..MAX_BUFFERED_SAMPLES {
            assert!(f.push(spec, i as i64, 1.0, "t"));
        }
        assert!(!f.push(spec, 0, 1.0, "t"), "full buffer takes no more");
        assert_eq!(
            f.drain().iter().map(|b| b.samples.len()).sum::<usize>(),
            MAX_BUFFERED_SAMPLES
        );
        assert!(f.has_room());
    }

    #[test]
    fn kinds_signals_and_properties_are_resolved_with_clear_errors() {
        assert_eq!(resolve_kind("power_meter").unwrap(), AssetKind::PowerMeter);
        assert_eq!(
            resolve_kind("compressor").unwrap_err(),
            "unknown asset kind \"compressor\""
        );
        let e = signal_spec(AssetKind::HpcNode, "rpm").unwrap_err();
        assert!(
            e.contains("cpu_temperature, power, fan_speed, job_load"),
            "{e}"
        );
        assert!(property_spec(AssetKind::HpcNode, "power_cap").is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
