//! `Router`: node-level dispatch on edge nodes. Three declarations per node — a
//! subscription to its site's telemetry, a queryable for its site's twin RPCs and a
//! subscription to its site's delivery reports — replace three per twin; frames, calls
//! and reports are handed to the twin hosted here by its id. A dormant (passivated)
//! twin's frames and calls wake it and wait here, bounded, until it has started and
//! registered; then they are handed over, so callers never see that it was asleep.
//!
//! Why: Zenoh matches every publication of a session against each subscriber of that
//! session in turn, so with per-twin declarations every state or ack a twin published
//! cost time proportional to the number of twins on the node; a node stalled at a few
//! thousand twins. Cloud nodes keep per-twin declarations: they host twins of every
//! site, and a wildcard over all sites would bring other sites' raw telemetry to them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use twinmesh_twins::proto::TwinReply;
use twinmesh_twins::TwinId;

use crate::context::NodeContext;
use crate::metrics::NodeMetrics;
use crate::ports::{Guard, Query, QueryCallback, Queryable, Sample, SampleCallback, Subscription};
use crate::twin::ReplyCache;
use crate::wire::Wire;

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
    /// The twin's last `GetTwin` answers, served from here.
    cache: Arc<ReplyCache>,
    /// Starts the twin's task when something arrives for it.
    kick: Arc<Kick>,
}

/// What a registered twin receives; dropping `telemetry` (its guard) unregisters it.
pub struct TwinRoutes {
    pub telemetry: Subscription,
    pub rpc: Queryable,
    pub delivered: Subscription,
    /// The twin's read cache, which the router answers repeated `GetTwin`s from.
    pub cache: Arc<ReplyCache>,
    /// The twin sets how its task starts; the router kicks it on every arrival.
    pub kick: Arc<Kick>,
}

type Start = Box<dyn Fn(Arc<Kick>) + Send + Sync>;

/// Starts a twin's task when input arrives and none runs, so an idle twin holds no task.
/// The task, once its inputs are empty and nothing is in flight, clears `running` and
/// looks at its inputs once more: an arrival in between either finds `running` clear
/// and starts a task, or is seen by the task, which takes `running` back and goes on.
#[derive(Default)]
pub struct Kick {
    running: AtomicBool,
    start: OnceLock<Start>,
}

impl Kick {
    /// Sets how the task starts (once; later calls are ignored).
    pub fn set_start(&self, start: Start) {
        let _ = self.start.set(start);
    }

    /// Something arrived: starts the task unless it runs (or cannot start yet: the
    /// twin kicks itself once it has set how).
    pub fn kick(self: &Arc<Self>) {
        if let Some(start) = self.start.get() {
            if !self.running.swap(true, SeqCst) {
                start(self.clone());
            }
        }
    }

    /// The task has nothing to do. True when it should go on: `pending` (its inputs)
    /// shows an arrival and no other task was started for it.
    pub fn idle(&self, pending: impl Fn() -> bool) -> bool {
        self.running.store(false, SeqCst);
        pending() && !self.running.swap(true, SeqCst)
    }
}

type Waker = Box<dyn Fn(TwinId) + Send + Sync>;

/// Most frames and calls kept for one waking twin; beyond, frames are dropped (the
/// gateway re-sends) and calls too (callers retry).
const WAKING_FRAMES: usize = 256;
const WAKING_CALLS: usize = 64;

/// A twin hosted here without an actor.
enum Asleep {
    /// Passivated: the next frame or call wakes it.
    Dormant,
    /// Woken: starting; what arrives meanwhile waits for its registration.
    Waking {
        frames: Vec<Sample>,
        calls: Vec<Query>,
    },
}

