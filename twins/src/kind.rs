//! Asset kinds (DESIGN §4) and their schemas: which signals a twin of that kind reports,
//! which set-points it accepts, and which events it raises.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How far a signal's raw values may travel (DESIGN §10). The privacy issue builds the
/// mechanisms; here the schema records the default classification per signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    Public,
    SiteOnly,
    Personal,
}

/// One measured signal of an asset kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalSpec {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    /// Nominal sample rate of the signal in Hz.
    pub rate_hz: f64,
    /// A high-rate waveform (vibration, voltage) rather than a slow process value.
    pub waveform: bool,
    pub sensitivity: Sensitivity,
    /// Physical range of plausible values.
    pub min: f64,
    pub max: f64,
    /// Reporting resolution: every reported value is an integer multiple of it (16-bit
    /// ADC over the range for waveforms, 0.001 units for process values), which is what
    /// makes frames compress losslessly.
    pub resolution: f64,
}

/// One set-point an operator may command through `SetDesired`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PropertySpec {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub min: f64,
    pub max: f64,
    pub default: f64,
}

/// Everything the platform knows about an asset kind.
#[derive(Debug)]
pub struct KindSchema {
    pub kind: AssetKind,
    pub title: &'static str,
    pub description: &'static str,
    pub signals: &'static [SignalSpec],
    pub properties: &'static [PropertySpec],
    /// Event kinds a twin of this kind can raise (besides the platform's own).
    pub events: &'static [&'static str],
    /// Identifier streams (e.g. the addresses of devices associating with an access
    /// point): records of identifiers, not samples. They are personal data and leave
    /// the device only pseudonymised (keyed HMAC) unless the policy says otherwise.
    pub identifiers: &'static [IdentifierSpec],
    /// Healthy history a model of this kind should be trained on at least, in seconds:
    /// long enough to see the asset's normal operating regimes (a day for assets with a
    /// daily cycle). A model trained on less alarms on the regimes it has not seen.
    /// `twinmesh eval` trains on it; a training over less data gets a warning.
    pub training_span_s: i64,
}

const DAY_S: i64 = 86_400;

/// A stream of identifiers a device reports (DESIGN §4: device associations).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentifierSpec {
    pub name: &'static str,
    pub description: &'static str,
}

impl KindSchema {
    /// The signal chains apply to when a stage names none: the first waveform, else the
    /// first signal.
    pub fn primary_signal(&self) -> &SignalSpec {
        self.signals
            .iter()
            .find(|s| s.waveform)
            .unwrap_or(&self.signals[0])
    }

    pub fn signal(&self, name: &str) -> Result<&SignalSpec> {
        self.signals
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::UnknownSignal {
                kind: self.kind.to_string(),
                signal: name.to_owned(),
            })
    }

    pub fn identifier(&self, name: &str) -> Option<&IdentifierSpec> {
        self.identifiers.iter().find(|s| s.name == name)
    }

    pub fn property(&self, name: &str) -> Result<&PropertySpec> {
        self.properties
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::UnknownProperty {
                kind: self.kind.to_string(),
                property: name.to_owned(),
                allowed: self
                    .properties
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Checks a commanded set-point against the property's range.
    pub fn validate_desired(&self, property: &str, value: f64) -> Result<&PropertySpec> {
        let spec = self.property(property)?;
        if !value.is_finite() || value < spec.min || value > spec.max {
            return Err(Error::ValueOutOfRange {
                property: property.to_owned(),
                value,
                min: spec.min,
                max: spec.max,
            });
        }
        Ok(spec)
    }
}

/// The asset kinds twinmesh knows, one per testbed family of the requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssetKind {
    WindTurbine,
    Spindle,
    CrankshaftLine,
    ClosureLine,
    TurnstileGate,
    WifiAp,
    PowerMeter,
    HpcNode,
}

impl AssetKind {
    /// One shared value per kind, built on first use into `cell` by `make` (the default
    /// chain and policy every twin of a kind shares until it changes its own).
    pub fn shared<T: Send + Sync>(
        self,
        cell: &'static std::sync::OnceLock<Vec<std::sync::Arc<T>>>,
        make: fn(AssetKind) -> T,
    ) -> std::sync::Arc<T> {
        let all = cell.get_or_init(|| {
            AssetKind::ALL
                .iter()
                .map(|k| std::sync::Arc::new(make(*k)))
                .collect()
        });
        let i = AssetKind::ALL
            .iter()
            .position(|k| *k == self)
            .expect("every kind is in AssetKind::ALL");
        all[i].clone()
    }

