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
//! values only, no writes. A context is good for one request at each receiver (it carries
//! a fresh nonce, and receivers remember the contexts they admitted until they expire),
//! so a captured request replayed is an anonymous viewer's too. The node that answers a
//! vouched request proves its reply under the mesh key, bound to the request, and the
//! asking node keeps only proven replies: nobody without the mesh key can answer in a
//! twin's or the placement authority's name. A message without a valid proof is dropped and counted as
//! malformed. Every tag covers the whole message (prost encodes a message to the same
//! bytes every time: maps are ordered) with the tags themselves empty, and a domain label,
//! so a tag made for one kind of message proves nothing about another.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use prost::Message;

use twinmesh_twins::privacy::Role;
use twinmesh_twins::proto::{
    self, mesh_request, twin_request, Caller, MeshReply, MeshRequest, Proof, TwinReply, TwinRequest,
};

use crate::ports::{Query, Responder};
use crate::seal::KeyRing;

type HmacSha256 = Hmac<sha2::Sha256>;

/// How long a caller context a node makes stays valid.
pub const CALLER_TTL_MS: i64 = 30_000;
/// Clock difference between two nodes that a caller context tolerates.
pub const MAX_SKEW_MS: i64 = 30_000;

/// Caller contexts a node remembers at most (each for at most its lifetime): beyond it,
/// new contexts are not believed until old ones expire. Only mesh nodes make contexts,
/// so only a flood from a mesh node could fill it.
pub const REPLAY_MEMORY: usize = 1 << 20;

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

    /// A tag over `first` (of fixed length: a request's tag) followed by `rest`.
    fn tag2(&self, label: &[u8], first: &[u8], rest: &[u8]) -> Option<Vec<u8>> {
        let key = self.0.last()?;
        let mut m = mac(key, label, first);
        m.update(rest);
        Some(m.finalize().into_bytes().to_vec())
    }

    fn verify2(&self, label: &[u8], first: &[u8], rest: &[u8], tag: &[u8]) -> bool {
        !tag.is_empty()
            && self.0.iter().any(|k| {
                let mut m = mac(k, label, first);
                m.update(rest);
                m.verify_slice(tag).is_ok()
            })
    }
}

/// The caller contexts a node admitted and that have not expired yet, by mesh tag.
#[derive(Default)]
struct Admitted {
    expiry: HashMap<[u8; 32], i64>,
    /// In the order admitted (nearly the order of expiry: every context lives about
    /// [`CALLER_TTL_MS`]), for forgetting the expired ones.
    order: VecDeque<(i64, [u8; 32])>,
}

impl Admitted {
    fn forget_expired(&mut self, now_ms: i64) {
        while let Some(&(expires, tag)) = self.order.front() {
            if expires >= now_ms {
                break;
            }
            if self.expiry.get(&tag) == Some(&expires) {
                self.expiry.remove(&tag);
            }
            self.order.pop_front();
        }
    }

    /// Whether the context with `tag` may be admitted now: not seen before, and room to
    /// remember it. Remembers it when `record`.
    fn first_time(&mut self, tag: &[u8], expires_ms: i64, now_ms: i64, record: bool) -> bool {
        self.forget_expired(now_ms);
        let Ok(tag) = <[u8; 32]>::try_from(tag) else {
            return false;
        };
        if self.expiry.contains_key(&tag) || self.expiry.len() >= REPLAY_MEMORY {
            return false;
        }
        if record {
            self.expiry.insert(tag, expires_ms);
            self.order.push_back((expires_ms, tag));
        }
        true
    }
}

/// A reply that carries a [`Proof`] bound to the request it answers (field 15, encoded
/// last).
pub trait ProvenReply: Message + Default + Sized {
    const LABEL: &'static [u8];
    fn proof(&self) -> Option<&Proof>;
}

impl ProvenReply for TwinReply {
    const LABEL: &'static [u8] = b"twinmesh/reply/twin";
    fn proof(&self) -> Option<&Proof> {
        self.proof.as_ref()
    }
}

impl ProvenReply for MeshReply {
    const LABEL: &'static [u8] = b"twinmesh/reply/mesh";
    fn proof(&self) -> Option<&Proof> {
        self.proof.as_ref()
    }
}

/// Proves every reply of type `M` it sends for the request whose mesh tag it holds.
pub struct ProvingResponder<M> {
    inner: Box<dyn Responder>,
    trust: Arc<Trust>,
    request_tag: Vec<u8>,
    reply: std::marker::PhantomData<fn() -> M>,
}

