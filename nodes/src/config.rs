//! Node configuration: a TOML file or command-line flags, validated before anything starts.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use twinmesh_twins::chain::{Chain, ChainSpec};
use twinmesh_twins::{id::validate_site, AssetKind, NodeId, Tier};

/// Zenoh link protocols this build supports.
pub const SUPPORTED_PROTOCOLS: [&str; 3] = ["tcp", "tls", "quic"];

/// The site every cloud node belongs to.
pub const CLOUD_SITE: &str = "cloud";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZenohMode {
    #[default]
    Peer,
    Client,
    Router,
}

impl FromStr for ZenohMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "peer" => Ok(ZenohMode::Peer),
            "client" => Ok(ZenohMode::Client),
            "router" => Ok(ZenohMode::Router),
            _ => Err(format!(
                "invalid zenoh mode {s:?}: expected peer, client or router"
            )),
        }
    }
}

/// `KIND[:COUNT]`: simulated assets an IoT gateway drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SimSpec {
    pub kind: AssetKind,
    pub count: u32,
}

impl FromStr for SimSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, count) = match s.split_once(':') {
            Some((k, c)) => (
                k,
                c.parse::<u32>()
                    .map_err(|_| format!("invalid asset count in {s:?}: expected KIND[:COUNT]"))?,
            ),
            None => (s, 1),
        };
        let kind = kind.parse::<AssetKind>().map_err(|e| {
            format!(
                "{e}: simulators exist for the built-in kinds only ({})",
                twinmesh_sim::model::SIMULATED_KINDS
                    .map(|k| k.as_str())
                    .join(", ")
            )
        })?;
        if !twinmesh_sim::model::has_simulator(kind) {
            return Err(format!(
                "kind {kind} has no simulator: only the built-in kinds are simulated (feed it from a device)"
            ));
        }
        if count == 0 || count > 99_999 {
            return Err(format!("invalid asset count in {s:?}: expected 1..=99999"));
        }
        Ok(SimSpec { kind, count })
    }
}

twinmesh_twins::string_conversions!(SimSpec);

impl fmt::Display for SimSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.count)
    }
}

/// `ASSET=MODE@SECONDS`: a fault of one simulated asset, starting that many seconds after
/// the node starts — or, for values of at least 1e9, at that Unix time in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FaultSpec {
    pub asset: String,
    pub mode: twinmesh_sim::FaultMode,
    pub after_s: f64,
}

/// Fault times at or above this are absolute Unix times in seconds.
pub const ABSOLUTE_FAULT_TIME_S: f64 = 1e9;

impl FaultSpec {
    /// When the fault starts, for a node started at `start_ns`.
    pub fn at_ns(&self, start_ns: i64) -> i64 {
        if self.after_s >= ABSOLUTE_FAULT_TIME_S {
            (self.after_s * 1e9) as i64
        } else {
            start_ns + (self.after_s * 1e9) as i64
        }
    }
}

impl FromStr for FaultSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid fault {s:?}: expected ASSET=MODE@SECONDS, e.g. wt-01=outer_race@30")
        };
        let (asset, rest) = s.split_once('=').ok_or_else(bad)?;
        let (mode, at) = rest.rsplit_once('@').ok_or_else(bad)?;
        let after_s: f64 = at.parse().map_err(|_| bad())?;
        if !(after_s.is_finite() && after_s >= 0.0 && twinmesh_twins::id::is_valid_segment(asset)) {
            return Err(bad());
        }
        Ok(FaultSpec {
            asset: asset.to_owned(),
            mode: mode.parse()?,
            after_s,
        })
    }
}

twinmesh_twins::string_conversions!(FaultSpec);

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}@{}", self.asset, self.mode, self.after_s)
    }
}

