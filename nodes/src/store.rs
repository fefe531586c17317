//! The real [`Store`](twinmesh_actors::ports::Store): one sled database per node
//! (DESIGN §8), implementing each store trait of the port. Nothing else in `nodes` touches
//! sled.
//!
//! Trees and keys (`\0` separates id parts; ids never contain it):
//! - `ts`: `{twin}\0{signal}\0{start_ns: i64 order-preserving BE}{seq: u64 BE}` → frame
//!   (`sample_period_ns: i64 LE`, then `f64 LE` samples). Re-storing a frame overwrites
//!   the same key, so history is idempotent.
//! - `snap`: `{twin}` → `TwinSnapshot`; `hosted`: `{twin}` → `Placement`;
//!   `placement`: `{twin}` → `Placement` (authority's table); `site_budget`: `{site}` →
//!   `Budget` (the authority's ε ledger of each site's set releases); `kinds`: `{kind}` →
//!   `KindModel` (Thing Models of kinds learned over the fabric).
//! - `spool`: `{twin}\0{signal}\0{seq BE}` → `TelemetryFrame`; `seq`: `{twin}\0{signal}` →
//!   next unreserved seq (BE).
//! - `replica`: `{twin}` → `TwinSnapshot` (the authority's newest replicated snapshot).
//! - `twin_model`: `{twin}` → `ModelRecord` of the model installed on a hosted twin.
//! - `models`: `{model_id}\0{version BE}` → `ModelRecord` (the cloud's model registry).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use async_trait::async_trait;
use prost::Message;

use twinmesh_actors::ports::{
    Durable, ModelStore, PlacementStore, SeriesStore, SnapshotStore, SpoolStore, StoredFrame,
};
use twinmesh_actors::seal::KeyRing;
use twinmesh_actors::{Error, Result};
use twinmesh_twins::dsp::codec;
use twinmesh_twins::proto::{
    Bucket, Budget, KindModel, ModelRecord, Placement, TelemetryFrame, TwinSnapshot,
};
use twinmesh_twins::snapshot;
use twinmesh_twins::stats::{sample_time, Aggregation, HistoryBuckets};
use twinmesh_twins::TwinId;

/// Test failpoint, read when the store opens: `SKIP:FAIL` lets `SKIP` placement writes
/// through, then fails the next `FAIL` (the authority's supervision is tested with it).
pub const FAILPOINT_PLACEMENT_SAVES: &str = "TWINMESH_FAILPOINT_PLACEMENT_SAVES";

/// Test failpoint, read when the store opens: `SKIP:MS` lets `SKIP` placement writes
/// through, then delays the flush that follows the next one by `MS` (a migration whose
/// commit becomes durable after its deadline).
pub const FAILPOINT_PLACEMENT_FLUSH_DELAY: &str = "TWINMESH_FAILPOINT_PLACEMENT_FLUSH_DELAY";

fn failpoint(name: &str) -> (u64, u64) {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            let (skip, fail) = v.split_once(':')?;
            Some((skip.parse().ok()?, fail.parse().ok()?))
        })
        .unwrap_or((0, 0))
}

pub struct SledStore {
    db: sled::Db,
    ts: sled::Tree,
    snap: sled::Tree,
    hosted: sled::Tree,
    placement: sled::Tree,
    site_budget: sled::Tree,
    kinds: sled::Tree,
    spool: sled::Tree,
    seq: sled::Tree,
    replica: sled::Tree,
    twin_model: sled::Tree,
    /// Placement writes to let through, then to fail ([`FAILPOINT_PLACEMENT_SAVES`]).
    placement_failpoint: std::sync::Mutex<(u64, u64)>,
    /// Placement writes to let through, then the delay of the next flush
    /// ([`FAILPOINT_PLACEMENT_FLUSH_DELAY`]); the delay armed for the next flush.
    flush_failpoint: std::sync::Mutex<(u64, u64, Option<std::time::Duration>)>,
    models: sled::Tree,
    spool_len: AtomicU64,
    /// Group commit: writes counted once done; `durable` is the count the last flush covered.
    writes: AtomicU64,
    durable: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    /// Encryption at rest: values of these trees are AES-256-GCM sealed, bound to their
    /// tree and key.
    at_rest: Option<AtRest>,
}

/// Which trees are sealed at rest, and with which keys.
#[derive(Clone)]
pub struct AtRest {
    pub keys: Arc<KeyRing>,
    pub trees: Vec<String>,
}

/// Trees that hold raw or personal values: history, snapshots, replicas, the spool.
pub const SENSITIVE_TREES: [&str; 4] = ["ts", "snap", "replica", "spool"];

fn series_prefix(twin: &TwinId, signal: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(twin.to_string().as_bytes());
    k.push(0);
    k.extend_from_slice(signal.as_bytes());
    k.push(0);
    k
}

/// i64 → big-endian bytes that sort like the numbers (sign bit flipped).
fn ord_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn from_ord_i64(b: &[u8]) -> i64 {
    (u64::from_be_bytes(b.try_into().expect("8 bytes")) ^ (1 << 63)) as i64
}

