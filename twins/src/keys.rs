//! The Zenoh key space of DESIGN §6, as functions, so no key is spelled twice.

use crate::id::{NodeId, TwinId};

pub const ROOT: &str = "twinmesh";

pub fn telemetry(twin: &TwinId, signal: &str) -> String {
    format!(
        "twinmesh/telemetry/{}/{}/{signal}",
        twin.site(),
        twin.asset()
    )
}

/// Every signal of one twin.
pub fn telemetry_of(twin: &TwinId) -> String {
    format!("twinmesh/telemetry/{}/{}/*", twin.site(), twin.asset())
}

/// Splits `twinmesh/telemetry/{site}/{asset}/{signal}` into (site, asset, signal).
pub fn parse_telemetry(key: &str) -> Option<(&str, &str, &str)> {
    let rest = key.strip_prefix("twinmesh/telemetry/")?;
    let mut parts = rest.split('/');
    let (site, asset, signal) = (parts.next()?, parts.next()?, parts.next()?);
    parts.next().is_none().then_some((site, asset, signal))
}

pub fn twin_state(twin: &TwinId) -> String {
    format!("twinmesh/twins/{twin}/state")
}

pub fn twin_features(twin: &TwinId) -> String {
    format!("twinmesh/twins/{twin}/features")
}

pub fn twin_events(twin: &TwinId) -> String {
    format!("twinmesh/twins/{twin}/events")
}

/// State, features and events of one twin.
pub fn twin_updates(twin: &TwinId) -> String {
    format!("twinmesh/twins/{twin}/*")
}

/// A model version in the cloud's registry (queryable; replies `ModelRecord`).
pub fn model(model_id: &str, version: u64) -> String {
    format!("twinmesh/models/{model_id}/{version}")
}

/// Every model version (the registry's queryable).
pub const MODELS: &str = "twinmesh/models/*/*";

/// Splits `twinmesh/models/{model_id}/{version}`.
pub fn parse_model(key: &str) -> Option<(&str, u64)> {
    let rest = key.strip_prefix("twinmesh/models/")?;
    let (id, v) = rest.split_once('/')?;
    Some((id, v.parse().ok()?))
}

pub fn twin_rpc(twin: &TwinId) -> String {
    format!("twinmesh/rpc/twins/{twin}")
}

pub fn control(twin: &TwinId) -> String {
    format!("twinmesh/control/{twin}")
}

/// Every control key of a site (one chunk per asset: excludes the `delivered` replies).
pub fn control_of_site(site: &str) -> String {
    format!("twinmesh/control/{site}/*")
}

pub fn control_delivered(twin: &TwinId) -> String {
    format!("twinmesh/control/{twin}/delivered")
}

pub fn chain(twin: &TwinId) -> String {
    format!("twinmesh/chains/{twin}")
}

pub fn chains_of_site(site: &str) -> String {
    format!("twinmesh/chains/{site}/*")
}

/// Feature sets of every twin (the cloud archive listens here).
pub const FEATURES_ALL: &str = "twinmesh/twins/*/*/features";

/// Replicated snapshots (twin → cloud) and their queryable (cloud).
pub fn snapshot(twin: &TwinId) -> String {
    format!("twinmesh/snapshots/{twin}")
}

pub const SNAPSHOTS_ALL: &str = "twinmesh/snapshots/**";

pub fn replay(twin: &TwinId) -> String {
    format!("twinmesh/replay/{twin}")
}

pub fn replay_of_site(site: &str) -> String {
    format!("twinmesh/replay/{site}/*")
}

/// Migrate/drain requests to the placement authority.
pub const MESH_REQUESTS: &str = "twinmesh/mesh/requests";

pub fn acks(twin: &TwinId) -> String {
    format!("twinmesh/acks/{twin}")
}

pub fn acks_of_site(site: &str) -> String {
    format!("twinmesh/acks/{site}/*")
}

pub fn placement(twin: &TwinId) -> String {
    format!("twinmesh/placement/{twin}")
}

pub const PLACEMENT_ALL: &str = "twinmesh/placement/**";

/// Queryable of a kind defined by a Thing Model: its `KindModel`, from the edge and
/// cloud nodes that know it.
pub fn kind_model(kind: &str) -> String {
    format!("twinmesh/kinds/{kind}")
}

pub const KINDS_ALL: &str = "twinmesh/kinds/*";

/// The kind a [`kind_model`] key names.
pub fn parse_kind_model(key: &str) -> Option<&str> {
    key.strip_prefix("twinmesh/kinds/")
        .filter(|k| crate::id::is_valid_segment(k))
}

pub fn placements_of_site(site: &str) -> String {
    format!("twinmesh/placement/{site}/*")
}

pub fn node_token(node: &NodeId) -> String {
    format!("twinmesh/nodes/{node}")
}

pub const NODE_TOKENS: &str = "twinmesh/nodes/*";

pub fn node_info(node: &NodeId) -> String {
    format!("twinmesh/nodes/{node}/info")
}

pub const NODE_INFO_ALL: &str = "twinmesh/nodes/*/info";

pub fn node_load(node: &NodeId) -> String {
    format!("twinmesh/nodes/{node}/load")
}

pub fn node_twins(node: &NodeId) -> String {
    format!("twinmesh/nodes/{node}/twins")
}

pub const NODE_TWINS_ALL: &str = "twinmesh/nodes/*/twins";

/// Extracts `{node}` from `twinmesh/nodes/{node}`.
pub fn parse_node_token(key: &str) -> Option<&str> {
    let node = key.strip_prefix("twinmesh/nodes/")?;
    (!node.contains('/')).then_some(node)
}

/// Extracts the twin id from `twinmesh/{section}/{site}/{asset}[/...]`.
pub fn parse_twin_in(key: &str, section: &str) -> Option<TwinId> {
    let rest = key.strip_prefix("twinmesh/")?.strip_prefix(section)?;
    let mut parts = rest.strip_prefix('/')?.split('/');
    TwinId::new(parts.next()?, parts.next()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_design() {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        assert_eq!(
            telemetry(&id, "power"),
            "twinmesh/telemetry/site-a/wt-01/power"
        );
        assert_eq!(
            parse_telemetry("twinmesh/telemetry/site-a/wt-01/power"),
            Some(("site-a", "wt-01", "power"))
        );
        assert_eq!(parse_telemetry("twinmesh/telemetry/site-a/wt-01"), None);
        assert_eq!(parse_telemetry("twinmesh/telemetry/a/b/c/d"), None);
        assert_eq!(twin_state(&id), "twinmesh/twins/site-a/wt-01/state");
        assert_eq!(twin_rpc(&id), "twinmesh/rpc/twins/site-a/wt-01");
        assert_eq!(
            parse_twin_in("twinmesh/placement/site-a/wt-01", "placement"),
            Some(id.clone())
        );
        assert_eq!(
            parse_twin_in("twinmesh/control/site-a/wt-01/delivered", "control"),
            Some(id)
        );
        assert_eq!(parse_node_token("twinmesh/nodes/edge-a"), Some("edge-a"));
        assert_eq!(parse_node_token("twinmesh/nodes/edge-a/info"), None);
    }
}
