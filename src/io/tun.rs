//! The TUN device, through `tun-rs`.

use std::io;

/// An open TUN device; the kernel removes it (and its routes) when this is dropped.
pub struct Tun {
    device: tun_rs::AsyncDevice,
    name: String,
}

impl Tun {
    /// Creates the device `name` with `mtu` and brings it up.
    pub fn create(name: &str, mtu: u16) -> io::Result<Tun> {
        let device = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .packet_information(false)
            .build_async()?;
        Ok(Tun {
            device,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one IP packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.recv(buf).await
    }

    /// Writes one IP packet.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.device.send(packet).await
    }
}