fn ts_key(prefix: &[u8], start_ns: i64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 16);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&ord_i64(start_ns));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `sample_period_ns: i64 LE` + the samples in the lossless frame codec (packed when
/// they sit on the frame's resolution grid, raw f64 otherwise).
fn encode_samples(frame: &StoredFrame) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + frame.samples.len() * 2);
    v.extend_from_slice(&frame.sample_period_ns.to_le_bytes());
    codec::encode(&frame.samples, frame.scale, &mut v);
    v
}

/// (start_ns, period, samples) of a stored frame.
struct FrameView {
    start_ns: i64,
    period: i64,
    samples: Vec<f64>,
}

impl FrameView {
    /// Key fields only (no decoding of the samples).
    fn key(prefix_len: usize, key: &[u8]) -> Result<(i64, u64)> {
        if key.len() != prefix_len + 16 {
            return Err(Error::store("corrupt time-series key"));
        }
        Ok((
            from_ord_i64(&key[prefix_len..prefix_len + 8]),
            u64::from_be_bytes(key[prefix_len + 8..].try_into().expect("8 bytes")),
        ))
    }

    fn parse(prefix_len: usize, key: &[u8], value: &[u8]) -> Result<Self> {
        let (start_ns, _seq) = Self::key(prefix_len, key)?;
        if value.len() < 9 {
            return Err(Error::store("corrupt time-series entry"));
        }
        let mut samples = Vec::new();
        codec::decode(&value[8..], &mut samples)
            .map_err(|e| Error::store(format!("corrupt time-series entry: {e}")))?;
        Ok(FrameView {
            start_ns,
            period: i64::from_le_bytes(value[..8].try_into().expect("8 bytes")),
            samples,
        })
    }

    fn end_ns(&self) -> i64 {
        self.start_ns
            .saturating_add((self.samples.len() as i64).saturating_mul(self.period))
    }

    fn samples(&self) -> impl Iterator<Item = (i64, f64)> + '_ {
        self.samples
            .iter()
            .enumerate()
            .map(|(i, &x)| (sample_time(self.start_ns, self.period, i), x))
    }
}

/// Associated data of a value sealed at rest: its tree and key (a value moved to
/// another key does not open).
fn rest_context(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(tree.len() + 1 + key.len());
    c.extend_from_slice(tree.as_bytes());
    c.push(0);
    c.extend_from_slice(key);
    c
}

fn spool_prefix(twin: &TwinId, signal: &str) -> Vec<u8> {
    series_prefix(twin, signal)
}

