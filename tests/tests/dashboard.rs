//! End-to-end test of the dashboard (issue 22) in a real headless Chromium, driven over
//! WebDriver (Debian's `chromium` and `chromium-driver`, started by the test): the twin
//! view's live chart moves without a reload, off the site the page says what it withholds
//! and why, an action works for an allowed role and shows the gRPC refusal for a viewer,
//! a model deployed from the page raises an alarm that the alarms list shows once the
//! simulated fault starts, and a screenshot is written for the README.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

use twinmesh_proto::v1::model_service_client::ModelServiceClient;
use twinmesh_proto::v1::{
    GetTwinRequest, QueryHistoryRequest, SetDesiredRequest, TrainModelRequest,
};
use twinmesh_tests::{eventually, now_ns, twin_client, Mesh};

const WAIT: Duration = Duration::from_secs(90);
const ID: &str = "site-a/pm-01";
const SECRET: &[u8] = b"dashboard test secret, 32 bytes or more";
/// The simulated fault starts this long after the mesh: time for 40 healthy windows.
const FAULT_AFTER_S: i64 = 60;
const TRAIN_WINDOWS: u64 = 40;

fn token(role: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": format!("{role}-user"), "exp": exp, "roles": [role]}),
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// `chromedriver` on a free loopback port, in a process group of its own that is killed
/// when dropped: the Chromium processes it starts go with it even when a test fails
/// before closing its session.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(logs: &std::path::Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(logs.join("chromedriver.log")).unwrap();
        let child = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) is installed");
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid; a negative pid names the whole group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session through `driver`.
async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,2200"],
        }),
    );
    let url = format!("http://127.0.0.1:{}", driver.port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ClientBuilder::native()
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => return c,
            // The driver is not listening yet: again shortly, until the deadline.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no WebDriver session: {e}"),
        }
    }
}

/// Runs `script` in the page and returns its result as text.
async fn js(c: &Client, script: &str) -> String {
    match c.execute(script, vec![]).await.unwrap() {
        serde_json::Value::String(s) => s,
        v => v.to_string(),
    }
}

