//! A data-path worker: one TUN queue and one UDP socket, served a batch at a time.
//!
//! A TUN read yields up to a 64 KiB super packet cut into segments (offload); each is
//! sealed in place and runs of equal-sized datagrams for one peer leave in one send (UDP
//! GSO). A socket wake-up drains several receives of many datagrams each (recvmmsg, UDP
//! GRO); their plaintexts reach the TUN device in coalescing writes.
//!
//! Workers share the node. Each takes its lock per batch for the protocol and policy
//! bookkeeping only: encryption and decryption, and all system calls, happen without it,
//! so workers seal and open in parallel.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::Notify;

use crate::io::scheduling;
use crate::io::tun::{Tun, TunRead, IDEAL_BATCH_SIZE};
use crate::io::udp::{RecvMeta, Udp};

use super::write_errors::{SendErrors, TunWriteErrors};
use crate::node::{EgressStep, Ingress, IngressStep, Node};
use crate::packet::coalesce::Coalescer;
use crate::proto::{
    self, Mac1Screen, Mac1Verdict, OpenError, SealJob, Transmit, TransportOpen, SEAL_TAILROOM,
    TRANSPORT_HEADER_LEN,
};

/// Largest UDP receive (one datagram, or several coalesced by GRO).
const MAX_DATAGRAM: usize = 65536;
/// Receive buffers per receive call (recvmmsg).
const RECEIVE_SLOTS: usize = 8;
/// Most datagrams one GRO receive holds (the kernel's UDP_GRO limit is 64 segments).
const DATAGRAMS_PER_SLOT: usize = 64;
/// Receive calls per socket wake-up, so the TUN side gets its turn.
const RECEIVES_PER_WAKE: usize = 4;
/// Room for the segments of one 64 KiB super packet at the smallest MTU (576).
const SEGMENTS_PER_SUPER_PACKET: usize = 65535 / 536 + 1;
/// Bytes of datagrams in one segmented send.
const MAX_GSO_BYTES: usize = 64_000;

/// The node and when the control task's timer is set to wake it.
pub(super) struct State {
    pub node: Node,
    /// The deadline the control task sleeps until (`None`: none).
    pub armed: Option<Instant>,
}

/// What the workers and the control task share.
pub(super) struct Shared {
    state: Mutex<State>,
    /// UDP sends the kernel refused.
    pub(super) send_errors: SendErrors,
    /// TUN writes the kernel refused.
    pub(super) tun_write_errors: TunWriteErrors,
    /// Wakes the control task when a worker moved the node's deadline before `armed`.
    pub timer_moved: Notify,
}

impl Shared {
    pub(super) fn new(node: Node) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State { node, armed: None }),
            send_errors: SendErrors::default(),
            tun_write_errors: TunWriteErrors::default(),
            timer_moved: Notify::new(),
        })
    }

    /// Locks the node. A worker that panicked while holding it ends the daemon (the
    /// control task sees the failed task), so a poisoned lock is not used further.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("a data-path worker panicked while holding the node")
    }

    /// After work on the node: takes its queued messages into `transmits`, logs its
    /// events, and wakes the control task if the node now wants to be woken earlier.
    pub(super) fn finish(&self, state: &mut State, transmits: &mut Vec<Transmit>) {
        while let Some(transmit) = state.node.poll_transmit() {
            transmits.push(transmit);
        }
        state.node.log_events();
        if let Some(wanted) = state.node.poll_timeout() {
            if state.armed.is_none_or(|armed| wanted < armed) {
                state.armed = Some(wanted);
                self.timer_moved.notify_one();
            }
        }
    }
}

/// Reusable buffers for batches in both directions: nothing is allocated per packet.
struct Buffers {
    /// Segments from the TUN device, each with transport-header room in front and
    /// sealing room behind.
    tun: TunRead,
    /// Where each segment goes and the sealing left to do (`None`: dropped or queued).
    sealing: Vec<Option<(SocketAddr, SealJob)>>,
    /// Sealed segments for one peer, back to back, for one segmented send.
    gso: Vec<u8>,
    /// Datagrams from the network, decrypted in place.
    received: Vec<Vec<u8>>,
    meta: [RecvMeta; RECEIVE_SLOTS],
    /// The datagrams of one receive call: receive slot, range in it, and which local
    /// identity the mac1 of an initiation names.
    datagrams: Vec<(usize, Range<usize>, Mac1Verdict)>,
    /// The local identities' mac1 keys as of the last batch.
    screen: Mac1Screen,
    /// Transport messages of one receive to decrypt without the node.
    opening: Vec<Opening>,
    /// Plaintexts to deliver: (receive slot, range in it).
    plaintexts: Vec<(usize, Range<usize>)>,
    /// Plaintexts for the TUN device, segments of one flow joined.
    to_tun: Coalescer,
    /// Handshake and keepalive messages the node queued during a batch.
    transmits: Vec<Transmit>,
}

