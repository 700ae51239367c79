//! Our protocol core against boringtun's `noise::Tunn`, in process: handshakes in both
//! directions, then transport packets both ways. boringtun is the test oracle.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use meshguard::proto::{Device, DeviceConfig, Received, Sealed, TunnelId, SEAL_TAILROOM};
use x25519_dalek::{PublicKey, StaticSecret};

const THEIRS: &str = "198.18.0.2:51820";

/// A minimal IPv4/UDP packet, which boringtun insists on before handing data out.
fn ipv4_packet(payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 10, 2, 1]);
    p[16..20].copy_from_slice(&[10, 10, 1, 1]);
    let sum = (0..20)
        .step_by(2)
        .map(|i| u32::from(u16::from_be_bytes([p[i], p[i + 1]])))
        .sum::<u32>();
    let folded = !(((sum & 0xffff) + (sum >> 16)) as u16);
    p[10..12].copy_from_slice(&folded.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

struct Setup {
    now: Instant,
    ours: Device,
    tunnel: TunnelId,
    theirs: Tunn,
    theirs_addr: SocketAddr,
}

fn setup() -> Setup {
    let now = Instant::now();
    let our_secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let their_secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let theirs_addr: SocketAddr = THEIRS.parse().unwrap();
    let mut ours = Device::new(
        DeviceConfig::default(),
        meshguard::proto::os_random(),
        now,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
    );
    let local = ours.add_local(meshguard::identity::PrivateKey::from_bytes(
        our_secret.to_bytes(),
    ));
    let tunnel = ours.add_tunnel(
        now,
        local,
        PublicKey::from(&their_secret).to_bytes(),
        Some(theirs_addr),
        None,
    );
    let theirs = Tunn::new(
        their_secret,
        PublicKey::from(&our_secret),
        None,
        None,
        7,
        None,
    );
    Setup {
        now,
        ours,
        tunnel,
        theirs,
        theirs_addr,
    }
}

fn ours_ip() -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)))
}

/// Everything boringtun wants to send after handling `datagram`, including what it
/// flushes on repeated calls.
fn boringtun_receive(s: &mut Setup, datagram: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut network, mut tunnel) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 2048];
    let mut input = datagram.to_vec();
    loop {
        match s.theirs.decapsulate(ours_ip(), &input, &mut buf) {
            TunnResult::WriteToNetwork(d) => network.push(d.to_vec()),
            TunnResult::WriteToTunnelV4(p, _) => {
                tunnel.push(p.to_vec());
                return (network, tunnel);
            }
            TunnResult::Done => return (network, tunnel),
            TunnResult::Err(e) => panic!("boringtun rejected our message: {e:?}"),
            TunnResult::WriteToTunnelV6(..) => unreachable!(),
        }
        input.clear(); // flush queued packets
    }
}

fn ours_send(s: &mut Setup, plaintext: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 16 + plaintext.len() + SEAL_TAILROOM];
    buf[16..16 + plaintext.len()].copy_from_slice(plaintext);
    match s.ours.seal(s.now, s.tunnel, &mut buf, plaintext.len()) {
        Sealed::Send { destination, len } => {
            assert_eq!(destination, s.theirs_addr);
            buf.truncate(len);
            buf
        }
        other => panic!("expected a session, got {other:?}"),
    }
}

fn theirs_send(s: &mut Setup, plaintext: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    match s.theirs.encapsulate(plaintext, &mut buf) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        other => panic!(
            "boringtun has no session: {:?}",
            std::mem::discriminant(&other)
        ),
    }
}

fn data_both_ways(s: &mut Setup) {
    for i in 0..20u8 {
        let ours_packet = ipv4_packet(&[i; 300]);
        let d = ours_send(s, &ours_packet);
        let (_, delivered) = boringtun_receive(s, &d);
        assert_eq!(delivered, vec![ours_packet], "boringtun decrypts ours");

        let their_packet = ipv4_packet(&[i ^ 0xff; 1000]);
        let mut d = theirs_send(s, &their_packet);
        match s.ours.receive(s.now, s.theirs_addr, &mut d) {
            Received::Data { plaintext, .. } => {
                assert_eq!(&d[plaintext][..their_packet.len()], &their_packet[..]);
            }
            other => panic!("we failed to open boringtun's packet: {other:?}"),
        }
    }
}

#[test]
fn we_initiate_boringtun_responds() {
    let mut s = setup();
    s.ours.initiate(s.now, s.tunnel);
    let init = s.ours.poll_transmit().expect("initiation").data;
    let (mut replies, _) = boringtun_receive(&mut s, &init);
    assert_eq!(replies.len(), 1, "boringtun answers with a response");
    let mut response = replies.remove(0);
    assert_eq!(response[0], 2);
    assert_eq!(
        s.ours.receive(s.now, s.theirs_addr, &mut response),
        Received::Control
    );
    assert!(s.ours.has_session(s.tunnel));
    // Our confirming keepalive completes boringtun's side.
    let keepalive = s.ours.poll_transmit().expect("keepalive").data;
    boringtun_receive(&mut s, &keepalive);
    data_both_ways(&mut s);
}

#[test]
fn boringtun_initiates_we_respond() {
    let mut s = setup();
    let mut buf = vec![0u8; 2048];
    let mut init = match s.theirs.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("boringtun made no initiation"),
    };
    assert_eq!(
        s.ours.receive(s.now, s.theirs_addr, &mut init),
        Received::Control
    );
    let response = s.ours.poll_transmit().expect("response").data;
    assert_eq!(response[0], 2);
    let (mut network, _) = boringtun_receive(&mut s, &response);
    // boringtun confirms with a keepalive, which promotes our pending session.
    let mut keepalive = network.remove(0);
    assert_eq!(
        s.ours.receive(s.now, s.theirs_addr, &mut keepalive),
        Received::Control
    );
    assert!(s.ours.has_session(s.tunnel));
    s.now += Duration::from_millis(10);
    data_both_ways(&mut s);
}
