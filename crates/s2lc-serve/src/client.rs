//! A minimal blocking HTTP/1.1 client for the server's own tests and load benchmark: one request
//! per connection (`Connection: close`), the whole response read back. Not a general client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

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

/// Opens a connection to `addr` (`host:port`) and sends one request on it.
fn send(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<TcpStream> {
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
    Ok(s)
}

/// Sends one request to `addr` (`host:port`) and reads the whole response.
pub fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<HttpResponse> {
    let mut s = send(addr, method, path, body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    parse(&out)
}

/// A streamed response (server-sent events) with the arrival time of each event.
#[derive(Debug, Clone)]
pub struct TimedStream {
    /// The response, as [`request`] returns it.
    pub response: HttpResponse,
    /// Seconds from sending the request to the arrival of each `data:` event that carries a
    /// piece of text (not the finish event, an error or `[DONE]`), in order: the first is the
    /// time to first token, the gaps between them the inter-token latencies.
    pub pieces: Vec<f64>,
}

/// Sends one streaming request (`"stream": true` in `body`) and times its events as they
/// arrive. An event is recognised by a line starting `data: {` whose `finish_reason` is null
/// and which carries no `error`.
pub fn request_timed(addr: &str, path: &str, body: &[u8]) -> std::io::Result<TimedStream> {
    let t = Instant::now();
    let mut s = send(addr, "POST", path, body)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut pieces = Vec::new();
    // Bytes of `out` already split into lines.
    let mut scanned = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let at = t.elapsed().as_secs_f64();
        while let Some(nl) = out[scanned..].iter().position(|&b| b == b'\n') {
            let line = &out[scanned..scanned + nl];
            scanned += nl + 1;
            if is_piece(line) {
                pieces.push(at);
            }
        }
    }
    Ok(TimedStream {
        response: parse(&out)?,
        pieces,
    })
}

/// Whether a line of a server-sent event stream is a chunk carrying generated text.
fn is_piece(line: &[u8]) -> bool {
    let line = String::from_utf8_lossy(line);
    line.starts_with("data: {")
        && line.contains("\"finish_reason\":null")
        && !line.contains("\"error\"")
}

/// Splits a raw HTTP/1.1 response into status and body.
fn parse(out: &[u8]) -> std::io::Result<HttpResponse> {
    let text = String::from_utf8_lossy(out).into_owned();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_text_chunks_only() {
        let chunk = r#"data: {"choices":[{"index":0,"text":"an \"error\"","finish_reason":null}]}"#;
        assert!(is_piece(chunk.as_bytes()));
        let last = r#"data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#;
        assert!(!is_piece(last.as_bytes()));
        assert!(!is_piece(br#"data: {"error":{"message":"deadline"}}"#));
        assert!(!is_piece(b"data: [DONE]"));
        assert!(!is_piece(b"1f4"));
    }
}