/// The liveliness lease of a node when its configuration names none, ms.
pub fn default_lease_ms() -> u64 {
    2000
}
fn default_max_frame_bytes() -> usize {
    twinmesh_twins::frame::DEFAULT_MAX_FRAME_BYTES
}
fn default_cache_mb() -> u64 {
    64
}
fn default_capacity() -> u32 {
    10_000
}
fn default_seed() -> u64 {
    1
}
fn default_encrypt_trees() -> Vec<String> {
    crate::store::SENSITIVE_TREES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Everything one `twinmesh node` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: NodeId,
    pub tier: Tier,
    /// The node's site; cloud nodes belong to the site `cloud`.
    #[serde(default)]
    pub site: String,
    #[serde(default)]
    pub mode: ZenohMode,
    /// Zenoh endpoints to listen on, e.g. `tcp/127.0.0.1:7447` (port 0: any free port).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Zenoh endpoints to connect to; unreachable ones are retried in the background.
    #[serde(default)]
    pub connect: Vec<String>,
    /// Directory of the node's sled database.
    #[serde(default)]
    pub data: PathBuf,
    /// gRPC listen address (port 0: any free port); none: no gRPC server.
    #[serde(default)]
    pub grpc: Option<SocketAddr>,
    /// Dashboard and `/metrics` listen address.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// Simulated assets (IoT tier only).
    #[serde(default)]
    pub simulate: Vec<SimSpec>,
    /// Real devices (IoT tier only): `[[devices]]` tables with one of `[devices.mqtt]`,
    /// `[devices.modbus]`, `[devices.opcua]` (see `crate::devices`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<crate::devices::DeviceConfig>,
    /// Faults of simulated assets: `ASSET=MODE@SECONDS` (seconds after the node starts),
    /// e.g. `wt-01=outer_race@30` or `pm-01=drift:voltage@10`.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Processing chains for the new twins of this gateway's assets, per kind:
    /// `[[chains.wind_turbine.stage]]` tables (DESIGN §5). Twins that exist keep theirs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub chains: BTreeMap<AssetKind, ChainSpec>,
    /// Folder of W3C WoT Thing Models (`*.json`) defining more asset kinds. Read before
    /// the rest of the file, so `chains` may name its kinds.
    #[serde(default)]
    pub models_dir: Option<PathBuf>,
    /// Zenoh lease: how fast a frozen or cut-off node is declared gone.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    #[serde(default)]
    pub multicast: bool,
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// sled page cache.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Twin slots this node offers.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// Seed of the simulators.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Twins idle this many seconds are snapshotted and stopped (dormant) until their
    /// next frame or call; 0 (the default) keeps every twin running.
    #[serde(default)]
    pub passivate_after_s: u64,
    /// The site key file (`twinmesh keys new`): every iot and edge node of a site holds
    /// the same one. Gateways seal the frames of protected signals with it; without it
    /// they do not publish them at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_key_file: Option<PathBuf>,
    /// Edge and cloud nodes: the mesh key (`twinmesh keys new`), held by them and nobody
    /// else. With it a node vouches for its gRPC callers on the fabric and checks what
    /// other nodes vouch for; without it every request it sends reaches twins as an
    /// anonymous viewer, and it believes no caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_key_file: Option<PathBuf>,
    /// A folder of control keys, `{site}.control.key`: telemetry, acknowledgements,
    /// chain and desired-value updates and placements of a site carry a proof under its
    /// key. Gateways and edges use their own site's, the cloud every one it finds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_keys_dir: Option<PathBuf>,
    /// Cloud nodes: the ε each site may spend on set releases (releases over several
    /// twins) per period, on top of every twin's own ledger. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_epsilon_per_period: Option<f64>,
    /// Cloud nodes: the period of the site ledgers in seconds. Default one day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_budget_period_s: Option<u64>,
    /// TLS: every Zenoh endpoint is `tls/...` with mutual authentication, and gRPC is
    /// served over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Zenoh access control: the roster file (`crate::acl::Roster`) of the certificate
    /// names of the mesh's nodes per tier; needs `tls`. Every other name is denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<PathBuf>,
    /// Key file for encryption at rest (`twinmesh keys new`): the values of
    /// `encrypt_trees` are AES-256-GCM sealed with its newest key; older keys still open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_rest_key_file: Option<PathBuf>,
    /// Trees sealed at rest when a key is given (default: every sensitive one).
    #[serde(default = "default_encrypt_trees")]
    pub encrypt_trees: Vec<String>,
    /// Bearer-token authentication of gRPC callers (`[auth]`; none: every caller is
    /// trusted as data_owner).
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// Allows plaintext Zenoh, gRPC and HTTP on non-loopback addresses (protected mode
    /// off, `--insecure`): without it such a node needs `[tls]`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// Mutual TLS on the node's Zenoh links and TLS on its gRPC server (`twinmesh certs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The site CA (`ca.pem`): peers must present a certificate it signed.
    pub ca_file: PathBuf,
    /// This node's certificate and private key (`NAME.pem`, `NAME.key`).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Whether a Zenoh endpoint (`tcp/127.0.0.1:7447`, `quic/[::1]:0`, `tcp/localhost:1`)
/// listens on loopback only. A host name other than `localhost` counts as exposed.
pub fn endpoint_is_loopback(endpoint: &str) -> bool {
    let Ok(ep) = zenoh::config::EndPoint::from_str(endpoint) else {
        return false;
    };
    let address = ep.address();
    let Some((host, _port)) = address.as_str().rsplit_once(':') else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reads a key file (`KEY_ID HEX64` lines). Errors name the file, never a key.
pub fn load_key_ring(path: &Path, what: &str) -> crate::Result<twinmesh_actors::seal::KeyRing> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        crate::Error::config(format!("cannot read {what} file {}: {e}", path.display()))
    })?;
    twinmesh_actors::seal::KeyRing::parse(&text)
        .map_err(|e| crate::Error::config(format!("{what} file {}: {e}", path.display())))
}

