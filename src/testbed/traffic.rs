//! Traffic checks between namespaces: ping, a TCP bulk transfer with digests, UDP probes.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{context, Netns};

/// A transfer that makes no progress for this long fails (read/write timeouts, connect
/// and accept deadlines), so a broken tunnel fails a test in bounded time.
pub const TRANSFER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const CHUNK: usize = 64 * 1024;

/// Counts from `ping`'s summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
}

/// Runs `ping -n -q -c COUNT -W 1 -i 0.2 [-I SRC] DST` in `ns` and parses its summary.
/// Takes about `count * 0.2 s` when replies come, up to one more second when they do not.
pub fn ping_stats(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: IpAddr,
    count: u32,
) -> io::Result<PingStats> {
    let mut args = vec![
        "-n".to_owned(),
        "-q".to_owned(),
        "-c".to_owned(),
        count.max(1).to_string(),
        "-W".to_owned(),
        "1".to_owned(),
        "-i".to_owned(),
        "0.2".to_owned(),
    ];
    if let Some(src) = src {
        args.extend(["-I".to_owned(), src.to_string()]);
    }
    args.push(dst.to_string());
    let out = ns.exec("ping", &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_ping_summary(&stdout).ok_or_else(|| {
        io::Error::other(format!(
            "netns {}: ping {dst}: no summary ({}); stdout: {:?}; stderr: {:?}",
            ns.name(),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })
}

/// `"5 packets transmitted, 4 received, 20% packet loss, time 803ms"` → (5, 4).
fn parse_ping_summary(stdout: &str) -> Option<PingStats> {
    let line = stdout.lines().find(|l| l.contains("packets transmitted"))?;
    let mut parts = line.split(',');
    let first_number = |s: &str| s.split_whitespace().next()?.parse::<u32>().ok();
    let transmitted = first_number(parts.next()?)?;
    let received = first_number(parts.next()?)?;
    Some(PingStats {
        transmitted,
        received,
    })
}

/// True when at least one of `count` echo requests got a reply (ping's own exit-status
/// meaning). Errors (ping missing, bad arguments) count as false.
pub fn ping(ns: &Netns, src: Option<IpAddr>, dst: IpAddr, count: u32) -> bool {
    matches!(ping_stats(ns, src, dst, count), Ok(s) if s.received > 0)
}

/// True when every one of `count` echo requests got a reply.
pub fn ping_all(ns: &Netns, src: Option<IpAddr>, dst: IpAddr, count: u32) -> bool {
    matches!(ping_stats(ns, src, dst, count), Ok(s) if s.transmitted > 0 && s.received == s.transmitted)
}

/// What a [`tcp_transfer`] sent and what arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub sent_sha256: [u8; 32],
    pub received_sha256: [u8; 32],
    /// The client's address as the server saw it.
    pub client_addr: SocketAddr,
    /// From the start of the connect to the server having read everything.
    pub elapsed: Duration,
}

impl TransferReport {
    /// Everything sent arrived, unchanged.
    pub fn is_intact(&self) -> bool {
        self.sent_bytes == self.received_bytes && self.sent_sha256 == self.received_sha256
    }

    /// Goodput in bits per second (for logs; tests never assert timings).
    pub fn bits_per_second(&self) -> f64 {
        self.received_bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for TransferReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sent {} B sha256 {}, received {} B sha256 {}, {:.3} s ({:.1} Mbit/s)",
            self.client_addr,
            self.sent_bytes,
            hex(&self.sent_sha256),
            self.received_bytes,
            hex(&self.received_sha256),
            self.elapsed.as_secs_f64(),
            self.bits_per_second() / 1e6
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// xorshift64*: deterministic filler, so a transfer's content does not depend on a seed
/// crate and a corrupted byte anywhere changes the digest.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Sends `bytes` of pseudo-random data over TCP from `client` to a listener on
/// `server_addr` in `server` and returns both sides' byte counts and SHA-256 digests.
///
/// `server_addr` must name an address of `server` (port 0 picks a free port);
/// `client_bind` fixes the client's source address (port chosen by the kernel).
/// Every step fails after [`TRANSFER_IDLE_TIMEOUT`] without progress. A transfer that
/// completes with different digests is not an error: check [`TransferReport::is_intact`].
pub fn tcp_transfer(
    server: &Netns,
    server_addr: SocketAddr,
    client: &Netns,
    client_bind: Option<IpAddr>,
    bytes: usize,
) -> io::Result<TransferReport> {
    tcp_transfer_patient(
        server,
        server_addr,
        client,
        client_bind,
        bytes,
        TRANSFER_IDLE_TIMEOUT,
    )
}

/// [`tcp_transfer`] that waits up to `idle` for progress: over a lossy link TCP's
/// retransmission timer backs off to tens of seconds now and then.
pub fn tcp_transfer_patient(
    server: &Netns,
    server_addr: SocketAddr,
    client: &Netns,
    client_bind: Option<IpAddr>,
    bytes: usize,
    idle: Duration,
) -> io::Result<TransferReport> {
    let listener = server.tcp_listen(server_addr)?;
    let target = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let abort = Arc::new(AtomicBool::new(false));
    let server_abort = Arc::clone(&abort);
    let server_name = server.name().to_owned();
    let start = Instant::now();

    let server_thread = std::thread::Builder::new()
        .name("tcp-transfer-server".into())
        .spawn(
            move || -> io::Result<(u64, [u8; 32], Instant, SocketAddr)> {
                let deadline = Instant::now() + idle + Duration::from_secs(5);
                let (mut stream, client_addr) = loop {
                    match listener.accept() {
                        Ok(accepted) => break accepted,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if server_abort.load(Ordering::Relaxed) || Instant::now() >= deadline {
                                return Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("netns {server_name}: no connection on {target}"),
                                ));
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(e),
                    }
                };
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(idle))?;
                let mut hasher = Sha256::new();
                let mut total = 0u64;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            hasher.update(&buf[..n]);
                            total += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(context(
                                e,
                                format_args!("netns {server_name}: receiving after {total} bytes"),
                            ))
                        }
                    }
                }
                let done = Instant::now();
                // Tell the client everything arrived, then close.
                let _ = stream.write_all(&total.to_be_bytes());
                Ok((total, hasher.finalize().into(), done, client_addr))
            },
        )?;

    let client_result = send_pseudo_random(client, target, client_bind, bytes, idle);
    if client_result.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let server_result = match server_thread.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let ((sent_bytes, sent_sha256), (received_bytes, received_sha256, done, client_addr)) =
        match (client_result, server_result) {
            (Ok(c), Ok(s)) => (c, s),
            (Err(c), Ok(_)) => return Err(c),
            (Ok(_), Err(s)) => return Err(s),
            (Err(c), Err(s)) => {
                return Err(io::Error::new(
                    c.kind(),
                    format!("tcp transfer to {target}: client: {c}; server: {s}"),
                ))
            }
        };
    Ok(TransferReport {
        sent_bytes,
        received_bytes,
        sent_sha256,
        received_sha256,
        client_addr,
        elapsed: done.duration_since(start),
    })
}