impl Buffers {
    fn new(mtu: u16, tun: &Tun) -> Self {
        let segment = TRANSPORT_HEADER_LEN + usize::from(mtu).max(1500) + SEAL_TAILROOM;
        let segments = SEGMENTS_PER_SUPER_PACKET * 2;
        Buffers {
            tun: TunRead::new(segments, segment, TRANSPORT_HEADER_LEN),
            sealing: Vec::with_capacity(segments),
            gso: vec![0; MAX_GSO_BYTES],
            received: vec![vec![0; MAX_DATAGRAM]; RECEIVE_SLOTS],
            meta: [RecvMeta::default(); RECEIVE_SLOTS],
            datagrams: Vec::with_capacity(RECEIVE_SLOTS * DATAGRAMS_PER_SLOT),
            screen: Mac1Screen::default(),
            opening: Vec::with_capacity(RECEIVE_SLOTS * DATAGRAMS_PER_SLOT),
            plaintexts: Vec::with_capacity(RECEIVE_SLOTS * DATAGRAMS_PER_SLOT),
            to_tun: Coalescer::new(
                IDEAL_BATCH_SIZE,
                tun.has_virtio_header(),
                tun.takes_udp_segmentation(),
            ),
            transmits: Vec::new(),
        }
    }
}

/// Serves one TUN queue and one socket until the device fails.
pub(super) async fn run(shared: Arc<Shared>, tun: Tun, socket: Arc<Udp>, mtu: u16) -> Result<()> {
    let mut buffers = Buffers::new(mtu, &tun);
    let mut tun_errors = TunErrors::default();
    loop {
        let b = &mut buffers;
        tokio::select! {
            read = tun.recv_batch(&mut b.tun, 0) => {
                match read {
                    Ok(first) => {
                        tun_errors.clear();
                        let count = read_more(&tun, b, first);
                        seal_and_send(&socket, &shared, b, count).await;
                    }
                    // A super packet that cannot be cut up (say, too many segments for a tiny
                    // MSS) is dropped; a device that keeps failing ends the daemon.
                    Err(e) => tun_errors.record(e)?,
                }
            }
            ready = socket.readable() => {
                if let Err(e) = ready {
                    tracing::trace!(error = %e, "UDP socket error");
                }
                receive_and_deliver(&socket, &shared, &tun, b).await;
            }
        }
        send_transmits(&socket, &shared.send_errors, &mut b.transmits).await;
        scheduling::keep_within_share();
    }
}

/// Failed TUN reads in a row: a few are dropped packets, many mean the device is gone.
#[derive(Default)]
struct TunErrors {
    in_a_row: u32,
    last_logged: Option<Instant>,
}

impl TunErrors {
    const FATAL_IN_A_ROW: u32 = 1000;

    fn clear(&mut self) {
        self.in_a_row = 0;
    }

    fn record(&mut self, error: std::io::Error) -> Result<()> {
        self.in_a_row += 1;
        if self.in_a_row >= Self::FATAL_IN_A_ROW {
            return Err(anyhow::Error::new(error).context(format!(
                "reading from the TUN device failed {} times in a row",
                self.in_a_row
            )));
        }
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            self.last_logged = Some(now);
            tracing::warn!(error = %error, "reading from the TUN device failed; packet dropped");
        }
        Ok(())
    }
}

/// Datagrams for one peer, back to back in `Buffers::gso`, to leave in one send: all of
/// one size but the last, which may be shorter.
#[derive(Default)]
struct SegmentRun {
    destination: Option<SocketAddr>,
    segment: usize,
    count: usize,
    bytes: usize,
    /// A shorter datagram ended the run.
    closed: bool,
}

impl SegmentRun {
    fn accepts(&self, destination: SocketAddr, len: usize, max_segments: usize) -> bool {
        self.count == 0
            || (self.destination == Some(destination)
                && !self.closed
                && self.count < max_segments
                && len <= self.segment
                && self.bytes + len <= MAX_GSO_BYTES)
    }

    fn push(&mut self, destination: SocketAddr, len: usize) {
        if self.count == 0 {
            self.destination = Some(destination);
            self.segment = len;
        }
        self.closed = len < self.segment;
        self.count += 1;
        self.bytes += len;
    }

