//! The ingest side: the ingest pump (subscription → decode and validate → batch →
//! apply → flush → watermarks) and what the actor does with a batch (admission by
//! `seq`, history, analysis windows). Identifier streams are checked here and handed to
//! [`super::privacy`].

use std::sync::Arc;

use prost::Message;
use ractor::{ActorRef, RpcReplyPort};

use crate::wire::TypedFabric;
use twinmesh_twins::chain::{self, Analyzer, WindowJob};
use twinmesh_twins::proto::{self, TelemetryFrame, Watermark};
use twinmesh_twins::state::Admission;
use twinmesh_twins::{frame, keys, AssetKind, TwinId};

use super::{IngestAck, TwinActorState, TwinMsg};
use crate::context::NodeContext;
use crate::error::Result;
use crate::metrics::NodeMetrics;
use crate::ports::{Qos, Sample, StoredFrame};

/// What applying a batch of frames produced.
struct Applied {
    /// Last applied seq of each signal the batch touched.
    watermarks: Vec<(String, u64)>,
    /// Frames skipped because the gateway no longer held them.
    lost: u64,
    /// Analysis windows the batch completed.
    jobs: Vec<WindowJob>,
}

/// Most records one identifier batch may carry.
pub const MAX_IDENTIFIER_RECORDS: usize = 10_000;

/// Longest identifier accepted.
pub const MAX_IDENTIFIER_LEN: usize = 128;

impl TwinActorState {
    /// Applies a batch and replies with the watermarks to acknowledge once the store has
    /// flushed. A frozen twin applies nothing.
    pub(super) async fn on_ingest(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        frames: Vec<TelemetryFrame>,
        reply: RpcReplyPort<IngestAck>,
    ) -> Result<()> {
        if self.frozen {
            // Moving: the new owner applies these (the gateway re-sends them).
            let _ = reply.send(IngestAck {
                epoch: self.placement.epoch,
                watermarks: Vec::new(),
            });
            return Ok(());
        }
        let Applied {
            watermarks,
            lost,
            jobs,
        } = self.apply_frames(frames)?;
        self.analyse(myself, jobs);
        let _ = reply.send(IngestAck {
            epoch: self.placement.epoch,
            watermarks,
        });
        if lost > 0 {
            self.publish_event(
                "frames_lost",
                format!("{lost} frames could no longer be resent by the gateway"),
                vec![("frames", lost.to_string())],
            )
            .await;
        }
        self.state_changed(myself).await;
        Ok(())
    }
    fn apply_frames(&mut self, frames: Vec<TelemetryFrame>) -> Result<Applied> {
        let mut stored = Vec::with_capacity(frames.len());
        let mut jobs = Vec::new();
        let mut touched: Vec<String> = Vec::new();
        let mut lost_total = 0;
        for f in frames {
            if !touched.contains(&f.signal) {
                touched.push(f.signal.clone());
            }
            match self.core.admit(&f.signal, f.seq, f.spool_base_seq) {
                Admission::Apply { lost } => {
                    self.core.apply_frame(
                        &f.signal,
                        f.seq,
                        f.start_ns,
                        f.sample_period_ns,
                        &f.samples,
                        lost,
                    );
                    lost_total += lost;
                    NodeMetrics::add(&self.ctx.metrics.samples_in, f.samples.len() as u64);
                    self.recent.record(
                        self.core.kind,
                        &f.signal,
                        f.start_ns,
                        f.sample_period_ns,
                        &f.samples,
                    );
                    if self.ctx.twin_config.analysis {
                        // Built on the first frame: an idle twin holds no window buffers.
                        let analyzer = self
                            .analyzer
                            .get_or_insert_with(|| Analyzer::new(&self.core.chain));
                        if analyzer.wants(&f.signal) {
                            let block = chain::Block {
                                start_ns: f.start_ns,
                                period_ns: f.sample_period_ns,
                                samples: f.samples.clone(),
                            };
                            jobs.extend(analyzer.push(&f.signal, block));
                        }
                    }
                    stored.push(StoredFrame::from(f));
                }
                Admission::Duplicate => {
                    // Already applied to the state; a replay after a move still fills this
                    // node's history (same key: storing it again changes nothing).
                    NodeMetrics::add(&self.ctx.metrics.frames_duplicate, 1);
                    stored.push(StoredFrame::from(f));
                }
                Admission::Gap { .. } => {
                    NodeMetrics::add(&self.ctx.metrics.frames_gap, 1);
                }
                Admission::Refused { expected } => {
                    NodeMetrics::add(&self.ctx.metrics.messages_malformed, 1);
                    tracing::warn!(twin = %self.core.id, signal = f.signal, seq = f.seq, expected, "refused a frame whose seq jumps beyond what its gateway can have sent");
                }
            }
        }
        if !stored.is_empty() {
            self.ctx.store.append_frames(&self.core.id, &stored)?;
            self.persist()?;
        }
        let acks = touched
            .into_iter()
            .map(|s| {
                let seq = self.core.last_seq(&s);
                (s, seq)
            })
            .collect();
        for job in &mut jobs {
            let reported = self
                .core
                .reported
                .iter()
                .map(|(k, r)| (k.as_str(), r.value));
            self.recent.fill(job, reported);
        }
        Ok(Applied {
            watermarks: acks,
            lost: lost_total,
            jobs,
        })
    }
}