fn spool_key(twin: &TwinId, signal: &str, seq: u64) -> Vec<u8> {
    let mut k = spool_prefix(twin, signal);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_key(twin: &TwinId, signal: &str) -> Vec<u8> {
    let mut k = series_prefix(twin, signal);
    k.pop();
    k
}

/// `{model_id}\0{version BE}`: a model's versions sort together, oldest first.
fn model_key(model_id: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(model_id.len() + 9);
    k.extend_from_slice(model_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|source| Error::Decode { what, source })
}

/// Every record of `tree` (plain, never sealed), decoded as `what`.
fn decode_all<M: Message + Default>(tree: &sled::Tree, what: &'static str) -> Result<Vec<M>> {
    tree.iter()
        .map(|e| decode(what, &e.map_err(Error::store)?.1))
        .collect()
}

impl SledStore {
    pub fn open(dir: &Path, cache_mb: u64) -> crate::Result<Self> {
        Self::open_with(dir, cache_mb, None)
    }

    /// Opens the database, sealing the values of `at_rest.trees` with its keys.
    pub fn open_with(dir: &Path, cache_mb: u64, at_rest: Option<AtRest>) -> crate::Result<Self> {
        if let Some(a) = &at_rest {
            for t in &a.trees {
                if !SENSITIVE_TREES.contains(&t.as_str()) {
                    return Err(crate::Error::config(format!(
                        "unknown tree {t:?} to encrypt: expected some of {}",
                        SENSITIVE_TREES.join(", ")
                    )));
                }
            }
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::Error::file("create data directory", dir, e))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| Error::store(format!("cannot open database in {}: {e}", dir.display())))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| Error::store(format!("cannot open tree {name}: {e}")))
        };
        let spool = tree("spool")?;
        let spool_len = spool.len() as u64;
        Ok(SledStore {
            ts: tree("ts")?,
            snap: tree("snap")?,
            hosted: tree("hosted")?,
            placement: tree("placement")?,
            site_budget: tree("site_budget")?,
            kinds: tree("kinds")?,
            seq: tree("seq")?,
            replica: tree("replica")?,
            twin_model: tree("twin_model")?,
            models: tree("models")?,
            placement_failpoint: std::sync::Mutex::new(failpoint(FAILPOINT_PLACEMENT_SAVES)),
            flush_failpoint: {
                let (skip, ms) = failpoint(FAILPOINT_PLACEMENT_FLUSH_DELAY);
                std::sync::Mutex::new((skip, ms, None))
            },
            spool,
            spool_len: AtomicU64::new(spool_len),
            db,
            writes: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            at_rest,
        })
    }

    fn sealed_tree(&self, tree: &str) -> Option<&KeyRing> {
        self.at_rest
            .as_ref()
            .filter(|a| a.trees.iter().any(|t| t == tree))
            .map(|a| &*a.keys)
    }

    /// What is written for `plain` under `key` of `tree`.
    fn seal(&self, tree: &str, key: &[u8], plain: Vec<u8>) -> Vec<u8> {
        match self.sealed_tree(tree) {
            Some(ring) => ring.seal(&rest_context(tree, key), &plain),
            None => plain,
        }
    }

    /// The plaintext of a stored value; a tampered or unsealed value in a sealed tree is
    /// an error, never data.
    fn open_value<'a>(
        &self,
        tree: &str,
        key: &[u8],
        stored: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        match self.sealed_tree(tree) {
            None => Ok(std::borrow::Cow::Borrowed(stored)),
            Some(ring) => ring
                .open(&rest_context(tree, key), stored)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| {
                    Error::store(format!(
                        "encrypted tree {tree}: value of {} cannot be read: {e}",
                        String::from_utf8_lossy(key).replace('\0', "/")
                    ))
                }),
        }
    }

    fn view(&self, prefix_len: usize, key: &[u8], value: &[u8]) -> Result<FrameView> {
        FrameView::parse(prefix_len, key, &self.open_value("ts", key, value)?)
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, SeqCst);
    }

    /// The record under `key` of `tree` (named `name`, sealed at rest when it is
    /// configured so), opened and decoded as `what`.
    fn load_sealed<M: Message + Default>(
        &self,
        tree: &sled::Tree,
        name: &str,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<M>> {
        tree.get(key)
            .map_err(Error::store)?
            .map(|v| decode(what, &self.open_value(name, key, &v)?))
            .transpose()
    }

    /// Writes the plain (never sealed) record `value` under `key` of `tree`.
    fn put(&self, tree: &sled::Tree, key: &[u8], value: Vec<u8>) -> Result<()> {
        tree.insert(key, value).map_err(Error::store)?;
        self.wrote();
        Ok(())
    }

    /// Calls `f(t, x)` for every stored sample of `signal` in `[start_ns, end_ns)`, in
    /// time order, until it returns false.
    fn visit_range(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
        mut f: impl FnMut(i64, f64) -> bool,
    ) -> Result<()> {
        let prefix = series_prefix(twin, signal);
        let mut visit = |view: &FrameView| -> bool {
            if view.end_ns() <= start_ns || view.start_ns >= end_ns {
                return true;
            }
            for (t, x) in view.samples() {
                if t >= start_ns && t < end_ns && !f(t, x) {
                    return false;
                }
            }
            true
        };
        // The frame that starts before the range may reach into it.
        if let Some(entry) = self
            .ts
            .range(prefix.clone()..ts_key(&prefix, start_ns, 0))
            .next_back()
        {
            let (k, v) = entry.map_err(Error::store)?;
            if k.starts_with(&prefix) && !visit(&self.view(prefix.len(), &k, &v)?) {
                return Ok(());
            }
        }
        for entry in self
            .ts
            .range(ts_key(&prefix, start_ns, 0)..ts_key(&prefix, end_ns, 0))
        {
            let (k, v) = entry.map_err(Error::store)?;
            if !visit(&self.view(prefix.len(), &k, &v)?) {
                break;
            }
        }
        Ok(())
    }

    /// Flushes synchronously (shutdown path).
    pub fn flush_blocking(&self) -> Result<()> {
        self.db.flush().map_err(Error::store)?;
        Ok(())
    }
}

#[async_trait]
impl Durable for SledStore {
    async fn flush(&self) -> Result<()> {
        let delay = self
            .flush_failpoint
            .lock()
            .expect("failpoint lock")
            .2
            .take();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let target = self.writes.load(SeqCst);
        if self.durable.load(SeqCst) >= target {
            return Ok(());
        }
        let _guard = self.flush_lock.lock().await;
        if self.durable.load(SeqCst) >= target {
            return Ok(());
        }
        // Everything counted now is complete and covered by this flush.
        let covered = self.writes.load(SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(Error::store)?
            .map_err(Error::store)?;
        self.durable.fetch_max(covered, SeqCst);
        Ok(())
    }
}

impl SeriesStore for SledStore {
    fn append_frames(&self, twin: &TwinId, frames: &[StoredFrame]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for f in frames {
            let prefix = series_prefix(twin, &f.signal);
            let key = ts_key(&prefix, f.start_ns, f.seq);
            let value = self.seal("ts", &key, encode_samples(f));
            batch.insert(key, value);
        }
        self.ts.apply_batch(batch).map_err(Error::store)?;
        self.wrote();
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
        self.visit_range(twin, signal, start_ns, end_ns, |t, x| {
            buckets.push(t, x);
            true
        })?;
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
        let mut out = Vec::new();
        self.visit_range(twin, signal, start_ns, end_ns, |_, x| {
            if out.len() < limit {
                out.push(x);
            }
            out.len() < limit
        })?;
        Ok(out)
    }

