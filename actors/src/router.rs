//! `Router`: node-level dispatch on edge nodes. Three declarations per node — a
//! subscription to its site's telemetry, a queryable for its site's twin RPCs and a
//! subscription to its site's delivery reports — replace three per twin; frames, calls
//! and reports are handed to the twin hosted here by its id, and wake it when it is
//! dormant (passivated).
//!
//! Why: Zenoh matches every publication of a session against each subscriber of that
//! session in turn, so with per-twin declarations every state or ack a twin published
//! cost time proportional to the number of twins on the node; a node stalled at a few
//! thousand twins. Cloud nodes keep per-twin declarations: they host twins of every
//! site, and a wildcard over all sites would bring other sites' raw telemetry to them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use prost::Message;
use tokio_util::sync::CancellationToken;

use twinmesh_proto::encoding;
use twinmesh_twins::proto::{twin_reply, ErrorCode, TwinReply};
use twinmesh_twins::TwinId;

use crate::context::NodeContext;
use crate::metrics::NodeMetrics;
use crate::ports::{Guard, Query, QueryCallback, Queryable, Sample, SampleCallback, Subscription};

/// Messages the node-wide declarations buffer before dropping (the gateway re-sends
/// dropped frames; callers retry).
const NODE_QUEUE: usize = 16_384;

/// The channels of one registered twin.
struct Routes {
    generation: u64,
    telemetry: flume::Sender<Sample>,
    telemetry_dropped: Arc<AtomicU64>,
    rpc: flume::Sender<Query>,
    delivered: flume::Sender<Sample>,
}

/// What a registered twin receives; dropping `telemetry` (its guard) unregisters it.
pub struct TwinRoutes {
    pub telemetry: Subscription,
    pub rpc: Queryable,
    pub delivered: Subscription,
}

type Waker = Box<dyn Fn(TwinId) + Send + Sync>;

#[derive(Default)]
pub struct Router {
    active: AtomicBool,
    /// Node-wide declarations held by callback subscriptions (the others live in their
    /// dispatch tasks).
    guards: Mutex<Vec<Guard>>,
    next_generation: AtomicU64,
    /// By `{site}/{asset}`, so a key's slice finds its twin without allocating.
    routes: RwLock<HashMap<String, Routes>>,
    /// Twins registered on this node without an actor (passivated), by `{site}/{asset}`.
    dormant: Mutex<HashSet<String>>,
    /// Starts a dormant twin (set by the node supervisor).
    waker: RwLock<Option<Waker>>,
}

/// Unregisters a twin's routes when its ingest pump drops its subscription, unless the
/// twin registered again since (a restarted actor).
struct RouteGuard {
    router: Weak<Router>,
    id: String,
    generation: u64,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Some(router) = self.router.upgrade() {
            let mut routes = router.routes.write().expect("routes lock");
            if routes
                .get(&self.id)
                .is_some_and(|r| r.generation == self.generation)
            {
                routes.remove(&self.id);
            }
        }
    }
}

impl Router {
    /// Whether the node-wide declarations are up (twins then register here instead of
    /// declaring their own).
    pub fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// Declares the node-wide subscriptions and queryable for `ctx.site` and starts the
    /// dispatch tasks, owned by the node's tracker.
    pub async fn start(self: &Arc<Self>, ctx: &Arc<NodeContext>) -> crate::Result<()> {
        let site = &ctx.site;
        let cancel = ctx.cancel.clone();
        for (keyexpr, section) in [
            (format!("twinmesh/telemetry/{site}/*/*"), "telemetry"),
            (format!("twinmesh/control/{site}/*/delivered"), "control"),
        ] {
            // Straight from the fabric's thread into the twin's channel where the fabric
            // allows it (Zenoh); through a dispatch task otherwise (the simulation).
            let router = Arc::downgrade(self);
            let callback: SampleCallback = Box::new(move |sample| {
                if let Some(r) = router.upgrade() {
                    r.route_sample(sample, section);
                }
            });
            match ctx.fabric.subscribe_callback(&keyexpr, callback).await? {
                Some(guard) => self.guards.lock().expect("guards lock").push(guard),
                None => {
                    let sub = ctx.fabric.subscribe(&keyexpr, NODE_QUEUE).await?;
                    ctx.tasks.spawn(self.clone().dispatch_samples(
                        ctx.clone(),
                        sub,
                        section,
                        cancel.clone(),
                    ));
                }
            }
        }
        // Calls for dormant twins are answered "waking" by a task (replying is async).
        let (waking_tx, waking_rx) = flume::bounded(NODE_QUEUE);
        let keyexpr = format!("twinmesh/rpc/twins/{site}/*");
        let router = Arc::downgrade(self);
        let to_wake = waking_tx.clone();
        let callback: QueryCallback = Box::new(move |query| {
            if let Some(r) = router.upgrade() {
                r.route_query(query, &to_wake);
            }
        });
        match ctx.fabric.queryable_callback(&keyexpr, callback).await? {
            Some(guard) => self.guards.lock().expect("guards lock").push(guard),
            None => {
                let rpc = ctx.fabric.queryable(&keyexpr, NODE_QUEUE).await?;
                ctx.tasks.spawn(
                    self.clone()
                        .dispatch_queries(rpc, waking_tx, cancel.clone()),
                );
            }
        }
        ctx.tasks
            .spawn(self.clone().reply_waking(waking_rx, cancel));
        self.active.store(true, Relaxed);
        Ok(())
    }

