//! End-to-end tests of what operators watch (issue 22): every node's `/metrics` passes
//! `promtool check metrics` (Debian's `prometheus` package, which `.ci/run` installs),
//! carries the node's labels, and its latency histograms have observations after traffic:
//! acknowledgements and window analyses on the edges, twin calls and a migration on the
//! cloud.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use twinmesh_tests::{eventually, get_placement, get_twin, migrate_twin, Cluster};

const WAIT: Duration = Duration::from_secs(60);
const ID: &str = "site-a/pm-01";
/// Bytes of a `/metrics` answer read at most.
const MAX_BODY: u64 = 4 << 20;

/// The body of `GET http://{addr}{path}` (HTTP/1.1, no TLS).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.take(MAX_BODY).read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// `promtool check metrics` on `text`: its complaints, empty when it passes.
fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        String::new()
    } else {
        format!("promtool failed ({}): {said}", out.status)
    }
}

/// The value of the sample `name` (any labels) in `text`, summed over its series.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nodes_metrics_pass_promtool_and_the_histograms_fill_with_traffic() {
    let mut c = Cluster::new(1000).unwrap();
    let http = ["--http", "127.0.0.1:0"];
    c.start("cloud", "cloud", None, None, &http).unwrap();
    for edge in ["edge-a1", "edge-a2"] {
        c.start("edge", edge, Some("site-a"), None, &http).unwrap();
    }
    c.start(
        "iot",
        "iot-a",
        Some("site-a"),
        None,
        &["--simulate", "power_meter:1", "--http", "127.0.0.1:0"],
    )
    .unwrap();
    let cloud = c.node("cloud").grpc_endpoint();
    // Twin calls through the cloud, until the twin has windows behind it.
    eventually(WAIT, "the meter's features", || async {
        let t = get_twin(&cloud, ID).await.ok()?;
        t.derived.contains_key("voltage.thd").then_some(())
    })
    .await;
    // A migration run by the authority on the cloud.
    let from = get_placement(&cloud, ID).await.unwrap().node;
    let to = if from == "edge-a1" {
        "edge-a2"
    } else {
        "edge-a1"
    };
    migrate_twin(&cloud, ID, to).await.unwrap();
    eventually(WAIT, "the twin on its new edge, analysing", || async {
        let t = get_twin(&cloud, ID).await.ok()?;
        (t.placement?.node == to).then_some(())
    })
    .await;

    let scrape = |node: &str| {
        let addr = c.node(node).ready.http.expect("the node serves HTTP");
        async move { http_get(addr, "/metrics").await }
    };
    // The new host acknowledges and analyses.
    let edge_text = eventually(
        WAIT,
        "acknowledgements and analyses on the new host",
        || async {
            let t = scrape(to).await;
            (sample(&t, "twinmesh_ingest_ack_seconds_count") > 0.0
                && sample(&t, "twinmesh_window_analysis_seconds_count") > 0.0)
                .then_some(t)
        },
    )
    .await;
    assert!(sample(&edge_text, "twinmesh_frames_in_total") > 0.0);
    assert!(
        edge_text.contains(&format!("node=\"{to}\""))
            && edge_text.contains("site=\"site-a\"")
            && edge_text.contains("tier=\"edge\""),
        "{edge_text}"
    );
    let cloud_text = scrape("cloud").await;
    assert!(
        sample(&cloud_text, "twinmesh_rpc_seconds_count") >= 2.0,
        "{cloud_text}"
    );
    assert!(
        sample(&cloud_text, "twinmesh_migration_seconds_count") >= 1.0,
        "{cloud_text}"
    );
    assert!(
        sample(&cloud_text, "twinmesh_migration_seconds_sum") > 0.0,
        "{cloud_text}"
    );
    // Every node's exposition passes promtool.
    for node in ["cloud", "edge-a1", "edge-a2", "iot-a"] {
        let text = scrape(node).await;
        assert!(
            text.contains("# TYPE twinmesh_frames_in_total counter"),
            "{node}: {text}"
        );
        assert!(
            text.contains("# TYPE twinmesh_rpc_seconds histogram"),
            "{node}: {text}"
        );
        let complaints = promtool(&text);
        assert!(complaints.is_empty(), "{node}: {complaints}\n{text}");
    }
    let gateway = scrape("iot-a").await;
    assert!(
        sample(&gateway, "twinmesh_published_total") > 0.0,
        "{gateway}"
    );

    // Every metric the provisioned Grafana dashboard queries exists.
    let mut exposed = std::collections::BTreeSet::new();
    for node in ["cloud", "edge-a1", "edge-a2", "iot-a"] {
        for line in scrape(node).await.lines() {
            if let Some(family) = line.strip_prefix("# TYPE ") {
                exposed.extend(family.split(' ').next().map(str::to_owned));
            }
        }
    }
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/grafana/dashboards/twinmesh.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let mut rest = target["expr"].as_str().unwrap();
            while let Some(i) = rest.find("twinmesh_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.push(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    // The site ledgers exist once a site made a set release (none here).
    const AFTER_A_RELEASE: [&str; 2] =
        ["twinmesh_site_epsilon_spent", "twinmesh_site_epsilon_total"];
    for name in queried {
        let family = name.strip_suffix("_bucket").unwrap_or(&name);
        if AFTER_A_RELEASE.contains(&family) {
            continue;
        }
        assert!(
            exposed.contains(family),
            "the dashboard queries {name}, which no node exposes ({exposed:?})"
        );
    }
}

