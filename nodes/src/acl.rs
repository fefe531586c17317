//! Zenoh access control generated from a roster of certificate names (issue 5, item 6).
//!
//! Every node of a mesh gets the same roster file (`--acl FILE`, `acl_file` in its
//! configuration) and turns it into Zenoh's `access_control` block, enforced on each
//! of its links by the certificate common name of the node on the other end (so the
//! roster needs mutual TLS). Permission is denied by default; the roster names who gets
//! what, per tier:
//!
//! - `mesh` (edge and cloud daemons): everything under every key;
//! - `gateways` (IoT gateways, per site): publish the telemetry of their own site and
//!   the delivery reports of its control keys; subscribe to their site's control,
//!   acknowledgement, chain, replay and placement keys; query their site's placements
//!   and twins; announce and serve their own `twinmesh/nodes/{name}` keys. Nothing else
//!   reaches them or comes from them: not another site's telemetry, not state, features,
//!   snapshots or events;
//! - `readers` (dashboards, tools): subscribe to and query `twinmesh/**`, publish nothing;
//! - `routers` (`twinmesh router` processes between nodes that cannot reach each other):
//!   everything, as the mesh, since they forward whatever the mesh sends. A router holds
//!   no mesh or control key, so it can forge nothing the mesh checks; it enforces this
//!   same roster on the links of the gateways and readers connected to it.
//!
//! A name signed by the CA but absent from the roster gets nothing at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use twinmesh_twins::{id::validate_site, keys, NodeId};

/// The roster: which certificate names belong to which tier.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roster {
    /// Edge and cloud nodes: full access.
    #[serde(default)]
    pub mesh: Vec<NodeId>,
    /// IoT gateways per site: their own site's telemetry and control keys only.
    #[serde(default)]
    pub gateways: BTreeMap<String, Vec<NodeId>>,
    /// Read-only clients.
    #[serde(default)]
    pub readers: Vec<NodeId>,
    /// Zenoh routers between the nodes: they forward everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routers: Vec<NodeId>,
}

/// Egress declarations every subject receives, so that what it publishes or asks is
/// routed to the subscribers and queryables of the mesh (the names of keys, not data).
const ROUTES: &str = "routes to the mesh";

impl Roster {
    /// Reads and validates a roster file.
    pub fn from_file(path: &Path) -> crate::Result<Roster> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            crate::Error::config(format!("cannot read ACL roster {}: {e}", path.display()))
        })?;
        let roster: Roster = toml::from_str(&text).map_err(|e| {
            crate::Error::config(format!(
                "invalid ACL roster {}: {}",
                path.display(),
                e.to_string().trim().replace('\n', " ")
            ))
        })?;
        roster.validate().map_err(|e| {
            crate::Error::config(format!("invalid ACL roster {}: {e}", path.display()))
        })?;
        Ok(roster)
    }

    /// Every name once, sites valid, at least one mesh node.
    pub fn validate(&self) -> crate::Result<()> {
        if self.mesh.is_empty() {
            return Err(crate::Error::config(
                "`mesh` lists no node: no edge or cloud node could reach another".to_string(),
            ));
        }
        let mut seen = BTreeSet::new();
        for name in self.names() {
            if !seen.insert(name.as_str()) {
                return Err(crate::Error::config(format!(
                    "{name} is listed twice (a name belongs to one tier)"
                )));
            }
        }
        for (site, names) in &self.gateways {
            validate_site(site).map_err(|e| crate::Error::config(format!("gateways: {e}")))?;
            if names.is_empty() {
                return Err(crate::Error::config(format!("gateways of {site}: no name")));
            }
        }
        Ok(())
    }

    /// Every name of the roster, of every tier.
    fn names(&self) -> impl Iterator<Item = &NodeId> {
        self.mesh
            .iter()
            .chain(self.gateways.values().flatten())
            .chain(&self.readers)
            .chain(&self.routers)
    }

    /// Whether `name` appears anywhere in the roster.
    pub fn lists(&self, name: &NodeId) -> bool {
        self.names().any(|n| n == name)
    }

    /// Zenoh's `access_control` block for this roster (the same on every node).
    pub fn zenoh_acl(&self) -> Value {
        let mut rules = vec![
            rule(
                "mesh: everything",
                &["ingress", "egress"],
                &[
                    "put",
                    "delete",
                    "declare_subscriber",
                    "query",
                    "declare_queryable",
                    "reply",
                    "liveliness_token",
                    "declare_liveliness_subscriber",
                    "liveliness_query",
                ],
                &["**".to_owned()],
            ),
            rule(
                ROUTES,
                &["egress"],
                &[
                    "declare_subscriber",
                    "declare_queryable",
                    "liveliness_token",
                ],
                &["twinmesh/**".to_owned()],
            ),
            rule(
                "readers: subscribe and query",
                &["ingress"],
                &[
                    "declare_subscriber",
                    "query",
                    "declare_liveliness_subscriber",
                    "liveliness_query",
                ],
                &["twinmesh/**".to_owned()],
            ),
            rule(
                "readers: receive",
                &["egress"],
                &["put", "delete", "reply"],
                &["twinmesh/**".to_owned()],
            ),
        ];
        let mut subjects = Vec::new();
        let mut policies = Vec::new();
        if !self.mesh.is_empty() {
            subjects.push(subject("mesh", &self.mesh));
            policies.push(json!({ "rules": ["mesh: everything"], "subjects": ["mesh"] }));
        }
        if !self.routers.is_empty() {
            subjects.push(subject("routers", &self.routers));
            policies.push(json!({ "rules": ["mesh: everything"], "subjects": ["routers"] }));
        }
        if !self.readers.is_empty() {
            subjects.push(subject("readers", &self.readers));
            policies.push(json!({
                "rules": [ROUTES, "readers: subscribe and query", "readers: receive"],
                "subjects": ["readers"],
            }));
        }
        for (site, names) in &self.gateways {
            for name in names {
                let (own, ids) = gateway_rules(site, name);
                rules.extend(own);
                let id = format!("gateway {name}");
                subjects.push(subject(&id, std::slice::from_ref(name)));
                let mut applied = vec![Value::from(ROUTES)];
                applied.extend(ids.into_iter().map(Value::from));
                policies.push(json!({ "rules": applied, "subjects": [id] }));
            }
        }
        json!({
            "enabled": true,
            "default_permission": "deny",
            "rules": rules,
            "subjects": subjects,
            "policies": policies,
        })
    }
}

