//! An in-memory [`Store`](twinmesh_actors::ports::Store) — every store trait of the
//! port — with the crash semantics of a real one: writes are lost by a crash unless a
//! `flush` covered them (the model registry's `put_model`, durable on return, excepted).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use twinmesh_actors::ports::{
    Durable, ModelStore, PlacementStore, SeriesStore, SnapshotStore, SpoolStore, StoredFrame,
};
use twinmesh_actors::Result;
use twinmesh_twins::proto::{
    Bucket, Budget, KindModel, ModelRecord, Placement, TelemetryFrame, TwinSnapshot,
};
use twinmesh_twins::snapshot;
use twinmesh_twins::stats::{sample_time, Aggregation, HistoryBuckets};
use twinmesh_twins::TwinId;

#[derive(Debug, Clone, Default)]
struct Data {
    history: BTreeMap<(TwinId, String, i64, u64), StoredFrame>,
    snapshots: BTreeMap<TwinId, TwinSnapshot>,
    models: BTreeMap<TwinId, ModelRecord>,
    hosted: BTreeMap<TwinId, Placement>,
    placements: BTreeMap<String, Placement>,
    site_budgets: BTreeMap<String, Budget>,
    kinds: BTreeMap<String, KindModel>,
    replicas: BTreeMap<TwinId, TwinSnapshot>,
    seqs: BTreeMap<(TwinId, String), u64>,
    spool: BTreeMap<(TwinId, String, u64), TelemetryFrame>,
    /// The model registry, by (model id, version).
    registry: BTreeMap<(String, u64), ModelRecord>,
}

impl Data {
    /// The frames of one series, in time order.
    fn series<'a>(
        &'a self,
        twin: &TwinId,
        signal: &str,
    ) -> impl Iterator<Item = &'a StoredFrame> + 'a {
        let (lo, hi) = (
            (twin.clone(), signal.to_owned(), i64::MIN, 0),
            (twin.clone(), signal.to_owned(), i64::MAX, u64::MAX),
        );
        self.history.range(lo..=hi).map(|(_, f)| f)
    }
}

#[derive(Debug, Default)]
pub struct MemStore {
    current: Mutex<Data>,
    durable: Mutex<Data>,
    /// Flushes wait while a test holds it for writing (a slow disk).
    flush_gate: Arc<tokio::sync::RwLock<()>>,
    /// Placement writes still to fail (a failing disk, injected by a test).
    failing_placement_saves: std::sync::atomic::AtomicU32,
}

impl MemStore {
    /// A crash: everything not flushed is gone.
    pub fn crash(&self) {
        let durable = self.durable.lock().expect("store").clone();
        *self.current.lock().expect("store") = durable;
    }

    /// Holds every flush until the guard is dropped (a disk that stalls): what a flush
    /// would make durable stays volatile meanwhile.
    pub async fn hold_flushes(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.flush_gate.clone().write_owned().await
    }

    /// Makes the next `n` placement writes fail (a store error, as a full or failing disk
    /// would give).
    pub fn fail_placement_saves(&self, n: u32) {
        self.failing_placement_saves
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Placement writes still to fail.
    pub fn placement_saves_to_fail(&self) -> u32 {
        self.failing_placement_saves
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a frame of `signal` with `seq` would survive a crash now.
    pub fn is_durable(&self, twin: &TwinId, signal: &str, seq: u64) -> bool {
        self.durable
            .lock()
            .expect("store")
            .history
            .keys()
            .any(|(t, s, _, q)| t == twin && s == signal && *q == seq)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Data) -> T) -> T {
        f(&mut self.current.lock().expect("store"))
    }
}

#[async_trait]
impl Durable for MemStore {
    async fn flush(&self) -> Result<()> {
        let _open = self.flush_gate.read().await;
        let current = self.current.lock().expect("store").clone();
        *self.durable.lock().expect("store") = current;
        Ok(())
    }
}

/// The samples of `f` with their times, those in `[start_ns, end_ns)`.
fn points_in(f: &StoredFrame, start_ns: i64, end_ns: i64) -> impl Iterator<Item = (i64, f64)> + '_ {
    f.samples
        .iter()
        .enumerate()
        .map(|(i, x)| (sample_time(f.start_ns, f.sample_period_ns, i), *x))
        .filter(move |(t, _)| *t >= start_ns && *t < end_ns)
}

