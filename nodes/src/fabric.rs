//! The real [`Fabric`]: one Zenoh 1.x session per node.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use zenoh::bytes::{Encoding, ZBytes};
use zenoh::pubsub::Publisher;
use zenoh::qos::CongestionControl;
use zenoh::query::{ConsolidationMode, QueryTarget};
use zenoh::sample::SampleKind as ZSampleKind;
use zenoh::{Session, Wait};

use twinmesh_actors::ports::{
    Fabric, Guard, Qos, Query, QueryCallback, Queryable, Reply, Responder, Sample, SampleCallback,
    SampleKind, Subscription,
};
use twinmesh_actors::{Error, Result};

use twinmesh_twins::NodeId;

use crate::config::{NodeConfig, RouterConfig, TlsConfig, ZenohMode};

/// Publishers kept declared (the first keys a node publishes on: its hot telemetry and
/// ack streams); others use `session.put`. Zenoh looks a new declaration's prefix up
/// among the session's declared resources one by one, so each declaration costs time
/// proportional to those already made: 16,384 cached keys made starting a few thousand
/// twins on one node quadratic.
const MAX_CACHED_PUBLISHERS: usize = 1024;

pub struct ZenohFabric {
    session: Session,
    publishers: Mutex<HashMap<String, Arc<Publisher<'static>>>>,
}

fn congestion(qos: Qos) -> CongestionControl {
    match qos {
        Qos::Reliable => CongestionControl::Block,
        Qos::Latest => CongestionControl::Drop,
    }
}

fn to_bytes(z: &ZBytes) -> Bytes {
    Bytes::copy_from_slice(&z.to_bytes())
}

/// Zenoh's thread pools as twinmesh runs them unless the operator sets
/// `ZENOH_RUNTIME` (its RON syntax): receive, transmit, accept and network work handed
/// over to one application pool of two workers. Zenoh's default is five pools (six
/// threads); on a node of a few cores every message then crosses from one pool's thread
/// to another's, and each crossing wakes a sleeping thread. On a 2-vCPU node one pool
/// cuts the Zenoh hop of a twin call by ~40 % and a whole GetTwin by ~25 %, with the
/// same ingest rate (BENCHMARKS.md, issue 19).
pub const ZENOH_RUNTIME: &str = "(rx: (handover: app), tx: (handover: app), acc: (handover: app), net: (handover: app), app: (worker_threads: 2))";

/// Sets `ZENOH_RUNTIME` to [`ZENOH_RUNTIME`] unless it is set. Zenoh reads it once, when
/// its first pool starts: call this at the start of `main`, before any thread exists.
pub fn default_zenoh_runtime() {
    if std::env::var_os("ZENOH_RUNTIME").is_none() {
        std::env::set_var("ZENOH_RUNTIME", ZENOH_RUNTIME);
    }
}

/// What a Zenoh session of twinmesh is made of, for a node or a router alike.
struct SessionSpec<'a> {
    id: &'a NodeId,
    mode: ZenohMode,
    listen: &'a [String],
    connect: &'a [String],
    multicast: bool,
    tls: Option<&'a TlsConfig>,
    acl_file: Option<&'a Path>,
    lease_ms: u64,
}

/// The Zenoh configuration of a node: explicit endpoints, multicast scouting off unless
/// asked, and the liveliness lease of DESIGN §7.
pub fn zenoh_config(cfg: &NodeConfig) -> crate::Result<zenoh::Config> {
    session_config(SessionSpec {
        id: &cfg.id,
        mode: cfg.mode,
        listen: &cfg.listen,
        connect: &cfg.connect,
        multicast: cfg.multicast,
        tls: cfg.tls.as_ref(),
        acl_file: cfg.acl_file.as_deref(),
        lease_ms: cfg.lease_ms,
    })
}

/// The Zenoh configuration of a router process (`twinmesh router`): the same endpoints,
/// TLS, ACL and lease settings as a node's, in router mode.
pub fn router_zenoh_config(cfg: &RouterConfig) -> crate::Result<zenoh::Config> {
    session_config(SessionSpec {
        id: &cfg.id,
        mode: ZenohMode::Router,
        listen: &cfg.listen,
        connect: &cfg.connect,
        multicast: cfg.multicast,
        tls: cfg.tls.as_ref(),
        acl_file: cfg.acl_file.as_deref(),
        lease_ms: cfg.lease_ms,
    })
}

