//! Logs and traces of a process: the `fmt` log layer always, and, when an OTLP endpoint
//! is given, an OpenTelemetry layer that exports the node's spans over OTLP/gRPC and
//! turns on trace contexts on the fabric ([`twinmesh_actors::trace`]). Without an
//! endpoint no OpenTelemetry code runs: the spans of the hot paths are `debug` spans,
//! which the log filter disables.

use opentelemetry::trace::{Link, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingResult, SdkTracerProvider, ShouldSample};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where and how much to trace.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// Share of ingest traces (root spans in [`INGEST_SPANS`]) sampled.
    pub ingest_ratio: f64,
    /// `service.name` of this process's spans.
    pub service: String,
}

/// Root spans that happen for every frame or window: sampled at the ingest ratio.
pub const INGEST_SPANS: [&str; 5] = [
    "gateway.publish",
    "twin.ingest",
    "twin.analysis",
    "twin.score",
    "twin.rpc.cached",
];

/// The traces of a process; dropping it does not flush: call [`Tracing::shutdown`].
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports what is still buffered (blocking; call from a blocking thread).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: traces not all exported: {e}");
            }
        }
    }
}

/// Samples root spans by name: ingest spans at a ratio, the rest always. Children follow
/// their parent (local or from another node) through [`Sampler::ParentBased`].
#[derive(Debug, Clone)]
struct ByName {
    ingest: Sampler,
}

impl ShouldSample for ByName {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let sampler = if INGEST_SPANS.contains(&name) {
            &self.ingest
        } else {
            &Sampler::AlwaysOn
        };
        sampler.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// Installs the process's subscriber: logs by `RUST_LOG` (else `default_filter`), and
/// traces when `trace` is given. Must run inside the Tokio runtime (the exporter's gRPC
/// channel lives on it).
pub fn init(default_filter: &str, trace: Option<TraceConfig>) -> crate::Result<Tracing> {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()));
    let Some(t) = trace else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Tracing { provider: None });
    };
    if !(0.0..=1.0).contains(&t.ingest_ratio) {
        return Err(crate::Error::Config(format!(
            "--trace-ingest-ratio {} is not between 0 and 1",
            t.ingest_ratio
        )));
    }
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(t.endpoint.clone())
        .build()
        .map_err(|e| crate::Error::Config(format!("OTLP endpoint {}: {e}", t.endpoint)))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(ByName {
            ingest: Sampler::TraceIdRatioBased(t.ingest_ratio),
        })))
        .with_resource(Resource::builder().with_service_name(t.service).build())
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("twinmesh"))
        .with_filter(EnvFilter::new("warn,twinmesh=debug"));
    tracing_subscriber::registry().with(logs).with(spans).init();
    twinmesh_actors::trace::enable();
    Ok(Tracing {
        provider: Some(provider),
    })
}
