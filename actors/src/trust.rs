//! Trust on the fabric: who may say what on Zenoh (issue 20).
//!
//! Anyone who reaches the fabric can publish and query, so nothing a message claims is
//! believed unless a key proves it. Three kinds of keys (files in the `KEY_ID HEX64`
//! format of [`crate::seal`]; HMAC-SHA256 keys are derived from them, never the AES keys
//! themselves):
//!
//! - the **mesh key**, held by every edge and cloud node and by nobody else (not the
//!   gateways, not the readers): a caller context tagged with it was made by a mesh node,
//!   which took the caller's role from a verified token;
//! - the **site-claim key** of a site, derived from the mesh key *and* the site key, so
//!   only the site's edges hold both: a caller context that claims site S must carry a
//!   tag under S's claim key, or it is off the site (the cloud cannot claim a site);
//! - the **control key** of a site, held by the site's gateways, its edges and the cloud:
//!   telemetry, identifier batches, acknowledgements, chain and desired-value updates and
//!   placements of the site's twins carry a [`Proof`] under it.
//!
//! A request without a valid caller context is an anonymous viewer off the site: public
//! values only, no writes. A message without a valid proof is dropped and counted as
//! malformed. Every tag covers the whole message (prost encodes a message to the same
//! bytes every time: maps are ordered) with the tags themselves empty, and a domain label,
//! so a tag made for one kind of message proves nothing about another.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use prost::Message;

use twinmesh_twins::privacy::Role;
use twinmesh_twins::proto::{
    self, mesh_request, twin_request, Caller, MeshRequest, Proof, TwinRequest,
};

use crate::seal::KeyRing;

type HmacSha256 = Hmac<sha2::Sha256>;

/// How long a caller context a node makes stays valid.
pub const CALLER_TTL_MS: i64 = 30_000;
/// Clock difference between two nodes that a caller context tolerates.
pub const MAX_SKEW_MS: i64 = 30_000;

fn mac(key: &[u8; 32], label: &[u8], body: &[u8]) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("any key length");
    m.update(&(label.len() as u32).to_be_bytes());
    m.update(label);
    m.update(body);
    m
}

/// HMAC keys: the newest one makes tags, any of them checks one (keys rotate).
#[derive(Clone, Default)]
struct MacKeys(Vec<[u8; 32]>);

impl MacKeys {
    fn from_ring(ring: &KeyRing) -> Self {
        MacKeys(ring.mac_keys().to_vec())
    }

    fn tag(&self, label: &[u8], body: &[u8]) -> Option<Vec<u8>> {
        let key = self.0.last()?;
        Some(mac(key, label, body).finalize().into_bytes().to_vec())
    }

    fn verify(&self, label: &[u8], body: &[u8], tag: &[u8]) -> bool {
        !tag.is_empty()
            && self
                .0
                .iter()
                .any(|k| mac(k, label, body).verify_slice(tag).is_ok())
    }
}

/// A message that carries a [`Proof`] of who sent it.
pub trait Proven: Message + Sized {
    /// Domain label: a proof of one kind of message is no proof of another.
    const LABEL: &'static [u8];
    fn proof_mut(&mut self) -> &mut Option<Proof>;
}

macro_rules! proven {
    ($($ty:ident),*) => {$(
        impl Proven for proto::$ty {
            const LABEL: &'static [u8] = concat!("twinmesh/proof/", stringify!($ty)).as_bytes();
            fn proof_mut(&mut self) -> &mut Option<Proof> {
                &mut self.proof
            }
        }
    )*};
}

proven!(
    TelemetryFrame,
    IdentifierBatch,
    Watermark,
    ChainUpdate,
    DesiredUpdate,
    Placement,
    TwinSnapshot,
    ReplayRequest,
    NodeInfo,
    PlacementRequest,
    KindModel
);

const CALLER_LABEL: &[u8] = b"twinmesh/caller/twin";
const SITE_CALLER_LABEL: &[u8] = b"twinmesh/caller/twin/site";
const MESH_CALLER_LABEL: &[u8] = b"twinmesh/caller/mesh";

