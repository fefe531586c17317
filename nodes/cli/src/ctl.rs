//! `twinmesh ctl`: operate a running mesh through the gRPC API of any node.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};

use twinmesh_nodes::client::{code_name, connect_tls};

use twinmesh_proto::v1::mesh_service_client::MeshServiceClient;
use twinmesh_proto::v1::model_service_client::ModelServiceClient;
use twinmesh_proto::v1::privacy_service_client::PrivacyServiceClient;
use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_twins::proto::{
    self, watch_twin_response, DrainNodeRequest, GetPlacementRequest, GetThingDescriptionRequest,
    GetTwinRequest, ListKindsRequest, ListNodesRequest, ListTwinsRequest, MigrateTwinRequest,
    QueryHistoryRequest, SetChainRequest, SetDesiredRequest, WatchTwinRequest,
};
use twinmesh_twins::stats::Aggregation;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// gRPC endpoint of any node.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:50051",
        env = "TWINMESH_ENDPOINT"
    )]
    pub endpoint: String,
    /// Print proto3 JSON (one document, or one per line for streams).
    #[arg(long, global = true)]
    pub json: bool,
    /// Deadline of each call in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub timeout: f64,
    /// CA certificate (PEM) that signed the node's certificate, for https:// endpoints
    /// (`twinmesh up --secure`: DATA/certs/ca.pem).
    #[arg(long, global = true, env = "TWINMESH_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Bearer token (JWT) sent with every call; never printed.
    #[arg(long, global = true, env = "TWINMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List twins (all pages unless --page-size is given).
    Twins {
        #[arg(long, default_value = "")]
        site: String,
        #[arg(long, default_value = "")]
        kind: String,
        #[arg(long, default_value = "")]
        tier: String,
        #[arg(long, default_value = "")]
        node: String,
        #[arg(long, default_value = "")]
        status: String,
        #[arg(long)]
        page_size: Option<u32>,
    },
    /// Full state of one twin.
    Twin { id: String },
    /// W3C WoT Thing Description of one twin.
    Td { id: String },
    /// Aggregated history of one signal.
    History {
        id: String,
        signal: String,
        /// Start: `now`, `-10m` (relative to now) or nanoseconds since the epoch.
        #[arg(long, default_value = "-10m", allow_hyphen_values = true)]
        start: String,
        /// End (exclusive), same forms as --start.
        #[arg(long, default_value = "now", allow_hyphen_values = true)]
        end: String,
        /// Bucket width, e.g. 10s, 500ms, 1m.
        #[arg(long, default_value = "10s")]
        bucket: String,
        /// mean, min, max, rms or count.
        #[arg(long, default_value = "mean")]
        agg: Aggregation,
    },
    /// Stream a twin's state, features and events.
    Watch {
        id: String,
        /// Stop after this many updates.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Command a set-point.
    Desired {
        id: String,
        property: String,
        value: f64,
        /// Refuse unless the twin is at this revision.
        #[arg(long)]
        expected_revision: Option<u64>,
    },
    /// Live nodes of the mesh.
    Nodes,
    /// Asset kinds the answering node knows, with their source: built-in, file (its
    /// `--models` folder) or fabric (learned from a gateway's registration).
    Kinds {
        /// Print one kind's Thing Model (JSON) instead.
        #[arg(long)]
        model: Option<String>,
    },
    /// Placement of one twin.
    Placement { id: String },
    /// Live-migrate a twin to a node (or to the least loaded node of a tier); it stays
    /// pinned there (rebalancing leaves it alone) until `--unpin` or its node fails.
    Migrate {
        id: String,
        #[arg(long, conflicts_with = "tier")]
        to: Option<String>,
        #[arg(long)]
        tier: Option<String>,
        /// Only unpin the twin (it does not move).
        #[arg(long, conflicts_with_all = ["to", "tier"])]
        unpin: bool,
    },
    /// Move every twin off a node; the node takes no new twins.
    Drain { node: String },
    /// Train an anomaly model on the cloud node's archived features (progress on stderr;
    /// Ctrl-C cancels). Needs a cloud node's endpoint.
    Train {
        /// Twins to train on (or --kind for all twins of a kind).
        twins: Vec<String>,
        #[arg(long, default_value = "")]
        kind: String,
        /// Start of the training range: `-12h`, `now-1d` or nanoseconds since the epoch
        /// (default: a day, every kind's training span).
        #[arg(long, default_value = "-1d", allow_hyphen_values = true)]
        start: String,
        #[arg(long, default_value = "now", allow_hyphen_values = true)]
        end: String,
        /// ensemble (PCA and pca_normal together), pca, pca_normal, robust or
        /// isolation_forest.
        #[arg(long, default_value = "ensemble")]
        algorithm: String,
        /// Registry name (default `{kind}-{algorithm}`).
        #[arg(long, default_value = "")]
        model_id: String,
        /// Features to use, comma-separated (default: every archived feature).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// Alarm threshold quantile of the training scores (default per algorithm).
        #[arg(long)]
        quantile: Option<f64>,
    },
    /// Models in the registry, every version, newest first.
    Models {
        #[arg(long, default_value = "")]
        model_id: String,
        #[arg(long, default_value = "")]
        kind: String,
    },
    /// Install a model version on twins (listed, or every twin of a kind and/or site).
    Deploy {
        model_id: String,
        /// Version (default: the newest).
        #[arg(long, default_value_t = 0)]
        version: u64,
        /// A twin to install on (repeatable).
        #[arg(long = "twin")]
        twins: Vec<String>,
        #[arg(long, default_value = "")]
        kind: String,
        #[arg(long, default_value = "")]
        site: String,
    },
    /// Add a model trained elsewhere to the registry: a twinmesh model file, or an ONNX
    /// model with --onnx, --features and --threshold.
    ImportModel {
        model_id: String,
        file: std::path::PathBuf,
        #[arg(long)]
        kind: String,
        /// The file is an ONNX model taking one row of features, giving one score.
        #[arg(long)]
        onnx: bool,
        /// ONNX: feature names in the model's input column order, comma-separated.
        #[arg(long, value_delimiter = ',', requires = "onnx")]
        features: Vec<String>,
        /// ONNX: scores above this raise an alarm.
        #[arg(long, requires = "onnx")]
        threshold: Option<f64>,
        /// ONNX: name of the score output.
        #[arg(long, default_value = "score")]
        output: String,
        /// ONNX: the model's higher score means more normal.
        #[arg(long, requires = "onnx")]
        negate: bool,
    },
    /// Show a twin's privacy policy, or replace it from a JSON file (proto3 JSON of
    /// PrivacyPolicy; signals left out keep the kind's default).
    Policy {
        id: String,
        #[arg(long, value_name = "FILE")]
        set: Option<std::path::PathBuf>,
        /// Refuse unless the policy is at this version.
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// ε spent and left in a twin's budget period; with --site, in a site's ledger of
    /// set releases (ID is then the site).
    Budget {
        id: String,
        #[arg(long)]
        site: bool,
    },
    /// A differentially private statistic of one twin's signal, or of a set of twins
    /// of one site (repeat the id).
    Release {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        signal: String,
        /// count, sum or mean.
        #[arg(long, default_value = "mean")]
        statistic: String,
        #[arg(long)]
        epsilon: f64,
        #[arg(long, default_value = "-1h", allow_hyphen_values = true)]
        start: String,
        #[arg(long, default_value = "now", allow_hyphen_values = true)]
        end: String,
    },
    /// Show a twin's processing chain (TOML), or replace it from a TOML file.
    Chain {
        id: String,
        /// Replace the chain with the `[[stage]]` tables of this file.
        #[arg(long)]
        set: Option<std::path::PathBuf>,
        /// Refuse unless the twin is at this revision.
        #[arg(long, requires = "set")]
        expected_revision: Option<u64>,
    },
}

/// `10s`, `500ms`, `1m`, `2h`, `250us`, `100ns`, `1h 30m` (humantime's syntax).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    humantime::parse_duration(s).map_err(|e| {
        anyhow::anyhow!(
            "invalid duration {s:?}: {e} (e.g. 10s, 500ms, 2m, 1h; units ns, us, ms, s, m, h, d)"
        )
    })
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `now`, `-10m`, `now-10m` or nanoseconds since the epoch.
pub fn parse_time(s: &str, now: i64) -> anyhow::Result<i64> {
    let s = s.trim();
    if s == "now" {
        return Ok(now);
    }
    if let Some(rel) = s.strip_prefix("now-").or_else(|| s.strip_prefix('-')) {
        if let Ok(d) = parse_duration(rel) {
            return Ok(now - d.as_nanos() as i64);
        }
    }
    s.parse::<i64>().map_err(|_| {
        anyhow::anyhow!("invalid time {s:?}: use now, -10m or nanoseconds since the epoch")
    })
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(s.code()), s.message())
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// A proto enum value's name without its type's prefix, in lower case
/// (`SENSITIVITY_SITE_ONLY` → `site_only`).
fn short_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

