//! An in-memory [`Store`] with the crash semantics of a real one: writes are lost by a
//! crash unless a `flush` covered them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use twinmesh_actors::ports::{Store, StoredFrame};
use twinmesh_actors::Result;
use twinmesh_twins::proto::{Bucket, Budget, ModelRecord, Placement, TelemetryFrame, TwinSnapshot};
use twinmesh_twins::stats::{Accumulator, Aggregation};
use twinmesh_twins::TwinId;

#[derive(Debug, Clone, Default)]
struct Data {
    history: BTreeMap<(TwinId, String, i64, u64), StoredFrame>,
    snapshots: BTreeMap<TwinId, TwinSnapshot>,
    models: BTreeMap<TwinId, ModelRecord>,
    hosted: BTreeMap<TwinId, Placement>,
    placements: BTreeMap<String, Placement>,
    site_budgets: BTreeMap<String, Budget>,
    replicas: BTreeMap<TwinId, TwinSnapshot>,
    seqs: BTreeMap<(TwinId, String), u64>,
    spool: BTreeMap<(TwinId, String, u64), TelemetryFrame>,
}

#[derive(Debug, Default)]
pub struct MemStore {
    current: Mutex<Data>,
    durable: Mutex<Data>,
    /// Flushes wait while a test holds it for writing (a slow disk).
    flush_gate: Arc<tokio::sync::RwLock<()>>,
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

fn rank(s: &TwinSnapshot) -> (u64, u64) {
    (s.epoch, s.twin.as_ref().map_or(0, |t| t.revision))
}

#[async_trait]
impl Store for MemStore {
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

    fn read_samples(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
        limit: usize,
    ) -> Result<Vec<f64>> {
        let mut out = Vec::new();
        self.with(|d| {
            for ((t, s, _, _), f) in &d.history {
                if t != twin || s != signal {
                    continue;
                }
                for (i, x) in f.samples.iter().enumerate() {
                    let ts = f.start_ns + i as i64 * f.sample_period_ns;
                    if ts >= start_ns && ts < end_ns && out.len() < limit {
                        out.push(*x);
                    }
                }
            }
        });
        Ok(out)
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
        let mut buckets: BTreeMap<i64, Accumulator> = BTreeMap::new();
        self.with(|d| {
            for ((t, s, _, _), f) in &d.history {
                if t != twin || s != signal {
                    continue;
                }
                for (i, x) in f.samples.iter().enumerate() {
                    let ts = f.start_ns + i as i64 * f.sample_period_ns;
                    if ts >= start_ns && ts < end_ns {
                        buckets
                            .entry((ts - start_ns) / bucket_ns)
                            .or_default()
                            .push(*x);
                    }
                }
            }
        });
        Ok(buckets
            .into_iter()
            .map(|(b, acc)| Bucket {
                start_ns: start_ns + b * bucket_ns,
                value: acc.value(agg),
                count: acc.count,
            })
            .collect())
    }

    fn frame_seqs(&self, twin: &TwinId, signal: &str) -> Result<Vec<u64>> {
        Ok(self.with(|d| {
            d.history
                .keys()
                .filter(|(t, s, _, _)| t == twin && s == signal)
                .map(|(_, _, _, seq)| *seq)
                .collect()
        }))
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

    fn save_replica(&self, snapshot: &TwinSnapshot) -> Result<bool> {
        let Some(id) = snapshot
            .twin
            .as_ref()
            .and_then(|t| t.twin_id.parse::<TwinId>().ok())
        else {
            return Ok(false);
        };
        Ok(self.with(|d| {
            let newer = d
                .replicas
                .get(&id)
                .is_none_or(|old| rank(snapshot) > rank(old));
            if newer {
                d.replicas.insert(id, snapshot.clone());
            }
            newer
        }))
    }

    fn load_replica(&self, twin: &TwinId) -> Result<Option<TwinSnapshot>> {
        Ok(self.with(|d| d.replicas.get(twin).cloned()))
    }

    fn save_snapshot(&self, snapshot: &TwinSnapshot) -> Result<()> {
        if let Some(id) = snapshot
            .twin
            .as_ref()
            .and_then(|t| t.twin_id.parse::<TwinId>().ok())
        {
            self.with(|d| d.snapshots.insert(id, snapshot.clone()));
        }
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

    fn save_hosted(&self, placement: &Placement) -> Result<()> {
        if let Ok(id) = placement.twin_id.parse::<TwinId>() {
            self.with(|d| d.hosted.insert(id, placement.clone()));
        }
        Ok(())
    }

    fn remove_hosted(&self, twin: &TwinId) -> Result<()> {
        self.with(|d| d.hosted.remove(twin));
        Ok(())
    }

    fn hosted(&self) -> Result<Vec<Placement>> {
        Ok(self.with(|d| d.hosted.values().cloned().collect()))
    }

    fn save_placement(&self, placement: &Placement) -> Result<()> {
        self.with(|d| {
            d.placements
                .insert(placement.twin_id.clone(), placement.clone())
        });
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

    fn spool_len(&self) -> u64 {
        self.with(|d| d.spool.len() as u64)
    }

    async fn flush(&self) -> Result<()> {
        let _open = self.flush_gate.read().await;
        let current = self.current.lock().expect("store").clone();
        *self.durable.lock().expect("store") = current;
        Ok(())
    }
}