    fn read_points(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<(i64, f64)>> {
        let prefix = series_prefix(twin, signal);
        let mut out = Vec::new();
        for entry in self
            .ts
            .range(ts_key(&prefix, start_ns, 0)..ts_key(&prefix, end_ns, 0))
        {
            let (k, v) = entry.map_err(Error::store)?;
            let view = self.view(prefix.len(), &k, &v)?;
            out.extend(
                view.samples()
                    .filter(|(t, _)| *t >= start_ns && *t < end_ns),
            );
        }
        Ok(out)
    }

    // One seek per name, not a scan.
    fn signals_of(&self, twin: &TwinId) -> Result<Vec<String>> {
        let mut base = twin.to_string().into_bytes();
        base.push(0);
        let mut out = Vec::new();
        let mut from = base.clone();
        while let Some(entry) = self.ts.range(from.clone()..).next() {
            let (k, _) = entry.map_err(Error::store)?;
            if !k.starts_with(&base) {
                break;
            }
            let rest = &k[base.len()..];
            let Some(end) = rest.iter().position(|b| *b == 0) else {
                break;
            };
            out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            // Skip to the first key after this signal: `{twin}\0{signal}\x01`.
            from = base.clone();
            from.extend_from_slice(&rest[..end]);
            from.push(1);
        }
        Ok(out)
    }

    fn frame_seqs(&self, twin: &TwinId, signal: &str) -> Result<Vec<u64>> {
        let prefix = series_prefix(twin, signal);
        self.ts
            .scan_prefix(&prefix)
            .map(|e| {
                let (k, _) = e.map_err(Error::store)?;
                Ok(FrameView::key(prefix.len(), &k)?.1)
            })
            .collect()
    }

    fn last_stored_seq(&self, twin: &TwinId, signal: &str) -> Result<u64> {
        let prefix = series_prefix(twin, signal);
        for e in self.ts.scan_prefix(&prefix).rev() {
            let (k, _) = e.map_err(Error::store)?;
            let (_, seq) = FrameView::key(prefix.len(), &k)?;
            if seq > 0 {
                return Ok(seq);
            }
        }
        Ok(0)
    }

    fn first_missing_seq(
        &self,
        twin: &TwinId,
        signal: &str,
        from: u64,
        upto: u64,
    ) -> Result<Option<u64>> {
        if from > upto {
            return Ok(None);
        }
        // Newest first: seqs grow with time, so stop below `from`.
        let prefix = series_prefix(twin, signal);
        let mut present = std::collections::BTreeSet::new();
        for e in self.ts.scan_prefix(&prefix).rev() {
            let (k, _) = e.map_err(Error::store)?;
            let (_, seq) = FrameView::key(prefix.len(), &k)?;
            if seq == 0 {
                continue;
            }
            if seq < from {
                break;
            }
            if seq <= upto {
                present.insert(seq);
            }
        }
        Ok((from..=upto).find(|s| !present.contains(s)))
    }
}

impl SnapshotStore for SledStore {
    fn save_snapshot(&self, snapshot: &TwinSnapshot) -> Result<()> {
        let id = snapshot::twin_of(snapshot)?.to_string();
        let value = self.seal("snap", id.as_bytes(), snapshot.encode_to_vec());
        self.snap
            .insert(id.as_bytes(), value)
            .map_err(Error::store)?;
        self.wrote();
        Ok(())
    }

    fn load_snapshot(&self, twin: &TwinId) -> Result<Option<TwinSnapshot>> {
        let key = twin.to_string();
        self.load_sealed(&self.snap, "snap", key.as_bytes(), "twin snapshot")
    }

    fn save_twin_model(&self, twin: &TwinId, record: &ModelRecord) -> Result<()> {
        let key = twin.to_string();
        self.put(&self.twin_model, key.as_bytes(), record.encode_to_vec())
    }

    fn load_twin_model(&self, twin: &TwinId) -> Result<Option<ModelRecord>> {
        self.twin_model
            .get(twin.to_string().as_bytes())
            .map_err(Error::store)?
            .map(|v| decode("model record", &v))
            .transpose()
    }

    fn save_replica(&self, snapshot: &TwinSnapshot) -> Result<bool> {
        let id = snapshot::twin_of(snapshot)?.to_string();
        let mut kept = false;
        let new = self.seal("replica", id.as_bytes(), snapshot.encode_to_vec());
        self.replica
            .fetch_and_update(id.as_bytes(), |old| {
                let old_snap = old.map(|o| {
                    self.open_value("replica", id.as_bytes(), o)
                        .ok()
                        .and_then(|p| TwinSnapshot::decode(&*p).ok())
                });
                // An unreadable replica is replaced.
                let newer = snapshot::supersedes(snapshot, old_snap.flatten().as_ref());
                kept = newer;
                if newer {
                    Some(new.clone())
                } else {
                    old.map(|o| o.to_vec())
                }
            })
            .map_err(Error::store)?;
        if kept {
            self.wrote();
        }
        Ok(kept)
    }

