//! The node's HTTP side: the live dashboard ([`dashboard`]: embedded assets, JSON views of
//! the mesh in proto3 JSON, server-sent event streams bridged from Zenoh, actions through
//! the gRPC services) and Prometheus metrics on `/metrics`.
//!
//! With authentication on (`--auth-*`), `/api/*` (the dashboard's data) takes the same
//! bearer tokens and roles as gRPC (`viewer` to read; a data owner on the twin's site
//! sees raw values, as through `GetTwin`), refused through the one HTTP conversion of
//! [`crate::Error`] (401 without or with a bad token, 403 for too low a role). Without
//! it `/api/*` answers as a viewer and the dashboard's actions are refused (read-only). The
//! static assets and `/metrics` (counters, no twin data) stay open. A node with `[tls]`
//! serves all of it over HTTPS only.

mod dashboard;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use twinmesh_actors::context::NodeContext;
use twinmesh_twins::privacy::Role;
use twinmesh_twins::proto::{GetTwinRequest, ListTwinsRequest};

use crate::api::{parse_twin_id, Api};
use crate::auth::{Authenticator, Identity};
use crate::config::TlsConfig;
use crate::store::SledStore;

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct HttpState {
    pub api: Api,
    pub ctx: Arc<NodeContext>,
    pub store: Arc<SledStore>,
    /// Bearer-token checks of `/api/*`; `None`: callers read as viewers.
    pub auth: Option<Arc<Authenticator>>,
    /// The gRPC services, which the dashboard's actions call in process (the same checks
    /// as over gRPC).
    pub services: crate::grpc::Services,
    /// Live (server-sent event) streams open at once, at most [`MAX_LIVE_STREAMS`].
    pub live_streams: Arc<tokio::sync::Semaphore>,
    /// Values the node's device adapters refused, by reason.
    pub devices: Arc<crate::devices::DeviceCounters>,
}

/// Live streams a node serves at once (each holds a few Zenoh subscriptions).
pub const MAX_LIVE_STREAMS: usize = 64;

/// The caller of an `/api/*` request: at least a viewer, by the same rules as gRPC.
struct Reader(Identity);

impl FromRequestParts<HttpState> for Reader {
    type Rejection = crate::Error;

    async fn from_request_parts(parts: &mut Parts, s: &HttpState) -> crate::Result<Self> {
        let Some(auth) = &s.auth else {
            return Ok(Reader(Identity {
                role: Role::Viewer,
                ..Identity::trusted()
            }));
        };
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let who = auth.authenticate_header(header)?;
        who.require_role(Role::Viewer)?;
        Ok(Reader(who))
    }
}

pub async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind {
            what: "HTTP",
            addr,
            source,
        })
}

/// Serves the dashboard, `/api/*` and `/metrics` on `listener` until `cancel`: over
/// HTTPS with the node's certificate when `tls` is given (its handshakes run as tasks of
/// `tasks`), plain HTTP otherwise.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    tls: Option<TlsConfig>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let app = dashboard::routes()
        .route("/metrics", get(metrics))
        .route("/api/nodes", get(nodes))
        .route("/api/twins", get(twins))
        .route("/api/twins/{site}/{asset}", get(twin))
        .with_state(state);
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await?
        }
        Some(t) => {
            let listener = TlsListener::start(listener, acceptor(&t)?, tasks, cancel.clone())?;
            axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await?
        }
    }
    Ok(())
}

/// The node's certificate and key as a TLS acceptor (HTTP/1.1).
fn acceptor(t: &TlsConfig) -> crate::Result<TlsAcceptor> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, p: &std::path::Path, e: &dyn std::fmt::Display| {
        crate::Error::Tls(format!("HTTPS {what} {}: {e}", p.display()))
    };
    let certs = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("certificate", &t.cert_file, &e))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|e| bad("key", &t.key_file, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|e| bad("certificate", &t.cert_file, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// TLS connections for `axum::serve`: a task accepts TCP connections and runs each
/// handshake as a task of its own (bounded in time), so one slow client holds up no
/// other; finished handshakes queue here.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    fn start(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> crate::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let handshakes = tasks.clone();
        tasks.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: pause instead of spinning.
                            tracing::debug!("HTTPS accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                handshakes.spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "HTTPS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor stopped (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

fn json_response<T: serde::Serialize>(value: &T) -> crate::Result<Response> {
    let body = serde_json::to_string(value)
        .map_err(|e| crate::Error::internal(format!("json encoding: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn nodes(State(s): State<HttpState>, _: Reader) -> crate::Result<Response> {
    json_response(&s.api.list_nodes().await?)
}

async fn twins(State(s): State<HttpState>, _: Reader) -> crate::Result<Response> {
    let req = ListTwinsRequest {
        page_size: crate::api::MAX_PAGE_SIZE,
        ..Default::default()
    };
    json_response(&s.api.list_twins(&req).await?)
}

async fn twin(
    State(s): State<HttpState>,
    Reader(who): Reader,
    Path((site, asset)): Path<(String, String)>,
) -> crate::Result<Response> {
    let id = parse_twin_id(&format!("{site}/{asset}"))?;
    let req = GetTwinRequest {
        twin_id: id.to_string(),
    };
    // Without auth the caller is a viewer: no raw protected values.
    let caller = s.api.caller_of(&who);
    json_response(&s.api.call(&id, req, None, caller).await?)
}

/// `/metrics`: the node's counters, gauges and latency histograms in the Prometheus
/// text format ([`metrics::exposition`]).
async fn metrics(State(s): State<HttpState>) -> crate::Result<Response> {
    let text = metrics::exposition(&s.ctx, &s.store, &s.devices)?;
    Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
}