mod otlp {
    //! An OTLP/gRPC trace receiver in the test process, built from the OpenTelemetry
    //! protos: it keeps every span with the `service.name` of its resource.

    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::Span;

    pub type Spans = Arc<Mutex<Vec<(String, Span)>>>;

    #[derive(Clone, Default)]
    struct Receiver(Spans);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.0.lock().unwrap();
            for rs in request.into_inner().resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|a| a.key == "service.name")
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// Starts the receiver on a loopback port: its endpoint and what it received.
    pub async fn start() -> (String, Spans) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Spans::default();
        let service = TraceServiceServer::new(Receiver(spans.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{addr}"), spans)
    }
}

/// One `GetTwin` through the cloud is one trace across the cloud and the edge, the
/// edge's span a child of the cloud's; a frame's publish on the gateway is linked from
/// the edge's ingest of it. The spans reach a real OTLP/gRPC receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_one_trace_across_tiers_and_ingests_link_to_their_publishes() {
    let (endpoint, spans) = otlp::start().await;
    let trace = [
        "--otlp-endpoint",
        endpoint.as_str(),
        "--trace-ingest-ratio",
        "1",
    ];
    let mesh = twinmesh_tests::Mesh::start_all(Some("power_meter:1"), &trace, &trace, &trace)
        .expect("mesh starts");
    let cloud = mesh.cloud.grpc_endpoint();
    eventually(WAIT, "the meter through the cloud", || async {
        let t = get_twin(&cloud, ID).await.ok()?;
        t.reported.contains_key("voltage").then_some(())
    })
    .await;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // A call of the cloud whose span on the edge is its child, in the same trace.
    let (call, child) = eventually(WAIT, "a twin call traced across cloud and edge", || async {
        get_twin(&cloud, ID).await.ok()?;
        let spans = spans.lock().unwrap();
        let cloud_spans: Vec<_> = spans
            .iter()
            .filter(|(svc, _)| svc == "twinmesh-cloud")
            .map(|(_, s)| s)
            .collect();
        let edge_child = spans.iter().find_map(|(svc, s)| {
            if svc != "twinmesh-edge-a" || !s.name.starts_with("twin.rpc") {
                return None;
            }
            let parent = cloud_spans
                .iter()
                .find(|c| c.span_id == s.parent_span_id && c.trace_id == s.trace_id)?;
            Some(((*parent).clone(), s.clone()))
        });
        edge_child
    })
    .await;
    assert_eq!(call.trace_id, child.trace_id);
    assert_eq!(
        call.name, "zenoh.query",
        "the edge's span is a child of the query"
    );
    {
        let spans = spans.lock().unwrap();
        // The query's own parent is the cloud's call, in the same trace.
        let root = spans
            .iter()
            .find(|(svc, s)| svc == "twinmesh-cloud" && s.span_id == call.parent_span_id)
            .map(|(_, s)| s.clone())
            .expect("the cloud's call span");
        assert_eq!(root.name, "grpc.twin_call");
        assert_eq!(
            root.trace_id,
            call.trace_id,
            "trace {}",
            hex(&call.trace_id)
        );
    }
    // A frame: the edge's ingest links to the gateway's publish of it.
    eventually(WAIT, "an ingest linked to a gateway's publish", || async {
        let spans = spans.lock().unwrap();
        let publishes: Vec<_> = spans
            .iter()
            .filter(|(svc, s)| svc == "twinmesh-iot-a" && s.name == "gateway.publish")
            .map(|(_, s)| (s.trace_id.clone(), s.span_id.clone()))
            .collect();
        spans
            .iter()
            .filter(|(svc, s)| svc == "twinmesh-edge-a" && s.name == "twin.ingest")
            .flat_map(|(_, s)| s.links.iter())
            .any(|l| publishes.contains(&(l.trace_id.clone(), l.span_id.clone())))
            .then_some(())
    })
    .await;
}
