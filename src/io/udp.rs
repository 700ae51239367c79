//! The UDP socket that carries WireGuard messages, with the kernel's segmentation
//! offloads through `quinn-udp`: one send carries many datagrams of the same size (GSO),
//! one receive returns many datagrams of one sender (GRO), several at a time (recvmmsg).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    self, getsockopt, setsockopt, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
};
pub(crate) use quinn_udp::RecvMeta;
use quinn_udp::{Transmit, UdpSocketState};
use tokio::io::Interest;

/// Socket buffer size the daemon asks for. Userspace tunnels lose most of their
/// throughput to receive-buffer overflows with the kernel's default of about 200 KiB.
pub(crate) const SOCKET_BUFFER_BYTES: usize = 8 << 20;

pub(crate) struct Udp {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    /// Binds `count` sockets to `listen`, one per worker: with more than one they share
    /// the port through SO_REUSEPORT, and the kernel keeps each sender on one socket, so
    /// a peer's packets stay in order. Logs what the first one got.
    pub(crate) fn bind_group(listen: SocketAddr, count: usize) -> io::Result<Vec<Udp>> {
        if count <= 1 {
            let socket = std::net::UdpSocket::bind(listen)?;
            return Ok(vec![Udp::new(socket, true)?]);
        }
        let mut sockets = Vec::with_capacity(count);
        // Later sockets join the first one's port, which the kernel picked if it was 0.
        let mut address = listen;
        for index in 0..count {
            let family = if address.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
                .map_err(io::Error::from)?;
            setsockopt(&fd, sockopt::ReusePort, &true).map_err(io::Error::from)?;
            socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(address))
                .map_err(io::Error::from)?;
            let socket = std::net::UdpSocket::from(fd);
            address = socket.local_addr()?;
            sockets.push(Udp::new(socket, index == 0)?);
        }
        Ok(sockets)
    }

    /// Turns on what offloads the kernel has and enlarges the buffers, beyond
    /// `net.core.rmem_max` when allowed (CAP_NET_ADMIN).
    fn new(socket: std::net::UdpSocket, log: bool) -> io::Result<Udp> {
        socket.set_nonblocking(true)?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
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
        if !log {
            return Ok(Udp { socket, state });
        }
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

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// How many datagrams one `send` may carry.
    pub(crate) fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents` to `destination`: one datagram, or with `segment_size` several of
    /// that size (the last may be shorter). Should the kernel refuse segmentation, the
    /// datagrams go one by one and later sends stop asking for it.
    pub(crate) async fn send(
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

    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Receives into `bufs` without blocking; `meta[i]` says what `bufs[i]` holds (with
    /// GRO, several datagrams `stride` bytes apart). `WouldBlock` when nothing is there.
    pub(crate) fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.socket.try_io(Interest::READABLE, || {
            self.state.recv((&self.socket).into(), bufs, meta)
        })
    }
}
