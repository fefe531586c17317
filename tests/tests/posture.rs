//! End-to-end tests of the safe default posture (issue 20, item 4): protected mode
//! (no plaintext listener off loopback without `--insecure`), the HTTP API behind the
//! same bearer tokens as gRPC and over TLS on a node with certificates, roles scoped to
//! sites, and `ctl nodes` under `up --secure` listing the gateways too.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tonic::Code;

use twinmesh_proto::v1::mesh_service_client::MeshServiceClient;
use twinmesh_proto::v1::MigrateTwinRequest;
use twinmesh_tests::{args, run_cli, twinmesh_bin, Cluster, NodeProc};

const WAIT: Duration = Duration::from_secs(90);

/// `twinmesh node` refuses a plaintext listener on a non-loopback address in one line
/// naming the address and `--insecure`, and exits non-zero before it binds anything.
#[test]
fn protected_mode_refuses_plaintext_listeners_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("edge-a").display().to_string();
    let edge = [
        "node", "--tier", "edge", "--id", "edge-a", "--site", "site-a",
    ];
    for (flag, addr, shown) in [
        ("--listen", "tcp/0.0.0.0:7447", "tcp/0.0.0.0:7447"),
        (
            "--grpc",
            "0.0.0.0:0",
            "gRPC on non-loopback address 0.0.0.0:0",
        ),
        ("--http", "[::]:0", "HTTP on non-loopback address [::]:0"),
    ] {
        let mut a = edge.to_vec();
        a.extend([flag, addr, "--data", &data]);
        let (status, stderr) = run_bounded(&a, Duration::from_secs(30));
        let status = status.unwrap_or_else(|| panic!("{flag} {addr}: the node started"));
        assert!(!status.success(), "{flag} {addr} was accepted: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "not one line: {stderr}");
        assert!(
            lines[0].starts_with("error: refusing to serve")
                && lines[0].contains(shown)
                && lines[0].contains("--insecure")
                && lines[0].contains("--tls-ca"),
            "{stderr}"
        );
        assert!(
            !Path::new(&data).exists(),
            "the refused node opened its store"
        );
    }
    // Loopback is always fine; --insecure opens the rest and says so in the log.
    let logs = dir.path().join("logs");
    let mut a = args([
        "--tier", "edge", "--id", "edge-a", "--site", "site-a", "--listen",
    ]);
    a.extend(args([
        "tcp/0.0.0.0:0",
        "--grpc",
        "127.0.0.1:0",
        "--insecure",
    ]));
    a.extend(["--data".to_owned(), data.clone()]);
    let node = NodeProc::start(&a, &logs, "edge-a").unwrap();
    assert!(!node.ready.zenoh.is_empty(), "{:?}", node.ready);
    let log = node.log();
    assert!(
        log.contains("--insecure: plaintext listeners on non-loopback addresses"),
        "{log}"
    );
}

/// Runs `twinmesh ARGS` for at most `bound`: its exit status (`None`: still running,
/// then killed) and its stderr.
fn run_bounded(a: &[&str], bound: Duration) -> (Option<std::process::ExitStatus>, String) {
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(twinmesh_bin())
        .args(a)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err.reopen().unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(err.path()).unwrap())
}