/// Map entries in key order (proto maps are hash maps).
fn sorted<V>(map: &std::collections::BTreeMap<String, V>) -> Vec<(&String, &V)> {
    map.iter().collect()
}

fn print_model(m: &proto::ModelInfo) {
    // An ensemble's threshold is 1 (a ratio): its members' own say more.
    let members: Vec<String> = sorted(&m.member_thresholds)
        .into_iter()
        .map(|(a, t)| format!("{a} {t:.4}"))
        .collect();
    let members = if members.is_empty() {
        String::new()
    } else {
        format!(" ({})", members.join(", "))
    };
    println!(
        "{} v{}  {} for {}  threshold {:.4}{members}  {} rows  {} features  {} bytes",
        m.model_id,
        m.version,
        m.algorithm,
        m.kind,
        m.threshold,
        m.trained_rows,
        m.features.len(),
        m.size_bytes
    );
    if !m.twin_ids.is_empty() {
        println!(
            "  trained on {} from {} to {} (training alarm rate {:.4})",
            m.twin_ids.join(", "),
            m.start_ns,
            m.end_ns,
            m.training_alarm_rate
        );
    }
    for w in &m.warnings {
        println!("  warning: {w}");
    }
    for d in &m.deployments {
        println!(
            "  deployed  {:<28} {} at {}",
            d.twin_id, d.status, d.deployed_ns
        );
    }
}