fn session_config(spec: SessionSpec<'_>) -> crate::Result<zenoh::Config> {
    let mut c = zenoh::Config::default();
    let set = |c: &mut zenoh::Config, key: &str, value: String| {
        c.insert_json5(key, &value)
            .map_err(|e| crate::Error::config(format!("zenoh config {key}={value}: {e}")))
    };
    let mode = match spec.mode {
        ZenohMode::Peer => "peer",
        ZenohMode::Client => "client",
        ZenohMode::Router => "router",
    };
    set(&mut c, "mode", format!("{mode:?}"))?;
    set(
        &mut c,
        "listen/endpoints",
        serde_json::to_string(spec.listen)?,
    )?;
    set(
        &mut c,
        "connect/endpoints",
        serde_json::to_string(spec.connect)?,
    )?;
    set(
        &mut c,
        "scouting/multicast/enabled",
        spec.multicast.to_string(),
    )?;
    // A node must start while its peers are down, and keep retrying them in the
    // background (peer default: infinite timeout, no exit on failure).
    if spec.mode != ZenohMode::Client {
        set(&mut c, "connect/exit_on_failure", "false".into())?;
        set(
            &mut c,
            "connect/retry",
            r#"{ period_init_ms: 250, period_max_ms: 2000, period_increase_factor: 2 }"#.into(),
        )?;
    }
    if let Some(tls) = spec.tls {
        let path = |p: &std::path::Path| -> crate::Result<String> {
            if !p.is_file() {
                return Err(crate::Error::config(format!(
                    "tls file {} does not exist",
                    p.display()
                )));
            }
            Ok(serde_json::to_string(&p.display().to_string())?)
        };
        let (ca, cert, key) = (
            path(&tls.ca_file)?,
            path(&tls.cert_file)?,
            path(&tls.key_file)?,
        );
        set(&mut c, "transport/link/tls/root_ca_certificate", ca)?;
        set(
            &mut c,
            "transport/link/tls/listen_certificate",
            cert.clone(),
        )?;
        set(&mut c, "transport/link/tls/listen_private_key", key.clone())?;
        set(&mut c, "transport/link/tls/connect_certificate", cert)?;
        set(&mut c, "transport/link/tls/connect_private_key", key)?;
        // Both ends present a certificate of the site CA.
        set(&mut c, "transport/link/tls/enable_mtls", "true".into())?;
        set(
            &mut c,
            "transport/link/tls/verify_name_on_connect",
            "true".into(),
        )?;
    }
    if spec
        .listen
        .iter()
        .chain(spec.connect)
        .any(|e| e.starts_with("tls/"))
    {
        tracing::warn!(
            "zenoh's tls/ link can stall or misbehave under load in both directions \
             (eclipse-zenoh/zenoh#2557: one rustls session read and written concurrently); \
             quic/ endpoints use the same certificates without that problem"
        );
    }
    if let Some(path) = spec.acl_file {
        let roster = crate::acl::Roster::from_file(path)?;
        if !roster.lists(spec.id) {
            return Err(crate::Error::config(format!(
                "{} is not in the ACL roster {}: the other nodes would refuse it",
                spec.id,
                path.display()
            )));
        }
        set(&mut c, "access_control", roster.zenoh_acl().to_string())?;
    }
    set(&mut c, "transport/link/tx/lease", spec.lease_ms.to_string())?;
    set(&mut c, "transport/link/tx/keep_alive", "4".into())?;
    Ok(c)
}

/// Fails early, with one clear line, when a TCP/TLS (or, for QUIC, UDP) listen address
/// cannot be bound.
pub(crate) fn check_listen_endpoints(endpoints: &[String]) -> crate::Result<()> {
    for ep in endpoints {
        let parsed: zenoh::config::EndPoint = ep
            .parse()
            .map_err(|e| crate::Error::config(format!("invalid zenoh endpoint {ep:?}: {e}")))?;
        let address = parsed.address();
        let addr = address.as_str();
        if addr.ends_with(":0") {
            continue;
        }
        if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
            let bound = if parsed.protocol().as_str() == "quic" {
                std::net::UdpSocket::bind(sock).map(drop)
            } else {
                std::net::TcpListener::bind(sock).map(drop)
            };
            bound.map_err(|e| {
                crate::Error::config(format!("cannot listen on zenoh endpoint {ep}: {e}"))
            })?;
        }
    }
    Ok(())
}