/// A sample on one of the kind's identifier streams: checked, then handed to the actor
/// (which checks it against the policy). Never a frame.
pub(super) fn decode_identifiers(
    ctx: &NodeContext,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    stream: &str,
    sample: &Sample,
) {
    use twinmesh_twins::frame::FrameRejection;
    let mut batch = match sample.decode::<proto::IdentifierBatch>() {
        Ok(b) => b,
        Err(e) => {
            ctx.metrics
                .reject(&sample.key, &FrameRejection::Malformed(e.to_string()));
            return;
        }
    };
    if ctx.trust.proven(id.site(), &mut batch).is_none() {
        ctx.metrics.reject(
            &sample.key,
            &FrameRejection::Invalid("no valid proof under the site's control key"),
        );
        return;
    }
    batch.proof = None;
    let bad = if batch.twin_id != id.to_string() || batch.stream != stream {
        Some("identifier batch for another twin or stream than its key")
    } else if batch.records.is_empty() || batch.records.len() > MAX_IDENTIFIER_RECORDS {
        Some("identifier batch with no records, or too many")
    } else if batch.records.iter().any(|r| {
        r.identifier.is_empty()
            || r.identifier.len() > MAX_IDENTIFIER_LEN
            || r.identifier.chars().any(|c| c.is_control() || c == ',')
    }) {
        Some("identifier empty, too long or with control characters or commas")
    } else {
        None
    };
    match bad {
        Some(why) => ctx
            .metrics
            .reject(&sample.key, &FrameRejection::Invalid(why)),
        None => {
            let _ = actor.cast(TwinMsg::Identifiers(batch));
        }
    }
}

/// Decodes and validates one telemetry sample, counting and logging what it drops.
fn decode_frame(
    ctx: &NodeContext,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    kind: AssetKind,
    sample: &Sample,
) -> Option<TelemetryFrame> {
    use twinmesh_twins::frame::FrameRejection;
    NodeMetrics::add(&ctx.metrics.frames_in, 1);
    let limit = ctx.twin_config.max_frame_bytes;
    let rejected = |why: FrameRejection| {
        ctx.metrics.reject(&sample.key, &why);
        None
    };
    if sample.payload.len() > limit {
        return rejected(FrameRejection::Oversized {
            bytes: sample.payload.len(),
            limit,
        });
    }
    let Some((_, _, key_signal)) = keys::parse_telemetry(&sample.key) else {
        return rejected(FrameRejection::Invalid("not a telemetry key"));
    };
    if kind.schema().identifier(key_signal).is_some() {
        decode_identifiers(ctx, actor, id, key_signal, sample);
        return None;
    }
    let mut f = match sample.decode::<TelemetryFrame>() {
        Ok(f) => f,
        Err(e) => return rejected(FrameRejection::Malformed(e.to_string())),
    };
    // Only the site's gateways (and nodes) hold its control key.
    if ctx.trust.proven(id.site(), &mut f).is_none() {
        return rejected(FrameRejection::Invalid(
            "no valid proof under the site's control key",
        ));
    }
    f.proof = None;
    if !f.sealed.is_empty() {
        // A protected signal: its samples travel sealed with the site key.
        let Some(ring) = ctx.site_key.as_ref() else {
            return rejected(FrameRejection::Invalid(
                "sealed frame, and this node has no site key",
            ));
        };
        let plain = match ring.open(&frame::seal_context(&f), &f.sealed) {
            Ok(p) => p,
            Err(_) => return rejected(FrameRejection::Invalid("sealed frame does not open")),
        };
        match proto::SealedSamples::decode(plain.as_slice()) {
            Ok(inner) => {
                f.samples = inner.samples;
                f.packed = inner.packed;
                f.sealed.clear();
            }
            Err(e) => return rejected(FrameRejection::Malformed(e.to_string())),
        }
    }
    if let Err(why) = frame::unpack(&mut f, ctx.twin_config.max_frame_samples) {
        return rejected(why);
    }
    match frame::validate(&f, &sample.key, id, key_signal, kind) {
        Ok(()) => Some(f),
        Err(why) => rejected(why),
    }
}