/// What one node can prove and check. A node without keys proves nothing and believes
/// nobody: its own callers reach twins as anonymous viewers, and it drops every message
/// that needs a proof.
#[derive(Clone, Default)]
pub struct Trust {
    node: String,
    site: String,
    mesh: MacKeys,
    site_key: Option<[u8; 32]>,
    /// The claim key of this node's site (mesh key and site key both held).
    site_claim: Option<[u8; 32]>,
    control: BTreeMap<String, MacKeys>,
}

impl std::fmt::Debug for Trust {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("node", &self.node)
            .field("site", &self.site)
            .field("mesh", &!self.mesh.0.is_empty())
            .field("site_claim", &self.site_claim.is_some())
            .field("control", &self.control.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Trust {
    pub fn new(node: &str, site: &str) -> Self {
        Trust {
            node: node.to_owned(),
            site: site.to_owned(),
            ..Default::default()
        }
    }

    /// Adds the mesh key (edge and cloud nodes only).
    pub fn with_mesh_key(mut self, ring: &KeyRing) -> Self {
        self.mesh = MacKeys::from_ring(ring);
        self.derive_claim();
        self
    }

    /// Adds the node's site key (on an edge, with the mesh key, it makes the site-claim
    /// key).
    pub fn with_site_key(mut self, ring: &KeyRing) -> Self {
        self.site_key = ring.mac_keys().last().copied();
        self.derive_claim();
        self
    }

    /// Adds the control key of `site`.
    pub fn with_control_key(mut self, site: &str, ring: &KeyRing) -> Self {
        self.control
            .insert(site.to_owned(), MacKeys::from_ring(ring));
        self
    }

    fn derive_claim(&mut self) {
        self.site_claim = match (self.mesh.0.last(), &self.site_key) {
            (Some(mesh), Some(site)) => {
                let mut body = self.site.as_bytes().to_vec();
                body.extend_from_slice(site);
                Some(
                    mac(mesh, b"twinmesh/site-claim-key/v1", &body)
                        .finalize()
                        .into_bytes()
                        .into(),
                )
            }
            _ => None,
        };
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether this node can vouch for callers (it holds the mesh key).
    pub fn is_mesh(&self) -> bool {
        !self.mesh.0.is_empty()
    }

    /// Whether this node holds the control key of `site`.
    pub fn controls(&self, site: &str) -> bool {
        self.control.contains_key(site)
    }

    /// Vouches for the caller of `req` (this node took the call or acts itself): the
    /// caller's site becomes this node's, and the context expires in [`CALLER_TTL_MS`].
    /// Without the mesh key the request goes out unvouched (an anonymous viewer).
    pub fn vouch(&self, req: &mut TwinRequest, now_ms: i64) {
        if self.stamp(&mut req.caller, now_ms).is_none() {
            return;
        }
        let body = req.encode_to_vec();
        let mesh_tag = self.mesh.tag(CALLER_LABEL, &body).unwrap_or_default();
        let site_tag = self
            .site_claim
            .map(|k| {
                mac(&k, SITE_CALLER_LABEL, &body)
                    .finalize()
                    .into_bytes()
                    .to_vec()
            })
            .unwrap_or_default();
        if let Some(c) = req.caller.as_mut() {
            c.mesh_tag = mesh_tag;
            c.site_tag = site_tag;
        }
    }

    /// Fills in who vouches and until when, with empty tags; `None` without the mesh key
    /// (the caller is dropped: it would not be believed anyway).
    fn stamp<'a>(&self, caller: &'a mut Option<Caller>, now_ms: i64) -> Option<&'a mut Caller> {
        if !self.is_mesh() {
            *caller = None;
            return None;
        }
        let c = caller.get_or_insert_with(|| Caller {
            role: Role::Viewer.as_str().to_owned(),
            ..Default::default()
        });
        c.site = self.site.clone();
        c.node = self.node.clone();
        c.expires_ms = now_ms.saturating_add(CALLER_TTL_MS);
        c.mesh_tag.clear();
        c.site_tag.clear();
        Some(c)
    }

    /// Replaces the caller of a request to a twin of `twin_site` by what can be believed
    /// of it: `None` (an anonymous off-site viewer) unless a mesh node vouched for it and
    /// the context has not expired; its site kept only when the site's claim key proves
    /// it (this node is on that site); its role only on the sites the role holds on
    /// (a viewer elsewhere). Tags are removed.
    pub fn admit(&self, req: &mut TwinRequest, twin_site: &str, now_ms: i64) {
        let Some(c) = req.caller.as_mut() else {
            return;
        };
        let mesh_tag = std::mem::take(&mut c.mesh_tag);
        let site_tag = std::mem::take(&mut c.site_tag);
        if !fresh(c.expires_ms, now_ms) {
            req.caller = None;
            return;
        }
        let body = req.encode_to_vec();
        if !self.mesh.verify(CALLER_LABEL, &body, &mesh_tag) {
            req.caller = None;
            return;
        }
        let on_site = self.site == twin_site
            && self.site_claim.is_some_and(|k| {
                !site_tag.is_empty()
                    && mac(&k, SITE_CALLER_LABEL, &body)
                        .verify_slice(&site_tag)
                        .is_ok()
            });
        let c = req.caller.as_mut().expect("checked above");
        if c.site == twin_site && !on_site {
            c.site = String::new();
        }
        scope(c, twin_site);
    }

    /// Vouches for the caller of a mesh request.
    pub fn vouch_mesh(&self, req: &mut MeshRequest, now_ms: i64) {
        if self.stamp(&mut req.caller, now_ms).is_none() {
            return;
        }
        let body = req.encode_to_vec();
        if let Some(c) = req.caller.as_mut() {
            c.mesh_tag = self.mesh.tag(MESH_CALLER_LABEL, &body).unwrap_or_default();
        }
    }

    /// The caller of a mesh request a mesh node vouched for (tags removed), or `None`.
    pub fn admit_mesh(&self, req: &mut MeshRequest, now_ms: i64) -> Option<Caller> {
        let c = req.caller.as_mut()?;
        let mesh_tag = std::mem::take(&mut c.mesh_tag);
        c.site_tag.clear();
        if !fresh(c.expires_ms, now_ms) {
            req.caller = None;
            return None;
        }
        let body = req.encode_to_vec();
        if !self.mesh.verify(MESH_CALLER_LABEL, &body, &mesh_tag) {
            req.caller = None;
            return None;
        }
        req.caller.clone()
    }

    /// Adds this node's proof under the control key of `site`; `false` (and no proof)
    /// when the node does not hold it.
    pub fn prove<M: Proven>(&self, site: &str, msg: &mut M) -> bool {
        match self.control.get(site) {
            Some(keys) => prove_with(keys, &self.node, msg),
            None => {
                *msg.proof_mut() = None;
                false
            }
        }
    }

    /// The node that proved `msg` under the control key of `site`, if the proof holds.
    pub fn proven<M: Proven>(&self, site: &str, msg: &mut M) -> Option<String> {
        check_with(self.control.get(site)?, msg)
    }

    /// Adds this node's proof under the mesh key (replicas).
    pub fn prove_mesh<M: Proven>(&self, msg: &mut M) -> bool {
        prove_with(&self.mesh, &self.node, msg)
    }

    /// The mesh node that proved `msg`, if the proof holds.
    pub fn proven_mesh<M: Proven>(&self, msg: &mut M) -> Option<String> {
        check_with(&self.mesh, msg)
    }
}

fn fresh(expires_ms: i64, now_ms: i64) -> bool {
    expires_ms >= now_ms && expires_ms <= now_ms.saturating_add(CALLER_TTL_MS + MAX_SKEW_MS)
}

/// A site-scoped role holds only on its sites: elsewhere the caller is a viewer.
fn scope(c: &mut Caller, twin_site: &str) {
    if !c.sites.is_empty() && !c.sites.iter().any(|s| s == twin_site) {
        c.role = Role::Viewer.as_str().to_owned();
    }
}

fn prove_with<M: Proven>(keys: &MacKeys, node: &str, msg: &mut M) -> bool {
    *msg.proof_mut() = Some(Proof {
        node: node.to_owned(),
        tag: Vec::new(),
    });
    let Some(tag) = keys.tag(M::LABEL, &msg.encode_to_vec()) else {
        *msg.proof_mut() = None;
        return false;
    };
    if let Some(p) = msg.proof_mut() {
        p.tag = tag;
    }
    true
}

fn check_with<M: Proven>(keys: &MacKeys, msg: &mut M) -> Option<String> {
    let tag = std::mem::take(&mut msg.proof_mut().as_mut()?.tag);
    let ok = keys.verify(M::LABEL, &msg.encode_to_vec(), &tag);
    let proof = msg.proof_mut().as_mut()?;
    proof.tag = tag;
    ok.then(|| proof.node.clone())
}

/// The least role of each twin request, checked by the twin that executes it.
pub fn least_role(req: &twin_request::Request) -> Role {
    use twin_request::Request as R;
    match req {
        R::GetTwin(_)
        | R::ThingDescription(_)
        | R::QueryHistory(_)
        | R::GetPolicy(_)
        | R::GetBudget(_) => Role::Viewer,
        R::SetDesired(_) => Role::DataOperator,
        R::SetChain(_)
        | R::ImportHistory(_)
        | R::Freeze(_)
        | R::InstallModel(_)
        | R::Release(_)
        | R::Contribute(_) => Role::DataManager,
        R::SetPolicy(_) => Role::DataOwner,
    }
}

/// The least role of each mesh request, checked by the placement authority.
pub fn least_mesh_role(req: &mesh_request::Request) -> Role {
    match req {
        // Reading a site's ledger.
        mesh_request::Request::SiteBudget(b) if b.epsilon == 0.0 && !b.refund => Role::Viewer,
        mesh_request::Request::Migrate(_)
        | mesh_request::Request::Drain(_)
        | mesh_request::Request::SiteBudget(_) => Role::DataManager,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinmesh_twins::proto::{GetTwinRequest, Watermark};

    fn ring(seed: u8) -> KeyRing {
        KeyRing::new(vec![("k1".into(), [seed; 32])]).unwrap()
    }

    /// The keys `up` gives: mesh key to edges and cloud, site key to the site's edge and
    /// gateway, control key to the site's edge and gateway and the cloud.
    fn edge_a() -> Trust {
        Trust::new("edge-a", "site-a")
            .with_mesh_key(&ring(1))
            .with_site_key(&ring(2))
            .with_control_key("site-a", &ring(3))
    }
    fn cloud() -> Trust {
        Trust::new("cloud", "cloud")
            .with_mesh_key(&ring(1))
            .with_control_key("site-a", &ring(3))
    }
    fn gateway_a() -> Trust {
        Trust::new("iot-a", "site-a")
            .with_site_key(&ring(2))
            .with_control_key("site-a", &ring(3))
    }

    fn get(site: &str, role: &str) -> TwinRequest {
        TwinRequest {
            request: Some(twin_request::Request::GetTwin(GetTwinRequest {
                twin_id: "site-a/pm-01".into(),
            })),
            caller: Some(Caller {
                site: site.into(),
                role: role.into(),
                ..Default::default()
            }),
        }
    }

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn a_claim_without_the_mesh_key_is_an_anonymous_viewer() {
        // Forged: claims site-a and data_owner, tags made up or made with other keys.
        let mut forged = get("site-a", "data_owner");
        forged.caller.as_mut().unwrap().expires_ms = NOW + 1000;
        forged.caller.as_mut().unwrap().mesh_tag = vec![7; 32];
        edge_a().admit(&mut forged, "site-a", NOW);
        assert_eq!(forged.caller, None);
        // A gateway holds site and control keys but not the mesh key: it cannot vouch.
        let mut from_gateway = get("site-a", "data_owner");
        gateway_a().vouch(&mut from_gateway, NOW);
        edge_a().admit(&mut from_gateway, "site-a", NOW);
        assert_eq!(from_gateway.caller, None);
    }

    #[test]
    fn the_site_edge_proves_its_site_and_the_cloud_cannot() {
        let mut on_site = get("", "data_owner");
        edge_a().vouch(&mut on_site, NOW);
        edge_a().admit(&mut on_site, "site-a", NOW + 5);
        let c = on_site.caller.unwrap();
        assert_eq!((c.site.as_str(), c.role.as_str()), ("site-a", "data_owner"));
        assert!(c.mesh_tag.is_empty() && c.site_tag.is_empty());

        // The cloud vouches as the cloud; rewriting its site to site-a breaks the tag,
        // and with the tag recomputed under the mesh key the site claim still fails.
        let mut from_cloud = get("", "data_owner");
        cloud().vouch(&mut from_cloud, NOW);
        let mut rewritten = from_cloud.clone();
        rewritten.caller.as_mut().unwrap().site = "site-a".into();
        edge_a().admit(&mut rewritten, "site-a", NOW);
        assert_eq!(rewritten.caller, None);
        let cloud_as_site_a = Trust::new("cloud", "site-a").with_mesh_key(&ring(1));
        let mut claimed = get("", "data_owner");
        cloud_as_site_a.vouch(&mut claimed, NOW);
        edge_a().admit(&mut claimed, "site-a", NOW);
        let c = claimed.caller.unwrap();
        assert_eq!((c.site.as_str(), c.role.as_str()), ("", "data_owner"));
        edge_a().admit(&mut from_cloud, "site-a", NOW);
        assert_eq!(from_cloud.caller.unwrap().site, "cloud");
    }

    #[test]
    fn a_context_expires_binds_its_request_and_scopes_its_role() {
        let mut req = get("", "data_owner");
        edge_a().vouch(&mut req, NOW);
        let mut late = req.clone();
        edge_a().admit(&mut late, "site-a", NOW + CALLER_TTL_MS + 1);
        assert_eq!(late.caller, None);
        // The same context on another request does not hold.
        let mut moved = req.clone();
        moved.request = Some(twin_request::Request::SetPolicy(Default::default()));
        edge_a().admit(&mut moved, "site-a", NOW);
        assert_eq!(moved.caller, None);
        // A role scoped to site-b is a viewer on site-a.
        let mut scoped = get("", "data_owner");
        scoped.caller.as_mut().unwrap().sites = vec!["site-b".into()];
        edge_a().vouch(&mut scoped, NOW);
        edge_a().admit(&mut scoped, "site-a", NOW);
        assert_eq!(scoped.caller.unwrap().role, "viewer");
    }

    #[test]
    fn proofs_hold_only_under_the_sites_control_key() {
        let mut w = Watermark {
            twin_id: "site-a/pm-01".into(),
            signal: "voltage".into(),
            seq: 7,
            epoch: 3,
            proof: None,
        };
        assert!(edge_a().prove("site-a", &mut w));
        assert_eq!(
            gateway_a().proven("site-a", &mut w).as_deref(),
            Some("edge-a")
        );
        assert_eq!(cloud().proven("site-a", &mut w).as_deref(), Some("edge-a"));
        let mut forged = w.clone();
        forged.epoch = u64::MAX;
        assert_eq!(gateway_a().proven("site-a", &mut forged), None);
        let mut renamed = w.clone();
        renamed.proof.as_mut().unwrap().node = "cloud".into();
        assert_eq!(gateway_a().proven("site-a", &mut renamed), None);
        // No key for site-b: nothing proven there, and no proof made.
        assert_eq!(gateway_a().proven("site-b", &mut w), None);
        let mut other = w.clone();
        assert!(!gateway_a().prove("site-b", &mut other));
        assert_eq!(other.proof, None);
        // A mesh proof is no control proof and the other way round.
        let mut snap = proto::TwinSnapshot::default();
        assert!(edge_a().prove_mesh(&mut snap));
        assert_eq!(cloud().proven_mesh(&mut snap).as_deref(), Some("edge-a"));
        assert_eq!(cloud().proven("site-a", &mut snap), None);
        assert!(!gateway_a().prove_mesh(&mut snap));
    }
}
