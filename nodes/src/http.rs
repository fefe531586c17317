//! The node's HTTP side: a small live dashboard, JSON views of the mesh (proto3 JSON) and
//! Prometheus metrics on `/metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use twinmesh_actors::context::NodeContext;
use twinmesh_actors::metrics::NodeMetrics;
use twinmesh_actors::ports::SpoolStore;
use twinmesh_twins::proto::{GetTwinRequest, ListTwinsRequest};

use crate::api::{parse_twin_id, Api};
use crate::store::SledStore;

#[derive(Clone)]
pub struct HttpState {
    pub api: Api,
    pub ctx: Arc<NodeContext>,
    pub store: Arc<SledStore>,
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

pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/nodes", get(nodes))
        .route("/api/twins", get(twins))
        .route("/api/twins/{*id}", get(twin))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await?;
    Ok(())
}

fn json_response<T: serde::Serialize>(value: &T) -> crate::Result<Response> {
    let body = serde_json::to_string(value)
        .map_err(|e| crate::Error::internal(format!("json encoding: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn nodes(State(s): State<HttpState>) -> crate::Result<Response> {
    json_response(&s.api.list_nodes().await?)
}

async fn twins(State(s): State<HttpState>) -> crate::Result<Response> {
    let req = ListTwinsRequest {
        page_size: crate::api::MAX_PAGE_SIZE,
        ..Default::default()
    };
    json_response(&s.api.list_twins(&req).await?)
}

async fn twin(State(s): State<HttpState>, Path(id): Path<String>) -> crate::Result<Response> {
    let id = parse_twin_id(&id)?;
    let req = GetTwinRequest {
        twin_id: id.to_string(),
    };
    // The dashboard has no login: it sees what a viewer sees (no raw protected values).
    let viewer = s.api.caller(Some(twinmesh_twins::privacy::Role::Viewer));
    json_response(&s.api.call(&id, req, None, viewer).await?)
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
let selected=null;
async function refresh(){
 try{
  const nodes=await (await fetch('/api/nodes')).json();
  document.getElementById('nodes').innerHTML='<tr><th>node</th><th>tier</th><th>site</th><th>twins</th><th>grpc</th></tr>'+
   nodes.map(n=>`<tr><td>${esc(n.node)}</td><td>${esc(n.tier)}</td><td>${esc(n.site)}</td><td>${esc(n.twins)}</td><td>${esc(n.grpcAddr)}</td></tr>`).join('');
  const twins=(await (await fetch('/api/twins')).json()).twins;
  document.getElementById('twins').innerHTML='<tr><th>twin</th><th>kind</th><th>node</th><th>status</th><th>revision</th></tr>'+
   twins.map(t=>`<tr><td><a href="#" data-id="${esc(t.twinId)}">${esc(t.twinId)}</a></td><td>${esc(t.kind)}</td><td>${esc(t.node)}</td><td class="${esc(t.status)}">${esc(t.status)}</td><td>${esc(t.revision)}</td></tr>`).join('');
  if(selected){
   const t=await (await fetch('/api/twins/'+selected)).json();
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
