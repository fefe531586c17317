//! Lifecycle: the state a twin starts from, replication of its snapshot to the cloud,
//! backfill of history holes after a start, the freeze of a migration, and passivation
//! of an idle twin (its node wakes it on its next frame or call).

use std::time::Duration;

use ractor::ActorRef;
use tokio::time::Instant;

use twinmesh_twins::chain::{self, ChainSpec};
use twinmesh_twins::proto::{self, twin_reply, Placement, ReplayRequest, TwinSnapshot};
use twinmesh_twins::{keys, AssetKind, Error as DomainError, TwinCore, TwinId};

use super::{TwinActorState, TwinMsg, PASSIVATED};
use crate::context::NodeContext;
use crate::error::Result;
use crate::ports::Qos;

/// The longest freeze a request may ask for.
const MAX_FREEZE: Duration = Duration::from_secs(300);

/// Frames below the applied seq a new owner makes sure its history holds (the gateway's
/// default retention).
const REPLAY_WINDOW: u64 = 4096;

/// How often a twin checks its history for holes after it starts, and how many times.
const BACKFILL_CHECK: Duration = Duration::from_secs(2);
pub(super) const BACKFILL_CHECKS: u32 = 30;

impl TwinActorState {
    /// Freezes the twin for a migration (no more frames applied nor acknowledged, no
    /// mutating requests) and returns its snapshot; `release` unfreezes it when the move
    /// did not happen. Only at the twin's current epoch. The freeze expires after the
    /// request's timeout (or the configured one): the twin then goes on here.
    pub(super) async fn freeze(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        r: proto::FreezeRequest,
    ) -> crate::Result<twin_reply::Reply> {
        self.check_twin_id(&r.twin_id)?;
        if r.epoch != self.placement.epoch {
            return Err(crate::Error::Domain(DomainError::InvalidArgument(format!(
                "freeze of {} at epoch {}, twin is at epoch {}",
                self.core.id, r.epoch, self.placement.epoch
            ))));
        }
        if r.release {
            self.frozen = false;
            self.thaw_at = None;
            return Ok(twin_reply::Reply::Snapshot(self.offsite_snapshot()));
        }
        // Bounded: a freeze that never expires would stop the twin for good.
        let timeout = match r.timeout_ms {
            0 => self.ctx.twin_config.freeze_timeout,
            ms => Duration::from_millis(ms).min(MAX_FREEZE),
        };
        self.frozen = true;
        self.thaw_at = Some(Instant::now() + timeout);
        self.arm_tick(myself, timeout);
        // No flush here: the snapshot travels to the cloud, and anything after an
        // older durable one is still in the gateway's retained spool.
        self.persist()
            .map_err(|e| crate::Error::unavailable(format!("snapshot not stored: {e}")))?;
        self.replicate().await;
        // The authority keeps this hand-over snapshot only with a mesh node's proof.
        let mut snap = self.offsite_snapshot();
        self.ctx.trust.prove_mesh(&mut snap);
        Ok(twin_reply::Reply::Snapshot(snap))
    }

    /// Publishes state that changed, replicates, passivates an idle twin, checks for
    /// history holes and re-sends pending set-points, each when due.
    pub(super) async fn on_tick(&mut self, myself: &ActorRef<TwinMsg>) -> Result<()> {
        self.tick_at = None;
        match self.thaw_at {
            Some(t) if Instant::now() >= t => {
                tracing::warn!(twin = %self.core.id, epoch = self.placement.epoch, "freeze expired before the move was committed: going on here");
                self.frozen = false;
                self.thaw_at = None;
                self.publish_event(
                    "freeze_expired",
                    "a migration did not commit in time; the twin goes on here".to_owned(),
                    vec![("epoch", self.placement.epoch.to_string())],
                )
                .await;
            }
            Some(t) => self.arm_tick(myself, t - Instant::now()),
            None => {}
        }
        if self.dirty {
            self.publish_state().await;
        }
        if let Some(wait) = self.maybe_replicate().await {
            self.arm_tick(myself, wait);
        }
        if let Some(idle) = self.passivate_after() {
            let quiet = self.quiet();
            if quiet >= idle && self.can_passivate() {
                self.passivate(myself).await?;
                return Ok(());
            }
            // Not idle long enough, or something still in flight: look again.
            let wait = idle.saturating_sub(quiet).max(Duration::from_millis(100));
            self.arm_tick(myself, wait);
        }
        if self.backfill_due.is_some_and(|t| Instant::now() >= t) {
            self.check_backfill(myself).await;
        } else if let Some(t) = self.backfill_due {
            self.arm_tick(myself, t - Instant::now());
        }
        if self.core.pending_desired().next().is_some() {
            let retry = self.ctx.twin_config.desired_retry;
            if self.last_desired_send.is_none_or(|t| t.elapsed() >= retry) {
                self.send_pending_desired().await;
            }
            self.arm_tick(myself, retry);
        }
        Ok(())
    }