/// Connects from `client` (optionally from `bind`) and writes `bytes` of xorshift data.
fn send_pseudo_random(
    client: &Netns,
    target: SocketAddr,
    bind: Option<IpAddr>,
    bytes: usize,
    idle: Duration,
) -> io::Result<(u64, [u8; 32])> {
    let mut stream = client
        .run(|| connect_within(target, bind, idle))?
        .map_err(|e| {
            context(
                e,
                format_args!("netns {}: connect to {target}", client.name()),
            )
        })?;
    stream.set_write_timeout(Some(idle))?;
    stream.set_read_timeout(Some(idle))?;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ bytes as u64);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0usize;
    while sent < bytes {
        let n = CHUNK.min(bytes - sent);
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        stream.write_all(&buf[..n]).map_err(|e| {
            context(
                e,
                format_args!("netns {}: sending after {sent} bytes", client.name()),
            )
        })?;
        sent += n;
    }
    stream.shutdown(Shutdown::Write)?;
    // Wait for the server's count, so the data really crossed before we return.
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack).map_err(|e| {
        context(
            e,
            format_args!("netns {}: waiting for the server", client.name()),
        )
    })?;
    Ok((sent as u64, hasher.finalize().into()))
}

/// Opens a TCP connection from `ns` (from `bind`, or the kernel's choice) to `target`,
/// failing after `timeout` without an answer. The stream stays usable from any thread.
pub fn tcp_connect(
    ns: &Netns,
    bind: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    ns.run(move || connect_within(target, bind, timeout))?
}

