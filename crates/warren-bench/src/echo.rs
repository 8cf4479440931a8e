//! The raw echo server (`warren bench echo-server`): every byte read is written straight back.
//! It is the physical-limit reference for `request`: the client sees its own PUBLISH come back
//! on the request topic, which it takes as the reply, so a request costs exactly one read and
//! one write on each side and nothing else.

use std::io::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::args::EchoServerArgs;
use crate::{BenchError, resolve};

/// Read buffer per connection.
const BUF: usize = 64 * 1024;

/// Serves until `stop` is cancelled; prints `listening ADDR` on stdout once bound.
pub async fn run(a: &EchoServerArgs, stop: CancellationToken) -> Result<(), BenchError> {
    accept_loop(a, stop, echo).await
}

/// The references' one accept loop: bind `a.listen`, print `listening ADDR` on stdout, and run
/// `conn` on a task of its own for every connection until `stop` is cancelled (then wait up to
/// a second for them).
pub(crate) async fn accept_loop<F, Fut>(
    a: &EchoServerArgs,
    stop: CancellationToken,
    mut conn: F,
) -> Result<(), BenchError>
where
    F: FnMut(TcpStream, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = resolve(&a.listen).await?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BenchError::Connect { addr, source })?;
    let local = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening {local}");
        let _ = out.flush();
    }
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((sock, _)) => {
                    tracker.spawn(conn(sock, stop.clone()));
                }
                // Out of file descriptors or similar: keep serving the others.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tracker.wait()).await;
    Ok(())
}

/// One connection of the echo: what it reads, written straight back (also the service of
/// `warren bench backend`).
pub(crate) async fn echo(mut sock: TcpStream, stop: CancellationToken) {
    let _ = sock.set_nodelay(true);
    let mut buf = vec![0u8; BUF];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = sock.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        if sock.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