    fn load_replica(&self, twin: &TwinId) -> Result<Option<TwinSnapshot>> {
        let key = twin.to_string();
        self.load_sealed(
            &self.replica,
            "replica",
            key.as_bytes(),
            "replicated snapshot",
        )
    }
}

impl PlacementStore for SledStore {
    fn save_placement(&self, placement: &Placement) -> Result<()> {
        let failing = {
            let mut fp = self.placement_failpoint.lock().expect("failpoint lock");
            match *fp {
                (0, 0) => false,
                (0, fail) => {
                    fp.1 = fail - 1;
                    true
                }
                (skip, _) => {
                    fp.0 = skip - 1;
                    false
                }
            }
        };
        {
            let mut fp = self.flush_failpoint.lock().expect("failpoint lock");
            match *fp {
                (_, 0, _) => {}
                (0, ms, _) => *fp = (0, 0, Some(std::time::Duration::from_millis(ms))),
                (skip, ms, armed) => *fp = (skip - 1, ms, armed),
            }
        }
        if failing {
            return Err(Error::store(format!(
                "placement write failed ({FAILPOINT_PLACEMENT_SAVES})"
            )));
        }
        let id: TwinId = placement.twin_id.parse()?;
        let key = id.to_string();
        self.put(&self.placement, key.as_bytes(), placement.encode_to_vec())
    }

    fn placements(&self) -> Result<Vec<Placement>> {
        decode_all(&self.placement, "placement")
    }

    fn save_site_budget(&self, budget: &Budget) -> Result<()> {
        self.put(
            &self.site_budget,
            budget.site.as_bytes(),
            budget.encode_to_vec(),
        )
    }

    fn site_budgets(&self) -> Result<Vec<Budget>> {
        decode_all(&self.site_budget, "site budget")
    }

    fn save_hosted(&self, placement: &Placement) -> Result<()> {
        let id: TwinId = placement.twin_id.parse()?;
        let key = id.to_string();
        self.put(&self.hosted, key.as_bytes(), placement.encode_to_vec())
    }

    fn remove_hosted(&self, twin: &TwinId) -> Result<()> {
        self.hosted
            .remove(twin.to_string().as_bytes())
            .map_err(Error::store)?;
        self.wrote();
        Ok(())
    }

    fn hosted(&self) -> Result<Vec<Placement>> {
        decode_all(&self.hosted, "placement")
    }

    fn save_kind(&self, model: &KindModel) -> Result<()> {
        self.put(&self.kinds, model.kind.as_bytes(), model.encode_to_vec())
    }

    fn kinds(&self) -> Result<Vec<KindModel>> {
        decode_all(&self.kinds, "kind")
    }
}

impl SpoolStore for SledStore {
    fn reserve_seqs(&self, twin: &TwinId, signal: &str, count: u64) -> Result<u64> {
        let key = seq_key(twin, signal);
        let mut first = 1;
        self.seq
            .fetch_and_update(&key, |old| {
                first = old.map_or(1, |b| {
                    u64::from_be_bytes(b.try_into().unwrap_or([0; 8])).max(1)
                });
                Some((first + count).to_be_bytes().to_vec())
            })
            .map_err(Error::store)?;
        self.wrote();
        Ok(first)
    }

    fn release_seqs(&self, twin: &TwinId, signal: &str, next: u64) -> Result<()> {
        self.seq
            .insert(seq_key(twin, signal), &next.to_be_bytes())
            .map_err(Error::store)?;
        self.wrote();
        Ok(())
    }

    fn spool_put(&self, frame: &TelemetryFrame) -> Result<()> {
        let twin: TwinId = frame.twin_id.parse()?;
        let key = spool_key(&twin, &frame.signal, frame.seq);
        let value = self.seal("spool", &key, frame.encode_to_vec());
        let old = self.spool.insert(key, value).map_err(Error::store)?;
        if old.is_none() {
            self.spool_len.fetch_add(1, SeqCst);
        }
        self.wrote();
        Ok(())
    }

    fn spool_truncate(&self, twin: &TwinId, signal: &str, upto: u64) -> Result<u64> {
        let prefix = spool_prefix(twin, signal);
        let end = spool_key(twin, signal, upto.saturating_add(1));
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for e in self.spool.range(prefix..end) {
            let (k, _) = e.map_err(Error::store)?;
            batch.remove(k);
            n += 1;
        }
        if n > 0 {
            self.spool.apply_batch(batch).map_err(Error::store)?;
            self.spool_len.fetch_sub(n, SeqCst);
            self.wrote();
        }
        Ok(n)
    }

    fn spool_read(
        &self,
        twin: &TwinId,
        signal: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<TelemetryFrame>> {
        let prefix = spool_prefix(twin, signal);
        let mut end = prefix.clone();
        end.extend_from_slice(&[0xff; 9]);
        self.spool
            .range(spool_key(twin, signal, from)..end)
            .take(max)
            .map(|e| {
                let (k, v) = e.map_err(Error::store)?;
                decode("spooled frame", &self.open_value("spool", &k, &v)?)
            })
            .collect()
    }

    fn spool_first(&self, twin: &TwinId, signal: &str) -> Result<Option<u64>> {
        let prefix = spool_prefix(twin, signal);
        match self.spool.scan_prefix(&prefix).next() {
            Some(e) => {
                let (k, _) = e.map_err(Error::store)?;
                Ok(Some(u64::from_be_bytes(
                    k[prefix.len()..].try_into().map_err(Error::store)?,
                )))
            }
            None => Ok(None),
        }
    }

    fn spool_last(&self, twin: &TwinId, signal: &str) -> Result<Option<u64>> {
        let prefix = spool_prefix(twin, signal);
        match self.spool.scan_prefix(&prefix).next_back() {
            Some(e) => {
                let (k, _) = e.map_err(Error::store)?;
                Ok(Some(u64::from_be_bytes(
                    k[prefix.len()..].try_into().map_err(Error::store)?,
                )))
            }
            None => Ok(None),
        }
    }

    fn spool_len(&self) -> u64 {
        self.spool_len.load(SeqCst)
    }
}

impl ModelStore for SledStore {
    fn put_model(&self, model_id: &str, version: u64, record: &ModelRecord) -> Result<()> {
        self.models
            .insert(model_key(model_id, version), record.encode_to_vec())
            .map_err(Error::store)?;
        self.models.flush().map_err(Error::store)?;
        Ok(())
    }