    pub fn set_waker(&self, waker: Waker) {
        *self.waker.write().expect("waker lock") = Some(waker);
    }

    /// Registers a twin hosted here; replaces an earlier registration of the same twin.
    pub fn register(self: &Arc<Self>, id: &TwinId, capacity: usize) -> TwinRoutes {
        let generation = self.next_generation.fetch_add(1, Relaxed);
        let (telemetry_tx, telemetry_rx) = flume::bounded(capacity);
        let (rpc_tx, rpc_rx) = flume::bounded(capacity);
        let (delivered_tx, delivered_rx) = flume::bounded(64);
        let dropped = Arc::new(AtomicU64::new(0));
        let id = id.to_string();
        self.routes.write().expect("routes lock").insert(
            id.clone(),
            Routes {
                generation,
                telemetry: telemetry_tx,
                telemetry_dropped: dropped.clone(),
                rpc: rpc_tx,
                delivered: delivered_tx,
            },
        );
        TwinRoutes {
            telemetry: Subscription {
                rx: telemetry_rx,
                dropped,
                guard: Box::new(RouteGuard {
                    router: Arc::downgrade(self),
                    id,
                    generation,
                }),
            },
            rpc: Queryable {
                rx: rpc_rx,
                guard: Box::new(()),
            },
            delivered: Subscription {
                rx: delivered_rx,
                dropped: Default::default(),
                guard: Box::new(()),
            },
        }
    }

    /// Marks a twin hosted here as dormant (woken by its next frame or call) or not;
    /// the node supervisor's one record of which twins are asleep.
    pub fn set_dormant(&self, id: &TwinId, dormant: bool) {
        let mut set = self.dormant.lock().expect("dormant lock");
        if dormant {
            set.insert(id.to_string());
        } else {
            set.remove(&id.to_string());
        }
    }

