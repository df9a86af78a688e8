//! A minimal blocking HTTP/1.1 client for the server's own tests and load benchmark: one request
//! per connection (`Connection: close`), the whole response read back. Not a general client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response: status and body (a chunked body is returned with its chunk framing, which is
/// harmless for the line-oriented server-sent events the tests read).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body as text.
    pub body: String,
}

/// The value of the sample `name` (no labels) in a Prometheus text exposition such as
/// `/metrics` returns.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Sends one request to `addr` (`host:port`) and reads the whole response.
pub fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    // A server may answer (413) before reading a large body and close: a failed write is not
    // the answer, the response is.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no HTTP status in {:?}", &text[..text.len().min(200)]),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok(HttpResponse { status, body })
}
