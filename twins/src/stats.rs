//! Window statistics: count, min, max, mean and rms of a run of samples, as a mergeable
//! accumulator (one pass, no allocation) so history buckets can be built frame by frame.

use serde::{Deserialize, Serialize};

/// Aggregations of DESIGN §8 / `QueryHistory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    Mean,
    Min,
    Max,
    Rms,
    Count,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Mean => "mean",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::Rms => "rms",
            Aggregation::Count => "count",
        }
    }
}

impl std::str::FromStr for Aggregation {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "mean" => Ok(Aggregation::Mean),
            "min" => Ok(Aggregation::Min),
            "max" => Ok(Aggregation::Max),
            "rms" => Ok(Aggregation::Rms),
            "count" => Ok(Aggregation::Count),
            _ => Err(crate::Error::InvalidArgument(format!(
                "unknown aggregation {s:?}: expected mean, min, max, rms or count"
            ))),
        }
    }
}

impl TryFrom<crate::proto::Aggregation> for Aggregation {
    type Error = crate::Error;
    fn try_from(a: crate::proto::Aggregation) -> crate::Result<Self> {
        use crate::proto::Aggregation as P;
        match a {
            P::Mean => Ok(Aggregation::Mean),
            P::Min => Ok(Aggregation::Min),
            P::Max => Ok(Aggregation::Max),
            P::Rms => Ok(Aggregation::Rms),
            P::Count => Ok(Aggregation::Count),
            P::Unspecified => Err(crate::Error::InvalidArgument(
                "aggregation must be set (mean, min, max, rms or count)".to_owned(),
            )),
        }
    }
}

impl From<Aggregation> for crate::proto::Aggregation {
    fn from(a: Aggregation) -> Self {
        use crate::proto::Aggregation as P;
        match a {
            Aggregation::Mean => P::Mean,
            Aggregation::Min => P::Min,
            Aggregation::Max => P::Max,
            Aggregation::Rms => P::Rms,
            Aggregation::Count => P::Count,
        }
    }
}

/// Running statistics over samples. `Default` is the empty accumulator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulator {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Default for Accumulator {
    fn default() -> Self {
        Accumulator {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            sum_sq: 0.0,
        }
    }
}

impl Accumulator {
    pub fn from_samples(samples: &[f64]) -> Self {
        let mut acc = Accumulator::default();
        for &x in samples {
            acc.push(x);
        }
        acc
    }

    #[inline]
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.sum += x;
        self.sum_sq += x * x;
    }

    pub fn merge(&mut self, other: &Accumulator) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }

    pub fn rms(&self) -> f64 {
        (self.sum_sq / self.count as f64).sqrt()
    }

    /// The value of one aggregation; NaN for an empty accumulator (except count).
    pub fn value(&self, agg: Aggregation) -> f64 {
        if self.count == 0 {
            return if agg == Aggregation::Count {
                0.0
            } else {
                f64::NAN
            };
        }
        match agg {
            Aggregation::Mean => self.mean(),
            Aggregation::Min => self.min,
            Aggregation::Max => self.max,
            Aggregation::Rms => self.rms(),
            Aggregation::Count => self.count as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_window() {
        let acc = Accumulator::from_samples(&[3.0, -4.0, 0.0, 1.0]);
        assert_eq!(acc.count, 4);
        assert_eq!(acc.value(Aggregation::Min), -4.0);
        assert_eq!(acc.value(Aggregation::Max), 3.0);
        assert_eq!(acc.value(Aggregation::Mean), 0.0);
        assert!((acc.value(Aggregation::Rms) - (26.0f64 / 4.0).sqrt()).abs() < 1e-15);
        assert_eq!(acc.value(Aggregation::Count), 4.0);
    }

    #[test]
    fn empty_window() {
        let acc = Accumulator::default();
        assert!(acc.value(Aggregation::Mean).is_nan());
        assert_eq!(acc.value(Aggregation::Count), 0.0);
    }

    proptest! {
        #[test]
        fn merge_equals_one_pass(xs in prop::collection::vec(-1e6f64..1e6, 1..200), split in 0usize..200) {
            let split = split.min(xs.len());
            let mut a = Accumulator::from_samples(&xs[..split]);
            a.merge(&Accumulator::from_samples(&xs[split..]));
            let b = Accumulator::from_samples(&xs);
            prop_assert_eq!(a.count, b.count);
            prop_assert_eq!(a.min, b.min);
            prop_assert_eq!(a.max, b.max);
            prop_assert!((a.sum - b.sum).abs() <= 1e-6 * (1.0 + b.sum.abs()));
            prop_assert!((a.sum_sq - b.sum_sq).abs() <= 1e-9 * (1.0 + b.sum_sq));
        }
    }
}
