//! A twin's state and its transitions (DESIGN §4): frame admission by sequence number,
//! reported values, derived window statistics, desired values with delivery status, and
//! the revision that increases with every change.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::chain::{Chain, ChainSpec};
use crate::error::{Error, Result};
use crate::id::TwinId;
use crate::kind::AssetKind;
use crate::privacy::{Ledger, Policy};
use crate::proto;
use crate::stats::Accumulator;

/// The last value reported for one signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reported {
    pub value: f64,
    pub timestamp_ns: i64,
    /// Sequence number of the last applied frame of this signal.
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Rejected,
    /// The gateway could not reach the device; still re-sent, so it is delivered once
    /// the device is back.
    Unreachable,
}

impl DeliveryStatus {
    /// Still to be delivered: the twin keeps sending it to the gateway.
    pub fn is_open(self) -> bool {
        matches!(self, DeliveryStatus::Pending | DeliveryStatus::Unreachable)
    }
}

/// A commanded set-point.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub value: f64,
    pub status: DeliveryStatus,
    /// Twin revision at which it was commanded; identifies the command.
    pub revision: u64,
    pub updated_ns: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub anomaly_score: f64,
    pub status: String,
    pub model_id: String,
    pub model_version: u64,
    pub last_alarm: String,
    /// Why the status is what it is, when the gateway says (`stale`: the device is down).
    pub reason: String,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            anomaly_score: 0.0,
            status: "ok".to_owned(),
            model_id: String::new(),
            model_version: 0,
            last_alarm: String::new(),
            reason: String::new(),
        }
    }
}

/// What to do with an incoming frame, decided from its `seq` alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The next frame: apply it. `lost` frames before it can never arrive (the gateway no
    /// longer holds them) and are counted as lost.
    Apply { lost: u64 },
    /// Already applied (a re-send): drop it.
    Duplicate,
    /// Frames before it are missing but still resendable: drop it and wait for them.
    Gap { expected: u64 },
    /// Its seq is further ahead than any gateway can have numbered (forged or corrupt):
    /// drop it; believing it would turn every real frame after it into a duplicate.
    Refused { expected: u64 },
}

/// The furthest a frame's seq may run ahead of the next expected one. A gateway skips
/// numbers only for frames its spool dropped (at most its `max_spool_frames`, 100 000 by
/// default) and for the rest of a reserved block after a crash (`seq_block`, 4 096):
/// 2^24 covers a full spool and thousands of crashes.
pub const MAX_SEQ_JUMP: u64 = 1 << 24;

/// Decides the fate of frame `seq` when `last` is the last applied seq of its signal and
/// the gateway can still resend everything from `spool_base_seq` on.
pub fn admit(last: u64, seq: u64, spool_base_seq: u64) -> Admission {
    let Some(expected) = last.checked_add(1) else {
        return Admission::Duplicate;
    };
    if seq < expected {
        Admission::Duplicate
    } else if seq == expected {
        Admission::Apply { lost: 0 }
    } else if seq - expected > MAX_SEQ_JUMP {
        Admission::Refused { expected }
    } else if spool_base_seq > expected && seq == spool_base_seq {
        Admission::Apply {
            lost: spool_base_seq - expected,
        }
    } else {
        Admission::Gap { expected }
    }
}

/// Health status of a twin whose device its gateway cannot reach.
pub const STATUS_STALE: &str = "stale";

/// The state a twin keeps about its asset.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinCore {
    pub id: TwinId,
    pub kind: AssetKind,
    pub revision: u64,
    pub reported: BTreeMap<String, Reported>,
    pub desired: BTreeMap<String, Desired>,
    pub derived: BTreeMap<String, f64>,
    pub health: Health,
    pub duplicate_frames: BTreeMap<String, u64>,
    pub lost_frames: BTreeMap<String, u64>,
    /// The processing chain (validated); the kind's default is shared until changed.
    pub chain: Arc<Chain>,
    /// The privacy policy and the ε ledger of the current period (they travel with the
    /// twin's snapshot, so moves and restarts never reset the budget). The kind's default
    /// policy is shared until changed.
    pub policy: Arc<Policy>,
    pub ledger: Ledger,
}

