//! Looking into running daemons with operators' tools: `wg show` over the userspace API
//! compared with the daemon's own report (`meshguard status --json`), the counters of a
//! wireguard-go peer, hostile userspace API clients, a killed daemon's sockets, the
//! Prometheus endpoint during a transfer (checked with `promtool`), readiness, the
//! threads' scheduling priority, and systemd's notifications and unit file. Needs root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshguard::ops::DaemonStatus;
use meshguard::testbed::{
    find_program, genkey, ping, require_root, tcp_transfer, unique_name, wait_until, IdentitySpec,
    Lan, MeshguardNode, Netns, NodeSpec, PeerEntry, TempDir, WgKind, WgPeer, ALLOW_ALL_POLICY,
};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshguard"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str, listen: &str, identities: Vec<IdentitySpec>, policy: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        listen: listen.parse().unwrap(),
        identities,
        policy: policy.into(),
        offload: true,
        workers: None,
    }
}

fn identity(principal: &str, address: &str) -> IdentitySpec {
    IdentitySpec::new(principal, &[&format!("{address}/32")])
}

/// `meshguard status --json` against a daemon's control socket.
fn status(daemon: &MeshguardNode) -> DaemonStatus {
    daemon.status(binary()).unwrap()
}

fn status_text(daemon: &MeshguardNode) -> String {
    let out = Command::new(binary())
        .args(["status", "--socket"])
        .arg(daemon.control_socket())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn wg(daemon: &MeshguardNode, args: &[&str]) -> String {
    let out = daemon.wg(args).unwrap();
    assert!(
        out.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One exchange on a userspace API socket: sends `request`, reads until the answer's
/// blank line or the close.
fn uapi(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The daemon may hang up before taking all of an oversized request.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"\n\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8(answer).unwrap()
}

/// A's view of one peer key, from `wg show all dump`.
#[derive(Debug, PartialEq)]
struct DumpPeer {
    endpoint: String,
    allowed_ips: Vec<String>,
    latest_handshake: u64,
    rx: u64,
    tx: u64,
}

/// `wg show all dump`: interface → (private key, public key, port), and
/// (interface, peer key) → peer.
type Dump = (
    BTreeMap<String, (String, String, String)>,
    BTreeMap<(String, String), DumpPeer>,
);

fn parse_dump(text: &str) -> Dump {
    let (mut interfaces, mut peers) = (BTreeMap::new(), BTreeMap::new());
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.len() {
            5 => {
                interfaces.insert(f[0].into(), (f[1].into(), f[2].into(), f[3].into()));
            }
            9 => {
                assert_eq!(f[2], "(none)", "no preshared key: {line}");
                assert_eq!(f[8], "off", "no persistent keepalive: {line}");
                let mut allowed_ips: Vec<String> = f[4].split(',').map(String::from).collect();
                allowed_ips.sort();
                peers.insert(
                    (f[0].into(), f[1].into()),
                    DumpPeer {
                        endpoint: f[3].into(),
                        allowed_ips,
                        latest_handshake: f[5].parse().unwrap(),
                        rx: f[6].parse().unwrap(),
                        tx: f[7].parse().unwrap(),
                    },
                );
            }
            _ => panic!("unexpected dump line {line:?}"),
        }
    }
    (interfaces, peers)
}

/// What `wg show all dump` should say, made from the daemon's own report.
fn dump_from_status(status: &DaemonStatus) -> BTreeMap<(String, String), DumpPeer> {
    let node = &status.node;
    let mut peers = BTreeMap::new();
    for pair in &node.pairs {
        let name = status.uapi_names[pair.local].clone().unwrap();
        let peer = &node.peers[pair.peer];
        for key in &peer.public_keys {
            let tunnels: Vec<_> = pair.tunnels.iter().filter(|t| t.peer_key == *key).collect();
            let mut allowed_ips: Vec<String> =
                peer.allowed_ips.iter().map(ToString::to_string).collect();
            allowed_ips.sort();
            peers.insert(
                (name.clone(), key.to_string()),
                DumpPeer {
                    endpoint: tunnels
                        .iter()
                        .find_map(|t| t.endpoint)
                        .map_or("(none)".into(), |e| e.to_string()),
                    allowed_ips,
                    latest_handshake: tunnels
                        .iter()
                        .filter_map(|t| t.traffic.last_handshake)
                        .max()
                        .map_or(0, |t| t.as_secs()),
                    rx: tunnels.iter().map(|t| t.traffic.rx_bytes).sum(),
                    tx: tunnels.iter().map(|t| t.traffic.tx_bytes).sum(),
                },
            );
        }
    }
    peers
}

#[test]
fn wg_show_says_what_the_daemon_reports() {
    if !require_root() {
        return;
    }
    let lan = Lan::new("opsl").unwrap();
    let (ns_a, ns_b) = (Netns::new("opsa").unwrap(), Netns::new("opsb").unwrap());
    lan.attach(&ns_a, "198.18.21.1/24").unwrap();
    lan.attach(&ns_b, "198.18.21.2/24").unwrap();
    let spec_a = node(
        "node-a",
        "198.18.21.1:51820",
        vec![
            identity("cluster.local/ns/shop/sa/a-one", "10.44.1.1"),
            identity("cluster.local/ns/shop/sa/a-two", "10.44.1.2"),
        ],
        ALLOW_ALL_POLICY,
    );
    let spec_b = node(
        "node-b",
        "198.18.21.2:51820",
        vec![
            identity("cluster.local/ns/shop/sa/b-one", "10.44.2.1"),
            identity("cluster.local/ns/shop/sa/b-two", "10.44.2.2"),
        ],
        ALLOW_ALL_POLICY,
    );
    let a =
        MeshguardNode::start(binary(), &ns_a, &spec_a, &[PeerEntry::for_node(&spec_b)]).unwrap();
    let _b =
        MeshguardNode::start(binary(), &ns_b, &spec_b, &[PeerEntry::for_node(&spec_a)]).unwrap();
    // Three of the four pairs talk; a-two never reaches b-two.
    for (from, to) in [
        ("10.44.1.1", "10.44.2.1"),
        ("10.44.1.1", "10.44.2.2"),
        ("10.44.1.2", "10.44.2.1"),
    ] {
        assert!(ping(&ns_a, Some(ip(from)), ip(to), 3), "{}", a.log());
    }

    // The dump and the report agree, read while nothing moves (read again if a
    // keepalive slipped in between).
    let agreed = wait_until(Duration::from_secs(20), Duration::from_millis(300), || {
        let before = wg(&a, &["show", "all", "dump"]);
        let report = status(&a);
        let after = wg(&a, &["show", "all", "dump"]);
        before == after && parse_dump(&before).1 == dump_from_status(&report)
    });
    let dump = wg(&a, &["show", "all", "dump"]);
    let report = status(&a);
    assert!(
        agreed,
        "wg show all dump:\n{dump}\nthe daemon's report:\n{:#?}",
        dump_from_status(&report)
    );
    let (interfaces, peers) = parse_dump(&dump);
    assert_eq!(
        interfaces.keys().collect::<Vec<_>>(),
        ["mg0.1", "mg0.2"],
        "{dump}"
    );
    for (index, spec) in spec_a.identities.iter().enumerate() {
        let (private, public, port) = &interfaces[&format!("mg0.{}", index + 1)];
        assert_eq!(*private, spec.private_key.to_base64());
        assert_eq!(*public, spec.public_key());
        assert_eq!(port, "51820");
    }
    assert_eq!(peers.len(), 4, "two identities, two peer identities each");
    let b_two = spec_b.identities[1].public_key();
    let silent = &peers[&("mg0.2".to_owned(), b_two)];
    assert_eq!((silent.latest_handshake, silent.rx, silent.tx), (0, 0, 0));
    for (key, peer) in &peers {
        if peer.latest_handshake > 0 {
            assert!(peer.rx > 0 && peer.tx > 0, "{key:?}: {peer:?}");
            assert_eq!(peer.endpoint, "198.18.21.2:51820");
        }
    }
    // `wg show IFACE latest-handshakes` and the human form work too.
    let handshakes = wg(&a, &["show", "mg0.1", "latest-handshakes"]);
    assert_eq!(handshakes.lines().count(), 2, "{handshakes}");
    assert!(
        handshakes.lines().all(|l| !l.ends_with("\t0")),
        "{handshakes}"
    );
    let human = wg(&a, &["show", "mg0.1"]);
    assert!(
        human.contains("interface: mg0.1") && human.contains("latest handshake"),
        "{human}"
    );
    // The status text says which wg interface is which principal.
    let text = status_text(&a);
    assert!(
        text.contains("identity cluster.local/ns/shop/sa/a-two (wg interface mg0.2)"),
        "{text}"
    );
    eprintln!("wg show all dump:\n{dump}\nmeshguard status:\n{text}");
}

#[test]
fn a_wireguard_go_peer_counts_the_same_bytes() {
    if !require_root() {
        return;
    }
    let (ns_mg, ns_wg) = (Netns::new("opgm").unwrap(), Netns::new("opgw").unwrap());
    let lan = Lan::new("opgl").unwrap();
    lan.attach(&ns_mg, "198.18.22.1/24").unwrap();
    lan.attach(&ns_wg, "198.18.22.2/24").unwrap();
    let mg = node(
        "meshguard",
        "198.18.22.1:51820",
        vec![identity("cluster.local/ns/ops/sa/mg", "10.45.0.1")],
        ALLOW_ALL_POLICY,
    );
    let (wg_private, wg_public) = genkey().unwrap();
    let peer = WgPeer::start(
        WgKind::WireguardGo,
        &ns_wg,
        &unique_name("wg"),
        &wg_private,
        51821,
        &["10.45.0.2/32"],
        Some(1420),
    )
    .unwrap();
    peer.add_peer(
        &mg.identities[0].public_key(),
        &["10.45.0.1/32"],
        Some(mg.listen),
        None,
    )
    .unwrap();
    let peer_file = PeerEntry {
        name: "wireguard-go".into(),
        endpoint: Some("198.18.22.2:51821".parse().unwrap()),
        persistent_keepalive: None,
        identities: vec![(
            "cluster.local/ns/ops/sa/go".into(),
            wg_public.clone(),
            vec!["10.45.0.2/32".into()],
        )],
        next_keys: Vec::new(),
    };
    let daemon = MeshguardNode::start(binary(), &ns_mg, &mg, &[peer_file]).unwrap();
    assert!(ping(&ns_wg, Some(ip("10.45.0.2")), ip("10.45.0.1"), 3));
    let report = tcp_transfer(
        &ns_mg,
        SocketAddr::new(ip("10.45.0.1"), 0),
        &ns_wg,
        Some(ip("10.45.0.2")),
        2_000_000,
    )
    .unwrap();
    assert!(report.is_intact(), "{report}");

    let counts = || {
        let ours = parse_dump(&wg(&daemon, &["show", "all", "dump"])).1;
        let ours = &ours[&("mg0".to_owned(), wg_public.clone())];
        let theirs = peer.peer(&mg.identities[0].public_key()).unwrap().unwrap();
        (ours.rx, ours.tx, theirs.rx_bytes, theirs.tx_bytes)
    };
    // Every datagram one side sent, the other received (a keepalive in flight may need
    // a moment).
    let mut last = counts();
    let matched = wait_until(Duration::from_secs(15), Duration::from_millis(300), || {
        last = counts();
        last.0 == last.3 && last.1 == last.2
    });
    assert!(
        matched,
        "meshguard rx/tx {} / {}, wireguard-go rx/tx {} / {}",
        last.0, last.1, last.2, last.3
    );
    eprintln!(
        "meshguard rx/tx {} / {} bytes = wireguard-go tx/rx {} / {}",
        last.0, last.1, last.3, last.2
    );
}

#[test]
fn hostile_uapi_clients_get_an_errno_and_a_killed_daemons_sockets_are_replaced() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("opsh").unwrap();
    let spec = node(
        "node-h",
        "127.0.0.1:51820",
        vec![identity("cluster.local/ns/ops/sa/h", "10.46.0.1")],
        ALLOW_ALL_POLICY,
    );
    let mut daemon = MeshguardNode::start(binary(), &ns, &spec, &[]).unwrap();
    let socket = daemon.uapi_dir().join("mg0.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is the daemon user's alone");
    let key = "ab".repeat(32);

    assert_eq!(
        uapi(&socket, b"hello\n"),
        "errno=-71\n\n",
        "not an operation"
    );
    assert_eq!(uapi(&socket, b"get=1\nx\n"), "errno=-22\n\n");
    let mut huge = vec![b'a'; 1 << 20];
    huge.push(b'\n');
    assert_eq!(uapi(&socket, &huge), "errno=-90\n\n", "a 1 MiB line");
    let set = format!("set=1\npublic_key={key}\nallowed_ip=10.9.0.0/16\nendpoint=198.18.9.9:1\n\n");
    assert_eq!(
        uapi(&socket, set.as_bytes()),
        "errno=-95\n\n",
        "not supported"
    );
    assert_eq!(uapi(&socket, b"set=1\nprivate_key=zz\n\n"), "errno=-22\n\n");
    assert_eq!(uapi(&socket, b"set=1\n\xff\xfe\n\n"), "errno=-71\n\n");
    // Clients that connect and say nothing do not stop the others.
    let idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let answer = uapi(&socket, b"get=1\n\n");
    assert!(answer.ends_with("errno=0\n\n"), "{answer}");
    drop(idle);
    // `wg set` is refused; nothing changed.
    let out = daemon.wg(["set", "mg0", "listen-port", "1234"]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not supported"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wg(&daemon, &["show", "mg0", "listen-port"]).trim() == "51820");
    assert!(daemon.process().is_running(), "{}", daemon.log());

    // Killed, the daemon leaves its sockets; started again, it takes them over.
    daemon.kill_and_restart(binary(), &ns).unwrap();
    assert!(
        daemon.log().contains("replacing a stale socket"),
        "{}",
        daemon.log()
    );
    let answer = uapi(&socket, b"get=1\n\n");
    assert!(answer.ends_with("errno=0\n\n"), "{answer}");
    assert_eq!(status(&daemon).name, "node-h");
    // Stopped, it removes them.
    daemon.stop().unwrap();
    assert!(!socket.exists());
    assert!(!daemon.control_socket().exists());
}

/// A value of the Prometheus text `text`: the sample named exactly `name` (labels
/// included).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_follow_a_transfer_and_a_denied_flow() {
    if !require_root() {
        return;
    }
    let promtool = find_program("promtool")
        .expect("promtool not found: install Debian's prometheus package (.ci/run does)");
    let lan = Lan::new("opml").unwrap();
    let (ns_a, ns_b) = (Netns::new("opma").unwrap(), Netns::new("opmb").unwrap());
    lan.attach(&ns_a, "198.18.23.1/24").unwrap();
    lan.attach(&ns_b, "198.18.23.2/24").unwrap();
    // B lets everything in but TCP port 7001.
    let b_policy = format!(
        "{ALLOW_ALL_POLICY}\n[[policy]]\nname = \"no-7001\"\nnamespace = \"istio-system\"\n\
         action = \"DENY\"\n[[policy.rules]]\n[[policy.rules.to]]\nports = [\"7001/tcp\"]\n"
    );
    let spec_a = node(
        "node-a",
        "198.18.23.1:51820",
        vec![identity("cluster.local/ns/shop/sa/client", "10.47.1.1")],
        ALLOW_ALL_POLICY,
    );
    let spec_b = node(
        "node-b",
        "198.18.23.2:51820",
        vec![identity("cluster.local/ns/shop/sa/server", "10.47.2.1")],
        &b_policy,
    );
    let _a =
        MeshguardNode::start(binary(), &ns_a, &spec_a, &[PeerEntry::for_node(&spec_b)]).unwrap();
    let b =
        MeshguardNode::start(binary(), &ns_b, &spec_b, &[PeerEntry::for_node(&spec_a)]).unwrap();
    assert_eq!(b.admin_get(&ns_b, "/healthz").unwrap().0, 200);
    assert_eq!(
        b.admin_get(&ns_b, "/ready").unwrap(),
        (200, "ready\n".into())
    );
    assert_eq!(b.admin_get(&ns_b, "/nothing").unwrap().0, 404);

    const BYTES: usize = 30_000_000;
    let transfer = std::thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            tcp_transfer(
                &ns_b,
                SocketAddr::new(ip("10.47.2.1"), 0),
                &ns_a,
                Some(ip("10.47.1.1")),
                BYTES,
            )
        });
        // Scraped while it runs: valid text every time.
        for _ in 0..5 {
            let (code, text) = b.admin_get(&ns_b, "/metrics").unwrap();
            assert_eq!(code, 200);
            assert!(sample(&text, "meshguard_flows").is_some(), "{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
        transfer.join().unwrap()
    });
    let report = transfer.unwrap();
    assert!(report.is_intact(), "{report}");
    // A connection to the denied port goes nowhere and is counted.
    let denied = meshguard::testbed::tcp_connect(
        &ns_a,
        Some(ip("10.47.1.1")),
        "10.47.2.1:7001".parse().unwrap(),
        Duration::from_secs(2),
    );
    assert!(denied.is_err(), "port 7001 is denied");

    let (_, text) = b.admin_get(&ns_b, "/metrics").unwrap();
    let dir = TempDir::new("metrics").unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        check.status.success() && check.stderr.is_empty() && check.stdout.is_empty(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let pair = "local=\"cluster.local/ns/shop/sa/server\",peer=\"cluster.local/ns/shop/sa/client\",peer_node=\"node-a\"";
    let received = sample(
        &text,
        &format!("meshguard_peer_received_bytes_total{{{pair}}}"),
    )
    .unwrap();
    // The payload, plus per packet its IP and TCP headers and WireGuard's 32 bytes and
    // padding: a few percent.
    assert!(
        received >= BYTES as f64 && received <= BYTES as f64 * 1.10,
        "{received} bytes counted for a {BYTES}-byte transfer"
    );
    let decisions = |action: &str| {
        sample(
            &text,
            &format!(
                "meshguard_policy_decisions_total{{source=\"cluster.local/ns/shop/sa/client\",destination=\"cluster.local/ns/shop/sa/server\",action=\"{action}\"}}"
            ),
        )
        .unwrap()
    };
    assert!(decisions("deny") >= 1.0, "{text}");
    assert!(decisions("allow") >= 1.0, "{text}");
    assert!(sample(&text, "meshguard_dropped_total{reason=\"policy_denied\"}").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "meshguard_handshakes_total{result=\"completed\"}"),
        Some(1.0)
    );
    eprintln!(
        "{BYTES}-byte transfer: B counted {received} bytes received ({:.2} %)",
        (received / BYTES as f64 - 1.0) * 100.0
    );
}

