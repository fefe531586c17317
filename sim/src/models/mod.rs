//! One simulator per asset kind.

pub mod power_meter;
pub mod turnstile;
pub mod wind_turbine;

/// Seconds since the epoch as f64 (for phases and slow dynamics).
pub(crate) fn secs(t_ns: i64) -> f64 {
    t_ns as f64 * 1e-9
}

/// Whole seconds since the epoch.
pub(crate) fn whole_secs(t_ns: i64) -> i64 {
    t_ns.div_euclid(1_000_000_000)
}