    /// Replicates the snapshot to the cloud (placement authority), which keeps the newest
    /// per twin and refuses older epochs.
    pub(super) async fn replicate(&mut self) {
        let mut snap = self.offsite_snapshot();
        // The cloud keeps replicas proven by a mesh node (the owner at its epoch).
        self.ctx.trust.prove_mesh(&mut snap);
        let revision = self.core.revision;
        self.publish(keys::snapshot(&self.core.id), &snap, Qos::Reliable)
            .await;
        self.replicated_revision = Some(revision);
        self.last_replication = Some(Instant::now());
    }

    /// Replicates now and waits (up to 2 s) until the cloud's replica holds this
    /// revision: a failover must not start from a replica older than a ledger charge.
    pub(super) async fn replicate_confirmed(&mut self) -> bool {
        self.replicate().await;
        let want = (self.placement.epoch, self.core.revision);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Some(s) = fetch_replica(&self.ctx, &self.core.id).await {
                if (s.epoch, s.twin.as_ref().map_or(0, |t| t.revision)) >= want {
                    return true;
                }
            }
            // The replica usually lands within a millisecond or two on a LAN.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        false
    }

    /// Replicates when the state changed and the last replication is old enough;
    /// returns how long until the next one is due, if one is pending.
    pub(super) async fn maybe_replicate(&mut self) -> Option<Duration> {
        if self.replicated_revision == Some(self.core.revision) || self.frozen {
            return None;
        }
        let interval = self.ctx.twin_config.snapshot_interval;
        match self.last_replication {
            Some(t) if t.elapsed() < interval => Some(interval - t.elapsed()),
            _ => {
                self.replicate().await;
                None
            }
        }
    }

    /// Where this node's history of `signal` needs frames from: the first seq missing in
    /// the replay window below the applied one, or past the newest stored frame.
    pub(super) fn history_needs(&self, signal: &str) -> Option<u64> {
        let last = self.core.last_seq(signal);
        let from = last.saturating_sub(REPLAY_WINDOW - 1).max(1);
        match self
            .ctx
            .store
            .first_missing_seq(&self.core.id, signal, from, last)
        {
            Ok(Some(missing)) => Some(missing),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(twin = %self.core.id, signal, "history not readable: {e}");
                None
            }
        }
    }

    /// Asks the gateway to re-send what this node's history lacks (after a restart, a
    /// migration or a failover): per signal, everything from the first missing seq of
    /// the replay window, or past the newest frame stored. Returns whether any signal
    /// had a hole below the applied seq (the request may need repeating).
    pub(super) async fn request_replay(&self) -> bool {
        let mut holes = false;
        let have_upto = self
            .core
            .kind
            .schema()
            .signals
            .iter()
            .map(|s| {
                let have = match self.history_needs(s.name) {
                    Some(missing) => {
                        holes = true;
                        missing - 1
                    }
                    None => self
                        .ctx
                        .store
                        .last_stored_seq(&self.core.id, s.name)
                        .unwrap_or(0),
                };
                (s.name.to_owned(), have)
            })
            .collect();
        let mut req = ReplayRequest {
            twin_id: self.core.id.to_string(),
            epoch: self.placement.epoch,
            have_upto,
            proof: None,
        };
        // The gateway takes the epoch (it fences older owners) only from a proven one.
        self.ctx.trust.prove(self.core.id.site(), &mut req);
        self.publish(keys::replay(&self.core.id), &req, Qos::Reliable)
            .await;
        holes
    }

    /// Repeats the replay request while this node's history has holes (the request or
    /// some frames may have been lost), a bounded number of times.
    pub(super) async fn check_backfill(&mut self, myself: &ActorRef<TwinMsg>) {
        if self.backfill_checks == 0 || self.frozen {
            return;
        }
        self.backfill_checks -= 1;
        if self.request_replay().await {
            self.backfill_due = Some(Instant::now() + BACKFILL_CHECK);
            self.arm_tick(myself, BACKFILL_CHECK);
        } else {
            self.backfill_checks = 0;
            self.backfill_due = None;
        }
    }

    /// How long this twin may stay idle before it is passivated, if ever: only on edge
    /// nodes, whose router wakes dormant twins.
    pub(super) fn passivate_after(&self) -> Option<Duration> {
        self.ctx
            .twin_config
            .passivate_after
            .filter(|_| self.ctx.router.is_active())
    }

    /// How long since the last frame, request or delivery report, counting calls the
    /// router answered from the read cache.
    pub(super) fn quiet(&self) -> Duration {
        let hit = self.cache.as_ref().and_then(|c| c.last_hit());
        hit.map_or(self.last_activity, |h| h.max(self.last_activity))
            .elapsed()
    }

    /// Nothing in flight that a stopped twin would lose.
    pub(super) fn can_passivate(&self) -> bool {
        !self.frozen && self.core.pending_desired().next().is_none() && self.backfill_due.is_none()
    }

    /// Snapshots (durably, and to the cloud) and stops; the node keeps the twin
    /// registered and wakes it on its next frame or call.
    pub(super) async fn passivate(&mut self, myself: &ActorRef<TwinMsg>) -> Result<()> {
        self.persist()?;
        self.ctx.store.flush().await?;
        self.replicate().await;
        self.publish_event(
            "passivated",
            format!(
                "idle for {} s: stopped until its next frame or call",
                self.quiet().as_secs()
            ),
            vec![],
        )
        .await;
        myself.stop(Some(PASSIVATED.to_owned()));
        Ok(())
    }
}