fn rule(id: &str, flows: &[&str], messages: &[&str], keys: &[String]) -> Value {
    json!({
        "id": id,
        "permission": "allow",
        "flows": flows,
        "messages": messages,
        "key_exprs": keys,
    })
}

fn subject(id: &str, names: &[NodeId]) -> Value {
    let names: Vec<&str> = names.iter().map(NodeId::as_str).collect();
    json!({ "id": id, "cert_common_names": names })
}

/// The rules of one gateway (`name` on `site`) and their ids. The keys are those of
/// `twinmesh_twins::keys` for the site (DESIGN §6).
fn gateway_rules(site: &str, name: &NodeId) -> (Vec<Value>, Vec<String>) {
    let site_keys = |sections: &[&str]| -> Vec<String> {
        sections
            .iter()
            .map(|s| format!("twinmesh/{s}/{site}/*"))
            .collect()
    };
    let own = format!("twinmesh/nodes/{name}/*");
    let delivered = site_keys(&["acks", "control", "chains", "replay", "placement"]);
    let asks = vec![
        format!("twinmesh/placement/{site}/*"),
        format!("twinmesh/rpc/twins/{site}/*"),
    ];
    let publishes = [
        format!("twinmesh/telemetry/{site}/**"),
        format!("twinmesh/control/{site}/*/delivered"),
        own.clone(),
    ];
    let mut rules = Vec::new();
    let mut ids = Vec::new();
    let mut add = |what: &str, flows: &[&str], messages: &[&str], keys: &[String]| {
        let id = format!("gateway {name}: {what}");
        rules.push(rule(&id, flows, messages, keys));
        ids.push(id);
    };
    add("publish", &["ingress"], &["put"], &publishes);
    add(
        "subscribe",
        &["ingress"],
        &["declare_subscriber"],
        &delivered,
    );
    add("receive", &["egress"], &["put"], &delivered);
    add("query", &["ingress"], &["query"], &asks);
    add("answers", &["egress"], &["reply"], &asks);
    let own = [own];
    add("serve", &["ingress"], &["declare_queryable", "reply"], &own);
    // Queries reach the gateway's queryables under their own key and under the
    // wildcards of the listings (`ctl nodes`, `ctl twins`): Zenoh's ACL matches the
    // query's key expression, which a rule must include, and `twinmesh/nodes/*/info`
    // is not included in `twinmesh/nodes/{name}/*`. Without them the gateways were
    // missing from every listing under an ACL.
    let served = [
        own[0].clone(),
        keys::NODE_INFO_ALL.to_owned(),
        keys::NODE_TWINS_ALL.to_owned(),
    ];
    add("served", &["egress"], &["query"], &served);
    let token = [format!("twinmesh/nodes/{name}")];
    add("announce", &["ingress"], &["liveliness_token"], &token);
    (rules, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster() -> Roster {
        toml::from_str(
            r#"
            mesh = ["cloud", "edge-a"]
            readers = ["dashboard"]
            [gateways]
            site-a = ["iot-a"]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn zenoh_accepts_the_generated_block() {
        let acl = roster().zenoh_acl();
        let mut c = zenoh::Config::default();
        c.insert_json5("access_control", &acl.to_string()).unwrap();
        // Denied unless a policy allows it.
        assert_eq!(acl["default_permission"], "deny");
        let policies = acl["policies"].as_array().unwrap();
        assert_eq!(policies.len(), 3, "{acl:#}");
    }

    #[test]
    fn routers_forward_everything_and_share_the_roster() {
        let mut r = roster();
        r.routers = vec!["router-a".parse().unwrap()];
        r.validate().unwrap();
        assert!(r.lists(&"router-a".parse().unwrap()));
        let acl = r.zenoh_acl();
        let policies = acl["policies"].as_array().unwrap();
        assert!(
            policies.iter().any(|p| p["subjects"] == json!(["routers"])
                && p["rules"] == json!(["mesh: everything"])),
            "{acl:#}"
        );
        let routers = acl["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "routers")
            .unwrap();
        assert_eq!(routers["cert_common_names"], json!(["router-a"]));
        // A router cannot also be a mesh node or a gateway.
        r.mesh.push("router-a".parse().unwrap());
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("listed twice"));
        // A roster without routers reads and writes as before.
        assert!(!toml::to_string(&roster()).unwrap().contains("routers"));
    }

    #[test]
    fn a_gateway_gets_its_own_site_only() {
        let acl = roster().zenoh_acl();
        let keys: Vec<String> = acl["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["id"].as_str().unwrap().starts_with("gateway iot-a"))
            .flat_map(|r| r["key_exprs"].as_array().unwrap().clone())
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        assert!(keys.contains(&"twinmesh/telemetry/site-a/**".to_owned()));
        assert!(keys.contains(&"twinmesh/nodes/iot-a/*".to_owned()));
        for k in &keys {
            assert!(
                k.contains("/site-a/")
                    || k.starts_with("twinmesh/nodes/iot-a")
                    || [keys::NODE_INFO_ALL, keys::NODE_TWINS_ALL].contains(&k.as_str()),
                "{k} is not a key of site-a or of the gateway itself"
            );
        }
    }

    /// The rule of `gateway` with the id suffix `what`, as (flows, messages, keys).
    fn gateway_rule(
        acl: &Value,
        gateway: &str,
        what: &str,
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        let rule = acl["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == format!("gateway {gateway}: {what}"))
            .unwrap_or_else(|| panic!("no rule {what} of {gateway}"));
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect()
        };
        (
            strings(&rule["flows"]),
            strings(&rule["messages"]),
            strings(&rule["key_exprs"]),
        )
    }

    /// `ctl nodes` asks `twinmesh/nodes/*/info`: the query must be allowed out to a
    /// gateway under that very key expression (Zenoh's ACL wants a rule that includes
    /// it), and its reply on the gateway's own key allowed in.
    #[test]
    fn the_listings_reach_the_gateways_and_their_replies_come_back() {
        let acl = roster().zenoh_acl();
        let (flows, messages, exprs) = gateway_rule(&acl, "iot-a", "served");
        assert_eq!(
            (flows, messages),
            (vec!["egress".into()], vec!["query".into()])
        );
        for listing in [
            keys::NODE_INFO_ALL,
            keys::NODE_TWINS_ALL,
            "twinmesh/nodes/iot-a/*",
        ] {
            assert!(
                exprs.contains(&listing.to_owned()),
                "{listing} not in {exprs:?}"
            );
        }
        let (flows, messages, exprs) = gateway_rule(&acl, "iot-a", "serve");
        assert_eq!(flows, vec!["ingress".to_owned()]);
        assert!(messages.contains(&"reply".to_owned()));
        assert_eq!(exprs, vec!["twinmesh/nodes/iot-a/*".to_owned()]);
        // The readers receive the replies.
        let reader = acl["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "readers: receive")
            .unwrap();
        assert!(reader["messages"]
            .as_array()
            .unwrap()
            .contains(&"reply".into()));
    }

    #[test]
    fn bad_rosters_are_refused_with_the_reason() {
        let dup: Roster = toml::from_str("mesh = [\"cloud\"]\nreaders = [\"cloud\"]").unwrap();
        assert!(dup.validate().unwrap_err().to_string().contains("twice"));
        let empty: Roster = toml::from_str("readers = [\"x\"]").unwrap();
        assert!(empty.validate().unwrap_err().to_string().contains("mesh"));
        let site: Roster =
            toml::from_str("mesh = [\"cloud\"]\n[gateways]\n\"Site A\" = [\"iot\"]").unwrap();
        assert!(site.validate().is_err());
        assert!(toml::from_str::<Roster>("mesh = [\"a/b\"]").is_err());
        assert!(toml::from_str::<Roster>("mesh = [\"cloud\"]\nwriters = []").is_err());
    }
}
