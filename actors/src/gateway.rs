//! `GatewayActor`: the IoT tier. It polls its devices, cuts their samples into
//! `TelemetryFrame`s numbered per (twin, signal) from 1 without gaps, writes each frame to
//! its durable spool *before* publishing it, truncates the spool when the twin
//! acknowledges (frames are durable there), and re-sends what stays unacknowledged to
//! whichever node hosts the twin. It also registers its assets with the placement
//! authority and forwards set-points to the devices.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use prost::Message;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use crate::wire::{self, TypedFabric};
use twinmesh_twins::chain::{self, Chain, ChainSpec, StreamPipeline};
use twinmesh_twins::dsp::codec;
use twinmesh_twins::privacy::{Mechanism, Policy};
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, ChainUpdate, DesiredUpdate, GetTwinRequest, Placement,
    PlacementRequest, ReplayRequest, TelemetryFrame, TwinReply, TwinRequest, Watermark,
};
use twinmesh_twins::{keys, Tier, TwinId};

use crate::context::NodeContext;
use crate::metrics::NodeMetrics;
use crate::ports::{Device, DeviceStatus, Qos, SetpointOutcome, SpoolStore};
use crate::tasks::TaskController;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How often devices are polled.
    pub tick: Duration,
    /// Most samples in one frame.
    pub frame_samples: usize,
    /// Unacknowledged frames are re-sent after this long without progress.
    pub resend_after: Duration,
    /// Most frames re-sent per stream at once.
    pub resend_batch: usize,
    /// Most frames of a stream published and not yet acknowledged. Frames beyond it
    /// wait in the spool and go out as acknowledgements come back, so a burst (a
    /// device's backlog, a broker that delivers thousands of messages at once) never
    /// overflows the twin's ingest queue (`TwinConfig::ingest_queue`, 256 frames), where
    /// frames would be dropped and sent again a second later.
    pub window: u64,
    /// Most frames spooled per stream; beyond it the oldest are dropped (and counted).
    pub max_spool_frames: u64,
    /// Acknowledged frames kept per stream, so a twin that moves (migration, failover)
    /// can fill the history of its new node from them.
    pub retain_frames: u64,
    /// Frames re-sent per stream and tick when a twin asks for a replay (pacing).
    pub replay_per_tick: u64,
    /// Sequence numbers reserved durably at a time.
    pub seq_block: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            tick: Duration::from_millis(100),
            frame_samples: 1024,
            resend_after: Duration::from_secs(1),
            resend_batch: 1024,
            window: 128,
            max_spool_frames: 100_000,
            retain_frames: 4096,
            replay_per_tick: 48,
            seq_block: 4096,
        }
    }
}

pub enum GatewayMsg {
    Tick,
    Ack(Watermark),
    /// A twin (re)started and asks for what its node's history lacks.
    Replay(ReplayRequest),
    /// The placement authority moved a twin: acknowledgements of older epochs no longer
    /// count.
    Placed(Placement),
    Control(DesiredUpdate),
    /// The twin's chain (its IoT stages run here).
    Chain(ChainUpdate),
    Inspect(RpcReplyPort<Vec<StreamStatus>>),
}

/// Observable state of one (twin, signal) stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStatus {
    pub twin_id: String,
    pub signal: String,
    /// Last seq handed out.
    pub last_seq: u64,
    /// Highest seq the twin acknowledged as durable.
    pub acked: u64,
    /// Lowest seq still spooled (resendable): acknowledged frames below it, but for the
    /// `retain_frames` kept for a twin that moves, are truncated.
    pub spool_base: u64,
    /// Frames dropped from a full spool.
    pub dropped: u64,
}

struct Stream {
    next_seq: u64,
    reserved_end: u64,
    /// Highest seq the current owner of the twin acknowledged.
    acked: u64,
    /// Highest seq published (frames above it are spooled and not yet sent); a resend
    /// sets it back to the last frame it sent.
    published: u64,
    /// Epoch of the owner whose acknowledgements `acked` follows.
    owner_epoch: u64,
    /// Next seq to replay, while a replay is under way.
    replay_from: Option<u64>,
    /// Lowest seq still resendable.
    base: u64,
    /// Seqs `[start, end)` the spool never holds: after a crash, the rest of the block
    /// reserved before it (and frames spooled but not flushed). Once the twin has
    /// everything below `start`, frames say they are gone (`claimed_base`).
    hole: Option<(u64, u64)>,
    dropped: u64,
    last_progress: Instant,
    last_resend: Option<Instant>,
}

impl Stream {
    /// The `spool_base_seq` frames carry: the lowest seq the gateway can still re-send.
    /// Past a hole that the twin has reached (it acknowledged everything below it), the
    /// numbers in the hole are gone, and frames say so; before, the twin would wait for
    /// them forever.
    fn claimed_base(&self) -> u64 {
        match self.hole {
            Some((start, end)) if self.acked.saturating_add(1) >= start => self.base.max(end),
            _ => self.base,
        }
    }
}

pub struct GatewayArgs {
    pub ctx: Arc<NodeContext>,
    pub devices: Vec<Box<dyn Device>>,
    pub config: GatewayConfig,
    /// Chains configured per kind for new twins (validated); others use the default.
    pub chains: BTreeMap<twinmesh_twins::AssetKind, Chain>,
}

#[derive(Clone, Copy)]
pub struct GatewayActor;

/// Most records in one identifier batch.
pub const MAX_IDENTIFIER_BATCH: usize = 1000;