/// A blocking std `TcpStream` connected to `target` within `timeout`, optionally bound
/// to `bind` first (std cannot bind before connecting; tokio's `TcpSocket` can). Call
/// inside the client's namespace.
fn connect_within(
    target: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ip) = bind {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| context(e, format_args!("bind {ip}")))?;
        }
        let stream = tokio::time::timeout(timeout, socket.connect(target))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sends one datagram from `ns` (from `bind`, or the kernel's choice of source) to `dst`
/// and waits up to `timeout` for any datagram to come back to that socket.
/// `Ok(None)` means nothing arrived: use it to check that something stays silent. The
/// socket is not connected, so ICMP errors (port unreachable) are not reported as replies.
pub fn udp_roundtrip(
    ns: &Netns,
    bind: Option<IpAddr>,
    dst: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<Option<(Vec<u8>, SocketAddr)>> {
    let local = SocketAddr::new(bind.unwrap_or_else(|| unspecified_like(dst.ip())), 0);
    let socket = ns.udp_bind(local)?;
    socket
        .send_to(payload, dst)
        .map_err(|e| context(e, format_args!("netns {}: send to {dst}", ns.name())))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => return Ok(Some((buf[..n].to_vec(), from))),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(context(e, format_args!("netns {}: receive", ns.name()))),
        }
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// A UDP echo server in a namespace, on a background thread until dropped. Counts the
/// datagrams it received.
#[derive(Debug)]
pub struct UdpEcho {
    local: SocketAddr,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `addr` in `ns` and starts echoing.
    pub fn start(ns: &Netns, addr: SocketAddr) -> io::Result<UdpEcho> {
        let socket = ns.udp_bind(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let local = socket.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("udp-echo".into())
                .spawn(move || echo_loop(&socket, &received, &stop))?
        };
        Ok(UdpEcho {
            local,
            received,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (with the actual port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

fn echo_loop(socket: &UdpSocket, received: &AtomicU64, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            received.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Bytes of a stream both ends can produce: the receiver checks each one.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *byte = self.0 as u8;
        }
    }
}

/// A TCP stream from `client` to `server` at about 10 MB/s until stopped; the server
/// side checks every byte. For traffic that must pass unharmed while something changes.
pub struct PacedStream {
    stop: Arc<AtomicBool>,
    client: JoinHandle<std::io::Result<u64>>,
    server: JoinHandle<Result<u64, String>>,
}

impl PacedStream {
    /// Connects from `from` in `client_ns` to `target` (listened on in `server_ns`).
    pub fn start(
        client_ns: &Netns,
        from: IpAddr,
        server_ns: &Netns,
        target: SocketAddr,
    ) -> io::Result<PacedStream> {
        let listener = server_ns.tcp_listen(target)?;
        let mut client = tcp_connect(client_ns, Some(from), target, Duration::from_secs(5))?;
        let (mut server, _) = listener.accept()?;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let client = std::thread::spawn(move || -> std::io::Result<u64> {
            client.set_write_timeout(Some(Duration::from_secs(30)))?;
            let mut pattern = Pattern(0x5eed);
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            while !halt.load(Ordering::Relaxed) {
                pattern.fill(&mut chunk);
                client.write_all(&chunk)?;
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(6));
            }
            client.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        });
        let server = std::thread::spawn(move || -> Result<u64, String> {
            server
                .set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            let mut pattern = Pattern(0x5eed);
            let (mut buf, mut expected) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
            let mut received = 0u64;
            loop {
                let n = server
                    .read(&mut buf)
                    .map_err(|e| format!("after {received} bytes: {e}"))?;
                if n == 0 {
                    return Ok(received);
                }
                pattern.fill(&mut expected[..n]);
                if buf[..n] != expected[..n] {
                    return Err(format!("corrupted after {received} bytes"));
                }
                received += n as u64;
            }
        });
        Ok(PacedStream {
            stop,
            client,
            server,
        })
    }

    /// Stops the stream; returns (bytes sent, bytes received intact), or what broke it.
    pub fn finish(self) -> Result<(u64, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .client
            .join()
            .map_err(|_| "the sender panicked".to_owned())?
            .map_err(|e| format!("sending: {e}"))?;
        let received = self
            .server
            .join()
            .map_err(|_| "the receiver panicked".to_owned())??;
        Ok((sent, received))
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out =
            "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n--- 10.0.0.2 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n";
        assert_eq!(
            parse_ping_summary(out),
            Some(PingStats {
                transmitted: 3,
                received: 2
            })
        );
        let errors = "2 packets transmitted, 0 received, +2 errors, 100% packet loss, time 1001ms";
        assert_eq!(
            parse_ping_summary(errors),
            Some(PingStats {
                transmitted: 2,
                received: 0
            })
        );
        assert_eq!(
            parse_ping_summary("ping: connect: Network is unreachable"),
            None
        );
    }

    #[test]
    fn xorshift_is_deterministic_and_not_constant() {
        let mut a = XorShift(7);
        let mut b = XorShift(7);
        let (mut x, mut y) = ([0u8; 37], [0u8; 37]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert!(x.iter().any(|&v| v != x[0]));
    }
}
