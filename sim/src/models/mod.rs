//! One simulator per asset kind. Each moves its slow state once a second
//! ([`PerSecond`]); the [`AssetModel`] plumbing they share (the clock, the fault list)
//! is written once, in the blanket implementation below.

pub mod closure;
pub mod crankshaft;
pub mod hpc;
pub mod power_meter;
pub mod spindle;
pub mod turnstile;
pub mod wifi;
pub mod wind_turbine;

use twinmesh_twins::AssetKind;

use crate::model::AssetModel;

/// Seconds since the epoch as f64 (for phases and slow dynamics).
pub(crate) fn secs(t_ns: i64) -> f64 {
    t_ns as f64 * 1e-9
}

/// Whole seconds since the epoch.
pub(crate) fn whole_secs(t_ns: i64) -> i64 {
    t_ns.div_euclid(1_000_000_000)
}

/// Hour of the day (UTC) of a whole second.
pub(crate) fn hour_of(second: i64) -> f64 {
    second.rem_euclid(86_400) as f64 / 3600.0
}

/// Steps a once-per-second model from its last second to `t_ns` (at most an hour of
/// catch-up after a pause), calling `step(second)` for each new second.
pub(crate) fn each_second(last: &mut Option<i64>, t_ns: i64, mut step: impl FnMut(i64)) {
    let s = whole_secs(t_ns);
    let prev = *last.get_or_insert(s);
    if s > prev {
        for k in (s - (s - prev).min(3600) + 1)..=s {
            step(k);
        }
        *last = Some(s);
    }
}

/// Active faults of a model: mode and start time.
#[derive(Debug, Default, Clone)]
pub(crate) struct Faults(Vec<(String, i64)>);

impl Faults {
    pub fn add(&mut self, mode: &str, at_ns: i64) {
        self.0.push((mode.to_owned(), at_ns));
    }

    /// Whether `mode` is active at `t_ns`.
    pub fn on(&self, mode: &str, t_ns: i64) -> bool {
        self.0.iter().any(|(m, at)| m == mode && t_ns >= *at)
    }
}

/// What every model keeps besides its physics: the last second it stepped and the
/// faults injected so far.
#[derive(Debug, Default, Clone)]
pub struct Base {
    second: Option<i64>,
    pub(crate) faults: Faults,
}

/// A simulator stepped once a second. Implementing it gives the [`AssetModel`]: stepping
/// every new second on `advance` and recording injected faults are the same for all kinds.
pub trait PerSecond: Send + Sync {
    const KIND: AssetKind;
    fn base(&mut self) -> &mut Base;
    /// Moves the slow state through whole second `s` since the epoch.
    fn step(&mut self, s: i64);
    /// [`AssetModel::sample`]: NaN for a signal the kind does not have.
    fn value(&mut self, signal: &str, t_ns: i64) -> f64;
    /// [`AssetModel::set`].
    fn set_point(&mut self, property: &str, value: f64);
    /// What fault `mode` changes besides joining the fault list (nothing by default).
    fn fault_started(&mut self, _mode: &str, _at_ns: i64) {}
    /// [`AssetModel::sightings`] (none by default).
    fn take_sightings(&mut self) -> Vec<(&'static str, i64, String, bool)> {
        Vec::new()
    }
}

impl<M: PerSecond> AssetModel for M {
    fn kind(&self) -> AssetKind {
        M::KIND
    }

    fn advance(&mut self, t_ns: i64) {
        let mut second = self.base().second;
        each_second(&mut second, t_ns, |s| self.step(s));
        self.base().second = second;
    }

    fn sample(&mut self, signal: &str, t_ns: i64) -> f64 {
        self.value(signal, t_ns)
    }

    fn set(&mut self, property: &str, value: f64) {
        self.set_point(property, value);
    }

    fn inject(&mut self, mode: &str, at_ns: i64) {
        self.base().faults.add(mode, at_ns);
        self.fault_started(mode, at_ns);
    }

    fn sightings(&mut self) -> Vec<(&'static str, i64, String, bool)> {
        self.take_sightings()
    }
}
