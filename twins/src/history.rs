//! What a history request must be before a twin reads or writes its history: the checks
//! of `QueryHistory` (also made at the API's door, before the call crosses the fabric)
//! and of `ImportHistory` (DESIGN §9 error rules). The bucketing itself is
//! [`crate::stats::HistoryBuckets`].

use crate::error::{Error, Result};
use crate::kind::AssetKind;
use crate::proto;
use crate::stats::Aggregation;
use crate::TwinId;

/// Most buckets one history query may produce.
pub const MAX_HISTORY_BUCKETS: u64 = 100_000;

/// Most samples one import request may carry.
pub const MAX_IMPORT_SAMPLES: usize = 1 << 20;

/// Checks a history query against the twin `id`; its aggregation.
pub fn validate_query(id: &TwinId, h: &proto::QueryHistoryRequest) -> Result<Aggregation> {
    if h.twin_id != id.to_string() {
        return Err(Error::UnknownTwin(h.twin_id.clone()));
    }
    if h.start_ns >= h.end_ns {
        return Err(Error::InvalidRange {
            start_ns: h.start_ns,
            end_ns: h.end_ns,
        });
    }
    if h.bucket_ns <= 0 {
        return Err(Error::InvalidBucket(h.bucket_ns));
    }
    let buckets = ((h.end_ns as i128 - h.start_ns as i128 + h.bucket_ns as i128 - 1)
        / h.bucket_ns as i128) as u64;
    if buckets > MAX_HISTORY_BUCKETS {
        return Err(Error::TooManyBuckets {
            buckets,
            max: MAX_HISTORY_BUCKETS,
        });
    }
    let agg = proto::Aggregation::try_from(h.aggregation)
        .map_err(|_| Error::InvalidArgument(format!("unknown aggregation {}", h.aggregation)))?;
    Aggregation::try_from(agg)
}

/// Checks an import into the history of twin `id` of `kind`: a signal of the kind, 1 to
/// [`MAX_IMPORT_SAMPLES`] finite samples at a positive period.
pub fn validate_import(
    id: &TwinId,
    kind: AssetKind,
    req: &proto::ImportHistoryRequest,
) -> Result<()> {
    if req.twin_id != id.to_string() {
        return Err(Error::UnknownTwin(req.twin_id.clone()));
    }
    kind.schema().signal(&req.signal)?;
    if req.samples.is_empty() || req.samples.len() > MAX_IMPORT_SAMPLES {
        return Err(Error::InvalidArgument(format!(
            "import of {} samples: expected 1..={MAX_IMPORT_SAMPLES}",
            req.samples.len()
        )));
    }
    if req.sample_period_ns <= 0 {
        return Err(Error::InvalidArgument(format!(
            "invalid sample_period_ns {}: must be positive",
            req.sample_period_ns
        )));
    }
    if let Some(i) = req.samples.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidArgument(format!("sample {i} is not finite")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn id() -> TwinId {
        "site-a/pm-01".parse().unwrap()
    }

    fn query(start_ns: i64, end_ns: i64, bucket_ns: i64) -> proto::QueryHistoryRequest {
        proto::QueryHistoryRequest {
            twin_id: id().to_string(),
            signal: "voltage".into(),
            start_ns,
            end_ns,
            bucket_ns,
            aggregation: proto::Aggregation::Mean as i32,
        }
    }

    #[test]
    fn history_queries_name_the_twin_a_range_and_a_bounded_bucket_count() {
        assert!(validate_query(&id(), &query(0, 10, 1)).is_ok());
        let other = proto::QueryHistoryRequest {
            twin_id: "site-a/pm-02".into(),
            ..query(0, 10, 1)
        };
        assert_eq!(
            validate_query(&id(), &other).unwrap_err(),
            Error::UnknownTwin("site-a/pm-02".into())
        );
        assert_eq!(
            validate_query(&id(), &query(10, 10, 1)).unwrap_err().code(),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            validate_query(&id(), &query(0, 10, 0)).unwrap_err(),
            Error::InvalidBucket(0)
        );
        // 100,000 buckets pass, one more does not; the count does not overflow.
        assert!(validate_query(&id(), &query(0, 100_000, 1)).is_ok());
        assert_eq!(
            validate_query(&id(), &query(0, 100_001, 1)).unwrap_err(),
            Error::TooManyBuckets {
                buckets: 100_001,
                max: MAX_HISTORY_BUCKETS
            }
        );
        assert!(matches!(
            validate_query(&id(), &query(i64::MIN, i64::MAX, 1)).unwrap_err(),
            Error::TooManyBuckets { .. }
        ));
        let bad = proto::QueryHistoryRequest {
            aggregation: 99,
            ..query(0, 10, 1)
        };
        assert_eq!(
            validate_query(&id(), &bad).unwrap_err(),
            Error::InvalidArgument("unknown aggregation 99".into())
        );
    }

    #[test]
    fn imports_carry_finite_samples_of_a_signal_of_the_kind() {
        let kind = AssetKind::PowerMeter;
        let ok = proto::ImportHistoryRequest {
            twin_id: id().to_string(),
            signal: "voltage".into(),
            start_ns: 0,
            sample_period_ns: 1_000,
            samples: vec![1.0, 2.0],
        };
        assert!(validate_import(&id(), kind, &ok).is_ok());
        let bad = |r: proto::ImportHistoryRequest| validate_import(&id(), kind, &r).unwrap_err();
        assert!(matches!(
            bad(proto::ImportHistoryRequest {
                signal: "nope".into(),
                ..ok.clone()
            }),
            Error::UnknownSignal { .. }
        ));
        assert_eq!(
            bad(proto::ImportHistoryRequest {
                samples: vec![],
                ..ok.clone()
            })
            .to_string(),
            format!("invalid argument: import of 0 samples: expected 1..={MAX_IMPORT_SAMPLES}")
        );
        assert_eq!(
            bad(proto::ImportHistoryRequest {
                sample_period_ns: 0,
                ..ok.clone()
            }),
            Error::InvalidArgument("invalid sample_period_ns 0: must be positive".into())
        );
        assert_eq!(
            bad(proto::ImportHistoryRequest {
                samples: vec![1.0, f64::NAN],
                ..ok.clone()
            }),
            Error::InvalidArgument("sample 1 is not finite".into())
        );
        assert_eq!(
            bad(proto::ImportHistoryRequest {
                twin_id: "x/y".into(),
                ..ok
            }),
            Error::UnknownTwin("x/y".into())
        );
    }
}