/// Most set-points waiting for a device's answer at once; beyond it a set-point is
/// answered unreachable (the twin sends it again).
pub const MAX_PENDING_SETPOINTS: usize = 1024;

/// A set-point a device has not answered within this long is reported unreachable.
pub const SETPOINT_TIMEOUT: Duration = Duration::from_secs(30);

/// A device's status is told to its twin on every change and at least this often (a
/// twin that starts or moves learns it without a change).
pub const DEVICE_STATUS_EVERY: Duration = Duration::from_secs(5);

/// A device with the IoT stages of its twin's chain.
struct Slot {
    device: Box<dyn Device>,
    chain: Chain,
    pipelines: BTreeMap<&'static str, StreamPipeline>,
    /// Signals whose frames travel sealed with the site key (the twin's privacy policy;
    /// the kind's default until the twin tells).
    sealed: std::collections::BTreeSet<String>,
    /// How each identifier stream leaves the device (the twin's policy; the kind's
    /// default, pseudonymise, until the twin tells).
    identifiers: BTreeMap<String, Mechanism>,
    /// Revision of the twin's last chain update applied (older ones are ignored).
    chain_revision: u64,
    /// Revision of the last set-point applied per property (older ones are ignored).
    setpoint_revisions: BTreeMap<String, u64>,
    /// The device's status as last told to the twin, and when.
    told_status: Option<(DeviceStatus, Instant)>,
}

pub struct GatewayState {
    ctx: Arc<NodeContext>,
    /// The one store concern of a gateway: the node store's spool.
    spool: Arc<dyn SpoolStore>,
    config: GatewayConfig,
    devices: BTreeMap<TwinId, Slot>,
    streams: BTreeMap<(TwinId, String), Stream>,
    /// Highest placement epoch known for each twin: acknowledgements of older owners are
    /// ignored (fencing).
    epochs: BTreeMap<TwinId, u64>,
    /// Each twin's owner as its last proven placement names it, with that epoch: a
    /// watermark of that epoch must come from that node.
    owners: BTreeMap<TwinId, (u64, String)>,
    /// Acknowledgements ignored because they came from an older owner.
    pub fenced_acks: u64,
    /// Set-points handed to devices that answer later, by ticket.
    pending_setpoints: BTreeMap<u64, (DesiredUpdate, Instant)>,
    next_ticket: u64,
    ticker: Option<JoinHandle<()>>,
    cancel: CancellationToken,
}

/// A failed gateway is not stopped (no `post_stop`): its state going away ends its
/// subscriptions and ticker, so the gateway its keeper starts next is the only one.
impl Drop for GatewayState {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}

impl GatewayState {
    async fn stream(&mut self, twin: &TwinId, signal: &str) -> crate::Result<&mut Stream> {
        let key = (twin.clone(), signal.to_owned());
        if !self.streams.contains_key(&key) {
            let store = &self.spool;
            let next_seq = store.reserve_seqs(twin, signal, self.config.seq_block)?;
            store.flush().await?;
            let base = store.spool_first(twin, signal)?.unwrap_or(next_seq);
            // A clean stop gives back the unused numbers, so the next block starts right
            // after the last spooled frame; after a crash there is a hole.
            let hole = store
                .spool_last(twin, signal)?
                .filter(|last| last + 1 < next_seq)
                .map(|last| (last + 1, next_seq));
            if let Some((start, end)) = hole {
                tracing::info!(twin = %twin, signal, start, end, "numbers lost in a crash are skipped once the twin has what came before");
            }
            self.streams.insert(
                key.clone(),
                Stream {
                    next_seq,
                    reserved_end: next_seq + self.config.seq_block,
                    acked: base - 1,
                    published: base - 1,
                    owner_epoch: 0,
                    replay_from: None,
                    base,
                    hole,
                    dropped: 0,
                    // Spooled frames from before a restart are re-sent on the first tick.
                    last_progress: Instant::now()
                        .checked_sub(self.config.resend_after)
                        .unwrap_or_else(Instant::now),
                    last_resend: None,
                },
            );
        }
        let stream = self.streams.get_mut(&key).expect("inserted above");
        if stream.next_seq == stream.reserved_end {
            let first = self
                .spool
                .reserve_seqs(twin, signal, self.config.seq_block)?;
            self.spool.flush().await?;
            stream.next_seq = first;
            stream.reserved_end = first + self.config.seq_block;
        }
        Ok(stream)
    }

    async fn publish_frame(&self, frame: &TelemetryFrame, twin: &TwinId) {
        let sealed = self
            .devices
            .get(twin)
            .is_none_or(|s| s.sealed.contains(&frame.signal));
        let mut message = if sealed {
            // Raw values of a protected signal never travel readable: sealed with the
            // site key, or not published at all (they stay spooled).
            let Some(ring) = self.ctx.site_key.as_ref() else {
                NodeMetrics::add(&self.ctx.metrics.frames_withheld, 1);
                return;
            };
            let inner = proto::SealedSamples {
                samples: frame.samples.clone(),
                packed: frame.packed.clone(),
            };
            TelemetryFrame {
                twin_id: frame.twin_id.clone(),
                signal: frame.signal.clone(),
                seq: frame.seq,
                start_ns: frame.start_ns,
                sample_period_ns: frame.sample_period_ns,
                samples: Vec::new(),
                spool_base_seq: frame.spool_base_seq,
                scale: frame.scale,
                packed: Vec::new(),
                sealed: ring.seal(
                    &twinmesh_twins::frame::seal_context(frame),
                    &inner.encode_to_vec(),
                ),
                proof: None,
            }
        } else {
            frame.clone()
        };
        // Twins take frames only with a proof under the site's control key.
        self.ctx.trust.prove(twin.site(), &mut message);
        let len = message.encoded_len() as u64;
        // The twin's ingest links to this span (traces on; a small ratio is sampled).
        let span = tracing::debug_span!(
            "gateway.publish",
            twin = %twin,
            signal = %frame.signal,
            seq = frame.seq
        );
        match tracing::Instrument::instrument(
            self.ctx.fabric.put(
                &keys::telemetry(twin, &frame.signal),
                &message,
                Qos::Reliable,
            ),
            span,
        )
        .await
        {
            Ok(()) => {
                NodeMetrics::add(&self.ctx.metrics.frames_published, 1);
                NodeMetrics::add(&self.ctx.metrics.bytes_published, len);
            }
            Err(e) => tracing::debug!(twin = %twin, "frame stays spooled, publish failed: {e}"),
        }
    }

