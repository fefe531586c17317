//! Validation of telemetry frames before they reach a twin (DESIGN §9 "bad input").

use std::fmt;

use crate::id::TwinId;
use crate::kind::AssetKind;
use crate::proto::TelemetryFrame;

/// Default limit on an encoded frame's size.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// Default limit on a frame's samples once decoded: bytes alone do not bound them (a
/// packed block of width 0 holds 128 samples in one byte).
pub const DEFAULT_MAX_FRAME_SAMPLES: usize = 1 << 20;

/// Default limit on the samples a twin decodes into one ingest batch.
pub const DEFAULT_MAX_BATCH_SAMPLES: usize = 1 << 22;

/// Why a frame was dropped. `as_str` is the stable label used in metrics and `NodeLoad`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameRejection {
    Oversized {
        bytes: usize,
        limit: usize,
    },
    Malformed(String),
    /// More samples than a frame may decode to.
    TooManySamples {
        samples: usize,
        limit: usize,
    },
    KeyMismatch {
        key: String,
        twin_id: String,
        signal: String,
    },
    UnknownSignal {
        kind: AssetKind,
        signal: String,
    },
    NonFinite {
        index: usize,
    },
    Invalid(&'static str),
}

impl FrameRejection {
    /// Every reason [`FrameRejection::as_str`] names (metrics start each at zero).
    pub const REASONS: [&'static str; 7] = [
        "oversized",
        "malformed",
        "too_many_samples",
        "key_mismatch",
        "unknown_signal",
        "non_finite",
        "invalid",
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            FrameRejection::Oversized { .. } => "oversized",
            FrameRejection::Malformed(_) => "malformed",
            FrameRejection::TooManySamples { .. } => "too_many_samples",
            FrameRejection::KeyMismatch { .. } => "key_mismatch",
            FrameRejection::UnknownSignal { .. } => "unknown_signal",
            FrameRejection::NonFinite { .. } => "non_finite",
            FrameRejection::Invalid(_) => "invalid",
        }
    }
}

impl fmt::Display for FrameRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameRejection::Oversized { bytes, limit } => {
                write!(
                    f,
                    "frame of {bytes} bytes exceeds the limit of {limit} bytes"
                )
            }
            FrameRejection::Malformed(e) => write!(f, "malformed frame: {e}"),
            FrameRejection::TooManySamples { samples, limit } => write!(
                f,
                "frame of {samples} samples exceeds the limit of {limit} samples"
            ),
            FrameRejection::KeyMismatch {
                key,
                twin_id,
                signal,
            } => write!(
                f,
                "frame for twin {twin_id:?} signal {signal:?} published on key {key}"
            ),
            FrameRejection::UnknownSignal { kind, signal } => {
                write!(f, "unknown signal {signal:?} of {kind}")
            }
            FrameRejection::NonFinite { index } => {
                write!(f, "sample {index} is not finite (NaN or infinite)")
            }
            FrameRejection::Invalid(what) => write!(f, "invalid frame: {what}"),
        }
    }
}

/// Unpacks a frame whose samples travel codec-packed (an IoT `compress` stage), into at
/// most `max_samples` samples (a frame that claims more is refused before anything is
/// allocated).
pub fn unpack(frame: &mut TelemetryFrame, max_samples: usize) -> Result<(), FrameRejection> {
    if frame.samples.len() > max_samples {
        return Err(FrameRejection::TooManySamples {
            samples: frame.samples.len(),
            limit: max_samples,
        });
    }
    if frame.packed.is_empty() {
        return Ok(());
    }
    if !frame.samples.is_empty() {
        return Err(FrameRejection::Invalid("both samples and packed samples"));
    }
    if let Some(n) = crate::dsp::codec::sample_count(&frame.packed) {
        if n > max_samples {
            return Err(FrameRejection::TooManySamples {
                samples: n,
                limit: max_samples,
            });
        }
    }
    crate::dsp::codec::decode_at_most(&frame.packed, &mut frame.samples, max_samples)
        .map_err(|e| FrameRejection::Malformed(format!("packed samples: {e}")))?;
    frame.packed.clear();
    Ok(())
}

/// Checks a decoded frame received on `twinmesh/telemetry/{twin}/{signal}` (the key's
/// parts are `key_twin` and `key_signal`) for a twin of `kind`.
pub fn validate(
    frame: &TelemetryFrame,
    key: &str,
    key_twin: &TwinId,
    key_signal: &str,
    kind: AssetKind,
) -> Result<(), FrameRejection> {
    if frame.twin_id != key_twin.to_string() || frame.signal != key_signal {
        return Err(FrameRejection::KeyMismatch {
            key: key.to_owned(),
            twin_id: frame.twin_id.clone(),
            signal: frame.signal.clone(),
        });
    }
    if kind.schema().signal(&frame.signal).is_err() {
        return Err(FrameRejection::UnknownSignal {
            kind,
            signal: frame.signal.clone(),
        });
    }
    if frame.seq == 0 {
        return Err(FrameRejection::Invalid("seq must start at 1"));
    }
    if frame.samples.is_empty() {
        return Err(FrameRejection::Invalid("no samples"));
    }
    if frame.sample_period_ns <= 0 {
        return Err(FrameRejection::Invalid("sample_period_ns must be positive"));
    }
    let span = (frame.samples.len() as i128 - 1) * frame.sample_period_ns as i128;
    if frame.start_ns as i128 + span > i64::MAX as i128 {
        return Err(FrameRejection::Invalid("frame ends after the end of time"));
    }
    if let Some(index) = frame.samples.iter().position(|x| !x.is_finite()) {
        return Err(FrameRejection::NonFinite { index });
    }
    Ok(())
}

