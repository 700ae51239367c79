//! The UDP socket that carries WireGuard messages.

use std::io;
use std::net::SocketAddr;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
pub use tokio::net::UdpSocket;

/// Socket buffer size the daemon asks for. Userspace tunnels lose most of their
/// throughput to receive-buffer overflows with the kernel's default of about 200 KiB.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Binds the socket and enlarges its buffers, beyond `net.core.rmem_max` when allowed
/// (CAP_NET_ADMIN), otherwise as far as the limit lets us. Logs what it got.
pub async fn bind(listen: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(listen).await?;
    let forced = setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_ok()
        && setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_ok();
    if !forced {
        // Without the capability the kernel caps these at rmem_max / wmem_max.
        let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES);
        let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER_BYTES);
    }
    let receive = getsockopt(&socket, sockopt::RcvBuf).unwrap_or(0);
    let send = getsockopt(&socket, sockopt::SndBuf).unwrap_or(0);
    if forced {
        tracing::debug!(receive, send, "UDP socket buffers set");
    } else {
        tracing::info!(
            receive,
            send,
            wanted = SOCKET_BUFFER_BYTES,
            "UDP socket buffers capped by net.core.rmem_max/wmem_max (no CAP_NET_ADMIN)"
        );
    }
    Ok(socket)
}
