//! Set-points: sent to the gateway on the twin's control key, re-sent until the
//! gateway's delivery report (delivered or rejected) comes back through the twin's
//! task.

use ractor::ActorRef;

use twinmesh_twins::keys;
use twinmesh_twins::proto::{self, DesiredUpdate};
use twinmesh_twins::state::DeliveryStatus;

use super::{TwinActorState, TwinMsg};
use crate::error::Result;
use crate::ports::{Qos, Sample};
use tokio::time::Instant;

impl TwinActorState {
    /// A delivery report from the gateway: the set-point is delivered or rejected.
    pub(super) async fn on_desired_outcome(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        update: DesiredUpdate,
    ) -> Result<()> {
        if let Some(device) = update.device.as_ref() {
            return self.on_device_status(myself, device).await;
        }
        let status = proto::DeliveryStatus::try_from(update.status)
            .ok()
            .and_then(|s| DeliveryStatus::try_from(s).ok());
        let Some(status) = status else {
            tracing::warn!(twin = %self.core.id, "delivery report without status");
            return Ok(());
        };
        let now = self.ctx.now_ns();
        if self.core.desired_outcome(
            &update.property,
            update.revision,
            status,
            &update.reason,
            now,
        ) {
            self.persist()?;
            let kind = match status {
                DeliveryStatus::Rejected => "desired_rejected",
                DeliveryStatus::Unreachable => "desired_unreachable",
                _ => "desired_delivered",
            };
            self.publish_event(
                kind,
                format!(
                    "set-point {}={} {}",
                    update.property,
                    update.value,
                    match status {
                        DeliveryStatus::Rejected => format!("rejected: {}", update.reason),
                        DeliveryStatus::Unreachable =>
                            format!("not delivered, device unreachable: {}", update.reason),
                        _ => "delivered".to_owned(),
                    }
                ),
                vec![
                    ("property", update.property.clone()),
                    ("revision", update.revision.to_string()),
                ],
            )
            .await;
            self.state_changed(myself).await;
        }
        Ok(())
    }

    /// The gateway's report on the device: down makes the twin `stale` with the reason.
    async fn on_device_status(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        device: &proto::DeviceStatus,
    ) -> Result<()> {
        if self.core.device_status(device.reachable, &device.reason) {
            self.persist()?;
            let (kind, message) = if device.reachable {
                ("device_up", "device reachable again".to_owned())
            } else {
                (
                    "device_down",
                    format!("device unreachable: {}", device.reason),
                )
            };
            tracing::info!(twin = %self.core.id, reachable = device.reachable, reason = device.reason, "device status");
            self.publish_event(kind, message, vec![("reason", device.reason.clone())])
                .await;
            self.state_changed(myself).await;
        }
        Ok(())
    }

    pub(super) async fn send_pending_desired(&mut self) {
        let updates: Vec<DesiredUpdate> = self
            .core
            .pending_desired()
            .map(|(property, d)| DesiredUpdate {
                twin_id: self.core.id.to_string(),
                property: property.to_owned(),
                value: d.value,
                revision: d.revision,
                epoch: self.placement.epoch,
                status: proto::DeliveryStatus::Pending as i32,
                timestamp_ns: d.updated_ns,
                reason: String::new(),
                device: None,
                proof: None,
            })
            .map(|mut update| {
                // The gateway actuates only on a proven update.
                self.ctx.trust.prove(self.core.id.site(), &mut update);
                update
            })
            .collect();
        for update in &updates {
            self.publish(keys::control(&self.core.id), update, Qos::Reliable)
                .await;
        }
        if !updates.is_empty() {
            self.last_desired_send = Some(Instant::now());
        }
    }
}

/// A delivery report from the gateway, handed to the actor. False when the actor is
/// gone.
pub(super) fn delivery_report(
    ctx: &crate::context::NodeContext,
    actor: &ActorRef<TwinMsg>,
    sample: Sample,
) -> bool {
    match sample.decode::<DesiredUpdate>() {
        // Only a report the site's gateway proved settles a set-point.
        Ok(mut update) => match update.twin_id.split('/').next().map(str::to_owned) {
            Some(site) if ctx.trust.proven(&site, &mut update).is_some() => {
                actor.cast(TwinMsg::DesiredOutcome(update)).is_ok()
            }
            _ => {
                crate::metrics::NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
                tracing::warn!(
                    key = sample.key,
                    "dropped a delivery report without its gateway's proof"
                );
                true
            }
        },
        Err(e) => {
            tracing::warn!(key = sample.key, "malformed delivery report: {e}");
            true
        }
    }
}
