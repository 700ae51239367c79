//! The UDP socket that carries WireGuard messages.

use std::io;
use std::net::SocketAddr;

pub use tokio::net::UdpSocket;

pub async fn bind(listen: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::bind(listen).await
}
