//! WireGuard's cross-platform userspace API (the `wg` tool's unix socket protocol), as
//! wireguard-go serves it: requests are read line by line, answers written for one local
//! identity, which is one WireGuard interface to `wg`.
//!
//! Only `get` is served. meshguard's configuration lives in its files (and is reloaded
//! from them), so a well-formed `set` is answered "operation not supported" and a
//! malformed one "invalid argument"; neither changes anything.

use std::fmt::Write as _;

use zeroize::Zeroizing;

use super::report::DaemonStatus;
use crate::identity::{PrivateKey, PublicKey};
use crate::node::add_traffic;
use crate::proto::Traffic;

/// The longest request line read; longer ones end the connection.
pub const MAX_LINE: usize = 4096;
/// The most lines a `set` request may have.
pub const MAX_SET_LINES: usize = 65_536;
/// The longest WireGuard interface name (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;

// What `wg` reads from `errno=`: the negated C errno, as wireguard-go writes it.
pub const EIO: i32 = -5;
pub const ENODEV: i32 = -19;
pub const EINVAL: i32 = -22;
pub const EPROTO: i32 = -71;
pub const EMSGSIZE: i32 = -90;
pub const EOPNOTSUPP: i32 = -95;

/// The socket name (`/var/run/wireguard/NAME.sock`) of each of `identities` local
/// identities: the device name for one, `DEVICE.1`, `DEVICE.2`, ... for several. Names
/// longer than 15 characters, which `wg` would not accept, are left out (`None`).
pub fn socket_names(device: &str, identities: usize) -> Vec<Option<String>> {
    let fits = |name: String| (name.len() <= MAX_NAME_LEN).then_some(name);
    if identities == 1 {
        return vec![fits(device.to_string())];
    }
    (1..=identities)
        .map(|n| fits(format!("{device}.{n}")))
        .collect()
}

/// The first line of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Get,
    Set,
}

impl Operation {
    /// `line` without its newline.
    pub fn parse(line: &[u8]) -> Result<Operation, i32> {
        match line {
            b"get=1" => Ok(Operation::Get),
            b"set=1" => Ok(Operation::Set),
            _ => Err(EPROTO),
        }
    }
}

/// Reads a `set` request line by line and says how to answer it.
#[derive(Debug, Default)]
pub struct SetRequest {
    lines: usize,
    /// The first thing wrong with it.
    error: Option<i32>,
    in_peer: bool,
}

impl SetRequest {
    /// Takes one line (without its newline); `false` once the blank line ended it.
    pub fn line(&mut self, line: &[u8]) -> bool {
        if line.is_empty() {
            return false;
        }
        self.lines += 1;
        if self.error.is_none() {
            self.error = self.check(line).err();
        }
        true
    }

    fn check(&mut self, line: &[u8]) -> Result<(), i32> {
        if self.lines > MAX_SET_LINES {
            return Err(EMSGSIZE);
        }
        let line = std::str::from_utf8(line).map_err(|_| EPROTO)?;
        let (key, value) = line.split_once('=').ok_or(EPROTO)?;
        let valid = match key {
            "public_key" => {
                self.in_peer = true;
                is_hex_key(value)
            }
            "private_key" | "preshared_key" => is_hex_key(value),
            "listen_port" | "persistent_keepalive_interval" => value.parse::<u16>().is_ok(),
            "fwmark" => value.parse::<u32>().is_ok(),
            "replace_peers" | "replace_allowed_ips" | "remove" | "update_only" => value == "true",
            "protocol_version" => value == "1",
            "endpoint" => self.in_peer && value.parse::<std::net::SocketAddr>().is_ok(),
            "allowed_ip" => self.in_peer && value.parse::<ipnet::IpNet>().is_ok(),
            _ => false,
        };
        if valid {
            Ok(())
        } else {
            Err(EINVAL)
        }
    }

    /// The `errno` to answer: a malformed request's error, else "not supported".
    pub fn errno(&self) -> i32 {
        self.error.unwrap_or(EOPNOTSUPP)
    }
}

fn is_hex_key(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex_key(out: &mut String, name: &str, key: &[u8; 32]) {
    out.push_str(name);
    out.push('=');
    for byte in key {
        let _ = write!(out, "{byte:02x}");
    }
    out.push('\n');
}

/// The answer to `get=1` for local identity `identity` of `status`, `errno=0` and the
/// blank line included: the identity's private key if given, the listen port, then every
/// public key of every peer identity as a WireGuard peer, with the traffic of the tunnels
/// to that key from any of the identity's keys.
pub fn get_response(
    status: &DaemonStatus,
    identity: usize,
    private_key: Option<&PrivateKey>,
) -> Zeroizing<String> {
    // The key goes in a buffer of its own, exactly sized, so that no reallocation leaves
    // a copy of it behind.
    let mut secret = Zeroizing::new(String::with_capacity(128));
    if let Some(key) = private_key {
        hex_key(&mut secret, "private_key", &Zeroizing::new(key.as_bytes()));
    }
    let mut out = String::new();
    let _ = writeln!(out, "listen_port={}", status.listen.port());
    let node = &status.node;
    for pair in node.pairs.iter().filter(|p| p.local == identity) {
        let peer = &node.peers[pair.peer];
        for key in &peer.public_keys {
            let tunnels = || pair.tunnels.iter().filter(|t| t.peer_key == *key);
            let traffic = tunnels().fold(Traffic::default(), |sum, t| add_traffic(sum, &t.traffic));
            let endpoint = tunnels().find_map(|t| t.endpoint);
            write_peer(&mut out, key, endpoint, &traffic, peer);
        }
    }
    out.push_str("errno=0\n\n");
    let mut answer = Zeroizing::new(String::with_capacity(secret.len() + out.len()));
    answer.push_str(&secret);
    answer.push_str(&out);
    answer
}

fn write_peer(
    out: &mut String,
    key: &PublicKey,
    endpoint: Option<std::net::SocketAddr>,
    traffic: &Traffic,
    peer: &crate::node::PeerStatus,
) {
    hex_key(out, "public_key", key.as_bytes());
    hex_key(out, "preshared_key", &[0; 32]);
    out.push_str("protocol_version=1\n");
    if let Some(endpoint) = endpoint {
        let _ = writeln!(out, "endpoint={endpoint}");
    }
    let handshake = traffic.last_handshake.unwrap_or_default();
    let _ = writeln!(out, "last_handshake_time_sec={}", handshake.as_secs());
    let _ = writeln!(out, "last_handshake_time_nsec={}", handshake.subsec_nanos());
    let _ = writeln!(out, "tx_bytes={}", traffic.tx_bytes);
    let _ = writeln!(out, "rx_bytes={}", traffic.rx_bytes);
    let keepalive = peer.persistent_keepalive.map_or(0, |d| d.as_secs());
    let _ = writeln!(out, "persistent_keepalive_interval={keepalive}");
    for net in &peer.allowed_ips {
        let _ = writeln!(out, "allowed_ip={net}");
    }
}
