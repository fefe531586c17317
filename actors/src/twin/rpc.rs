//! The twin's RPCs: the RPC pump (its queryable) serves history queries and imports and
//! privacy releases off the actor, and hands every other request to the actor, which
//! answers it here.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use prost::Message;
use ractor::{ActorRef, RpcReplyPort};

use twinmesh_twins::chain::ChainSpec;
use twinmesh_twins::privacy;
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, SetChainResponse, SetDesiredResponse, TwinReply, TwinRequest,
};
use twinmesh_twins::{keys, td, AssetKind, Error as DomainError, TwinId};

use super::{TwinActorState, TwinMsg};
use crate::context::NodeContext;
use crate::metrics::NodeMetrics;
use crate::ports::StoredFrame;
use crate::wire::Wire;

/// Why a request failed: the caller's mistake, or a passing state of the twin.
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
            Err(e) => twin_reply::Reply::Error((&e).into()),
        };
        let _ = reply.send(self::reply(out));
    }

    /// Answers a twin request straight to its query.
    pub(super) async fn on_serve(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        req: TwinRequest,
        query: crate::ports::Query,
    ) {
        // A GetTwin's answer is kept for its caller's view.
        let get_twin = matches!(req.request, Some(twin_request::Request::GetTwin(_)))
            .then(|| req.caller.clone());
        let out = match self.handle_request(myself, req).await {
            Ok(r) => r,
            Err(e) => twin_reply::Reply::Error((&e).into()),
        };
        let cacheable = matches!(out, twin_reply::Reply::Twin(_));
        let answer = Bytes::from(self::reply(out).encode_to_vec());
        if let (Some(cache), Some(caller), true) = (&self.cache, get_twin, cacheable) {
            cache.store(&self.core.id, caller.as_ref(), answer.clone());
        }
        query.reply(&keys::twin_rpc(&self.core.id), answer, TwinReply::ENCODING);
    }

    pub(super) async fn handle_request(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        req: TwinRequest,
    ) -> crate::Result<twin_reply::Reply> {
        let mutating = matches!(
            req.request,
            Some(twin_request::Request::SetDesired(_))
                | Some(twin_request::Request::SetChain(_))
                | Some(twin_request::Request::InstallModel(_))
                | Some(twin_request::Request::SetPolicy(_))
        );
        if self.frozen && mutating {
            return Err(crate::Error::unavailable(format!(
                "twin {} is moving",
                self.core.id
            )));
        }
        let caller = req.caller;
        match req.request {
            Some(twin_request::Request::Freeze(r)) => self.freeze(myself, r).await,
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
                    return Err(crate::Error::unavailable(format!(
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
                // Rebuilt from the new chain on the next frame.
                self.analyzer = None;
                if let Err(e) = self.persist() {
                    return Err(crate::Error::unavailable(format!("chain not stored: {e}")));
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
                    crate::Error::Domain(DomainError::InvalidArgument(format!(
                        "model rejected: {e}; the twin keeps {previous}"
                    )))
                })?;
                self.ctx
                    .store
                    .save_twin_model(&self.core.id, &record)
                    .map_err(|e| crate::Error::unavailable(format!("model not stored: {e}")))?;
                self.install(&record, model);
                self.core.revision += 1;
                if let Err(e) = self.persist() {
                    return Err(crate::Error::unavailable(format!("model not stored: {e}")));
                }
                if let Err(e) = self.ctx.store.flush().await {
                    return Err(crate::Error::unavailable(format!(
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
            | Some(twin_request::Request::Contribute(_)) => Err(crate::Error::Domain(
                DomainError::InvalidArgument("served by the rpc pump".to_owned()),
            )),
            None => Err(crate::Error::Domain(DomainError::InvalidArgument(
                "empty twin request".to_owned(),
            ))),
        }
    }
}

/// One call to the twin. Requests the actor answers, and history imports, give the
/// future that answers them (the twin's task runs one at a time, in order); history
/// queries and releases are answered off the task (`None`).
pub(super) fn serve_query(
    actor: &ActorRef<TwinMsg>,
    ctx: &Arc<NodeContext>,
    id: &TwinId,
    kind: AssetKind,
    query: crate::ports::Query,
) -> Option<BoxFuture<'static, ()>> {
    use tracing::Instrument;
    // A child of the caller's span on the node that took the call (traces on).
    let span = tracing::debug_span!("twin.rpc", twin = %id);
    crate::trace::follow(&span, query.attachment.as_ref());
    let answer = span.in_scope(|| serve(actor, ctx, id, kind, query))?;
    Some(Box::pin(answer.instrument(span)))
}

fn serve(
    actor: &ActorRef<TwinMsg>,
    ctx: &Arc<NodeContext>,
    id: &TwinId,
    kind: AssetKind,
    query: crate::ports::Query,
) -> Option<BoxFuture<'static, ()>> {
    NodeMetrics::add(&ctx.metrics.rpc_served, 1);
    let key = keys::twin_rpc(id);
    let mut request = match query.decode::<TwinRequest>() {
        Err(e) => {
            let reply = error_reply(&DomainError::InvalidArgument(format!(
                "malformed twin request: {e}"
            )));
            send_reply(query, &key, &reply);
            return None;
        }
        Ok(r) => r,
    };
    // From here on the caller is what can be believed of it (anonymous, off the site,
    // or as a mesh node vouched for it), and the request needs its least role.
    let tag = ctx.trust.admit(&mut request, id.site(), ctx.now_ms());
    // Every reply to a vouched request is proven for it.
    let query = crate::trust::proving::<TwinReply>(&ctx.trust, query, tag);
    if let Some(r) = &request.request {
        let least = crate::trust::least_role(r);
        let role = privacy::role_of(request.caller.as_ref());
        if role < least {
            let why = match &request.caller {
                None => format!(
                    "an unauthenticated caller (no context vouched for by a mesh node) may \
                     not do this on twin {id} (needs {})",
                    least.as_str()
                ),
                Some(_) => format!(
                    "role {} may not do this on twin {id} (needs {})",
                    role.as_str(),
                    least.as_str()
                ),
            };
            send_reply(
                query,
                &key,
                &error_reply(&DomainError::PermissionDenied(why)),
            );
            return None;
        }
    }
    match request {
        TwinRequest {
            request: Some(twin_request::Request::ImportHistory(req)),
            ..
        } => {
            let (ctx, id) = (ctx.clone(), id.clone());
            Some(Box::pin(async move {
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
                send_reply(query, &key, &reply);
            }))
        }
        TwinRequest {
            request: Some(twin_request::Request::Release(r)),
            caller,
        } => {
            let fut = super::release::serve_release(
                ctx.clone(),
                actor.clone(),
                id.clone(),
                kind,
                r,
                caller,
            );
            reply_later(ctx, query, key, fut);
            None
        }
        TwinRequest {
            request: Some(twin_request::Request::Contribute(r)),
            ..
        } => {
            let fut =
                super::release::serve_contribute(ctx.clone(), actor.clone(), id.clone(), kind, r);
            reply_later(ctx, query, key, fut);
            None
        }
        TwinRequest {
            request: Some(twin_request::Request::QueryHistory(h)),
            caller,
        } => {
            // Scans can be long: serve them off the actor and off the async workers.
            let (ctx2, id2, actor2) = (ctx.clone(), id.clone(), actor.clone());
            let fut = async move {
                // Off the site (or below data_operator), raw history of protected
                // signals and their features is never served.
                // Coarsened signals: whole aligned buckets only (the range shrinks to them).
                let mut h = h;
                if !privacy::sees_raw(caller.as_ref(), id2.site()) {
                    let gate = actor2
                        .call(TwinMsg::Gate, Some(ctx2.twin_config.call_timeout))
                        .await;
                    match gate {
                        Ok(ractor::rpc::CallResult::Success((p, lineage))) => {
                            match p.offsite_history(id2.site(), &lineage, &h) {
                                Ok(q) => h = q,
                                Err(e) => return error_reply(&e),
                            }
                        }
                        _ => {
                            return coded_error(
                                proto::ErrorCode::Unavailable,
                                format!("twin {id2} is restarting"),
                            )
                        }
                    }
                }
                match tokio::task::spawn_blocking(move || query_history(&ctx2, &id2, h)).await {
                    Ok(r) => r,
                    Err(e) => error_reply(&DomainError::InvalidArgument(format!(
                        "history query failed: {e}"
                    ))),
                }
            };
            reply_later(ctx, query, key, fut);
            None
        }
        req => {
            // The actor answers the query itself (one hand-over fewer on the way
            // back); the task waits until it has, so one call is in flight at a time
            // and the rest wait, bounded, in the twin's queue.
            let (done, answered) = tokio::sync::oneshot::channel();
            match actor.cast(TwinMsg::Serve(req, query, done)) {
                Ok(()) => {
                    let call_timeout = ctx.twin_config.call_timeout;
                    Some(Box::pin(async move {
                        // A dropped sender (the actor stopped with the call queued)
                        // drops the query: the caller sees no reply and retries.
                        let _ = tokio::time::timeout(call_timeout, answered).await;
                    }))
                }
                Err(e) => {
                    let reply = coded_error(
                        proto::ErrorCode::Unavailable,
                        format!("twin {id} is restarting"),
                    );
                    if let ractor::MessagingErr::SendErr(TwinMsg::Serve(_, query, _)) = e {
                        send_reply(query, &key, &reply);
                    }
                    None
                }
            }
        }
    }
}

/// Answers `query` with what `reply` computes, off the twin's task (releases can take a
/// while: history reads, set coordination).
pub(super) fn reply_later(
    ctx: &NodeContext,
    query: crate::ports::Query,
    key: String,
    reply: impl std::future::Future<Output = TwinReply> + Send + 'static,
) {
    ctx.tasks.spawn(async move {
        let reply = reply.await;
        send_reply(query, &key, &reply);
    });
}

pub(super) fn send_reply(query: crate::ports::Query, key: &str, reply: &TwinReply) {
    query.reply_with(key, reply);
}

pub(super) fn error_reply(e: &DomainError) -> TwinReply {
    reply(twin_reply::Reply::Error(e.into()))
}

pub(super) fn reply(r: twin_reply::Reply) -> TwinReply {
    TwinReply {
        reply: Some(r),
        proof: None,
    }
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