#[derive(Default)]
pub struct Router {
    active: AtomicBool,
    /// Node-wide declarations held by callback subscriptions (the others live in their
    /// dispatch tasks).
    guards: Mutex<Vec<Guard>>,
    next_generation: AtomicU64,
    /// By `{site}/{asset}`, so a key's slice finds its twin without allocating.
    routes: RwLock<HashMap<String, Routes>>,
    /// Twins hosted here without an actor, by `{site}/{asset}`. Lock order: `asleep`,
    /// then `routes`.
    asleep: Mutex<HashMap<String, Asleep>>,
    /// Starts a dormant twin (set by the node supervisor).
    waker: RwLock<Option<Waker>>,
    /// The node's counters (set on start).
    metrics: OnceLock<Arc<NodeMetrics>>,
    /// What a cached answer's caller is checked with (set on start), and the clock its
    /// context's expiry is read on.
    trust: OnceLock<(Arc<crate::trust::Trust>, crate::ports::SharedClock)>,
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
        let _ = self.metrics.set(ctx.metrics.clone());
        let _ = self.trust.set((ctx.trust.clone(), ctx.clock.clone()));
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
                    ctx.spawn_until_cancelled(self.clone().dispatch_samples(
                        ctx.clone(),
                        sub,
                        section,
                    ));
                }
            }
        }
        let keyexpr = format!("twinmesh/rpc/twins/{site}/*");
        let router = Arc::downgrade(self);
        let callback: QueryCallback = Box::new(move |query| {
            if let Some(r) = router.upgrade() {
                r.route_query(query);
            }
        });
        match ctx.fabric.queryable_callback(&keyexpr, callback).await? {
            Some(guard) => self.guards.lock().expect("guards lock").push(guard),
            None => {
                let rpc = ctx.fabric.queryable(&keyexpr, NODE_QUEUE).await?;
                ctx.spawn_until_cancelled(self.clone().dispatch_queries(rpc));
            }
        }
        // The node stops: withdraw the callback declarations too (work after
        // cancellation, so it watches the token itself).
        let router = self.clone();
        ctx.tasks.spawn(async move {
            cancel.cancelled().await;
            router.guards.lock().expect("guards lock").clear();
        });
        self.active.store(true, Relaxed);
        Ok(())
    }

    pub fn set_waker(&self, waker: Waker) {
        *self.waker.write().expect("waker lock") = Some(waker);
    }

    /// Registers a twin hosted here (replacing an earlier registration of the same
    /// twin) and hands it what arrived while it was waking.
    pub fn register(self: &Arc<Self>, id: &TwinId, capacity: usize) -> TwinRoutes {
        let generation = self.next_generation.fetch_add(1, Relaxed);
        let (telemetry_tx, telemetry_rx) = flume::bounded(capacity);
        let (rpc_tx, rpc_rx) = flume::bounded(capacity);
        let (delivered_tx, delivered_rx) = flume::bounded(64);
        let dropped = Arc::new(AtomicU64::new(0));
        let cache = Arc::new(ReplyCache::default());
        let kick = Arc::new(Kick::default());
        let id = id.to_string();
        let mut asleep = self.asleep.lock().expect("asleep lock");
        if let Some(Asleep::Waking { frames, calls }) = asleep.remove(&id) {
            for frame in frames {
                let _ = telemetry_tx.try_send(frame);
            }
            for call in calls {
                let _ = rpc_tx.try_send(call);
            }
        }
        self.routes.write().expect("routes lock").insert(
            id.clone(),
            Routes {
                generation,
                telemetry: telemetry_tx,
                telemetry_dropped: dropped.clone(),
                rpc: rpc_tx,
                delivered: delivered_tx,
                cache: cache.clone(),
                kick: kick.clone(),
            },
        );
        drop(asleep);
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
            cache,
            kick,
        }
    }

    /// Marks a twin hosted here as dormant (passivated): its next frame or call wakes
    /// it.
    pub fn set_dormant(&self, id: &TwinId) {
        self.asleep
            .lock()
            .expect("asleep lock")
            .insert(id.to_string(), Asleep::Dormant);
    }

    pub fn extend_dormant<'a>(&self, ids: impl IntoIterator<Item = &'a TwinId>) {
        self.asleep
            .lock()
            .expect("asleep lock")
            .extend(ids.into_iter().map(|id| (id.to_string(), Asleep::Dormant)));
    }

    /// Whether the twin is dormant here (not merely waking).
    pub fn is_dormant(&self, id: &TwinId) -> bool {
        matches!(
            self.asleep
                .lock()
                .expect("asleep lock")
                .get(&id.to_string()),
            Some(Asleep::Dormant)
        )
    }

    /// Forgets a twin that is no longer hosted here, with what waited for it (callers
    /// retry elsewhere; the gateway re-sends to the new owner).
    pub fn forget(&self, id: &TwinId) {
        self.asleep
            .lock()
            .expect("asleep lock")
            .remove(&id.to_string());
    }

    /// Something for a twin that is not registered: if it is asleep here, keep it
    /// (bounded) for the twin and wake the twin if it is still dormant; else drop it.
    fn hold(&self, twin: &str, item: Held) {
        let mut asleep = self.asleep.lock().expect("asleep lock");
        // It may have registered since the caller looked.
        if let Some(r) = self.routes.read().expect("routes lock").get(twin) {
            match item {
                Held::Frame(f) => {
                    let _ = r.telemetry.try_send(f);
                }
                Held::Call(q) => {
                    let _ = r.rpc.try_send(q);
                }
            }
            r.kick.kick();
            return;
        }
        let Some(state) = asleep.get_mut(twin) else {
            return;
        };
        let woken = matches!(state, Asleep::Dormant);
        if woken {
            *state = Asleep::Waking {
                frames: Vec::new(),
                calls: Vec::new(),
            };
        }
        if let Asleep::Waking { frames, calls } = state {
            match item {
                Held::Frame(f) if frames.len() < WAKING_FRAMES => frames.push(f),
                Held::Call(q) if calls.len() < WAKING_CALLS => calls.push(q),
                _ => {}
            }
        }
        drop(asleep);
        if woken {
            if let (Some(w), Ok(id)) = (
                self.waker.read().expect("waker lock").as_ref(),
                twin.parse::<TwinId>(),
            ) {
                w(id);
            }
        }
    }

    /// Telemetry frames (section `telemetry`) or delivery reports (section `control`).
    async fn dispatch_samples(
        self: Arc<Self>,
        ctx: Arc<NodeContext>,
        sub: Subscription,
        section: &'static str,
    ) {
        loop {
            let Ok(sample) = sub.rx.recv_async().await else {
                break;
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
                r.kick.kick();
            }
            Some(r) => {
                // Delivery reports are re-sent by the gateway until answered.
                let _ = r.delivered.try_send(sample);
                r.kick.kick();
            }
            None if section == "telemetry" => {
                drop(routes);
                let twin = twin.to_owned();
                self.hold(&twin, Held::Frame(sample));
            }
            // A delivery report for a twin not running here: the gateway re-sends it.
            None => {}
        }
    }

    /// Twin RPCs from a dispatch task (fabrics without callback queryables).
    async fn dispatch_queries(self: Arc<Self>, queryable: Queryable) {
        loop {
            let Ok(query) = queryable.rx.recv_async().await else {
                break;
            };
            self.route_query(query);
        }
    }

    /// A twin RPC: handed to the twin hosted here (a dormant one is woken first), or
    /// dropped — no reply from this node — for twins hosted elsewhere. Never blocks: a
    /// full queue drops the query and the caller retries.
    fn route_query(&self, query: Query) {
        let Some(twin) = twin_of(&query.key, "rpc/twins") else {
            return;
        };
        let routes = self.routes.read().expect("routes lock");
        if let Some(r) = routes.get(twin) {
            // Asked again, unchanged since: answered here, on the fabric's thread.
            let span = tracing::debug_span!("twin.rpc.cached", twin);
            crate::trace::follow(&span, query.attachment.as_ref());
            let answer = span.in_scope(|| {
                self.trust.get().and_then(|(trust, clock)| {
                    let now_ms = clock.now_ns().div_euclid(1_000_000);
                    r.cache.answer(twin, &query.payload, trust, now_ms)
                })
            });
            if let Some(answer) = answer {
                drop(routes);
                if let Some(m) = self.metrics.get() {
                    NodeMetrics::add(&m.rpc_served, 1);
                    NodeMetrics::add(&m.rpc_cached, 1);
                }
                let Query { key, responder, .. } = query;
                responder.reply(&key, answer, TwinReply::ENCODING);
                return;
            }
            let _ = r.rpc.try_send(query);
            r.kick.kick();
            return;
        }
        drop(routes);
        let twin = twin.to_owned();
        self.hold(&twin, Held::Call(query));
    }
}