fn print_twin(t: &proto::Twin) {
    let p = t.placement.clone().unwrap_or_default();
    let h = t.health.clone().unwrap_or_default();
    println!("{}  ({})  revision {}", t.twin_id, t.kind, t.revision);
    println!(
        "  placement  node {} tier {} epoch {}{}",
        p.node,
        p.tier,
        p.epoch,
        if p.pinned { " pinned" } else { "" }
    );
    println!(
        "  health     {} (anomaly score {:.3}){}",
        h.status,
        h.anomaly_score,
        if h.model_id.is_empty() {
            String::new()
        } else {
            format!("  model {} v{}", h.model_id, h.model_version)
        }
    );
    if !h.last_alarm.is_empty() {
        println!("  last alarm {}", h.last_alarm);
    }
    println!("  reported");
    for (k, v) in sorted(&t.reported) {
        println!(
            "    {k:<24} {:>14.4}   seq {:<8} t {}",
            v.value, v.seq, v.timestamp_ns
        );
    }
    if !t.withheld.is_empty() {
        println!(
            "  withheld   {} (privacy policy: raw values stay on their site)",
            t.withheld.join(", ")
        );
    }
    if !t.desired.is_empty() {
        println!("  desired");
        for (k, d) in sorted(&t.desired) {
            let status = proto::DeliveryStatus::try_from(d.status)
                .map(|s| short_name(s.as_str_name(), "DELIVERY_STATUS_"))
                .unwrap_or_default();
            println!("    {k:<24} {:>14.4}   {status} {}", d.value, d.reason);
        }
    }
    if !t.derived.is_empty() {
        println!("  derived");
        for (k, v) in sorted(&t.derived) {
            println!("    {k:<32} {v:>14.4}");
        }
    }
}

/// Sends the bearer token, when there is one, with every call.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.0 {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    }
}

