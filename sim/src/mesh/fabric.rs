//! An in-memory [`Fabric`] with the Zenoh semantics the actors rely on — key
//! expressions with `*` and `**`, pub/sub with per-link FIFO order, queries that end when
//! every replier is done, liveliness tokens with history — plus the faults a real network
//! has: seeded delays, partitions (liveliness loss after the lease) and node kills
//! (immediate loss). Everything runs on tokio's clock, so with a paused runtime a whole
//! mesh runs deterministically in virtual time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use zenoh::key_expr::KeyExpr;

use twinmesh_actors::ports::{
    Fabric, Guard, Qos, Query, Queryable, Reply, Responder, Sample, SampleKind, Subscription,
};
use twinmesh_actors::{Error, Result};

/// A key expression as Zenoh reads it: canonical form required (as a Zenoh session
/// refuses anything else), matched with Zenoh's own `intersects`, so the simulation
/// matches exactly what Zenoh matches.
fn key_expr(s: &str) -> Result<KeyExpr<'static>> {
    KeyExpr::try_from(s.to_owned()).map_err(|e| Error::fabric(format!("key expression {s:?}: {e}")))
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Delivery delay, uniformly drawn per message (order per link is kept).
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// After a partition, how long until each side sees the other's tokens go.
    pub lease: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            min_delay: Duration::from_micros(100),
            max_delay: Duration::from_millis(5),
            lease: Duration::from_secs(2),
        }
    }
}

struct Sub {
    node: String,
    keyexpr: KeyExpr<'static>,
    tx: flume::Sender<Sample>,
    dropped: Arc<AtomicU64>,
}

struct Qbl {
    node: String,
    keyexpr: KeyExpr<'static>,
    tx: flume::Sender<Query>,
}

struct Token {
    node: String,
    key: KeyExpr<'static>,
}

struct LiveSub {
    node: String,
    keyexpr: KeyExpr<'static>,
    tx: flume::Sender<Sample>,
    seen: BTreeSet<u64>,
}

#[derive(Default)]
struct NetState {
    next_id: u64,
    subs: BTreeMap<u64, Sub>,
    queryables: BTreeMap<u64, Qbl>,
    tokens: BTreeMap<u64, Token>,
    live: BTreeMap<u64, LiveSub>,
    down: BTreeSet<String>,
    cuts: BTreeSet<(String, String)>,
    last_delivery: BTreeMap<(String, String), Instant>,
}

impl NetState {
    fn reachable(&self, a: &str, b: &str) -> bool {
        !self.down.contains(a) && !self.down.contains(b) && !self.cuts.contains(&pair(a, b))
    }

    /// Tokens each liveliness subscriber should see now; sends the differences.
    fn refresh_liveliness(&mut self, only: Option<u64>) {
        let visible: Vec<(u64, BTreeSet<u64>)> = self
            .live
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == **id))
            .map(|(id, l)| {
                let set = self
                    .tokens
                    .iter()
                    .filter(|(_, t)| {
                        l.keyexpr.intersects(&t.key) && self.reachable(&l.node, &t.node)
                    })
                    .map(|(tid, _)| *tid)
                    .collect();
                (*id, set)
            })
            .collect();
        for (id, now) in visible {
            let keys: BTreeMap<u64, String> = self
                .tokens
                .iter()
                .map(|(k, t)| (*k, t.key.to_string()))
                .collect();
            let l = self.live.get_mut(&id).expect("listed");
            for gone in l.seen.difference(&now) {
                let key = keys.get(gone).cloned().unwrap_or_default();
                let _ = l.tx.send(Sample {
                    key,
                    payload: Bytes::new(),
                    kind: SampleKind::Delete,
                    attachment: None,
                });
            }
            for new in now.difference(&l.seen) {
                let _ = l.tx.send(Sample {
                    key: keys[new].clone(),
                    payload: Bytes::new(),
                    kind: SampleKind::Put,
                    attachment: None,
                });
            }
            l.seen = now;
        }
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

/// The shared medium of one simulated mesh.
pub struct Network {
    state: Mutex<NetState>,
    rng: Mutex<ChaCha8Rng>,
    cfg: NetConfig,
    tasks: TaskTracker,
    /// Nodes that are never cut off or down (test observers).
    always: Mutex<BTreeSet<String>>,
    // Removed tokens keep their key until every subscriber has been told.
    tombstones: Mutex<BTreeMap<u64, String>>,
}

impl Network {
    pub fn new(seed: u64, cfg: NetConfig) -> Arc<Network> {
        Arc::new(Network {
            state: Mutex::new(NetState::default()),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            cfg,
            tasks: TaskTracker::new(),
            always: Mutex::new(BTreeSet::new()),
            tombstones: Mutex::new(BTreeMap::new()),
        })
    }