impl SeriesStore for MemStore {
    fn append_frames(&self, twin: &TwinId, frames: &[StoredFrame]) -> Result<()> {
        self.with(|d| {
            for f in frames {
                d.history.insert(
                    (twin.clone(), f.signal.clone(), f.start_ns, f.seq),
                    f.clone(),
                );
            }
        });
        Ok(())
    }

    fn query_history(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
        bucket_ns: i64,
        agg: Aggregation,
    ) -> Result<Vec<Bucket>> {
        let mut buckets = HistoryBuckets::new(start_ns, end_ns, bucket_ns);
        self.with(|d| {
            for f in d.series(twin, signal) {
                buckets.push_frame(f.start_ns, f.sample_period_ns, &f.samples);
            }
        });
        Ok(buckets.finish(agg))
    }

    fn read_samples(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
        limit: usize,
    ) -> Result<Vec<f64>> {
        Ok(self.with(|d| {
            d.series(twin, signal)
                .flat_map(|f| points_in(f, start_ns, end_ns))
                .map(|(_, x)| x)
                .take(limit)
                .collect()
        }))
    }

    fn read_points(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<(i64, f64)>> {
        Ok(self.with(|d| {
            d.series(twin, signal)
                .filter(|f| f.start_ns >= start_ns && f.start_ns < end_ns)
                .flat_map(|f| points_in(f, start_ns, end_ns))
                .collect()
        }))
    }

    fn signals_of(&self, twin: &TwinId) -> Result<Vec<String>> {
        Ok(self.with(|d| {
            let names: std::collections::BTreeSet<&String> = d
                .history
                .keys()
                .filter(|(t, _, _, _)| t == twin)
                .map(|(_, s, _, _)| s)
                .collect();
            names.into_iter().cloned().collect()
        }))
    }

    fn frame_seqs(&self, twin: &TwinId, signal: &str) -> Result<Vec<u64>> {
        Ok(self.with(|d| d.series(twin, signal).map(|f| f.seq).collect()))
    }

    fn last_stored_seq(&self, twin: &TwinId, signal: &str) -> Result<u64> {
        Ok(self
            .frame_seqs(twin, signal)?
            .into_iter()
            .max()
            .unwrap_or(0))
    }

    fn first_missing_seq(
        &self,
        twin: &TwinId,
        signal: &str,
        from: u64,
        upto: u64,
    ) -> Result<Option<u64>> {
        let present: std::collections::BTreeSet<u64> =
            self.frame_seqs(twin, signal)?.into_iter().collect();
        Ok((from..=upto).find(|s| !present.contains(s)))
    }
}

impl SnapshotStore for MemStore {
    fn save_snapshot(&self, snapshot: &TwinSnapshot) -> Result<()> {
        let id = snapshot::twin_of(snapshot)?;
        self.with(|d| d.snapshots.insert(id, snapshot.clone()));
        Ok(())
    }

    fn load_snapshot(&self, twin: &TwinId) -> Result<Option<TwinSnapshot>> {
        Ok(self.with(|d| d.snapshots.get(twin).cloned()))
    }

    fn save_twin_model(&self, twin: &TwinId, record: &ModelRecord) -> Result<()> {
        self.with(|d| d.models.insert(twin.clone(), record.clone()));
        Ok(())
    }

    fn load_twin_model(&self, twin: &TwinId) -> Result<Option<ModelRecord>> {
        Ok(self.with(|d| d.models.get(twin).cloned()))
    }

    fn save_replica(&self, snapshot: &TwinSnapshot) -> Result<bool> {
        let id = snapshot::twin_of(snapshot)?;
        Ok(self.with(|d| {
            let newer = snapshot::supersedes(snapshot, d.replicas.get(&id));
            if newer {
                d.replicas.insert(id, snapshot.clone());
            }
            newer
        }))
    }

