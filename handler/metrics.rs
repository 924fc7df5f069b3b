//! `[daemon] metrics_listen`: Prometheus metrics over HTTP. The event loop accepts the
//! connections; each is answered on a short-lived thread (at most [`MAX_CLIENTS`] at
//! once, with read and write timeouts), so a slow scraper never holds the loop. The
//! text is the one `lc stats --prometheus` prints.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{Request, Response};
use crate::control::Handler;

/// Scrapes answered at once; more are closed.
pub const MAX_CLIENTS: usize = 4;
/// Longest wait for a request or for the client to take the answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Answers one HTTP request: `GET /metrics` gets the metrics, anything else 404/405.
pub fn answer(handler: &dyn Handler, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (status, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {
            match handler.handle(Request::Stats { cache: None }, &mut |_| {}) {
                Ok(Response::Stats(s)) => ("200 OK", crate::cli::prometheus_text(&s)),
                Ok(_) => (
                    "500 Internal Server Error",
                    "not an answer to stats\n".to_string(),
                ),
                Err(e) => ("500 Internal Server Error", format!("{e}\n")),
            }
        }
        (Some("GET"), _) => ("404 Not Found", "only /metrics here\n".to_string()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Accepts every pending connection of a non-blocking listener and answers each on a
/// thread of its own; beyond [`MAX_CLIENTS`] at once, connections are closed.
pub fn accept_all(listener: &TcpListener, handler: &Arc<dyn Handler>, busy: &Arc<AtomicUsize>) {
    while let Ok((stream, _)) = listener.accept() {
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (h, b) = (handler.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("lc-metrics".into())
            .spawn(move || {
                let _ = stream
                    .set_nonblocking(false)
                    .and_then(|_| answer(h.as_ref(), stream));
                b.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
