//! Command-line interface of the `twinmesh` binary (DESIGN §9 "CLI").

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use twinmesh_nodes::config::{FaultSpec, NodeConfig, RouterConfig, SimSpec, TlsConfig, ZenohMode};

#[derive(Debug, Parser)]
#[command(
    name = "twinmesh",
    version,
    about = "Distributed digital-twin mesh for industrial SMEs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole mesh on this machine: cloud, two edge sites, one IoT gateway per site.
    Up(UpArgs),
    /// Run one node (cloud, edge or iot).
    Node(Box<NodeArgs>),
    /// Run a Zenoh router (no twins, no API) that nodes connect to when they cannot
    /// reach each other directly; run those nodes with `--mode router`.
    Router(RouterArgs),
    /// Operate a running mesh through gRPC.
    Ctl(crate::ctl::CtlArgs),
    /// Measure the mesh (results go to BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
    /// Evaluate the anomaly algorithms on simulated faults (EVALUATION.md).
    Eval(crate::eval::EvalArgs),
    /// Write simulated samples of an asset kind as CSV.
    Sim(crate::tools::SimArgs),
    /// Run a signal operator over CSV on stdin, CSV on stdout.
    Dsp(crate::tools::DspArgs),
    /// Upload a CSV/JSON file into a twin's history through gRPC.
    Ingest(crate::tools::IngestArgs),
    /// Create or rotate AES-256 key files (site keys).
    Keys(crate::admin::KeysArgs),
    /// Create a site CA and issue node/device certificates.
    Certs(crate::admin::CertsArgs),
    /// Check an ACL roster and print the Zenoh access control it generates.
    Acl(crate::admin::AclArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Simulated assets of each kind per site.
    #[arg(long, default_value_t = 2)]
    pub assets_per_kind: u32,
    /// gRPC address of the cloud node (edges and gateways take the next ports).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc: SocketAddr,
    /// Dashboard and /metrics address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Zenoh endpoint of the cloud node, open to outside clients.
    #[arg(long, default_value = "tcp/127.0.0.1:7447")]
    pub zenoh: String,
    /// Data directory (one database per node below it).
    #[arg(long, default_value = "twinmesh-data")]
    pub data: PathBuf,
    /// Seed of the simulators.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Edges stop twins idle this many seconds until their next frame or call
    /// (passivation; 0: never).
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub passivate_after: u64,
    /// Mutual TLS on every Zenoh link and TLS on gRPC, with a CA and certificates
    /// created under DATA/certs.
    #[arg(long)]
    pub secure: bool,
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// Traces across tiers (OpenTelemetry over OTLP/gRPC); off unless an endpoint is given.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// Export traces over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317
    /// (an OpenTelemetry collector, Jaeger). Absent: no traces, at no cost.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Share of ingest traces sampled (a frame's publish and ingest, window analyses);
    /// twin calls, migrations and failovers are always sampled.
    #[arg(long, default_value_t = 0.01, value_name = "RATIO")]
    pub trace_ingest_ratio: f64,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML configuration file (flags are ignored when given).
    #[arg(long, conflicts_with_all = ["tier", "id", "site"])]
    pub config: Option<PathBuf>,
    /// iot, edge or cloud.
    #[arg(long, required_unless_present = "config")]
    pub tier: Option<String>,
    #[arg(long, required_unless_present = "config")]
    pub id: Option<String>,
    /// Site of the node (cloud nodes: `cloud`, the default for them).
    #[arg(long)]
    pub site: Option<String>,
    /// Zenoh endpoint to listen on (repeatable), e.g. tcp/127.0.0.1:0.
    #[arg(long)]
    pub listen: Vec<String>,
    /// Zenoh endpoint to connect to (repeatable); retried while unreachable.
    #[arg(long)]
    pub connect: Vec<String>,
    /// peer, client or router. Nodes that reach each other only through Zenoh routers
    /// (`twinmesh router`, zenohd) need router (or client): routers do not forward
    /// between the peers connected to them.
    #[arg(long, default_value = "peer")]
    pub mode: ZenohMode,
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub grpc: Option<SocketAddr>,
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Simulated assets, KIND[:COUNT],... (iot tier).
    #[arg(long, value_delimiter = ',')]
    pub simulate: Vec<SimSpec>,
    /// Folder of W3C WoT Thing Models (`*.json`) defining more asset kinds; a bad model
    /// stops the node with the file, the property and the reason.
    #[arg(long = "models", value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Fault of a simulated asset, ASSET=MODE@SECONDS after start or @UNIX_SECONDS
    /// (repeatable), e.g. wt-01=outer_race@30, pm-01=harmonic_distortion@10,
    /// hpc-01=stuck:power@5.
    #[arg(long)]
    pub fault: Vec<FaultSpec>,
    /// Liveliness lease in ms.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Largest accepted telemetry frame in bytes.
    #[arg(long, default_value_t = twinmesh_twins::frame::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Enable Zenoh multicast scouting (off by default).
    #[arg(long)]
    pub multicast: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Edge nodes: stop twins idle this many seconds until their next frame or call
    /// (passivation; 0: never).
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub passivate_after: u64,
    /// Site key file shared by the site's iot and edge nodes (`twinmesh keys new`):
    /// protected signals travel sealed with it.
    #[arg(long, value_name = "FILE")]
    pub site_key: Option<PathBuf>,
    /// Edge and cloud nodes: the mesh key file (`twinmesh keys new`); with it the node
    /// vouches for its callers on the fabric.
    #[arg(long, value_name = "FILE")]
    pub mesh_key: Option<PathBuf>,
    /// Folder of `{site}.control.key` files: proofs on telemetry, acks and control.
    #[arg(long, value_name = "DIR")]
    pub control_keys: Option<PathBuf>,
    /// Cloud nodes: ε each site may spend on set releases per period (default 10).
    #[arg(long, value_name = "EPSILON")]
    pub site_epsilon: Option<f64>,
    /// Cloud nodes: period of the site ledgers in seconds (default 86400).
    #[arg(long, value_name = "SECONDS")]
    pub site_budget_period: Option<u64>,
    /// Site CA certificate (PEM): with --tls-cert and --tls-key, every Zenoh link is
    /// mutual TLS (endpoints tls/...) and gRPC is served over TLS.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM, from `twinmesh certs issue`).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// Zenoh access control from this roster of certificate names per tier (TOML:
    /// mesh, gateways.SITE, readers; see `twinmesh acl`); needs the --tls-* flags.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub acl: Option<PathBuf>,
    /// Encrypt history, snapshots, replicas and the spool at rest with this key file.
    #[arg(long, value_name = "FILE")]
    pub at_rest_key: Option<PathBuf>,
    /// gRPC callers need a bearer JWT signed with this HS256 secret (file).
    #[arg(long, value_name = "FILE")]
    pub auth_hs256_secret: Option<PathBuf>,
    /// ... or with the key of this PEM public key (RS256 or ES256).
    #[arg(long, value_name = "FILE")]
    pub auth_public_key: Option<PathBuf>,
    /// ... or with a key of this JWKS document.
    #[arg(long, value_name = "FILE")]
    pub auth_jwks: Option<PathBuf>,
    /// Required token issuer (iss).
    #[arg(long)]
    pub auth_issuer: Option<String>,
    /// Required token audience (aud).
    #[arg(long)]
    pub auth_audience: Option<String>,
    /// Claim carrying the role(s), dotted for nested claims (e.g. realm_access.roles).
    #[arg(long, default_value = "roles")]
    pub auth_roles_claim: String,
    /// Claim listing the sites a token's role holds on (absent: every site).
    #[arg(long, default_value = "twinmesh_sites")]
    pub auth_sites_claim: String,
    /// Allow plaintext Zenoh, gRPC and HTTP on non-loopback addresses (protected mode
    /// off); without it such a node needs the --tls-* flags.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub trace: TraceArgs,
}