type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// What every command uses: the node's four services on one channel, and the output
/// format. One method a command.
struct Ctl {
    twins: TwinServiceClient<Authed>,
    mesh: MeshServiceClient<Authed>,
    models: ModelServiceClient<Authed>,
    privacy: PrivacyServiceClient<Authed>,
    json: bool,
}

/// The reply of a call; a refused call becomes the one-line error the user sees.
async fn reply<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    Ok(call.await.map_err(status_error)?.into_inner())
}

pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let mut ctl = Ctl::connect(&args).await?;
    match args.command {
        CtlCommand::Twins {
            site,
            kind,
            tier,
            node,
            status,
            page_size,
        } => {
            let req = ListTwinsRequest {
                site,
                kind,
                tier,
                node,
                status,
                page_size: page_size.unwrap_or(0),
                page_token: String::new(),
            };
            ctl.list_twins(req, page_size.is_some()).await
        }
        CtlCommand::Twin { id } => ctl.twin(id).await,
        CtlCommand::Td { id } => ctl.td(id).await,
        CtlCommand::History {
            id,
            signal,
            start,
            end,
            bucket,
            agg,
        } => {
            let now = now_ns();
            let req = QueryHistoryRequest {
                twin_id: id,
                signal,
                start_ns: parse_time(&start, now)?,
                end_ns: parse_time(&end, now)?,
                bucket_ns: parse_duration(&bucket)?.as_nanos() as i64,
                aggregation: proto::Aggregation::from(agg) as i32,
            };
            ctl.history(req, agg).await
        }
        CtlCommand::Watch { id, count } => ctl.watch(id, count).await,
        CtlCommand::Desired {
            id,
            property,
            value,
            expected_revision,
        } => {
            let req = SetDesiredRequest {
                twin_id: id,
                property,
                value,
                expected_revision,
            };
            ctl.desired(req).await
        }
        CtlCommand::Nodes => ctl.nodes().await,
        CtlCommand::Kinds { model } => ctl.kinds(model).await,
        CtlCommand::Migrate {
            id,
            to,
            tier,
            unpin,
        } => {
            let req = MigrateTwinRequest {
                twin_id: id,
                target_node: to.unwrap_or_default(),
                target_tier: tier.unwrap_or_default(),
                unpin,
            };
            ctl.migrate(req).await
        }
        CtlCommand::Drain { node } => ctl.drain(node).await,
        CtlCommand::Chain {
            id,
            set: Some(path),
            expected_revision,
        } => {
            let spec = chain_file(&path)?;
            let req = SetChainRequest {
                twin_id: id,
                chain: Some((&spec).into()),
                expected_revision,
            };
            ctl.set_chain(req).await
        }
        CtlCommand::Chain { id, set: None, .. } => ctl.get_chain(id).await,
        CtlCommand::Train {
            twins,
            kind,
            start,
            end,
            algorithm,
            model_id,
            features,
            quantile,
        } => {
            let now = now_ns();
            let req = proto::TrainModelRequest {
                twin_ids: twins,
                kind,
                start_ns: parse_time(&start, now)?,
                end_ns: parse_time(&end, now)?,
                algorithm,
                model_id,
                features,
                quantile: quantile.unwrap_or(0.0),
            };
            ctl.train(req).await
        }
        CtlCommand::Models { model_id, kind } => {
            ctl.list_models(proto::ListModelsRequest { model_id, kind })
                .await
        }
        CtlCommand::Deploy {
            model_id,
            version,
            twins,
            kind,
            site,
        } => {
            let req = proto::DeployModelRequest {
                model_id,
                version,
                twin_ids: twins,
                kind,
                site,
            };
            ctl.deploy(req).await
        }
        CtlCommand::ImportModel {
            model_id,
            file,
            kind,
            onnx,
            features,
            threshold,
            output,
            negate,
        } => {
            if onnx && (features.is_empty() || threshold.is_none()) {
                anyhow::bail!("an ONNX model needs --features and --threshold");
            }
            let model = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let req = proto::ImportModelRequest {
                model_id,
                model,
                kind,
                onnx,
                features,
                threshold: threshold.unwrap_or(0.0),
                output,
                negate,
            };
            ctl.import_model(req).await
        }
        CtlCommand::Policy {
            id,
            set: Some(path),
            expected_version,
        } => {
            let mut policy: proto::PrivacyPolicy = serde_json::from_str(&read_text(&path)?)
                .map_err(|e| anyhow::anyhow!("invalid policy {}: {e}", path.display()))?;
            policy.twin_id = id;
            let req = proto::SetPolicyRequest {
                policy: Some(policy),
                expected_version,
            };
            ctl.set_policy(req).await
        }
        CtlCommand::Policy { id, set: None, .. } => ctl.get_policy(id).await,
        CtlCommand::Budget { id, site } => {
            let req = if site {
                proto::GetBudgetRequest {
                    site: id,
                    ..Default::default()
                }
            } else {
                proto::GetBudgetRequest {
                    twin_id: id,
                    ..Default::default()
                }
            };
            ctl.budget(req).await
        }
        CtlCommand::Release {
            ids,
            signal,
            statistic,
            epsilon,
            start,
            end,
        } => {
            let now = now_ns();
            let statistic = match statistic.as_str() {
                "count" => proto::Statistic::Count,
                "sum" => proto::Statistic::Sum,
                "mean" => proto::Statistic::Mean,
                other => anyhow::bail!("invalid statistic {other:?}: expected count, sum or mean"),
            };
            let req = proto::ReleaseAggregateRequest {
                twin_ids: ids,
                signal,
                start_ns: parse_time(&start, now)?,
                end_ns: parse_time(&end, now)?,
                statistic: statistic as i32,
                epsilon,
            };
            ctl.release(req).await
        }
        CtlCommand::Placement { id } => ctl.placement(id).await,
    }
}