impl<M: ProvenReply + 'static> Responder for ProvingResponder<M> {
    fn reply(self: Box<Self>, key: &str, payload: Bytes, encoding: &'static str) {
        let payload = self.trust.prove_reply::<M>(&self.request_tag, payload);
        self.inner.reply(key, payload, encoding)
    }

    fn reply_many(self: Box<Self>, replies: Vec<(String, Bytes)>, encoding: &'static str) {
        let replies = replies
            .into_iter()
            .map(|(k, p)| (k, self.trust.prove_reply::<M>(&self.request_tag, p)))
            .collect();
        self.inner.reply_many(replies, encoding)
    }
}

/// `query`, whose replies (of type `M`) are proven for the request with the verified
/// mesh tag `request_tag`; unchanged without one (an anonymous asker cannot check a
/// proof).
pub fn proving<M: ProvenReply + 'static>(
    trust: &Arc<Trust>,
    query: Query,
    request_tag: Option<Vec<u8>>,
) -> Query {
    let Some(request_tag) = request_tag else {
        return query;
    };
    Query {
        key: query.key,
        payload: query.payload,
        attachment: query.attachment,
        responder: Box::new(ProvingResponder::<M> {
            inner: query.responder,
            trust: trust.clone(),
            request_tag,
            reply: std::marker::PhantomData,
        }),
    }
}

/// The field number of `proof` in [`TwinReply`] and [`MeshReply`].
const REPLY_PROOF_FIELD: u32 = 15;

