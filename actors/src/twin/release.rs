//! Privacy releases, served by the node that hosts a twin (DESIGN §10): the raw data
//! they are computed from never leaves the site.
//!
//! - A **single-twin release** reads the twin's samples in the range (the records),
//!   calibrates an OpenDP measurement to the ε asked for, charges the exact privacy loss
//!   to the twin's ledger (durably, refusing what does not fit), and returns the value.
//! - A **set release** (e.g. venue occupancy over its turnstiles) goes to the node of the
//!   first twin, which coordinates on the site: every twin contributes its clamped mean
//!   over the range, sealed with the site key, and is charged the calibrated ε; if any
//!   twin refuses, the others are refunded and nothing is released. The records are the
//!   twins (one value each), so the release protects each twin's whole contribution.
//!   Before any twin is charged, the release reserves its ε in the site's ledger of set
//!   releases, kept by the placement authority (one writer per site); what that ledger
//!   refuses is not released, and when it cannot be reached (cloud down) set releases
//!   are refused: they fail closed. A release that fails later is refunded there too.
//!   Micro-aggregation releases an exact aggregate only over at least k twins.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use prost::Message;
use ractor::ActorRef;

use crate::wire::TypedFabric;
use twinmesh_twins::privacy::{self, Mechanism, Policy, ReleaseSpec, Statistic};
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, ContributeRequest, ContributeResponse, ContributionValue,
    ReleaseAggregateRequest, ReleaseAggregateResponse, TwinReply, TwinRequest,
};
use twinmesh_twins::{keys, AssetKind, Error as DomainError, TwinId};

use super::{Charge, TwinMsg};
use crate::context::NodeContext;

/// Most records one single-twin release reads.
pub const MAX_RELEASE_RECORDS: usize = 1 << 20;
/// Most twins one set release covers.
pub const MAX_RELEASE_TWINS: usize = 10_000;
/// Contributions asked for at once.
const CONTRIBUTE_CONCURRENCY: usize = 32;

type Reply = Result<twin_reply::Reply, proto::Error>;

/// The node's site key, or an error saying it has none and `why` that matters.
fn site_key(
    ctx: &NodeContext,
    why: &str,
) -> std::result::Result<Arc<crate::seal::KeyRing>, proto::Error> {
    ctx.site_key.clone().ok_or_else(|| {
        err(
            proto::ErrorCode::FailedPrecondition,
            format!("node {} has no site key: {why}", ctx.node),
        )
    })
}

fn err(code: proto::ErrorCode, message: String) -> proto::Error {
    proto::Error {
        code: code as i32,
        message,
    }
}

fn domain(e: DomainError) -> proto::Error {
    (&e).into()
}

async fn call<T: Send + 'static>(
    ctx: &NodeContext,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    f: impl FnOnce(ractor::RpcReplyPort<T>) -> TwinMsg,
) -> Result<T, proto::Error> {
    match actor.call(f, Some(ctx.twin_config.call_timeout)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        _ => Err(err(
            proto::ErrorCode::Unavailable,
            format!("twin {id} is restarting"),
        )),
    }
}

/// The twin's current policy (shared with the actor: no copy of the twin is built).
pub async fn policy_of(
    ctx: &NodeContext,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    _kind: AssetKind,
) -> Result<std::sync::Arc<Policy>, proto::Error> {
    call(ctx, actor, id, TwinMsg::Policy).await
}

fn check_range(start_ns: i64, end_ns: i64) -> Result<(), proto::Error> {
    if start_ns >= end_ns {
        return Err(domain(DomainError::InvalidRange { start_ns, end_ns }));
    }
    Ok(())
}

