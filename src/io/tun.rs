//! The TUN device, through `tun-rs`, with the kernel's segmentation offloads when it
//! has them.
//!
//! With offload on (IFF_VNET_HDR + TUNSETOFFLOAD), one read returns a TCP (or UDP) super
//! packet of up to 64 KiB that `tun-rs` cuts into MTU-sized segments, and one write
//! carries many coalesced segments of a flow: far fewer system calls per byte. With
//! several queues (IFF_MULTI_QUEUE) the kernel spreads flows over them, one per worker.

use std::io;

pub(crate) use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Buffers for TUN reads, allocated once: the raw read (virtio header and super packet)
/// and the segments it is cut into, each placed `headroom` bytes in.
pub(crate) struct TunRead {
    scratch: Vec<u8>,
    pub(crate) segments: Vec<Vec<u8>>,
    pub(crate) sizes: Vec<usize>,
    headroom: usize,
}

impl TunRead {
    /// Room for `count` segments of `segment_len` bytes each, headroom included.
    pub(crate) fn new(count: usize, segment_len: usize, headroom: usize) -> Self {
        TunRead {
            scratch: vec![0; VIRTIO_NET_HDR_LEN + MAX_SUPER_PACKET],
            segments: vec![vec![0; segment_len]; count],
            sizes: vec![0; count],
            headroom,
        }
    }

    /// The scratch buffer, the segments from `first` on with their sizes, and the
    /// headroom: what tun-rs reads into.
    #[allow(clippy::type_complexity)]
    fn from(&mut self, first: usize) -> (&mut [u8], &mut [Vec<u8>], &mut [usize], usize) {
        (
            &mut self.scratch,
            &mut self.segments[first..],
            &mut self.sizes[first..],
            self.headroom,
        )
    }
}

/// Largest IP packet (or super packet) the TUN device reads or writes.
pub(crate) const MAX_SUPER_PACKET: usize = 65535;

/// An open TUN device; the kernel removes it (and its routes) when this is dropped.
pub(crate) struct Tun {
    device: tun_rs::AsyncDevice,
    /// Offload is on: every read and write starts with a virtio-net header.
    offload: bool,
    /// The device takes UDP segmentation offload (USO) in writes, and the daemon uses it.
    udp_segmentation: bool,
}

impl Tun {
    /// Creates the device `name` with `mtu` and `queues` queues (one per worker), brings
    /// it up, and turns on segmentation offload when asked to and the kernel supports it
    /// (one log line says which); UDP segmentation is used in writes only if
    /// `want_udp_in_writes` too. Returns one `Tun` per queue; any of them may be written.
    pub(crate) fn create(
        name: &str,
        mtu: u16,
        want_offload: bool,
        want_udp_in_writes: bool,
        queues: usize,
        queue_length: u32,
    ) -> io::Result<Vec<Tun>> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .tx_queue_len(queue_length)
                .packet_information(false)
                .offload(offload)
                .multi_queue(queues > 1)
                .build_async()
        };
        let (device, offload) = match want_offload.then(|| build(true)) {
            Some(Ok(device)) => (device, true),
            Some(Err(e)) => {
                tracing::info!(error = %e, "TUN offload unavailable; one packet per read and write");
                (build(false)?, false)
            }
            None => {
                tracing::info!("TUN offload off (interface.offload = false)");
                (build(false)?, false)
            }
        };
        let udp_segmentation = offload && device.udp_gso() && want_udp_in_writes;
        if offload {
            tracing::info!(
                tcp_segmentation = device.tcp_gso(),
                udp_segmentation = device.udp_gso(),
                udp_datagrams_joined = udp_segmentation,
                "TUN offload on"
            );
        }
        let mut devices = vec![device];
        for _ in 1..queues {
            let queue = devices[0].try_clone()?;
            devices.push(queue);
        }
        Ok(devices
            .into_iter()
            .map(|device| Tun {
                udp_segmentation,
                device,
                offload,
            })
            .collect())
    }

    /// Reads the next packet, or super packet cut into segments, into the segments of
    /// `read` from index `first` on. Returns how many segments it filled.
    pub(crate) async fn recv_batch(&self, read: &mut TunRead, first: usize) -> io::Result<usize> {
        let (scratch, segments, sizes, headroom) = read.from(first);
        self.device
            .recv_multiple(scratch, segments, sizes, headroom)
            .await
    }

    /// Like `recv_batch`, without waiting: `WouldBlock` when nothing is pending.
    pub(crate) fn try_recv_batch(&self, read: &mut TunRead, first: usize) -> io::Result<usize> {
        let (scratch, segments, sizes, headroom) = read.from(first);
        self.device
            .try_recv_multiple(scratch, segments, sizes, headroom)
    }

    /// Every read and write starts with a virtio-net header (offload is on).
    pub(crate) fn has_virtio_header(&self) -> bool {
        self.offload
    }

    /// The device takes UDP segmentation (USO) in writes, and the daemon uses it.
    pub(crate) fn takes_udp_segmentation(&self) -> bool {
        self.udp_segmentation
    }

    /// Writes one packet, or a super packet behind its virtio-net header.
    pub(crate) async fn send(&self, write: &[u8]) -> io::Result<()> {
        self.device.send(write).await.map(|_| ())
    }
}
