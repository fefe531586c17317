//! `ModelService`: training on the cloud's feature archive, the model registry, and
//! deployment to twins wherever they live ([`crate::models`] holds the registry and the
//! training itself).

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};

use twinmesh_proto::v1::model_service_server::ModelService;
use twinmesh_twins::model::{validate_model_id, Model};
use twinmesh_twins::proto::{
    DeployModelRequest, DeployModelResponse, ImportModelRequest, ListModelsRequest,
    ListModelsResponse, ModelInfo, ModelRecord, TrainModelProgress, TrainModelRequest,
};
use twinmesh_twins::{AssetKind, TwinId};

use super::Services;
use crate::api::parse_twin_id;
use crate::models::{install_all, member_thresholds, train};

type ProgressStream = Pin<Box<dyn Stream<Item = Result<TrainModelProgress, Status>> + Send>>;

#[tonic::async_trait]
impl ModelService for Services {
    type TrainModelStream = ProgressStream;

    async fn train_model(
        &self,
        request: Request<TrainModelRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let _who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        let (store, registry) = self.models.cloud().await?;
        let job = self.models.job(request.get_ref(), &*store).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TrainModelProgress, Status>>(16);
        let now_ns = self.models.ctx.now_ns();
        tracing::info!(model = %job.model_id, twins = job.twins.len(), features = job.features.len(), "training");
        self.models.ctx.tasks.spawn(async move {
            let tx2 = tx.clone();
            let result = tokio::task::spawn_blocking(move || {
                let mut last = std::time::Instant::now() - Duration::from_secs(1);
                train(&*store, &job, now_ns, &mut |p| {
                    if tx2.is_closed() {
                        return false;
                    }
                    // At most ten updates a second (the last of each phase always).
                    if p.done == p.total || last.elapsed() >= Duration::from_millis(100) {
                        last = std::time::Instant::now();
                        let _ = tx2.try_send(Ok(p));
                    }
                    true
                })
                .and_then(|record| {
                    if tx2.is_closed() {
                        return Err(crate::Error::cancelled("training cancelled"));
                    }
                    Ok(registry.add(record)?)
                })
            })
            .await;
            let last = match result {
                Ok(Ok(info)) => {
                    tracing::info!(model = %info.model_id, version = info.version, rows = info.trained_rows, "model trained");
                    Ok(TrainModelProgress {
                        phase: "done".into(),
                        done: 1,
                        total: 1,
                        rows: info.trained_rows,
                        model: Some(info),
                    })
                }
                Ok(Err(s)) => Err(s),
                Err(e) => Err(crate::Error::internal(format!("training failed: {e}"))),
            };
            if let Err(e) = &last {
                if e.code() == crate::error::ErrorCode::Cancelled {
                    tracing::info!("training cancelled by its caller");
                }
            }
            let _ = tx.send(last.map_err(Status::from)).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let _who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let (_, registry) = self.models.cloud().await?;
        let req = request.into_inner();
        Ok(Response::new(ListModelsResponse {
            models: registry
                .list(&req.model_id, &req.kind)
                .map_err(crate::Error::from)?,
        }))
    }

    async fn deploy_model(
        &self,
        request: Request<DeployModelRequest>,
    ) -> Result<Response<DeployModelResponse>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        let (_, registry) = self.models.cloud().await?;
        let req = request.into_inner();
        if !req.site.is_empty() {
            who.require_site(&req.site)?;
        }
        validate_model_id(&req.model_id)
            .map_err(|e| crate::Error::invalid_argument(e.to_string()))?;
        let record = registry
            .get(&req.model_id, req.version)
            .map_err(crate::Error::from)?
            .ok_or_else(|| {
                crate::Error::not_found(match req.version {
                    0 => format!("unknown model {}", req.model_id),
                    v => format!("unknown model {} v{v}", req.model_id),
                })
            })?;
        let info = record.info.clone().unwrap_or_default();
        let twins: Vec<TwinId> = if !req.twin_ids.is_empty() {
            req.twin_ids
                .iter()
                .map(|s| parse_twin_id(s))
                .collect::<Result<_, _>>()?
        } else if !req.kind.is_empty() || !req.site.is_empty() {
            if !req.kind.is_empty() && req.kind != info.kind {
                return Err(crate::Error::invalid_argument(format!(
                    "model {} v{} is for {}, not {}",
                    info.model_id, info.version, info.kind, req.kind
                ))
                .into());
            }
            self.models
                .twins(&info.kind, &req.site)
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        } else {
            return Err(crate::Error::invalid_argument(
                "name the twins (twin_ids), a kind or a site to deploy to",
            )
            .into());
        };
        // A role scoped to sites deploys to twins of those sites: named ones must be,
        // a kind's are narrowed to them.
        let twins: Vec<TwinId> = if req.twin_ids.is_empty() {
            twins.into_iter().filter(|t| who.covers(t.site())).collect()
        } else {
            for t in &twins {
                who.require_site(t.site())?;
            }
            twins
        };
        if twins.is_empty() {
            return Err(crate::Error::not_found("no twins match the deployment").into());
        }
        let deployments = install_all(&self.api, &record, twins, self.models.ctx.now_ns()).await;
        registry
            .record_deployments(&info.model_id, info.version, &deployments)
            .map_err(crate::Error::from)?;
        tracing::info!(
            model = %info.model_id,
            version = info.version,
            installed = deployments.iter().filter(|d| d.status == "installed").count(),
            of = deployments.len(),
            "model deployed"
        );
        Ok(Response::new(DeployModelResponse { deployments }))
    }

    async fn import_model(
        &self,
        request: Request<ImportModelRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        let _who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        let (_, registry) = self.models.cloud().await?;
        let mut req = request.into_inner();
        validate_model_id(&req.model_id)
            .map_err(|e| crate::Error::invalid_argument(e.to_string()))?;
        let kind: AssetKind = req
            .kind
            .parse()
            .map_err(|e: twinmesh_twins::Error| crate::Error::invalid_argument(e.to_string()))?;
        let model = if req.onnx {
            let output = if req.output.is_empty() {
                "score"
            } else {
                req.output.as_str()
            };
            let m = Model::from_onnx(&req.features, &req.model, output, req.negate, req.threshold)
                .map_err(|e| crate::Error::invalid_argument(format!("model rejected: {e}")))?;
            // The registry keeps the twinmesh model file that wraps it.
            req.model = m.to_bytes();
            m
        } else {
            Model::from_bytes(&req.model)
                .map_err(|e| crate::Error::invalid_argument(format!("model rejected: {e}")))?
        };
        model
            .check_kind(kind)
            .map_err(|e| crate::Error::invalid_argument(format!("model rejected: {e}")))?;
        let info = ModelInfo {
            model_id: req.model_id,
            algorithm: model.algorithm.to_string(),
            kind: kind.to_string(),
            threshold: model.threshold,
            features: model.features.clone(),
            trained_rows: model.trained_rows as u64,
            created_ns: self.models.ctx.now_ns(),
            member_thresholds: member_thresholds(&model),
            ..Default::default()
        };
        let info = registry
            .add(ModelRecord {
                info: Some(info),
                model: req.model,
            })
            .map_err(crate::Error::from)?;
        Ok(Response::new(info))
    }
}
