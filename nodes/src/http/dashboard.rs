//! The dashboard: its assets (embedded, no network needed), the live streams that bridge
//! the node's Zenoh subscriptions to the browser as server-sent events, and the actions
//! an operator takes from it, which go through the gRPC services in process so the same
//! roles, site scopes and twin-side checks apply as over gRPC.
//!
//! Live streams carry what the fabric carries: the twins' published (gated) state,
//! features and events, placements, node loads and liveliness, and proven telemetry
//! frames of public signals for the waveform view. Raw protected values never travel
//! there; a caller who may see them reads them through `GET /api/twins/{id}` (`GetTwin`
//! on its behalf), which the page fetches again when the live state changes.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use prost::Message;
use serde::Deserialize;

use twinmesh_actors::ports::{Sample, SampleKind, Subscription};
use twinmesh_proto::v1::mesh_service_server::MeshService;
use twinmesh_proto::v1::model_service_server::ModelService;
use twinmesh_proto::v1::twin_service_server::TwinService;
use twinmesh_twins::keys;
use twinmesh_twins::proto::{
    self, DeployModelRequest, DrainNodeRequest, FeatureSet, GetThingDescriptionRequest,
    MigrateTwinRequest, NodeLoad, Placement, QueryHistoryRequest, SetDesiredRequest,
    TelemetryFrame, TwinEvent, TwinState,
};
use twinmesh_twins::TwinId;

use super::{json_response, HttpState, Reader};
use crate::api::parse_twin_id;
use crate::auth::Identity;

const INDEX: &str = include_str!("../../assets/index.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const APP_CSS: &str = include_str!("../../assets/app.css");
const UPLOT_JS: &str = include_str!("../../assets/uplot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/uplot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../assets/uplot.LICENSE");

/// Samples of one waveform frame sent to the browser at most (the start of the latest
/// frame, at full resolution).
const WAVE_POINTS: usize = 2048;
/// A twin's waveform view is refreshed at most this often.
const WAVE_EVERY: Duration = Duration::from_millis(500);
/// Samples a telemetry frame may decode to here (as a twin's default limit).
const MAX_FRAME_SAMPLES: usize = 1 << 20;
/// Fabric samples a live stream buffers before it drops (a slow browser loses updates,
/// never slows the node).
const LIVE_BUFFER: usize = 256;

pub(super) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(|| asset("index.html")))
        .route(
            "/assets/{name}",
            get(|Path(name): Path<String>| asset_named(name)),
        )
        .route("/api/live", get(mesh_live))
        .route("/api/twins/{site}/{asset}/live", get(twin_live))
        .route("/api/twins/{site}/{asset}/history", get(history))
        .route("/api/twins/{site}/{asset}/td", get(thing_description))
        .route("/api/twins/{site}/{asset}/desired", post(set_desired))
        .route("/api/twins/{site}/{asset}/migrate", post(migrate))
        .route("/api/nodes/{node}/drain", post(drain))
        .route("/api/models/deploy", post(deploy))
}

async fn asset_named(name: String) -> Response {
    asset(&name).await
}