    pub const ALL: [AssetKind; 8] = [
        AssetKind::WindTurbine,
        AssetKind::Spindle,
        AssetKind::CrankshaftLine,
        AssetKind::ClosureLine,
        AssetKind::TurnstileGate,
        AssetKind::WifiAp,
        AssetKind::PowerMeter,
        AssetKind::HpcNode,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AssetKind::WindTurbine => "wind_turbine",
            AssetKind::Spindle => "spindle",
            AssetKind::CrankshaftLine => "crankshaft_line",
            AssetKind::ClosureLine => "closure_line",
            AssetKind::TurnstileGate => "turnstile_gate",
            AssetKind::WifiAp => "wifi_ap",
            AssetKind::PowerMeter => "power_meter",
            AssetKind::HpcNode => "hpc_node",
        }
    }

    /// Prefix of simulated asset names (`{prefix}-{nn}`).
    pub fn prefix(self) -> &'static str {
        match self {
            AssetKind::WindTurbine => "wt",
            AssetKind::Spindle => "sp",
            AssetKind::CrankshaftLine => "cs",
            AssetKind::ClosureLine => "cl",
            AssetKind::TurnstileGate => "tg",
            AssetKind::WifiAp => "ap",
            AssetKind::PowerMeter => "pm",
            AssetKind::HpcNode => "hpc",
        }
    }

    pub fn schema(self) -> &'static KindSchema {
        match self {
            AssetKind::WindTurbine => &WIND_TURBINE,
            AssetKind::Spindle => &SPINDLE,
            AssetKind::CrankshaftLine => &CRANKSHAFT_LINE,
            AssetKind::ClosureLine => &CLOSURE_LINE,
            AssetKind::TurnstileGate => &TURNSTILE_GATE,
            AssetKind::WifiAp => &WIFI_AP,
            AssetKind::PowerMeter => &POWER_METER,
            AssetKind::HpcNode => &HPC_NODE,
        }
    }
}

impl FromStr for AssetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        AssetKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::UnknownKind(s.to_owned()))
    }
}

impl fmt::Display for AssetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const fn scalar(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    rate_hz: f64,
    sensitivity: Sensitivity,
    min: f64,
    max: f64,
) -> SignalSpec {
    SignalSpec {
        name,
        unit,
        description,
        rate_hz,
        waveform: false,
        sensitivity,
        min,
        max,
        resolution: 0.001,
    }
}

const fn waveform(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    rate_hz: f64,
    min: f64,
    max: f64,
) -> SignalSpec {
    SignalSpec {
        name,
        unit,
        description,
        rate_hz,
        waveform: true,
        sensitivity: Sensitivity::Public,
        min,
        max,
        resolution: (max - min) / 65536.0,
    }
}

const fn property(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    min: f64,
    max: f64,
    default: f64,
) -> PropertySpec {
    PropertySpec {
        name,
        unit,
        description,
        min,
        max,
        default,
    }
}

use Sensitivity::{Personal, Public, SiteOnly};

static WIND_TURBINE: KindSchema = KindSchema {
    kind: AssetKind::WindTurbine,
    title: "Wind turbine",
    description: "Horizontal-axis wind turbine with a main-bearing vibration channel",
    // The wind wanders over hours (calm spells, rated power, curtailment).
    training_span_s: 12 * 3600,
    signals: &[
        scalar(
            "wind_speed",
            "m/s",
            "Hub-height wind speed",
            1.0,
            Public,
            0.0,
            50.0,
        ),
        scalar("rotor_speed", "rpm", "Rotor speed", 1.0, Public, 0.0, 30.0),
        scalar(
            "power",
            "kW",
            "Active power output",
            1.0,
            Public,
            -100.0,
            5000.0,
        ),
        scalar(
            "bearing_temperature",
            "Cel",
            "Main-bearing temperature",
            1.0,
            Public,
            -40.0,
            150.0,
        ),
        waveform(
            "bearing_vibration",
            "m/s2",
            "Main-bearing acceleration",
            10_000.0,
            -1000.0,
            1000.0,
        ),
    ],
    properties: &[
        property(
            "power_limit",
            "kW",
            "Curtailment: maximum active power",
            0.0,
            3000.0,
            3000.0,
        ),
        property(
            "yaw_offset",
            "deg",
            "Yaw misalignment correction",
            -10.0,
            10.0,
            0.0,
        ),
    ],
    events: &["alarm", "bearing_fault"],
    identifiers: &[],
};