/// What the node can prove and check on the fabric, from its key files (see
/// `twinmesh_actors::trust`), and what it should warn about once it runs (keys it lacks).
pub fn load_trust(
    config: &NodeConfig,
    site_key: Option<&twinmesh_actors::seal::KeyRing>,
) -> crate::Result<(twinmesh_actors::trust::Trust, Vec<String>)> {
    let mut warnings = Vec::new();
    let mut trust = twinmesh_actors::trust::Trust::new(config.id.as_str(), &config.site);
    if let Some(path) = &config.mesh_key_file {
        trust = trust.with_mesh_key(&load_key_ring(path, "mesh key")?);
    } else if config.tier != Tier::Iot {
        warnings.push(format!(
            "node {} has no mesh key (--mesh-key): twins see every caller it serves as an \
             anonymous off-site viewer, and it believes no caller",
            config.id
        ));
    }
    if let Some(ring) = site_key {
        trust = trust.with_site_key(ring);
    }
    if let Some(dir) = &config.control_keys_dir {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            crate::Error::config(format!(
                "cannot read control keys in {}: {e}",
                dir.display()
            ))
        })?;
        for entry in entries {
            let path = entry?.path();
            let Some(site) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".control.key"))
            else {
                continue;
            };
            if config.tier == Tier::Cloud || site == config.site {
                trust = trust.with_control_key(site, &load_key_ring(&path, "control key")?);
            }
        }
    }
    if config.tier != Tier::Cloud && !trust.controls(&config.site) {
        warnings.push(format!(
            "node {} has no control key for {} (--control-keys DIR with {}.control.key): \
             it can neither prove nor check the site's telemetry and control messages",
            config.id, config.site, config.site
        ));
    }
    Ok((trust, warnings))
}