    async fn flush(&mut self, socket: &Udp, errors: &SendErrors, gso: &[u8]) {
        if let Some(destination) = self.destination.filter(|_| self.count > 0) {
            let segment = (self.count > 1).then_some(self.segment);
            send(socket, errors, &gso[..self.bytes], destination, segment).await;
        }
        *self = SegmentRun::default();
    }
}

/// After a read that returned `count` segments, reads whatever else the TUN device has
/// ready, as long as a whole super packet still fits, so that single packets (UDP, ICMP)
/// batch up as well. Returns the total.
fn read_more(tun: &Tun, b: &mut Buffers, mut count: usize) -> usize {
    while b.tun.segments.len() - count >= SEGMENTS_PER_SUPER_PACKET {
        match tun.try_recv_batch(&mut b.tun, count) {
            Ok(more) => count += more,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::trace!(error = %e, "reading from the TUN device failed");
                }
                break;
            }
        }
    }
    count
}

/// Seals the `count` segments read from the TUN device and sends them, runs of
/// equal-sized datagrams for one peer in one call. The node is locked once, to route the
/// segments and reserve their counters; the encryption runs after.
async fn seal_and_send(socket: &Udp, shared: &Shared, b: &mut Buffers, count: usize) {
    b.sealing.clear();
    let now = Instant::now();
    {
        let mut state = shared.lock();
        for (segment, &len) in b.tun.segments.iter_mut().zip(&b.tun.sizes).take(count) {
            b.sealing
                .push(match state.node.begin_egress(now, segment, len) {
                    EgressStep::Seal { destination, job } => Some((destination, job)),
                    EgressStep::Done(_) => None,
                });
        }
        shared.finish(&mut state, &mut b.transmits);
    }
    let max_segments = socket.max_segments().max(1);
    let mut run = SegmentRun::default();
    for (segment, sealing) in b.tun.segments.iter_mut().zip(&b.sealing) {
        let Some((destination, job)) = sealing else {
            continue;
        };
        let len = job.seal(segment);
        if !run.accepts(*destination, len, max_segments) {
            run.flush(socket, &shared.send_errors, &b.gso).await;
        }
        b.gso[run.bytes..run.bytes + len].copy_from_slice(&segment[..len]);
        run.push(*destination, len);
    }
    run.flush(socket, &shared.send_errors, &b.gso).await;
}

/// A transport message in a receive buffer, on its way through decryption.
struct Opening {
    slot: usize,
    at: Range<usize>,
    open: TransportOpen,
    opened: Result<Range<usize>, OpenError>,
}

/// Drains the socket for a while without blocking. The datagrams of each receive are
/// checked under the node's lock, decrypted in place without it, and admitted under it
/// again; then their plaintexts are copied into `to_tun`, segments of a flow joined, and
/// written to the TUN device.
async fn receive_and_deliver(socket: &Udp, shared: &Shared, tun: &Tun, b: &mut Buffers) {
    for _ in 0..RECEIVES_PER_WAKE {
        let mut buffers = b.received.iter_mut();
        let mut slices: [IoSliceMut; RECEIVE_SLOTS] = std::array::from_fn(|_| {
            IoSliceMut::new(buffers.next().expect("one buffer per receive slot"))
        });
        let received = match socket.try_recv(&mut slices, &mut b.meta) {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP errors from earlier sends surface here; they are not fatal.
            Err(e) => {
                tracing::trace!(error = %e, "UDP receive error");
                continue;
            }
        };
        open_received(shared, b, received);
        for (slot, range) in &b.plaintexts {
            if b.to_tun.is_full() {
                write_to_tun(tun, &mut b.to_tun, &shared.tun_write_errors).await;
            }
            b.to_tun.push(&b.received[*slot][range.clone()]);
        }
        write_to_tun(tun, &mut b.to_tun, &shared.tun_write_errors).await;
    }
}