static SPINDLE: KindSchema = KindSchema {
    kind: AssetKind::Spindle,
    title: "Machine-tool spindle",
    description: "Milling spindle with speed programme, load, vibration and temperature",
    // Two tool lives of cutting (wear from fresh to worn, then a tool change).
    training_span_s: 6 * 3600,
    signals: &[
        scalar(
            "spindle_speed",
            "rpm",
            "Spindle speed",
            10.0,
            Public,
            0.0,
            30000.0,
        ),
        scalar(
            "spindle_load",
            "%",
            "Spindle load",
            10.0,
            Public,
            0.0,
            150.0,
        ),
        scalar(
            "temperature",
            "Cel",
            "Spindle housing temperature",
            1.0,
            Public,
            0.0,
            120.0,
        ),
        waveform(
            "vibration",
            "m/s2",
            "Spindle acceleration",
            5_000.0,
            -500.0,
            500.0,
        ),
    ],
    properties: &[property(
        "speed_override",
        "%",
        "Feed/speed override",
        50.0,
        120.0,
        100.0,
    )],
    events: &["alarm", "tool_wear"],
    identifiers: &[],
};

static CRANKSHAFT_LINE: KindSchema = KindSchema {
    kind: AssetKind::CrankshaftLine,
    title: "Crankshaft machining line",
    description: "Line of machining stations with cycle times, torque, pressure and part counts",
    training_span_s: DAY_S,
    signals: &[
        scalar(
            "cycle_time",
            "s",
            "Last station cycle time",
            1.0,
            SiteOnly,
            0.0,
            600.0,
        ),
        scalar(
            "torque",
            "N.m",
            "Clamping torque",
            10.0,
            SiteOnly,
            0.0,
            2000.0,
        ),
        scalar(
            "pressure",
            "bar",
            "Hydraulic pressure",
            10.0,
            SiteOnly,
            0.0,
            400.0,
        ),
        scalar(
            "part_count",
            "1",
            "Parts produced (counter)",
            1.0,
            SiteOnly,
            0.0,
            1e12,
        ),
    ],
    properties: &[property(
        "target_cycle_time",
        "s",
        "Target cycle time",
        10.0,
        600.0,
        90.0,
    )],
    events: &["alarm", "limit_violation"],
    identifiers: &[],
};

static CLOSURE_LINE: KindSchema = KindSchema {
    kind: AssetKind::ClosureLine,
    title: "Closure production line",
    description: "Bottle-closure line with production counts, machine states and energy",
    training_span_s: DAY_S,
    signals: &[
        scalar(
            "production_count",
            "1",
            "Closures produced (counter)",
            1.0,
            SiteOnly,
            0.0,
            1e12,
        ),
        scalar(
            "reject_count",
            "1",
            "Rejected closures (counter)",
            1.0,
            SiteOnly,
            0.0,
            1e12,
        ),
        scalar(
            "machine_state",
            "1",
            "0 stopped, 1 running, 2 fault, 3 setup",
            1.0,
            Public,
            0.0,
            3.0,
        ),
        scalar(
            "energy",
            "kW.h",
            "Energy consumed (counter)",
            1.0,
            Public,
            0.0,
            1e12,
        ),
    ],
    properties: &[property(
        "line_speed",
        "%",
        "Line speed set-point",
        0.0,
        110.0,
        100.0,
    )],
    events: &["alarm", "state_change"],
    identifiers: &[],
};

static TURNSTILE_GATE: KindSchema = KindSchema {
    kind: AssetKind::TurnstileGate,
    title: "Venue turnstile gate",
    description: "Entrance gate counting people in and out (personal data)",
    // Quiet days, doors opening before an event, the crowd leaving after it.
    training_span_s: DAY_S,
    signals: &[
        scalar(
            "people_in",
            "1",
            "People entering per second",
            1.0,
            Personal,
            0.0,
            100.0,
        ),
        scalar(
            "people_out",
            "1",
            "People leaving per second",
            1.0,
            Personal,
            0.0,
            100.0,
        ),
    ],
    properties: &[property(
        "gate_open",
        "1",
        "1 open, 0 closed",
        0.0,
        1.0,
        1.0,
    )],
    events: &["alarm", "gate_blocked"],
    identifiers: &[],
};

