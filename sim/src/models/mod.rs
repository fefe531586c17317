//! One simulator per asset kind.

pub mod closure;
pub mod crankshaft;
pub mod hpc;
pub mod power_meter;
pub mod spindle;
pub mod turnstile;
pub mod wifi;
pub mod wind_turbine;

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
