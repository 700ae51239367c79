//! The UDP socket that carries WireGuard messages, with the kernel's segmentation
//! offloads through `quinn-udp`: one send carries many datagrams of the same size (GSO),
//! one receive returns many datagrams of one sender (GRO), several at a time (recvmmsg).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
pub use quinn_udp::RecvMeta;
use quinn_udp::{Transmit, UdpSocketState};
use tokio::io::Interest;

/// Socket buffer size the daemon asks for. Userspace tunnels lose most of their
/// throughput to receive-buffer overflows with the kernel's default of about 200 KiB.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

pub struct Udp {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    /// Binds the socket, turns on what offloads the kernel has, and enlarges its buffers,
    /// beyond `net.core.rmem_max` when allowed (CAP_NET_ADMIN). Logs what it got.
    pub async fn bind(listen: SocketAddr) -> io::Result<Udp> {
        let socket = tokio::net::UdpSocket::bind(listen).await?;
        let state = UdpSocketState::new((&socket).into())?;
        let forced = setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_ok()
            && setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_ok();
        if !forced {
            // Without the capability the kernel caps these at rmem_max / wmem_max.
            let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES);
            let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER_BYTES);
        }
        let receive = getsockopt(&socket, sockopt::RcvBuf).unwrap_or(0);
        let send = getsockopt(&socket, sockopt::SndBuf).unwrap_or(0);
        tracing::info!(
            receive_buffer = receive,
            send_buffer = send,
            buffers_capped_by_sysctl = !forced,
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP socket"
        );
        Ok(Udp { socket, state })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// How many datagrams one `send` may carry.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents` to `destination`: one datagram, or with `segment_size` several of
    /// that size (the last may be shorter). Should the kernel refuse segmentation, the
    /// datagrams go one by one and later sends stop asking for it.
    pub async fn send(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        match self.send_once(destination, contents, segment_size).await {
            Err(_) if segment_size.is_some_and(|s| s < contents.len()) => {
                for datagram in contents.chunks(segment_size.unwrap_or(contents.len())) {
                    self.send_once(destination, datagram, None).await?;
                }
                Ok(())
            }
            result => result,
        }
    }

    async fn send_once(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            self.socket.writable().await?;
            let sent = self.socket.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return result,
            }
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Receives into `bufs` without blocking; `meta[i]` says what `bufs[i]` holds (with
    /// GRO, several datagrams `stride` bytes apart). `WouldBlock` when nothing is there.
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.socket.try_io(Interest::READABLE, || {
            self.state.recv((&self.socket).into(), bufs, meta)
        })
    }
}
