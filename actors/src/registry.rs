//! The cloud's model registry on the [`ModelStore`] port: every version of every model
//! (info, deployments, the model file), and its fabric service, which answers
//! `twinmesh/models/{id}/{version}` for twins that start on a node that does not hold
//! their model yet (after a migration or a failover). Cloud nodes run it in production
//! and in the simulation alike ([`crate::assembly`]).

use std::sync::{Arc, Mutex};

use twinmesh_twins::keys;
use twinmesh_twins::proto::{Deployment, ModelInfo, ModelRecord};

use crate::context::NodeContext;
use crate::error::{Error, Result};
use crate::ports::ModelStore;

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Registry(e.to_string())
}

/// The cloud's model registry.
pub struct Registry {
    store: Arc<dyn ModelStore>,
    /// Serialises version allocation and deployment updates.
    write: Mutex<()>,
}

impl Registry {
    pub fn new(store: Arc<dyn ModelStore>) -> Self {
        Registry {
            store,
            write: Mutex::new(()),
        }
    }

    fn newest_version(&self, model_id: &str) -> Result<u64> {
        self.store.newest_model_version(model_id).map_err(internal)
    }

    /// Stores `record` as the next version of its model; returns the stored info.
    pub fn add(&self, mut record: ModelRecord) -> Result<ModelInfo> {
        let _w = self.write.lock().expect("registry lock");
        let info = record.info.as_mut().ok_or_else(|| internal("no info"))?;
        info.version = self.newest_version(&info.model_id)? + 1;
        info.size_bytes = record.model.len() as u64;
        let out = info.clone();
        self.store
            .put_model(&out.model_id, out.version, &record)
            .map_err(internal)?;
        Ok(out)
    }

    /// A version (0: the newest).
    pub fn get(&self, model_id: &str, version: u64) -> Result<Option<ModelRecord>> {
        let version = match version {
            0 => self.newest_version(model_id)?,
            v => v,
        };
        self.store.get_model(model_id, version).map_err(internal)
    }

    /// Every version's info, newest first, filtered by id and kind.
    pub fn list(&self, model_id: &str, kind: &str) -> Result<Vec<ModelInfo>> {
        let mut out = Vec::new();
        for record in self.store.models().map_err(internal)? {
            let info = record.info.unwrap_or_default();
            if (model_id.is_empty() || info.model_id == model_id)
                && (kind.is_empty() || info.kind == kind)
            {
                out.push(info);
            }
        }
        out.sort_by(|a, b| {
            b.created_ns
                .cmp(&a.created_ns)
                .then(b.version.cmp(&a.version))
        });
        Ok(out)
    }

    /// Records deployments of a version (the latest per twin).
    pub fn record_deployments(
        &self,
        model_id: &str,
        version: u64,
        deployments: &[Deployment],
    ) -> Result<()> {
        let _w = self.write.lock().expect("registry lock");
        let Some(mut record) = self.get(model_id, version)? else {
            return Err(Error::UnknownModel {
                model_id: model_id.to_owned(),
                version,
            });
        };
        let info = record.info.get_or_insert_with(Default::default);
        for d in deployments {
            info.deployments.retain(|e| e.twin_id != d.twin_id);
            info.deployments.push(d.clone());
        }
        info.deployments.sort_by(|a, b| a.twin_id.cmp(&b.twin_id));
        self.store
            .put_model(model_id, version, &record)
            .map_err(internal)?;
        Ok(())
    }
}

/// Answers `twinmesh/models/{id}/{version}` from the registry until the node stops.
pub async fn serve_registry(ctx: Arc<NodeContext>, registry: Arc<Registry>) -> Result<()> {
    let q = ctx.fabric.queryable(keys::MODELS, 64).await?;
    ctx.spawn_until_cancelled(async move {
        while let Ok(query) = q.rx.recv_async().await {
            tracing::debug!(key = %query.key, "model registry query");
            let Some((id, version)) = keys::parse_model(&query.key) else {
                continue;
            };
            match registry.get(id, version) {
                Ok(Some(r)) => {
                    let key = keys::model(id, version);
                    query.reply_with(&key, &r)
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("model registry read failed: {e}"),
            }
        }
        // The whole queryable lives in the task (its guard keeps it declared).
        drop(q);
    });
    Ok(())
}