/// Feeds the datagrams of the first `received` slots to the node, recording in
/// `plaintexts` where each packet to deliver now lies.
///
/// The node is locked in phases. Between them, without the lock, pending transport
/// messages are decrypted and an admitted initiation gets its Diffie-Hellman work, so a
/// flood of initiations does not hold up the other workers. A handshake message ends a
/// phase that has transport data pending: the data before it is finished first, as if
/// each datagram went through alone.
fn open_received(shared: &Shared, b: &mut Buffers, received: usize) {
    b.plaintexts.clear();
    b.opening.clear();
    b.datagrams.clear();
    for slot in 0..received {
        for at in datagrams_in(&b.meta[slot]) {
            // Which local identity an initiation is for costs a BLAKE2s per identity.
            let verdict = b.screen.verdict(&b.received[slot][at.clone()]);
            b.datagrams.push((slot, at, verdict));
        }
    }
    let now = Instant::now();
    let mut next = 0;
    let mut state = shared.lock();
    b.screen = state.node.mac1_screen();
    loop {
        let mut answering = None;
        while let Some((slot, at, verdict)) = b.datagrams.get(next).cloned() {
            let datagram = &mut b.received[slot][at.clone()];
            if !proto::is_transport(datagram) && !b.opening.is_empty() {
                break;
            }
            next += 1;
            let addr = b.meta[slot].addr;
            match state.node.begin_ingress(now, addr, datagram, verdict) {
                IngressStep::Open(open) => b.opening.push(Opening {
                    slot,
                    at,
                    open,
                    opened: Err(OpenError::Forged),
                }),
                IngressStep::Initiation(job) => {
                    answering = Some((slot, at, job));
                    break;
                }
                IngressStep::Done(Ingress::Deliver { packet, .. }) => b
                    .plaintexts
                    .push((slot, at.start + packet.start..at.start + packet.end)),
                IngressStep::Done(_) => {}
            }
        }
        if b.opening.is_empty() && answering.is_none() {
            break;
        }
        shared.finish(&mut state, &mut b.transmits);
        drop(state);
        decrypt(&mut b.opening, &mut b.received);
        let answered = answering.map(|(slot, at, job)| {
            let work = job.run(&b.received[slot][at]);
            (b.meta[slot].addr, job, work)
        });
        state = shared.lock();
        admit(&mut state, now, b);
        if let Some((addr, job, work)) = answered {
            state.node.finish_initiation(now, addr, job, work);
        }
    }
    shared.finish(&mut state, &mut b.transmits);
}

/// Where the datagrams of one receive lie: with GRO, several of `stride` bytes each
/// (the last may be shorter). An empty datagram is one too: the node counts it as
/// malformed.
fn datagrams_in(meta: &RecvMeta) -> impl Iterator<Item = Range<usize>> {
    let len = meta.len;
    // Without GRO the stride is the whole datagram.
    let stride = if meta.stride == 0 { len } else { meta.stride }.max(1);
    (0..len.max(1))
        .step_by(stride)
        .map(move |start| start..(start + stride).min(len))
}

/// Decrypts every pending transport message in place; needs no lock.
fn decrypt(opening: &mut [Opening], received: &mut [Vec<u8>]) {
    for o in opening {
        o.opened = o.open.open(&mut received[o.slot][o.at.clone()]);
    }
}

/// Hands the decrypted messages to the node, in arrival order, and records where the
/// packets to deliver lie.
fn admit(state: &mut State, now: Instant, b: &mut Buffers) {
    for Opening {
        slot,
        at,
        open,
        opened,
    } in b.opening.drain(..)
    {
        let addr = b.meta[slot].addr;
        let datagram = &b.received[slot][at.clone()];
        if let Ingress::Deliver { packet, .. } =
            state.node.finish_ingress(now, addr, datagram, open, opened)
        {
            b.plaintexts
                .push((slot, at.start + packet.start..at.start + packet.end));
        }
    }
}

/// Writes the packets and super packets `packets` holds, and empties it; the packets of
/// a failed write are counted in `errors`. A kernel that refuses a super packet as
/// invalid gets no more of them: its segments are lost (TCP sends them again), and
/// later packets are written one by one.
async fn write_to_tun(tun: &Tun, packets: &mut Coalescer, errors: &TunWriteErrors) {
    let mut refused = false;
    for (write, carried) in packets.finish() {
        if let Err(e) = tun.send(write).await {
            refused |= carried > 1 && e.kind() == std::io::ErrorKind::InvalidInput;
            errors.record(&e, carried);
        }
    }
    if refused {
        packets.stop_joining();
        tracing::warn!(
            "the TUN device refused a super packet; writing packets one by one from now on"
        );
    }
}

/// Sends (and empties) the messages the node queued.
pub(super) async fn send_transmits(
    socket: &Udp,
    errors: &SendErrors,
    transmits: &mut Vec<Transmit>,
) {
    for transmit in transmits.drain(..) {
        send(socket, errors, &transmit.data, transmit.destination, None).await;
    }
}

/// Sends one datagram, or several of `segment` bytes each; a failure is counted and
/// reported, never dropped silently.
async fn send(
    socket: &Udp,
    errors: &SendErrors,
    datagrams: &[u8],
    destination: SocketAddr,
    segment: Option<usize>,
) {
    if let Err(e) = socket.send(destination, datagrams, segment).await {
        let count = segment.map_or(1, |s| datagrams.len().div_ceil(s.max(1)));
        errors.record(&e, destination, count);
    }
}