impl TwinCore {
    pub fn new(id: TwinId, kind: AssetKind) -> Self {
        TwinCore {
            id,
            kind,
            revision: 0,
            reported: BTreeMap::new(),
            desired: BTreeMap::new(),
            derived: BTreeMap::new(),
            health: Health::default(),
            duplicate_frames: BTreeMap::new(),
            lost_frames: BTreeMap::new(),
            chain: Chain::shared_default(kind),
            policy: Policy::shared_default(kind),
            ledger: Ledger::default(),
        }
    }

    /// Replaces the processing chain after validating it whole.
    pub fn set_chain(
        &mut self,
        spec: &ChainSpec,
        expected_revision: Option<u64>,
    ) -> Result<&Chain> {
        self.check_revision(expected_revision)?;
        self.chain = Chain::validate_shared(spec, self.kind)?;
        self.revision += 1;
        Ok(&*self.chain)
    }

    fn check_revision(&self, expected: Option<u64>) -> Result<()> {
        match expected {
            Some(e) if e != self.revision => Err(Error::RevisionMismatch {
                twin: self.id.to_string(),
                expected: e,
                actual: self.revision,
            }),
            _ => Ok(()),
        }
    }

    /// Records the features of one analysis window in `derived`.
    pub fn apply_features(&mut self, features: &BTreeMap<String, f64>) {
        if features.is_empty() {
            return;
        }
        for (k, v) in features {
            self.derived.insert(k.clone(), *v);
        }
        self.revision += 1;
    }

    /// Last applied seq of `signal` (0 before the first frame).
    pub fn last_seq(&self, signal: &str) -> u64 {
        self.reported.get(signal).map_or(0, |r| r.seq)
    }

    /// Admission of frame `seq` of `signal`; counts duplicates.
    pub fn admit(&mut self, signal: &str, seq: u64, spool_base_seq: u64) -> Admission {
        let verdict = admit(self.last_seq(signal), seq, spool_base_seq);
        if verdict == Admission::Duplicate {
            *self.duplicate_frames.entry(signal.to_owned()).or_default() += 1;
        }
        verdict
    }

    /// Applies an admitted frame: the last sample becomes the reported value and the
    /// frame's window statistics become derived features. Returns the window statistics.
    pub fn apply_frame(
        &mut self,
        signal: &str,
        seq: u64,
        start_ns: i64,
        sample_period_ns: i64,
        samples: &[f64],
        lost: u64,
    ) -> Accumulator {
        let stats = Accumulator::from_samples(samples);
        let last = samples.last().copied().unwrap_or(f64::NAN);
        let timestamp_ns =
            start_ns.saturating_add((samples.len() as i64 - 1).saturating_mul(sample_period_ns));
        self.reported.insert(
            signal.to_owned(),
            Reported {
                value: last,
                timestamp_ns,
                seq,
            },
        );
        if lost > 0 {
            *self.lost_frames.entry(signal.to_owned()).or_default() += lost;
        }
        if samples.len() > 1 {
            for (name, value) in [
                ("mean", stats.mean()),
                ("min", stats.min),
                ("max", stats.max),
                ("rms", stats.rms()),
            ] {
                self.derived.insert(format!("{signal}.{name}"), value);
            }
        }
        self.revision += 1;
        stats
    }

    /// Commands a set-point. Checks the property and range against the kind's schema
    /// and, when given, the expected revision. The new value is `Pending`.
    pub fn set_desired(
        &mut self,
        property: &str,
        value: f64,
        expected_revision: Option<u64>,
        now_ns: i64,
    ) -> Result<&Desired> {
        self.check_revision(expected_revision)?;
        self.kind.schema().validate_desired(property, value)?;
        self.revision += 1;
        let desired = Desired {
            value,
            status: DeliveryStatus::Pending,
            revision: self.revision,
            updated_ns: now_ns,
            reason: String::new(),
        };
        self.desired.insert(property.to_owned(), desired);
        Ok(&self.desired[property])
    }

    /// Records the gateway's answer to the command made at `revision`. Answers to a
    /// command that was superseded are ignored. Returns whether the state changed.
    pub fn desired_outcome(
        &mut self,
        property: &str,
        revision: u64,
        status: DeliveryStatus,
        reason: &str,
        now_ns: i64,
    ) -> bool {
        match self.desired.get_mut(property) {
            Some(d)
                if d.revision == revision
                    && d.status.is_open()
                    && (d.status != status || d.reason != reason) =>
            {
                d.status = status;
                d.reason = reason.to_owned();
                d.updated_ns = now_ns;
                self.revision += 1;
                true
            }
            _ => false,
        }
    }