impl NodeConfig {
    pub fn new(id: NodeId, tier: Tier, site: &str) -> Self {
        NodeConfig {
            data: PathBuf::from("data").join(id.as_str()),
            id,
            tier,
            site: site.to_owned(),
            mode: ZenohMode::Peer,
            listen: Vec::new(),
            connect: Vec::new(),
            grpc: None,
            http: None,
            simulate: Vec::new(),
            devices: Vec::new(),
            faults: Vec::new(),
            chains: BTreeMap::new(),
            models_dir: None,
            lease_ms: default_lease_ms(),
            multicast: false,
            max_frame_bytes: default_max_frame_bytes(),
            cache_mb: default_cache_mb(),
            capacity: default_capacity(),
            seed: default_seed(),
            passivate_after_s: 0,
            site_key_file: None,
            mesh_key_file: None,
            control_keys_dir: None,
            site_epsilon_per_period: None,
            site_budget_period_s: None,
            tls: None,
            acl_file: None,
            at_rest_key_file: None,
            encrypt_trees: default_encrypt_trees(),
            auth: Default::default(),
            insecure: false,
        }
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            crate::Error::config(format!("cannot read config {}: {e}", path.display()))
        })?;
        // The models first: the rest of the file may name their kinds.
        #[derive(Deserialize)]
        struct Models {
            models_dir: Option<PathBuf>,
        }
        if let Ok(Models {
            models_dir: Some(dir),
        }) = toml::from_str::<Models>(&text)
        {
            crate::kinds::load_dir(&dir)?;
        }
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|e| {
            crate::Error::config(format!(
                "invalid config {}: {}",
                path.display(),
                e.to_string().trim().replace('\n', " ")
            ))
        })?;
        cfg.normalize()?;
        Ok(cfg)
    }

    /// Fills defaults that depend on other fields and rejects inconsistent settings.
    pub fn normalize(&mut self) -> crate::Result<()> {
        if self.tier == Tier::Cloud {
            if self.site.is_empty() {
                self.site = CLOUD_SITE.to_owned();
            } else if self.site != CLOUD_SITE {
                return Err(crate::Error::config(format!(
                    "invalid site {:?} for cloud node {}: cloud nodes belong to the site {CLOUD_SITE:?}",
                    self.site,
                    self.id
                )));
            }
        }
        if self.site.is_empty() {
            return Err(crate::Error::config(format!(
                "node {} ({}) needs a site",
                self.id, self.tier
            )));
        }
        validate_site(&self.site)?;
        if !self.faults.is_empty() && self.simulate.is_empty() {
            return Err(crate::Error::config(format!(
                "node {} has faults but simulates no assets",
                self.id
            )));
        }
        if !self.chains.is_empty() && self.tier != Tier::Iot {
            return Err(crate::Error::config(format!(
                "node {} is a {} node: chains are configured on iot gateways",
                self.id, self.tier
            )));
        }
        for (kind, spec) in &self.chains {
            Chain::validate(spec, *kind).map_err(|e| {
                crate::Error::config(format!(
                    "invalid chain for {kind} in the configuration: {e}"
                ))
            })?;
        }
        if self.passivate_after_s > 0 && self.tier != Tier::Edge {
            return Err(crate::Error::config(format!(
                "node {} is a {} node: passivation (passivate_after_s) applies to edge nodes",
                self.id, self.tier
            )));
        }
        if !self.devices.is_empty() {
            if self.tier != Tier::Iot {
                return Err(crate::Error::config(format!(
                    "node {} is a {} node: only iot gateways read devices ([[devices]])",
                    self.id, self.tier
                )));
            }
            let checked = crate::devices::check_all(&self.devices, &self.site)
                .map_err(crate::Error::config)?;
            for d in &checked {
                let simulated = self.simulate.iter().any(|s| {
                    s.kind == d.kind
                        && (1..=s.count)
                            .any(|n| d.twin.asset() == format!("{}-{n:02}", s.kind.prefix()))
                });
                if simulated {
                    return Err(crate::Error::config(format!(
                        "device {}: the gateway also simulates this twin (--simulate)",
                        d.twin
                    )));
                }
            }
        }
        if !self.simulate.is_empty() && self.tier != Tier::Iot {
            return Err(crate::Error::config(format!(
                "node {} is a {} node: only iot gateways drive simulated assets",
                self.id, self.tier
            )));
        }
        check_endpoints(&self.listen, &self.connect, self.tls.is_some())?;
        if self.acl_file.is_some() && self.tls.is_none() {
            return Err(crate::Error::config(format!(
                "node {}: an ACL roster (--acl) needs TLS (--tls-ca, --tls-cert, --tls-key): \
                 links are told apart by their certificate names",
                self.id
            )));
        }
        if self.mode == ZenohMode::Client && self.connect.is_empty() {
            return Err(crate::Error::config(format!(
                "node {} in client mode needs at least one --connect endpoint",
                self.id
            )));
        }
        if self.lease_ms < 100 {
            return Err(crate::Error::config(format!(
                "invalid lease_ms {}: at least 100",
                self.lease_ms
            )));
        }
        if self.max_frame_bytes < 64 {
            return Err(crate::Error::config(format!(
                "invalid max_frame_bytes {}: at least 64",
                self.max_frame_bytes
            )));
        }
        if self.site_key_file.is_some() && self.tier == Tier::Cloud {
            return Err(crate::Error::config(format!(
                "node {} is a cloud node: site keys belong to the nodes of one site",
                self.id
            )));
        }
        if self.mesh_key_file.is_some() && self.tier == Tier::Iot {
            return Err(crate::Error::config(format!(
                "node {} is an iot gateway: the mesh key belongs to edge and cloud nodes only \
                 (with it a gateway could vouch for any caller)",
                self.id
            )));
        }
        if (self.site_epsilon_per_period.is_some() || self.site_budget_period_s.is_some())
            && self.tier != Tier::Cloud
        {
            return Err(crate::Error::config(format!(
                "node {} is a {} node: site budgets (site_epsilon_per_period, site_budget_period_s) are kept by the cloud node",
                self.id,
                self.tier
            )));
        }
        if let Some(e) = self.site_epsilon_per_period {
            if !(e.is_finite() && e > 0.0) {
                return Err(crate::Error::config(format!(
                    "invalid site_epsilon_per_period {e}: must be positive"
                )));
            }
        }
        if self.site_budget_period_s == Some(0) {
            return Err(crate::Error::config(
                "invalid site_budget_period_s 0: at least 1 s".to_string(),
            ));
        }
        if self.data.as_os_str().is_empty() {
            self.data = PathBuf::from("data").join(self.id.as_str());
        }
        self.check_posture()
    }

    /// Protected mode (as Redis's): plaintext listeners only on loopback unless the
    /// operator says `--insecure`. With `[tls]`, Zenoh links are TLS/QUIC (checked above)
    /// and gRPC and HTTP are served over TLS, so every address is allowed.
    fn check_posture(&self) -> crate::Result<()> {
        if self.tls.is_some() || self.insecure {
            return Ok(());
        }
        check_listen_posture(&self.listen)?;
        for (what, addr) in [("gRPC", self.grpc), ("HTTP", self.http)] {
            if let Some(a) = addr.filter(|a| !a.ip().is_loopback()) {
                return Err(refuse_plaintext(what, &a.to_string()));
            }
        }
        Ok(())
    }

    /// The plaintext listeners of an `--insecure` node on other than loopback, for the
    /// warning it logs on start.
    pub fn exposed_plaintext(&self) -> Vec<String> {
        if self.tls.is_some() {
            return Vec::new();
        }
        let sockets = [self.grpc, self.http]
            .into_iter()
            .flatten()
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.to_string());
        self.listen
            .iter()
            .filter(|ep| !endpoint_is_loopback(ep))
            .cloned()
            .chain(sockets)
            .collect()
    }

    /// The allowance of every site's ledger of set releases.
    pub fn site_budget(&self) -> twinmesh_actors::context::SiteBudget {
        let d = twinmesh_actors::context::SiteBudget::default();
        twinmesh_actors::context::SiteBudget {
            epsilon_per_period: self.site_epsilon_per_period.unwrap_or(d.epsilon_per_period),
            period_ns: self.site_budget_period_s.map_or(d.period_ns, |s| {
                (s.min(i64::MAX as u64 / 1_000_000_000) as i64) * 1_000_000_000
            }),
        }
    }
}

