//! Anomaly models across tiers (issue 6): the cloud's model registry, training on the
//! archived features, deployment to twins, and `ModelService`.
//!
//! - **Registry** ([`Registry`], in `actors` with its fabric service, so the simulation's
//!   cloud nodes run it too; the [`ModelStore`](twinmesh_actors::ports::ModelStore) of the
//!   cloud node's store, in sled the tree `models`, `{model_id}\0{version BE}` →
//!   `ModelRecord`): info, deployments, the model file. It also answers
//!   `twinmesh/models/{id}/{version}`, which a twin queries when it starts on a node
//!   that does not hold its model yet (after a migration or a failover).
//! - **Training** reads the cloud's archive (the `archive` stage keeps every twin's
//!   feature windows), assembles one vector per window as the edge twin does
//!   ([`FeatureVector`]), and trains on a blocking thread, reporting progress; a caller
//!   that goes away cancels it and nothing is stored.
//! - **Deployment** sends the model to each twin (`InstallModel` over the fabric, wherever
//!   the twin lives); each twin checks it and keeps its previous model if it refuses.
//!
//! Only cloud nodes hold the registry: on other nodes the service answers
//! `FAILED_PRECONDITION` with the address of a cloud node's gRPC endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ndarray::Array2;

use twinmesh_actors::context::NodeContext;
use twinmesh_actors::ports::SeriesStore;
pub use twinmesh_actors::registry::Registry;
use twinmesh_twins::model::{validate_model_id, Algorithm, Model, TrainParams, DEFAULT_ALGORITHM};
use twinmesh_twins::monitor::FeatureVector;
use twinmesh_twins::proto::{
    Deployment, InstallModelRequest, ListTwinsRequest, ModelInfo, ModelRecord, TrainModelProgress,
    TrainModelRequest,
};
use twinmesh_twins::{AssetKind, Tier, TwinId};

use crate::api::{parse_twin_id, Api, MAX_PAGE_SIZE};

/// Most feature vectors one training reads (about 160 MB at 20 features).
pub const MAX_TRAINING_ROWS: usize = 2_000_000;
/// How long one twin may take to install a model.
const INSTALL_DEADLINE: Duration = Duration::from_secs(10);
/// Twins a deployment installs on at once.
const DEPLOY_CONCURRENCY: usize = 8;

/// What a training reads and how it trains.
pub struct TrainJob {
    pub model_id: String,
    pub kind: AssetKind,
    pub twins: Vec<TwinId>,
    pub features: Vec<String>,
    pub start_ns: i64,
    pub end_ns: i64,
    pub params: TrainParams,
}

/// Feature vectors read for a training.
#[derive(Debug)]
pub struct TrainingRows {
    pub rows: Vec<Vec<f64>>,
    /// The longest stretch of operation one twin's vectors cover (first to last), ns.
    pub span_ns: i64,
}

/// Feature vectors of `twins` in the range: one per stored feature window, the other
/// features held at their latest value (as [`twinmesh_twins::monitor::Monitor`] scores).
/// `progress(done, total, rows)` returns false to cancel.
pub fn read_rows(
    store: &dyn SeriesStore,
    twins: &[TwinId],
    features: &[String],
    start_ns: i64,
    end_ns: i64,
    progress: &mut dyn FnMut(u64, u64, u64) -> bool,
) -> crate::Result<TrainingRows> {
    let total = (twins.len() * features.len()) as u64;
    let mut done = 0u64;
    let mut rows: Vec<Vec<f64>> = Vec::new();
    let mut span_ns = 0;
    for twin in twins {
        // Feature windows by end time: (feature index, value) of each.
        let mut windows: BTreeMap<i64, Vec<(usize, f64)>> = BTreeMap::new();
        for (i, f) in features.iter().enumerate() {
            for (t, v) in store
                .read_points(twin, f, start_ns, end_ns)
                .map_err(|e| crate::Error::unavailable(format!("reading the archive: {e}")))?
            {
                windows.entry(t).or_default().push((i, v));
            }
            done += 1;
            if !progress(done, total, rows.len() as u64) {
                return Err(crate::Error::cancelled("training cancelled"));
            }
        }
        let mut vector = FeatureVector::new(features);
        let mut first = None;
        for (&t, w) in &windows {
            if let Some(x) = vector.update_indexed(w) {
                let first = *first.get_or_insert(t);
                span_ns = span_ns.max(t - first);
                rows.push(x);
                if rows.len() > MAX_TRAINING_ROWS {
                    return Err(crate::Error::invalid_argument(format!(
                        "the range holds more than {MAX_TRAINING_ROWS} feature windows; narrow it"
                    )));
                }
            }
        }
    }
    Ok(TrainingRows { rows, span_ns })
}