/// The snapshot the cloud keeps for `id`, if the cloud answers within a second.
pub(super) async fn fetch_replica(ctx: &NodeContext, id: &TwinId) -> Option<TwinSnapshot> {
    let replies = ctx
        .fabric
        .query(&keys::snapshot(id), None, Duration::from_secs(1))
        .await
        .ok()?;
    // Only a replica a mesh node proved (the cloud keeps only its owner's) counts:
    // anyone may answer this query.
    replies
        .into_iter()
        .filter_map(|r| r.decode::<TwinSnapshot>().ok())
        .filter_map(|mut s| ctx.trust.proven_mesh(&mut s).map(|_| s))
        .max_by_key(|s| (s.epoch, s.twin.as_ref().map_or(0, |t| t.revision)))
}

/// The state a starting twin resumes from: the newest snapshot, by (epoch, revision):
/// this node's own, or — when the twin comes here from another node (failover,
/// migration) — the one replicated to the cloud; else a new twin, with the chain its
/// gateway was configured with. Also says whether a snapshot was restored.
pub(super) async fn restore_core(
    ctx: &NodeContext,
    placement: &Placement,
    id: &TwinId,
    kind: AssetKind,
) -> Result<(TwinCore, bool)> {
    let local = ctx.store.load_snapshot(id)?;
    let remote = if local.as_ref().is_none_or(|s| s.epoch < placement.epoch) {
        fetch_replica(ctx, id).await
    } else {
        None
    };
    let rank = |s: &TwinSnapshot| (s.epoch, s.twin.as_ref().map_or(0, |t| t.revision));
    let best = [local, remote]
        .into_iter()
        .flatten()
        .max_by_key(|s| rank(s));
    let (mut core, restored) = match best.and_then(|s| s.twin).map(TwinCore::try_from) {
        Some(Ok(core)) => (core, true),
        Some(Err(e)) => {
            tracing::error!(twin = %id, "stored snapshot is unreadable ({e}); starting empty");
            (TwinCore::new(id.clone(), kind), false)
        }
        None => (TwinCore::new(id.clone(), kind), false),
    };
    if !restored {
        // A new twin starts with the chain its gateway was configured with, if any.
        if let Some(spec) = placement
            .initial_chain
            .as_ref()
            .filter(|c| !c.stages.is_empty())
        {
            match chain::Chain::validate_shared(&ChainSpec::from(spec), kind) {
                Ok(c) => core.chain = c,
                Err(e) => tracing::warn!(twin = %id, "ignoring invalid initial chain: {e}"),
            }
        }
    }
    Ok((core, restored))
}