async fn asset(name: &str) -> Response {
    let (body, kind) = match name {
        "index.html" => (INDEX, "text/html; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "uplot.iife.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "uplot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        "uplot.LICENSE" => (UPLOT_LICENSE, "text/plain; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn twin_of(site: &str, asset: &str) -> crate::Result<TwinId> {
    parse_twin_id(&format!("{site}/{asset}"))
}

/// A live stream's events, keeping its subscriptions (and its slot) while it runs.
fn sse<S>(
    events: S,
    keep: impl Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    S: Stream<Item = Event> + Send + 'static,
{
    Sse::new(events.map(move |e| {
        let _ = &keep;
        Ok(e)
    }))
    .keep_alive(KeepAlive::default())
}

/// `what` as a named event with its proto3 JSON.
fn event<M: serde::Serialize>(name: &'static str, what: &M) -> Option<Event> {
    Event::default().event(name).json_data(what).ok()
}

/// The samples of `sub` that decode as `M`, as events `name`.
fn decoded<M>(sub: &Subscription, name: &'static str) -> BoxStream<'static, Event>
where
    M: Message + Default + serde::Serialize + 'static,
{
    sub.rx
        .clone()
        .into_stream()
        .filter_map(move |s: Sample| async move {
            let m = M::decode(s.payload.as_ref()).ok()?;
            event(name, &m)
        })
        .boxed()
}

async fn subscribe(s: &HttpState, keyexpr: &str) -> crate::Result<Subscription> {
    Ok(s.ctx.fabric.subscribe(keyexpr, LIVE_BUFFER).await?)
}

fn slot(s: &HttpState) -> crate::Result<tokio::sync::OwnedSemaphorePermit> {
    s.live_streams.clone().try_acquire_owned().map_err(|_| {
        crate::Error::unavailable(format!(
            "this node already serves {} live streams; close a dashboard tab",
            super::MAX_LIVE_STREAMS
        ))
    })
}

/// `GET /api/live`: the mesh as it changes: every twin's events (alarms, model quality,
/// releases, starts after migrations and failovers...), placements, node loads and nodes
/// coming and going.
async fn mesh_live(State(s): State<HttpState>, _: Reader) -> crate::Result<Response> {
    let permit = slot(&s)?;
    let events = subscribe(&s, "twinmesh/twins/*/*/events").await?;
    let placements = subscribe(&s, keys::PLACEMENT_ALL).await?;
    let loads = subscribe(&s, "twinmesh/nodes/*/load").await?;
    let tokens = s.ctx.fabric.liveliness_subscribe(keys::NODE_TOKENS).await?;
    let nodes = tokens
        .rx
        .clone()
        .into_stream()
        .filter_map(|t: Sample| async move {
            let node = keys::parse_node_token(&t.key)?;
            let live = t.kind == SampleKind::Put;
            event("node", &serde_json::json!({ "node": node, "live": live }))
        })
        .boxed();
    let all = stream::select_all([
        decoded::<TwinEvent>(&events, "event"),
        decoded::<Placement>(&placements, "placement"),
        decoded::<NodeLoad>(&loads, "load"),
        nodes,
    ]);
    Ok(sse(all, (permit, events, placements, loads, tokens)).into_response())
}

/// `GET /api/twins/{id}/live`: one twin's published state, features and events, and the
/// latest window of each public waveform (proven frames only, at most every
/// [`WAVE_EVERY`]).
async fn twin_live(
    State(s): State<HttpState>,
    _: Reader,
    Path((site, asset)): Path<(String, String)>,
) -> crate::Result<Response> {
    let id = twin_of(&site, &asset)?;
    let permit = slot(&s)?;
    let updates = subscribe(&s, &keys::twin_updates(&id)).await?;
    let telemetry = subscribe(&s, &keys::telemetry_of(&id)).await?;
    let twin_updates = updates
        .rx
        .clone()
        .into_stream()
        .filter_map(|u: Sample| async move {
            match u.key.rsplit('/').next()? {
                "state" => event("state", &TwinState::decode(u.payload.as_ref()).ok()?),
                "features" => event("features", &FeatureSet::decode(u.payload.as_ref()).ok()?),
                "events" => event("event", &TwinEvent::decode(u.payload.as_ref()).ok()?),
                _ => None,
            }
        })
        .boxed();
    let trust = s.ctx.trust.clone();
    let site = id.site().to_owned();
    let mut last: std::collections::HashMap<String, Instant> = Default::default();
    let waves = telemetry
        .rx
        .clone()
        .into_stream()
        .filter_map(move |f: Sample| {
            let wave = wave(&trust, &site, &f, &mut last);
            async move { wave }
        })
        .boxed();
    let all = stream::select_all([twin_updates, waves]);
    Ok(sse(all, (permit, updates, telemetry)).into_response())
}

/// A telemetry frame as a waveform event: public (not sealed), proven by the site's
/// gateway, and not more often than [`WAVE_EVERY`] per signal.
fn wave(
    trust: &twinmesh_actors::trust::Trust,
    site: &str,
    sample: &Sample,
    last: &mut std::collections::HashMap<String, Instant>,
) -> Option<Event> {
    let mut f = TelemetryFrame::decode(sample.payload.as_ref()).ok()?;
    if !f.sealed.is_empty() {
        return None;
    }
    if let Some(t) = last.get(&f.signal) {
        if t.elapsed() < WAVE_EVERY {
            return None;
        }
    }
    trust.proven(site, &mut f)?;
    twinmesh_twins::frame::unpack(&mut f, MAX_FRAME_SAMPLES).ok()?;
    if last.len() < 64 || last.contains_key(&f.signal) {
        last.insert(f.signal.clone(), Instant::now());
    }
    let total = f.samples.len();
    f.samples.truncate(WAVE_POINTS);
    event(
        "wave",
        &serde_json::json!({
            "signal": f.signal,
            "startNs": f.start_ns.to_string(),
            "periodNs": f.sample_period_ns.to_string(),
            "total": total,
            "samples": f.samples,
        }),
    )
}

#[derive(Deserialize)]
struct HistoryQuery {
    signal: String,
    start_ns: i64,
    end_ns: i64,
    #[serde(default)]
    bucket_ns: i64,
    #[serde(default)]
    aggregation: Option<String>,
}

/// `GET /api/twins/{id}/history?signal&start_ns&end_ns&bucket_ns&aggregation`:
/// `QueryHistory` as the caller (server-side buckets; the twin's privacy rules apply).
async fn history(
    State(s): State<HttpState>,
    Reader(who): Reader,
    Path((site, asset)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> crate::Result<Response> {
    let id = twin_of(&site, &asset)?;
    let aggregation = match q.aggregation.as_deref() {
        None | Some("") => proto::Aggregation::Mean,
        Some(a) => {
            proto::Aggregation::from_str_name(&format!("AGGREGATION_{}", a.to_ascii_uppercase()))
                .ok_or_else(|| {
                    crate::Error::invalid_argument(format!(
                        "unknown aggregation {a:?} (mean, min, max, count...)"
                    ))
                })?
        }
    };
    let req = QueryHistoryRequest {
        twin_id: id.to_string(),
        signal: q.signal,
        start_ns: q.start_ns,
        end_ns: q.end_ns,
        bucket_ns: q.bucket_ns,
        aggregation: aggregation as i32,
    };
    let caller = s.api.caller_of(&who);
    json_response(&s.api.call(&id, req, None, caller).await?)
}

/// `GET /api/twins/{id}/td`: the twin's Thing Description (its set-points are the
/// writable properties).
async fn thing_description(
    State(s): State<HttpState>,
    Reader(who): Reader,
    Path((site, asset)): Path<(String, String)>,
) -> crate::Result<Response> {
    let id = twin_of(&site, &asset)?;
    let req = GetThingDescriptionRequest {
        twin_id: id.to_string(),
    };
    let caller = s.api.caller_of(&who);
    json_response(&s.api.call(&id, req, None, caller).await?)
}

/// The caller of a dashboard action: authenticated, whatever its role (the gRPC service
/// checks the role the action needs, and the twin checks it again). Without
/// authentication the dashboard is read-only.
struct Operator(Identity);

impl FromRequestParts<HttpState> for Operator {
    type Rejection = crate::Error;

    async fn from_request_parts(parts: &mut Parts, s: &HttpState) -> crate::Result<Self> {
        let Some(auth) = &s.auth else {
            return Err(crate::Error::Refused {
                code: crate::error::ErrorCode::PermissionDenied,
                message: "this node runs without authentication (--auth-*): its dashboard is \
                          read-only; use gRPC (`twinmesh ctl`) or start it with --auth-*"
                    .to_owned(),
            });
        };
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Ok(Operator(auth.authenticate_header(header)?))
    }
}

/// `message` as a gRPC request of `who`, as the interceptor hands it to a service.
fn as_grpc<T>(who: Identity, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut().insert(who);
    r
}

#[derive(Deserialize)]
struct DesiredBody {
    property: String,
    value: f64,
    #[serde(default, rename = "expectedRevision")]
    expected_revision: Option<u64>,
}

async fn set_desired(
    State(s): State<HttpState>,
    Operator(who): Operator,
    Path((site, asset)): Path<(String, String)>,
    Json(body): Json<DesiredBody>,
) -> crate::Result<Response> {
    let id = twin_of(&site, &asset)?;
    let req = SetDesiredRequest {
        twin_id: id.to_string(),
        property: body.property,
        value: body.value,
        expected_revision: body.expected_revision,
    };
    let r = TwinService::set_desired(&s.services, as_grpc(who, req)).await?;
    json_response(r.get_ref())
}

#[derive(Deserialize)]
struct MigrateBody {
    #[serde(default, rename = "targetNode")]
    target_node: String,
    #[serde(default, rename = "targetTier")]
    target_tier: String,
    #[serde(default)]
    unpin: bool,
}

async fn migrate(
    State(s): State<HttpState>,
    Operator(who): Operator,
    Path((site, asset)): Path<(String, String)>,
    Json(body): Json<MigrateBody>,
) -> crate::Result<Response> {
    let id = twin_of(&site, &asset)?;
    let req = MigrateTwinRequest {
        twin_id: id.to_string(),
        target_node: body.target_node,
        target_tier: body.target_tier,
        unpin: body.unpin,
    };
    let r = MeshService::migrate_twin(&s.services, as_grpc(who, req)).await?;
    json_response(r.get_ref())
}

async fn drain(
    State(s): State<HttpState>,
    Operator(who): Operator,
    Path(node): Path<String>,
) -> crate::Result<Response> {
    let r = MeshService::drain_node(&s.services, as_grpc(who, DrainNodeRequest { node })).await?;
    json_response(r.get_ref())
}

async fn deploy(
    State(s): State<HttpState>,
    Operator(who): Operator,
    Json(req): Json<DeployModelRequest>,
) -> crate::Result<Response> {
    let r = ModelService::deploy_model(&s.services, as_grpc(who, req)).await?;
    json_response(r.get_ref())
}