/// What waits for a waking twin.
enum Held {
    Frame(Sample),
    Call(Query),
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
    use super::*;
    use crate::ports::SampleKind;

    #[test]
    fn a_kick_starts_one_task_and_an_idle_task_hands_over_or_goes_on() {
        let kick = Arc::new(Kick::default());
        let started = Arc::new(AtomicU64::new(0));
        // Before the twin says how to start, a kick starts nothing (it kicks itself).
        kick.kick();
        let s = started.clone();
        kick.set_start(Box::new(move |_| {
            s.fetch_add(1, Relaxed);
        }));
        kick.kick();
        kick.kick();
        assert_eq!(started.load(Relaxed), 1, "one task while one runs");
        // Idle with input waiting: it goes on, and a kick starts no second task.
        assert!(kick.idle(|| true));
        kick.kick();
        assert_eq!(started.load(Relaxed), 1);
        // Idle with nothing waiting: it ends; the next arrival starts a new one.
        assert!(!kick.idle(|| false));
        kick.kick();
        assert_eq!(started.load(Relaxed), 2);
    }

    fn frame(twin: &str, n: u8) -> Sample {
        Sample {
            key: format!("twinmesh/telemetry/{twin}/power"),
            payload: bytes::Bytes::from(vec![n]),
            kind: SampleKind::Put,
            attachment: None,
        }
    }

