//! The HTTP server of the web page ([`crate::App::web_page`]): the app's router on `[http] addr`
//! until the node stops.

use std::net::SocketAddr;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bind `addr` and serve `router` until `stop` fires. Returns the bound address and the server
/// task.
pub(crate) async fn serve(
    addr: &str,
    router: axum::Router,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let socket = tokio::net::TcpListener::bind(addr).await?;
    let local = socket.local_addr()?;
    let task = tokio::spawn(async move {
        let r = axum::serve(socket, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "web server failed");
        }
    });
    Ok((local, task))
}
