//! Traces across tiers (DESIGN §11): the W3C trace context of the current span rides a
//! Zenoh attachment (`traceparent`), so a gRPC call on the cloud and the twin's work on
//! the edge are one trace, and a frame's publish on the gateway and its ingest on the
//! edge are linked. The node daemon installs the OpenTelemetry layer and turns this on
//! ([`enable`]) only when it exports traces: otherwise no context is read or written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ON: AtomicBool = AtomicBool::new(false);

/// The W3C header the attachment carries.
const TRACEPARENT: &str = "traceparent";
/// Longest attachment read as a trace context (a traceparent is 55 bytes).
const MAX_ATTACHMENT: usize = 128;

/// Traces are exported: carry trace contexts on the fabric from now on.
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The trace context of the current span as an attachment (its `traceparent`), when
/// traces are on and the span is sampled.
pub fn attachment() -> Option<Bytes> {
    if !enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT).map(Bytes::from)
}

/// The remote context an attachment carries, if it is a valid `traceparent`.
fn context(attachment: Option<&Bytes>) -> Option<opentelemetry::Context> {
    if !enabled() {
        return None;
    }
    let a = attachment.filter(|a| a.len() <= MAX_ATTACHMENT)?;
    let value = std::str::from_utf8(a).ok()?;
    let carrier: HashMap<String, String> = [(TRACEPARENT.to_owned(), value.to_owned())]
        .into_iter()
        .collect();
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the context `attachment` carries (a call from another node).
pub fn follow(span: &tracing::Span, attachment: Option<&Bytes>) {
    if let Some(cx) = context(attachment) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the context `attachment` carries (a frame published elsewhere that
/// this span processes among others).
pub fn link(span: &tracing::Span, attachment: Option<&Bytes>) {
    if let Some(cx) = context(attachment) {
        span.add_link(cx.span().span_context().clone());
    }
}
