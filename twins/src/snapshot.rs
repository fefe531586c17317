//! Twin snapshots as stores keep them: which twin one is of, and which of two is newer.
//! One rule for every store (the sled one of `nodes`, the in-memory one of `sim`).

use crate::error::{Error, Result};
use crate::proto::TwinSnapshot;
use crate::TwinId;

/// The twin `snapshot` is of. A snapshot without a twin, or naming an invalid id, is an
/// error: a store never keeps it (under an empty or unparsable key nothing could find it).
pub fn twin_of(snapshot: &TwinSnapshot) -> Result<TwinId> {
    match &snapshot.twin {
        Some(t) => t.twin_id.parse(),
        None => Err(Error::InvalidTwinId(String::new())),
    }
}

/// The order of a twin's snapshots: placement epoch first (a newer owner fences an older
/// one), then the twin's revision within the epoch.
pub fn rank(snapshot: &TwinSnapshot) -> (u64, u64) {
    (
        snapshot.epoch,
        snapshot.twin.as_ref().map_or(0, |t| t.revision),
    )
}

/// Whether `new` replaces `held` as the kept replica: strictly newer by [`rank`]; an
/// equal rank keeps the one held. Anything replaces nothing (or an unreadable replica).
pub fn supersedes(new: &TwinSnapshot, held: Option<&TwinSnapshot>) -> bool {
    held.is_none_or(|old| rank(new) > rank(old))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Twin;

    fn snap(id: &str, epoch: u64, revision: u64) -> TwinSnapshot {
        TwinSnapshot {
            twin: Some(Twin {
                twin_id: id.into(),
                revision,
                ..Default::default()
            }),
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn epoch_ranks_before_revision() {
        let held = snap("s/a", 2, 10);
        assert!(supersedes(&snap("s/a", 2, 11), Some(&held)));
        assert!(supersedes(&snap("s/a", 3, 0), Some(&held)), "new epoch");
        assert!(!supersedes(&snap("s/a", 1, 99), Some(&held)), "fenced");
        assert!(!supersedes(&snap("s/a", 2, 9), Some(&held)));
        assert!(!supersedes(&snap("s/a", 2, 10), Some(&held)), "a tie keeps");
        assert!(supersedes(&snap("s/a", 0, 0), None));
        // No twin: revision 0.
        let bare = TwinSnapshot {
            epoch: 2,
            ..Default::default()
        };
        assert_eq!(rank(&bare), (2, 0));
        assert!(!supersedes(&bare, Some(&snap("s/a", 2, 0))));
    }

    #[test]
    fn a_snapshot_must_name_a_valid_twin() {
        assert_eq!(twin_of(&snap("s/a", 1, 1)).unwrap().to_string(), "s/a");
        for bad in ["", "s", "S/a", "s/a/b"] {
            assert!(matches!(
                twin_of(&snap(bad, 1, 1)),
                Err(Error::InvalidTwinId(_))
            ));
        }
        assert!(twin_of(&TwinSnapshot::default()).is_err());
    }
}