    fn load_replica(&self, twin: &TwinId) -> Result<Option<TwinSnapshot>> {
        Ok(self.with(|d| d.replicas.get(twin).cloned()))
    }
}

impl PlacementStore for MemStore {
    fn save_placement(&self, placement: &Placement) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let failing = &self.failing_placement_saves;
        if failing
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(twinmesh_actors::Error::store(format!(
                "injected failure writing the placement of {}",
                placement.twin_id
            )));
        }
        let id: TwinId = placement.twin_id.parse()?;
        self.with(|d| d.placements.insert(id.to_string(), placement.clone()));
        Ok(())
    }

    fn placements(&self) -> Result<Vec<Placement>> {
        Ok(self.with(|d| d.placements.values().cloned().collect()))
    }

    fn save_site_budget(&self, budget: &Budget) -> Result<()> {
        self.with(|d| d.site_budgets.insert(budget.site.clone(), budget.clone()));
        Ok(())
    }

    fn site_budgets(&self) -> Result<Vec<Budget>> {
        Ok(self.with(|d| d.site_budgets.values().cloned().collect()))
    }

    fn save_hosted(&self, placement: &Placement) -> Result<()> {
        let id: TwinId = placement.twin_id.parse()?;
        self.with(|d| d.hosted.insert(id, placement.clone()));
        Ok(())
    }

    fn remove_hosted(&self, twin: &TwinId) -> Result<()> {
        self.with(|d| d.hosted.remove(twin));
        Ok(())
    }

    fn hosted(&self) -> Result<Vec<Placement>> {
        Ok(self.with(|d| d.hosted.values().cloned().collect()))
    }

    fn save_kind(&self, model: &KindModel) -> Result<()> {
        self.with(|d| d.kinds.insert(model.kind.clone(), model.clone()));
        Ok(())
    }

    fn kinds(&self) -> Result<Vec<KindModel>> {
        Ok(self.with(|d| d.kinds.values().cloned().collect()))
    }
}

impl SpoolStore for MemStore {
    fn reserve_seqs(&self, twin: &TwinId, signal: &str, count: u64) -> Result<u64> {
        Ok(self.with(|d| {
            let next = d.seqs.entry((twin.clone(), signal.to_owned())).or_insert(1);
            let first = *next;
            *next += count;
            first
        }))
    }

    fn release_seqs(&self, twin: &TwinId, signal: &str, next: u64) -> Result<()> {
        self.with(|d| d.seqs.insert((twin.clone(), signal.to_owned()), next));
        Ok(())
    }

    fn spool_put(&self, frame: &TelemetryFrame) -> Result<()> {
        let twin: TwinId = frame.twin_id.parse()?;
        self.with(|d| {
            d.spool
                .insert((twin, frame.signal.clone(), frame.seq), frame.clone())
        });
        Ok(())
    }

    fn spool_truncate(&self, twin: &TwinId, signal: &str, upto: u64) -> Result<u64> {
        Ok(self.with(|d| {
            let before = d.spool.len();
            d.spool
                .retain(|(t, s, seq), _| !(t == twin && s == signal && *seq <= upto));
            (before - d.spool.len()) as u64
        }))
    }

    fn spool_read(
        &self,
        twin: &TwinId,
        signal: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<TelemetryFrame>> {
        Ok(self.with(|d| {
            d.spool
                .range(
                    (twin.clone(), signal.to_owned(), from)
                        ..=(twin.clone(), signal.to_owned(), u64::MAX),
                )
                .take(max)
                .map(|(_, f)| f.clone())
                .collect()
        }))
    }

    fn spool_first(&self, twin: &TwinId, signal: &str) -> Result<Option<u64>> {
        Ok(self.with(|d| {
            d.spool
                .range(
                    (twin.clone(), signal.to_owned(), 0)
                        ..=(twin.clone(), signal.to_owned(), u64::MAX),
                )
                .next()
                .map(|((_, _, seq), _)| *seq)
        }))
    }

    fn spool_last(&self, twin: &TwinId, signal: &str) -> Result<Option<u64>> {
        Ok(self.with(|d| {
            d.spool
                .range(
                    (twin.clone(), signal.to_owned(), 0)
                        ..=(twin.clone(), signal.to_owned(), u64::MAX),
                )
                .next_back()
                .map(|((_, _, seq), _)| *seq)
        }))
    }

    fn spool_len(&self) -> u64 {
        self.with(|d| d.spool.len() as u64)
    }
}

impl ModelStore for MemStore {
    fn put_model(&self, model_id: &str, version: u64, record: &ModelRecord) -> Result<()> {
        // Durable on return: into the durable copy as well.
        let key = (model_id.to_owned(), version);
        self.with(|d| d.registry.insert(key.clone(), record.clone()));
        self.durable
            .lock()
            .expect("store")
            .registry
            .insert(key, record.clone());
        Ok(())
    }

