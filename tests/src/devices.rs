//! Counterpart processes of the device tests: a mosquitto broker, a Modbus TCP server
//! (pymodbus) and an OPC UA server (asyncua), each started on a free 127.0.0.1 port,
//! and a gateway configured with `[[devices]]` tables.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{key_args, site_key, Mesh, NodeProc};

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Waits until something accepts TCP connections on `port` (bounded).
fn wait_listening(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{what} exited before listening on {port}: {status}");
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what} did not listen on {port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `mosquitto` on the PATH, else where Debian puts it (`/usr/sbin`, often not on a
/// user's PATH).
fn mosquitto_bin() -> std::path::PathBuf {
    let sbin = std::path::Path::new("/usr/sbin/mosquitto");
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("mosquitto").is_file()));
    if !on_path && sbin.is_file() {
        sbin.to_owned()
    } else {
        "mosquitto".into()
    }
}

/// A mosquitto broker (`mosquitto -c FILE`, no system service) with persistence, so
/// sessions and their queued QoS 1 messages survive a restart.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> anyhow::Result<Mosquitto> {
        std::fs::create_dir_all(dir)?;
        let mut m = Mosquitto {
            port: free_port(),
            dir: dir.to_owned(),
            child: None,
        };
        m.restart()?;
        Ok(m)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the broker on the same port with the same persistence file.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {dir}/\nmax_queued_messages 100000\n\
                 max_inflight_messages 100\nuser root\nlog_dest file {dir}/mosquitto.log\n\
                 log_type all\n",
                port = self.port,
                dir = self.dir.display()
            ),
        )?;
        let mut child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("cannot run mosquitto (apt-get install mosquitto): {e}")
            })?;
        wait_listening(self.port, "mosquitto", &mut child)?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM (the broker saves its sessions) and waits for the exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child)?;
        }
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn terminate(child: &mut Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("process {} did not stop within 10 s", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A Python server script of `tests/devices/` on a port, its stdout lines in `lines`.
pub struct PyServer {
    pub port: u16,
    pub lines: mpsc::Receiver<String>,
    script: PathBuf,
    child: Option<Child>,
}

impl PyServer {
    /// `python3 tests/devices/SCRIPT PORT`, waiting for its `ready` line.
    pub fn start(script: &str, port: u16) -> anyhow::Result<PyServer> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("devices")
            .join(script);
        let (tx, lines) = mpsc::channel();
        let mut s = PyServer {
            port,
            lines,
            script,
            child: None,
        };
        s.spawn(tx)?;
        Ok(s)
    }

    fn spawn(&mut self, tx: mpsc::Sender<String>) -> anyhow::Result<()> {
        let mut child = Command::new("python3")
            .arg(&self.script)
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run python3: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else if tx.send(line).is_err() {
                    return;
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            anyhow::bail!(
                "{} did not become ready (pip install pymodbus asyncua?): {err}",
                self.script.display()
            );
        }
        wait_listening(self.port, "server", &mut child)?;
        self.child = Some(child);
        Ok(())
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child)?;
        }
        Ok(())
    }

    /// Starts the script again on the same port (new output goes to `lines`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let (tx, lines) = mpsc::channel();
        self.lines = lines;
        self.spawn(tx)
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts gateway `iot-a` of site-a attached to `mesh`, configured by a TOML file with
/// the node's settings followed by `devices` (`[[devices]]` tables).
pub fn start_gateway(mesh: &Mesh, devices: &str) -> anyhow::Result<NodeProc> {
    let dir = mesh.dir.path();
    let keys = dir.join("keys");
    key_args(&keys, "iot", Some("site-a"))?;
    let site_key = site_key(dir, "site-a")?;
    let data = dir.join("iot-a");
    let toml = format!(
        "id = \"iot-a\"\ntier = \"iot\"\nsite = \"site-a\"\nlisten = [\"tcp/127.0.0.1:0\"]\n\
         connect = [{edge:?}, {cloud:?}]\ndata = {data:?}\nhttp = \"127.0.0.1:0\"\n\
         lease_ms = 1000\nsite_key_file = {site_key:?}\ncontrol_keys_dir = {keys:?}\n\n{devices}",
        edge = mesh.edge.ready.zenoh[0],
        cloud = mesh.cloud.ready.zenoh[0],
        data = data.display().to_string(),
        keys = keys.display().to_string(),
    );
    let path = dir.join("iot-a.toml");
    std::fs::write(&path, toml)?;
    NodeProc::start(
        &["--config".to_owned(), path.display().to_string()],
        &mesh.logs(),
        "iot-a",
    )
}

/// The node's `/metrics` text.
pub fn metrics(http: SocketAddr) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&http, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Values the node's device adapters refused for `reason`, from its `/metrics`.
pub fn refused(metrics: &str, reason: &str) -> u64 {
    // Labels in any order (the node's own labels come along).
    let label = format!("reason=\"{reason}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("twinmesh_device_values_rejected_total{"))
        .filter(|l| {
            l.split_once('{')
                .and_then(|(_, rest)| rest.split_once('}'))
                .is_some_and(|(labels, _)| labels.split(',').any(|x| x == label))
        })
        .find_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
        .unwrap_or(0)
}
