//! The TUN device, through `tun-rs`, with the kernel's segmentation offloads when it
//! has them.
//!
//! With offload on (IFF_VNET_HDR + TUNSETOFFLOAD), one read returns a TCP (or UDP) super
//! packet of up to 64 KiB that `tun-rs` cuts into MTU-sized segments, and one write
//! carries many coalesced segments of a flow: far fewer system calls per byte. With
//! several queues (IFF_MULTI_QUEUE) the kernel spreads flows over them, one per worker.

use std::io;

use bytes::BytesMut;
pub(crate) use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// An open TUN device; the kernel removes it (and its routes) when this is dropped.
pub(crate) struct Tun {
    device: tun_rs::AsyncDevice,
}

impl Tun {
    /// Creates the device `name` with `mtu` and `queues` queues (one per worker), brings
    /// it up, and turns on segmentation offload when asked to and the kernel supports it
    /// (one log line says which). Returns one `Tun` per queue; any of them may be written.
    pub(crate) fn create(
        name: &str,
        mtu: u16,
        want_offload: bool,
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
        if offload {
            tracing::info!(
                tcp_segmentation = device.tcp_gso(),
                udp_segmentation = device.udp_gso(),
                "TUN offload on"
            );
        }
        let mut devices = vec![device];
        for _ in 1..queues {
            let queue = devices[0].try_clone()?;
            devices.push(queue);
        }
        Ok(devices.into_iter().map(|device| Tun { device }).collect())
    }

    /// Reads the next packet, or super packet cut into segments, into `segments[i]`
    /// starting at `headroom`, with lengths in `sizes`. Returns how many. `scratch` holds
    /// the raw read (virtio header and super packet): at least 10 + 65535 bytes.
    pub(crate) async fn recv_batch(
        &self,
        scratch: &mut [u8],
        segments: &mut [Vec<u8>],
        sizes: &mut [usize],
        headroom: usize,
    ) -> io::Result<usize> {
        self.device
            .recv_multiple(scratch, segments, sizes, headroom)
            .await
    }

    /// Like `recv_batch`, without waiting: `WouldBlock` when nothing is pending.
    pub(crate) fn try_recv_batch(
        &self,
        scratch: &mut [u8],
        segments: &mut [Vec<u8>],
        sizes: &mut [usize],
        headroom: usize,
    ) -> io::Result<usize> {
        self.device
            .try_recv_multiple(scratch, segments, sizes, headroom)
    }

    /// Writes packets, each at `packets[i][headroom..]` with `headroom >=
    /// VIRTIO_NET_HDR_LEN`, coalescing segments of one flow when offload is on.
    pub(crate) async fn send_batch(
        &self,
        gro: &mut GROTable,
        packets: &mut [BytesMut],
        headroom: usize,
    ) -> io::Result<()> {
        self.device
            .send_multiple(gro, packets, headroom)
            .await
            .map(|_| ())
    }
}
