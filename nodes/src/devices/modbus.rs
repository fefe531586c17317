//! Modbus TCP devices (tokio-modbus): every `period_ms` each signal's holding
//! register(s) are read — `u16`, `i16`, `u32`, `i32` or `f32`, big-endian words — and
//! scaled; set-points are scaled back and written. A read that fails on the wire is
//! retried on a fresh connection; a server that answers with an exception is counted
//! (`read_error`) and named with its register, and the device stays reachable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::Slave;

use twinmesh_actors::ports::{DeviceStatus, SetpointOutcome};
use twinmesh_actors::tasks::TaskController;
use twinmesh_twins::kind::{PropertySpec, SignalSpec};
use twinmesh_twins::AssetKind;

use super::{now_ns, property_spec, signal_spec, Backoff, DeviceHandle, Feed, Refusal};

fn default_unit() -> u8 {
    1
}
fn default_period_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_retries() -> u32 {
    2
}
fn default_type() -> String {
    "u16".to_owned()
}
fn default_scale() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// `ip:port` of the Modbus TCP server.
    pub address: String,
    /// Unit (slave) id.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// How often every signal is read.
    #[serde(default = "default_period_ms")]
    pub period_ms: u64,
    /// How long one request may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries of a request that failed on the wire (each on a fresh connection).
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub signals: Vec<ModbusSignal>,
    #[serde(default)]
    pub setpoints: Vec<ModbusSetpoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSignal {
    pub signal: String,
    /// First holding register (0-based).
    pub register: u16,
    /// `u16`, `i16`, `u32`, `i32` or `f32` (two registers, big-endian words).
    #[serde(rename = "type", default = "default_type")]
    pub kind: String,
    /// value = register value × scale.
    #[serde(default = "default_scale")]
    pub scale: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSetpoint {
    pub property: String,
    pub register: u16,
    #[serde(rename = "type", default = "default_type")]
    pub kind: String,
    /// register value = value / scale.
    #[serde(default = "default_scale")]
    pub scale: f64,
}

/// How a value sits in holding registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterType {
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl std::str::FromStr for RegisterType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "u16" => RegisterType::U16,
            "i16" => RegisterType::I16,
            "u32" => RegisterType::U32,
            "i32" => RegisterType::I32,
            "f32" => RegisterType::F32,
            _ => {
                return Err(format!(
                    "invalid register type {s:?}: expected u16, i16, u32, i32 or f32"
                ))
            }
        })
    }
}

impl RegisterType {
    pub fn words(self) -> u16 {
        match self {
            RegisterType::U16 | RegisterType::I16 => 1,
            _ => 2,
        }
    }

    /// The raw value of `words` (big-endian word order).
    pub fn decode(self, words: &[u16]) -> Option<f64> {
        let pair = || Some(((*words.first()? as u32) << 16) | *words.get(1)? as u32);
        Some(match self {
            RegisterType::U16 => *words.first()? as f64,
            RegisterType::I16 => *words.first()? as i16 as f64,
            RegisterType::U32 => pair()? as f64,
            RegisterType::I32 => pair()? as i32 as f64,
            RegisterType::F32 => f32::from_bits(pair()?) as f64,
        })
    }

    /// The words of raw value `raw`, or why it does not fit.
    pub fn encode(self, raw: f64) -> Result<Vec<u16>, String> {
        let int = |lo: f64, hi: f64| {
            let r = raw.round();
            (r.is_finite() && r >= lo && r <= hi)
                .then_some(r)
                .ok_or_else(|| format!("{raw} does not fit a {self:?} register"))
        };
        let split = |v: u32| vec![(v >> 16) as u16, v as u16];
        Ok(match self {
            RegisterType::U16 => vec![int(0.0, u16::MAX as f64)? as u16],
            RegisterType::I16 => vec![int(i16::MIN as f64, i16::MAX as f64)? as i16 as u16],
            RegisterType::U32 => split(int(0.0, u32::MAX as f64)? as u32),
            RegisterType::I32 => split(int(i32::MIN as f64, i32::MAX as f64)? as i32 as u32),
            RegisterType::F32 => {
                let f = raw as f32;
                if !f.is_finite() {
                    return Err(format!("{raw} does not fit an F32 register"));
                }
                split(f.to_bits())
            }
        })
    }
}