/// The associated data a sealed frame is bound to: its twin, signal, seq and start, so
/// a sealed payload replayed under another frame header does not open.
pub fn seal_context(f: &TelemetryFrame) -> Vec<u8> {
    format!(
        "twinmesh/telemetry/{}/{}/{}/{}",
        f.twin_id, f.signal, f.seq, f.start_ns
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> TelemetryFrame {
        TelemetryFrame {
            sealed: Vec::new(),
            twin_id: "site-a/wt-01".into(),
            signal: "power".into(),
            seq: 1,
            start_ns: 1_000,
            sample_period_ns: 1_000_000_000,
            samples: vec![1.0, 2.0],
            spool_base_seq: 1,
            ..Default::default()
        }
    }

    fn check(f: &TelemetryFrame) -> Result<(), FrameRejection> {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        validate(
            f,
            "twinmesh/telemetry/site-a/wt-01/power",
            &id,
            "power",
            AssetKind::WindTurbine,
        )
    }

    #[test]
    fn packed_frames_unpack_or_are_malformed() {
        let mut f = frame();
        crate::dsp::codec::encode(&[1.0, 2.0, 3.0], 1.0, &mut f.packed);
        f.samples.clear();
        unpack(&mut f, DEFAULT_MAX_FRAME_SAMPLES).unwrap();
        assert_eq!(f.samples, vec![1.0, 2.0, 3.0]);
        assert_eq!(check(&f), Ok(()));
        let mut f = frame();
        f.samples.clear();
        f.packed = vec![0x02, 0xff];
        assert_eq!(
            unpack(&mut f, DEFAULT_MAX_FRAME_SAMPLES)
                .unwrap_err()
                .as_str(),
            "malformed"
        );
    }

    /// The attack: constant samples pack at width 0, one byte per 128 samples, so 10^8
    /// samples fit in under 1 MiB. Refused from the header, before anything is decoded.
    #[test]
    fn a_frame_is_bounded_by_samples_not_only_bytes() {
        let n = 100_000_000usize;
        let mut packed = Vec::new();
        crate::dsp::codec::encode(&vec![0.0; n], 1.0, &mut packed);
        assert!(
            packed.len() < DEFAULT_MAX_FRAME_BYTES,
            "{} bytes",
            packed.len()
        );
        let mut f = frame();
        f.samples.clear();
        f.packed = packed;
        let e = unpack(&mut f, DEFAULT_MAX_FRAME_SAMPLES).unwrap_err();
        assert_eq!(
            e,
            FrameRejection::TooManySamples {
                samples: n,
                limit: DEFAULT_MAX_FRAME_SAMPLES
            }
        );
        assert!(f.samples.capacity() < 1024, "nothing was allocated for it");
        // Plain samples are bounded too.
        let mut f = frame();
        f.samples = vec![1.0; 11];
        assert_eq!(unpack(&mut f, 10).unwrap_err().as_str(), "too_many_samples");
        assert_eq!(unpack(&mut frame(), 10), Ok(()));
    }

    #[test]
    fn accepts_a_good_frame() {
        assert_eq!(check(&frame()), Ok(()));
    }

    #[test]
    fn rejects_each_kind_of_bad_frame() {
        let mut f = frame();
        f.twin_id = "site-b/wt-01".into();
        assert_eq!(check(&f).unwrap_err().as_str(), "key_mismatch");
        let mut f = frame();
        f.samples[1] = f64::NAN;
        assert_eq!(check(&f), Err(FrameRejection::NonFinite { index: 1 }));
        let mut f = frame();
        f.samples[0] = f64::INFINITY;
        assert_eq!(check(&f).unwrap_err().as_str(), "non_finite");
        let mut f = frame();
        f.seq = 0;
        assert_eq!(check(&f).unwrap_err().as_str(), "invalid");
        let mut f = frame();
        f.samples.clear();
        assert_eq!(check(&f).unwrap_err().as_str(), "invalid");
        let mut f = frame();
        f.sample_period_ns = 0;
        assert_eq!(check(&f).unwrap_err().as_str(), "invalid");
        let mut f = frame();
        f.start_ns = i64::MAX;
        assert_eq!(check(&f).unwrap_err().as_str(), "invalid");
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        let mut f = frame();
        f.signal = "flux".into();
        let err = validate(
            &f,
            "twinmesh/telemetry/site-a/wt-01/flux",
            &id,
            "flux",
            AssetKind::WindTurbine,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "unknown signal \"flux\" of wind_turbine");
    }
}