    /// The gateway's word on the device: unreachable makes the twin `stale` with the
    /// reason, reachable again ends that (the next scored window sets the status).
    /// Returns whether the state changed.
    pub fn device_status(&mut self, reachable: bool, reason: &str) -> bool {
        let h = &mut self.health;
        let changed = if reachable {
            if h.status == STATUS_STALE {
                h.status = "ok".to_owned();
                h.reason.clear();
                true
            } else {
                false
            }
        } else if h.status != STATUS_STALE || h.reason != reason {
            h.status = STATUS_STALE.to_owned();
            h.reason = reason.to_owned();
            true
        } else {
            false
        };
        if changed {
            self.revision += 1;
        }
        changed
    }

    /// Set-points still waiting for the gateway (pending, or the device was unreachable).
    pub fn pending_desired(&self) -> impl Iterator<Item = (&str, &Desired)> {
        self.desired
            .iter()
            .filter(|(_, d)| d.status.is_open())
            .map(|(k, d)| (k.as_str(), d))
    }

    /// The proto view of this state, with the given placement.
    pub fn to_proto(&self, placement: Option<proto::Placement>) -> proto::Twin {
        let id = self.id.to_string();
        proto::Twin {
            twin_id: id.clone(),
            kind: self.kind.to_string(),
            revision: self.revision,
            reported: self
                .reported
                .iter()
                .map(|(k, r)| {
                    (
                        k.clone(),
                        proto::SignalValue {
                            value: r.value,
                            timestamp_ns: r.timestamp_ns,
                            seq: r.seq,
                        },
                    )
                })
                .collect(),
            desired: self
                .desired
                .iter()
                .map(|(k, d)| (k.clone(), d.into()))
                .collect(),
            derived: self.derived.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            health: Some(proto::Health {
                anomaly_score: self.health.anomaly_score,
                status: self.health.status.clone(),
                model_id: self.health.model_id.clone(),
                model_version: self.health.model_version,
                last_alarm: self.health.last_alarm.clone(),
                reason: self.health.reason.clone(),
            }),
            placement,
            duplicate_frames: self
                .duplicate_frames
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            lost_frames: self
                .lost_frames
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            chain: Some((&self.chain.spec).into()),
            policy: Some(self.policy.to_proto(&id)),
            budget: Some(self.ledger.to_proto(&id, &self.policy)),
            withheld: Vec::new(),
        }
    }
}

impl From<DeliveryStatus> for proto::DeliveryStatus {
    fn from(s: DeliveryStatus) -> Self {
        match s {
            DeliveryStatus::Pending => proto::DeliveryStatus::Pending,
            DeliveryStatus::Delivered => proto::DeliveryStatus::Delivered,
            DeliveryStatus::Rejected => proto::DeliveryStatus::Rejected,
            DeliveryStatus::Unreachable => proto::DeliveryStatus::Unreachable,
        }
    }
}

impl TryFrom<proto::DeliveryStatus> for DeliveryStatus {
    type Error = Error;
    fn try_from(s: proto::DeliveryStatus) -> Result<Self> {
        match s {
            proto::DeliveryStatus::Pending => Ok(DeliveryStatus::Pending),
            proto::DeliveryStatus::Delivered => Ok(DeliveryStatus::Delivered),
            proto::DeliveryStatus::Rejected => Ok(DeliveryStatus::Rejected),
            proto::DeliveryStatus::Unreachable => Ok(DeliveryStatus::Unreachable),
            proto::DeliveryStatus::Unspecified => Err(Error::InvalidArgument(
                "delivery status must be set".to_owned(),
            )),
        }
    }
}

impl From<&Desired> for proto::DesiredValue {
    fn from(d: &Desired) -> Self {
        proto::DesiredValue {
            value: d.value,
            status: proto::DeliveryStatus::from(d.status) as i32,
            revision: d.revision,
            updated_ns: d.updated_ns,
            reason: d.reason.clone(),
        }
    }
}