    fn get_model(&self, model_id: &str, version: u64) -> Result<Option<ModelRecord>> {
        self.models
            .get(model_key(model_id, version))
            .map_err(Error::store)?
            .map(|v| decode("model record", &v))
            .transpose()
    }

    fn newest_model_version(&self, model_id: &str) -> Result<u64> {
        let mut prefix = model_id.as_bytes().to_vec();
        prefix.push(0);
        match self.models.scan_prefix(&prefix).next_back() {
            Some(e) => {
                let (k, _) = e.map_err(Error::store)?;
                Ok(u64::from_be_bytes(
                    k[prefix.len()..].try_into().map_err(Error::store)?,
                ))
            }
            None => Ok(0),
        }
    }

    fn models(&self) -> Result<Vec<ModelRecord>> {
        decode_all(&self.models, "model record")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 8).unwrap();
        (dir, s)
    }

    fn frame(seq: u64, start_ns: i64, samples: Vec<f64>) -> StoredFrame {
        StoredFrame {
            signal: "v".into(),
            seq,
            start_ns,
            sample_period_ns: 10,
            samples,
            scale: 1.0,
        }
    }

    fn ring(lines: &str) -> Arc<KeyRing> {
        Arc::new(KeyRing::parse(lines).unwrap())
    }

    /// Opens `dir` sealed with `keys`.
    fn encrypted(dir: &Path, keys: &Arc<KeyRing>) -> SledStore {
        reopened(dir, || {
            Some(AtRest {
                keys: keys.clone(),
                trees: SENSITIVE_TREES.iter().map(|s| s.to_string()).collect(),
            })
        })
    }

    /// Opens `dir` (sealed when `at_rest` gives keys). A store just dropped may still
    /// hold sled's file lock for a moment (its flusher thread): wait until it is
    /// released.
    fn reopened(dir: &Path, at_rest: impl Fn() -> Option<AtRest>) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open_with(dir, 8, at_rest()) {
                Ok(s) => return s,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Every value byte of `tree`.
    fn raw_values(tree: &sled::Tree) -> Vec<u8> {
        tree.iter().flat_map(|e| e.unwrap().1.to_vec()).collect()
    }

    #[test]
    fn sensitive_trees_are_encrypted_at_rest_with_rotating_keys() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = KeyRing::generate_line("k1").unwrap();
        let k2 = KeyRing::generate_line("k2").unwrap();
        let id: TwinId = "s/a".parse().unwrap();
        let sentinel = 437.0615234375f64;
        {
            let s = encrypted(dir.path(), &ring(&k1));
            s.append_frames(&id, &[frame(1, 0, vec![sentinel; 4])])
                .unwrap();
            let mut twin = twinmesh_twins::proto::Twin {
                twin_id: id.to_string(),
                ..Default::default()
            };
            twin.reported.insert(
                "v".into(),
                twinmesh_twins::proto::SignalValue {
                    value: sentinel,
                    timestamp_ns: 1,
                    seq: 1,
                },
            );
            s.save_snapshot(&TwinSnapshot {
                twin: Some(twin),
                epoch: 1,
                ..Default::default()
            })
            .unwrap();
            s.spool_put(&TelemetryFrame {
                twin_id: id.to_string(),
                signal: "v".into(),
                seq: 1,
                samples: vec![sentinel],
                ..Default::default()
            })
            .unwrap();
            for tree in [&s.ts, &s.snap, &s.spool] {
                let raw = raw_values(tree);
                assert!(!raw.is_empty());
                assert!(
                    !raw.windows(8).any(|w| w == sentinel.to_le_bytes()),
                    "plaintext at rest"
                );
            }
            s.flush_blocking().unwrap();
        }
        // Rotated: old values open with k1, new ones are sealed with k2.
        let s = encrypted(dir.path(), &ring(&format!("{k1}{k2}")));
        let b = s
            .query_history(&id, "v", 0, 100, 100, Aggregation::Max)
            .unwrap();
        assert_eq!(b[0].value, sentinel);
        assert_eq!(
            s.load_snapshot(&id)
                .unwrap()
                .unwrap()
                .twin
                .unwrap()
                .reported["v"]
                .value,
            sentinel
        );
        assert_eq!(
            s.spool_read(&id, "v", 1, 10).unwrap()[0].samples,
            vec![sentinel]
        );
        s.append_frames(&id, &[frame(2, 40, vec![1.0; 4])]).unwrap();
        let new_key = ts_key(&series_prefix(&id, "v"), 40, 2);
        let stored = s.ts.get(&new_key).unwrap().unwrap();
        assert_eq!(twinmesh_actors::seal::sealed_key_id(&stored), Some("k2"));
        // A flipped byte is an error, never data.
        let old_key = ts_key(&series_prefix(&id, "v"), 0, 1);
        let mut bad = s.ts.get(&old_key).unwrap().unwrap().to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0x20;
        s.ts.insert(&old_key, bad).unwrap();
        let e = s
            .query_history(&id, "v", 0, 100, 100, Aggregation::Max)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("encrypted tree ts") && e.contains("failed authentication"),
            "{e}"
        );
        let snap_key = id.to_string();
        let mut bad = s.snap.get(snap_key.as_bytes()).unwrap().unwrap().to_vec();
        bad[10] ^= 1;
        s.snap.insert(snap_key.as_bytes(), bad).unwrap();
        assert!(s.load_snapshot(&id).is_err());
        // Without the key, or with another one, nothing reads as data.
        drop(s);
        let other = encrypted(dir.path(), &ring(&KeyRing::generate_line("k1").unwrap()));
        assert!(other.spool_read(&id, "v", 1, 10).is_err());
        assert!(SledStore::open_with(
            dir.path(),
            8,
            Some(AtRest {
                keys: ring(&k1),
                trees: vec!["models".into()]
            })
        )
        .is_err());
    }