async fn read_samples(
    ctx: &Arc<NodeContext>,
    id: &TwinId,
    signal: &str,
    start_ns: i64,
    end_ns: i64,
) -> Result<Vec<f64>, proto::Error> {
    let (ctx2, id2, signal2) = (ctx.clone(), id.clone(), signal.to_owned());
    tokio::task::spawn_blocking(move || {
        ctx2.store
            .read_samples(&id2, &signal2, start_ns, end_ns, MAX_RELEASE_RECORDS)
    })
    .await
    .map_err(|e| err(proto::ErrorCode::Internal, format!("release failed: {e}")))?
    .map_err(|e| err(proto::ErrorCode::Internal, format!("history of {id}: {e}")))
}

fn signal_policy<'p>(
    policy: &'p Policy,
    kind: AssetKind,
    signal: &str,
) -> Result<&'p privacy::SignalPolicy, proto::Error> {
    kind.schema().signal(signal).map_err(domain)?;
    let sp = policy.signal(signal).ok_or_else(|| {
        err(
            proto::ErrorCode::InvalidArgument,
            format!("signal {signal} has no policy"),
        )
    })?;
    if sp.mechanism == Mechanism::Suppress {
        return Err(domain(DomainError::PermissionDenied(format!(
            "signal {signal} is suppressed by its privacy policy: nothing about it is released"
        ))));
    }
    Ok(sp)
}

/// Serves a `release` twin request on the twin's node.
pub async fn serve_release(
    ctx: Arc<NodeContext>,
    actor: ActorRef<TwinMsg>,
    id: TwinId,
    kind: AssetKind,
    req: ReleaseAggregateRequest,
    caller: Option<proto::Caller>,
) -> TwinReply {
    // A bad ε is the caller's mistake whatever mechanism ends up deciding.
    if let Err(e) = privacy::check_epsilon(req.epsilon) {
        return into_twin_reply(Err(domain(e)));
    }
    let out = if req.twin_ids.len() > 1 {
        coordinate_set(&ctx, &actor, &id, kind, req, caller).await
    } else {
        release_one(&ctx, &actor, &id, kind, req, caller).await
    };
    into_twin_reply(out)
}

fn into_twin_reply(out: Reply) -> TwinReply {
    TwinReply {
        reply: Some(out.unwrap_or_else(twin_reply::Reply::Error)),
        proof: None,
    }
}

async fn release_one(
    ctx: &Arc<NodeContext>,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    kind: AssetKind,
    req: ReleaseAggregateRequest,
    caller: Option<proto::Caller>,
) -> Reply {
    check_range(req.start_ns, req.end_ns)?;
    let statistic = Statistic::from_proto(req.statistic).map_err(domain)?;
    let policy = policy_of(ctx, actor, id, kind).await?;
    let sp = signal_policy(&policy, kind, &req.signal)?;
    if sp.mechanism == Mechanism::MicroAggregate {
        // Released only as the whole fixed group the twin belongs to.
        return coordinate_set(ctx, actor, id, kind, req, caller).await;
    }
    let spec = ReleaseSpec {
        statistic,
        noise: policy.noise,
        lower: sp.lower,
        upper: sp.upper,
        epsilon: req.epsilon,
        delta: policy.delta,
        d_in: policy.max_contributions,
    };
    privacy::check_epsilon(req.epsilon).map_err(domain)?;
    let data = read_samples(ctx, id, &req.signal, req.start_ns, req.end_ns).await?;
    let r = tokio::task::spawn_blocking(move || privacy::release(&spec, &data))
        .await
        .map_err(|e| err(proto::ErrorCode::Internal, format!("release failed: {e}")))?
        .map_err(domain)?;
    let audit = (
        format!(
            "{} of {} released with ε {:.6} ({} records)",
            statistic.as_str(),
            req.signal,
            r.epsilon,
            r.records
        ),
        vec![
            ("signal", req.signal.clone()),
            ("statistic", statistic.as_str().to_owned()),
            ("mechanism", r.mechanism.clone()),
            ("epsilon", r.epsilon.to_string()),
            ("delta", r.delta.to_string()),
            ("noise_scale", r.scale.to_string()),
            ("lower", sp.lower.to_string()),
            ("upper", sp.upper.to_string()),
            ("records", r.records.to_string()),
            ("start_ns", req.start_ns.to_string()),
            ("end_ns", req.end_ns.to_string()),
            ("value", r.value.to_string()),
            ("by", caller.map(|c| c.subject).unwrap_or_default()),
        ],
    );
    let charge = Charge {
        epsilon: r.epsilon,
        delta: r.delta,
        refund: false,
        audit: Some(audit),
    };
    // Refused (budget) → the value computed above is dropped, never returned.
    let budget = call(ctx, actor, id, |tx| TwinMsg::Charge(charge, tx)).await??;
    Ok(twin_reply::Reply::Release(ReleaseAggregateResponse {
        value: r.value,
        epsilon_spent: r.epsilon,
        epsilon_remaining: (budget.epsilon_total - budget.epsilon_spent).max(0.0),
        mechanism: r.mechanism,
        noise_scale: r.scale,
        records: r.records,
        delta_spent: r.delta,
        site_epsilon_remaining: None,
    }))
}