/// (policy, real-time priority) of each thread of `pid` whose name starts with `name`:
/// fields 41 and 40 of `/proc/<pid>/task/<tid>/stat`.
fn thread_scheduling(pid: u32, name: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        if !comm.starts_with(name) {
            continue;
        }
        found.push(task_scheduling(&task));
    }
    found
}

/// (policy, real-time priority) of the thread at `/proc/<pid>/task/<tid>`.
fn task_scheduling(task: &Path) -> (u32, u32) {
    let stat = std::fs::read_to_string(task.join("stat")).unwrap();
    // The fields after the command name, which may hold spaces, start at field 3.
    let fields: Vec<u32> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .skip(37)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    (fields[1], fields[0])
}

const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

fn lone_node(name: &str, principal: &str, address: &str) -> NodeSpec {
    NodeSpec {
        workers: Some(2),
        ..node(
            name,
            "127.0.0.1:51820",
            vec![identity(principal, address)],
            ALLOW_ALL_POLICY,
        )
    }
}

/// A script that runs meshguard without CAP_SYS_NICE and with an RLIMIT_RTPRIO of
/// `rtprio`, written into `dir`.
fn without_sys_nice(dir: &TempDir, rtprio: u32) -> std::path::PathBuf {
    let wrapper = dir.path().join(format!("meshguard-rtprio-{rtprio}"));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-sys_nice --inh-caps=-sys_nice -- \
             prlimit --rtprio={rtprio}:{rtprio} {} \"$@\"\n",
            binary().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wrapper
}