    #[test]
    fn history_buckets_are_exact_and_idempotent() {
        let (_d, s) = store();
        let id: TwinId = "s/a".parse().unwrap();
        // Frames of 4 samples, 10 ns apart: t = 0..80.
        s.append_frames(
            &id,
            &[
                frame(1, 0, vec![1.0, 2.0, 3.0, 4.0]),
                frame(2, 40, vec![5.0, 6.0, 7.0, 8.0]),
            ],
        )
        .unwrap();
        // The same frame again changes nothing.
        s.append_frames(&id, &[frame(2, 40, vec![5.0, 6.0, 7.0, 8.0])])
            .unwrap();
        assert_eq!(s.frame_seqs(&id, "v").unwrap(), vec![1, 2]);
        // Range [20, 70) in buckets of 20: {3,4}, {5,6}, {7}.
        let b = s
            .query_history(&id, "v", 20, 70, 20, Aggregation::Mean)
            .unwrap();
        assert_eq!(
            b,
            vec![
                Bucket {
                    start_ns: 20,
                    value: 3.5,
                    count: 2
                },
                Bucket {
                    start_ns: 40,
                    value: 5.5,
                    count: 2
                },
                Bucket {
                    start_ns: 60,
                    value: 7.0,
                    count: 1
                },
            ]
        );
        let b = s
            .query_history(&id, "v", 0, 80, 80, Aggregation::Max)
            .unwrap();
        assert_eq!(
            b,
            vec![Bucket {
                start_ns: 0,
                value: 8.0,
                count: 8
            }]
        );
        let b = s
            .query_history(&id, "v", -100, 0, 10, Aggregation::Count)
            .unwrap();
        assert!(b.is_empty());
        // Negative timestamps sort before positive ones.
        s.append_frames(&id, &[frame(3, -40, vec![-1.0])]).unwrap();
        assert_eq!(s.frame_seqs(&id, "v").unwrap(), vec![3, 1, 2]);
    }

    #[test]
    fn spool_numbering_and_truncation() {
        let (_d, s) = store();
        let id: TwinId = "s/a".parse().unwrap();
        assert_eq!(s.reserve_seqs(&id, "v", 10).unwrap(), 1);
        assert_eq!(s.reserve_seqs(&id, "v", 10).unwrap(), 11);
        s.release_seqs(&id, "v", 13).unwrap();
        assert_eq!(s.reserve_seqs(&id, "v", 10).unwrap(), 13);
        for seq in 1..=5 {
            s.spool_put(&TelemetryFrame {
                sealed: Vec::new(),
                twin_id: "s/a".into(),
                signal: "v".into(),
                seq,
                ..Default::default()
            })
            .unwrap();
        }
        assert_eq!(s.spool_len(), 5);
        assert_eq!(s.spool_first(&id, "v").unwrap(), Some(1));
        assert_eq!(s.spool_last(&id, "v").unwrap(), Some(5));
        assert_eq!(s.spool_truncate(&id, "v", 3).unwrap(), 3);
        assert_eq!(s.spool_len(), 2);
        let rest: Vec<u64> = s
            .spool_read(&id, "v", 0, 10)
            .unwrap()
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!(rest, vec![4, 5]);
        assert_eq!(s.spool_read(&id, "v", 5, 10).unwrap().len(), 1);
        assert_eq!(s.spool_first(&"s/b".parse().unwrap(), "v").unwrap(), None);
        assert_eq!(s.spool_last(&"s/b".parse().unwrap(), "v").unwrap(), None);
    }

