//! The twin's RPCs: the RPC pump (its queryable) serves history queries and imports and
//! privacy releases off the actor, and hands every other request to the actor, which
//! answers it here.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use ractor::{ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use twinmesh_proto::encoding;
use twinmesh_twins::chain::{Analyzer, ChainSpec};
use twinmesh_twins::privacy;
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, SetChainResponse, SetDesiredResponse, TwinReply, TwinRequest,
};
use twinmesh_twins::{keys, td, AssetKind, Error as DomainError, TwinId};

use super::{TwinActorState, TwinMsg};
use crate::context::NodeContext;
use crate::metrics::NodeMetrics;
use crate::ports::StoredFrame;

/// Why a request failed: the caller's mistake, or a passing state of the twin.
pub(super) enum RequestError {
    Domain(DomainError),
    Unavailable(String),
}

impl From<DomainError> for RequestError {
    fn from(e: DomainError) -> Self {
        RequestError::Domain(e)
    }
}

impl TwinActorState {
    /// Answers a twin request; failures become error replies.
    pub(super) async fn on_request(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        req: TwinRequest,
        reply: RpcReplyPort<TwinReply>,
    ) {
        let out = match self.handle_request(myself, req).await {
            Ok(r) => r,
            Err(RequestError::Domain(e)) => twin_reply::Reply::Error((&e).into()),
            Err(RequestError::Unavailable(message)) => twin_reply::Reply::Error(proto::Error {
                code: proto::ErrorCode::Unavailable as i32,
                message,
            }),
        };
        let _ = reply.send(self::reply(out));
    }