impl NodeArgs {
    pub fn into_config(self) -> anyhow::Result<NodeConfig> {
        if let Some(path) = self.config {
            return Ok(NodeConfig::from_file(&path)?);
        }
        let tier = self.tier.unwrap_or_default().parse()?;
        let id = self.id.unwrap_or_default().parse()?;
        let mut cfg = NodeConfig::new(id, tier, self.site.as_deref().unwrap_or_default());
        cfg.listen = self.listen;
        cfg.connect = self.connect;
        cfg.mode = self.mode;
        if let Some(d) = self.data {
            cfg.data = d;
        }
        cfg.grpc = self.grpc;
        cfg.http = self.http;
        cfg.simulate = self.simulate;
        cfg.faults = self.fault;
        if let Some(dir) = self.models_dir {
            twinmesh_nodes::kinds::load_dir(&dir)?;
            cfg.models_dir = Some(dir);
        }
        cfg.lease_ms = self.lease_ms;
        cfg.max_frame_bytes = self.max_frame_bytes;
        cfg.multicast = self.multicast;
        cfg.seed = self.seed;
        cfg.passivate_after_s = self.passivate_after;
        cfg.site_key_file = self.site_key;
        cfg.mesh_key_file = self.mesh_key;
        cfg.control_keys_dir = self.control_keys;
        cfg.site_epsilon_per_period = self.site_epsilon;
        cfg.site_budget_period_s = self.site_budget_period;
        cfg.at_rest_key_file = self.at_rest_key;
        cfg.acl_file = self.acl;
        if let (Some(ca), Some(cert), Some(key)) = (self.tls_ca, self.tls_cert, self.tls_key) {
            cfg.tls = Some(TlsConfig {
                ca_file: ca,
                cert_file: cert,
                key_file: key,
            });
        }
        cfg.auth = twinmesh_nodes::auth::AuthConfig {
            hs256_secret_file: self.auth_hs256_secret,
            public_key_file: self.auth_public_key,
            jwks_file: self.auth_jwks,
            issuer: self.auth_issuer,
            audience: self.auth_audience,
            roles_claim: self.auth_roles_claim,
            sites_claim: self.auth_sites_claim,
        };
        cfg.insecure = self.insecure;
        cfg.normalize()?;
        Ok(cfg)
    }
}