impl ZenohFabric {
    pub async fn open(cfg: &NodeConfig) -> crate::Result<Self> {
        check_listen_endpoints(&cfg.listen)?;
        let config = zenoh_config(cfg)?;
        let session = zenoh::open(config)
            .await
            .map_err(|e| crate::Error::config(format!("cannot open zenoh session: {e}")))?;
        Ok(ZenohFabric {
            session,
            publishers: Mutex::new(HashMap::new()),
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The locators this node listens on (with the ports actually bound).
    pub async fn locators(&self) -> Vec<String> {
        self.session
            .info()
            .locators()
            .await
            .into_iter()
            .map(|l| l.to_string())
            .collect()
    }

    pub async fn close(&self) {
        if let Err(e) = self.session.close().await {
            tracing::warn!("zenoh session close: {e}");
        }
    }

    /// Declares a queryable that hands each query to `callback` on Zenoh's thread.
    async fn declare_query_callback(
        &self,
        keyexpr: &str,
        callback: QueryCallback,
    ) -> Result<Guard> {
        let queryable = self
            .session
            .declare_queryable(keyexpr.to_owned())
            .callback(move |q: zenoh::query::Query| {
                callback(Query {
                    key: q.key_expr().to_string(),
                    payload: q.payload().map(to_bytes).unwrap_or_default(),
                    attachment: q.attachment().map(to_bytes),
                    responder: Box::new(ZenohResponder(q)),
                })
            })
            .await
            .map_err(Error::fabric)?;
        Ok(Box::new(queryable))
    }

    /// Declares a subscriber that hands each sample to `callback` on Zenoh's thread.
    async fn declare_callback(&self, keyexpr: &str, callback: SampleCallback) -> Result<Guard> {
        let subscriber = self
            .session
            .declare_subscriber(keyexpr.to_owned())
            .callback(move |s: zenoh::sample::Sample| {
                callback(Sample {
                    key: s.key_expr().to_string(),
                    payload: to_bytes(s.payload()),
                    kind: SampleKind::Put,
                    attachment: s.attachment().map(to_bytes),
                })
            })
            .await
            .map_err(Error::fabric)?;
        Ok(Box::new(subscriber))
    }

    async fn publisher(
        &self,
        key: &str,
        encoding: &'static str,
        qos: Qos,
    ) -> Result<Option<Arc<Publisher<'static>>>> {
        if let Some(p) = self.publishers.lock().expect("publishers").get(key) {
            return Ok(Some(p.clone()));
        }
        if self.publishers.lock().expect("publishers").len() >= MAX_CACHED_PUBLISHERS {
            return Ok(None);
        }
        let publisher = self
            .session
            .declare_publisher(key.to_owned())
            .encoding(Encoding::from(encoding))
            .congestion_control(congestion(qos))
            .await
            .map_err(Error::fabric)?;
        let publisher = Arc::new(publisher);
        self.publishers
            .lock()
            .expect("publishers")
            .insert(key.to_owned(), publisher.clone());
        Ok(Some(publisher))
    }
}

impl ZenohFabric {
    /// Sends a query to every queryable of `keyexpr`, replies unconsolidated.
    async fn get(
        &self,
        keyexpr: &str,
        payload: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> Result<zenoh::handlers::FifoChannelHandler<zenoh::query::Reply>> {
        let mut get = self
            .session
            .get(keyexpr.to_owned())
            .target(QueryTarget::All)
            .consolidation(ConsolidationMode::None)
            .timeout(timeout);
        if let Some((bytes, encoding)) = payload {
            get = get
                .payload(ZBytes::from(bytes))
                .encoding(Encoding::from(encoding));
        }
        // The caller's trace context, when traces are exported.
        if let Some(tp) = twinmesh_actors::trace::attachment() {
            get = get.attachment(ZBytes::from(tp));
        }
        get.await.map_err(Error::fabric)
    }
}

/// A reply's sample, or `None` (logged) for an error reply.
fn ok_reply(keyexpr: &str, reply: zenoh::query::Reply) -> Option<Reply> {
    match reply.result() {
        Ok(sample) => Some(Reply {
            key: sample.key_expr().to_string(),
            payload: to_bytes(sample.payload()),
        }),
        Err(e) => {
            tracing::debug!(keyexpr, "error reply: {:?}", e.payload().to_bytes());
            None
        }
    }
}

struct ZenohResponder(zenoh::query::Query);

#[async_trait]
impl Responder for ZenohResponder {
    fn reply(self: Box<Self>, key: &str, payload: Bytes, encoding: &'static str) {
        // Zenoh hands the reply to its transmission queue; it does not block here.
        if let Err(e) = self
            .0
            .reply(key.to_owned(), ZBytes::from(payload))
            .encoding(Encoding::from(encoding))
            .wait()
        {
            tracing::debug!(key, "reply not sent: {e}");
        }
    }

    fn reply_many(self: Box<Self>, replies: Vec<(String, Bytes)>, encoding: &'static str) {
        for (key, payload) in replies {
            if let Err(e) = self
                .0
                .reply(key.clone(), ZBytes::from(payload))
                .encoding(Encoding::from(encoding))
                .wait()
            {
                tracing::debug!(key, "reply not sent: {e}");
            }
        }
    }
}

#[async_trait]
impl Fabric for ZenohFabric {
    async fn publish(
        &self,
        key: &str,
        payload: Bytes,
        encoding: &'static str,
        qos: Qos,
    ) -> Result<()> {
        // The publisher's trace context, when traces are exported.
        let trace = twinmesh_actors::trace::attachment();
        match self.publisher(key, encoding, qos).await? {
            Some(p) => match trace {
                None => p.put(ZBytes::from(payload)).await,
                Some(tp) => {
                    p.put(ZBytes::from(payload))
                        .attachment(ZBytes::from(tp))
                        .await
                }
            }
            .map_err(Error::fabric),
            None => {
                let mut put = self
                    .session
                    .put(key.to_owned(), ZBytes::from(payload))
                    .encoding(Encoding::from(encoding))
                    .congestion_control(congestion(qos));
                if let Some(tp) = trace {
                    put = put.attachment(ZBytes::from(tp));
                }
                put.await.map_err(Error::fabric)
            }
        }
    }

    async fn subscribe(&self, keyexpr: &str, capacity: usize) -> Result<Subscription> {
        let (tx, rx) = flume::bounded(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let key = keyexpr.to_owned();
        // Never block Zenoh's threads: a full channel drops (the data is re-sent by
        // whoever needs it delivered).
        let guard = self
            .declare_callback(
                keyexpr,
                Box::new(move |sample| {
                    if let Err(flume::TrySendError::Full(_)) = tx.try_send(sample) {
                        if counter.fetch_add(1, Relaxed) == 0 {
                            tracing::warn!(
                                keyexpr = key,
                                "subscriber channel full: dropping samples until it drains"
                            );
                        }
                    }
                }),
            )
            .await?;
        Ok(Subscription { rx, dropped, guard })
    }

    async fn subscribe_callback(
        &self,
        keyexpr: &str,
        callback: SampleCallback,
    ) -> Result<Option<Guard>> {
        self.declare_callback(keyexpr, callback).await.map(Some)
    }

    async fn queryable(&self, keyexpr: &str, capacity: usize) -> Result<Queryable> {
        let (tx, rx) = flume::bounded(capacity);
        // Never block Zenoh's threads; a dropped query times out at the caller.
        let guard = self
            .declare_query_callback(
                keyexpr,
                Box::new(move |query| {
                    let _ = tx.try_send(query);
                }),
            )
            .await?;
        Ok(Queryable { rx, guard })
    }

    async fn queryable_callback(
        &self,
        keyexpr: &str,
        callback: QueryCallback,
    ) -> Result<Option<Guard>> {
        self.declare_query_callback(keyexpr, callback)
            .await
            .map(Some)
    }

    async fn query(
        &self,
        keyexpr: &str,
        payload: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> Result<Vec<Reply>> {
        let replies = self.get(keyexpr, payload, timeout).await?;
        let mut out = Vec::new();
        while let Ok(reply) = replies.recv_async().await {
            out.extend(ok_reply(keyexpr, reply));
        }
        Ok(out)
    }

    async fn query_first(
        &self,
        keyexpr: &str,
        payload: Option<(Bytes, &'static str)>,
        timeout: Duration,
        accept: &(dyn for<'r> Fn(&'r Reply) -> bool + Send + Sync),
    ) -> Result<Option<Reply>> {
        let replies = self.get(keyexpr, payload, timeout).await?;
        while let Ok(reply) = replies.recv_async().await {
            if let Some(r) = ok_reply(keyexpr, reply).filter(|r| accept(r)) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    async fn liveliness_token(&self, key: &str) -> Result<Guard> {
        let token = self
            .session
            .liveliness()
            .declare_token(key.to_owned())
            .await
            .map_err(Error::fabric)?;
        Ok(Box::new(token))
    }

    async fn liveliness_subscribe(&self, keyexpr: &str) -> Result<Subscription> {
        let (tx, rx) = flume::unbounded();
        let subscriber = self
            .session
            .liveliness()
            .declare_subscriber(keyexpr.to_owned())
            .history(true)
            .callback(move |s: zenoh::sample::Sample| {
                let kind = match s.kind() {
                    ZSampleKind::Put => SampleKind::Put,
                    ZSampleKind::Delete => SampleKind::Delete,
                };
                let _ = tx.send(Sample {
                    key: s.key_expr().to_string(),
                    payload: Bytes::new(),
                    kind,
                    attachment: None,
                });
            })
            .await
            .map_err(Error::fabric)?;
        Ok(Subscription {
            rx,
            dropped: Arc::new(AtomicU64::new(0)),
            guard: Box::new(subscriber),
        })
    }
}
