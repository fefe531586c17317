//! The node's HTTP side: a small live dashboard, JSON views of the mesh (proto3 JSON) and
//! Prometheus metrics on `/metrics`.
//!
//! With authentication on (`--auth-*`), `/api/*` (the dashboard's data) takes the same
//! bearer tokens and roles as gRPC (`viewer` to read; a data owner on the twin's site
//! sees raw values, as through `GetTwin`), refused through the one HTTP conversion of
//! [`crate::Error`] (401 without or with a bad token, 403 for too low a role). Without
//! it `/api/*` answers as a viewer. The static page and `/metrics` (counters, no twin
//! data) stay open. A node with `[tls]` serves all of it over HTTPS only.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use twinmesh_actors::context::NodeContext;
use twinmesh_actors::metrics::NodeMetrics;
use twinmesh_actors::ports::SpoolStore;
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
    /// Values the node's device adapters refused, by reason.
    pub devices: Arc<crate::devices::DeviceCounters>,
}

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
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/nodes", get(nodes))
        .route("/api/twins", get(twins))
        .route("/api/twins/{*id}", get(twin))
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
    Path(id): Path<String>,
) -> crate::Result<Response> {
    let id = parse_twin_id(&id)?;
    let req = GetTwinRequest {
        twin_id: id.to_string(),
    };
    // Without auth the caller is a viewer: no raw protected values.
    let caller = s.api.caller_of(&who);
    json_response(&s.api.call(&id, req, None, caller).await?)
}