static WIFI_AP: KindSchema = KindSchema {
    kind: AssetKind::WifiAp,
    title: "Venue Wi-Fi access point",
    description: "Access point reporting device associations (personal data) and throughput",
    // The evening peak of associations.
    training_span_s: DAY_S,
    signals: &[
        scalar(
            "associated_devices",
            "1",
            "Devices associated",
            1.0,
            Personal,
            0.0,
            2000.0,
        ),
        scalar(
            "throughput",
            "Mbit/s",
            "Aggregate throughput",
            1.0,
            Public,
            0.0,
            10000.0,
        ),
    ],
    properties: &[property(
        "tx_power",
        "dBm",
        "Transmit power",
        0.0,
        30.0,
        20.0,
    )],
    events: &["alarm"],
    identifiers: &[IdentifierSpec {
        name: "device_associations",
        description: "Devices associating with (present) and leaving (absent) the access point, by MAC address",
    }],
};

static POWER_METER: KindSchema = KindSchema {
    kind: AssetKind::PowerMeter,
    title: "Smart-grid power meter",
    description: "Feeder meter with 50 Hz voltage/current waveforms and household energy",
    // The daily load profile: night, the morning and the evening peaks.
    training_span_s: DAY_S,
    signals: &[
        waveform(
            "voltage",
            "V",
            "Phase voltage waveform",
            6_400.0,
            -500.0,
            500.0,
        ),
        waveform(
            "current",
            "A",
            "Phase current waveform",
            6_400.0,
            -200.0,
            200.0,
        ),
        scalar(
            "household_energy",
            "kW.h",
            "Household energy (counter)",
            1.0,
            Personal,
            0.0,
            1e9,
        ),
    ],
    properties: &[property(
        "demand_limit",
        "kW",
        "Demand-response limit",
        0.0,
        50.0,
        20.0,
    )],
    events: &["alarm", "sag", "swell"],
    identifiers: &[],
};

static HPC_NODE: KindSchema = KindSchema {
    kind: AssetKind::HpcNode,
    title: "HPC compute node",
    description: "Compute node with temperatures, power, fan speed and job load",
    training_span_s: DAY_S,
    signals: &[
        scalar(
            "cpu_temperature",
            "Cel",
            "CPU package temperature",
            1.0,
            Public,
            0.0,
            110.0,
        ),
        scalar("power", "W", "Node power draw", 1.0, Public, 0.0, 3000.0),
        scalar("fan_speed", "rpm", "Fan speed", 1.0, Public, 0.0, 20000.0),
        scalar(
            "job_load",
            "1",
            "Fraction of cores busy",
            1.0,
            SiteOnly,
            0.0,
            1.0,
        ),
    ],
    properties: &[
        property("power_cap", "W", "Node power cap", 100.0, 3000.0, 1500.0),
        property("fan_min", "%", "Minimum fan duty", 10.0, 100.0, 30.0),
    ],
    events: &["alarm", "overheat"],
    identifiers: &[],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_has_a_schema() {
        for kind in AssetKind::ALL {
            assert_eq!(kind.as_str().parse::<AssetKind>().unwrap(), kind);
            let schema = kind.schema();
            assert_eq!(schema.kind, kind);
            assert!(!schema.signals.is_empty(), "{kind} has no signals");
            assert!(!schema.properties.is_empty(), "{kind} has no set-points");
            for s in schema.signals {
                assert!(crate::id::is_valid_segment(s.name), "{kind}.{}", s.name);
                assert!(s.min < s.max && s.rate_hz > 0.0);
            }
            for p in schema.properties {
                assert!(
                    p.min <= p.default && p.default <= p.max,
                    "{kind}.{}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn desired_values_are_checked_against_the_schema() {
        let s = AssetKind::WindTurbine.schema();
        assert!(s.validate_desired("power_limit", 1500.0).is_ok());
        let err = s.validate_desired("power_limit", 9000.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "value 9000 of property power_limit is outside [0, 3000]"
        );
        let err = s.validate_desired("warp_drive", 1.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown property \"warp_drive\" of wind_turbine: settable properties are power_limit, yaw_offset"
        );
        assert!(s.validate_desired("power_limit", f64::NAN).is_err());
    }

    #[test]
    fn unknown_kind_is_named() {
        assert_eq!(
            "toaster".parse::<AssetKind>().unwrap_err().to_string(),
            "unknown asset kind \"toaster\""
        );
    }
}