/// A span for people: seconds, minutes or hours.
fn human_span(ns: i64) -> String {
    let s = ns as f64 / 1e9;
    if s >= 7200.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 120.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

/// Warnings about training on `rows`: data that cover less than the kind's training span.
fn training_warnings(kind: AssetKind, rows: &TrainingRows) -> Vec<String> {
    let want_ns = kind.schema().training_span_s.saturating_mul(1_000_000_000);
    if rows.span_ns >= want_ns {
        return Vec::new();
    }
    vec![format!(
        "the training data cover {} of operation, less than the {} a {kind} model should see \
         (its training span, long enough for its operating regimes): expect alarms on the \
         regimes the training did not see; train on a longer range",
        human_span(rows.span_ns),
        human_span(want_ns)
    )]
}

/// Runs a training job (blocking: call on a blocking thread); the model's record.
pub fn train(
    store: &dyn SeriesStore,
    job: &TrainJob,
    now_ns: i64,
    progress: &mut dyn FnMut(TrainModelProgress) -> bool,
) -> crate::Result<ModelRecord> {
    let read = read_rows(
        store,
        &job.twins,
        &job.features,
        job.start_ns,
        job.end_ns,
        &mut |done, total, rows| {
            progress(TrainModelProgress {
                phase: "reading".into(),
                done,
                total,
                rows,
                model: None,
            })
        },
    )?;
    let warnings = training_warnings(job.kind, &read);
    let rows = read.rows;
    if rows.len() < 10 {
        return Err(crate::Error::failed_precondition(format!(
            "only {} feature windows of {} in the range: training needs at least 10 (is the chain archiving features?)",
            rows.len(),
            job.twins
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if !progress(TrainModelProgress {
        phase: "training".into(),
        done: 0,
        total: 1,
        rows: rows.len() as u64,
        model: None,
    }) {
        return Err(crate::Error::cancelled("training cancelled"));
    }
    let d = job.features.len();
    let x = Array2::from_shape_fn((rows.len(), d), |(i, j)| rows[i][j]);
    let model = Model::train(&job.features, x.view(), &job.params)
        .map_err(|e| crate::Error::invalid_argument(e.to_string()))?;
    let info = ModelInfo {
        model_id: job.model_id.clone(),
        version: 0,
        algorithm: job.params.algorithm.to_string(),
        kind: job.kind.to_string(),
        threshold: model.threshold,
        features: job.features.clone(),
        trained_rows: rows.len() as u64,
        start_ns: job.start_ns,
        end_ns: job.end_ns,
        twin_ids: job.twins.iter().map(|t| t.to_string()).collect(),
        created_ns: now_ns,
        deployments: Vec::new(),
        training_alarm_rate: model.training_alarm_rate,
        size_bytes: 0,
        warnings,
        member_thresholds: member_thresholds(&model),
    };
    Ok(ModelRecord {
        info: Some(info),
        model: model.to_bytes(),
    })
}

/// [`ModelInfo::member_thresholds`] of `model`.
pub(crate) fn member_thresholds(model: &Model) -> std::collections::BTreeMap<String, f64> {
    model
        .member_thresholds()
        .into_iter()
        .map(|(a, t)| (a.to_string(), t))
        .collect()
}

/// What `ModelService` needs beyond the API: the registry answers on cloud nodes.
#[derive(Clone)]
pub struct Models {
    pub api: Api,
    pub ctx: Arc<NodeContext>,
    /// Cloud nodes: the store with the archive, and the registry.
    pub cloud: Option<(Arc<dyn SeriesStore>, Arc<Registry>)>,
}

impl Models {
    pub(crate) async fn cloud(&self) -> crate::Result<(Arc<dyn SeriesStore>, Arc<Registry>)> {
        if let Some(c) = &self.cloud {
            return Ok(c.clone());
        }
        let hint = self
            .api
            .list_nodes()
            .await
            .ok()
            .and_then(|nodes| {
                nodes
                    .into_iter()
                    .find(|n| n.tier == Tier::Cloud.to_string() && !n.grpc_addr.is_empty())
            })
            .map(|n| format!(" (e.g. {} at {})", n.node, n.grpc_addr))
            .unwrap_or_default();
        Err(crate::Error::failed_precondition(format!(
            "the model registry and the feature archive live on cloud nodes: call a cloud node's gRPC endpoint{hint}"
        )))
    }

    /// Every twin the listing filters select, with its kind.
    pub(crate) async fn twins(
        &self,
        kind: &str,
        site: &str,
    ) -> crate::Result<Vec<(TwinId, String)>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .api
                .list_twins(&ListTwinsRequest {
                    site: site.to_owned(),
                    kind: kind.to_owned(),
                    page_size: MAX_PAGE_SIZE,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await?;
            for t in page.twins {
                if let Ok(id) = t.twin_id.parse() {
                    out.push((id, t.kind));
                }
            }
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    pub(crate) async fn job(
        &self,
        req: &TrainModelRequest,
        store: &dyn SeriesStore,
    ) -> crate::Result<TrainJob> {
        let algorithm: Algorithm = match req.algorithm.as_str() {
            "" => DEFAULT_ALGORITHM,
            a => a.parse().map_err(|e: twinmesh_twins::model::ModelError| {
                crate::Error::invalid_argument(e.to_string())
            })?,
        };
        if req.end_ns <= req.start_ns {
            return Err(crate::Error::invalid_argument(format!(
                "empty time range: start_ns {} is not before end_ns {}",
                req.start_ns, req.end_ns
            )));
        }
        let mut params = TrainParams::for_algorithm(algorithm);
        if req.quantile != 0.0 {
            params.quantile = req.quantile;
        }
        let (twins, kind): (Vec<TwinId>, AssetKind) = if req.twin_ids.is_empty() {
            if req.kind.is_empty() {
                return Err(crate::Error::invalid_argument(
                    "name the twins (twin_ids) or a kind to train on",
                ));
            }
            let kind: AssetKind = req.kind.parse().map_err(|e: twinmesh_twins::Error| {
                crate::Error::invalid_argument(e.to_string())
            })?;
            let twins: Vec<TwinId> = self
                .twins(&req.kind, "")
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            if twins.is_empty() {
                return Err(crate::Error::not_found(format!("no twins of kind {kind}")));
            }
            (twins, kind)
        } else {
            let ids = req
                .twin_ids
                .iter()
                .map(|s| parse_twin_id(s))
                .collect::<Result<Vec<_>, _>>()?;
            let known: BTreeMap<TwinId, String> = self.twins("", "").await?.into_iter().collect();
            let mut kinds = Vec::new();
            for id in &ids {
                match known.get(id) {
                    Some(k) => kinds.push(k.clone()),
                    None => return Err(crate::Error::not_found(format!("unknown twin {id}"))),
                }
            }
            kinds.dedup();
            if kinds.len() != 1 {
                return Err(crate::Error::invalid_argument(format!(
                    "one model serves one kind; the twins are of kinds {}",
                    kinds.join(", ")
                )));
            }
            if !req.kind.is_empty() && req.kind != kinds[0] {
                return Err(crate::Error::invalid_argument(format!(
                    "the twins are of kind {}, not {}",
                    kinds[0], req.kind
                )));
            }
            let kind = kinds[0]
                .parse()
                .map_err(|e: twinmesh_twins::Error| crate::Error::internal(e.to_string()))?;
            (ids, kind)
        };
        let features = if req.features.is_empty() {
            // Every archived feature of the kind's signals that all the twins have.
            let mut common: Option<Vec<String>> = None;
            for t in &twins {
                let mine: Vec<String> = store
                    .signals_of(t)
                    .map_err(|e| crate::Error::unavailable(format!("reading the archive: {e}")))?
                    .into_iter()
                    .filter(|f| {
                        f.split_once('.')
                            .is_some_and(|(s, _)| kind.schema().signal(s).is_ok())
                    })
                    .collect();
                common = Some(match common {
                    None => mine,
                    Some(c) => c.into_iter().filter(|f| mine.contains(f)).collect(),
                });
            }
            let f = common.unwrap_or_default();
            if f.is_empty() {
                return Err(crate::Error::failed_precondition(format!(
                    "no archived features for {}: the twins' chains need an `archive` stage",
                    twins
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            f
        } else {
            for f in &req.features {
                let signal = f.split_once('.').map_or(f.as_str(), |(s, _)| s);
                kind.schema().signal(signal).map_err(|_| {
                    crate::Error::invalid_argument(format!(
                        "feature {f:?} is not a feature of a {kind} signal"
                    ))
                })?;
            }
            req.features.clone()
        };
        let model_id = if req.model_id.is_empty() {
            format!("{kind}-{algorithm}")
        } else {
            req.model_id.clone()
        };
        validate_model_id(&model_id).map_err(|e| crate::Error::invalid_argument(e.to_string()))?;
        Ok(TrainJob {
            model_id,
            kind,
            twins,
            features,
            start_ns: req.start_ns,
            end_ns: req.end_ns,
            params,
        })
    }
}

/// Deploys `record` to `twins`, a few at a time; one outcome per twin.
pub(crate) async fn install_all(
    api: &Api,
    record: &ModelRecord,
    twins: Vec<TwinId>,
    now_ns: i64,
) -> Vec<Deployment> {
    let info = record.info.clone().unwrap_or_default();
    futures::stream::iter(twins)
        .map(|id| {
            let req = InstallModelRequest {
                twin_id: id.to_string(),
                model_id: info.model_id.clone(),
                version: info.version,
                model: record.model.clone(),
            };
            async move {
                let caller = api.caller(None);
                let status = match api.call(&id, req, Some(INSTALL_DEADLINE), caller).await {
                    Ok(_) => "installed".to_owned(),
                    Err(e) => format!("{:?}: {e}", e.code()),
                };
                Deployment {
                    twin_id: id.to_string(),
                    deployed_ns: now_ns,
                    status,
                    version: info.version,
                }
            }
        })
        .buffer_unordered(DEPLOY_CONCURRENCY)
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use twinmesh_actors::ports::StoredFrame;
    use twinmesh_sim::mesh::store::MemStore;

    fn point(signal: &str, t: i64, v: f64) -> StoredFrame {
        StoredFrame {
            signal: signal.into(),
            seq: 0,
            start_ns: t,
            sample_period_ns: 1_000_000_000,
            samples: vec![v],
            scale: 0.0,
        }
    }

    /// Windows of two signals at their own pace, as the archive keeps them.
    fn archive(store: &dyn SeriesStore, twin: &TwinId, windows: i64) {
        for i in 0..windows {
            let t = 1_000_000_000 * (i + 1);
            let mut frames = vec![
                point("voltage.rms", t, 230.0 + (i % 7) as f64),
                point("voltage.thd", t, 0.02 + (i % 5) as f64 * 0.001),
            ];
            if i % 10 == 0 {
                frames.push(point("current.rms", t, 10.0 + (i % 3) as f64));
            }
            store.append_frames(twin, &frames).unwrap();
        }
    }

    #[test]
    fn rows_follow_the_windows_and_training_can_be_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        let twin: TwinId = "site-a/pm-01".parse().unwrap();
        archive(&store, &twin, 100);
        let mut names = store.signals_of(&twin).unwrap();
        names.sort();
        assert_eq!(names, ["current.rms", "voltage.rms", "voltage.thd"]);
        let mut calls = 0;
        let read = read_rows(
            &store,
            std::slice::from_ref(&twin),
            &names,
            0,
            i64::MAX,
            &mut |d, t, _| {
                calls += 1;
                assert!(d <= t);
                true
            },
        )
        .unwrap();
        // Vectors start at the first window with every feature (window 0), one per window.
        assert_eq!((read.rows.len(), calls), (100, 3));
        assert_eq!(read.rows[1], vec![10.0, 231.0, 0.021]);
        assert_eq!(read.span_ns, 99_000_000_000);
        // In range only.
        let some = read_rows(
            &store,
            std::slice::from_ref(&twin),
            &names,
            0,
            50_000_000_001,
            &mut |_, _, _| true,
        )
        .unwrap();
        assert_eq!((some.rows.len(), some.span_ns), (50, 49_000_000_000));
        let e = read_rows(
            &store,
            std::slice::from_ref(&twin),
            &names,
            0,
            i64::MAX,
            &mut |d, _, _| d < 2,
        )
        .unwrap_err();
        assert_eq!(e.code(), crate::error::ErrorCode::Cancelled);

        let job = TrainJob {
            model_id: "pm".into(),
            kind: AssetKind::PowerMeter,
            twins: vec![twin],
            features: names,
            start_ns: 0,
            end_ns: i64::MAX,
            params: TrainParams::for_algorithm(Algorithm::Robust),
        };
        let mut phases = Vec::new();
        let record = train(&store, &job, 7, &mut |p| {
            phases.push(p.phase);
            true
        })
        .unwrap();
        assert_eq!(phases.last().map(String::as_str), Some("training"));
        let info = record.info.clone().unwrap();
        assert_eq!((info.trained_rows, info.created_ns), (100, 7));
        // 99 s of a power meter: far less than the day its model should see.
        assert_eq!(info.warnings.len(), 1, "{:?}", info.warnings);
        assert!(
            info.warnings[0].contains("cover 99 s of operation, less than the 24.0 h"),
            "{}",
            info.warnings[0]
        );
        assert!(
            info.training_alarm_rate <= 0.01,
            "{}",
            info.training_alarm_rate
        );
        let model = Model::from_bytes(&record.model).unwrap();
        assert_eq!(model.threshold, info.threshold);
        let e = train(&store, &job, 7, &mut |p| p.phase != "training").unwrap_err();
        assert_eq!(e.code(), crate::error::ErrorCode::Cancelled);
    }

    #[test]
    fn a_training_over_the_kind_s_span_has_no_warning() {
        let rows = |span_ns| TrainingRows {
            rows: Vec::new(),
            span_ns,
        };
        let day_ns = 86_400 * 1_000_000_000;
        assert!(training_warnings(AssetKind::PowerMeter, &rows(day_ns)).is_empty());
        let w = training_warnings(AssetKind::PowerMeter, &rows(day_ns / 2));
        assert!(w[0].contains("cover 12.0 h of operation"), "{w:?}");
        // A wind turbine needs half a day, a spindle 6 hours.
        assert!(training_warnings(AssetKind::WindTurbine, &rows(day_ns / 2)).is_empty());
        let w = training_warnings(AssetKind::Spindle, &rows(3_600_000_000_000));
        assert!(
            w[0].contains("cover 60 min of operation, less than the 6.0 h"),
            "{w:?}"
        );
    }

    #[test]
    fn the_registry_numbers_versions_and_keeps_the_latest_deployment_per_twin() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(Arc::new(SledStore::open(dir.path(), 8).unwrap()));
        let record = |id: &str, kind: &str, created: i64| ModelRecord {
            info: Some(ModelInfo {
                model_id: id.into(),
                kind: kind.into(),
                created_ns: created,
                ..Default::default()
            }),
            model: vec![1, 2, 3],
        };
        assert_eq!(reg.add(record("a", "spindle", 1)).unwrap().version, 1);
        assert_eq!(reg.add(record("a", "spindle", 2)).unwrap().version, 2);
        assert_eq!(reg.add(record("b", "hpc_node", 3)).unwrap().version, 1);
        assert_eq!(reg.get("a", 0).unwrap().unwrap().info.unwrap().version, 2);
        assert_eq!(
            reg.get("a", 1).unwrap().unwrap().info.unwrap().created_ns,
            1
        );
        assert!(reg.get("a", 3).unwrap().is_none());
        let all: Vec<(String, u64)> = reg
            .list("", "")
            .unwrap()
            .into_iter()
            .map(|i| (i.model_id, i.version))
            .collect();
        assert_eq!(all, [("b".into(), 1), ("a".into(), 2), ("a".into(), 1)]);
        assert_eq!(reg.list("", "spindle").unwrap().len(), 2);
        let dep = |twin: &str, status: &str| Deployment {
            twin_id: twin.into(),
            status: status.into(),
            version: 2,
            deployed_ns: 0,
        };
        reg.record_deployments("a", 2, &[dep("s/x", "failed"), dep("s/y", "installed")])
            .unwrap();
        reg.record_deployments("a", 2, &[dep("s/x", "installed")])
            .unwrap();
        let info = reg.get("a", 2).unwrap().unwrap().info.unwrap();
        let deps: Vec<(&str, &str)> = info
            .deployments
            .iter()
            .map(|d| (d.twin_id.as_str(), d.status.as_str()))
            .collect();
        assert_eq!(deps, [("s/x", "installed"), ("s/y", "installed")]);
        assert_eq!(
            reg.record_deployments("zzz", 1, &[]).unwrap_err().code(),
            crate::error::ErrorCode::NotFound
        );
    }

    /// The registry and the archive run on any store of the port: the simulation's too.
    #[test]
    fn the_registry_and_the_archive_run_on_the_simulation_s_store() {
        let store = Arc::new(MemStore::default());
        let twin: TwinId = "site-a/pm-01".parse().unwrap();
        archive(&*store, &twin, 30);
        assert_eq!(
            store.signals_of(&twin).unwrap(),
            ["current.rms", "voltage.rms", "voltage.thd"]
        );
        let read = read_rows(
            &*store,
            std::slice::from_ref(&twin),
            &["voltage.rms".into(), "current.rms".into()],
            0,
            i64::MAX,
            &mut |_, _, _| true,
        )
        .unwrap();
        assert_eq!((read.rows.len(), read.span_ns), (30, 29_000_000_000));
        assert_eq!(read.rows[1], vec![231.0, 10.0]);
        let reg = Registry::new(store.clone());
        let record = ModelRecord {
            info: Some(ModelInfo {
                model_id: "pm".into(),
                ..Default::default()
            }),
            model: vec![7; 5],
        };
        assert_eq!(reg.add(record.clone()).unwrap().version, 1);
        let info = reg.add(record).unwrap();
        assert_eq!((info.version, info.size_bytes), (2, 5));
        // `add` is durable on return: a crash keeps both versions.
        store.crash();
        assert_eq!(reg.get("pm", 0).unwrap().unwrap().info.unwrap().version, 2);
        assert_eq!(reg.list("pm", "").unwrap().len(), 2);
        assert!(reg.get("pm", 3).unwrap().is_none());
    }
}