const SECRET: &[u8] = b"an-hs256-secret-of-32-bytes-or-more!";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `role`, scoped to `sites` if given.
fn token(role: &str, sites: Option<&[&str]>) -> String {
    let mut claims = serde_json::json!({"sub": format!("{role}-user"), "exp": now() + 600,
        "roles": [role]});
    if let Some(s) = sites {
        claims["twinmesh_sites"] = serde_json::json!(s);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

/// One `GET path` over `stream` (HTTP/1.1, the connection closed after it): the status
/// code and the body, or what went wrong.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    match read {
        Ok(Ok(_)) => {}
        // A TLS peer that closes without close_notify, after a whole response.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::other("no answer within 10 s")),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// `GET path` over TLS, trusting only the CA in `ca`.
async fn https_get(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await?;
    get(tls, path, token).await
}

/// With `--auth-*`, `/api/*` takes the same tokens and roles as gRPC (401 without or
/// with a bad token, 403 without a twinmesh role, 200 for a viewer), while the page and
/// `/metrics` stay open; on a node with certificates HTTP is HTTPS only. Roles scoped to
/// sites act only on their sites (a migration of another site's twin is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_takes_the_grpc_tokens_and_is_https_on_a_tls_node() {
    let mut c = Cluster::new(1000).unwrap();
    let certs = c.dir.path().join("certs");
    twinmesh_nodes::certs::init_ca(&certs, "test CA", 30).unwrap();
    twinmesh_nodes::certs::issue(&certs, "cloud", &[], 30).unwrap();
    let foreign = c.dir.path().join("foreign");
    twinmesh_nodes::certs::init_ca(&foreign, "another CA", 30).unwrap();
    let secret = c.dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let p = |f: &str| certs.join(f).display().to_string();
    let secret = secret.display().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("cloud.pem"), p("cloud.key"));
    let extra = [
        "--http",
        "127.0.0.1:0",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--auth-hs256-secret",
        &secret,
    ];
    c.start("cloud", "cloud", None, Some("quic/127.0.0.1:0"), &extra)
        .unwrap();
    let http = c.node("cloud").ready.http.expect("http address");
    let ca = certs.join("ca.pem");

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = get(TcpStream::connect(http).await.unwrap(), "/api/twins", None).await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that does not trust the node's CA does not get through either.
    assert!(https_get(http, &foreign.join("ca.pem"), "/metrics", None)
        .await
        .is_err());

    let viewer = token("viewer", None);
    let (status, body) = https_get(http, &ca, "/api/twins", None).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("missing bearer token"), "{body}");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"exp": now() + 600, "roles": ["data_owner"]}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-xxxx").unwrap(),
    )
    .unwrap();
    let (status, body) = https_get(http, &ca, "/api/twins", Some(&forged))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("signature"), "{body}");
    let (status, body) = https_get(http, &ca, "/api/nodes", Some(&token("admin", None)))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let (status, body) = https_get(http, &ca, "/api/twins", Some(&viewer))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let twins: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(twins.get("twins").is_some(), "{body}");
    let (status, body) = https_get(http, &ca, "/api/nodes", Some(&viewer))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"node\":\"cloud\""), "{body}");
    // The twin route takes the token too (no twin here: past auth, not found).
    let (status, _) = https_get(http, &ca, "/api/twins/site-a/wt-01", None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    // The page and the counters stay open.
    let (status, body) = https_get(http, &ca, "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("twinmesh_frames_in_total"), "{body}");
    let (status, body) = https_get(http, &ca, "/", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("<title>twinmesh</title>"));

    // Site-scoped roles over gRPC: a data manager of site-b may not move a twin of
    // site-a; one of site-a gets past the check (to the authority: unknown twin).
    let https = c
        .node("cloud")
        .grpc_endpoint()
        .replace("http://", "https://");
    let channel = twinmesh_nodes::client::connect_tls(&https, Duration::from_secs(10), Some(&ca))
        .await
        .unwrap();
    let migrate = |t: String| {
        let channel = channel.clone();
        async move {
            let mut req = tonic::Request::new(MigrateTwinRequest {
                twin_id: "site-a/wt-01".into(),
                target_node: "edge-a".into(),
                target_tier: String::new(),
                unpin: false,
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
            MeshServiceClient::new(channel)
                .migrate_twin(req)
                .await
                .unwrap_err()
        }
    };
    let e = migrate(token("data_manager", Some(&["site-b"]))).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not on site-a"), "{e:?}");
    let e = migrate(token("data_manager", Some(&["site-a"]))).await;
    assert_ne!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_ne!(e.code(), Code::Unauthenticated, "{e:?}");
}

/// `twinmesh up --secure` (mutual TLS and the generated ACL): `ctl nodes` lists all
/// five nodes, the two gateways included.
#[test]
fn ctl_nodes_lists_the_gateways_under_up_secure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mesh");
    let up = twinmesh_tests::UpProc::start(
        &[
            "--secure",
            "--assets-per-kind",
            "1",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--zenoh",
            "quic/127.0.0.1:0",
        ],
        dir.path(),
    );
    let grpc = &up.cloud_grpc;
    let endpoint = format!("https://{grpc}");
    let ca = data.join("certs").join("ca.pem").display().to_string();
    let deadline = Instant::now() + WAIT;
    let mut last;
    let listed = loop {
        let (status, out, err) = run_cli(&[
            "ctl",
            "--endpoint",
            &endpoint,
            "--ca",
            &ca,
            "--json",
            "nodes",
        ]);
        last = format!("{status}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let mut names: Vec<String> = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["node"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        if names.len() == 5 || Instant::now() > deadline {
            break names;
        }
        // Polling: the gateways join (and announce themselves) after the cloud.
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        listed,
        ["cloud", "edge-a", "edge-b", "iot-a", "iot-b"],
        "last answer: {last}"
    );
}
