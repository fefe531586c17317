//! Harness for twinmesh end-to-end tests: starts real `twinmesh node` processes on
//! loopback with ephemeral ports, waits for their `ready` line, and offers gRPC and raw
//! Zenoh clients plus a polling helper (no sleeps standing in for synchronisation).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use twinmesh_nodes::client::request_placement;
use twinmesh_proto::v1::mesh_service_client::MeshServiceClient;
use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_proto::v1::{
    GetPlacementRequest, GetTwinRequest, ListTwinsRequest, MigrateTwinRequest, MigrateTwinResponse,
    Placement, PlacementRequest, SetDesiredRequest, SetDesiredResponse, Twin, TwinSummary,
    WatchTwinRequest, WatchTwinResponse,
};
use zenoh::bytes::Encoding;

pub mod devices;

/// The cloud node and the edge of site-a of a [`Mesh`], for [`node_args`].
pub const CLOUD: (&str, &str, Option<&str>) = ("cloud", "cloud", None);
pub const EDGE_A: (&str, &str, Option<&str>) = ("edge", "edge-a", Some("site-a"));
/// Listening on any free port.
pub const ANY_PORT: &str = "tcp/127.0.0.1:0";

/// `twinmesh node` arguments of node `id` of `tier` (of `site`, if given) listening on
/// `listen`, connected to `connect`, with gRPC on any port and its database in `data`.
pub fn node_args(
    (tier, id, site): (&str, &str, Option<&str>),
    listen: &str,
    connect: &[&str],
    data: &str,
) -> Vec<String> {
    let mut a = args(["--tier", tier, "--id", id]);
    if let Some(site) = site {
        a.extend(args(["--site", site]));
    }
    a.extend(args(["--listen", listen]));
    for c in connect {
        a.extend(args(["--connect", c]));
    }
    a.extend(args(["--grpc", "127.0.0.1:0", "--data", data]));
    let keys = Path::new(data)
        .parent()
        .unwrap_or(Path::new("."))
        .join("keys");
    a.extend(key_args(&keys, tier, site).expect("key files for the test mesh"));
    a
}

/// `twinmesh node` arguments of node `id` of `tier` (of `site`, if given) in Zenoh mode
/// `mode` that listens nowhere and connects only to `connect` (the routers it reaches
/// the mesh through), with gRPC on any port and its database in `data`.
pub fn routed_node_args(
    (tier, id, site): (&str, &str, Option<&str>),
    mode: &str,
    connect: &[&str],
    data: &str,
) -> Vec<String> {
    let mut a = args(["--tier", tier, "--id", id, "--mode", mode]);
    if let Some(site) = site {
        a.extend(args(["--site", site]));
    }
    for c in connect {
        a.extend(args(["--connect", c]));
    }
    a.extend(args(["--grpc", "127.0.0.1:0", "--data", data]));
    let keys = Path::new(data)
        .parent()
        .unwrap_or(Path::new("."))
        .join("keys");
    a.extend(key_args(&keys, tier, site).expect("key files for the test mesh"));
    a
}

/// What a gateway of `site` can prove with the test mesh's keys under `dir` (its site's
/// control and site keys; no mesh key): to send frames and batches as a gateway would.
pub fn gateway_trust(dir: &Path, site: &str) -> anyhow::Result<twinmesh_actors::trust::Trust> {
    let keys = dir.join("keys");
    key_args(&keys, "iot", Some(site))?;
    let control =
        twinmesh_nodes::config::load_key_ring(&keys.join(format!("{site}.control.key")), "key")?;
    let site_ring = twinmesh_nodes::config::load_key_ring(Path::new(&site_key(dir, site)?), "key")?;
    Ok(twinmesh_actors::trust::Trust::new("test-gateway", site)
        .with_site_key(&site_ring)
        .with_control_key(site, &control))
}

/// `f` encoded with the proof its site's gateway would add (keys under `dir`, as
/// [`gateway_trust`]): the frames a test sends as the gateway.
pub fn proven_frame(dir: &Path, mut f: twinmesh_proto::v1::TelemetryFrame) -> Vec<u8> {
    use prost::Message;
    let site = f.twin_id.split('/').next().unwrap_or_default().to_owned();
    let trust = gateway_trust(dir, &site).expect("the test mesh's keys");
    assert!(trust.prove(&site, &mut f), "no control key for {site}");
    f.encode_to_vec()
}