/// A checked Modbus device.
#[derive(Debug, Clone)]
pub struct ModbusPlan {
    pub address: SocketAddr,
    pub unit: u8,
    pub period: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub signals: Vec<(&'static SignalSpec, u16, RegisterType, f64)>,
    pub setpoints: Vec<(&'static PropertySpec, u16, RegisterType, f64)>,
}

fn check_register(register: u16, kind: &str, scale: f64) -> Result<RegisterType, String> {
    let t: RegisterType = kind.parse()?;
    if register as u32 + t.words() as u32 > 65_536 {
        return Err(format!(
            "register {register} + {} words is past 65535",
            t.words()
        ));
    }
    if !scale.is_finite() || scale == 0.0 {
        return Err(format!(
            "invalid scale {scale}: a finite number other than 0"
        ));
    }
    Ok(t)
}

impl ModbusConfig {
    pub fn check(&self, kind: AssetKind) -> Result<ModbusPlan, String> {
        let address: SocketAddr = self.address.parse().map_err(|_| {
            format!(
                "modbus address: invalid address {:?}: expected ip:port",
                self.address
            )
        })?;
        if !(10..=3_600_000).contains(&self.period_ms) {
            return Err(format!(
                "modbus period_ms: {} is outside 10..=3600000",
                self.period_ms
            ));
        }
        if !(10..=60_000).contains(&self.timeout_ms) {
            return Err(format!(
                "modbus timeout_ms: {} is outside 10..=60000",
                self.timeout_ms
            ));
        }
        if self.retries > 10 {
            return Err(format!("modbus retries: {} is more than 10", self.retries));
        }
        if self.signals.is_empty() {
            return Err("modbus signals: none configured".to_owned());
        }
        let mut signals = Vec::new();
        for s in &self.signals {
            let at = |e: String| format!("modbus signal {:?}: {e}", s.signal);
            let spec = signal_spec(kind, &s.signal).map_err(at)?;
            let t = check_register(s.register, &s.kind, s.scale).map_err(at)?;
            signals.push((spec, s.register, t, s.scale));
        }
        let mut setpoints = Vec::new();
        for p in &self.setpoints {
            let at = |e: String| format!("modbus setpoint {:?}: {e}", p.property);
            let spec = property_spec(kind, &p.property).map_err(at)?;
            let t = check_register(p.register, &p.kind, p.scale).map_err(at)?;
            if setpoints
                .iter()
                .any(|(s, ..): &(&PropertySpec, _, _, _)| s.name == spec.name)
            {
                return Err(at("configured twice".to_owned()));
            }
            setpoints.push((spec, p.register, t, p.scale));
        }
        Ok(ModbusPlan {
            address,
            unit: self.unit,
            period: Duration::from_millis(self.period_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            retries: self.retries,
            signals,
            setpoints,
        })
    }
}

/// Starts the device's polling task.
pub fn start(plan: ModbusPlan, feed: Arc<Feed>, tasks: &TaskController) -> DeviceHandle {
    let (handle, setpoints) = DeviceHandle::new(feed.clone());
    tasks.spawn_until_cancelled(run(plan, feed, setpoints));
    handle
}

/// What a request came to.
enum Answer<T> {
    Ok(T),
    /// The server answered with a Modbus exception.
    Exception(String),
    /// No answer after every retry: the server is unreachable.
    Down(String),
}

struct Link {
    plan: ModbusPlan,
    ctx: Option<Context>,
}

impl Link {
    async fn connect(&mut self) -> Result<(), String> {
        let addr = self.plan.address;
        match tokio::time::timeout(
            self.plan.timeout,
            tokio_modbus::client::tcp::connect_slave(addr, Slave(self.plan.unit)),
        )
        .await
        {
            Ok(Ok(ctx)) => {
                self.ctx = Some(ctx);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("modbus server {addr}: {e}")),
            Err(_) => Err(format!(
                "modbus server {addr}: no connection within {:?}",
                self.plan.timeout
            )),
        }
    }

    async fn read(&mut self, register: u16, words: u16) -> Answer<Vec<u16>> {
        let mut last = String::new();
        for _ in 0..=self.plan.retries {
            if self.ctx.is_none() {
                if let Err(e) = self.connect().await {
                    last = e;
                    continue;
                }
            }
            let ctx = self.ctx.as_mut().expect("connected above");
            match tokio::time::timeout(
                self.plan.timeout,
                ctx.read_holding_registers(register, words),
            )
            .await
            {
                Ok(Ok(Ok(w))) if w.len() == words as usize => return Answer::Ok(w),
                Ok(Ok(Ok(w))) => {
                    return Answer::Exception(format!("{} words instead of {words}", w.len()))
                }
                Ok(Ok(Err(exception))) => return Answer::Exception(exception.to_string()),
                Ok(Err(e)) => last = format!("modbus server {}: {e}", self.plan.address),
                Err(_) => {
                    last = format!(
                        "modbus server {}: no answer within {:?}",
                        self.plan.address, self.plan.timeout
                    )
                }
            }
            // A request that failed on the wire leaves the connection in doubt.
            self.ctx = None;
        }
        Answer::Down(last)
    }

    async fn write(&mut self, register: u16, words: &[u16]) -> Answer<()> {
        if self.ctx.is_none() {
            if let Err(e) = self.connect().await {
                return Answer::Down(e);
            }
        }
        let ctx = self.ctx.as_mut().expect("connected above");
        let call = async {
            if words.len() == 1 {
                ctx.write_single_register(register, words[0]).await
            } else {
                ctx.write_multiple_registers(register, words).await
            }
        };
        // Writes are not retried: a write whose answer was lost may have happened.
        match tokio::time::timeout(self.plan.timeout, call).await {
            Ok(Ok(Ok(()))) => Answer::Ok(()),
            Ok(Ok(Err(exception))) => Answer::Exception(exception.to_string()),
            Ok(Err(e)) => {
                self.ctx = None;
                Answer::Down(format!("modbus server {}: {e}", self.plan.address))
            }
            Err(_) => {
                self.ctx = None;
                Answer::Down(format!(
                    "modbus server {}: no answer within {:?}",
                    self.plan.address, self.plan.timeout
                ))
            }
        }
    }
}

async fn run(
    plan: ModbusPlan,
    feed: Arc<Feed>,
    mut setpoints: tokio::sync::mpsc::Receiver<super::SetpointRequest>,
) {
    let mut ticker = tokio::time::interval(plan.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let source = format!("modbus://{}/{}", plan.address, plan.unit);
    let mut link = Link {
        plan: plan.clone(),
        ctx: None,
    };
    let mut backoff = Backoff::default();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if retry_at.is_some_and(|t| tokio::time::Instant::now() < t) {
                    continue;
                }
                let mut down = None;
                for (spec, register, t, scale) in &plan.signals {
                    match link.read(*register, t.words()).await {
                        Answer::Ok(words) => {
                            let raw = t.decode(&words).unwrap_or(f64::NAN);
                            if !feed.push(spec, now_ns(), raw * scale, &source) {
                                feed.counters.refuse(&feed.twin, &source, Refusal::BufferFull, "the gateway is not keeping up; a read was skipped");
                            }
                        }
                        Answer::Exception(e) => feed.counters.refuse(
                            &feed.twin,
                            &format!("{source}/{register}"),
                            Refusal::ReadError,
                            &format!("signal {} register {register} ({t:?}): {e}", spec.name),
                        ),
                        Answer::Down(e) => {
                            down = Some(e);
                            break;
                        }
                    }
                }
                match down {
                    Some(reason) => {
                        if feed.status() != DeviceStatus::Unreachable(reason.clone()) {
                            tracing::warn!(twin = %feed.twin, "{reason}; reconnecting");
                        }
                        feed.set_status(DeviceStatus::Unreachable(reason));
                        retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                    }
                    None => {
                        if feed.status() != DeviceStatus::Reachable {
                            tracing::info!(twin = %feed.twin, server = %plan.address, "modbus connected");
                        }
                        feed.set_status(DeviceStatus::Reachable);
                        backoff.reset();
                        retry_at = None;
                    }
                }
            }
            req = setpoints.recv() => {
                let Some(req) = req else { return };
                let outcome = match plan.setpoints.iter().find(|(p, ..)| p.name == req.property.name) {
                    None => SetpointOutcome::Refused(format!(
                        "no modbus register is configured for set-point {}",
                        req.property.name
                    )),
                    Some((_, register, t, scale)) => match t.encode(req.value / scale) {
                        Err(e) => SetpointOutcome::Refused(format!("register {register}: {e}")),
                        Ok(words) => match link.write(*register, &words).await {
                            Answer::Ok(()) => SetpointOutcome::Delivered,
                            Answer::Exception(e) => SetpointOutcome::Refused(format!(
                                "modbus server refused writing register {register}: {e}"
                            )),
                            Answer::Down(e) => SetpointOutcome::Unreachable(e),
                        },
                    },
                };
                feed.outcome(req.ticket, outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_types_decode_big_endian_words_and_encode_back() {
        use RegisterType::*;
        assert_eq!(U16.decode(&[65535]), Some(65535.0));
        assert_eq!(I16.decode(&[65535]), Some(-1.0));
        assert_eq!(U32.decode(&[1, 2]), Some(65538.0));
        assert_eq!(I32.decode(&[0xffff, 0xfffe]), Some(-2.0));
        let bits = 12.5f32.to_bits();
        assert_eq!(F32.decode(&[(bits >> 16) as u16, bits as u16]), Some(12.5));
        assert_eq!(U32.decode(&[1]), None);
        for t in [U16, I16, U32, I32, F32] {
            let w = t.encode(1234.0).unwrap();
            assert_eq!(w.len(), t.words() as usize);
            assert_eq!(t.decode(&w), Some(1234.0), "{t:?}");
        }
        assert_eq!(I16.decode(&I16.encode(-300.0).unwrap()), Some(-300.0));
        assert!(U16.encode(-1.0).is_err());
        assert!(U16.encode(70000.0).is_err());
        assert!(I32.encode(f64::NAN).is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = ModbusConfig {
            address: "127.0.0.1:5020".into(),
            unit: 1,
            period_ms: 100,
            timeout_ms: 500,
            retries: 2,
            signals: vec![ModbusSignal {
                signal: "power".into(),
                register: 0,
                kind: "u64".into(),
                scale: 1.0,
            }],
            setpoints: vec![],
        };
        let e = c.check(AssetKind::HpcNode).unwrap_err();
        assert_eq!(
            e,
            "modbus signal \"power\": invalid register type \"u64\": expected u16, i16, u32, i32 or f32"
        );
        c.signals[0].kind = "f32".into();
        c.signals[0].register = 65535;
        assert!(c
            .check(AssetKind::HpcNode)
            .unwrap_err()
            .contains("past 65535"));
        c.signals[0].register = 0;
        c.address = "localhost".into();
        assert!(c
            .check(AssetKind::HpcNode)
            .unwrap_err()
            .starts_with("modbus address"));
        c.address = "127.0.0.1:5020".into();
        let plan = c.check(AssetKind::HpcNode).unwrap();
        assert_eq!(plan.signals[0].2, RegisterType::F32);
    }
}