    fn get_model(&self, model_id: &str, version: u64) -> Result<Option<ModelRecord>> {
        Ok(self.with(|d| d.registry.get(&(model_id.to_owned(), version)).cloned()))
    }

    fn newest_model_version(&self, model_id: &str) -> Result<u64> {
        Ok(self.with(|d| {
            d.registry
                .range((model_id.to_owned(), 0)..=(model_id.to_owned(), u64::MAX))
                .next_back()
                .map_or(0, |((_, v), _)| *v)
        }))
    }

    fn models(&self) -> Result<Vec<ModelRecord>> {
        Ok(self.with(|d| d.registry.values().cloned().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(signal: &str, seq: u64, start_ns: i64, samples: Vec<f64>) -> StoredFrame {
        StoredFrame {
            signal: signal.into(),
            seq,
            start_ns,
            sample_period_ns: 10,
            samples,
            scale: 0.0,
        }
    }

    /// The assertions of the sled store's own test, on this one: the two bucket alike.
    #[test]
    fn history_buckets_match_the_sled_store() {
        let s = MemStore::default();
        let id: TwinId = "s/a".parse().unwrap();
        s.append_frames(
            &id,
            &[
                frame("v", 1, 0, vec![1.0, 2.0, 3.0, 4.0]),
                frame("v", 2, 40, vec![5.0, 6.0, 7.0, 8.0]),
            ],
        )
        .unwrap();
        s.append_frames(&id, &[frame("v", 2, 40, vec![5.0, 6.0, 7.0, 8.0])])
            .unwrap();
        assert_eq!(s.frame_seqs(&id, "v").unwrap(), vec![1, 2]);
        let b = s
            .query_history(&id, "v", 20, 70, 20, Aggregation::Mean)
            .unwrap();
        let got: Vec<(i64, f64, u64)> = b.iter().map(|b| (b.start_ns, b.value, b.count)).collect();
        assert_eq!(got, [(20, 3.5, 2), (40, 5.5, 2), (60, 7.0, 1)]);
        assert_eq!(
            s.read_samples(&id, "v", 20, 70, 3).unwrap(),
            [3.0, 4.0, 5.0]
        );
        assert!(s.read_samples(&id, "v", 20, 70, 0).unwrap().is_empty());
        s.append_frames(&id, &[frame("v", 3, -40, vec![-1.0])])
            .unwrap();
        assert_eq!(s.frame_seqs(&id, "v").unwrap(), vec![3, 1, 2]);
        s.append_frames(&id, &[frame("w.rms", 0, 5, vec![9.0])])
            .unwrap();
        assert_eq!(s.signals_of(&id).unwrap(), ["v", "w.rms"]);
        assert_eq!(s.read_points(&id, "w.rms", 0, 10).unwrap(), [(5, 9.0)]);
    }

    #[test]
    fn replicas_rank_and_invalid_ids_are_refused() {
        let s = MemStore::default();
        let snap = |id: &str, epoch, revision| TwinSnapshot {
            twin: Some(twinmesh_twins::proto::Twin {
                twin_id: id.into(),
                revision,
                ..Default::default()
            }),
            epoch,
            ..Default::default()
        };
        assert!(s.save_replica(&snap("s/a", 2, 10)).unwrap());
        assert!(!s.save_replica(&snap("s/a", 1, 99)).unwrap());
        assert!(!s.save_replica(&snap("s/a", 2, 10)).unwrap());
        assert!(s.save_replica(&snap("s/a", 3, 0)).unwrap());
        assert!(s.save_replica(&snap("S/a", 9, 9)).is_err());
        assert!(s.save_snapshot(&snap("", 1, 1)).is_err());
        let p = Placement {
            twin_id: "nope".into(),
            ..Default::default()
        };
        assert!(s.save_hosted(&p).is_err() && s.save_placement(&p).is_err());
        assert!(s.hosted().unwrap().is_empty() && s.placements().unwrap().is_empty());
        let id: TwinId = "s/a".parse().unwrap();
        assert_eq!(s.load_replica(&id).unwrap().unwrap().epoch, 3);
    }
}