    pub fn extend_dormant<'a>(&self, ids: impl IntoIterator<Item = &'a TwinId>) {
        self.dormant
            .lock()
            .expect("dormant lock")
            .extend(ids.into_iter().map(TwinId::to_string));
    }

    pub fn is_dormant(&self, id: &TwinId) -> bool {
        self.dormant
            .lock()
            .expect("dormant lock")
            .contains(&id.to_string())
    }

    /// Wakes the twin `{site}/{asset}` if it is dormant here; returns whether it was.
    fn wake(&self, twin: &str) -> bool {
        if !self.dormant.lock().expect("dormant lock").contains(twin) {
            return false;
        }
        if let (Some(w), Ok(id)) = (
            self.waker.read().expect("waker lock").as_ref(),
            twin.parse::<TwinId>(),
        ) {
            w(id);
        }
        true
    }

    /// Telemetry frames (section `telemetry`) or delivery reports (section `control`).
    async fn dispatch_samples(
        self: Arc<Self>,
        ctx: Arc<NodeContext>,
        sub: Subscription,
        section: &'static str,
        cancel: CancellationToken,
    ) {
        loop {
            let sample = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                s = sub.rx.recv_async() => match s { Ok(s) => s, Err(_) => break },
            };
            let overflow = sub.dropped.swap(0, Relaxed);
            if overflow > 0 {
                NodeMetrics::add(&ctx.metrics.frames_overflow, overflow);
            }
            self.route_sample(sample, section);
        }
    }

    /// Hands a frame (section `telemetry`) or a delivery report (section `control`) to
    /// its twin, or wakes the twin if it is dormant here. Never blocks: a full channel
    /// drops, counted where the twin's pump reports overflow (the gateway re-sends).
    fn route_sample(&self, sample: Sample, section: &'static str) {
        let Some(twin) = twin_of(&sample.key, section) else {
            return;
        };
        let routes = self.routes.read().expect("routes lock");
        match routes.get(twin) {
            Some(r) if section == "telemetry" => {
                if let Err(flume::TrySendError::Full(_)) = r.telemetry.try_send(sample) {
                    r.telemetry_dropped.fetch_add(1, Relaxed);
                }
            }
            Some(r) => {
                // Delivery reports are re-sent by the gateway until answered.
                let _ = r.delivered.try_send(sample);
            }
            None => {
                // The gateway re-sends the frame until the woken twin acknowledges it.
                drop(routes);
                self.wake(twin);
            }
        }
    }

    /// Twin RPCs from a dispatch task (fabrics without callback queryables).
    async fn dispatch_queries(
        self: Arc<Self>,
        queryable: Queryable,
        waking: flume::Sender<(String, Query)>,
        cancel: CancellationToken,
    ) {
        loop {
            let query = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                q = queryable.rx.recv_async() => match q { Ok(q) => q, Err(_) => break },
            };
            self.route_query(query, &waking);
        }
    }

    /// A twin RPC: handed to the twin hosted here, queued for a "waking" answer if the
    /// twin is dormant here (callers retry within their deadline), or dropped — no
    /// reply from this node — for twins hosted elsewhere. Never blocks: a full queue
    /// drops the query and the caller retries.
    fn route_query(&self, query: Query, waking: &flume::Sender<(String, Query)>) {
        let Some(twin) = twin_of(&query.key, "rpc/twins") else {
            return;
        };
        if let Some(r) = self.routes.read().expect("routes lock").get(twin) {
            let _ = r.rpc.try_send(query);
            return;
        }
        let twin = twin.to_owned();
        if self.wake(&twin) {
            let _ = waking.try_send((twin, query));
        }
    }

    /// Answers calls for dormant twins "unavailable, waking"; withdraws the node-wide
    /// declarations when the node stops.
    async fn reply_waking(
        self: Arc<Self>,
        waking: flume::Receiver<(String, Query)>,
        cancel: CancellationToken,
    ) {
        loop {
            let (twin, query) = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                q = waking.recv_async() => match q { Ok(q) => q, Err(_) => break },
            };
            let reply = TwinReply {
                reply: Some(twin_reply::Reply::Error(twinmesh_twins::proto::Error {
                    code: ErrorCode::Unavailable as i32,
                    message: format!("twin {twin} was dormant and is waking up"),
                })),
            };
            query
                .reply(
                    &format!("twinmesh/rpc/twins/{twin}"),
                    Bytes::from(reply.encode_to_vec()),
                    encoding::TWIN_REPLY,
                )
                .await;
        }
        self.guards.lock().expect("guards lock").clear();
    }
}

/// The `{site}/{asset}` part of `twinmesh/{section}/{site}/{asset}[/...]`, borrowed from
/// the key (routing looks it up without allocating).
fn twin_of<'a>(key: &'a str, section: &str) -> Option<&'a str> {
    let rest = key
        .strip_prefix("twinmesh/")?
        .strip_prefix(section)?
        .strip_prefix('/')?;
    let site_end = rest.find('/')?;
    let end = rest[site_end + 1..]
        .find('/')
        .map_or(rest.len(), |i| site_end + 1 + i);
    (end > site_end + 1).then(|| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::twin_of;

    #[test]
    fn the_twin_part_of_a_key() {
        assert_eq!(
            twin_of("twinmesh/telemetry/site-a/wt-01/power", "telemetry"),
            Some("site-a/wt-01")
        );
        assert_eq!(
            twin_of("twinmesh/control/site-a/wt-01/delivered", "control"),
            Some("site-a/wt-01")
        );
        assert_eq!(
            twin_of("twinmesh/rpc/twins/site-a/wt-01", "rpc/twins"),
            Some("site-a/wt-01")
        );
        assert_eq!(twin_of("twinmesh/rpc/twins/site-a", "rpc/twins"), None);
        assert_eq!(twin_of("twinmesh/rpc/twins/site-a/", "rpc/twins"), None);
        assert_eq!(
            twin_of("twinmesh/telemetry/site-a/wt-01/x", "control"),
            None
        );
    }
}