/// Every endpoint parses, uses a supported protocol, and is encrypted exactly when TLS
/// is configured.
fn check_endpoints(listen: &[String], connect: &[String], tls: bool) -> crate::Result<()> {
    for ep in listen.iter().chain(connect) {
        let parsed = zenoh::config::EndPoint::from_str(ep)
            .map_err(|e| crate::Error::config(format!("invalid zenoh endpoint {ep:?}: {e}")))?;
        let protocol = parsed.protocol();
        if !SUPPORTED_PROTOCOLS.contains(&protocol.as_str()) {
            return Err(crate::Error::config(format!(
                "invalid zenoh endpoint {ep:?}: protocol {:?} is not supported (use {})",
                protocol.as_str(),
                SUPPORTED_PROTOCOLS.join(" or ")
            )));
        }
    }
    for ep in listen.iter().chain(connect) {
        let encrypted = ep.starts_with("tls/") || ep.starts_with("quic/");
        match (tls, encrypted) {
            (true, false) => return Err(crate::Error::config(format!(
                "zenoh endpoint {ep:?} is neither tls/ nor quic/: with TLS configured every link is encrypted"
            ))),
            (false, true) => return Err(crate::Error::config(format!(
                "zenoh endpoint {ep:?} needs TLS certificates (--tls-ca, --tls-cert, --tls-key)"
            ))),
            _ => {}
        }
    }
    Ok(())
}

/// Protected mode for Zenoh listeners: plaintext ones only on loopback.
fn check_listen_posture(listen: &[String]) -> crate::Result<()> {
    for ep in listen {
        if !endpoint_is_loopback(ep) {
            return Err(refuse_plaintext("zenoh", ep));
        }
    }
    Ok(())
}

fn refuse_plaintext(what: &str, addr: &str) -> crate::Error {
    crate::Error::config(format!(
        "refusing to serve {what} on non-loopback address {addr} without TLS: \
         give --tls-ca/--tls-cert/--tls-key (or `twinmesh up --secure`), or --insecure \
         (config `insecure = true`) to allow plaintext"
    ))
}

/// A Zenoh router and nothing else (`twinmesh router`): no twins, no store, no API. It
/// forwards between the nodes, gateways and routers connected to it, so nodes that
/// cannot open connections to each other (edges behind a site's firewall) reach each
/// other through it. Nodes behind routers run in router (or client) mode: a Zenoh router
/// does not forward between two peers connected to it (ARCHITECTURE.md, "Through
/// routers").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Its name: in logs, and its certificate name under an ACL roster.
    pub id: NodeId,
    /// Where nodes and other routers connect to it.
    pub listen: Vec<String>,
    /// Other routers it connects to (retried while unreachable).
    #[serde(default)]
    pub connect: Vec<String>,
    /// Zenoh lease: how fast the router declares a frozen or cut-off link gone.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    #[serde(default)]
    pub multicast: bool,
    /// Mutual TLS on every link (endpoints tls/ or quic/).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The mesh's ACL roster (needs `tls`); the router's own name must be in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<PathBuf>,
    /// Allows plaintext listeners on non-loopback addresses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