impl Ctl {
    async fn connect(args: &CtlArgs) -> anyhow::Result<Ctl> {
        let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
        let channel = connect_tls(&args.endpoint, timeout, args.ca.as_deref()).await?;
        let bearer = match &args.token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
                    .map_err(|_| anyhow::anyhow!("invalid token: not printable ASCII"))?,
            ),
            None => None,
        };
        let auth = Bearer(bearer);
        Ok(Ctl {
            twins: TwinServiceClient::with_interceptor(channel.clone(), auth.clone()),
            mesh: MeshServiceClient::with_interceptor(channel.clone(), auth.clone()),
            models: ModelServiceClient::with_interceptor(channel.clone(), auth.clone()),
            privacy: PrivacyServiceClient::with_interceptor(channel, auth),
            json: args.json,
        })
    }

    /// `r` as one JSON document with --json, else as `text` prints it.
    fn show<T: serde::Serialize>(&self, r: &T, text: impl FnOnce(&T)) -> anyhow::Result<()> {
        if self.json {
            return print_json(r);
        }
        text(r);
        Ok(())
    }

    /// Every page, or only the first when `one_page` (--page-size).
    async fn list_twins(
        &mut self,
        mut req: ListTwinsRequest,
        one_page: bool,
    ) -> anyhow::Result<()> {
        let mut all = Vec::new();
        loop {
            let resp = reply(self.twins.list_twins(req.clone())).await?;
            if self.json && one_page {
                return print_json(&resp);
            }
            all.extend(resp.twins);
            if resp.next_page_token.is_empty() || one_page {
                break;
            }
            req.page_token = resp.next_page_token;
        }
        let all = proto::ListTwinsResponse {
            twins: all,
            next_page_token: String::new(),
        };
        self.show(&all, |all| {
            println!(
                "{:<24} {:<16} {:<10} {:<6} {:<7} {:>10}",
                "TWIN", "KIND", "NODE", "TIER", "STATUS", "REVISION"
            );
            for t in &all.twins {
                println!(
                    "{:<24} {:<16} {:<10} {:<6} {:<7} {:>10}",
                    t.twin_id, t.kind, t.node, t.tier, t.status, t.revision
                );
            }
            println!("{} twins", all.twins.len());
        })
    }

    async fn twin(&mut self, id: String) -> anyhow::Result<()> {
        let t = reply(self.twins.get_twin(GetTwinRequest { twin_id: id })).await?;
        self.show(&t, print_twin)
    }

    /// The Thing Description is JSON either way: printed pretty.
    async fn td(&mut self, id: String) -> anyhow::Result<()> {
        let req = GetThingDescriptionRequest { twin_id: id };
        let td = reply(self.twins.get_thing_description(req)).await?;
        let doc: serde_json::Value = serde_json::from_str(&td.json)?;
        println!("{}", serde_json::to_string_pretty(&doc)?);
        Ok(())
    }

    async fn history(&mut self, req: QueryHistoryRequest, agg: Aggregation) -> anyhow::Result<()> {
        let resp = reply(self.twins.query_history(req)).await?;
        self.show(&resp, |resp| {
            println!(
                "{:<22} {:>16} {:>10}",
                "BUCKET_START_NS",
                agg.as_str().to_uppercase(),
                "COUNT"
            );
            for b in &resp.buckets {
                println!("{:<22} {:>16.6} {:>10}", b.start_ns, b.value, b.count);
            }
        })
    }

    async fn watch(&mut self, id: String, count: Option<u64>) -> anyhow::Result<()> {
        let mut stream = reply(self.twins.watch_twin(WatchTwinRequest { twin_id: id })).await?;
        let mut seen = 0;
        while let Some(update) = stream.message().await.map_err(status_error)? {
            self.show(&update, print_update)?;
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                break;
            }
        }
        Ok(())
    }

    async fn desired(&mut self, req: SetDesiredRequest) -> anyhow::Result<()> {
        let (id, property, value) = (req.twin_id.clone(), req.property.clone(), req.value);
        let resp = reply(self.twins.set_desired(req)).await?;
        self.show(&resp, |resp| {
            println!(
                "{id}: {property} = {value} commanded at revision {} (pending delivery)",
                resp.revision
            );
        })
    }

    async fn kinds(&mut self, model: Option<String>) -> anyhow::Result<()> {
        let resp = reply(self.mesh.list_kinds(ListKindsRequest {})).await?;
        if let Some(name) = model {
            let k = resp
                .kinds
                .iter()
                .find(|k| k.kind == name)
                .ok_or_else(|| anyhow::anyhow!("unknown asset kind {name:?}"))?;
            print!("{}", k.thing_model);
            return Ok(());
        }
        self.show(&resp, |resp| {
            println!(
                "{:<16} {:<9} {:<28} {:>7} {:>10}  DEFINED BY",
                "KIND", "SOURCE", "TITLE", "SIGNALS", "SET-POINTS"
            );
            for k in &resp.kinds {
                println!(
                    "{:<16} {:<9} {:<28} {:>7} {:>10}  {}",
                    k.kind,
                    k.source,
                    k.title,
                    k.signals.len(),
                    k.setpoints.len(),
                    k.defined_by
                );
            }
        })
    }

    async fn nodes(&mut self) -> anyhow::Result<()> {
        let resp = reply(self.mesh.list_nodes(ListNodesRequest {})).await?;
        self.show(&resp, |resp| {
            println!(
                "{:<12} {:<6} {:<8} {:>6} {:<22} ZENOH",
                "NODE", "TIER", "SITE", "TWINS", "GRPC"
            );
            for n in &resp.nodes {
                println!(
                    "{:<12} {:<6} {:<8} {:>6} {:<22} {}",
                    n.node,
                    n.tier,
                    n.site,
                    n.twins,
                    n.grpc_addr,
                    n.locators.join(",")
                );
            }
        })
    }

    async fn migrate(&mut self, req: MigrateTwinRequest) -> anyhow::Result<()> {
        let id = req.twin_id.clone();
        let unpin = req.unpin;
        let r = reply(self.mesh.migrate_twin(req)).await?;
        self.show(&r, |r| {
            let p = r.placement.clone().unwrap_or_default();
            if unpin {
                println!("{id} unpinned on {} (epoch {})", p.node, p.epoch);
                return;
            }
            println!(
                "{id} moved to {} (epoch {}) in {:.1} ms",
                p.node,
                p.epoch,
                r.duration_ns as f64 / 1e6
            );
        })
    }

    async fn drain(&mut self, node: String) -> anyhow::Result<()> {
        let req = DrainNodeRequest { node: node.clone() };
        let r = reply(self.mesh.drain_node(req)).await?;
        self.show(&r, |r| {
            for p in &r.moved {
                println!("moved  {:<24} -> {} (epoch {})", p.twin_id, p.node, p.epoch);
            }
            for p in &r.stuck {
                println!("stuck  {:<24} {}", p.twin_id, p.reason);
            }
            println!(
                "{node}: {} moved, {} could not move",
                r.moved.len(),
                r.stuck.len()
            );
        })
    }

    async fn set_chain(&mut self, req: SetChainRequest) -> anyhow::Result<()> {
        let chain = reply(self.twins.set_chain(req)).await?.chain;
        self.show_chain(chain.unwrap_or_default())
    }

    async fn get_chain(&mut self, id: String) -> anyhow::Result<()> {
        let chain = reply(self.twins.get_twin(GetTwinRequest { twin_id: id }))
            .await?
            .chain;
        self.show_chain(chain.unwrap_or_default())
    }

    /// A chain as TOML `[[stage]]` tables (what `--set` reads), or as JSON.
    fn show_chain(&self, chain: proto::Chain) -> anyhow::Result<()> {
        if self.json {
            return print_json(&chain);
        }
        let spec = twinmesh_twins::chain::ChainSpec::from(&chain);
        print!("{}", toml::to_string(&spec)?);
        Ok(())
    }

    /// Progress on stderr; with --json every progress message on stdout.
    async fn train(&mut self, req: proto::TrainModelRequest) -> anyhow::Result<()> {
        let mut stream = reply(self.models.train_model(req)).await?;
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:<10} [{bar:30}] {pos}/{len} series, {prefix} windows",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        while let Some(p) = stream.message().await.map_err(|s| {
            bar.abandon();
            status_error(s)
        })? {
            if self.json {
                print_json(&p)?;
            }
            bar.set_message(p.phase.clone());
            bar.set_length(p.total.max(1));
            bar.set_position(p.done);
            bar.set_prefix(p.rows.to_string());
            if let Some(m) = p.model {
                bar.finish_and_clear();
                if !self.json {
                    print_model(&m);
                }
            }
        }
        Ok(())
    }

    async fn list_models(&mut self, req: proto::ListModelsRequest) -> anyhow::Result<()> {
        let list = reply(self.models.list_models(req)).await?;
        self.show(&list, |list| {
            if list.models.is_empty() {
                println!("no models");
            }
            for m in &list.models {
                print_model(m);
            }
        })
    }

    /// Fails when a twin refused or missed the model.
    async fn deploy(&mut self, req: proto::DeployModelRequest) -> anyhow::Result<()> {
        let r = reply(self.models.deploy_model(req)).await?;
        if self.json {
            return print_json(&r);
        }
        let mut failed = 0;
        for d in &r.deployments {
            println!("{:<32} v{:<4} {}", d.twin_id, d.version, d.status);
            failed += usize::from(d.status != "installed");
        }
        if failed > 0 {
            anyhow::bail!(
                "{failed} of {} twins refused or missed the model",
                r.deployments.len()
            );
        }
        Ok(())
    }

    async fn import_model(&mut self, req: proto::ImportModelRequest) -> anyhow::Result<()> {
        let info = reply(self.models.import_model(req)).await?;
        self.show(&info, print_model)
    }

    async fn set_policy(&mut self, req: proto::SetPolicyRequest) -> anyhow::Result<()> {
        let p = reply(self.privacy.set_policy(req)).await?;
        self.show(&p, print_policy)
    }

    async fn get_policy(&mut self, id: String) -> anyhow::Result<()> {
        let p = reply(
            self.privacy
                .get_policy(proto::GetPolicyRequest { twin_id: id }),
        )
        .await?;
        self.show(&p, print_policy)
    }

    async fn budget(&mut self, req: proto::GetBudgetRequest) -> anyhow::Result<()> {
        let b = reply(self.privacy.get_budget(req)).await?;
        self.show(&b, |b| {
            println!(
                "{}  ε spent {:.6} of {} ({:.6} left)  δ spent {:e}  {} releases since {}",
                if b.site.is_empty() {
                    &b.twin_id
                } else {
                    &b.site
                },
                b.epsilon_spent,
                b.epsilon_total,
                (b.epsilon_total - b.epsilon_spent).max(0.0),
                b.delta_spent,
                b.releases,
                b.period_start_ns
            );
        })
    }

    async fn release(&mut self, req: proto::ReleaseAggregateRequest) -> anyhow::Result<()> {
        let r = reply(self.privacy.release_aggregate(req)).await?;
        self.show(&r, |r| {
            println!(
                "{}  ({}, {} records, noise scale {:.4})  ε spent {:.6}, {:.6} left",
                r.value,
                r.mechanism,
                r.records,
                r.noise_scale,
                r.epsilon_spent,
                r.epsilon_remaining
            );
        })
    }

    async fn placement(&mut self, id: String) -> anyhow::Result<()> {
        let p = reply(self.mesh.get_placement(GetPlacementRequest { twin_id: id })).await?;
        self.show(&p, |p| {
            println!(
                "{}  node {}  tier {}  epoch {}  status {}{}{}{}",
                p.twin_id,
                p.node,
                p.tier,
                p.epoch,
                p.status,
                if p.pinned { "  pinned" } else { "" },
                if p.site_only { "  site-only" } else { "" },
                if p.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", p.reason)
                }
            );
        })
    }
}