fn contribution_context(release_id: &str, twin: &str) -> Vec<u8> {
    format!("twinmesh/contribution/{release_id}/{twin}").into_bytes()
}

/// Serves a `contribute` twin request: this twin's clamped mean over the range, sealed
/// for the site, with `epsilon` charged (or refunded).
pub async fn serve_contribute(
    ctx: Arc<NodeContext>,
    actor: ActorRef<TwinMsg>,
    id: TwinId,
    kind: AssetKind,
    req: ContributeRequest,
) -> TwinReply {
    into_twin_reply(contribute(&ctx, &actor, &id, kind, req).await)
}

async fn contribute(
    ctx: &Arc<NodeContext>,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    kind: AssetKind,
    req: ContributeRequest,
) -> Reply {
    let key = site_key(ctx, "contributions cannot leave it sealed")?;
    let policy = policy_of(ctx, actor, id, kind).await?;
    let sp = signal_policy(&policy, kind, &req.signal)?.clone();
    let mut remaining = f64::NAN;
    if req.epsilon > 0.0 || req.refund {
        let charge = Charge {
            epsilon: req.epsilon,
            delta: req.delta,
            refund: req.refund,
            audit: Some((
                format!(
                    "{} of ε {:.6} for set release {}",
                    if req.refund { "refund" } else { "contribution" },
                    req.epsilon,
                    req.release_id
                ),
                vec![
                    ("signal", req.signal.clone()),
                    ("release_id", req.release_id.clone()),
                    ("epsilon", req.epsilon.to_string()),
                    ("delta", req.delta.to_string()),
                    ("refund", req.refund.to_string()),
                ],
            )),
        };
        let budget = call(ctx, actor, id, |tx| TwinMsg::Charge(charge, tx)).await??;
        remaining = (budget.epsilon_total - budget.epsilon_spent).max(0.0);
        if req.refund {
            return Ok(twin_reply::Reply::Contribute(ContributeResponse {
                epsilon_remaining: remaining,
                ..Default::default()
            }));
        }
    }
    check_range(req.start_ns, req.end_ns)?;
    let data = read_samples(ctx, id, &req.signal, req.start_ns, req.end_ns).await?;
    let finite: Vec<f64> = data
        .into_iter()
        .filter(|v| v.is_finite())
        .map(|v| v.clamp(sp.lower, sp.upper))
        .collect();
    let value = ContributionValue {
        value: if finite.is_empty() {
            0.0
        } else {
            finite.iter().sum::<f64>() / finite.len() as f64
        },
        present: !finite.is_empty(),
    };
    let sealed = key.seal(
        &contribution_context(&req.release_id, &id.to_string()),
        &value.encode_to_vec(),
    );
    Ok(twin_reply::Reply::Contribute(ContributeResponse {
        sealed,
        lower: sp.lower,
        upper: sp.upper,
        noise: policy.noise.as_str().to_owned(),
        epsilon_remaining: remaining,
    }))
}