impl RouterConfig {
    pub fn new(id: NodeId, listen: Vec<String>) -> Self {
        RouterConfig {
            id,
            listen,
            connect: Vec::new(),
            lease_ms: default_lease_ms(),
            multicast: false,
            tls: None,
            acl_file: None,
            insecure: false,
        }
    }

    /// Rejects a router nothing could reach, bad endpoints, an ACL without TLS and
    /// plaintext on other than loopback (unless `insecure`).
    pub fn normalize(&mut self) -> crate::Result<()> {
        if self.listen.is_empty() {
            return Err(crate::Error::config(format!(
                "router {} needs at least one --listen endpoint: nodes reach each other \
                 through a router by connecting to it",
                self.id
            )));
        }
        check_endpoints(&self.listen, &self.connect, self.tls.is_some())?;
        if self.acl_file.is_some() && self.tls.is_none() {
            return Err(crate::Error::config(format!(
                "router {}: an ACL roster (--acl) needs TLS (--tls-ca, --tls-cert, --tls-key): \
                 links are told apart by their certificate names",
                self.id
            )));
        }
        if self.lease_ms < 100 {
            return Err(crate::Error::config(format!(
                "invalid lease_ms {}: at least 100",
                self.lease_ms
            )));
        }
        if self.tls.is_none() && !self.insecure {
            check_listen_posture(&self.listen)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let text = r#"
            id = "edge-a"
            tier = "edge"
            site = "site-a"
            listen = ["tcp/127.0.0.1:0"]
            connect = ["tcp/127.0.0.1:7447"]
            data = "/tmp/x"
            grpc = "127.0.0.1:0"
            lease_ms = 1000
        "#;
        let mut cfg: NodeConfig = toml::from_str(text).unwrap();
        cfg.normalize().unwrap();
        assert_eq!(cfg.id.as_str(), "edge-a");
        assert_eq!(cfg.tier, Tier::Edge);
        assert_eq!(cfg.lease_ms, 1000);
        assert_eq!(cfg.max_frame_bytes, 1 << 20);
    }

    #[test]
    fn rejects_bad_settings_with_a_clear_message() {
        let bad = |text: &str| {
            let parsed: Result<NodeConfig, _> = toml::from_str(text);
            match parsed {
                Err(e) => e.to_string(),
                Ok(mut c) => c.normalize().unwrap_err().to_string(),
            }
        };
        assert!(bad(r#"id = "Edge A"
tier = "edge"
site = "s""#)
        .contains("invalid node id \"Edge A\""));
        assert!(bad(r#"id = "e"
tier = "fog"
site = "s""#)
        .contains("unknown variant `fog`"));
        assert!(bad(r#"id = "e"
tier = "edge""#)
        .contains("needs a site"));
        assert!(bad(r#"id = "c"
tier = "cloud"
site = "site-a""#)
        .contains("cloud nodes belong to the site \"cloud\""));
        assert!(bad(r#"id = "e"
tier = "edge"
site = "s"
listen = ["carrier-pigeon/1"]"#)
        .contains("invalid zenoh endpoint \"carrier-pigeon/1\""));
        assert!(bad(r#"id = "e"
tier = "edge"
site = "s"
simulate = ["wind_turbine:2"]"#)
        .contains("only iot gateways"));
        assert!(bad(r#"id = "c"
tier = "cloud"
passivate_after_s = 30"#)
        .contains("passivation (passivate_after_s) applies to edge nodes"));
        assert!(bad(r#"id = "e"
tier = "edge"
site = "s"
site_epsilon_per_period = 5.0"#)
        .contains("site budgets (site_epsilon_per_period, site_budget_period_s) are kept by the cloud node"));
        assert!(bad(r#"id = "c"
tier = "cloud"
site_epsilon_per_period = -1.0"#)
        .contains("invalid site_epsilon_per_period -1"));
        let mut c = NodeConfig::new("c".parse().unwrap(), Tier::Cloud, "");
        c.site_epsilon_per_period = Some(2.5);
        c.site_budget_period_s = Some(3600);
        c.normalize().unwrap();
        assert_eq!(c.site_budget().epsilon_per_period, 2.5);
        assert_eq!(c.site_budget().period_ns, 3_600_000_000_000);
        assert!(bad(r#"id = "e"
tier = "iot"
site = "s"
simulate = ["toaster"]"#)
        .contains("unknown asset kind \"toaster\""));
        assert!(bad(r#"id = "e"
tier = "edge"
site = "s"
colour = "blue""#)
        .contains("unknown field `colour`"));
    }

    #[test]
    fn a_router_is_checked_as_a_node_is() {
        let router = |listen: &[&str]| {
            RouterConfig::new(
                "router".parse().unwrap(),
                listen.iter().map(|s| s.to_string()).collect(),
            )
        };
        let mut ok = router(&["tcp/127.0.0.1:0"]);
        ok.connect = vec!["tcp/127.0.0.1:7447".into()];
        ok.normalize().unwrap();
        assert_eq!(ok.lease_ms, default_lease_ms());
        let refused = |mut c: RouterConfig| c.normalize().unwrap_err().to_string();
        assert!(refused(router(&[])).contains("needs at least one --listen endpoint"));
        assert!(refused(router(&["udp/127.0.0.1:0"])).contains("protocol \"udp\" is not supported"));
        assert!(refused(router(&["quic/127.0.0.1:0"])).contains("needs TLS certificates"));
        assert!(refused(router(&["tcp/0.0.0.0:7447"]))
            .contains("refusing to serve zenoh on non-loopback address tcp/0.0.0.0:7447"));
        let mut insecure = router(&["tcp/0.0.0.0:7447"]);
        insecure.insecure = true;
        insecure.normalize().unwrap();
        let mut acl = router(&["tcp/127.0.0.1:0"]);
        acl.acl_file = Some("acl.toml".into());
        assert!(refused(acl).contains("an ACL roster (--acl) needs TLS"));
        let mut lease = router(&["tcp/127.0.0.1:0"]);
        lease.lease_ms = 10;
        assert!(refused(lease).contains("invalid lease_ms 10"));
    }

    #[test]
    fn chains_in_the_configuration_are_validated() {
        let ok = r#"
            id = "iot-a"
            tier = "iot"
            site = "site-a"
            simulate = ["wind_turbine:1"]

            [[chains.wind_turbine.stage]]
            op = "decimate"
            signal = "bearing_vibration"
            factor = 2
            tier = "iot"
        "#;
        let mut cfg: NodeConfig = toml::from_str(ok).unwrap();
        cfg.normalize().unwrap();
        assert_eq!(cfg.chains[&AssetKind::WindTurbine].stage.len(), 1);
        let bad = ok.replace("factor = 2", "factor = 1");
        let mut cfg: NodeConfig = toml::from_str(&bad).unwrap();
        let err = cfg.normalize().unwrap_err().to_string();
        assert_eq!(err, "invalid chain for wind_turbine in the configuration: stage 1 (decimate): parameter factor: 1 must be a whole number in 2..=64");
    }

    #[test]
    fn plaintext_listeners_off_loopback_need_insecure() {
        let edge = || NodeConfig::new("edge-a".parse().unwrap(), Tier::Edge, "site-a");
        let refused = |c: &mut NodeConfig| c.normalize().unwrap_err().to_string();
        let mut c = edge();
        c.listen = vec!["tcp/0.0.0.0:7447".into()];
        let e = refused(&mut c);
        assert!(
            e.contains("tcp/0.0.0.0:7447") && e.contains("--insecure") && !e.contains('\n'),
            "{e}"
        );
        c.listen = vec!["tcp/edge-a.example:7447".into()];
        assert!(refused(&mut c).contains("edge-a.example"));
        let mut c = edge();
        c.grpc = Some("0.0.0.0:0".parse().unwrap());
        assert!(refused(&mut c).contains("gRPC on non-loopback address 0.0.0.0:0"));
        let mut c = edge();
        c.http = Some("[::]:8080".parse().unwrap());
        assert!(refused(&mut c).contains("HTTP on non-loopback address [::]:8080"));
        // Loopback is always fine; --insecure opens the rest, and says what it exposes.
        let mut c = edge();
        c.listen = vec![
            "tcp/127.0.0.1:0".into(),
            "tcp/[::1]:0".into(),
            "tcp/localhost:7447".into(),
            "tcp/127.0.0.2:7447".into(),
        ];
        c.grpc = Some("127.0.0.1:0".parse().unwrap());
        c.http = Some("[::1]:0".parse().unwrap());
        c.normalize().unwrap();
        assert!(c.exposed_plaintext().is_empty());
        c.listen.push("tcp/0.0.0.0:7447".into());
        c.grpc = Some("0.0.0.0:50051".parse().unwrap());
        c.insecure = true;
        c.normalize().unwrap();
        assert_eq!(
            c.exposed_plaintext(),
            vec!["tcp/0.0.0.0:7447".to_owned(), "0.0.0.0:50051".to_owned()]
        );
        let mut c: NodeConfig = toml::from_str(
            "id = \"e\"\ntier = \"edge\"\nsite = \"s\"\nlisten = [\"tcp/0.0.0.0:1\"]\ninsecure = true",
        )
        .unwrap();
        c.normalize().unwrap();
    }

    #[test]
    fn an_acl_roster_needs_tls() {
        let mut cfg = NodeConfig::new("edge-a".parse().unwrap(), Tier::Edge, "site-a");
        cfg.acl_file = Some("acl.toml".into());
        let err = cfg.normalize().unwrap_err().to_string();
        assert!(err.contains("needs TLS"), "{err}");
    }

    #[test]
    fn sim_specs() {
        assert_eq!(
            "wind_turbine:3".parse::<SimSpec>().unwrap(),
            SimSpec {
                kind: AssetKind::WindTurbine,
                count: 3
            }
        );
        assert_eq!("power_meter".parse::<SimSpec>().unwrap().count, 1);
        assert!("power_meter:0".parse::<SimSpec>().is_err());
        assert!("power_meter:x".parse::<SimSpec>().is_err());
    }

    /// The gateway configuration README's "Connect your devices" shows.
    fn readme_gateway() -> String {
        let readme = include_str!("../../README.md");
        let (_, rest) = readme
            .split_once("<!-- gateway.toml")
            .expect("README has the gateway example");
        let (_, rest) = rest.split_once("```toml\n").expect("a toml block");
        rest.split_once("```").expect("closed block").0.to_owned()
    }

    #[test]
    fn the_readme_gateway_config_parses_and_passes_validation() {
        let mut cfg: NodeConfig = toml::from_str(&readme_gateway()).unwrap();
        cfg.normalize().unwrap();
        assert_eq!(cfg.devices.len(), 3);
        let checked = crate::devices::check_all(&cfg.devices, &cfg.site).unwrap();
        let protocols: Vec<&str> = checked
            .iter()
            .map(|d| match d.protocol {
                crate::devices::Protocol::Mqtt(_) => "mqtt",
                crate::devices::Protocol::Modbus(_) => "modbus",
                crate::devices::Protocol::Opcua(_) => "opcua",
            })
            .collect();
        assert_eq!(protocols, ["mqtt", "modbus", "opcua"]);
    }

    #[test]
    fn device_errors_name_the_device_and_the_field() {
        let base = readme_gateway();
        let err = |text: &str| {
            let mut cfg: NodeConfig = toml::from_str(text).unwrap();
            cfg.normalize().unwrap_err().to_string()
        };
        let e = err(&base.replace("signal = \"cpu_temperature\"", "signal = \"rpm\""));
        assert!(
            e.contains("device site-a/hpc-01: mqtt signal \"rpm\": unknown signal"),
            "{e}"
        );
        let e = err(&base.replace("property = \"power_cap\"", "property = \"warp\""));
        assert!(
            e.contains("device site-a/hpc-01: mqtt setpoint \"warp\""),
            "{e}"
        );
        let e = err(&base.replace("mqtt://127.0.0.1:1883", "http://127.0.0.1:1883"));
        assert!(
            e.contains("device site-a/hpc-01: mqtt url: invalid url"),
            "{e}"
        );
        let e = err(&base.replace("type = \"i32\"", "type = \"u64\""));
        assert!(
            e.contains(
                "device site-a/wt-01: modbus signal \"power\": invalid register type \"u64\""
            ),
            "{e}"
        );
        let e = err(&base.replace("kind = \"spindle\"", "kind = \"press\""));
        assert!(
            e.contains("device site-a/sp-01: kind: unknown asset kind \"press\""),
            "{e}"
        );
        let e = err(&base.replace("twin = \"site-a/sp-01\"", "twin = \"site-b/sp-01\""));
        assert!(
            e.contains("device site-b/sp-01: twin is on site \"site-b\""),
            "{e}"
        );
        let e = err(&base.replace("tier = \"iot\"", "tier = \"edge\""));
        assert!(e.contains("only iot gateways read devices"), "{e}");
        let e = err(&base.replace("twin = \"site-a/sp-01\"", "twin = \"site-a/hpc-01\""));
        assert!(e.contains("device site-a/hpc-01: configured twice"), "{e}");
    }
}