    /// The fabric of one node.
    pub fn fabric(self: &Arc<Self>, node: &str) -> SimFabric {
        SimFabric {
            net: self.clone(),
            node: node.to_owned(),
        }
    }

    /// An observer that is never partitioned.
    pub fn observer(self: &Arc<Self>, node: &str) -> SimFabric {
        self.always.lock().expect("net").insert(node.to_owned());
        self.fabric(node)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().expect("network lock")
    }

    /// `kill -9`: the node's links close at once.
    pub fn kill(&self, node: &str) {
        let mut st = self.lock();
        st.down.insert(node.to_owned());
        // Its declarations die with it.
        st.subs.retain(|_, s| s.node != node);
        st.queryables.retain(|_, q| q.node != node);
        st.live.retain(|_, l| l.node != node);
        let dead: Vec<u64> = st
            .tokens
            .iter()
            .filter(|(_, t)| t.node == node)
            .map(|(id, _)| *id)
            .collect();
        self.remove_tokens(&mut st, &dead);
    }

    pub fn revive(&self, node: &str) {
        self.lock().down.remove(node);
    }

    /// Cuts the link between two nodes; each side loses the other's tokens after the lease.
    pub fn cut(self: &Arc<Self>, a: &str, b: &str) {
        if self.always.lock().expect("net").contains(a)
            || self.always.lock().expect("net").contains(b)
        {
            return;
        }
        self.lock().cuts.insert(pair(a, b));
        let net = self.clone();
        let lease = self.cfg.lease;
        self.tasks.spawn(async move {
            tokio::time::sleep(lease).await;
            net.lock().refresh_liveliness(None);
        });
    }

    pub fn heal(&self, a: &str, b: &str) {
        let mut st = self.lock();
        st.cuts.remove(&pair(a, b));
        st.refresh_liveliness(None);
    }

    pub fn heal_all(&self) {
        let mut st = self.lock();
        st.cuts.clear();
        st.refresh_liveliness(None);
    }

    fn remove_tokens(&self, st: &mut NetState, ids: &[u64]) {
        let mut tomb = self.tombstones.lock().expect("net");
        for id in ids {
            if let Some(t) = st.tokens.remove(id) {
                tomb.insert(*id, t.key.to_string());
            }
        }
        // Tell subscribers (keys of removed tokens come from the tombstones).
        let keys: BTreeMap<u64, String> = tomb.clone();
        drop(tomb);
        for l in st.live.values_mut() {
            for id in ids {
                if l.seen.remove(id) {
                    let _ = l.tx.send(Sample {
                        key: keys[id].clone(),
                        payload: Bytes::new(),
                        kind: SampleKind::Delete,
                        attachment: None,
                    });
                }
            }
        }
    }

    fn delay(&self) -> Duration {
        let (lo, hi) = (self.cfg.min_delay, self.cfg.max_delay);
        if hi <= lo {
            return lo;
        }
        let us = self
            .rng
            .lock()
            .expect("rng")
            .random_range(lo.as_micros() as u64..=hi.as_micros() as u64);
        Duration::from_micros(us)
    }

    /// When a message sent now from `a` reaches `b` (FIFO per link).
    fn arrival(&self, st: &mut NetState, a: &str, b: &str) -> Instant {
        let at = Instant::now() + self.delay();
        let last = st
            .last_delivery
            .entry((a.to_owned(), b.to_owned()))
            .or_insert(at);
        let at = at.max(*last);
        *last = at;
        at
    }