async fn ask(
    ctx: &NodeContext,
    twin: &TwinId,
    request: twin_request::Request,
) -> Result<twin_reply::Reply, proto::Error> {
    // The node coordinates a release the first twin already checked: it asks as itself.
    let mut request = TwinRequest {
        request: Some(request),
        caller: Some(ctx.own_caller()),
    };
    ctx.trust.vouch(&mut request, ctx.now_ms());
    let replies = ctx
        .fabric
        .ask(&keys::twin_rpc(twin), &request, Duration::from_secs(5))
        .await
        .map_err(|e| err(proto::ErrorCode::Unavailable, format!("fabric: {e}")))?;
    if replies.is_empty() {
        return Err(err(
            proto::ErrorCode::NotFound,
            format!("unknown twin {twin}"),
        ));
    }
    // Only the twin's own node can prove a reply for this request.
    let reply = replies.iter().find_map(|r| {
        ctx.trust
            .answer::<TwinReply>(request.caller.as_ref(), &r.payload)
    });
    match reply {
        Some(TwinReply {
            reply: Some(twin_reply::Reply::Error(e)),
            ..
        }) => Err(e),
        Some(TwinReply { reply: Some(r), .. }) => Ok(r),
        _ => Err(err(
            proto::ErrorCode::Internal,
            format!("no reply from {twin} proven by a mesh node"),
        )),
    }
}

/// Each twin's policy for `signal` (asked on its node), refusing suppressed signals.
async fn policies_of(
    ctx: &Arc<NodeContext>,
    ids: &[TwinId],
    kind: AssetKind,
    signal: &str,
) -> Result<Vec<(TwinId, privacy::SignalPolicy)>, proto::Error> {
    let asked: Vec<(TwinId, Result<twin_reply::Reply, proto::Error>)> = stream::iter(ids.to_vec())
        .map(|id| {
            let ctx = ctx.clone();
            async move {
                let r = twin_request::Request::GetPolicy(proto::GetPolicyRequest {
                    twin_id: id.to_string(),
                });
                let out = ask(&ctx, &id, r).await;
                (id, out)
            }
        })
        .buffer_unordered(CONTRIBUTE_CONCURRENCY)
        .collect()
        .await;
    let mut out = Vec::with_capacity(asked.len());
    for (id, r) in asked {
        let p = match r {
            Ok(twin_reply::Reply::Policy(p)) => p,
            Ok(_) => {
                return Err(err(
                    proto::ErrorCode::Internal,
                    format!("unexpected reply from {id}"),
                ))
            }
            Err(mut e) => {
                e.message = format!("policy of {id}: {}", e.message);
                return Err(e);
            }
        };
        let policy = Policy::from_stored(&p, kind).map_err(|e| {
            err(
                proto::ErrorCode::InvalidArgument,
                format!("a set release covers twins of one kind ({kind}): {id}: {e}"),
            )
        })?;
        let sp = signal_policy(&policy, kind, signal)?.clone();
        out.push((id, sp));
    }
    out.sort_by_key(|(id, _)| id.to_string());
    Ok(out)
}

/// The site's twins of `kind`, from the placement authority (the roster micro-aggregation
/// groups are cut from).
async fn roster_of(
    ctx: &NodeContext,
    site: &str,
    kind: AssetKind,
) -> Result<Vec<TwinId>, proto::Error> {
    let replies = ctx
        .fabric
        .query(
            &keys::placements_of_site(site),
            None,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| {
            err(
                proto::ErrorCode::Unavailable,
                format!(
                    "the roster of site {site} is out of reach ({e}): micro-aggregates need it"
                ),
            )
        })?;
    let kind_name = kind.to_string();
    let mut ids: Vec<TwinId> = replies
        .into_iter()
        .filter_map(|r| r.decode::<proto::Placement>().ok())
        .filter(|p| p.kind == kind_name)
        .filter_map(|p| p.twin_id.parse().ok())
        .collect();
    ids.sort_by_key(TwinId::to_string);
    ids.dedup();
    if ids.len() > MAX_RELEASE_TWINS {
        return Err(err(
            proto::ErrorCode::InvalidArgument,
            format!(
                "site {site} has {} twins of {kind}, at most {MAX_RELEASE_TWINS} in one release",
                ids.len()
            ),
        ));
    }
    Ok(ids)
}