/// Sites whose control keys every test mesh has from the start (the cloud loads the
/// ones it finds when it starts).
pub const TEST_SITES: [&str; 2] = ["site-a", "site-b"];

/// The key arguments `twinmesh up` gives a node of `tier` on `site`, with the key files
/// under `keys` (created on first use): `--control-keys` for every node, `--mesh-key` for
/// edge and cloud nodes. Site keys are separate ([`site_key`]).
pub fn key_args(keys: &Path, tier: &str, site: Option<&str>) -> anyhow::Result<Vec<String>> {
    let ensure = |path: PathBuf| -> anyhow::Result<String> {
        if !path.exists() {
            twinmesh_nodes::keys::new_key_file(&path, "k1")?;
        }
        Ok(path.display().to_string())
    };
    for s in TEST_SITES.iter().copied().chain(site) {
        ensure(keys.join(format!("{s}.control.key")))?;
    }
    let mut a = vec!["--control-keys".to_owned(), keys.display().to_string()];
    if tier != "iot" {
        a.extend(["--mesh-key".to_owned(), ensure(keys.join("mesh.key"))?]);
    }
    Ok(a)
}

/// How long a node may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The `twinmesh` binary: `TWINMESH_BIN`, else `target/<profile>/twinmesh` beside this
/// test executable. `cargo test --workspace` (the README's test command) builds it
/// before any test runs, because `twinmesh-cli` has integration tests of its own; a
/// narrower `cargo test -p twinmesh-tests` needs `cargo build --bin twinmesh` first.
pub fn twinmesh_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("TWINMESH_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test-exe> → target/<profile>/twinmesh
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .join(format!("twinmesh{}", std::env::consts::EXE_SUFFIX));
        assert!(
            bin.exists(),
            "{} is missing: run the tests with `cargo test --workspace`, or build it first \
             (`cargo build --bin twinmesh`), or set TWINMESH_BIN",
            bin.display()
        );
        bin
    })
    .clone()
}

/// What a node printed in its `ready` line.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    pub node: String,
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub zenoh: Vec<String>,
}

impl Ready {
    fn parse(line: &str) -> Option<Ready> {
        let rest = line.strip_prefix("ready ")?;
        let mut r = Ready::default();
        for field in rest.split(' ') {
            let (k, v) = field.split_once('=')?;
            match k {
                "node" => r.node = v.to_owned(),
                "grpc" if !v.is_empty() => r.grpc = v.parse().ok(),
                "http" if !v.is_empty() => r.http = v.parse().ok(),
                "zenoh" if !v.is_empty() => r.zenoh = v.split(',').map(str::to_owned).collect(),
                _ => {}
            }
        }
        Some(r)
    }
}

/// A running `twinmesh node` process. Killed (SIGKILL) on drop.
pub struct NodeProc {
    pub ready: Ready,
    pub args: Vec<String>,
    pub stderr_path: PathBuf,
    child: Child,
}

impl NodeProc {
    /// Starts `twinmesh node ARGS...` and waits for its ready line. Stderr goes to
    /// `log_dir/<name>.log`, printed if the node fails to start.
    pub fn start(args: &[String], log_dir: &Path, name: &str) -> anyhow::Result<NodeProc> {
        Self::start_with_env(args, log_dir, name, &[])
    }