/// Decodes `first` and whatever else is already queued (up to the batch size) into one
/// batch; counts frames the channel dropped.
pub(super) fn collect_batch(
    ctx: &NodeContext,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    kind: AssetKind,
    first: Sample,
    rx: &flume::Receiver<Sample>,
    dropped: &std::sync::atomic::AtomicU64,
) -> (Vec<TelemetryFrame>, Vec<bytes::Bytes>) {
    let batch_max = ctx.twin_config.ingest_batch;
    // The publishers' trace contexts (when traces are on), to link the ingest to.
    let mut links: Vec<bytes::Bytes> = Vec::new();
    let mut keep_link = |s: &Sample| {
        if links.len() < MAX_TRACE_LINKS {
            links.extend(s.attachment.clone());
        }
    };
    keep_link(&first);
    // A batch holds at most this many samples in memory (frames beyond wait in the
    // channel for the next batch).
    let samples_max = ctx.twin_config.max_batch_samples;
    let mut batch: Vec<TelemetryFrame> = Vec::new();
    batch.extend(decode_frame(ctx, actor, id, kind, &first));
    let mut samples: usize = batch.iter().map(|f| f.samples.len()).sum();
    while batch.len() < batch_max && samples < samples_max {
        match rx.try_recv() {
            Ok(s) => {
                if let Some(f) = decode_frame(ctx, actor, id, kind, &s) {
                    samples += f.samples.len();
                    batch.push(f);
                    keep_link(&s);
                }
            }
            Err(_) => break,
        }
    }
    let overflow = dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
    if overflow > 0 {
        NodeMetrics::add(&ctx.metrics.frames_overflow, overflow);
    }
    (batch, links)
}

/// Publishes of frames an ingest span links to at most.
const MAX_TRACE_LINKS: usize = 16;

/// Hands a batch to the actor, waits for the flush that covers it, then publishes the
/// watermarks. False when the actor is gone (its supervisor restarts it with new
/// routes; the gateway re-sends what was not acknowledged).
pub(super) async fn deliver_batch(
    actor: ActorRef<TwinMsg>,
    ctx: Arc<NodeContext>,
    id: TwinId,
    batch: Vec<TelemetryFrame>,
    links: Vec<bytes::Bytes>,
) -> bool {
    use tracing::Instrument;
    let span = tracing::debug_span!("twin.ingest", twin = %id, frames = batch.len());
    for l in &links {
        crate::trace::link(&span, Some(l));
    }
    deliver(actor, ctx, id, batch).instrument(span).await
}

async fn deliver(
    actor: ActorRef<TwinMsg>,
    ctx: Arc<NodeContext>,
    id: TwinId,
    batch: Vec<TelemetryFrame>,
) -> bool {
    use tracing::Instrument;
    let taken = std::time::Instant::now();
    let acks = match actor
        .call(
            |tx| TwinMsg::Ingest(batch, tx),
            Some(ctx.twin_config.call_timeout),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(acks)) => acks,
        _ => return false,
    };
    if let Err(e) = ctx
        .store
        .flush()
        .instrument(tracing::debug_span!("twin.flush"))
        .await
    {
        tracing::error!(twin = %id, "flush failed, frames stay unacknowledged: {e}");
        return true;
    }
    let ack = tracing::debug_span!("twin.ack", watermarks = acks.watermarks.len());
    async {
        for (signal, seq) in acks.watermarks {
            let mut wm = Watermark {
                twin_id: id.to_string(),
                signal,
                seq,
                epoch: acks.epoch,
                proof: None,
            };
            // The gateway truncates its spool only on a proven watermark.
            ctx.trust.prove(id.site(), &mut wm);
            if let Err(e) = ctx.fabric.put(&keys::acks(&id), &wm, Qos::Reliable).await {
                tracing::warn!(twin = %id, "ack not published: {e}");
            }
        }
    }
    .instrument(ack)
    .await;
    ctx.metrics
        .latency
        .ingest_ack
        .observe(taken.elapsed().as_secs_f64());
    true
}
