//! The twin's task: it feeds the actor from the twin's three inputs — telemetry
//! (decode, validate, batch, hand over, flush, then publish the watermarks), calls (its
//! queryable) and delivery reports — with at most one batch and one call in flight,
//! each independent of the other.
//!
//! On an edge node the task runs only while the twin has input: the router starts it
//! ([`Kick`]) when something arrives for a twin whose task is not running, and the task
//! ends when its inputs are empty and nothing is in flight. An idle twin then holds its
//! channels but no task. On a cloud node (its own declarations) the task runs for the
//! twin's whole life.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use futures::future::BoxFuture;
use ractor::ActorRef;
use tokio_util::sync::CancellationToken;

use twinmesh_twins::{AssetKind, TwinId};

use super::{desired, ingest, rpc, TwinMsg};
use crate::context::NodeContext;
use crate::ports::{Guard, Query, Queryable, Sample, Subscription};
use crate::router::Kick;

/// The channels the twin receives on (cloneable: a task started again takes them
/// again); their declarations (guards) stay with whoever keeps the twin registered.
#[derive(Clone)]
pub(super) struct Feeds {
    telemetry: flume::Receiver<Sample>,
    /// Frames the telemetry channel dropped because it was full.
    dropped: Arc<AtomicU64>,
    rpc: flume::Receiver<Query>,
    delivered: flume::Receiver<Sample>,
}

impl Feeds {
    /// The channels of the twin's three inputs, and their declarations.
    pub(super) fn split(
        telemetry: Subscription,
        rpc: Queryable,
        delivered: Subscription,
    ) -> (Feeds, [Guard; 3]) {
        (
            Feeds {
                telemetry: telemetry.rx,
                dropped: telemetry.dropped,
                rpc: rpc.rx,
                delivered: delivered.rx,
            },
            [telemetry.guard, rpc.guard, delivered.guard],
        )
    }

    /// Whether anything waits in a channel.
    fn pending(&self) -> bool {
        !self.telemetry.is_empty() || !self.rpc.is_empty() || !self.delivered.is_empty()
    }
}

/// The twin's task: what it feeds, from what, until when.
#[derive(Clone)]
pub(super) struct Pump {
    pub actor: ActorRef<TwinMsg>,
    pub ctx: Arc<NodeContext>,
    pub id: TwinId,
    pub kind: AssetKind,
    pub feeds: Feeds,
    /// The twin's token: cancelled when it stops.
    pub cancel: CancellationToken,
}

impl Pump {
    /// Starts the twin's task whenever the router kicks it and it is not running.
    pub(super) fn start_on_kick(self, kick: &Kick) {
        // The router may kick from the fabric's own threads: spawn on the node's runtime.
        let runtime = tokio::runtime::Handle::current();
        kick.set_start(Box::new(move |kick| {
            let ctx = self.ctx.clone();
            ctx.tasks.spawn_on(self.clone().run(Some(kick)), &runtime);
        }));
    }

    /// Feeds the actor until its inputs close, the actor is gone or `cancel`; with
    /// `kick`, also until it has nothing to do.
    pub(super) async fn run(self, kick: Option<Arc<Kick>>) {
        let Pump {
            actor,
            ctx,
            id,
            kind,
            feeds,
            cancel,
        } = self;
        // An input is dropped (`None`) when it closes or the actor is gone.
        let mut telemetry = Some(&feeds.telemetry);
        let mut calls = Some(&feeds.rpc);
        let mut delivered = Some(&feeds.delivered);
        let mut ingesting: Option<BoxFuture<'static, bool>> = None;
        let mut answering: Option<BoxFuture<'static, ()>> = None;
        while telemetry.is_some()
            || calls.is_some()
            || delivered.is_some()
            || ingesting.is_some()
            || answering.is_some()
        {
            let idle = ingesting.is_none() && answering.is_none();
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
                s = recv(telemetry), if ingesting.is_none() && telemetry.is_some() => {
                    match s {
                        Ok(first) => {
                            let (batch, links) = ingest::collect_batch(
                                &ctx,
                                &actor,
                                &id,
                                kind,
                                first,
                                &feeds.telemetry,
                                &feeds.dropped,
                            );
                            if !batch.is_empty() {
                                ingesting = Some(Box::pin(ingest::deliver_batch(
                                    actor.clone(),
                                    ctx.clone(),
                                    id.clone(),
                                    batch,
                                    links,
                                )));
                            }
                        }
                        Err(_) => telemetry = None,
                    }
                }
                q = recv(calls), if answering.is_none() && calls.is_some() => {
                    match q {
                        Ok(query) => answering = rpc::serve_query(&actor, &ctx, &id, kind, query),
                        Err(_) => calls = None,
                    }
                }
                s = recv(delivered), if delivered.is_some() => {
                    let open = s.is_ok_and(|sample| desired::delivery_report(&ctx, &actor, sample));
                    if !open {
                        delivered = None;
                    }
                }
                // Polled last: every input is empty and nothing is in flight.
                () = std::future::ready(()), if idle && kick.is_some() => {
                    if !kick.as_ref().is_some_and(|k| k.idle(|| feeds.pending())) {
                        return;
                    }
                }
            }
        }
        // Cancelled: take nothing new, but finish what is in flight (a batch being made
        // durable and acknowledged, a call being answered).
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
    }
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
