//! Shared by the tests that drive `snapvol serve` from the outside: the server as a child
//! process, the CLI against it, and the outside tools the tests use when installed.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};

/// `snapvol nbd` serving a pool file on a Unix socket.
pub struct Server {
    pub child: Child,
    pub socket: std::path::PathBuf,
}

impl Server {
    pub fn start(pool: &Path, socket: &Path) -> Server {
        Server::start_with(pool, socket, &[])
    }

    /// [`Server::start`] with more arguments for `snapvol serve`.
    pub fn start_with(pool: &Path, socket: &Path, more: &[&str]) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_snapvol"))
            .args([
                "nbd",
                pool.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
            ])
            .args(more)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if UnixStream::connect(socket).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Server {
            child,
            socket: socket.to_path_buf(),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGKILL: nothing gets a chance to commit.
    pub fn kill(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        // Also on a failed assertion, so no server outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first of `tools` that is not installed, if any: a test that needs it says SKIPPED.
pub fn missing(tools: &[&str]) -> Option<String> {
    tools
        .iter()
        .find(|t| {
            Command::new(t)
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_err()
        })
        .map(|t| t.to_string())
}

pub fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `snapvol` run as a user would (in `cwd`, if given), returning (status, stdout bytes,
/// stderr).
pub fn snapvol_raw(args: &[&str], cwd: Option<&Path>) -> (i32, Vec<u8>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_snapvol"));
    c.args(args)
        .env_remove("SNAPVOL_POOL")
        .env_remove("SNAPVOL_CONTROL");
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`snapvol_raw`] with text output.
pub fn snapvol_cli(args: &[&str]) -> (i32, String, String) {
    let (code, out, err) = snapvol_raw(args, None);
    (code, String::from_utf8_lossy(&out).into_owned(), err)
}
