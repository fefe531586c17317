//! Analysis: the chain's analysis windows run off the actor (bounded per node), their
//! features come back as history, state and `FeatureSet`s, and the installed anomaly
//! model scores them (alarms, drift). Also the model's install and restore, and the
//! chain the gateway runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use tokio::time::Instant;

use twinmesh_twins::chain::{self, WindowJob};
use twinmesh_twins::keys;
use twinmesh_twins::model::Model;
use twinmesh_twins::monitor::{Monitor, MonitorConfig};
use twinmesh_twins::proto::{self, ChainUpdate, FeatureSet};

use super::{TwinActorState, TwinMsg};
use crate::context::NodeContext;
use crate::error::Result;
use crate::metrics::NodeMetrics;
use crate::ports::{Qos, StoredFrame};

impl TwinActorState {
    /// Runs analysis windows on the blocking pool (bounded per node); each result comes
    /// back to the actor as `TwinMsg::Features`.
    pub(super) fn analyse(&self, myself: &ActorRef<TwinMsg>, jobs: Vec<WindowJob>) {
        for job in jobs {
            let me = myself.clone();
            let permits = self.ctx.analysis_permits.clone();
            let cancel = self.cancel.clone();
            let analysis = self.ctx.metrics.latency.window_analysis.clone();
            self.ctx.tasks.spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                if cancel.is_cancelled() {
                    return;
                }
                let (signal, start_ns, end_ns) = (job.signal.clone(), job.start_ns, job.end_ns);
                let started = std::time::Instant::now();
                let span = tracing::debug_span!("twin.analysis", signal = %job.signal);
                let run = move || span.in_scope(|| chain::run_window(&job));
                if let Ok(features) = tokio::task::spawn_blocking(run).await {
                    analysis.observe(started.elapsed().as_secs_f64());
                    let _ = me.cast(TwinMsg::Features {
                        signal,
                        start_ns,
                        end_ns,
                        features,
                    });
                }
            });
        }
    }

    pub(super) async fn on_features(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        signal: String,
        start_ns: i64,
        end_ns: i64,
        features: BTreeMap<String, f64>,
    ) -> Result<()> {
        if features.is_empty() {
            return Ok(());
        }
        self.core.apply_features(&features);
        tracing::Instrument::instrument(
            self.score(&features, end_ns),
            tracing::debug_span!("twin.score", signal = %signal),
        )
        .await;
        // Feature history at the edge: one point per feature per window.
        let points: Vec<StoredFrame> = features
            .iter()
            .map(|(name, v)| StoredFrame {
                signal: name.clone(),
                seq: 0,
                start_ns: end_ns,
                sample_period_ns: end_ns.saturating_sub(start_ns).max(1),
                samples: vec![*v],
                scale: 0.0,
            })
            .collect();
        self.ctx.store.append_frames(&self.core.id, &points)?;
        self.persist()?;
        // Features computed from protected signals (by lineage) stay in the site's own
        // history.
        let mut features = features;
        self.core
            .policy
            .gate_features(&mut features, &self.lineage());
        if features.is_empty() {
            self.state_changed(myself).await;
            return Ok(());
        }
        let set = FeatureSet {
            twin_id: self.core.id.to_string(),
            signal,
            window_start_ns: start_ns,
            window_end_ns: end_ns,
            features: features.into_iter().collect(),
            epoch: self.placement.epoch,
            archive: self.core.chain.archives(),
        };
        self.publish(keys::twin_features(&self.core.id), &set, Qos::Reliable)
            .await;
        self.state_changed(myself).await;
        Ok(())
    }

    pub(super) async fn publish_chain(&self) {
        let mut update = ChainUpdate {
            twin_id: self.core.id.to_string(),
            chain: Some((&self.core.chain.spec).into()),
            revision: self.core.revision,
            sealed_signals: self.core.policy.protected_signals(),
            identifier_mechanisms: self.core.policy.identifier_mechanisms(),
            proof: None,
        };
        // The gateway obeys only a proven update (it may make a signal travel raw).
        self.ctx.trust.prove(self.core.id.site(), &mut update);
        self.publish(keys::chain(&self.core.id), &update, Qos::Reliable)
            .await;
    }

    /// After a start: the model the snapshot names, from this node's store or else
    /// (a twin that moved here) from the cloud's registry.
    pub(super) async fn restore_model(&mut self) {
        let (id, version) = (
            self.core.health.model_id.clone(),
            self.core.health.model_version,
        );
        if id.is_empty() {
            return;
        }
        let local = match self.ctx.store.load_twin_model(&self.core.id) {
            Ok(r) => r.filter(|r| {
                r.info
                    .as_ref()
                    .is_some_and(|i| i.model_id == id && i.version == version)
            }),
            Err(e) => {
                tracing::warn!(twin = %self.core.id, "stored model unreadable: {e}");
                None
            }
        };
        let record = match local {
            Some(r) => Some(r),
            None => fetch_model(&self.ctx, &id, version).await,
        };
        let checked = record.map(|r| {
            let m = self.check_model(&r);
            (r, m)
        });
        match checked {
            Some((r, Ok(model))) => {
                if let Err(e) = self.ctx.store.save_twin_model(&self.core.id, &r) {
                    tracing::warn!(twin = %self.core.id, "model not stored: {e}");
                }
                let (score, status) = (
                    self.core.health.anomaly_score,
                    self.core.health.status.clone(),
                );
                self.install(&r, model);
                // The last assessment stands until the next window.
                self.core.health.anomaly_score = score;
                self.core.health.status = status;
            }
            Some((_, Err(e))) => {
                tracing::error!(twin = %self.core.id, model = %id, version, "model unusable: {e}");
            }
            None => {
                tracing::warn!(twin = %self.core.id, model = %id, version,
                    "model not found here nor in the registry; scoring paused");
            }
        }
    }

    /// `model_id vN`, or `no model`.
    pub(super) fn model_label(&self) -> String {
        let h = &self.core.health;
        if h.model_id.is_empty() {
            "no model".to_owned()
        } else {
            format!("{} v{}", h.model_id, h.model_version)
        }
    }

    /// Reads a model record and checks it against the twin's kind.
    pub(super) fn check_model(
        &self,
        record: &proto::ModelRecord,
    ) -> std::result::Result<Model, String> {
        let info = record.info.clone().unwrap_or_default();
        twinmesh_twins::model::validate_model_id(&info.model_id).map_err(|e| e.to_string())?;
        let model = Model::from_bytes(&record.model).map_err(|e| e.to_string())?;
        model
            .check_kind(self.core.kind)
            .map_err(|e| e.to_string())?;
        Ok(model)
    }

    /// Swaps the model in: scoring starts afresh (status ok until windows say otherwise).
    pub(super) fn install(&mut self, record: &proto::ModelRecord, model: Model) {
        let info = record.info.clone().unwrap_or_default();
        self.monitor = Some(Box::new(Monitor::new(
            Arc::new(model),
            MonitorConfig::default(),
        )));
        let h = &mut self.core.health;
        h.model_id = info.model_id;
        h.model_version = info.version;
        h.anomaly_score = 0.0;
        h.status = "ok".to_owned();
    }

    /// Scores a window's features with the installed model; raises `alarm` and
    /// `model_quality` events.
    pub(super) async fn score(&mut self, features: &BTreeMap<String, f64>, end_ns: i64) {
        let Some(monitor) = self.monitor.as_mut() else {
            return;
        };
        let Some(a) = monitor.observe(features) else {
            return;
        };
        let threshold = monitor.model().threshold;
        NodeMetrics::add(&self.ctx.metrics.windows_scored, 1);
        let h = &mut self.core.health;
        h.anomaly_score = a.score;
        // A twin whose device is down stays stale until the gateway reaches it again.
        if h.status != a.status.as_str() && h.status != twinmesh_twins::state::STATUS_STALE {
            h.status = a.status.as_str().to_owned();
        }
        if a.raised.is_none() && a.drifted.is_none() {
            return;
        }
        // A model over protected data keeps its alarms on the site (state for raw viewers):
        // events reach every subscriber of the fabric.
        let on_site_only = self.core.policy.is_protected_model(&self.lineage());
        let label = self.model_label();
        if let Some(parts) = a.raised {
            NodeMetrics::add(&self.ctx.metrics.alarms_raised, 1);
            let top: Vec<String> = parts
                .iter()
                .take(3)
                .map(|(f, share)| format!("{f}={share:.2}"))
                .collect();
            self.core.health.last_alarm = format!(
                "{end_ns}: score {:.3} > {threshold:.3}; {}",
                a.score,
                top.join(", ")
            );
            if on_site_only {
                return;
            }
            self.publish_event(
                "alarm",
                format!(
                    "anomaly score {:.3} above the threshold {threshold:.3} of {label}; most from {}",
                    a.score,
                    top.join(", ")
                ),
                vec![
                    ("score", a.score.to_string()),
                    ("threshold", threshold.to_string()),
                    ("features", top.join(",")),
                    ("window_end_ns", end_ns.to_string()),
                ],
            )
            .await;
        }
        if let Some(p) = a.drifted.filter(|_| !on_site_only) {
            self.publish_event(
                "model_quality",
                format!(
                    "scores of {label} drifted from its training distribution (PSI {p:.3}); retraining advised"
                ),
                vec![
                    ("psi", p.to_string()),
                    ("model_id", self.core.health.model_id.clone()),
                    ("model_version", self.core.health.model_version.to_string()),
                ],
            )
            .await;
        }
    }
}

/// A model version from the cloud's registry. A node that just started may not see the
/// registry's queryable yet: asked again for a few seconds.
pub(super) async fn fetch_model(
    ctx: &NodeContext,
    model_id: &str,
    version: u64,
) -> Option<proto::ModelRecord> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(replies) = ctx
            .fabric
            .query(
                &keys::model(model_id, version),
                None,
                Duration::from_secs(2),
            )
            .await
        {
            if let Some(r) = replies
                .into_iter()
                .find_map(|r| r.decode::<proto::ModelRecord>().ok())
            {
                return Some(r);
            }
        }
        if Instant::now() >= deadline || ctx.cancel.is_cancelled() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