    /// The records of `sightings` as they may leave the device under the twin's policy:
    /// pseudonymised with the site key, raw (public streams), or none (suppressed, or no
    /// site key to pseudonymise with), in batches of at most `MAX_IDENTIFIER_BATCH`.
    fn identifier_batches(
        &self,
        twin: &TwinId,
        sightings: Vec<crate::ports::Sighting>,
    ) -> Vec<proto::IdentifierBatch> {
        let Some(slot) = self.devices.get(twin) else {
            return Vec::new();
        };
        let mut by_stream: BTreeMap<&'static str, Vec<proto::IdentifierRecord>> = BTreeMap::new();
        for s in sightings {
            let identifier = match slot
                .identifiers
                .get(s.stream)
                .copied()
                .unwrap_or(Mechanism::Suppress)
            {
                Mechanism::None => s.identifier,
                Mechanism::Pseudonymise => match self.ctx.site_key.as_ref() {
                    Some(ring) => ring.pseudonymiser().pseudonym(&s.identifier),
                    None => {
                        NodeMetrics::add(&self.ctx.metrics.identifiers_withheld, 1);
                        continue;
                    }
                },
                _ => {
                    NodeMetrics::add(&self.ctx.metrics.identifiers_withheld, 1);
                    continue;
                }
            };
            by_stream
                .entry(s.stream)
                .or_default()
                .push(proto::IdentifierRecord {
                    timestamp_ns: s.timestamp_ns,
                    identifier,
                    present: s.present,
                });
        }
        let mut out = Vec::new();
        for (stream, records) in by_stream {
            for chunk in records.chunks(MAX_IDENTIFIER_BATCH) {
                out.push(proto::IdentifierBatch {
                    twin_id: twin.to_string(),
                    stream: stream.to_owned(),
                    records: chunk.to_vec(),
                    proof: None,
                });
            }
        }
        out
    }

    async fn publish_identifiers(&self, twin: &TwinId, mut batch: proto::IdentifierBatch) {
        self.ctx.trust.prove(twin.site(), &mut batch);
        if let Err(e) = self
            .ctx
            .fabric
            .put(&keys::telemetry(twin, &batch.stream), &batch, Qos::Reliable)
            .await
        {
            tracing::debug!(twin = %twin, "identifier batch not published: {e}");
        }
    }

    async fn poll_devices(&mut self) -> crate::Result<()> {
        let now = self.ctx.now_ns();
        let ids: Vec<TwinId> = self.devices.keys().cloned().collect();
        for id in ids {
            let slot = self.devices.get_mut(&id).expect("listed");
            let mut out = Vec::new();
            for block in slot.device.poll(now) {
                // The IoT stages of the chain (filters, decimation) run before publishing.
                let chain = &slot.chain;
                let pipeline = slot
                    .pipelines
                    .entry(block.signal)
                    .or_insert_with(|| StreamPipeline::new(chain, block.signal, Tier::Iot));
                let compress = chain.compresses(block.signal);
                let (start_ns, period, samples, scale) = if pipeline.is_empty() {
                    (
                        block.start_ns,
                        block.sample_period_ns,
                        block.samples,
                        block.scale,
                    )
                } else {
                    match pipeline.process(chain::Block {
                        start_ns: block.start_ns,
                        period_ns: block.sample_period_ns,
                        samples: block.samples,
                    }) {
                        // Filtered samples leave the ADC grid; a compress stage puts them
                        // back on it (error at most half a resolution step) to pack them.
                        Some(mut b) if compress && block.scale > 0.0 => {
                            for x in &mut b.samples {
                                *x = codec::quantize(*x, block.scale);
                            }
                            (b.start_ns, b.period_ns, b.samples, block.scale)
                        }
                        Some(b) => (b.start_ns, b.period_ns, b.samples, 0.0),
                        None => continue,
                    }
                };
                out.push((block.signal, start_ns, period, samples, scale, compress));
            }
            let sightings = slot.device.sightings();
            if !sightings.is_empty() {
                let batches = self.identifier_batches(&id, sightings);
                for b in batches {
                    self.publish_identifiers(&id, b).await;
                }
            }
            for (signal, start, period, samples, scale, compress) in out {
                let n = self.config.frame_samples.max(1);
                for (i, chunk) in samples.chunks(n).enumerate() {
                    let start_ns = start + (i * n) as i64 * period;
                    self.emit(&id, signal, start_ns, period, chunk, scale, compress)
                        .await?;
                }
            }
        }
        Ok(())
    }

