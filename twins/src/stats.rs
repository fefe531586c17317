//! Window statistics: count, min, max, mean and rms of a run of samples, as a mergeable
//! accumulator (one pass, no allocation) so history buckets can be built frame by frame.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proto::Bucket;

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

/// Time of sample `i` of a frame starting at `start_ns`, `period_ns` apart (saturating:
/// a corrupt period never wraps around into the past).
pub fn sample_time(start_ns: i64, period_ns: i64, i: usize) -> i64 {
    start_ns.saturating_add((i as i64).saturating_mul(period_ns))
}

/// The history buckets of a query (DESIGN §8), built sample by sample; every store
/// aggregates through this, so they bucket alike.
///
/// A sample at `t` in `[start_ns, end_ns)` falls in bucket `(t - start_ns) / bucket_ns`,
/// which starts at `start_ns + k * bucket_ns`; samples outside the range are ignored and
/// empty buckets are omitted. Callers validate `bucket_ns` (a width below 1 ns is taken
/// as 1 ns rather than dividing by zero).
#[derive(Debug, Clone)]
pub struct HistoryBuckets {
    start_ns: i64,
    end_ns: i64,
    bucket_ns: i64,
    /// By bucket index (u64: the range can span all of i64).
    buckets: BTreeMap<u64, Accumulator>,
}

impl HistoryBuckets {
    pub fn new(start_ns: i64, end_ns: i64, bucket_ns: i64) -> Self {
        HistoryBuckets {
            start_ns,
            end_ns,
            bucket_ns: bucket_ns.max(1),
            buckets: BTreeMap::new(),
        }
    }

    /// Whether a sample at `t` is in the queried range.
    pub fn contains(&self, t: i64) -> bool {
        t >= self.start_ns && t < self.end_ns
    }

    pub fn push(&mut self, t: i64, x: f64) {
        if !self.contains(t) {
            return;
        }
        // In i128: `t - start_ns` overflows i64 when the range starts far in the past.
        let k = ((t as i128 - self.start_ns as i128) / self.bucket_ns as i128) as u64;
        self.buckets.entry(k).or_default().push(x);
    }

    /// Every sample of a frame (see [`sample_time`]).
    pub fn push_frame(&mut self, start_ns: i64, period_ns: i64, samples: &[f64]) {
        for (i, &x) in samples.iter().enumerate() {
            self.push(sample_time(start_ns, period_ns, i), x);
        }
    }

    /// The non-empty buckets in time order, each with `agg` of its samples.
    pub fn finish(self, agg: Aggregation) -> Vec<Bucket> {
        self.buckets
            .into_iter()
            .map(|(k, acc)| Bucket {
                // At most the sample's own time, so it fits in i64.
                start_ns: (self.start_ns as i128 + k as i128 * self.bucket_ns as i128) as i64,
                value: acc.value(agg),
                count: acc.count,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bucket(start_ns: i64, value: f64, count: u64) -> Bucket {
        Bucket {
            start_ns,
            value,
            count,
        }
    }

    #[test]
    fn buckets_take_the_start_and_leave_the_end() {
        let mut b = HistoryBuckets::new(20, 70, 20);
        // 10 before the range, 70 at its (exclusive) end.
        for (t, x) in [
            (10, 100.0),
            (20, 1.0),
            (39, 2.0),
            (40, 3.0),
            (69, 4.0),
            (70, 100.0),
        ] {
            b.push(t, x);
        }
        assert_eq!(
            b.clone().finish(Aggregation::Mean),
            [bucket(20, 1.5, 2), bucket(40, 3.0, 1), bucket(60, 4.0, 1)]
        );
        assert_eq!(
            b.finish(Aggregation::Count),
            [bucket(20, 2.0, 2), bucket(40, 1.0, 1), bucket(60, 1.0, 1)]
        );
    }

    #[test]
    fn empty_buckets_are_omitted_and_each_aggregation_applies() {
        let mut b = HistoryBuckets::new(0, 1_000, 100);
        b.push_frame(0, 10, &[3.0, -4.0]);
        b.push_frame(500, 10, &[2.0]);
        let at = |agg| {
            b.clone()
                .finish(agg)
                .iter()
                .map(|k| (k.start_ns, k.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(Aggregation::Min), [(0, -4.0), (500, 2.0)]);
        assert_eq!(at(Aggregation::Max), [(0, 3.0), (500, 2.0)]);
        assert_eq!(at(Aggregation::Mean), [(0, -0.5), (500, 2.0)]);
        assert_eq!(at(Aggregation::Rms), [(0, 12.5f64.sqrt()), (500, 2.0)]);
        assert!(HistoryBuckets::new(0, 10, 5)
            .finish(Aggregation::Count)
            .is_empty());
    }

    #[test]
    fn buckets_span_the_whole_time_axis_without_overflow() {
        let mut b = HistoryBuckets::new(i64::MIN, i64::MAX, i64::MAX);
        b.push(i64::MIN, 1.0);
        b.push(-1, 2.0);
        b.push(i64::MAX - 1, 3.0);
        b.push(i64::MAX, 9.0);
        assert_eq!(
            b.finish(Aggregation::Max),
            [
                bucket(i64::MIN, 1.0, 1),
                bucket(-1, 2.0, 1),
                bucket(i64::MAX - 1, 3.0, 1)
            ]
        );
        // Negative starts bucket from the start, not from zero.
        let mut b = HistoryBuckets::new(-25, 25, 10);
        b.push_frame(-25, 10, &[1.0, 2.0, 3.0, 4.0, 5.0]);
        let starts: Vec<i64> = b
            .finish(Aggregation::Count)
            .iter()
            .map(|k| k.start_ns)
            .collect();
        assert_eq!(starts, [-25, -15, -5, 5, 15]);
    }

    #[test]
    fn a_zero_width_is_one_nanosecond_and_frames_never_wrap() {
        let mut b = HistoryBuckets::new(0, 3, 0);
        b.push_frame(0, 1, &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(b.finish(Aggregation::Count).len(), 3);
        assert_eq!(sample_time(i64::MAX - 5, 10, 3), i64::MAX);
        assert_eq!(sample_time(100, 10, 3), 130);
    }

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