    pub(super) async fn handle_request(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        req: TwinRequest,
    ) -> std::result::Result<twin_reply::Reply, RequestError> {
        let mutating = matches!(
            req.request,
            Some(twin_request::Request::SetDesired(_))
                | Some(twin_request::Request::SetChain(_))
                | Some(twin_request::Request::InstallModel(_))
                | Some(twin_request::Request::SetPolicy(_))
        );
        if self.frozen && mutating {
            return Err(RequestError::Unavailable(format!(
                "twin {} is moving",
                self.core.id
            )));
        }
        let caller = req.caller;
        match req.request {
            Some(twin_request::Request::Freeze(r)) => self.freeze(r).await,
            Some(twin_request::Request::GetTwin(r)) => {
                self.check_twin_id(&r.twin_id)?;
                Ok(twin_reply::Reply::Twin(self.twin_for(caller.as_ref())))
            }
            Some(twin_request::Request::GetPolicy(r)) => {
                self.check_twin_id(&r.twin_id)?;
                Ok(twin_reply::Reply::Policy(
                    self.core.policy.to_proto(&r.twin_id),
                ))
            }
            Some(twin_request::Request::GetBudget(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let now = self.ctx.now_ns();
                let mut ledger = self.core.ledger;
                ledger.roll(&self.core.policy, now);
                Ok(twin_reply::Reply::Budget(
                    ledger.to_proto(&r.twin_id, &self.core.policy),
                ))
            }
            Some(twin_request::Request::SetPolicy(r)) => self.set_policy(myself, r, caller).await,
            Some(twin_request::Request::ThingDescription(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let json = td::thing_description(&self.core.id, self.core.kind).to_string();
                Ok(twin_reply::Reply::ThingDescription(
                    proto::ThingDescription {
                        twin_id: r.twin_id,
                        json,
                    },
                ))
            }
            Some(twin_request::Request::SetDesired(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let now = self.ctx.now_ns();
                let desired: proto::DesiredValue = self
                    .core
                    .set_desired(&r.property, r.value, r.expected_revision, now)?
                    .into();
                if let Err(e) = self.persist() {
                    return Err(RequestError::Unavailable(format!(
                        "set-point not stored: {e}"
                    )));
                }
                self.send_pending_desired().await;
                self.state_changed(myself).await;
                self.arm_tick(myself, self.ctx.twin_config.desired_retry);
                Ok(twin_reply::Reply::SetDesired(SetDesiredResponse {
                    revision: self.core.revision,
                    desired: Some(desired),
                }))
            }
            Some(twin_request::Request::SetChain(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let spec = ChainSpec::from(&r.chain.unwrap_or_default());
                let chain = self
                    .core
                    .set_chain(&spec, r.expected_revision)?
                    .spec
                    .clone();
                self.analyzer = Analyzer::new(&self.core.chain);
                if let Err(e) = self.persist() {
                    return Err(RequestError::Unavailable(format!("chain not stored: {e}")));
                }
                self.publish_chain().await;
                self.publish_event(
                    "chain_changed",
                    format!("processing chain replaced ({} stages)", chain.stage.len()),
                    vec![("stages", chain.stage.len().to_string())],
                )
                .await;
                self.state_changed(myself).await;
                Ok(twin_reply::Reply::SetChain(SetChainResponse {
                    revision: self.core.revision,
                    chain: Some((&chain).into()),
                }))
            }
            Some(twin_request::Request::InstallModel(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let record = proto::ModelRecord {
                    info: Some(proto::ModelInfo {
                        model_id: r.model_id,
                        version: r.version,
                        ..Default::default()
                    }),
                    model: r.model,
                };
                let previous = self.model_label();
                let model = self.check_model(&record).map_err(|e| {
                    RequestError::Domain(DomainError::InvalidArgument(format!(
                        "model rejected: {e}; the twin keeps {previous}"
                    )))
                })?;
                self.ctx
                    .store
                    .save_twin_model(&self.core.id, &record)
                    .map_err(|e| RequestError::Unavailable(format!("model not stored: {e}")))?;
                self.install(&record, model);
                self.core.revision += 1;
                if let Err(e) = self.persist() {
                    return Err(RequestError::Unavailable(format!("model not stored: {e}")));
                }
                if let Err(e) = self.ctx.store.flush().await {
                    return Err(RequestError::Unavailable(format!(
                        "model not made durable: {e}"
                    )));
                }
                let label = self.model_label();
                self.publish_event(
                    "model_installed",
                    format!("anomaly model {label} installed (was {previous})"),
                    vec![
                        ("model_id", self.core.health.model_id.clone()),
                        ("model_version", self.core.health.model_version.to_string()),
                    ],
                )
                .await;
                self.state_changed(myself).await;
                Ok(twin_reply::Reply::InstallModel(
                    proto::InstallModelResponse {
                        health: Some(self.get_twin().health.unwrap_or_default()),
                    },
                ))
            }
            Some(twin_request::Request::QueryHistory(_))
            | Some(twin_request::Request::ImportHistory(_))
            | Some(twin_request::Request::Release(_))
            | Some(twin_request::Request::Contribute(_)) => Err(RequestError::Domain(
                DomainError::InvalidArgument("served by the rpc pump".to_owned()),
            )),
            None => Err(RequestError::Domain(DomainError::InvalidArgument(
                "empty twin request".to_owned(),
            ))),
        }
    }
}

pub(super) async fn rpc_pump(
    actor: ActorRef<TwinMsg>,
    ctx: Arc<NodeContext>,
    id: TwinId,
    kind: AssetKind,
    queryable: crate::ports::Queryable,
    cancel: CancellationToken,
) {
    let key = keys::twin_rpc(&id);
    loop {
        let query = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            q = queryable.rx.recv_async() => match q { Ok(q) => q, Err(_) => break },
        };
        NodeMetrics::add(&ctx.metrics.rpc_served, 1);
        let reply = match TwinRequest::decode(query.payload.clone()) {
            Err(e) => error_reply(&DomainError::InvalidArgument(format!(
                "malformed twin request: {e}"
            ))),
            Ok(TwinRequest {
                request: Some(twin_request::Request::ImportHistory(req)),
                ..
            }) => {
                let reply = match import_history(&ctx, &id, kind, req) {
                    Ok(samples) => match ctx.store.flush().await {
                        Ok(()) => reply(twin_reply::Reply::ImportHistory(
                            proto::ImportHistoryResponse { samples },
                        )),
                        Err(e) => coded_error(
                            proto::ErrorCode::Unavailable,
                            format!("history of {id} not made durable: {e}"),
                        ),
                    },
                    Err(e) => error_reply(&e),
                };
                send_reply(query, &key, &reply).await;
                continue;
            }
            Ok(TwinRequest {
                request: Some(twin_request::Request::Release(r)),
                caller,
            }) => {
                let fut = super::release::serve_release(
                    ctx.clone(),
                    actor.clone(),
                    id.clone(),
                    kind,
                    r,
                    caller,
                );
                reply_later(&ctx, query, key.clone(), fut);
                continue;
            }
            Ok(TwinRequest {
                request: Some(twin_request::Request::Contribute(r)),
                ..
            }) => {
                let fut = super::release::serve_contribute(
                    ctx.clone(),
                    actor.clone(),
                    id.clone(),
                    kind,
                    r,
                );
                reply_later(&ctx, query, key.clone(), fut);
                continue;
            }
            Ok(TwinRequest {
                request: Some(twin_request::Request::QueryHistory(h)),
                caller,
            }) => {
                // Scans can be long: serve them off the actor and off the async workers.
                let (ctx2, id2, actor2) = (ctx.clone(), id.clone(), actor.clone());
                let fut = async move {
                    // Off the site (or below data_operator), raw history of protected
                    // signals and their features is never served.
                    if !privacy::sees_raw(caller.as_ref(), id2.site()) {
                        match super::release::policy_of(&ctx2, &actor2, &id2, kind).await {
                            Ok(p) => {
                                let site = id2.site();
                                if let Err(why) =
                                    p.offsite_history(site, &h.signal, h.bucket_ns, h.aggregation())
                                {
                                    return error_reply(&DomainError::PermissionDenied(why));
                                }
                            }
                            Err(e) => return reply(twin_reply::Reply::Error(e)),
                        }
                    }
                    match tokio::task::spawn_blocking(move || query_history(&ctx2, &id2, h)).await {
                        Ok(r) => r,
                        Err(e) => error_reply(&DomainError::InvalidArgument(format!(
                            "history query failed: {e}"
                        ))),
                    }
                };
                reply_later(&ctx, query, key.clone(), fut);
                continue;
            }
            Ok(req) => match actor
                .call(
                    |tx| TwinMsg::Request(req, tx),
                    Some(ctx.twin_config.call_timeout),
                )
                .await
            {
                Ok(ractor::rpc::CallResult::Success(r)) => r,
                _ => coded_error(
                    proto::ErrorCode::Unavailable,
                    format!("twin {id} is restarting"),
                ),
            },
        };
        send_reply(query, &key, &reply).await;
    }
}

/// Answers `query` with what `reply` computes, off the RPC pump (releases can take a
/// while: history reads, set coordination).
pub(super) fn reply_later(
    ctx: &NodeContext,
    query: crate::ports::Query,
    key: String,
    reply: impl std::future::Future<Output = TwinReply> + Send + 'static,
) {
    ctx.tasks.spawn(async move {
        let reply = reply.await;
        send_reply(query, &key, &reply).await;
    });
}

pub(super) async fn send_reply(query: crate::ports::Query, key: &str, reply: &TwinReply) {
    query
        .reply(
            key,
            Bytes::from(reply.encode_to_vec()),
            encoding::TWIN_REPLY,
        )
        .await;
}

pub(super) fn error_reply(e: &DomainError) -> TwinReply {
    reply(twin_reply::Reply::Error(e.into()))
}

pub(super) fn reply(r: twin_reply::Reply) -> TwinReply {
    TwinReply { reply: Some(r) }
}

/// An error reply for failures that are not the caller's (storage, restarts).
pub(super) fn coded_error(code: proto::ErrorCode, message: String) -> TwinReply {
    reply(twin_reply::Reply::Error(proto::Error {
        code: code as i32,
        message,
    }))
}

pub(super) fn query_history(
    ctx: &NodeContext,
    id: &TwinId,
    h: proto::QueryHistoryRequest,
) -> TwinReply {
    match twinmesh_twins::history::validate_query(id, &h) {
        Err(e) => error_reply(&e),
        Ok(agg) => {
            match ctx
                .store
                .query_history(id, &h.signal, h.start_ns, h.end_ns, h.bucket_ns, agg)
            {
                Ok(buckets) => reply(twin_reply::Reply::QueryHistory(
                    proto::QueryHistoryResponse { buckets },
                )),
                Err(e) => coded_error(proto::ErrorCode::Internal, format!("history of {id}: {e}")),
            }
        }
    }
}

/// Stores imported samples as history, keyed by time (seq 0), so a re-run overwrites
/// the same entries instead of adding new ones.
fn import_history(
    ctx: &NodeContext,
    id: &TwinId,
    kind: AssetKind,
    req: proto::ImportHistoryRequest,
) -> std::result::Result<u64, DomainError> {
    twinmesh_twins::history::validate_import(id, kind, &req)?;
    let n = req.samples.len() as u64;
    let frame = StoredFrame {
        signal: req.signal,
        seq: 0,
        start_ns: req.start_ns,
        sample_period_ns: req.sample_period_ns,
        samples: req.samples,
        scale: 0.0,
    };
    ctx.store
        .append_frames(id, &[frame])
        .map_err(|e| DomainError::InvalidArgument(format!("import not stored: {e}")))?;
    Ok(n)
}
