//! The `twinmesh` binary as a user's shell runs it. These tests also make
//! `cargo test --workspace` build `target/<profile>/twinmesh`, which the end-to-end
//! tests in `tests/` start.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_twinmesh");

/// Waits for `child` at most `bound`, then kills it.
fn wait_bounded(child: &mut std::process::Child, bound: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            panic!("twinmesh still running after {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `twinmesh bench dsp | head -0`: the reader is gone before the first line. The
/// command ends quietly (SIGPIPE, as `cat` does, or success), never with a panic from
/// `println!` (exit code 101, "failed printing to stdout").
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let mut child = Command::new(BIN)
        .args(["bench", "dsp", "--seconds", "0.02"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start twinmesh");
    drop(child.stdout.take());
    let status = wait_bounded(&mut child, Duration::from_secs(120));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "stderr: {stderr}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success() || status.signal() == Some(libc::SIGPIPE),
            "{status:?}, stderr: {stderr}"
        );
    }
    #[cfg(not(unix))]
    assert!(status.success(), "{status:?}");
}

/// A node keeps SIGPIPE ignored: it must outlive any client that goes away. Its bad
/// configuration is refused with the reason, not a panic.
#[test]
fn a_node_with_a_bad_tier_is_refused_clearly() {
    let out = Command::new(BIN)
        .args(["node", "--tier", "fog", "--id", "n1"])
        .output()
        .expect("run twinmesh");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fog"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}
