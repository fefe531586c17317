//! Location-transparent operations on the mesh, shared by the gRPC services and the
//! dashboard. Every call goes over the fabric: a node never needs to know where a twin
//! lives (DESIGN §7 "Addressing").

use std::time::{Duration, Instant};

use twinmesh_actors::ports::SharedFabric;
use twinmesh_actors::wire::TypedFabric;
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, Budget, GetBudgetRequest, GetPolicyRequest,
    GetThingDescriptionRequest, GetTwinRequest, ImportHistoryRequest, ImportHistoryResponse,
    InstallModelRequest, InstallModelResponse, ListTwinsRequest, ListTwinsResponse, NodeInfo,
    NodeTwins, Placement, PrivacyPolicy, QueryHistoryRequest, QueryHistoryResponse,
    ReleaseAggregateRequest, ReleaseAggregateResponse, SetChainRequest, SetChainResponse,
    SetDesiredRequest, SetDesiredResponse, SetPolicyRequest, ThingDescription, Twin, TwinReply,
    TwinRequest, TwinSummary,
};
use twinmesh_twins::{keys, TwinId};

use crate::{Error, Result};

/// Default and largest `ListTwins` page.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A request one twin answers, tied to its [`TwinRequest`] variant and the
/// [`TwinReply`] variant that answers it, so no caller matches replies by hand.
pub trait TwinCall: Send + Sized + 'static {
    type Reply: Send + 'static;
    fn into_request(self) -> twin_request::Request;
    fn from_reply(reply: twin_reply::Reply) -> Option<Self::Reply>;
}

macro_rules! twin_calls {
    ($($request:ty => $variant:ident, $reply:ident($out:ty);)*) => {$(
        impl TwinCall for $request {
            type Reply = $out;
            fn into_request(self) -> twin_request::Request {
                twin_request::Request::$variant(self)
            }
            fn from_reply(reply: twin_reply::Reply) -> Option<$out> {
                match reply {
                    twin_reply::Reply::$reply(r) => Some(r),
                    _ => None,
                }
            }
        }
    )*};
}

twin_calls! {
    GetTwinRequest => GetTwin, Twin(Twin);
    GetThingDescriptionRequest => ThingDescription, ThingDescription(ThingDescription);
    QueryHistoryRequest => QueryHistory, QueryHistory(QueryHistoryResponse);
    SetDesiredRequest => SetDesired, SetDesired(SetDesiredResponse);
    SetChainRequest => SetChain, SetChain(SetChainResponse);
    ImportHistoryRequest => ImportHistory, ImportHistory(ImportHistoryResponse);
    InstallModelRequest => InstallModel, InstallModel(InstallModelResponse);
    GetPolicyRequest => GetPolicy, Policy(PrivacyPolicy);
    SetPolicyRequest => SetPolicy, Policy(PrivacyPolicy);
    GetBudgetRequest => GetBudget, Budget(Budget);
    ReleaseAggregateRequest => Release, Release(ReleaseAggregateResponse);
}

#[derive(Clone)]
pub struct Api {
    fabric: SharedFabric,
    /// Vouches for this node's callers on the fabric (with the mesh key).
    trust: std::sync::Arc<twinmesh_actors::trust::Trust>,
    /// Site of this node: twins of other sites see its callers as off-site.
    pub site: String,
    /// Deadline of one call when the client gives none.
    pub default_deadline: Duration,
    /// Where the latency of each twin call is observed (`twinmesh_rpc_seconds`).
    rpc_latency: Option<prometheus::Histogram>,
}

/// Wall-clock time in ms (caller contexts expire on it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn parse_twin_id(s: &str) -> Result<TwinId> {
    Ok(s.parse::<TwinId>()?)
}

impl Api {
    pub fn new(
        fabric: SharedFabric,
        site: &str,
        trust: std::sync::Arc<twinmesh_actors::trust::Trust>,
    ) -> Self {
        Api {
            fabric,
            trust,
            site: site.to_owned(),
            default_deadline: Duration::from_secs(5),
            rpc_latency: None,
        }
    }

    /// Observes every twin call's latency in `histogram`.
    pub fn with_rpc_latency(mut self, histogram: prometheus::Histogram) -> Self {
        self.rpc_latency = Some(histogram);
        self
    }

    pub fn fabric(&self) -> &SharedFabric {
        &self.fabric
    }

    /// Sends a request to the twin wherever it lives. A twin that is known to the mesh
    /// but not answering (restarting, moving) is retried until the deadline.
    pub async fn twin_call(
        &self,
        id: &TwinId,
        request: twin_request::Request,
        deadline: Option<Duration>,
    ) -> Result<twin_reply::Reply> {
        self.twin_call_as(id, request, deadline, self.caller(None))
            .await
    }