    /// Runs `deliver` at `at` if `a` can still reach `b` then.
    fn send(
        self: &Arc<Self>,
        a: String,
        b: String,
        at: Instant,
        deliver: impl FnOnce() + Send + 'static,
    ) {
        let net = self.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep_until(at).await;
            if net.lock().reachable(&a, &b) {
                deliver();
            }
        });
    }

    pub async fn shutdown(&self) {
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// One node's view of the [`Network`].
#[derive(Clone)]
pub struct SimFabric {
    net: Arc<Network>,
    node: String,
}

struct Declared {
    net: Arc<Network>,
    id: u64,
    kind: u8,
}

impl Drop for Declared {
    fn drop(&mut self) {
        let mut st = self.net.lock();
        match self.kind {
            0 => {
                st.subs.remove(&self.id);
            }
            1 => {
                st.queryables.remove(&self.id);
            }
            2 => {
                self.net.remove_tokens(&mut st, &[self.id]);
            }
            _ => {
                st.live.remove(&self.id);
            }
        }
    }
}

struct SimResponder {
    net: Arc<Network>,
    from: String,
    to: String,
    replies: tokio::sync::mpsc::UnboundedSender<Reply>,
}

impl Responder for SimResponder {
    fn reply(self: Box<Self>, key: &str, payload: Bytes, _encoding: &'static str) {
        self.reply_many(vec![(key.to_owned(), payload)], "")
    }

    fn reply_many(self: Box<Self>, replies: Vec<(String, Bytes)>, _encoding: &'static str) {
        let at = {
            let mut st = self.net.lock();
            self.net.arrival(&mut st, &self.from, &self.to)
        };
        let tx = self.replies.clone();
        self.net
            .send(self.from.clone(), self.to.clone(), at, move || {
                for (key, payload) in replies {
                    let _ = tx.send(Reply { key, payload });
                }
            });
    }
}

#[async_trait]
impl Fabric for SimFabric {
    async fn publish(
        &self,
        key: &str,
        payload: Bytes,
        _encoding: &'static str,
        _qos: Qos,
    ) -> Result<()> {
        let key_expr = key_expr(key)?;
        let mut st = self.net.lock();
        let targets: Vec<(String, flume::Sender<Sample>, Arc<AtomicU64>)> = st
            .subs
            .values()
            .filter(|s| s.keyexpr.intersects(&key_expr))
            .map(|s| (s.node.clone(), s.tx.clone(), s.dropped.clone()))
            .collect();
        for (node, tx, dropped) in targets {
            if !st.reachable(&self.node, &node) {
                continue;
            }
            let at = self.net.arrival(&mut st, &self.node, &node);
            let sample = Sample {
                key: key.to_owned(),
                payload: payload.clone(),
                kind: SampleKind::Put,
                attachment: None,
            };
            self.net.send(self.node.clone(), node, at, move || {
                if tx.try_send(sample).is_err() {
                    dropped.fetch_add(1, Relaxed);
                }
            });
        }
        Ok(())
    }

    async fn subscribe(&self, keyexpr: &str, capacity: usize) -> Result<Subscription> {
        let keyexpr = key_expr(keyexpr)?;
        let (tx, rx) = flume::bounded(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut st = self.net.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.subs.insert(
            id,
            Sub {
                node: self.node.clone(),
                keyexpr,
                tx,
                dropped: dropped.clone(),
            },
        );
        Ok(Subscription {
            rx,
            dropped,
            guard: Box::new(Declared {
                net: self.net.clone(),
                id,
                kind: 0,
            }),
        })
    }

    async fn queryable(&self, keyexpr: &str, capacity: usize) -> Result<Queryable> {
        let keyexpr = key_expr(keyexpr)?;
        let (tx, rx) = flume::bounded(capacity);
        let mut st = self.net.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.queryables.insert(
            id,
            Qbl {
                node: self.node.clone(),
                keyexpr,
                tx,
            },
        );
        Ok(Queryable {
            rx,
            guard: Box::new(Declared {
                net: self.net.clone(),
                id,
                kind: 1,
            }),
        })
    }

    async fn query(
        &self,
        keyexpr: &str,
        payload: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> Result<Vec<Reply>> {
        let asked = key_expr(keyexpr)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        {
            let mut st = self.net.lock();
            let targets: Vec<(String, flume::Sender<Query>)> = st
                .queryables
                .values()
                .filter(|q| q.keyexpr.intersects(&asked))
                .map(|q| (q.node.clone(), q.tx.clone()))
                .collect();
            for (node, qtx) in targets {
                if !st.reachable(&self.node, &node) {
                    continue;
                }
                let at = self.net.arrival(&mut st, &self.node, &node);
                let query = Query {
                    key: keyexpr.to_owned(),
                    payload: payload.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                    attachment: None,
                    responder: Box::new(SimResponder {
                        net: self.net.clone(),
                        from: node.clone(),
                        to: self.node.clone(),
                        replies: tx.clone(),
                    }),
                };
                self.net.send(self.node.clone(), node, at, move || {
                    let _ = qtx.try_send(query);
                });
            }
        }
        drop(tx);
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        // Until every replier is done, or the deadline passes.
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            out.push(r);
        }
        Ok(out)
    }

    async fn liveliness_token(&self, key: &str) -> Result<Guard> {
        let key = key_expr(key)?;
        let mut st = self.net.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.tokens.insert(
            id,
            Token {
                node: self.node.clone(),
                key,
            },
        );
        st.refresh_liveliness(None);
        Ok(Box::new(Declared {
            net: self.net.clone(),
            id,
            kind: 2,
        }))
    }

    async fn liveliness_subscribe(&self, keyexpr: &str) -> Result<Subscription> {
        let keyexpr = key_expr(keyexpr)?;
        let (tx, rx) = flume::unbounded();
        let mut st = self.net.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.live.insert(
            id,
            LiveSub {
                node: self.node.clone(),
                keyexpr,
                tx,
                seen: BTreeSet::new(),
            },
        );
        st.refresh_liveliness(Some(id));
        Ok(Subscription {
            rx,
            dropped: Arc::new(AtomicU64::new(0)),
            guard: Box::new(Declared {
                net: self.net.clone(),
                id,
                kind: 3,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zenoh's own matching, as the fabric applies it.
    fn intersects(a: &str, b: &str) -> bool {
        key_expr(a).unwrap().intersects(&key_expr(b).unwrap())
    }

    #[test]
    fn key_expressions() {
        assert!(intersects(
            "twinmesh/telemetry/s/a/*",
            "twinmesh/telemetry/s/a/power"
        ));
        assert!(!intersects(
            "twinmesh/telemetry/s/a/*",
            "twinmesh/telemetry/s/a/power/x"
        ));
        assert!(intersects(
            "twinmesh/placement/**",
            "twinmesh/placement/s/a"
        ));
        assert!(intersects("twinmesh/placement/**", "twinmesh/placement"));
        assert!(intersects(
            "twinmesh/nodes/*/info",
            "twinmesh/nodes/edge/info"
        ));
        assert!(intersects("twinmesh/nodes/*/info", "twinmesh/nodes/**"));
        assert!(!intersects("twinmesh/nodes/*", "twinmesh/nodes/edge/info"));
        assert!(intersects("a/**/c", "a/b/x/c"));
        assert!(!intersects("a/**/c", "a/b/x/d"));
    }

    /// Which of the subscriptions a publication on `key` reaches.
    async fn reached(net: &Arc<Network>, subs: &[(&str, &Subscription)], key: &str) -> Vec<String> {
        net.fabric("pub")
            .publish(key, Bytes::from_static(b"x"), "", Qos::Reliable)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        subs.iter()
            .filter(|(_, s)| s.rx.drain().any(|m| m.key == key))
            .map(|(name, _)| name.to_string())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_fabric_matches_as_zenoh_does() {
        let net = Network::new(1, NetConfig::default());
        let f = net.fabric("sub");
        let one = f.subscribe("twinmesh/telemetry/*/power", 16).await.unwrap();
        let any = f.subscribe("twinmesh/**", 16).await.unwrap();
        let mid = f.subscribe("twinmesh/**/info", 16).await.unwrap();
        let exact = f.subscribe("twinmesh/nodes/e1/info", 16).await.unwrap();
        let subs = [
            ("one", &one),
            ("any", &any),
            ("mid", &mid),
            ("exact", &exact),
        ];
        assert_eq!(
            reached(&net, &subs, "twinmesh/telemetry/s-a/power").await,
            ["one", "any"]
        );
        // `*` is one chunk, never zero or two.
        assert_eq!(
            reached(&net, &subs, "twinmesh/telemetry/s/a/power").await,
            ["any"]
        );
        assert_eq!(
            reached(&net, &subs, "twinmesh/telemetry/power").await,
            ["any"]
        );
        // `**` is zero or more chunks.
        assert_eq!(reached(&net, &subs, "twinmesh/info").await, ["any", "mid"]);
        assert_eq!(
            reached(&net, &subs, "twinmesh/nodes/e1/info").await,
            ["any", "mid", "exact"]
        );
        assert!(reached(&net, &subs, "other/nodes/e1/info").await.is_empty());
        assert!(reached(&net, &subs, "twinmesh/nodes/e1/info/x").await == ["any"]);
        // Zenoh refuses what is not a canonical key expression; so does the fabric.
        for bad in ["twinmesh/**/**", "twinmesh//a", "twinmesh/a/", "a/$*b/**/*"] {
            assert!(f.subscribe(bad, 1).await.is_err(), "{bad}");
        }
        assert!(f
            .publish("twinmesh/a#b", Bytes::new(), "", Qos::Reliable)
            .await
            .is_err());
        // Queries: a wildcard query reaches the queryables it intersects, not the others.
        let q = net.fabric("q");
        let placement = q.queryable("twinmesh/placement/*/*", 4).await.unwrap();
        let other = q.queryable("twinmesh/models/**", 4).await.unwrap();
        let asker = net.fabric("ask");
        let ask = tokio::spawn(async move {
            asker
                .query("twinmesh/placement/**", None, Duration::from_millis(100))
                .await
        });
        let got = tokio::time::timeout(Duration::from_secs(1), placement.rx.recv_async())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.key, "twinmesh/placement/**");
        drop(got);
        assert!(ask.await.unwrap().unwrap().is_empty());
        assert!(other.rx.is_empty());
        net.shutdown().await;
    }
}