    #[test]
    fn a_dormant_twin_is_woken_once_and_gets_what_arrived_meanwhile() {
        let router = Arc::new(Router::default());
        let woken = Arc::new(Mutex::new(Vec::new()));
        let w = woken.clone();
        router.set_waker(Box::new(move |id| w.lock().unwrap().push(id.to_string())));
        let id: TwinId = "site-a/pm-01".parse().unwrap();
        router.set_dormant(&id);
        assert!(router.is_dormant(&id));

        router.route_sample(frame("site-a/pm-01", 1), "telemetry");
        router.route_sample(frame("site-a/pm-01", 2), "telemetry");
        // Not hosted here at all: dropped, nobody woken.
        router.route_sample(frame("site-a/pm-02", 9), "telemetry");
        assert_eq!(*woken.lock().unwrap(), vec!["site-a/pm-01".to_owned()]);
        assert!(!router.is_dormant(&id), "waking, no longer dormant");

        let routes = router.register(&id, 8);
        let got: Vec<u8> = routes
            .telemetry
            .rx
            .try_iter()
            .map(|s| s.payload[0])
            .collect();
        assert_eq!(got, vec![1, 2], "held frames handed over in order");
        // Registered: routed straight through from now on.
        router.route_sample(frame("site-a/pm-01", 3), "telemetry");
        assert_eq!(routes.telemetry.rx.try_recv().unwrap().payload[0], 3);

        // Its ingest pump ends (the twin stops): unregistered, frames dropped.
        drop(routes.telemetry);
        router.route_sample(frame("site-a/pm-01", 4), "telemetry");
        assert_eq!(woken.lock().unwrap().len(), 1);
    }

    #[test]
    fn what_waits_for_a_forgotten_twin_is_dropped_and_waiting_is_bounded() {
        let router = Arc::new(Router::default());
        router.set_waker(Box::new(|_| {}));
        let id: TwinId = "site-a/pm-01".parse().unwrap();
        router.set_dormant(&id);
        router.route_sample(frame("site-a/pm-01", 1), "telemetry");
        router.forget(&id);
        let routes = router.register(&id, 8);
        assert!(routes.telemetry.rx.try_recv().is_err());
        drop(routes);

        router.set_dormant(&id);
        for n in 0..(WAKING_FRAMES + 10) {
            router.route_sample(frame("site-a/pm-01", n as u8), "telemetry");
        }
        let routes = router.register(&id, WAKING_FRAMES * 2);
        assert_eq!(routes.telemetry.rx.len(), WAKING_FRAMES);
    }

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
