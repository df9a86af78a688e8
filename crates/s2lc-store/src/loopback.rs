//! A real S3-compatible server on loopback for tests: `s3s-fs` (a Rust S3 implementation over a
//! directory) started as a child process, killed on drop. It lets the same test suite run against
//! the local backend and against S3 without mocking either.
//!
//! The binary comes from `$S2LC_S3S_FS` or `PATH` (`cargo install s3s-fs@0.14.1 --locked
//! --features binary`). A bucket is a directory under the server's root, and an object is the file
//! at `root/bucket/key`, so tests can corrupt objects behind the server's back.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, Store, StoreError};

const ACCESS_KEY: &str = "s2lc-test";
const SECRET_KEY: &str = "s2lc-test-secret";
const REGION: &str = "us-east-1";

/// A running `s3s-fs` on `127.0.0.1`, serving the directory [`S3sFs::root`].
#[derive(Debug)]
pub struct S3sFs {
    child: Child,
    root: PathBuf,
    endpoint: String,
}

impl S3sFs {
    /// Starts the server on a free loopback port over `root` (created) and waits until it
    /// accepts connections.
    pub fn start(root: &Path) -> Result<S3sFs> {
        let io = |source| StoreError::Io {
            path: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root).map_err(io)?;
        let bin = std::env::var("S2LC_S3S_FS").unwrap_or_else(|_| "s3s-fs".into());
        // Ask the OS for a free port; the tiny race with another process taking it is harmless
        // here (the start fails loudly).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io)?
            .port();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                StoreError::Invalid(format!(
                    "cannot start '{bin}' ({e}); install it with \
                     `cargo install s3s-fs@0.14.1 --locked --features binary` or set S2LC_S3S_FS"
                ))
            })?;
        let mut server = S3sFs {
            child,
            root: root.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(StoreError::Invalid(format!(
                    "'{bin}' exited at start ({status})"
                )));
            }
            if Instant::now() > deadline {
                return Err(StoreError::Invalid(format!(
                    "'{bin}' did not listen on port {port} within 20 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The directory the server serves (buckets are its subdirectories).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The S3 settings for [`Store::open_with`] (endpoint, credentials, region).
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_access_key_id", ACCESS_KEY.into()),
            ("aws_secret_access_key", SECRET_KEY.into()),
            ("aws_region", REGION.into()),
        ]
    }

    /// The same settings as AWS environment variables, for a child `s2lc` process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
        ]
    }

    /// Creates `bucket` (a directory under the root) and opens the store `s3://bucket/prefix`.
    pub fn store(&self, bucket: &str, prefix: &str) -> Result<Store> {
        let dir = self.root.join(bucket);
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir, source })?;
        let options = self.options();
        let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Store::open_with(&format!("s3://{bucket}/{prefix}"), &options)
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