impl TryFrom<proto::Twin> for TwinCore {
    type Error = Error;

    /// Restores a twin from its stored proto form (snapshots).
    fn try_from(t: proto::Twin) -> Result<Self> {
        let id: TwinId = t.twin_id.parse()?;
        let kind: AssetKind = t.kind.parse()?;
        let desired = t
            .desired
            .into_iter()
            .map(|(k, d)| {
                let status = proto::DeliveryStatus::try_from(d.status)
                    .map_err(|_| Error::InvalidArgument(format!("bad delivery status of {k}")))?
                    .try_into()?;
                Ok((
                    k,
                    Desired {
                        value: d.value,
                        status,
                        revision: d.revision,
                        updated_ns: d.updated_ns,
                        reason: d.reason,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        let health = t.health.unwrap_or_default();
        let chain = match &t.chain {
            Some(c) => Chain::validate_shared(&ChainSpec::from(c), kind)?,
            None => Chain::shared_default(kind),
        };
        // A stored policy that no longer validates (the kind's schema changed) falls back
        // to the kind's default, which protects at least as much.
        let policy = t
            .policy
            .as_ref()
            .and_then(|p| Policy::from_stored_shared(p, kind).ok())
            .unwrap_or_else(|| Policy::shared_default(kind));
        let ledger = t
            .budget
            .as_ref()
            .map(Ledger::from_proto)
            .unwrap_or_default();
        Ok(TwinCore {
            id,
            kind,
            revision: t.revision,
            reported: t
                .reported
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        Reported {
                            value: v.value,
                            timestamp_ns: v.timestamp_ns,
                            seq: v.seq,
                        },
                    )
                })
                .collect(),
            desired,
            derived: t.derived.into_iter().collect(),
            health: Health {
                anomaly_score: health.anomaly_score,
                status: if health.status.is_empty() {
                    "ok".to_owned()
                } else {
                    health.status
                },
                model_id: health.model_id,
                model_version: health.model_version,
                last_alarm: health.last_alarm,
                reason: health.reason,
            },
            duplicate_frames: t.duplicate_frames.into_iter().collect(),
            lost_frames: t.lost_frames.into_iter().collect(),
            chain,
            policy,
            ledger,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_and_ledger_survive_the_off_site_snapshot() {
        let id: TwinId = "site-a/cs-01".parse().unwrap();
        let mut core = TwinCore::new(id, AssetKind::CrankshaftLine);
        Arc::make_mut(&mut core.policy).epsilon_per_period = 1.0;
        Arc::make_mut(&mut core.policy).version = 2;
        core.ledger.charge(0.3, 0.0);
        core.ledger.period_start_ns = 86_400_000_000_000;
        core.reported.insert(
            "cycle_time".into(),
            Reported {
                value: 437.0,
                timestamp_ns: 5,
                seq: 9,
            },
        );
        let mut t = core.to_proto(None);
        core.policy
            .gate_snapshot_twin(&mut t, &crate::privacy::Lineage::default());
        let back = TwinCore::try_from(t).unwrap();
        assert_eq!(back.ledger, core.ledger);
        assert_eq!(back.policy, core.policy);
        assert_eq!(back.reported["cycle_time"].seq, 9);
        assert!(back.reported["cycle_time"].value.is_nan());
    }
    use proptest::prelude::*;

    fn twin() -> TwinCore {
        TwinCore::new("site-a/wt-01".parse().unwrap(), AssetKind::WindTurbine)
    }

    #[test]
    fn admission_rules() {
        assert_eq!(admit(0, 1, 1), Admission::Apply { lost: 0 });
        assert_eq!(admit(5, 6, 1), Admission::Apply { lost: 0 });
        assert_eq!(admit(5, 5, 1), Admission::Duplicate);
        assert_eq!(admit(5, 2, 1), Admission::Duplicate);
        // 6 and 7 are still in the gateway's spool: wait for them.
        assert_eq!(admit(5, 8, 6), Admission::Gap { expected: 6 });
        // The gateway no longer holds 6..=9: skip to 10 and count 4 lost.
        assert_eq!(admit(5, 10, 10), Admission::Apply { lost: 4 });
        // ...but not past frames it still holds.
        assert_eq!(admit(5, 11, 10), Admission::Gap { expected: 6 });
        // The attacks: a seq no gateway can have reached, with or without a matching
        // spool base, and the largest seq there is; nothing overflows.
        for (seq, base) in [
            (1_000_000_000_000, 1_000_000_000_000),
            (u64::MAX, u64::MAX),
            (u64::MAX, 1),
        ] {
            assert_eq!(admit(5, seq, base), Admission::Refused { expected: 6 });
        }
        assert_eq!(admit(u64::MAX, u64::MAX, 1), Admission::Duplicate);
        assert_eq!(
            admit(5, 6 + MAX_SEQ_JUMP, 6 + MAX_SEQ_JUMP),
            Admission::Apply { lost: MAX_SEQ_JUMP }
        );
    }

    #[test]
    fn frames_update_reported_and_derived() {
        let mut t = twin();
        let stats = t.apply_frame("bearing_vibration", 1, 1_000, 100, &[1.0, -3.0, 2.0], 0);
        assert_eq!(stats.count, 3);
        let r = t.reported["bearing_vibration"];
        assert_eq!(r.value, 2.0);
        assert_eq!(r.timestamp_ns, 1_200);
        assert_eq!(r.seq, 1);
        assert_eq!(t.derived["bearing_vibration.min"], -3.0);
        assert_eq!(t.derived["bearing_vibration.max"], 2.0);
        assert_eq!(t.revision, 1);
        assert_eq!(t.admit("bearing_vibration", 1, 1), Admission::Duplicate);
        assert_eq!(t.duplicate_frames["bearing_vibration"], 1);
        t.apply_frame("bearing_vibration", 5, 2_000, 100, &[0.5], 3);
        assert_eq!(t.lost_frames["bearing_vibration"], 3);
        assert_eq!(t.last_seq("bearing_vibration"), 5);
    }

    #[test]
    fn desired_lifecycle() {
        let mut t = twin();
        let d = t.set_desired("power_limit", 1200.0, None, 10).unwrap();
        assert_eq!(d.status, DeliveryStatus::Pending);
        let rev = d.revision;
        assert_eq!(rev, 1);
        assert_eq!(t.pending_desired().count(), 1);
        // A stale answer (other revision) changes nothing.
        assert!(!t.desired_outcome("power_limit", 99, DeliveryStatus::Delivered, "", 11));
        assert!(t.desired_outcome("power_limit", rev, DeliveryStatus::Delivered, "", 12));
        assert_eq!(t.desired["power_limit"].status, DeliveryStatus::Delivered);
        assert_eq!(t.revision, 2);
        assert_eq!(t.pending_desired().count(), 0);

        let err = t.set_desired("power_limit", 10.0, Some(1), 13).unwrap_err();
        assert_eq!(
            err.to_string(),
            "revision mismatch on site-a/wt-01: expected 1, twin is at 2"
        );
        assert_eq!(err.code(), crate::ErrorCode::FailedPrecondition);
        assert!(t.set_desired("power_limit", 10.0, Some(2), 13).is_ok());
        assert!(t.set_desired("power_limit", -1.0, None, 14).is_err());
        assert_eq!(
            t.desired["power_limit"].value, 10.0,
            "bad command changes nothing"
        );
    }

    #[test]
    fn proto_round_trip() {
        let mut t = twin();
        t.apply_frame("power", 3, 5, 1, &[1500.0], 2);
        t.set_desired("yaw_offset", 2.5, None, 7).unwrap();
        t.admit("power", 3, 1);
        let back = TwinCore::try_from(t.to_proto(None)).unwrap();
        assert_eq!(back, t);
    }

    proptest! {
        /// Whatever order and repetition frames arrive in, each seq is applied at most
        /// once, in increasing order.
        #[test]
        fn each_seq_applied_once(arrivals in prop::collection::vec(1u64..40, 0..200)) {
            let mut t = twin();
            let mut applied = Vec::new();
            for seq in arrivals {
                if let Admission::Apply { lost } = t.admit("power", seq, 1) {
                    prop_assert_eq!(lost, 0);
                    t.apply_frame("power", seq, seq as i64, 1, &[seq as f64], lost);
                    applied.push(seq);
                }
            }
            let expected: Vec<u64> = (1..=applied.len() as u64).collect();
            prop_assert_eq!(applied, expected);
        }
    }
}
