//! Helpers of the server's integration tests: start `s2lc serve` on a free port, send requests,
//! read metrics, fill a store with the fixture adapters.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{s2lc, stderr};

/// A fixture adapter directory.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adapters")
        .join(name)
}

/// The server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(args: &[&str]) -> Server {
    start_env(args, &[])
}

/// `s2lc serve` with extra environment variables.
pub fn start_env(args: &[&str], env: &[(&str, String)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_s2lc"))
        .arg("serve")
        .args(["--port", "0"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting s2lc serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("s2lc serve exited before listening: {seen:?}");
        };
        if let Some(a) = line.strip_prefix("listening on http://") {
            break a.to_string();
        }
        seen.push(line);
    };
    // Keep draining stderr so the server never blocks on a full pipe; its lines show in the
    // output of a failing test.
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            eprintln!("server: {l}")
        }
    });
    Server { child, addr }
}

/// One HTTP/1.1 request; returns the status and the body.
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let r = s2lc_serve::client::request(addr, method, path, body).unwrap();
    (r.status, r.body)
}

pub fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, body.to_string().as_bytes());
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

/// `POST /v1/completions` of `request` with the fields of `extra` set over it.
pub fn complete_with(addr: &str, mut request: Value, extra: Value) -> (u16, Value) {
    for (k, v) in extra.as_object().unwrap() {
        request[k] = v.clone();
    }
    post(addr, "/v1/completions", &request)
}

/// A JSON error with `status` whose message contains `needle`.
pub fn assert_error(got: (u16, Value), status: u16, needle: &str) {
    let (s, v) = got;
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(s, status, "{v}");
    assert_eq!(v["error"]["code"], status, "{v}");
    assert!(msg.contains(needle), "expected '{needle}' in {msg}");
}

pub fn push(store: &Path, model: &Path, dir: &Path, target: &str, member: Option<&str>) {
    let (st, m, d) = (
        store.to_str().unwrap(),
        model.to_str().unwrap(),
        dir.to_str().unwrap(),
    );
    let mut args = vec!["store", "--store", st, "push", d, target, "--model", m];
    if let Some(member) = member {
        args.extend(["--member", member]);
    }
    let o = s2lc(&args);
    assert!(o.status.success(), "{}", stderr(&o));
}

pub fn metric(addr: &str, name: &str) -> f64 {
    let (status, text) = http(addr, "GET", "/metrics", b"");
    assert_eq!(status, 200);
    s2lc_serve::client::metric_value(&text, name)
        .unwrap_or_else(|| panic!("{name} missing from {text}"))
}

/// A store under `dir` holding the fixture `alice-r4` as `alice@1.0.0`, and a pack of the two
/// alice fixtures at `dir/pack`; returns (store, pack).
pub fn store_with_alice(dir: &Path, model: &Path) -> (PathBuf, PathBuf) {
    let store = dir.join("store");
    push(&store, model, &fixture("alice-r4"), "alice@1.0.0", None);
    let pack = dir.join("pack");
    let o = s2lc(&[
        "adapters",
        "pack",
        fixture("alice-r4").to_str().unwrap(),
        fixture("alice-r4-e90").to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    (store, pack)
}
