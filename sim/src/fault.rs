//! Fault injection: a fault mode that starts at a given time. Kind-specific modes
//! (bearing races, tool wear, overheating, ...) are modelled by each simulator; the
//! sensor faults `drift` and `stuck` apply to any signal and are handled here.

use std::fmt;
use std::str::FromStr;

use twinmesh_twins::AssetKind;

use crate::model::SimError;

/// Fault modes each kind supports (besides the sensor faults `drift:SIGNAL` and
/// `stuck:SIGNAL`, which every kind supports).
pub fn kind_faults(kind: AssetKind) -> &'static [&'static str] {
    match kind {
        AssetKind::WindTurbine => &["outer_race", "inner_race", "ball"],
        AssetKind::Spindle => &["tool_wear", "imbalance"],
        AssetKind::CrankshaftLine => &["station_jam"],
        AssetKind::ClosureLine => &["jam"],
        AssetKind::TurnstileGate => &["blocked"],
        AssetKind::WifiAp => &["outage"],
        AssetKind::PowerMeter => &["harmonic_distortion", "sag", "swell"],
        AssetKind::HpcNode => &["overheating"],
        // Kinds without a simulator have no simulated faults.
        _ => &[],
    }
}

/// `MODE` or `drift:SIGNAL` / `stuck:SIGNAL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultMode {
    /// A fault the kind's simulator models physically.
    Asset(String),
    /// The sensor's reading drifts away from the truth (1 % of its range per 10 s).
    Drift(String),
    /// The sensor keeps reporting the value it had when the fault started.
    Stuck(String),
}

impl FromStr for FaultMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("drift", sig)) => Ok(FaultMode::Drift(sig.to_owned())),
            Some(("stuck", sig)) => Ok(FaultMode::Stuck(sig.to_owned())),
            Some((other, _)) => Err(format!(
                "unknown sensor fault {other:?}: expected drift:SIGNAL or stuck:SIGNAL"
            )),
            None => Ok(FaultMode::Asset(s.to_owned())),
        }
    }
}

impl fmt::Display for FaultMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultMode::Asset(m) => f.write_str(m),
            FaultMode::Drift(s) => write!(f, "drift:{s}"),
            FaultMode::Stuck(s) => write!(f, "stuck:{s}"),
        }
    }
}

/// A fault and when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub mode: FaultMode,
    pub at_ns: i64,
}

impl Fault {
    /// Checks the fault against the kind: known mode, existing signal.
    pub fn validate(&self, kind: AssetKind) -> Result<(), SimError> {
        match &self.mode {
            FaultMode::Asset(m) => {
                if kind_faults(kind).contains(&m.as_str()) {
                    Ok(())
                } else {
                    Err(SimError::UnknownFault {
                        kind,
                        fault: m.clone(),
                        allowed: kind_faults(kind).join(", "),
                    })
                }
            }
            FaultMode::Drift(s) | FaultMode::Stuck(s) => {
                kind.schema().signal(s)?;
                Ok(())
            }
        }
    }

    pub fn active(&self, t_ns: i64) -> bool {
        t_ns >= self.at_ns
    }
}

/// Applies the sensor faults of a device to a value the model produced.
#[derive(Debug, Default)]
pub struct SensorFaults {
    faults: Vec<(Fault, Option<f64>)>,
}

impl SensorFaults {
    pub fn new(faults: &[Fault]) -> Self {
        SensorFaults {
            faults: faults
                .iter()
                .filter(|f| !matches!(f.mode, FaultMode::Asset(_)))
                .map(|f| (f.clone(), None))
                .collect(),
        }
    }

    pub fn apply(&mut self, signal: &str, range: f64, t_ns: i64, v: f64) -> f64 {
        let mut out = v;
        for (fault, held) in &mut self.faults {
            if !fault.active(t_ns) {
                continue;
            }
            match &fault.mode {
                FaultMode::Drift(s) if s == signal => {
                    out += 0.01 * range * (t_ns - fault.at_ns) as f64 / 10e9;
                }
                FaultMode::Stuck(s) if s == signal => {
                    out = *held.get_or_insert(v);
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let f = Fault {
            mode: "outer_race".parse().unwrap(),
            at_ns: 0,
        };
        assert!(f.validate(AssetKind::WindTurbine).is_ok());
        let e = f.validate(AssetKind::HpcNode).unwrap_err();
        assert_eq!(e.to_string(), "unknown fault \"outer_race\" for hpc_node: expected one of overheating, drift:SIGNAL, stuck:SIGNAL");
        let f = Fault {
            mode: "stuck:power".parse().unwrap(),
            at_ns: 0,
        };
        assert!(f.validate(AssetKind::WindTurbine).is_ok());
        let f = Fault {
            mode: "drift:flux".parse().unwrap(),
            at_ns: 0,
        };
        assert!(f.validate(AssetKind::WindTurbine).is_err());
        assert!("melt:power".parse::<FaultMode>().is_err());
    }

    #[test]
    fn sensor_faults_start_on_time() {
        let mut sf = SensorFaults::new(&[
            Fault {
                mode: "stuck:a".parse().unwrap(),
                at_ns: 10,
            },
            Fault {
                mode: "drift:b".parse().unwrap(),
                at_ns: 0,
            },
        ]);
        assert_eq!(sf.apply("a", 1.0, 5, 1.0), 1.0);
        assert_eq!(sf.apply("a", 1.0, 10, 2.0), 2.0);
        assert_eq!(sf.apply("a", 1.0, 20, 3.0), 2.0);
        assert!((sf.apply("b", 100.0, 10_000_000_000, 0.0) - 1.0).abs() < 1e-12);
    }
}
