//! A copy of the built-in kinds as Rust constants, as they were before kinds became
//! Thing Models: the embedded models must reproduce them exactly (tests only).

use super::Sensitivity;
use crate::chain::{ChainSpec, ParamValue, StageSpec};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalSpec {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub rate_hz: f64,
    pub waveform: bool,
    pub sensitivity: Sensitivity,
    pub min: f64,
    pub max: f64,
    pub resolution: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PropertySpec {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub min: f64,
    pub max: f64,
    pub default: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentifierSpec {
    pub name: &'static str,
    pub description: &'static str,
}

#[derive(Debug)]
pub struct KindSchema {
    pub kind: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub signals: &'static [SignalSpec],
    pub properties: &'static [PropertySpec],
    pub events: &'static [&'static str],
    pub identifiers: &'static [IdentifierSpec],
    pub training_span_s: i64,
}

const DAY_S: i64 = 86_400;

pub static ALL: [&KindSchema; 8] = [
    &WIND_TURBINE,
    &SPINDLE,
    &CRANKSHAFT_LINE,
    &CLOSURE_LINE,
    &TURNSTILE_GATE,
    &WIFI_AP,
    &POWER_METER,
    &HPC_NODE,
];

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
    kind: "wind_turbine",
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
    kind: "spindle",
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
    kind: "crankshaft_line",
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
    kind: "closure_line",
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
    kind: "turnstile_gate",
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
    kind: "wifi_ap",
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
    kind: "power_meter",
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
    kind: "hpc_node",
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

pub(crate) fn stage(
    op: &str,
    tier: &str,
    signal: Option<&str>,
    params: &[(&str, ParamValue)],
) -> StageSpec {
    StageSpec {
        op: op.to_owned(),
        tier: tier.to_owned(),
        signal: signal.map(str::to_owned),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    }
}

pub(crate) fn num(v: f64) -> ParamValue {
    ParamValue::Number(v)
}

pub(crate) fn band(lo: f64, hi: f64) -> ParamValue {
    ParamValue::List(vec![lo, hi])
}

/// The default chain of each built-in kind, as a spec.
pub fn default_spec(kind: &str) -> ChainSpec {
    let archive = stage(
        "archive",
        "cloud",
        None,
        &[("keep", ParamValue::Text("features".into()))],
    );
    let stage = match kind {
        "wind_turbine" => vec![
            stage("compress", "iot", Some("bearing_vibration"), &[]),
            stage("stats", "edge", Some("bearing_vibration"), &[]),
            stage(
                "psd",
                "edge",
                Some("bearing_vibration"),
                &[("nperseg", num(1024.0))],
            ),
            stage(
                "bearing",
                "edge",
                Some("bearing_vibration"),
                &[("band", band(2000.0, 4900.0))],
            ),
            stage("stats", "edge", Some("power"), &[]),
            archive,
        ],
        "spindle" => vec![
            stage("compress", "iot", Some("vibration"), &[]),
            stage("stats", "edge", Some("vibration"), &[]),
            stage("psd", "edge", Some("vibration"), &[("nperseg", num(512.0))]),
            stage("fft", "edge", Some("vibration"), &[("peaks", num(3.0))]),
            stage(
                "stats",
                "edge",
                Some("spindle_load"),
                &[("window_s", num(10.0))],
            ),
            archive,
        ],
        "power_meter" => vec![
            stage("compress", "iot", Some("voltage"), &[]),
            stage("compress", "iot", Some("current"), &[]),
            stage(
                "thd",
                "edge",
                Some("voltage"),
                &[("fundamental_hz", num(50.0))],
            ),
            stage(
                "thd",
                "edge",
                Some("current"),
                &[("fundamental_hz", num(50.0))],
            ),
            stage("stats", "edge", Some("voltage"), &[]),
            stage("stats", "edge", Some("current"), &[]),
            archive,
        ],
        "crankshaft_line" => vec![
            stage(
                "stats",
                "edge",
                Some("cycle_time"),
                &[("window_s", num(120.0))],
            ),
            stage("stats", "edge", Some("torque"), &[("window_s", num(60.0))]),
            stage(
                "stats",
                "edge",
                Some("pressure"),
                &[("window_s", num(60.0))],
            ),
            archive,
        ],
        "closure_line" => vec![
            // The energy counter's level grows for ever: analyse its rate (kW.h/s).
            stage("rate", "edge", Some("energy"), &[]),
            stage("stats", "edge", Some("energy"), &[("window_s", num(60.0))]),
            stage(
                "stats",
                "edge",
                Some("machine_state"),
                &[("window_s", num(60.0))],
            ),
            archive,
        ],
        "turnstile_gate" => vec![
            stage(
                "stats",
                "edge",
                Some("people_in"),
                &[("window_s", num(60.0))],
            ),
            stage(
                "stats",
                "edge",
                Some("people_out"),
                &[("window_s", num(60.0))],
            ),
            archive,
        ],
        "wifi_ap" => vec![
            stage(
                "stats",
                "edge",
                Some("throughput"),
                &[("window_s", num(60.0))],
            ),
            archive,
        ],
        "hpc_node" => vec![
            stage(
                "stats",
                "edge",
                Some("cpu_temperature"),
                &[("window_s", num(60.0))],
            ),
            stage("stats", "edge", Some("power"), &[("window_s", num(60.0))]),
            archive,
        ],
        other => panic!("no built-in kind {other}"),
    };
    ChainSpec { stage }
}
