//! The twin side of privacy: what of the twin may leave the site (gated snapshots and
//! state), its privacy policy, the ε ledger that releases are charged to (durably, and
//! confirmed by the cloud's replica) and identifier streams. The releases themselves are
//! in [`super::release`].

use ractor::ActorRef;

use twinmesh_twins::privacy::{self, Mechanism, Pseudonymiser};
use twinmesh_twins::proto::{self, twin_reply, TwinSnapshot};
use twinmesh_twins::Error as DomainError;

use super::{Charge, TwinActorState, TwinMsg};
use crate::metrics::NodeMetrics;

impl TwinActorState {
    /// Replaces the privacy policy (data owners only, optionally at an expected version),
    /// durably and confirmed by the cloud's replica, then tells the gateway what to seal.
    pub(super) async fn set_policy(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        r: proto::SetPolicyRequest,
        caller: Option<proto::Caller>,
    ) -> crate::Result<twin_reply::Reply> {
        let p = r.policy.unwrap_or_default();
        self.check_twin_id(&p.twin_id)?;
        if privacy::role_of(caller.as_ref()) < privacy::Role::DataOwner {
            return Err(crate::Error::Domain(DomainError::PermissionDenied(
                "setting a privacy policy needs the data_owner role".to_owned(),
            )));
        }
        if let Some(expected) = r.expected_version {
            if expected != self.core.policy.version {
                return Err(crate::Error::Domain(DomainError::PolicyVersionMismatch {
                    twin: self.core.id.to_string(),
                    expected,
                    actual: self.core.policy.version,
                }));
            }
        }
        let mut policy = privacy::Policy::validate(&p, self.core.kind)?;
        policy.version = self.core.policy.version + 1;
        let previous = std::mem::replace(&mut self.core.policy, std::sync::Arc::new(policy));
        self.core.revision += 1;
        if let Err(e) = self.persist_durably().await {
            self.core.policy = previous;
            return Err(crate::Error::unavailable(format!("policy not stored: {e}")));
        }
        // Like a ledger charge: a failover must not bring back the older policy.
        if !self.replicate_confirmed().await {
            tracing::warn!(twin = %self.core.id, "policy stored, but the cloud did not confirm its replica (unreachable?)");
        }
        // The gateway seals what the new policy protects.
        self.publish_chain().await;
        let protected = self.core.policy.protected_signals().join(",");
        self.publish_event(
            "policy_changed",
            format!(
                "privacy policy v{} (protected: {protected})",
                self.core.policy.version
            ),
            vec![
                ("version", self.core.policy.version.to_string()),
                ("protected", protected.clone()),
                ("by", caller.map(|c| c.subject).unwrap_or_default()),
            ],
        )
        .await;
        self.state_changed(myself).await;
        Ok(twin_reply::Reply::Policy(
            self.core.policy.to_proto(&p.twin_id),
        ))
    }

    /// The snapshot as it may leave the site (cloud replicas, migration hand-over):
    /// protected values replaced by NaN, sequence numbers kept.
    pub(super) fn offsite_snapshot(&self) -> TwinSnapshot {
        let mut snap = self.snapshot();
        if let Some(t) = snap.twin.as_mut() {
            self.core.policy.gate_snapshot_twin(t, &self.lineage());
        }
        snap
    }

    /// The twin as `caller` may see it.
    pub(super) fn twin_for(&self, caller: Option<&proto::Caller>) -> proto::Twin {
        let mut t = self.get_twin();
        if !privacy::sees_raw(caller, self.core.id.site()) {
            self.core.policy.gate_twin(&mut t, &self.lineage());
        }
        t
    }

    /// An identifier batch: refused whole when it is not in the form the policy demands
    /// (pseudonyms, when the stream is pseudonymised; nothing, when it is suppressed),
    /// else published as a `device_associations`-style event of who came and went.
    pub(super) async fn on_identifiers(&mut self, batch: proto::IdentifierBatch) {
        let mechanism = self.core.policy.identifier(&batch.stream);
        let refused = match mechanism {
            Mechanism::None => None,
            Mechanism::Pseudonymise => batch
                .records
                .iter()
                .any(|r| !Pseudonymiser::is_pseudonym(&r.identifier))
                .then_some("an identifier that is not a pseudonym"),
            _ => Some("a suppressed stream"),
        };
        if let Some(why) = refused {
            NodeMetrics::add(
                &self.ctx.metrics.identifiers_rejected,
                batch.records.len() as u64,
            );
            tracing::warn!(twin = %self.core.id, stream = batch.stream, records = batch.records.len(), "identifier batch refused: {why}");
            return;
        }
        let join = |present: bool| {
            batch
                .records
                .iter()
                .filter(|r| r.present == present)
                .map(|r| r.identifier.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (came, left) = (join(true), join(false));
        let n_came = batch.records.iter().filter(|r| r.present).count();
        let first = batch
            .records
            .iter()
            .map(|r| r.timestamp_ns)
            .min()
            .unwrap_or(0);
        let last = batch
            .records
            .iter()
            .map(|r| r.timestamp_ns)
            .max()
            .unwrap_or(0);
        self.publish_event(
            &batch.stream,
            format!(
                "{n_came} came, {} left ({})",
                batch.records.len() - n_came,
                if mechanism == Mechanism::None {
                    "raw"
                } else {
                    "pseudonymised"
                }
            ),
            vec![
                ("stream", batch.stream.clone()),
                ("mechanism", mechanism.as_str().to_owned()),
                ("present", came),
                ("left", left),
                ("first_ns", first.to_string()),
                ("last_ns", last.to_string()),
            ],
        )
        .await;
    }

    /// Checks and charges (or refunds) the ledger, durably, then publishes the audit
    /// event. Nothing is charged when the release does not fit the budget.
    pub(super) async fn charge(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        c: Charge,
    ) -> std::result::Result<proto::Budget, proto::Error> {
        let now = self.ctx.now_ns();
        let before = self.core.ledger;
        self.core.ledger.roll(&self.core.policy, now);
        if c.refund {
            self.core.ledger.refund(c.epsilon, c.delta);
        } else {
            if let Err(e) =
                self.core
                    .ledger
                    .check(&self.core.id.to_string(), &self.core.policy, c.epsilon)
            {
                self.core.ledger = before;
                return Err((&e).into());
            }
            self.core.ledger.charge(c.epsilon, c.delta);
        }
        self.core.revision += 1;
        if let Err(e) = self.persist_durably().await {
            self.core.ledger = before;
            return Err(proto::Error {
                code: proto::ErrorCode::Unavailable as i32,
                message: format!("privacy ledger of {} not stored: {e}", self.core.id),
            });
        }
        // A failover starts from the cloud's replica: it must hold this charge, or the
        // new owner could spend the same budget again.
        if !self.replicate_confirmed().await {
            tracing::warn!(
                twin = %self.core.id,
                "privacy ledger charged, but the cloud did not confirm its replica (unreachable?): a failover now would start from an older ledger"
            );
        }
        let id = self.core.id.to_string();
        let budget = self.core.ledger.to_proto(&id, &self.core.policy);
        if let Some((message, mut attributes)) = c.audit {
            attributes.push((
                "epsilon_remaining",
                (budget.epsilon_total - budget.epsilon_spent)
                    .max(0.0)
                    .to_string(),
            ));
            self.publish_event("privacy_release", message, attributes)
                .await;
        }
        self.state_changed(myself).await;
        Ok(budget)
    }
}
