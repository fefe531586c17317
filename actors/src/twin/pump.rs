//! The twin's task: one per twin, owned by the node's tracker. It feeds the actor from
//! the twin's three inputs — telemetry (decode, validate, batch, hand over, flush, then
//! publish the watermarks), calls (its queryable) and delivery reports — with at most
//! one batch and one call in flight, each independent of the other, as three separate
//! tasks did before: an idle twin then costs one small task instead of three.

use std::sync::Arc;

use futures::future::BoxFuture;
use ractor::ActorRef;
use tokio_util::sync::CancellationToken;

use twinmesh_twins::{AssetKind, TwinId};

use super::{desired, ingest, rpc, TwinMsg};
use crate::context::NodeContext;
use crate::ports::{Queryable, Subscription};

/// What the twin receives (its own declarations, or its routes on the node's router).
pub(super) struct Inputs {
    pub telemetry: Subscription,
    pub rpc: Queryable,
    pub delivered: Subscription,
}

pub(super) async fn run(
    actor: ActorRef<TwinMsg>,
    ctx: Arc<NodeContext>,
    id: TwinId,
    kind: AssetKind,
    inputs: Inputs,
    cancel: CancellationToken,
) {
    // An input is dropped (`None`) when it closes or the actor is gone; dropping the
    // telemetry subscription also unregisters the twin from the router.
    let mut telemetry = Some(inputs.telemetry);
    let mut calls = Some(inputs.rpc);
    let mut delivered = Some(inputs.delivered);
    let mut ingesting: Option<BoxFuture<'static, bool>> = None;
    let mut answering: Option<BoxFuture<'static, ()>> = None;
    while telemetry.is_some()
        || calls.is_some()
        || delivered.is_some()
        || ingesting.is_some()
        || answering.is_some()
    {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            keep = in_flight(&mut ingesting), if ingesting.is_some() => {
                ingesting = None;
                if !keep {
                    // The actor stopped or failed: its supervisor restarts it with new
                    // inputs; the gateway re-sends what was not acknowledged.
                    telemetry = None;
                }
            }
            () = in_flight(&mut answering), if answering.is_some() => answering = None,
            s = recv(telemetry.as_ref().map(|s| &s.rx)), if ingesting.is_none() && telemetry.is_some() => {
                match (s, telemetry.as_ref()) {
                    (Ok(first), Some(sub)) => {
                        let batch = ingest::collect_batch(&ctx, &actor, &id, kind, first, sub);
                        if !batch.is_empty() {
                            ingesting = Some(Box::pin(ingest::deliver_batch(
                                actor.clone(),
                                ctx.clone(),
                                id.clone(),
                                batch,
                            )));
                        }
                    }
                    _ => telemetry = None,
                }
            }
            q = recv(calls.as_ref().map(|q| &q.rx)), if answering.is_none() && calls.is_some() => {
                match q {
                    Ok(query) => answering = rpc::serve_query(&actor, &ctx, &id, kind, query),
                    Err(_) => calls = None,
                }
            }
            s = recv(delivered.as_ref().map(|s| &s.rx)), if delivered.is_some() => {
                let open = s.is_ok_and(|sample| desired::delivery_report(&actor, sample));
                if !open {
                    delivered = None;
                }
            }
        }
    }
    // Cancelled: take nothing new, but finish what is in flight (a batch being made
    // durable and acknowledged, a call being answered), as the separate tasks did.
    tokio::join!(
        async {
            if let Some(f) = ingesting {
                f.await;
            }
        },
        async {
            if let Some(f) = answering {
                f.await;
            }
        }
    );
    drop((telemetry, calls, delivered));
}

async fn in_flight<T>(f: &mut Option<BoxFuture<'static, T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn recv<T>(rx: Option<&flume::Receiver<T>>) -> Result<T, flume::RecvError> {
    match rx {
        Some(rx) => rx.recv_async().await,
        None => std::future::pending().await,
    }
}