    /// The caller this node vouches for. Without authentication every caller holds
    /// every role; the twin still gates what crosses its site.
    pub fn caller(&self, role: Option<twinmesh_twins::privacy::Role>) -> proto::Caller {
        proto::Caller {
            site: self.site.clone(),
            role: role
                .unwrap_or(twinmesh_twins::privacy::Role::DataOwner)
                .as_str()
                .to_owned(),
            ..Default::default()
        }
    }

    /// The caller an authenticated identity makes.
    pub fn caller_of(&self, who: &crate::auth::Identity) -> proto::Caller {
        proto::Caller {
            site: self.site.clone(),
            role: who.role.as_str().to_owned(),
            subject: who.subject.clone(),
            // A site-scoped token: the twins and the authority hold its role only on
            // these sites.
            sites: who.sites.clone(),
            ..Default::default()
        }
    }

    /// A typed call to the twin `id` on behalf of `caller`: the reply variant that
    /// answers `request`, or an error.
    pub async fn call<R: TwinCall>(
        &self,
        id: &TwinId,
        request: R,
        deadline: Option<Duration>,
        caller: proto::Caller,
    ) -> Result<R::Reply> {
        let reply = self
            .twin_call_as(id, request.into_request(), deadline, caller)
            .await?;
        R::from_reply(reply).ok_or_else(|| Error::internal(format!("unexpected reply from {id}")))
    }

    /// [`Api::twin_call`] on behalf of `caller`.
    pub async fn twin_call_as(
        &self,
        id: &TwinId,
        request: twin_request::Request,
        deadline: Option<Duration>,
        caller: proto::Caller,
    ) -> Result<twin_reply::Reply> {
        let started = Instant::now();
        let span =
            tracing::debug_span!("grpc.twin_call", twin = %id, request = request_name(&request));
        let reply = tracing::Instrument::instrument(
            self.twin_call_once(id, request, deadline, caller),
            span,
        )
        .await;
        if let Some(h) = &self.rpc_latency {
            h.observe(started.elapsed().as_secs_f64());
        }
        reply
    }