/// Prometheus text exposition of the node's counters.
async fn metrics(State(s): State<HttpState>) -> Response {
    let m = &s.ctx.metrics;
    let node = s.ctx.node.as_str();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{node}\"}} {value}"
        );
    };
    metric(
        "twinmesh_frames_in_total",
        "counter",
        "Telemetry frames received by twins.",
        NodeMetrics::get(&m.frames_in),
    );
    metric(
        "twinmesh_samples_in_total",
        "counter",
        "Samples applied by twins.",
        NodeMetrics::get(&m.samples_in),
    );
    metric(
        "twinmesh_frames_duplicate_total",
        "counter",
        "Frames dropped as already applied.",
        NodeMetrics::get(&m.frames_duplicate),
    );
    metric(
        "twinmesh_frames_gap_total",
        "counter",
        "Frames held back until missing ones arrive.",
        NodeMetrics::get(&m.frames_gap),
    );
    metric(
        "twinmesh_frames_withheld_total",
        "counter",
        "Frames of protected signals a gateway did not publish (it has no site key).",
        NodeMetrics::get(&m.frames_withheld),
    );
    metric(
        "twinmesh_identifiers_withheld_total",
        "counter",
        "Identifier records a gateway did not publish (suppressed, or no site key to pseudonymise them).",
        NodeMetrics::get(&m.identifiers_withheld),
    );
    metric(
        "twinmesh_identifiers_rejected_total",
        "counter",
        "Identifier records a twin refused (not pseudonymised as its policy demands).",
        NodeMetrics::get(&m.identifiers_rejected),
    );
    metric(
        "twinmesh_published_total",
        "counter",
        "Messages published.",
        NodeMetrics::get(&m.frames_published),
    );
    metric(
        "twinmesh_published_bytes_total",
        "counter",
        "Payload bytes published.",
        NodeMetrics::get(&m.bytes_published),
    );
    metric(
        "twinmesh_rpc_served_total",
        "counter",
        "Twin RPCs served.",
        NodeMetrics::get(&m.rpc_served),
    );
    metric(
        "twinmesh_rpc_cached_total",
        "counter",
        "Twin RPCs (GetTwin) answered from a twin's read cache by the node's router.",
        NodeMetrics::get(&m.rpc_cached),
    );
    metric(
        "twinmesh_twin_restarts_total",
        "counter",
        "Twin actors restarted after a failure.",
        NodeMetrics::get(&m.twin_restarts),
    );
    metric(
        "twinmesh_twins_passivated_total",
        "counter",
        "Idle twins stopped until their next frame or call.",
        NodeMetrics::get(&m.twins_passivated),
    );
    metric(
        "twinmesh_twins_woken_total",
        "counter",
        "Dormant twins started again by a frame or a call.",
        NodeMetrics::get(&m.twins_woken),
    );
    metric(
        "twinmesh_windows_scored_total",
        "counter",
        "Feature windows scored by twins' anomaly models.",
        NodeMetrics::get(&m.windows_scored),
    );
    metric(
        "twinmesh_alarms_total",
        "counter",
        "Alarms raised by twins' anomaly models.",
        NodeMetrics::get(&m.alarms_raised),
    );
    metric(
        "twinmesh_twins",
        "gauge",
        "Twins hosted on this node (running or dormant).",
        s.ctx.directory.len() as u64,
    );
    metric(
        "twinmesh_spool_frames",
        "gauge",
        "Frames in the gateway spool.",
        s.store.spool_len(),
    );
    metric(
        "twinmesh_store_bytes",
        "gauge",
        "Bytes the node's database occupies on disk.",
        s.store.size_on_disk(),
    );
    let _ = writeln!(out, "# HELP twinmesh_frames_rejected_total Frames dropped as bad input, by reason.\n# TYPE twinmesh_frames_rejected_total counter");
    for (reason, n) in m.rejected() {
        let _ = writeln!(
            out,
            "twinmesh_frames_rejected_total{{node=\"{node}\",reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# HELP twinmesh_device_values_rejected_total Values from devices (MQTT, Modbus, OPC UA) refused, by reason.\n# TYPE twinmesh_device_values_rejected_total counter");
    for (reason, n) in s.devices.refused() {
        let _ = writeln!(
            out,
            "twinmesh_device_values_rejected_total{{node=\"{node}\",reason=\"{reason}\"}} {n}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

const DASHBOARD: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>twinmesh</title>
<style>
 body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
 h1{font-size:1.3rem} table{border-collapse:collapse;margin-bottom:1.5rem}
 td,th{border-bottom:1px solid #ddd;padding:.25rem .7rem;text-align:left;font-size:.9rem}
 .ok{color:#176d2c}.warn{color:#9a6700}.alarm,.stale{color:#b42318}
 pre{background:#f6f6f6;padding:.6rem;max-width:60rem;overflow:auto;font-size:.8rem}
</style></head><body>
<h1>twinmesh</h1>
<h2>Nodes</h2><table id="nodes"><tr><th>node</th><th>tier</th><th>site</th><th>twins</th><th>grpc</th></tr></table>
<h2>Twins</h2><table id="twins"><tr><th>twin</th><th>kind</th><th>node</th><th>status</th><th>revision</th></tr></table>
<h2 id="sel"></h2><pre id="detail">click a twin</pre>
<script>
const esc=s=>String(s??'').replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
let selected=null,token=sessionStorage.getItem('twinmesh-token'),asked=false;
// With --auth-* the node wants the same bearer token as gRPC: asked once, kept for the tab.
async function api(path){
 const r=await fetch(path,{headers:token?{'Authorization':'Bearer '+token}:{}});
 if(r.status===401&&!asked){
  asked=true;const t=prompt('This node needs a bearer token (JWT) to show its data:');
  if(t){token=t.trim();sessionStorage.setItem('twinmesh-token',token);asked=false;}
 }
 if(!r.ok)throw new Error(r.status+' '+await r.text());
 return r.json();
}
async function refresh(){
 try{
  const nodes=await api('/api/nodes');
  document.getElementById('nodes').innerHTML='<tr><th>node</th><th>tier</th><th>site</th><th>twins</th><th>grpc</th></tr>'+
   nodes.map(n=>`<tr><td>${esc(n.node)}</td><td>${esc(n.tier)}</td><td>${esc(n.site)}</td><td>${esc(n.twins)}</td><td>${esc(n.grpcAddr)}</td></tr>`).join('');
  const twins=(await api('/api/twins')).twins;
  document.getElementById('twins').innerHTML='<tr><th>twin</th><th>kind</th><th>node</th><th>status</th><th>revision</th></tr>'+
   twins.map(t=>`<tr><td><a href="#" data-id="${esc(t.twinId)}">${esc(t.twinId)}</a></td><td>${esc(t.kind)}</td><td>${esc(t.node)}</td><td class="${esc(t.status)}">${esc(t.status)}</td><td>${esc(t.revision)}</td></tr>`).join('');
  if(selected){
   const t=await api('/api/twins/'+selected);
   const rows=Object.entries(t.reported||{}).map(([k,v])=>`${k.padEnd(24)} ${Number(v.value).toFixed(3)}  (seq ${v.seq})`);
   const des=Object.entries(t.desired||{}).map(([k,v])=>`${k.padEnd(24)} ${v.value}  ${v.status}`);
   document.getElementById('sel').textContent=selected;
   document.getElementById('detail').textContent='reported\n'+rows.join('\n')+'\n\ndesired\n'+des.join('\n')+'\n\nderived\n'+JSON.stringify(t.derived,null,1);
  }
 }catch(e){document.getElementById('detail').textContent='refresh failed: '+e}
}
document.addEventListener('click',e=>{const id=e.target.dataset&&e.target.dataset.id;if(id){e.preventDefault();selected=id;refresh();}});
refresh();setInterval(refresh,1000);
</script></body></html>
"##;