/// Starts a daemon with two workers through `program`; returns it with the
/// (policy, priority) of its main thread and of its runtime's threads.
fn start_and_look(
    program: &Path,
    tag: &str,
    address: &str,
) -> (MeshguardNode, Netns, Vec<(u32, u32)>) {
    let ns = Netns::new(&format!("ops{tag}")).unwrap();
    let principal = format!("cluster.local/ns/ops/sa/{tag}");
    let spec = lone_node(&format!("node-{tag}"), &principal, address);
    let daemon = MeshguardNode::start(program, &ns, &spec, &[]).unwrap();
    let threads = main_and_runtime_threads(&daemon);
    (daemon, ns, threads)
}

/// (policy, priority) of the daemon's main thread and of its runtime's threads.
fn main_and_runtime_threads(daemon: &MeshguardNode) -> Vec<(u32, u32)> {
    let pid = daemon.process().pid();
    let mut threads = thread_scheduling(pid, "meshguard");
    assert_eq!(threads.len(), 1);
    let workers = thread_scheduling(pid, "tokio-rt-worker");
    assert!(workers.len() >= 2, "{workers:?}");
    threads.extend(workers);
    threads
}

#[test]
fn threads_take_the_lowest_real_time_priority_when_the_kernel_allows_it() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("rt").unwrap();
    let mut programs = vec![(binary().to_owned(), "rt", "10.49.0.1")];
    // As the systemd unit runs it: without CAP_SYS_NICE, with LimitRTPRIO=1. Raising the
    // limit takes CAP_SYS_RESOURCE, which some sandboxes withhold even from root.
    let raised = Command::new("prlimit")
        .args(["--rtprio=1:1", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if raised {
        programs.push((without_sys_nice(&dir, 1), "rtlim", "10.49.0.2"));
    } else {
        eprintln!("not tried: an RLIMIT_RTPRIO of 1 without CAP_SYS_NICE (cannot raise the limit)");
    }
    for (program, tag, address) in programs {
        let (daemon, _ns, threads) = start_and_look(&program, tag, address);
        assert!(threads.iter().all(|&t| t == (SCHED_FIFO, 1)), "{threads:?}");
        assert!(status(&daemon).realtime);
        let text = status_text(&daemon);
        assert!(text.contains("2 workers at real-time priority"), "{text}");
        assert!(daemon.log().contains("threads run at real-time priority"));
    }

    // Without CAP_SYS_NICE and with an RLIMIT_RTPRIO of 0 the kernel refuses: the daemon
    // comes up all the same, at normal priority, and says why.
    let (daemon, _ns, threads) = start_and_look(&without_sys_nice(&dir, 0), "nort", "10.49.0.3");
    assert!(
        threads.iter().all(|&t| t == (SCHED_OTHER, 0)),
        "{threads:?}"
    );
    assert!(!status(&daemon).realtime);
    let text = status_text(&daemon);
    assert!(text.contains("2 workers at normal priority"), "{text}");
    let log = daemon.log();
    assert!(
        log.contains("WARN")
            && log
                .contains("threads run at normal priority: real-time priority needs CAP_SYS_NICE"),
        "{log}"
    );

    // Told `scheduling = "normal"`, it does not ask.
    let (mut daemon, ns, _) = start_and_look(binary(), "rtoff", "10.49.0.4");
    let config = daemon.config_path().to_owned();
    let text = std::fs::read_to_string(&config).unwrap();
    let normal = text.replacen("[interface]", "[interface]\nscheduling = \"normal\"", 1);
    std::fs::write(&config, normal).unwrap();
    daemon.kill_and_restart(binary(), &ns).unwrap();
    let threads = main_and_runtime_threads(&daemon);
    assert!(
        threads.iter().all(|&t| t == (SCHED_OTHER, 0)),
        "{threads:?}"
    );
    assert!(!status(&daemon).realtime);
    let log = daemon.log();
    assert!(
        log.contains("threads run at normal priority (interface.scheduling = \"normal\")")
            && !log.contains("WARN"),
        "{log}"
    );
}

/// Sets `key = value` in the daemon's `[interface]` and restarts it.
fn restart_with_interface_key(daemon: &mut MeshguardNode, ns: &Netns, key: &str, value: &str) {
    let config = daemon.config_path().to_owned();
    let text = std::fs::read_to_string(&config).unwrap();
    let changed = text.replacen("[interface]", &format!("[interface]\n{key} = {value}"), 1);
    std::fs::write(&config, changed).unwrap();
    daemon.kill_and_restart(binary(), ns).unwrap();
}

#[test]
fn a_thread_over_its_real_time_share_drops_to_normal_priority_until_traffic_stops() {
    if !require_root() {
        return;
    }
    // One worker: the main thread runs everything and must raise itself again, on a
    // timer. Two: the runtime's threads, and the main thread that measures them.
    for (workers, tag, address) in [(1, "shr1", "10.49.0.5"), (2, "shr2", "10.49.0.6")] {
        let ns = Netns::new(&format!("ops{tag}")).unwrap();
        let principal = format!("cluster.local/ns/ops/sa/{tag}");
        let spec = NodeSpec {
            workers: Some(workers),
            ..lone_node(&format!("node-{tag}"), &principal, address)
        };
        let mut daemon = MeshguardNode::start(binary(), &ns, &spec, &[]).unwrap();
        // A tenth of a core: far below what the flood takes, far above what answering
        // the test's status requests does.
        restart_with_interface_key(&mut daemon, &ns, "realtime_share_percent", "10");
        let text = status_text(&daemon);
        let expected = format!(
            "{workers} worker{} at real-time priority up to 10 % of a core each (over it",
            if workers == 1 { "" } else { "s" }
        );
        assert!(text.contains(&expected), "{text}");
        let pid = daemon.process().pid();
        // The threads that took real-time priority: the main thread, and with several
        // workers the runtime's (threads the daemon starts otherwise run at normal
        // priority from the start).
        let threads = || {
            let mut all = vec![task_scheduling(Path::new(&format!(
                "/proc/{pid}/task/{pid}"
            )))];
            if workers > 1 {
                all.extend(thread_scheduling(pid, "tokio-rt-worker"));
            }
            all
        };
        // Starting up may have taken more than the share for a while.
        let settled = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            threads().iter().all(|&t| t == (SCHED_FIFO, 1))
        });
        assert!(
            settled,
            "not at real-time priority after starting: {:?}",
            threads()
        );
        let before = status(&daemon).realtime_drops;

        // Garbage at the listening port, as fast as one thread sends it: each datagram
        // is received, looked at and dropped, most of a core.
        let flooder = ns.udp_bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let port: SocketAddr = "127.0.0.1:51820".parse().unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = flooder.send_to(&[0xa5u8; 200], port);
                }
            })
        };
        let dropped = wait_until(Duration::from_secs(20), Duration::from_millis(10), || {
            threads().contains(&(SCHED_OTHER, 0))
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flood.join().unwrap();
        assert!(dropped, "no thread at normal priority during the flood");
        assert!(
            status(&daemon).realtime_drops > before,
            "workers {workers}: {:?}",
            threads()
        );

        // No traffic at all now: every thread is raised again.
        let raised = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            threads().iter().all(|&t| t == (SCHED_FIFO, 1))
        });
        assert!(raised, "threads left at normal priority: {:?}", threads());
        assert!(status(&daemon).realtime);
    }
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("opsn").unwrap();
    let dir = TempDir::new("notify").unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let spec = node(
        "node-n",
        "127.0.0.1:51820",
        vec![identity("cluster.local/ns/ops/sa/n", "10.48.0.1")],
        ALLOW_ALL_POLICY,
    );
    let peer = PeerEntry {
        name: "elsewhere".into(),
        endpoint: Some("127.0.0.1:51821".parse().unwrap()),
        persistent_keepalive: None,
        identities: vec![(
            "cluster.local/ns/ops/sa/other".into(),
            IdentitySpec::new("cluster.local/ns/ops/sa/other", &[]).public_key(),
            vec!["10.48.1.0/24".into()],
        )],
        next_keys: Vec::new(),
    };
    let notify = socket_path.to_str().unwrap();
    let daemon = MeshguardNode::start_with_env(
        binary(),
        &ns,
        &spec,
        &[peer],
        &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "400000")],
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    // By then the device, its address and the peer's route are there.
    let routes = String::from_utf8(ns.ip(["route", "show", "dev", "mg0"]).unwrap().stdout).unwrap();
    assert!(routes.contains("10.48.1.0/24"), "{routes}");
    let addresses =
        String::from_utf8(ns.ip(["addr", "show", "dev", "mg0"]).unwrap().stdout).unwrap();
    assert!(addresses.contains("10.48.0.1"), "{addresses}");
    // Watchdog pings at half the interval.
    assert_eq!(next(), "WATCHDOG=1\n");
    assert_eq!(next(), "WATCHDOG=1\n");
    daemon.stop().unwrap();
    let mut stopping = next();
    while stopping == "WATCHDOG=1\n" {
        stopping = next();
    }
    assert_eq!(stopping, "STOPPING=1\n");
}

#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = find_program("systemd-analyze") else {
        if std::env::var_os("MESHGUARD_REQUIRE_ROOT").is_some() {
            panic!("systemd-analyze not found");
        }
        eprintln!("skipping: systemd-analyze not found");
        return;
    };
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/systemd/meshguard.service"
    ))
    .unwrap();
    for needed in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "LimitRTPRIO=1",
        "DeviceAllow=/dev/net/tun",
        "ProtectSystem=strict",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(needed), "{needed} missing");
    }
    // Verified with ExecStart pointing at this build (verify wants the program to exist).
    let dir = TempDir::new("unit").unwrap();
    let path = dir.path().join("meshguard.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/meshguard", binary().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