fn proof_suffix(proof: &Proof) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::message::encode(REPLY_PROOF_FIELD, proof, &mut out);
    out
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
    /// Caller contexts admitted here (shared by the clones of this node's trust).
    admitted: Arc<Mutex<Admitted>>,
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
        c.nonce = OsRng.next_u64();
        c.mesh_tag.clear();
        c.site_tag.clear();
        Some(c)
    }

    /// Replaces the caller of a request to a twin of `twin_site` by what can be believed
    /// of it: `None` (an anonymous off-site viewer) unless a mesh node vouched for it and
    /// the context has not expired; its site kept only when the site's claim key proves
    /// it (this node is on that site); its role only on the sites the role holds on
    /// (a viewer elsewhere). Tags are removed.
    pub fn admit(&self, req: &mut TwinRequest, twin_site: &str, now_ms: i64) -> Option<Vec<u8>> {
        self.admit_as(req, twin_site, now_ms, true)
    }

    /// [`Trust::admit`] without remembering the context: for a cache that may not answer
    /// (the twin then admits the request itself). If it answers, it must first
    /// [`Trust::remember`] the context, and treat the caller as anonymous if that fails.
    pub fn admit_unrecorded(
        &self,
        req: &mut TwinRequest,
        twin_site: &str,
        now_ms: i64,
    ) -> Option<Vec<u8>> {
        self.admit_as(req, twin_site, now_ms, false)
    }

    /// Remembers the admitted context with `tag`; `false` if it was admitted before (a
    /// replay).
    pub fn remember(&self, tag: &[u8], expires_ms: i64, now_ms: i64) -> bool {
        self.admitted
            .lock()
            .expect("admitted lock")
            .first_time(tag, expires_ms, now_ms, true)
    }

    fn admit_as(
        &self,
        req: &mut TwinRequest,
        twin_site: &str,
        now_ms: i64,
        record: bool,
    ) -> Option<Vec<u8>> {
        let c = req.caller.as_mut()?;
        let mesh_tag = std::mem::take(&mut c.mesh_tag);
        let site_tag = std::mem::take(&mut c.site_tag);
        let expires_ms = c.expires_ms;
        if !fresh(expires_ms, now_ms) {
            req.caller = None;
            return None;
        }
        let body = req.encode_to_vec();
        if !self.mesh.verify(CALLER_LABEL, &body, &mesh_tag)
            || !self
                .admitted
                .lock()
                .expect("admitted lock")
                .first_time(&mesh_tag, expires_ms, now_ms, record)
        {
            req.caller = None;
            return None;
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
        Some(mesh_tag)
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

    /// The caller of a mesh request a mesh node vouched for (tags removed) and its mesh
    /// tag (to prove the reply with), or `None`; once per context.
    pub fn admit_mesh(&self, req: &mut MeshRequest, now_ms: i64) -> Option<(Caller, Vec<u8>)> {
        let c = req.caller.as_mut()?;
        let mesh_tag = std::mem::take(&mut c.mesh_tag);
        c.site_tag.clear();
        let expires_ms = c.expires_ms;
        if !fresh(expires_ms, now_ms) {
            req.caller = None;
            return None;
        }
        let body = req.encode_to_vec();
        if !self.mesh.verify(MESH_CALLER_LABEL, &body, &mesh_tag)
            || !self.remember(&mesh_tag, expires_ms, now_ms)
        {
            req.caller = None;
            return None;
        }
        Some((req.caller.clone()?, mesh_tag))
    }

    /// A reply `payload` to the request whose caller (as this node vouched for it) is
    /// `caller`: kept only if proven for that request; without a mesh tag (this node
    /// vouches for nobody), any well-formed reply.
    pub fn answer<M: ProvenReply>(&self, caller: Option<&Caller>, payload: &[u8]) -> Option<M> {
        match Self::request_tag(caller) {
            Some(tag) => self.proven_reply(tag, payload),
            None => M::decode(payload).ok(),
        }
    }

    /// The mesh tag of a request this node vouched for (to check the replies with).
    pub fn request_tag(caller: Option<&Caller>) -> Option<&[u8]> {
        caller
            .map(|c| c.mesh_tag.as_slice())
            .filter(|t| !t.is_empty())
    }

    /// `reply` (an encoded `M`) with this node's proof appended, bound to the request
    /// whose verified mesh tag is `request_tag`; `reply` unchanged without the mesh key.
    pub fn prove_reply<M: ProvenReply>(&self, request_tag: &[u8], reply: Bytes) -> Bytes {
        let Some(tag) = self.mesh.tag2(M::LABEL, request_tag, &reply) else {
            return reply;
        };
        let suffix = proof_suffix(&Proof {
            node: self.node.clone(),
            tag,
        });
        let mut out = Vec::with_capacity(reply.len() + suffix.len());
        out.extend_from_slice(&reply);
        out.extend_from_slice(&suffix);
        Bytes::from(out)
    }

    /// The reply `payload` decoded, if a mesh node proved it for the request whose mesh
    /// tag is `request_tag`; `None` for anything else (malformed, unproven, proven for
    /// another request).
    pub fn proven_reply<M: ProvenReply>(&self, request_tag: &[u8], payload: &[u8]) -> Option<M> {
        let reply = M::decode(payload).ok()?;
        let proof = reply.proof()?;
        let suffix = proof_suffix(proof);
        let body = payload.strip_suffix(suffix.as_slice())?;
        self.mesh
            .verify2(M::LABEL, request_tag, body, &proof.tag)
            .then_some(reply)
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

    /// Plain mode lets anyone declare a queryable on a twin's key and so receive vouched
    /// requests: replayed, one is an anonymous viewer's.
    #[test]
    fn a_context_is_admitted_once() {
        let edge = edge_a();
        let mut sent = get("", "data_owner");
        edge.vouch(&mut sent, NOW);
        let mut first = sent.clone();
        assert!(edge.admit(&mut first, "site-a", NOW + 1).is_some());
        assert_eq!(first.caller.unwrap().role, "data_owner");
        let mut replayed = sent.clone();
        assert_eq!(edge.admit(&mut replayed, "site-a", NOW + 2), None);
        assert_eq!(replayed.caller, None);
        // Another receiver admits it once too (each remembers its own).
        let mut elsewhere = sent.clone();
        assert!(cloud().admit(&mut elsewhere, "site-a", NOW + 2).is_some());
        // Vouched for anew (a retry), the same call is a new context.
        let mut retry = sent.clone();
        edge.vouch(&mut retry, NOW);
        assert_ne!(
            retry.caller.as_ref().unwrap().nonce,
            sent.caller.as_ref().unwrap().nonce
        );
        assert!(edge.admit(&mut retry, "site-a", NOW + 3).is_some());
        // Checking without remembering (the reply cache) neither admits twice...
        let mut peek = get("", "data_owner");
        edge.vouch(&mut peek, NOW);
        for _ in 0..2 {
            let mut p = peek.clone();
            assert!(edge.admit_unrecorded(&mut p, "site-a", NOW + 4).is_some());
        }
        // ...nor lets a remembered one through.
        let mut p = peek.clone();
        let tag = edge.admit_unrecorded(&mut p, "site-a", NOW + 4).unwrap();
        assert!(edge.remember(&tag, NOW + CALLER_TTL_MS, NOW + 4));
        assert!(!edge.remember(&tag, NOW + CALLER_TTL_MS, NOW + 4));
        let mut p = peek.clone();
        assert_eq!(edge.admit_unrecorded(&mut p, "site-a", NOW + 5), None);
        // Mesh requests alike.
        let mut drain = MeshRequest {
            request: Some(mesh_request::Request::Drain(proto::DrainNodeRequest {
                node: "edge-a".into(),
            })),
            caller: Some(Caller {
                role: "data_owner".into(),
                ..Default::default()
            }),
        };
        edge.vouch_mesh(&mut drain, NOW);
        let authority = cloud();
        assert!(authority.admit_mesh(&mut drain.clone(), NOW + 1).is_some());
        assert!(authority.admit_mesh(&mut drain.clone(), NOW + 2).is_none());
    }

    #[test]
    fn the_contexts_remembered_are_bounded_and_forgotten_when_expired() {
        let mut a = Admitted::default();
        let tag = |i: usize| {
            let mut t = [0u8; 32];
            t[..8].copy_from_slice(&(i as u64).to_be_bytes());
            t
        };
        for i in 0..REPLAY_MEMORY {
            assert!(a.first_time(&tag(i), NOW + 10, NOW, true));
        }
        // Full: nothing new is believed until the old ones expire...
        assert!(!a.first_time(&tag(REPLAY_MEMORY), NOW + 10, NOW, true));
        assert!(!a.first_time(&tag(0), NOW + 10, NOW, true));
        // ...and then they are forgotten (an expired context is refused as stale).
        assert!(a.first_time(&tag(REPLAY_MEMORY), NOW + 30, NOW + 11, true));
        assert_eq!(a.expiry.len(), 1);
        assert!(
            !a.first_time(&[1u8; 16], NOW + 30, NOW + 11, true),
            "not a tag"
        );
    }

    /// Plain mode lets anyone declare a queryable on a twin's key and answer first: the
    /// asking node keeps only a reply a mesh node proved for its request.
    #[test]
    fn only_a_mesh_node_answers_in_a_twins_name() {
        let (cloud, edge) = (cloud(), edge_a());
        let mut req = get("", "data_owner");
        cloud.vouch(&mut req, NOW);
        let sent = req.caller.clone();
        let mut received = req.clone();
        let tag = edge.admit(&mut received, "site-a", NOW).unwrap();
        let reply = |id: &str| TwinReply {
            reply: Some(proto::twin_reply::Reply::Twin(proto::Twin {
                twin_id: id.into(),
                ..Default::default()
            })),
            proof: None,
        };
        let body = Bytes::from(reply("site-a/pm-01").encode_to_vec());
        let proven = edge.prove_reply::<TwinReply>(&tag, body.clone());
        let got: TwinReply = cloud.answer(sent.as_ref(), &proven).unwrap();
        assert_eq!(got.reply, reply("site-a/pm-01").reply);
        assert_eq!(got.proof.unwrap().node, "edge-a");
        // Unproven, or proven by a gateway (no mesh key), or for another request.
        assert!(cloud.answer::<TwinReply>(sent.as_ref(), &body).is_none());
        let by_gateway = gateway_a().prove_reply::<TwinReply>(&tag, body.clone());
        assert!(cloud
            .answer::<TwinReply>(sent.as_ref(), &by_gateway)
            .is_none());
        let mut other = get("", "viewer");
        cloud.vouch(&mut other, NOW);
        assert!(cloud
            .answer::<TwinReply>(other.caller.as_ref(), &proven)
            .is_none());
        // A proof copied onto another body, or a body changed after the proof.
        let proof = got_proof(&proven);
        let mut forged = reply("site-a/evil").encode_to_vec();
        forged.extend_from_slice(&proof_suffix(&proof));
        assert!(cloud.answer::<TwinReply>(sent.as_ref(), &forged).is_none());
        let mut appended = proven.to_vec();
        appended.extend_from_slice(&reply("site-a/evil").encode_to_vec());
        assert!(cloud
            .answer::<TwinReply>(sent.as_ref(), &appended)
            .is_none());
        // A twin reply's proof is no mesh reply's proof.
        assert!(cloud.answer::<MeshReply>(sent.as_ref(), &proven).is_none());
        // A node that vouches for nobody cannot check and takes any well-formed reply.
        let outsider = gateway_a();
        assert!(outsider.answer::<TwinReply>(None, &body).is_some());
    }

    fn got_proof(payload: &[u8]) -> Proof {
        TwinReply::decode(payload).unwrap().proof.unwrap()
    }
}
