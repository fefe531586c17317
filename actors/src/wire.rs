//! The typed wire: every proto message crosses the fabric through these helpers, with
//! the encoding its [`Wire`] impl names, so no caller pairs a message with an encoding
//! string or decodes a payload by hand.
//!
//! - [`TypedFabric`]: publish a message, query with one and read typed replies.
//! - [`Sample::decode`], [`Reply::decode`], [`Query::decode`], [`Query::reply_with`]:
//!   the receiving side.
//! - [`forward`]: the one decode → forward-to-actor loop of a single subscription (a
//!   consumer that must see several subscriptions in a fixed order, as the gateway
//!   does, merges them in one loop instead). A message
//!   on the fabric may come from anyone who can reach it: this is where its sender is
//!   to be authenticated, and where a malformed one is dropped and counted.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ractor::{ActorRef, Message};

pub use twinmesh_proto::Wire;

use crate::context::NodeContext;
use crate::error::{Error, Result};
use crate::ports::{Fabric, Qos, Query, Reply, Sample, Subscription};
use crate::tasks::TaskController;

/// `payload` as an `M` (an error names the message that did not decode).
pub(crate) fn decode<M: Wire>(payload: &Bytes) -> Result<M> {
    M::decode(payload.clone()).map_err(|source| Error::Decode {
        what: M::NAME,
        source,
    })
}

impl Sample {
    /// The sample's payload as an `M` (an error names the message that did not decode).
    pub fn decode<M: Wire>(&self) -> Result<M> {
        decode(&self.payload)
    }
}

impl Reply {
    pub fn decode<M: Wire>(&self) -> Result<M> {
        decode(&self.payload)
    }
}

impl Query {
    /// The query's payload as an `M`.
    pub fn decode<M: Wire>(&self) -> Result<M> {
        decode(&self.payload)
    }

    /// Answers with `message` on `key`.
    pub fn reply_with<M: Wire>(self, key: &str, message: &M) {
        self.responder
            .reply(key, Bytes::from(message.encode_to_vec()), M::ENCODING)
    }

    /// Answers with several messages (each on its own key).
    pub fn reply_all<M: Wire>(self, replies: &[(String, M)]) {
        let replies = replies
            .iter()
            .map(|(k, m)| (k.clone(), Bytes::from(m.encode_to_vec())))
            .collect();
        self.responder.reply_many(replies, M::ENCODING)
    }
}

/// Typed publishing and querying on any [`Fabric`].
#[async_trait]
pub trait TypedFabric: Fabric {
    /// Publishes `message` on `key` with its encoding.
    async fn put<M: Wire>(&self, key: &str, message: &M, qos: Qos) -> Result<()> {
        self.publish(key, Bytes::from(message.encode_to_vec()), M::ENCODING, qos)
            .await
    }

    /// Queries `keyexpr` with `request`; the raw replies, to [`Reply::decode`].
    async fn ask<Q: Wire>(
        &self,
        keyexpr: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<Vec<Reply>> {
        let payload = Bytes::from(request.encode_to_vec());
        self.query(keyexpr, Some((payload, Q::ENCODING)), timeout)
            .await
    }

    /// Queries `keyexpr` with `request`; the first reply that `accept`s (the others are
    /// not waited for).
    async fn ask_first<Q: Wire>(
        &self,
        keyexpr: &str,
        request: &Q,
        timeout: Duration,
        accept: &(dyn for<'r> Fn(&'r Reply) -> bool + Send + Sync),
    ) -> Result<Option<Reply>> {
        let payload = Bytes::from(request.encode_to_vec());
        self.query_first(keyexpr, Some((payload, Q::ENCODING)), timeout, accept)
            .await
    }

    /// Queries `keyexpr` without a payload and keeps the replies that decode as `R`
    /// (a queryable may be anyone's: a malformed reply is dropped).
    async fn get_all<R: Wire>(&self, keyexpr: &str, timeout: Duration) -> Result<Vec<R>> {
        let replies = self.query(keyexpr, None, timeout).await?;
        Ok(replies
            .iter()
            .filter_map(|r| match r.decode::<R>() {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::debug!(key = r.key, "dropped reply: {e}");
                    None
                }
            })
            .collect())
    }
}

impl<F: Fabric + ?Sized> TypedFabric for F {}

/// Hands every sample of `sub` that decodes as `M` to `actor` as `to_msg(key, m)`,
/// until the subscription or the actor ends or `tasks` is cancelled. Malformed samples are logged
/// and counted (`messages_malformed`), never forwarded.
pub fn forward<M, A>(
    tasks: &TaskController,
    ctx: &NodeContext,
    sub: Subscription,
    actor: ActorRef<A>,
    to_msg: impl Fn(&str, M) -> A + Send + 'static,
) where
    M: Wire,
    A: Message,
{
    let metrics = ctx.metrics.clone();
    tasks.spawn_until_cancelled(async move {
        // Own the subscription whole: its guard keeps it declared.
        let sub = sub;
        while let Ok(sample) = sub.rx.recv_async().await {
            match sample.decode::<M>() {
                Ok(m) => {
                    if actor.cast(to_msg(&sample.key, m)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    crate::metrics::NodeMetrics::add(&metrics.messages_malformed, 1);
                    tracing::warn!(key = sample.key, "dropped: {e}");
                }
            }
        }
    });
}