    /// [`NodeProc::start`] with extra environment variables for this process only (e.g.
    /// a store failpoint).
    pub fn start_with_env(
        args: &[String],
        log_dir: &Path,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProc> {
        Self::spawn("node", args, log_dir, name, env)
    }

    /// Starts `twinmesh router ARGS...` (a Zenoh router process) and waits for its
    /// ready line, as [`NodeProc::start`] does for a node.
    pub fn start_router(args: &[String], log_dir: &Path, name: &str) -> anyhow::Result<NodeProc> {
        Self::spawn("router", args, log_dir, name, &[])
    }

    fn spawn(
        command: &str,
        args: &[String],
        log_dir: &Path,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProc> {
        std::fs::create_dir_all(log_dir)?;
        let stderr_path = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)?;
        let mut child = Command::new(twinmesh_bin())
            .arg(command)
            .args(args)
            .env(
                "RUST_LOG",
                "warn,twinmesh=debug,twinmesh_actors=debug,twinmesh_nodes=debug",
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(r) = Ready::parse(&line) {
                    let _ = tx.send(r);
                }
            }
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(ready) => Ok(NodeProc {
                ready,
                args: args.to_vec(),
                stderr_path,
                child,
            }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                anyhow::bail!("node {name} did not become ready (exit {status:?}); log:\n{log}")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.ready.grpc.expect("node serves gRPC"))
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT, then waits for the exit (bounded).
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill9();
                anyhow::bail!("node did not stop within 30 s after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Argument list helper: `args(["--tier", "edge"])`.
pub fn args<const N: usize>(a: [&str; N]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The key file of `site` under `dir` (created on first use), as an argument.
pub fn site_key(dir: &Path, site: &str) -> anyhow::Result<String> {
    let path = dir.join("keys").join(format!("{site}.key"));
    if !path.exists() {
        twinmesh_nodes::keys::new_key_file(&path, "k1")?;
    }
    Ok(path.display().to_string())
}

/// A small mesh: one cloud, one edge of `site-a`, optionally one gateway.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub cloud: NodeProc,
    pub edge: NodeProc,
    pub iot: Option<NodeProc>,
}

impl Mesh {
    /// A Zenoh peer attached to the edge and the cloud, as a user's own gateway would be.
    pub async fn gateway_peer(&self) -> zenoh::Session {
        zenoh_peer(&[
            self.edge.ready.zenoh[0].clone(),
            self.cloud.ready.zenoh[0].clone(),
        ])
        .await
    }

    pub fn data(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    pub fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Starts cloud + edge-a (+ iot-a simulating `simulate`, if given).
    pub fn start(simulate: Option<&str>, edge_extra: &[&str]) -> anyhow::Result<Mesh> {
        Self::start_with(simulate, edge_extra, &[])
    }

    /// Like [`Mesh::start`], with extra arguments for the gateway (e.g. `--fault`).
    pub fn start_with(
        simulate: Option<&str>,
        edge_extra: &[&str],
        iot_extra: &[&str],
    ) -> anyhow::Result<Mesh> {
        Self::start_all(simulate, &[], edge_extra, iot_extra)
    }

    /// Like [`Mesh::start_with`], with extra arguments for the cloud node too (e.g.
    /// `--http`, `--auth-*`).
    pub fn start_all(
        simulate: Option<&str>,
        cloud_extra: &[&str],
        edge_extra: &[&str],
        iot_extra: &[&str],
    ) -> anyhow::Result<Mesh> {
        let dir = tempfile::tempdir()?;
        let logs = dir.path().join("logs");
        let d = |n: &str| dir.path().join(n).display().to_string();
        let site_key = site_key(dir.path(), "site-a")?;
        let mut cloud_args = node_args(CLOUD, ANY_PORT, &[], &d("cloud"));
        cloud_args.extend(args(["--lease-ms", "1000"]));
        cloud_args.extend(cloud_extra.iter().map(|s| s.to_string()));
        let cloud = NodeProc::start(&cloud_args, &logs, "cloud")?;
        let cloud_ep = cloud.ready.zenoh[0].clone();
        let mut edge_args = node_args(EDGE_A, ANY_PORT, &[&cloud_ep], &d("edge-a"));
        edge_args.extend(args(["--lease-ms", "1000", "--site-key", &site_key]));
        edge_args.extend(edge_extra.iter().map(|s| s.to_string()));
        let edge = NodeProc::start(&edge_args, &logs, "edge-a")?;
        let iot = match simulate {
            Some(sim) => {
                let connect = [edge.ready.zenoh[0].as_str(), &cloud_ep];
                let mut iot_args = node_args(
                    ("iot", "iot-a", Some("site-a")),
                    ANY_PORT,
                    &connect,
                    &d("iot-a"),
                );
                iot_args.extend(args([
                    "--simulate",
                    sim,
                    "--lease-ms",
                    "1000",
                    "--site-key",
                    &site_key,
                ]));
                iot_args.extend(iot_extra.iter().map(|s| s.to_string()));
                Some(NodeProc::start(&iot_args, &logs, "iot-a")?)
            }
            None => None,
        };
        Ok(Mesh {
            dir,
            cloud,
            edge,
            iot,
        })
    }
}

pub async fn twin_client(endpoint: &str) -> TwinServiceClient<Channel> {
    TwinServiceClient::new(channel(endpoint).await)
}

pub async fn mesh_client(endpoint: &str) -> MeshServiceClient<Channel> {
    MeshServiceClient::new(channel(endpoint).await)
}

/// Twin `id` as `GetTwin` through `endpoint` returns it.
pub async fn get_twin(endpoint: &str, id: &str) -> Result<Twin, tonic::Status> {
    twin_client(endpoint)
        .await
        .get_twin(GetTwinRequest { twin_id: id.into() })
        .await
        .map(|r| r.into_inner())
}

/// `SetDesired` of `property` of twin `id` to `value` through `endpoint`.
pub async fn set_desired(
    endpoint: &str,
    id: &str,
    property: &str,
    value: f64,
    expected_revision: Option<u64>,
) -> Result<SetDesiredResponse, tonic::Status> {
    twin_client(endpoint)
        .await
        .set_desired(SetDesiredRequest {
            twin_id: id.into(),
            property: property.into(),
            value,
            expected_revision,
        })
        .await
        .map(|r| r.into_inner())
}

/// The stream of twin `id`'s states and events from `WatchTwin` through `endpoint`.
pub async fn watch_twin(endpoint: &str, id: &str) -> tonic::Streaming<WatchTwinResponse> {
    twin_client(endpoint)
        .await
        .watch_twin(WatchTwinRequest { twin_id: id.into() })
        .await
        .expect("WatchTwin")
        .into_inner()
}

/// The twins of `site` (every site: "") as `ListTwins` through `endpoint` lists them.
pub async fn list_twins(endpoint: &str, site: &str) -> Result<Vec<TwinSummary>, tonic::Status> {
    let req = ListTwinsRequest {
        site: site.into(),
        ..Default::default()
    };
    let list = twin_client(endpoint).await.list_twins(req).await?;
    Ok(list.into_inner().twins)
}

/// The placement of twin `id` as `GetPlacement` through `endpoint` returns it.
pub async fn get_placement(endpoint: &str, id: &str) -> Result<Placement, tonic::Status> {
    mesh_client(endpoint)
        .await
        .get_placement(GetPlacementRequest { twin_id: id.into() })
        .await
        .map(|r| r.into_inner())
}

/// `MigrateTwin` of twin `id` to node `target` through `endpoint`.
pub async fn migrate_twin(
    endpoint: &str,
    id: &str,
    target: &str,
) -> Result<MigrateTwinResponse, tonic::Status> {
    mesh_client(endpoint)
        .await
        .migrate_twin(MigrateTwinRequest {
            twin_id: id.into(),
            target_node: target.into(),
            target_tier: String::new(),
            unpin: false,
        })
        .await
        .map(|r| r.into_inner())
}

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to gRPC")
}

/// A plain Zenoh session in client mode attached to `endpoint` (an outside client, as a
/// dashboard in another language would be).
pub async fn zenoh_client(endpoint: &str) -> zenoh::Session {
    zenoh_session("client", &[endpoint.to_owned()]).await
}

/// A Zenoh peer attached directly to `endpoints` (a gateway written by a user).
pub async fn zenoh_peer(endpoints: &[String]) -> zenoh::Session {
    zenoh_session("peer", endpoints).await
}

async fn zenoh_session(mode: &str, endpoints: &[String]) -> zenoh::Session {
    let mut c = zenoh::Config::default();
    c.insert_json5("mode", &format!("{mode:?}")).unwrap();
    c.insert_json5("listen/endpoints", "[]").unwrap();
    c.insert_json5(
        "connect/endpoints",
        &serde_json::to_string(endpoints).unwrap(),
    )
    .unwrap();
    c.insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    zenoh::open(c).await.expect("open zenoh session")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Feeds samples of a Zenoh subscriber to `step` until it returns true; panics naming
/// `what` when `timeout` passes first.
pub async fn recv_until(
    timeout: Duration,
    what: &str,
    rx: &zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>,
    mut step: impl FnMut(zenoh::sample::Sample) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv_async()).await {
            Ok(Ok(sample)) => {
                if step(sample) {
                    return;
                }
            }
            Ok(Err(_)) => panic!("subscriber closed while waiting for {what}"),
            Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64
}

/// Runs a `twinmesh` command to completion; returns (status, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(twinmesh_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run twinmesh");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A mesh built node by node (several edges per site, kills, restarts).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: std::collections::BTreeMap<String, NodeProc>,
    /// Liveliness lease of every node, ms.
    pub lease_ms: u64,
}

impl Cluster {
    pub fn new(lease_ms: u64) -> anyhow::Result<Cluster> {
        Ok(Cluster {
            dir: tempfile::tempdir()?,
            nodes: Default::default(),
            lease_ms,
        })
    }

    pub fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    pub fn data(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    pub fn node(&self, id: &str) -> &NodeProc {
        &self.nodes[id]
    }

    /// Zenoh endpoints of every running node (to connect a new one to all of them).
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .values()
            .flat_map(|n| n.ready.zenoh.clone())
            .collect()
    }

    /// Starts `twinmesh node --tier TIER --id ID [--site SITE] ...extra`, connected to
    /// every running node, listening on `listen` (default: any port).
    pub fn start(
        &mut self,
        tier: &str,
        id: &str,
        site: Option<&str>,
        listen: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<&NodeProc> {
        let mut a = args(["--tier", tier, "--id", id, "--grpc", "127.0.0.1:0"]);
        a.extend([
            "--listen".to_owned(),
            listen.unwrap_or("tcp/127.0.0.1:0").to_owned(),
        ]);
        a.extend(["--data".to_owned(), self.data(id).display().to_string()]);
        a.extend(["--lease-ms".to_owned(), self.lease_ms.to_string()]);
        a.extend(key_args(&self.dir.path().join("keys"), tier, site)?);
        if let Some(s) = site {
            a.extend(["--site".to_owned(), s.to_owned()]);
            a.extend(["--site-key".to_owned(), site_key(self.dir.path(), s)?]);
        }
        for ep in self.endpoints() {
            a.extend(["--connect".to_owned(), ep]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        let node = NodeProc::start(&a, &self.logs(), id)?;
        self.nodes.insert(id.to_owned(), node);
        Ok(&self.nodes[id])
    }

    /// A cloud, the edges edge-a1 and edge-a2 of site-a and its gateway iot-a simulating
    /// `simulate`, on a 1 s lease: the mesh of the tests of moving twins.
    pub fn two_edges_of_site_a(simulate: &str) -> anyhow::Result<Cluster> {
        let mut c = Cluster::new(1000)?;
        c.start_site("site-a", &["edge-a1", "edge-a2"], &[], "iot-a", simulate)?;
        Ok(c)
    }

    /// The usual mesh of a test, started in this order: the cloud node, the edge nodes
    /// `edges` of `site` (each with `edge_extra`), and the site's gateway `gateway`
    /// simulating `simulate` (`KIND:COUNT`).
    pub fn start_site(
        &mut self,
        site: &str,
        edges: &[&str],
        edge_extra: &[&str],
        gateway: &str,
        simulate: &str,
    ) -> anyhow::Result<()> {
        self.start("cloud", "cloud", None, None, &[])?;
        for edge in edges {
            self.start("edge", edge, Some(site), None, edge_extra)?;
        }
        self.start("iot", gateway, Some(site), None, &["--simulate", simulate])?;
        Ok(())
    }

    /// Restarts a (killed or stopped) node with its original arguments and Zenoh port.
    pub fn restart(&mut self, id: &str) -> anyhow::Result<&NodeProc> {
        let old = self.nodes.remove(id).expect("known node");
        let mut a = old.args.clone();
        let listen = a
            .iter()
            .position(|x| x == "--listen")
            .expect("listen argument");
        a[listen + 1] = old.ready.zenoh[0].clone();
        drop(old);
        let node = NodeProc::start(&a, &self.logs(), &format!("{id}-restarted"))?;
        self.nodes.insert(id.to_owned(), node);
        Ok(&self.nodes[id])
    }

    pub fn kill9(&mut self, id: &str) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.kill9();
        }
    }
}

/// How long the helpers below wait.
const HELPER_WAIT: Duration = Duration::from_secs(60);

/// Registers an asset with the placement authority, as its site's gateway does (with
/// the proof of the test mesh's keys under `dir`).
pub async fn register(session: &zenoh::Session, dir: &Path, twin: &str, kind: &str) -> Placement {
    let site = twin.split('/').next().unwrap_or_default();
    let mut req = PlacementRequest {
        twin_id: twin.into(),
        kind: kind.into(),
        gateway: "test".into(),
        chain: None,
        thing_model: String::new(),
        proof: None,
    };
    assert!(gateway_trust(dir, site).unwrap().prove(site, &mut req));
    eventually(HELPER_WAIT, "placement reply", || async {
        request_placement(session, &req).await.ok().flatten()
    })
    .await
}

/// Publishes on `key` once a subscriber is known to match it, so nothing is sent before
/// the subscription has reached this session. On an edge that subscriber is the node's
/// router, up before the twin: callers wait until the twin answers calls first (its
/// calls and frames are routed to it from the same moment).
pub async fn publish(session: &zenoh::Session, key: &str, payload: Vec<u8>) {
    let publisher = session
        .declare_publisher(key.to_owned())
        .encoding(Encoding::from(
            <twinmesh_proto::v1::TelemetryFrame as twinmesh_proto::Wire>::ENCODING,
        ))
        .congestion_control(zenoh::qos::CongestionControl::Block)
        .await
        .expect("declare publisher");
    eventually(
        HELPER_WAIT,
        "a subscriber matching the telemetry key",
        || async {
            publisher
                .matching_status()
                .await
                .ok()
                .filter(|m| m.matching())
                .map(|_| ())
        },
    )
    .await;
    publisher.put(payload).await.expect("publish");
}

/// The `--tls-*` arguments of node `name` with the certificates under `certs` (as
/// `twinmesh certs` writes them).
pub fn tls_args(certs: &Path, name: &str) -> Vec<String> {
    let p = |f: String| certs.join(f).display().to_string();
    vec![
        "--tls-ca".into(),
        p("ca.pem".into()),
        "--tls-cert".into(),
        p(format!("{name}.pem")),
        "--tls-key".into(),
        p(format!("{name}.key")),
    ]
}

/// A Zenoh client session on `endpoint` over TLS with the CA `ca`, with a client
/// certificate (mutual TLS) if given.
pub async fn zenoh_tls_client(
    endpoint: &str,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
) -> zenoh::Result<zenoh::Session> {
    let mut c = zenoh::Config::default();
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut set = vec![
        ("mode", "\"client\"".to_owned()),
        ("connect/endpoints", format!("[{endpoint:?}]")),
        ("scouting/multicast/enabled", "false".to_owned()),
        ("transport/link/tls/root_ca_certificate", q(ca)),
    ];
    if let Some((cert, key)) = cert {
        set.extend([
            ("transport/link/tls/connect_certificate", q(cert)),
            ("transport/link/tls/connect_private_key", q(key)),
            ("transport/link/tls/enable_mtls", "true".to_owned()),
        ]);
    }
    for (k, v) in set {
        c.insert_json5(k, &v).expect("a valid Zenoh setting");
    }
    zenoh::open(c).await
}

/// `twinmesh up` as a process (killed on drop), started with `args` and
/// `--data dir/mesh`, logging to `dir/up.log`.
pub struct UpProc {
    child: Child,
    /// The cloud node's gRPC address, from the line `up` prints once the mesh is up.
    pub cloud_grpc: String,
}

impl UpProc {
    /// Starts `up` and waits (bounded) until it has printed the cloud's line.
    pub fn start(args: &[&str], dir: &Path) -> UpProc {
        let log = dir.join("up.log");
        let mut child = Command::new(twinmesh_bin())
            .arg("up")
            .args(args)
            .arg("--data")
            .arg(dir.join("mesh"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("up.log")))
            .spawn()
            .expect("twinmesh up starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let up = |cloud_grpc| UpProc { child, cloud_grpc };
        // "  cloud    cloud cloud   grpc 127.0.0.1:PORT ..." is printed once the mesh is up.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut words = line.split_whitespace();
                if words.next() == Some("cloud") {
                    let grpc = words.skip_while(|w| *w != "grpc").nth(1).map(str::to_owned);
                    let _ = tx.send(grpc);
                }
            }
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Some(grpc)) => up(grpc),
            _ => {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "`twinmesh up {}` printed no cloud line; its log:\n{log}",
                    args.join(" ")
                )
            }
        }
    }
}

impl Drop for UpProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