/// The text of a file named on the command line.
fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// A chain file: the `[[stage]]` tables `ctl chain` prints.
fn chain_file(path: &std::path::Path) -> anyhow::Result<twinmesh_twins::chain::ChainSpec> {
    toml::from_str(&read_text(path)?).map_err(|e| {
        anyhow::anyhow!(
            "invalid chain file {}: {}",
            path.display(),
            e.to_string().trim().replace('\n', " ")
        )
    })
}

fn print_update(update: &proto::WatchTwinResponse) {
    match &update.update {
        Some(watch_twin_response::Update::State(s)) => {
            if let Some(t) = &s.twin {
                let vals: Vec<String> = sorted(&t.reported)
                    .iter()
                    .map(|(k, v)| format!("{k}={:.3}", v.value))
                    .collect();
                println!("state  rev {:<8} {}", t.revision, vals.join(" "));
            }
        }
        Some(watch_twin_response::Update::Features(f)) => {
            println!("features {} {:?}", f.signal, f.features);
        }
        Some(watch_twin_response::Update::Event(e)) => {
            println!("event  {:<18} {}", e.kind, e.message);
        }
        None => {}
    }
}

fn print_policy(p: &proto::PrivacyPolicy) {
    println!(
        "{} policy v{}  ε {} per {} s  noise {}  δ {}  max contributions {}",
        p.twin_id,
        p.version,
        p.epsilon_per_period,
        p.period_ns / 1_000_000_000,
        p.noise,
        p.delta,
        p.max_contributions
    );
    for (name, sp) in sorted(&p.signals) {
        let sens = proto::Sensitivity::try_from(sp.sensitivity)
            .map(|s| short_name(s.as_str_name(), "SENSITIVITY_"))
            .unwrap_or_default();
        println!(
            "  {name:<24} {sens:<10} {:<16} [{}, {}]{}",
            sp.mechanism,
            sp.lower,
            sp.upper,
            if sp.mechanism == "micro_aggregate" {
                format!(" k {}", sp.k)
            } else {
                String::new()
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            parse_duration(" 1h 30m ").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(parse_duration("100ns").unwrap(), Duration::from_nanos(100));
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_time("-500ms", 1_000_000_000).unwrap(), 500_000_000);
        assert_eq!(parse_time("now", 1_000).unwrap(), 1_000);
        assert_eq!(parse_time("-1s", 5_000_000_000).unwrap(), 4_000_000_000);
        assert_eq!(parse_time("now-1s", 5_000_000_000).unwrap(), 4_000_000_000);
        assert_eq!(parse_time("123", 0).unwrap(), 123);
        assert!(parse_time("yesterday", 0).is_err());
    }
}