/// Polls the page until `script` returns a non-empty string other than "false".
async fn until(c: &Client, within: Duration, what: &str, script: &str) -> String {
    let deadline = Instant::now() + within;
    loop {
        let v = js(c, script).await;
        if !v.is_empty() && v != "false" && v != "null" {
            return v;
        }
        if Instant::now() > deadline {
            let shot = c.screenshot().await.unwrap_or_default();
            let path = std::env::temp_dir().join("twinmesh-dashboard-failure.png");
            let _ = std::fs::write(&path, shot);
            panic!(
                "timed out after {within:?} waiting for {what} (screenshot: {})",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens the dashboard with `token` and selects the meter's twin view.
async fn open_twin(c: &Client, http: &str, token: &str) {
    // A new page load (a change of the fragment alone would not load the page again).
    c.goto("about:blank").await.unwrap();
    c.goto(&format!("http://{http}/#token={token}"))
        .await
        .unwrap();
    let link = format!("#twin-list a[data-twin='{ID}']");
    until(
        c,
        WAIT,
        "the meter in the twin list",
        &format!("return !!document.querySelector(\"{link}\")"),
    )
    .await;
    // Clicked from the page's own script: the list is re-rendered as placements arrive,
    // so an element the driver found may be replaced before its click lands.
    js(
        c,
        &format!("document.querySelector(\"{link}\").click(); return 'ok'"),
    )
    .await;
    until(
        c,
        WAIT,
        "the set-points from the Thing Description",
        "return document.querySelectorAll('#desired-property option').length > 0",
    )
    .await;
}

async fn set_from_page(c: &Client, property: &str, value: &str) -> String {
    c.find(Locator::Id("desired-property"))
        .await
        .unwrap()
        .select_by_value(property)
        .await
        .unwrap();
    let input = c.find(Locator::Id("desired-value")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(value).await.unwrap();
    c.find(Locator::Css("#desired-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        c,
        WAIT,
        "the action's outcome",
        "const t = document.getElementById('action-result').textContent; \
         return /: done|refused/.test(t) ? t : ''",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_live_gated_acts_by_role_and_lists_alarms() {
    twinmesh_tests::twinmesh_bin();
    let fault_ns = (now_ns() / 1_000_000_000 + FAULT_AFTER_S) * 1_000_000_000;
    let fault = format!("pm-01=harmonic_distortion@{}", fault_ns / 1_000_000_000);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let secret = secret.display().to_string();
    let mesh = Mesh::start_all(
        Some("power_meter:1"),
        &["--http", "127.0.0.1:0", "--auth-hs256-secret", &secret],
        &[],
        &["--fault", &fault],
    )
    .expect("mesh starts");
    let http = mesh
        .cloud
        .ready
        .http
        .expect("the cloud serves HTTP")
        .to_string();
    let cloud = mesh.cloud.grpc_endpoint();
    let t0 = now_ns();
    let (manager, viewer) = (token("data_manager"), token("viewer"));

    let driver = Driver::start(&mesh.logs());
    let c = browser(&driver).await;
    open_twin(&c, &http, &manager).await;

    // Live: the signal chart gets new points within 2 s, without a reload.
    let points = |c: &Client| {
        let c = c.clone();
        async move {
            js(
                &c,
                "return document.getElementById('chart-live').dataset.points",
            )
            .await
            .parse::<u64>()
            .unwrap_or(0)
        }
    };
    until(
        &c,
        WAIT,
        "a first live point",
        "return Number(document.getElementById('chart-live').dataset.points) > 0",
    )
    .await;
    let before = points(&c).await;
    let marker = js(&c, "window.__same_page = 42; return 'set'").await;
    assert_eq!(marker, "set");
    until(
        &c,
        Duration::from_secs(2),
        "new live points within 2 s",
        &format!("return Number(document.getElementById('chart-live').dataset.points) > {before}"),
    )
    .await;
    assert_eq!(
        js(&c, "return String(window.__same_page)").await,
        "42",
        "the page was reloaded"
    );
    // The cloud is off the meter's site: the personal signal is withheld, and said so.
    let withheld = until(
        &c,
        WAIT,
        "the withheld notice",
        "const w = document.getElementById('withheld'); return w.hidden ? '' : w.textContent",
    )
    .await;
    assert!(withheld.contains("household_energy"), "{withheld}");
    assert!(withheld.contains("privacy policy"), "{withheld}");
    let reported = js(&c, "return document.getElementById('reported').textContent").await;
    assert!(reported.contains("voltage"), "{reported}");
    assert!(!reported.contains("household_energy"), "{reported}");

    // An action a data manager may take: the set-point reaches the twin.
    let outcome = set_from_page(&c, "demand_limit", "42.5").await;
    assert!(outcome.contains("done"), "{outcome}");
    let t = twin_client(&cloud)
        .await
        .get_twin(with_token(GetTwinRequest { twin_id: ID.into() }, &manager))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.desired["demand_limit"].value, 42.5, "{:?}", t.desired);

    // A viewer: refused, with the message gRPC gives for the same call.
    let grpc_refusal = twin_client(&cloud)
        .await
        .set_desired(with_token(
            SetDesiredRequest {
                twin_id: ID.into(),
                property: "demand_limit".into(),
                value: 7.0,
                expected_revision: None,
            },
            &viewer,
        ))
        .await
        .unwrap_err();
    assert_eq!(grpc_refusal.code(), tonic::Code::PermissionDenied);
    open_twin(&c, &http, &viewer).await;
    let outcome = set_from_page(&c, "demand_limit", "7").await;
    assert!(outcome.contains("refused"), "{outcome}");
    assert!(
        outcome.contains(grpc_refusal.message()),
        "page: {outcome}; gRPC: {}",
        grpc_refusal.message()
    );

    // Train on the healthy windows before the fault (gRPC), deploy from the page.
    eventually(WAIT, "training windows archived", || async {
        let r = twin_client(&cloud)
            .await
            .query_history(with_token(
                QueryHistoryRequest {
                    twin_id: ID.into(),
                    signal: "voltage.thd".into(),
                    start_ns: t0 - 60_000_000_000,
                    end_ns: now_ns(),
                    bucket_ns: 3_600_000_000_000,
                    aggregation: 5, // count
                },
                &manager,
            ))
            .await
            .ok()?
            .into_inner();
        let n: u64 = r.buckets.iter().map(|b| b.count).sum();
        (n >= TRAIN_WINDOWS).then_some(n)
    })
    .await;
    let train_end = now_ns() - 2_000_000_000;
    assert!(train_end < fault_ns, "training must end before the fault");
    let mut progress = ModelServiceClient::connect(cloud.clone())
        .await
        .unwrap()
        .train_model(with_token(
            TrainModelRequest {
                twin_ids: vec![ID.into()],
                start_ns: t0 - 60_000_000_000,
                end_ns: train_end,
                ..Default::default()
            },
            &manager,
        ))
        .await
        .expect("training starts")
        .into_inner();
    let mut model = None;
    while let Some(p) = progress.message().await.expect("training progresses") {
        model = p.model.or(model);
    }
    let model = model.expect("a trained model");
    open_twin(&c, &http, &manager).await;
    c.find(Locator::Id("deploy-model"))
        .await
        .unwrap()
        .send_keys(&model.model_id)
        .await
        .unwrap();
    c.find(Locator::Css("#deploy-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let outcome = until(
        &c,
        WAIT,
        "the deployment's outcome",
        "const t = document.getElementById('action-result').textContent; \
         return /: done|refused/.test(t) ? t : ''",
    )
    .await;
    assert!(outcome.contains("done"), "{outcome}");

    // The fault: an alarm of the meter appears in the live alarms list. An alarm is raised
    // on the way into `alarm` only, so one raised before the fault (a model trained on 40
    // windows may see one) and still holding while the fault is on counts too, as in the
    // models test: the list then shows that alarm, and the twin is in alarm during the
    // fault.
    let alarms_since = |since_ns: i64| {
        format!(
            "const a = [...document.querySelectorAll('#events li.alarm')]\
             .find(li => li.textContent.includes('{ID}') && Number(li.dataset.ns) >= {since_ns}); \
             return a ? a.textContent : ''"
        )
    };
    let deadline = Instant::now() + Duration::from_secs(FAULT_AFTER_S as u64 + 90);
    let alarm = loop {
        let after = js(&c, &alarms_since(fault_ns)).await;
        if !after.is_empty() {
            break after;
        }
        if now_ns() > fault_ns + 5_000_000_000 {
            let earlier = js(&c, &alarms_since(0)).await;
            let t = twin_client(&cloud)
                .await
                .get_twin(with_token(GetTwinRequest { twin_id: ID.into() }, &manager))
                .await
                .unwrap()
                .into_inner();
            if !earlier.is_empty() && t.health.is_some_and(|h| h.status == "alarm") {
                break earlier;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no alarm of the meter in the alarms list"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(alarm.contains("anomaly score"), "{alarm}");

    // History with server-side buckets, for the screenshot too.
    c.find(Locator::Id("history-signal"))
        .await
        .unwrap()
        .select_by_value("voltage")
        .await
        .unwrap();
    c.find(Locator::Id("history-bucket"))
        .await
        .unwrap()
        .select_by_value("10")
        .await
        .unwrap();
    c.find(Locator::Css("#history-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let note = until(
        &c,
        WAIT,
        "the history chart",
        "return document.getElementById('history-note').textContent",
    )
    .await;
    let buckets: u64 = note
        .strip_suffix(" buckets")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("history: {note}"));
    assert!(buckets >= 3, "{note}");

    // The README's screenshot.
    let shot = c.screenshot().await.unwrap();
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::env::var_os("TWINMESH_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("twinmesh-dashboard.png"));
    std::fs::write(&path, &shot).unwrap();
    eprintln!("dashboard screenshot: {}", path.display());
    c.close().await.unwrap();
}