#[derive(Debug, Args)]
pub struct RouterArgs {
    /// Its name: in logs, and its certificate name under --acl.
    #[arg(long, default_value = "router")]
    pub id: String,
    /// Zenoh endpoint nodes and other routers connect to (repeatable), e.g.
    /// tcp/127.0.0.1:7447 or quic/0.0.0.0:7447.
    #[arg(long, required = true)]
    pub listen: Vec<String>,
    /// Another router to connect to (repeatable); retried while unreachable.
    #[arg(long)]
    pub connect: Vec<String>,
    /// Lease of its links in ms.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Enable Zenoh multicast scouting (off by default).
    #[arg(long)]
    pub multicast: bool,
    /// Site CA certificate (PEM): with --tls-cert and --tls-key every link is mutual
    /// TLS (endpoints tls/ or quic/).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// The router's certificate (PEM, from `twinmesh certs issue`).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// The router's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// The mesh's ACL roster (the router's name under `routers`); needs the --tls-* flags.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub acl: Option<PathBuf>,
    /// Allow plaintext listeners on non-loopback addresses.
    #[arg(long)]
    pub insecure: bool,
}

impl RouterArgs {
    pub fn into_config(self) -> anyhow::Result<RouterConfig> {
        let mut cfg = RouterConfig::new(self.id.parse()?, self.listen);
        cfg.connect = self.connect;
        cfg.lease_ms = self.lease_ms;
        cfg.multicast = self.multicast;
        if let (Some(ca), Some(cert), Some(key)) = (self.tls_ca, self.tls_cert, self.tls_key) {
            cfg.tls = Some(TlsConfig {
                ca_file: ca,
                cert_file: cert,
                key_file: key,
            });
        }
        cfg.acl_file = self.acl;
        cfg.insecure = self.insecure;
        cfg.normalize()?;
        Ok(cfg)
    }
}
