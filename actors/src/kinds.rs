//! Kinds that travel: a Thing Model a gateway's registration brings to the placement
//! authority reaches every edge and cloud node that hosts or serves the kind's twins.
//!
//! - The authority learns a kind only from a registration proven under the twin's site
//!   control key ([`learn`]); a built-in name or a name it knows with another definition
//!   is refused (`twinmesh_twins::kind::register`), so no gateway redefines what another
//!   site's twins mean (e.g. makes their personal signal public).
//! - Edge and cloud nodes that know a kind serve it on `twinmesh/kinds/{kind}`
//!   ([`serve`]), proven under the mesh key, which gateways do not hold: a gateway cannot
//!   answer with a forged definition.
//! - A node asked to host a twin of a kind it does not know fetches it ([`resolve`]) and
//!   keeps it in its store; every node reloads its stored kinds at start ([`reload`]), so
//!   a restarted edge knows them with the cloud down.

use std::time::Duration;

use twinmesh_twins::kind::{self, KindSource};
use twinmesh_twins::proto::KindModel;
use twinmesh_twins::{keys, AssetKind};

use crate::context::NodeContext;
use crate::metrics::NodeMetrics;
use crate::ports::{Queryable, Store};

/// How long a node waits for a kind's definition from its peers.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The record of a kind this node knows and did not get built in (what it serves).
fn record(kind: AssetKind, own_site: &str) -> Option<KindModel> {
    let schema = kind.schema();
    let site = match &schema.source {
        KindSource::BuiltIn => return None,
        KindSource::File(_) => own_site.to_owned(),
        KindSource::Fabric { site } => site.clone(),
    };
    Some(KindModel {
        kind: schema.name.to_owned(),
        thing_model: schema.thing_model.to_owned(),
        site,
        proof: None,
    })
}

/// The authority accepts the Thing Model of a registration from a gateway of `site`
/// (already proven under the site's control key): registers it and keeps it.
pub fn learn(
    store: &dyn Store,
    site: &str,
    name: &str,
    thing_model: &str,
) -> crate::Result<AssetKind> {
    let origin = format!("thing model of kind {name} registered by site {site}");
    let model = kind::ThingModel::parse(thing_model, &origin)
        .map_err(|e| crate::Error::Domain(e.into()))?;
    if model.kind != name {
        return Err(crate::Error::Domain(
            twinmesh_twins::Error::InvalidArgument(format!(
                "{origin}: the model defines kind {}, the registration names {name}",
                model.kind
            )),
        ));
    }
    let kind = kind::register(
        model,
        thing_model,
        KindSource::Fabric {
            site: site.to_owned(),
        },
    )
    .map_err(|e| crate::Error::Domain(e.into()))?;
    if let Some(rec) = record(kind, site) {
        store.save_kind(&rec)?;
    }
    Ok(kind)
}

/// Registers the kinds this node kept (at start, before any twin starts). A stored kind
/// that no longer fits (a models folder now defines the name differently) is skipped
/// with a warning: the folder wins on this node.
pub fn reload(store: &dyn Store) -> crate::Result<Vec<AssetKind>> {
    let mut out = Vec::new();
    for m in store.kinds()? {
        let origin = format!("stored thing model of kind {} (site {})", m.kind, m.site);
        match kind::register_text(
            &m.thing_model,
            &origin,
            KindSource::Fabric {
                site: m.site.clone(),
            },
        ) {
            Ok(k) => out.push(k),
            Err(e) => tracing::warn!("kind not reloaded: {e}"),
        }
    }
    Ok(out)
}

/// The kind named `name`: known here, or fetched from the edge and cloud nodes that
/// know it (proven under the mesh key), registered and kept.
pub async fn resolve(ctx: &NodeContext, name: &str) -> crate::Result<AssetKind> {
    if let Some(k) = kind::lookup(name) {
        return Ok(k);
    }
    let unknown = || crate::Error::Domain(twinmesh_twins::Error::UnknownKind(name.to_owned()));
    if !twinmesh_twins::id::is_valid_segment(name) {
        return Err(unknown());
    }
    let replies = ctx
        .fabric
        .query(&keys::kind_model(name), None, FETCH_TIMEOUT)
        .await?;
    let mut refusal = None;
    for r in replies {
        let Ok(mut m) = r.decode::<KindModel>() else {
            NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
            continue;
        };
        if ctx.trust.proven_mesh(&mut m).is_none() || m.kind != name {
            NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
            tracing::warn!(
                kind = name,
                "dropped a kind definition without a mesh node's proof"
            );
            continue;
        }
        let origin = format!("thing model of kind {name} from the mesh (site {})", m.site);
        match kind::register_text(
            &m.thing_model,
            &origin,
            KindSource::Fabric {
                site: m.site.clone(),
            },
        ) {
            Ok(k) => {
                ctx.store.save_kind(&m)?;
                tracing::info!(kind = name, site = m.site, "learned asset kind");
                return Ok(k);
            }
            Err(e) => refusal = Some(e),
        }
    }
    match refusal {
        Some(e) => Err(crate::Error::Domain(e.into())),
        None => Err(unknown()),
    }
}

/// Answers `twinmesh/kinds/{kind}` with the definitions this node knows (edge and cloud
/// nodes: only they can prove them).
pub async fn serve(ctx: std::sync::Arc<NodeContext>, queries: Queryable) {
    while let Ok(q) = queries.rx.recv_async().await {
        let Some(name) = keys::parse_kind_model(&q.key).map(str::to_owned) else {
            continue;
        };
        let Some(mut rec) = kind::lookup(&name).and_then(|k| record(k, &ctx.site)) else {
            continue;
        };
        if ctx.trust.prove_mesh(&mut rec) {
            q.reply_with(&keys::kind_model(&name), &rec);
        }
    }
}
