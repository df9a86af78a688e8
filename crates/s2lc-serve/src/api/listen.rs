//! Accepting connections: HTTP/1.1 with a header-read timeout (which also closes a keep-alive
//! connection that stays idle that long) and a cap on open connections. A connection over the cap
//! gets an immediate `503` with `Retry-After` and is closed, so a flood of clients costs a
//! socket each for a moment, never a task that waits.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::metrics::Metrics;

/// Pending connections the kernel queues before `accept` (std's listeners use 128, and a burst
/// of clients past it sees resets instead of a 429).
pub const ACCEPT_BACKLOG: i32 = 4096;

/// Binds a listening TCP socket on `host:port` (port 0: a free one) with [`ACCEPT_BACKLOG`].
pub fn bind(host: &str, port: u16) -> std::io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("'{host}' resolves to no address"),
        )
    })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(ACCEPT_BACKLOG)?;
    Ok(socket.into())
}

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and that an idle keep-alive connection
    /// stays open).
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until the process ends.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors or a connection reset before accept: back off briefly
            // rather than spin; the listener itself is fine.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let metrics = metrics.clone();
        metrics.connections.inc();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            // Errors here are the client's (reset, timed out, malformed): nothing to answer.
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
            metrics.connections.dec();
            drop(slot);
        });
    }
}

/// Answers a connection over the cap with a 503 and closes it (after reading what the client
/// sent for a moment, so the close does not reset the answer away).
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"error":{"message":"the server has too many open connections; retry shortly","type":"server_error","code":503}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