    async fn twin_call_once(
        &self,
        id: &TwinId,
        request: twin_request::Request,
        deadline: Option<Duration>,
        caller: proto::Caller,
    ) -> Result<twin_reply::Reply> {
        let deadline = deadline.unwrap_or(self.default_deadline);
        let start = Instant::now();
        let mut request = TwinRequest {
            caller: Some(caller),
            request: Some(request),
        };
        let key = keys::twin_rpc(id);
        let mut known: Option<bool> = None;
        let mut backoff = Duration::from_millis(20);
        let mut last_unavailable: Option<String> = None;
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            // Every attempt is vouched for anew: a receiver admits a context once.
            self.trust.vouch(&mut request, now_ms());
            // The first reply proven for this request decides, without waiting for every
            // other replier of the key to finish (anyone may declare a queryable there).
            let trust = &self.trust;
            let caller = request.caller.clone();
            let accept = move |r: &twinmesh_actors::ports::Reply| {
                trust
                    .answer::<TwinReply>(caller.as_ref(), &r.payload)
                    .is_some()
            };
            let first = tracing::Instrument::instrument(
                self.fabric
                    .ask_first(&key, &request, left.max(Duration::from_millis(10)), &accept),
                tracing::debug_span!("zenoh.query", key = %key),
            )
            .await?;
            if let Some(reply) = first {
                let reply = reply
                    .decode::<TwinReply>()
                    .map_err(|e| Error::internal(format!("malformed twin reply: {e}")))?;
                match reply.reply {
                    // Moving or restarting: retry within the deadline.
                    Some(twin_reply::Reply::Error(e))
                        if e.code == proto::ErrorCode::Unavailable as i32 =>
                    {
                        last_unavailable = Some(e.message);
                    }
                    Some(twin_reply::Reply::Error(e)) => return Err(e.into()),
                    Some(r) => return Ok(r),
                    None => return Err(Error::internal("empty twin reply")),
                }
            } else {
                // Nobody answered: unknown twin, one between two homes, or one with no
                // home at all.
                if known.is_none() {
                    let placement = self.placement(id).await?;
                    if let Some(p) = placement.as_ref().filter(|p| p.status == "stale") {
                        return Err(Error::unavailable(format!(
                            "twin {id} is stale: {}",
                            p.reason
                        )));
                    }
                    known = Some(placement.is_some());
                }
                if known == Some(false) {
                    return Err(Error::not_found(format!("unknown twin {id}")));
                }
            }
            if start.elapsed() + backoff >= deadline {
                return Err(Error::unavailable(last_unavailable.unwrap_or_else(|| {
                    format!("twin {id} did not answer within {deadline:?}")
                })));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// The placement record of a twin, from the placement authority.
    pub async fn placement(&self, id: &TwinId) -> Result<Option<Placement>> {
        let replies = self
            .fabric
            .query(&keys::placement(id), None, Duration::from_secs(2))
            .await?;
        Ok(replies
            .into_iter()
            .find_map(|r| r.decode::<Placement>().ok()))
    }

    /// A request to the placement authority (migrate, drain, site ledgers).
    pub async fn mesh_request(
        &self,
        caller: proto::Caller,
        request: proto::mesh_request::Request,
        timeout: Duration,
    ) -> Result<proto::mesh_reply::Reply> {
        twinmesh_actors::mesh::ask_authority(
            &*self.fabric,
            &self.trust,
            caller,
            request,
            timeout,
            now_ms(),
        )
        .await
        .map_err(Error::from)
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>> {
        let replies = self
            .fabric
            .query(keys::NODE_INFO_ALL, None, Duration::from_secs(2))
            .await?;
        let mut nodes: Vec<NodeInfo> = replies
            .into_iter()
            .filter_map(|r| r.decode::<NodeInfo>().ok())
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        nodes.dedup_by(|a, b| a.node == b.node);
        Ok(nodes)
    }

    pub async fn list_twins(&self, req: &ListTwinsRequest) -> Result<ListTwinsResponse> {
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid_argument(format!(
                    "page_size {n} exceeds the maximum of {MAX_PAGE_SIZE}"
                )))
            }
            n => n,
        } as usize;
        if !req.page_token.is_empty() {
            parse_twin_id(&req.page_token).map_err(|_| {
                Error::invalid_argument(format!("invalid page_token {:?}", req.page_token))
            })?;
        }
        if !req.tier.is_empty() {
            req.tier
                .parse::<twinmesh_twins::Tier>()
                .map_err(|e| Error::invalid_argument(e.to_string()))?;
        }
        // A kind this node does not know may still be a kind of twins other nodes host
        // (defined by a gateway's Thing Model): unknown only when no twin has it.
        let unknown_kind =
            !req.kind.is_empty() && twinmesh_twins::kind::lookup(&req.kind).is_none();
        if unknown_kind && !twinmesh_twins::id::is_valid_segment(&req.kind) {
            return Err(Error::invalid_argument(
                twinmesh_twins::Error::UnknownKind(req.kind.clone()).to_string(),
            ));
        }
        let replies = self
            .fabric
            .query(keys::NODE_TWINS_ALL, None, Duration::from_secs(2))
            .await?;
        let mut twins: Vec<TwinSummary> = replies
            .into_iter()
            .filter_map(|r| r.decode::<NodeTwins>().ok())
            .flat_map(|n| n.twins)
            .collect();
        // Twins no node hosts (stale placements) are listed too, with the reason.
        if let Ok(placements) = self
            .fabric
            .query(keys::PLACEMENT_ALL, None, Duration::from_secs(2))
            .await
        {
            for p in placements
                .into_iter()
                .filter_map(|r| r.decode::<Placement>().ok())
            {
                if p.status == "stale" && !twins.iter().any(|t| t.twin_id == p.twin_id) {
                    twins.push(TwinSummary {
                        twin_id: p.twin_id,
                        kind: p.kind,
                        node: String::new(),
                        tier: String::new(),
                        status: "stale".into(),
                        revision: 0,
                    });
                }
            }
        }
        if unknown_kind && !twins.iter().any(|t| t.kind == req.kind) {
            return Err(Error::invalid_argument(
                twinmesh_twins::Error::UnknownKind(req.kind.clone()).to_string(),
            ));
        }
        let mut twins: Vec<TwinSummary> = twins
            .into_iter()
            .filter(|t| {
                let site = t.twin_id.split('/').next().unwrap_or_default();
                (req.site.is_empty() || site == req.site)
                    && (req.kind.is_empty() || t.kind == req.kind)
                    && (req.tier.is_empty() || t.tier == req.tier)
                    && (req.node.is_empty() || t.node == req.node)
                    && (req.status.is_empty() || t.status == req.status)
                    && (req.page_token.is_empty() || t.twin_id > req.page_token)
            })
            .collect();
        twins.sort_by(|a, b| a.twin_id.cmp(&b.twin_id));
        twins.dedup_by(|a, b| a.twin_id == b.twin_id);
        let next_page_token = if twins.len() > page_size {
            twins.truncate(page_size);
            twins.last().map(|t| t.twin_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ListTwinsResponse {
            twins,
            next_page_token,
        })
    }
}

/// The name of a twin request, for spans.
fn request_name(r: &twin_request::Request) -> &'static str {
    use twin_request::Request as R;
    match r {
        R::GetTwin(_) => "GetTwin",
        R::SetDesired(_) => "SetDesired",
        R::QueryHistory(_) => "QueryHistory",
        R::ThingDescription(_) => "GetThingDescription",
        R::SetChain(_) => "SetChain",
        R::ImportHistory(_) => "ImportHistory",
        R::Freeze(_) => "Freeze",
        R::InstallModel(_) => "InstallModel",
        R::SetPolicy(_) => "SetPolicy",
        R::GetPolicy(_) => "GetPolicy",
        R::GetBudget(_) => "GetBudget",
        R::Release(_) => "Release",
        R::Contribute(_) => "Contribute",
    }
}