    #[test]
    fn replicas_keep_the_newest_by_epoch_then_revision() {
        let (_d, s) = store();
        let snap = |epoch, revision| TwinSnapshot {
            twin: Some(twinmesh_twins::proto::Twin {
                twin_id: "s/a".into(),
                revision,
                ..Default::default()
            }),
            epoch,
            ..Default::default()
        };
        assert!(s.save_replica(&snap(2, 10)).unwrap());
        assert!(
            !s.save_replica(&snap(1, 99)).unwrap(),
            "older epoch is fenced"
        );
        assert!(!s.save_replica(&snap(2, 9)).unwrap());
        assert!(s.save_replica(&snap(2, 11)).unwrap());
        assert!(s.save_replica(&snap(3, 1)).unwrap());
        let got = s.load_replica(&"s/a".parse().unwrap()).unwrap().unwrap();
        assert_eq!((got.epoch, got.twin.unwrap().revision), (3, 1));
        let id: TwinId = "s/a".parse().unwrap();
        s.append_frames(&id, &[frame(4, 0, vec![1.0]), frame(7, 10, vec![1.0])])
            .unwrap();
        s.append_frames(
            &id,
            &[StoredFrame {
                seq: 0,
                ..frame(0, 99, vec![2.0])
            }],
        )
        .unwrap();
        assert_eq!(s.last_stored_seq(&id, "v").unwrap(), 7);
        assert_eq!(s.last_stored_seq(&id, "w").unwrap(), 0);
    }

    #[test]
    fn records_of_an_invalid_twin_id_are_refused() {
        let (_d, s) = store();
        for bad in ["", "no-site", "s/a/b"] {
            let snap = TwinSnapshot {
                twin: Some(twinmesh_twins::proto::Twin {
                    twin_id: bad.into(),
                    ..Default::default()
                }),
                epoch: 1,
                ..Default::default()
            };
            assert!(s.save_snapshot(&snap).is_err(), "{bad:?}");
            assert!(s.save_replica(&snap).is_err(), "{bad:?}");
            let p = Placement {
                twin_id: bad.into(),
                ..Default::default()
            };
            assert!(s.save_hosted(&p).is_err(), "{bad:?}");
            assert!(s.save_placement(&p).is_err(), "{bad:?}");
        }
        assert!(s.save_snapshot(&TwinSnapshot::default()).is_err());
        assert_eq!((s.snap.len(), s.replica.len()), (0, 0));
        assert!(s.hosted().unwrap().is_empty() && s.placements().unwrap().is_empty());
    }

    #[test]
    fn the_archive_lists_series_and_reads_points() {
        let (_d, s) = store();
        let id: TwinId = "s/a".parse().unwrap();
        let point = |signal: &str, t, x| StoredFrame {
            signal: signal.into(),
            ..frame(0, t, vec![x])
        };
        s.append_frames(&id, &[point("b.mean", 10, 1.0), point("a.rms", 10, 2.0)])
            .unwrap();
        s.append_frames(&id, &[point("b.mean", 20, 3.0)]).unwrap();
        s.append_frames(&"s/ab".parse().unwrap(), &[point("c", 0, 0.0)])
            .unwrap();
        assert_eq!(s.signals_of(&id).unwrap(), ["a.rms", "b.mean"]);
        assert_eq!(s.read_points(&id, "b.mean", 10, 20).unwrap(), [(10, 1.0)]);
        assert_eq!(s.read_points(&id, "b.mean", 0, 100).unwrap().len(), 2);
    }

    #[test]
    fn the_registry_keeps_versions_apart_and_in_order() {
        let (_d, s) = store();
        let rec = |v: u64| ModelRecord {
            model: vec![v as u8],
            ..Default::default()
        };
        assert_eq!(s.newest_model_version("m").unwrap(), 0);
        for v in [1, 2, 256] {
            s.put_model("m", v, &rec(v)).unwrap();
        }
        // A model whose id extends another's is not one of its versions.
        s.put_model("m2", 9, &rec(9)).unwrap();
        assert_eq!(s.newest_model_version("m").unwrap(), 256);
        assert_eq!(s.get_model("m", 2).unwrap().unwrap().model, [2]);
        assert!(s.get_model("m", 3).unwrap().is_none());
        let all: Vec<Vec<u8>> = s.models().unwrap().into_iter().map(|r| r.model).collect();
        assert_eq!(all, [[1], [2], [0], [9]]);
    }

    #[tokio::test]
    async fn reopened_store_keeps_flushed_data() {
        let dir = tempfile::tempdir().unwrap();
        let id: TwinId = "s/a".parse().unwrap();
        {
            let s = SledStore::open(dir.path(), 8).unwrap();
            s.append_frames(&id, &[frame(1, 0, vec![1.0])]).unwrap();
            s.save_hosted(&Placement {
                twin_id: "s/a".into(),
                node: "e".into(),
                epoch: 3,
                ..Default::default()
            })
            .unwrap();
            s.flush().await.unwrap();
        }
        let s = reopened(dir.path(), || None);
        assert_eq!(s.frame_seqs(&id, "v").unwrap(), vec![1]);
        assert_eq!(s.hosted().unwrap()[0].epoch, 3);
    }
}