    fn on_chain(&mut self, update: ChainUpdate) {
        let Ok(twin) = update.twin_id.parse::<TwinId>() else {
            return;
        };
        let Some(slot) = self.devices.get_mut(&twin) else {
            return;
        };
        // A proven update from the twin (on a restart its chain may come again); one
        // older than what was applied is a replay.
        if update.revision < slot.chain_revision {
            tracing::debug!(twin = %twin, revision = update.revision, applied = slot.chain_revision, "ignoring an older chain update");
            return;
        }
        slot.chain_revision = update.revision;
        let mut sealed: std::collections::BTreeSet<String> =
            update.sealed_signals.iter().cloned().collect();
        // An unproven update (what a twin answered the gateway's start-up query with:
        // anyone may answer it) only ever seals more.
        if update.proof.is_none() {
            sealed.extend(slot.sealed.iter().cloned());
        }
        if sealed != slot.sealed {
            tracing::info!(twin = %twin, sealed = ?sealed, "privacy policy: sealed signals updated");
            slot.sealed = sealed;
        }
        // Streams the update leaves out (or names an unknown mechanism for) are
        // pseudonymised: never raw by omission.
        let identifiers: BTreeMap<String, Mechanism> = slot
            .device
            .kind()
            .schema()
            .identifiers
            .iter()
            .map(|i| {
                let m = update
                    .identifier_mechanisms
                    .get(i.name)
                    .and_then(|m| Mechanism::parse(m).ok())
                    .filter(|m| matches!(m, Mechanism::None | Mechanism::Suppress))
                    .unwrap_or(Mechanism::Pseudonymise);
                (i.name.to_owned(), m)
            })
            .collect();
        if identifiers != slot.identifiers {
            tracing::info!(twin = %twin, identifiers = ?identifiers, "privacy policy: identifier streams updated");
            slot.identifiers = identifiers;
        }
        let spec = ChainSpec::from(&update.chain.unwrap_or_default());
        match Chain::validate(&spec, slot.device.kind()) {
            Ok(chain) if chain != slot.chain => {
                tracing::info!(twin = %twin, stages = chain.stages.len(), "chain updated; IoT stages restart");
                slot.chain = chain;
                slot.pipelines.clear();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(twin = %twin, "ignoring invalid chain: {e}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn emit(
        &mut self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        sample_period_ns: i64,
        samples: &[f64],
        scale: f64,
        compress: bool,
    ) -> crate::Result<()> {
        let max_spool = self.config.max_spool_frames;
        let stream = self.stream(twin, signal).await?;
        let seq = stream.next_seq;
        stream.next_seq += 1;
        // A full spool drops its oldest frames: the twin will count them as lost.
        if seq - stream.base >= max_spool {
            let upto = seq - max_spool;
            stream.dropped += upto + 1 - stream.base;
            stream.base = upto + 1;
            self.spool.spool_truncate(twin, signal, upto)?;
        }
        let stream = &self.streams[&(twin.clone(), signal.to_owned())];
        let claimed_base = stream.claimed_base();
        let in_order = stream.published + 1 == seq;
        let room = seq <= stream.acked.saturating_add(self.config.window.max(1));
        let (samples, packed) = if compress {
            let mut packed = Vec::new();
            codec::encode(samples, scale, &mut packed);
            (Vec::new(), packed)
        } else {
            (samples.to_vec(), Vec::new())
        };
        let frame = TelemetryFrame {
            twin_id: twin.to_string(),
            signal: signal.to_owned(),
            seq,
            start_ns,
            sample_period_ns,
            samples,
            spool_base_seq: claimed_base,
            scale,
            packed,
            sealed: Vec::new(),
            proof: None,
        };
        self.spool.spool_put(&frame)?;
        if in_order && room {
            self.publish_frame(&frame, twin).await;
            if let Some(stream) = self.streams.get_mut(&(twin.clone(), signal.to_owned())) {
                stream.published = seq;
            }
        } else if room {
            // Frames before it wait in the spool (a resend set the stream back).
            self.fill_window(twin, signal).await?;
        }
        Ok(())
    }

    /// Publishes spooled frames after the last published one, as far as the window
    /// allows.
    async fn fill_window(&mut self, twin: &TwinId, signal: &str) -> crate::Result<()> {
        let window = self.config.window.max(1);
        let Some(stream) = self.streams.get_mut(&(twin.clone(), signal.to_owned())) else {
            return Ok(());
        };
        let from = stream.published.max(stream.acked).max(stream.base - 1) + 1;
        let limit = stream.acked.saturating_add(window).min(stream.next_seq - 1);
        if from > limit {
            return Ok(());
        }
        let base = stream.claimed_base();
        let count = usize::try_from(limit - from + 1).unwrap_or(usize::MAX);
        let frames = self.spool.spool_read(twin, signal, from, count)?;
        let mut last = None;
        for mut frame in frames.into_iter().take_while(|f| f.seq <= limit) {
            frame.spool_base_seq = base;
            last = Some(frame.seq);
            self.publish_frame(&frame, twin).await;
        }
        if let (Some(last), Some(stream)) = (
            last,
            self.streams.get_mut(&(twin.clone(), signal.to_owned())),
        ) {
            stream.published = stream.published.max(last);
        }
        Ok(())
    }

    async fn resend(&mut self, twin: &TwinId, signal: &str) -> crate::Result<()> {
        let Some(stream) = self.streams.get_mut(&(twin.clone(), signal.to_owned())) else {
            return Ok(());
        };
        stream.last_resend = Some(Instant::now());
        let (from, base) = (stream.acked + 1, stream.claimed_base());
        let batch = self
            .config
            .resend_batch
            .min(usize::try_from(self.config.window).unwrap_or(usize::MAX))
            .max(1);
        let frames = self.spool.spool_read(twin, signal, from.max(base), batch)?;
        tracing::debug!(twin = %twin, signal, from, frames = frames.len(), "re-sending unacknowledged frames");
        let last = frames.last().map(|f| f.seq);
        for mut frame in frames {
            frame.spool_base_seq = base;
            self.publish_frame(&frame, twin).await;
        }
        // Frames after the re-sent ones may be lost too: they go out again as the
        // acknowledgements come back.
        if let (Some(last), Some(stream)) = (
            last,
            self.streams.get_mut(&(twin.clone(), signal.to_owned())),
        ) {
            stream.published = last;
        }
        Ok(())
    }

    /// Whether a message of `epoch` for `twin` may come from the node its proof names:
    /// when a proven placement names the owner at that epoch, only that node.
    fn sent_by_owner(&self, twin: &TwinId, epoch: u64, proof: Option<&proto::Proof>) -> bool {
        let sender = proof.map(|p| p.node.as_str()).unwrap_or_default();
        match self.owners.get(twin) {
            Some((at, owner)) if *at == epoch && sender != owner => {
                NodeMetrics::add(&self.ctx.metrics.messages_malformed, 1);
                tracing::warn!(twin = %twin, epoch, from = sender, owner = owner, "ignoring a message from a node that does not own the twin at its epoch");
                false
            }
            _ => true,
        }
    }

    /// Records `epoch` for `twin`: false when it comes from an older owner (fenced);
    /// `Some(true)` when it is a new owner.
    /// Checks `epoch` against the highest one known for `twin` (from placements, acks and
    /// replay requests): false for an older owner (fenced).
    fn observe_epoch(&mut self, twin: &TwinId, epoch: u64) -> bool {
        let fence = self.epochs.entry(twin.clone()).or_insert(epoch);
        if epoch < *fence {
            self.fenced_acks += 1;
            return false;
        }
        *fence = epoch;
        true
    }

    async fn on_ack(&mut self, wm: Watermark) -> crate::Result<()> {
        let Ok(twin) = wm.twin_id.parse::<TwinId>() else {
            return Ok(());
        };
        if !self.sent_by_owner(&twin, wm.epoch, wm.proof.as_ref()) {
            return Ok(());
        }
        if !self.observe_epoch(&twin, wm.epoch) {
            tracing::debug!(twin = %twin, epoch = wm.epoch, "ignoring an acknowledgement of an older owner");
            return Ok(());
        }
        let retain = self.config.retain_frames;
        let Some(stream) = self.streams.get_mut(&(twin.clone(), wm.signal.clone())) else {
            return Ok(());
        };
        // No owner acknowledges a frame this gateway has not sent: such a watermark is
        // forged or corrupt, and believing it would drop frames the twin never had.
        if wm.seq >= stream.next_seq {
            NodeMetrics::add(&self.ctx.metrics.messages_malformed, 1);
            tracing::warn!(twin = %twin, signal = wm.signal, seq = wm.seq, sent = stream.next_seq.saturating_sub(1), "ignoring an acknowledgement of frames never sent");
            return Ok(());
        }
        // The first acknowledgement of an owner: the stream follows it from now on.
        let new_owner = wm.epoch > stream.owner_epoch && stream.owner_epoch > 0;
        stream.owner_epoch = stream.owner_epoch.max(wm.epoch);
        if new_owner {
            tracing::debug!(twin = %twin, signal = wm.signal, epoch = wm.epoch, seq = wm.seq, previous = stream.acked, "new owner's watermark");
        }
        if new_owner || wm.seq > stream.acked {
            // A new owner restarts from its own watermark (its snapshot may be older than
            // what the previous owner acknowledged).
            stream.acked = wm.seq;
            stream.last_progress = Instant::now();
            let upto = wm.seq.saturating_sub(retain);
            if upto >= stream.base {
                self.spool.spool_truncate(&twin, &wm.signal, upto)?;
                stream.base = upto + 1;
            }
            if new_owner && stream.acked + 1 < stream.next_seq {
                self.resend(&twin, &wm.signal).await?;
            } else {
                self.fill_window(&twin, &wm.signal).await?;
            }
        } else if stream.acked + 1 < stream.next_seq
            && stream
                .last_resend
                .is_none_or(|t| t.elapsed() >= self.config.resend_after / 4)
        {
            // The twin is waiting for frames it missed: send them now.
            self.resend(&twin, &wm.signal).await?;
        }
        Ok(())
    }

    fn on_replay(&mut self, req: ReplayRequest) {
        let Ok(twin) = req.twin_id.parse::<TwinId>() else {
            return;
        };
        if !self.observe_epoch(&twin, req.epoch) {
            return;
        }
        for ((t, signal), stream) in self.streams.iter_mut() {
            if *t != twin {
                continue;
            }
            let have = req.have_upto.get(signal).copied().unwrap_or(0);
            let from = have.saturating_add(1).max(stream.base);
            if from < stream.next_seq {
                tracing::debug!(twin = %twin, signal, from, to = stream.next_seq - 1, "replaying for the twin's history");
                stream.replay_from = Some(from);
            }
        }
    }

    /// One paced step of every replay under way.
    async fn step_replays(&mut self) -> crate::Result<()> {
        let per_tick = self.config.replay_per_tick as usize;
        let due: Vec<(TwinId, String, u64)> = self
            .streams
            .iter()
            .filter_map(|((t, s), st)| st.replay_from.map(|f| (t.clone(), s.clone(), f)))
            .collect();
        for (twin, signal, from) in due {
            let frames = self.spool.spool_read(&twin, &signal, from, per_tick)?;
            let key = (twin.clone(), signal.clone());
            let (base, next_seq) = {
                let st = &self.streams[&key];
                (st.claimed_base(), st.next_seq)
            };
            let last = frames.last().map(|f| f.seq);
            for mut frame in frames {
                frame.spool_base_seq = base;
                self.publish_frame(&frame, &twin).await;
            }
            let st = self.streams.get_mut(&key).expect("listed");
            st.replay_from = match last {
                Some(l) if l + 1 < next_seq => Some(l + 1),
                _ => None,
            };
        }
        Ok(())
    }

    async fn on_control(&mut self, update: DesiredUpdate) {
        let Ok(twin) = update.twin_id.parse::<TwinId>() else {
            return;
        };
        if !self.devices.contains_key(&twin)
            || !self.sent_by_owner(&twin, update.epoch, update.proof.as_ref())
            || !self.observe_epoch(&twin, update.epoch)
        {
            return;
        }
        let Some(slot) = self.devices.get_mut(&twin) else {
            return;
        };
        let applied = slot
            .setpoint_revisions
            .entry(update.property.clone())
            .or_default();
        if update.revision < *applied {
            tracing::debug!(twin = %twin, property = update.property, revision = update.revision, "ignoring an older set-point");
            return;
        }
        *applied = update.revision;
        // The twin re-sends what is not delivered yet: one hand-over per command at a time.
        if self.pending_setpoints.values().any(|(p, _)| {
            p.twin_id == update.twin_id
                && p.property == update.property
                && p.revision == update.revision
        }) {
            return;
        }
        let outcome = if self.pending_setpoints.len() >= MAX_PENDING_SETPOINTS {
            Some(SetpointOutcome::Unreachable(
                "too many set-points waiting for their devices".to_owned(),
            ))
        } else {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            let outcome = slot
                .device
                .submit_setpoint(ticket, &update.property, update.value);
            if outcome.is_none() {
                self.pending_setpoints
                    .insert(ticket, (update.clone(), Instant::now()));
            }
            outcome
        };
        if let Some(outcome) = outcome {
            self.report_setpoint(update, outcome).await;
        }
    }

    /// Tells the twin what became of a set-point.
    async fn report_setpoint(&self, update: DesiredUpdate, outcome: SetpointOutcome) {
        let (status, reason) = match outcome {
            SetpointOutcome::Delivered => (proto::DeliveryStatus::Delivered, String::new()),
            SetpointOutcome::Refused(reason) => (proto::DeliveryStatus::Rejected, reason),
            SetpointOutcome::Unreachable(reason) => (proto::DeliveryStatus::Unreachable, reason),
        };
        tracing::info!(
            twin = update.twin_id,
            property = update.property,
            value = update.value,
            ?status,
            reason,
            "set-point"
        );
        let report = DesiredUpdate {
            status: status as i32,
            reason,
            timestamp_ns: self.ctx.now_ns(),
            proof: None,
            ..update
        };
        self.report(report).await;
    }

    /// Publishes a report to its twin, proven: the twin takes delivery reports only
    /// from its site's nodes.
    async fn report(&self, mut report: DesiredUpdate) {
        let Ok(twin) = report.twin_id.parse::<TwinId>() else {
            return;
        };
        self.ctx.trust.prove(twin.site(), &mut report);
        if let Err(e) = self
            .ctx
            .fabric
            .put(&keys::control_delivered(&twin), &report, Qos::Reliable)
            .await
        {
            tracing::warn!(twin = %twin, "report not published: {e}");
        }
    }

    /// Answers set-points the devices completed (or that timed out) and tells each twin
    /// whether its device is reachable, on change and every `DEVICE_STATUS_EVERY`.
    async fn check_devices(&mut self) {
        let mut done = Vec::new();
        let mut statuses = Vec::new();
        for (id, slot) in self.devices.iter_mut() {
            for (ticket, outcome) in slot.device.setpoint_outcomes() {
                if let Some((update, _)) = self.pending_setpoints.remove(&ticket) {
                    done.push((update, outcome));
                }
            }
            let Some(status) = slot.device.status() else {
                continue;
            };
            let due = match &slot.told_status {
                Some((told, at)) => *told != status || at.elapsed() >= DEVICE_STATUS_EVERY,
                None => true,
            };
            if due {
                if slot
                    .told_status
                    .as_ref()
                    .is_none_or(|(told, _)| *told != status)
                {
                    match &status {
                        DeviceStatus::Reachable => tracing::info!(twin = %id, "device reachable"),
                        DeviceStatus::Unreachable(reason) => {
                            tracing::warn!(twin = %id, reason, "device unreachable")
                        }
                    }
                }
                slot.told_status = Some((status.clone(), Instant::now()));
                statuses.push((id.clone(), status));
            }
        }
        let expired: Vec<u64> = self
            .pending_setpoints
            .iter()
            .filter(|(_, (_, at))| at.elapsed() >= SETPOINT_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for ticket in expired {
            if let Some((update, _)) = self.pending_setpoints.remove(&ticket) {
                done.push((
                    update,
                    SetpointOutcome::Unreachable(format!(
                        "no answer from the device within {}s",
                        SETPOINT_TIMEOUT.as_secs()
                    )),
                ));
            }
        }
        for (update, outcome) in done {
            self.report_setpoint(update, outcome).await;
        }
        for (twin, status) in statuses {
            let (reachable, reason) = match status {
                DeviceStatus::Reachable => (true, String::new()),
                DeviceStatus::Unreachable(reason) => (false, reason),
            };
            let report = DesiredUpdate {
                twin_id: twin.to_string(),
                epoch: self.epochs.get(&twin).copied().unwrap_or_default(),
                timestamp_ns: self.ctx.now_ns(),
                device: Some(proto::DeviceStatus { reachable, reason }),
                ..Default::default()
            };
            self.report(report).await;
        }
    }
}

impl Actor for GatewayActor {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let GatewayArgs {
            ctx,
            devices,
            config,
            chains: configured,
        } = args;
        let chain_of = |kind| {
            configured
                .get(&kind)
                .cloned()
                .unwrap_or_else(|| Chain::default_for(kind))
        };
        let tasks = ctx.task_controller().child();
        let cancel = tasks.token().clone();
        let acks = ctx
            .fabric
            .subscribe(&keys::acks_of_site(&ctx.site), 4096)
            .await?;
        let control = ctx
            .fabric
            .subscribe(&keys::control_of_site(&ctx.site), 256)
            .await?;
        let chains = ctx
            .fabric
            .subscribe(&keys::chains_of_site(&ctx.site), 256)
            .await?;
        let replays = ctx
            .fabric
            .subscribe(&keys::replay_of_site(&ctx.site), 1024)
            .await?;
        let placements = ctx
            .fabric
            .subscribe(&keys::placements_of_site(&ctx.site), 1024)
            .await?;
        // Acks, set-points, placements, replay requests and chain updates of this site,
        // merged in one loop with a fixed priority (a twin's placement before its chain,
        // as the gateway applies a chain only for the epoch it knows): not through
        // `wire::forward`, whose loops, one per subscription, would race each other.
        // Acks, set-points, placements, replay requests (their epoch fences) and chains
        // are obeyed only with a proof under the
        // site's control key (held by the site's nodes and the cloud): anyone else on
        // the fabric could otherwise truncate the spool, actuate the device or make a
        // protected signal travel raw.
        fn hand<M: wire::Wire + crate::trust::Proven>(
            me: &ActorRef<GatewayMsg>,
            ctx: &NodeContext,
            s: crate::ports::Sample,
            msg: fn(M) -> GatewayMsg,
        ) -> bool {
            match s.decode::<M>() {
                Ok(mut m) => {
                    if ctx.trust.proven(&ctx.site, &mut m).is_none() {
                        NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
                        tracing::warn!(
                            key = s.key,
                            "dropped: no valid proof under the site's control key"
                        );
                        return true;
                    }
                    me.cast(msg(m)).is_ok()
                }
                Err(e) => {
                    tracing::warn!(key = s.key, "dropped: {e}");
                    true
                }
            }
        }
        let me = myself.clone();
        let hctx = ctx.clone();
        tasks.spawn_until_cancelled(async move {
            // Own the subscriptions whole: their guards keep them declared.
            let (acks, control, chains, replays, placements) =
                (acks, control, chains, replays, placements);
            loop {
                let alive = tokio::select! {
                    biased;
                    s = acks.rx.recv_async() => s.is_ok_and(|s| hand(&me, &hctx, s, GatewayMsg::Ack)),
                    s = control.rx.recv_async() => s.is_ok_and(|s| hand(&me, &hctx, s, GatewayMsg::Control)),
                    s = placements.rx.recv_async() => s.is_ok_and(|s| hand(&me, &hctx, s, GatewayMsg::Placed)),
                    s = replays.rx.recv_async() => s.is_ok_and(|s| hand(&me, &hctx, s, GatewayMsg::Replay)),
                    s = chains.rx.recv_async() => s.is_ok_and(|s| hand(&me, &hctx, s, GatewayMsg::Chain)),
                };
                if !alive {
                    break;
                }
            }
        });
        let registrations: Vec<PlacementRequest> = devices
            .iter()
            .map(|d| {
                let mut req = PlacementRequest {
                    twin_id: d.twin_id().to_string(),
                    kind: d.kind().to_string(),
                    gateway: ctx.node.to_string(),
                    chain: configured.get(&d.kind()).map(|c| (&c.spec).into()),
                    // A kind of this gateway's models folder travels with the
                    // registration: the nodes of the mesh need not have the folder.
                    thing_model: if d.kind().is_builtin() {
                        String::new()
                    } else {
                        d.kind().schema().thing_model.to_owned()
                    },
                    proof: None,
                };
                // The authority registers a twin only for its site's gateway.
                ctx.trust.prove(d.twin_id().site(), &mut req);
                req
            })
            .collect();
        tasks.spawn_until_cancelled(register_assets(
            ctx.clone(),
            myself.clone(),
            registrations,
            tasks.clone(),
        ));
        let devices = devices
            .into_iter()
            .map(|d| {
                let slot = Slot {
                    chain: chain_of(d.kind()),
                    pipelines: BTreeMap::new(),
                    sealed: Policy::default_for(d.kind())
                        .protected_signals()
                        .into_iter()
                        .collect(),
                    identifiers: Policy::default_for(d.kind()).identifiers,
                    chain_revision: 0,
                    setpoint_revisions: BTreeMap::new(),
                    told_status: None,
                    device: d,
                };
                (slot.device.twin_id().clone(), slot)
            })
            .collect();
        Ok(GatewayState {
            spool: ctx.store.clone(),
            ctx,
            config,
            devices,
            streams: BTreeMap::new(),
            epochs: BTreeMap::new(),
            owners: BTreeMap::new(),
            fenced_acks: 0,
            pending_setpoints: BTreeMap::new(),
            next_ticket: 1,
            ticker: None,
            cancel,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker = Some(myself.send_interval(state.config.tick, || GatewayMsg::Tick));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.cancel.cancel();
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        // Clean stop: the next start continues numbering exactly where this one ended.
        for ((twin, signal), stream) in &state.streams {
            state.spool.release_seqs(twin, signal, stream.next_seq)?;
        }
        state.spool.flush().await?;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Tick => {
                state.poll_devices().await?;
                state.check_devices().await;
                state.step_replays().await?;
                let due: Vec<(TwinId, String)> = state
                    .streams
                    .iter()
                    .filter(|(_, s)| {
                        s.acked + 1 < s.next_seq
                            && s.last_progress.elapsed() >= state.config.resend_after
                            && s.last_resend
                                .is_none_or(|t| t.elapsed() >= state.config.resend_after)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for (twin, signal) in due {
                    state.resend(&twin, &signal).await?;
                }
            }
            GatewayMsg::Ack(wm) => state.on_ack(wm).await?,
            GatewayMsg::Replay(req) => state.on_replay(req),
            GatewayMsg::Placed(p) => {
                if let Ok(twin) = p.twin_id.parse::<TwinId>() {
                    let known = state.epochs.entry(twin.clone()).or_insert(0);
                    *known = (*known).max(p.epoch);
                    let owner = state.owners.entry(twin).or_default();
                    if p.epoch >= owner.0 {
                        *owner = (p.epoch, p.node);
                    }
                }
            }
            GatewayMsg::Control(update) => state.on_control(update).await,
            GatewayMsg::Chain(update) => state.on_chain(update),
            GatewayMsg::Inspect(reply) => {
                let mut out: Vec<StreamStatus> = state
                    .streams
                    .iter()
                    .map(|((twin, signal), s)| StreamStatus {
                        twin_id: twin.to_string(),
                        signal: signal.clone(),
                        last_seq: s.next_seq - 1,
                        acked: s.acked,
                        spool_base: s.base,
                        dropped: s.dropped,
                    })
                    .collect();
                out.sort_by(|a, b| (&a.twin_id, &a.signal).cmp(&(&b.twin_id, &b.signal)));
                let _ = reply.send(out);
            }
        }
        Ok(())
    }
}

/// Announces each asset to the placement authority until it answers (the cloud may be
/// down when the gateway starts; data is spooled meanwhile).
async fn register_assets(
    ctx: Arc<NodeContext>,
    gateway: ActorRef<GatewayMsg>,
    mut pending: Vec<PlacementRequest>,
    tasks: TaskController,
) {
    let mut delay = Duration::from_millis(200);
    while !pending.is_empty() {
        let mut still = Vec::new();
        for req in pending {
            let Ok(id) = req.twin_id.parse::<TwinId>() else {
                continue;
            };
            let replies = ctx
                .fabric
                .ask(&keys::placement(&id), &req, Duration::from_secs(3))
                .await;
            match replies {
                Ok(r) if !r.is_empty() => {
                    tracing::debug!(twin = %id, "asset registered");
                    tasks.spawn_until_cancelled(fetch_chain(ctx.clone(), gateway.clone(), id));
                }
                _ => still.push(req),
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        tracing::debug!(
            waiting = pending.len(),
            "placement authority not reachable yet; retrying"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Reads the twin's current chain once it answers (the twin also publishes it whenever it
/// starts or changes; this covers a gateway that starts after its twins).
async fn fetch_chain(ctx: Arc<NodeContext>, gateway: ActorRef<GatewayMsg>, id: TwinId) {
    let request = TwinRequest {
        caller: None,
        request: Some(twin_request::Request::GetTwin(GetTwinRequest {
            twin_id: id.to_string(),
        })),
    };
    for _ in 0..30 {
        if let Ok(replies) = ctx
            .fabric
            .ask(&keys::twin_rpc(&id), &request, Duration::from_secs(2))
            .await
        {
            let twin = replies
                .into_iter()
                .find_map(|r| r.decode::<TwinReply>().ok())
                .and_then(|r| match r.reply {
                    Some(twin_reply::Reply::Twin(t)) => Some(t),
                    _ => None,
                });
            if let Some(t) = twin {
                let kind = t.kind.parse().ok();
                let policy = match (t.policy.as_ref(), kind) {
                    (Some(p), Some(kind)) => {
                        Policy::from_stored(p, kind).unwrap_or_else(|_| Policy::default_for(kind))
                    }
                    (None, Some(kind)) => Policy::default_for(kind),
                    // Unknown kind: keep what the gateway has.
                    _ => return,
                };
                // Whoever answered is unproven: the answer may seal more than the
                // kind's default, never less, and it never outranks a proven update
                // (revision 0).
                let default = Policy::default_for(kind.expect("matched above"));
                let mut sealed_signals = policy.protected_signals();
                for s in default.protected_signals() {
                    if !sealed_signals.contains(&s) {
                        sealed_signals.push(s);
                    }
                }
                let mut identifier_mechanisms = policy.identifier_mechanisms();
                for (stream, strict) in default.identifier_mechanisms() {
                    let m = identifier_mechanisms.entry(stream).or_default();
                    if m.is_empty() {
                        *m = strict;
                    }
                }
                let _ = gateway.cast(GatewayMsg::Chain(ChainUpdate {
                    twin_id: t.twin_id,
                    chain: t.chain,
                    revision: 0,
                    sealed_signals,
                    identifier_mechanisms,
                    proof: None,
                }));
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