/// A step of the site's ledger of set releases, at the placement authority.
async fn site_ledger(
    ctx: &NodeContext,
    req: proto::SiteBudgetRequest,
) -> Result<proto::Budget, proto::Error> {
    let reply = crate::mesh::ask_authority(
        &*ctx.fabric,
        &ctx.trust,
        ctx.own_caller(),
        proto::mesh_request::Request::SiteBudget(req),
        Duration::from_secs(5),
        ctx.now_ms(),
    )
    .await
    .map_err(|mut e| {
        if e.code == proto::ErrorCode::Unavailable as i32 {
            e.message = format!(
                "the site's ledger of set releases is out of reach ({}): set releases need it",
                e.message
            );
        }
        e
    })?;
    match reply {
        proto::mesh_reply::Reply::SiteBudget(b) => Ok(b),
        _ => Err(err(
            proto::ErrorCode::Internal,
            "unexpected reply from the placement authority".to_owned(),
        )),
    }
}

async fn coordinate_set(
    ctx: &Arc<NodeContext>,
    actor: &ActorRef<TwinMsg>,
    first: &TwinId,
    kind: AssetKind,
    req: ReleaseAggregateRequest,
    caller: Option<proto::Caller>,
) -> Reply {
    check_range(req.start_ns, req.end_ns)?;
    let statistic = Statistic::from_proto(req.statistic).map_err(domain)?;
    if req.twin_ids.len() > MAX_RELEASE_TWINS {
        return Err(domain(DomainError::InvalidArgument(format!(
            "{} twins in one release, at most {MAX_RELEASE_TWINS}",
            req.twin_ids.len()
        ))));
    }
    let mut ids: Vec<TwinId> = Vec::with_capacity(req.twin_ids.len());
    for s in &req.twin_ids {
        let id: TwinId = s.parse().map_err(domain)?;
        if id.site() != first.site() {
            return Err(domain(DomainError::InvalidArgument(format!(
                "a set release covers twins of one site: {id} is not on {}",
                first.site()
            ))));
        }
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let key = site_key(ctx, "it cannot coordinate a set release")?;
    // Every twin's own policy counts, and the strictest decides: a suppressed twin
    // stops the release; a micro-aggregated one makes it cover the site's fixed groups
    // (never the caller's set); one that asks for DP adds noise and is charged.
    let mut members = policies_of(ctx, &ids, kind, &req.signal).await?;
    let mut k = 0;
    if members
        .iter()
        .any(|(_, sp)| sp.mechanism == Mechanism::MicroAggregate)
    {
        let roster = roster_of(ctx, first.site(), kind).await?;
        let all = policies_of(ctx, &roster, kind, &req.signal).await?;
        // The largest k a micro-aggregated twin asks for (others' k is unused).
        k = all
            .iter()
            .filter(|(_, sp)| sp.mechanism == Mechanism::MicroAggregate)
            .map(|(_, sp)| if sp.k == 0 { privacy::DEFAULT_K } else { sp.k })
            .max()
            .unwrap_or(privacy::DEFAULT_K);
        let names = |v: &[TwinId]| v.iter().map(TwinId::to_string).collect::<Vec<_>>();
        let groups = privacy::micro_groups(&names(&roster), k).map_err(domain)?;
        let chosen = privacy::micro_members(&groups, &names(&ids)).map_err(domain)?;
        members = all
            .into_iter()
            .filter(|(id, _)| chosen.contains(&id.to_string()))
            .collect();
    }
    let ids: Vec<TwinId> = members.iter().map(|(id, _)| id.clone()).collect();
    let micro = members
        .iter()
        .all(|(_, sp)| matches!(sp.mechanism, Mechanism::MicroAggregate | Mechanism::None));
    // One bound for all: the widest, so each twin's clamped contribution is covered.
    let lower = members
        .iter()
        .map(|(_, sp)| sp.lower)
        .fold(f64::INFINITY, f64::min);
    let upper = members
        .iter()
        .map(|(_, sp)| sp.upper)
        .fold(f64::NEG_INFINITY, f64::max);
    let policy = policy_of(ctx, actor, first, kind).await?;
    let spec = ReleaseSpec {
        statistic,
        noise: policy.noise,
        lower,
        upper,
        epsilon: req.epsilon,
        delta: policy.delta,
        // One record per twin.
        d_in: 1,
    };
    let plan = if micro {
        None
    } else {
        let spec2 = spec;
        // The twins released over: public (the caller's set, or its whole groups).
        let n = ids.len();
        Some(
            tokio::task::spawn_blocking(move || privacy::plan(&spec2, n))
                .await
                .map_err(|e| err(proto::ErrorCode::Internal, format!("release failed: {e}")))?
                .map_err(domain)?,
        )
    };
    let (epsilon, delta) = plan.map_or((0.0, 0.0), |p| (p.epsilon, p.delta));
    // Charged: the twins whose own policy asks for noise.
    let charged_eps = |id: &TwinId| {
        let dp = members.iter().any(|(m, sp)| {
            m == id && !matches!(sp.mechanism, Mechanism::MicroAggregate | Mechanism::None)
        });
        if dp {
            (epsilon, delta)
        } else {
            (0.0, 0.0)
        }
    };
    let release_id = format!("{first}@{}", ctx.now_ns());
    let site_request = |refund: bool| proto::SiteBudgetRequest {
        site: first.site().to_owned(),
        release_id: release_id.clone(),
        epsilon,
        delta,
        refund,
    };
    // The site's ledger first: what it refuses charges no twin.
    let site_budget = if epsilon > 0.0 {
        Some(site_ledger(ctx, site_request(false)).await?)
    } else {
        None
    };
    let contribution = |id: &TwinId, refund: bool| {
        let (epsilon, delta) = charged_eps(id);
        twin_request::Request::Contribute(ContributeRequest {
            twin_id: id.to_string(),
            signal: req.signal.clone(),
            start_ns: req.start_ns,
            end_ns: req.end_ns,
            epsilon,
            delta,
            refund,
            release_id: release_id.clone(),
        })
    };
    let requests: Vec<(TwinId, twin_request::Request)> = ids
        .iter()
        .map(|id| (id.clone(), contribution(id, false)))
        .collect();
    let results: Vec<(TwinId, Result<twin_reply::Reply, proto::Error>)> = stream::iter(requests)
        .map(|(id, r)| {
            let ctx = ctx.clone();
            async move {
                let out = ask(&ctx, &id, r).await;
                (id, out)
            }
        })
        .buffer_unordered(CONTRIBUTE_CONCURRENCY)
        .collect()
        .await;
    let mut values = Vec::with_capacity(results.len());
    let mut failure: Option<proto::Error> = None;
    let mut charged: Vec<TwinId> = Vec::new();
    let mut remaining = f64::INFINITY;
    for (id, r) in results {
        match r {
            Ok(twin_reply::Reply::Contribute(c)) => {
                charged.push(id.clone());
                if c.epsilon_remaining.is_finite() {
                    remaining = remaining.min(c.epsilon_remaining);
                }
                match key.open(
                    &contribution_context(&release_id, &id.to_string()),
                    &c.sealed,
                ) {
                    Ok(plain) => match ContributionValue::decode(plain.as_slice()) {
                        Ok(v) if v.present => values.push(v.value),
                        Ok(_) => {}
                        Err(e) => {
                            failure.get_or_insert(err(
                                proto::ErrorCode::Internal,
                                format!("contribution of {id}: {e}"),
                            ));
                        }
                    },
                    Err(e) => {
                        failure.get_or_insert(err(
                            proto::ErrorCode::FailedPrecondition,
                            format!("contribution of {id}: {e}"),
                        ));
                    }
                }
            }
            Ok(_) => {
                failure.get_or_insert(err(
                    proto::ErrorCode::Internal,
                    format!("unexpected reply from {id}"),
                ));
            }
            Err(mut e) => {
                e.message = format!("{id}: {}", e.message);
                failure.get_or_insert(e);
            }
        }
    }
    let outcome = match (&failure, plan) {
        (Some(e), _) => Err(e.clone()),
        (None, None) => privacy::micro_aggregate(statistic, &values, k.max(2))
            .map(|v| (v, "micro_aggregate".to_owned(), 0.0))
            .map_err(domain),
        (None, Some(p)) => {
            let vals = values.clone();
            tokio::task::spawn_blocking(move || privacy::release_planned(&spec, &p, &vals))
                .await
                .map_err(|e| err(proto::ErrorCode::Internal, format!("release failed: {e}")))?
                .map(|r| (r.value, r.mechanism, r.scale))
                .map_err(domain)
        }
    };
    let (value, mechanism, scale) = match outcome {
        Ok(v) => v,
        Err(e) => {
            // Nothing is released: give back what the site and the twins were charged.
            if epsilon > 0.0 {
                if let Err(r) = site_ledger(ctx, site_request(true)).await {
                    tracing::warn!(site = first.site(), "refund of set release {release_id} to the site ledger failed (ε stays spent): {}", r.message);
                }
                for id in &charged {
                    if let Err(r) = ask(ctx, id, contribution(id, true)).await {
                        tracing::warn!(twin = %id, "refund of set release {release_id} failed (ε stays spent): {}", r.message);
                    }
                }
            }
            return Err(e);
        }
    };
    // A DP release reports the size it was planned on (public), never how many twins
    // had data in the range; a micro-aggregate the size of its whole groups' data.
    let records = if micro { values.len() } else { ids.len() } as u64;
    let event = proto::TwinEvent {
        twin_id: first.to_string(),
        kind: "privacy_release".to_owned(),
        timestamp_ns: ctx.now_ns(),
        message: format!(
            "{} of {} over {} twins released ({mechanism}, ε {epsilon:.6})",
            statistic.as_str(),
            req.signal,
            ids.len()
        ),
        attributes: [
            ("signal", req.signal.clone()),
            ("statistic", statistic.as_str().to_owned()),
            ("mechanism", mechanism.clone()),
            ("epsilon", epsilon.to_string()),
            ("delta", delta.to_string()),
            ("noise_scale", scale.to_string()),
            ("twins", ids.len().to_string()),
            ("records", records.to_string()),
            ("release_id", release_id.clone()),
            ("value", value.to_string()),
            ("by", caller.map(|c| c.subject).unwrap_or_default()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        epoch: 0,
    };
    if let Err(e) = ctx
        .fabric
        .put(
            &keys::twin_events(first),
            &event,
            crate::ports::Qos::Reliable,
        )
        .await
    {
        tracing::warn!(twin = %first, "audit event of {release_id} not published: {e}");
    }
    Ok(twin_reply::Reply::Release(ReleaseAggregateResponse {
        value,
        epsilon_spent: epsilon,
        epsilon_remaining: if remaining.is_finite() {
            remaining
        } else {
            0.0
        },
        mechanism,
        noise_scale: scale,
        records,
        delta_spent: delta,
        site_epsilon_remaining: site_budget.map(|b| (b.epsilon_total - b.epsilon_spent).max(0.0)),
    }))
}
