//! Self-tests of the testbed. They need root; without it they print why and pass.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Names in `ip netns list` (lines look like `name (id: 3)` or `name`).
fn netns_list() -> Vec<String> {
    let out = run_checked(&mut command("ip", ["netns", "list"])).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Whether `pid` is still a process running `program` (a reaped pid may be reused by
/// something else; that does not count).
fn still_running(pid: u32, program: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(program))
}

fn interfaces_in(ns: &Netns) -> String {
    ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .unwrap()
        .unwrap()
}

/// Skips (or, with MESHGUARD_REQUIRE_ROOT, fails) when an implementation is missing.
fn require_peer(kind: WgKind) -> bool {
    if kind.is_available() {
        return true;
    }
    if std::env::var_os(REQUIRE_ROOT_ENV).is_some_and(|v| v != "0") {
        panic!("{} or wg is not installed", kind.program_name());
    }
    eprintln!("skipping: {} or wg is not installed", kind.program_name());
    false
}

#[test]
fn unique_names_fit_interfaces_and_differ() {
    let a = unique_name("veryverylongprefix");
    let b = unique_name("veryverylongprefix");
    assert_ne!(a, b);
    assert!(a.len() <= MAX_IFNAME_LEN, "{a}");
    assert!(unique_name("a-b c").starts_with("abc-"));
    assert!(unique_name("--").starts_with("t-"));
}

#[test]
fn cidr_helpers() {
    assert_eq!(parse_cidr("198.18.0.1/24").unwrap(), (ip("198.18.0.1"), 24));
    assert_eq!(parse_cidr("fd00::1").unwrap(), (ip("fd00::1"), 128));
    assert!(parse_cidr("10.0.0.1/33").is_err());
    assert!(parse_cidr("nope/8").is_err());
    assert_eq!(cidr_network("10.1.2.3/24").unwrap(), "10.1.2.0/24");
    assert_eq!(cidr_network("10.1.2.3/0").unwrap(), "0.0.0.0/0");
    assert_eq!(cidr_network("10.1.2.3").unwrap(), "10.1.2.3/32");
    assert_eq!(cidr_network("fd00:1::5/64").unwrap(), "fd00:1::/64");
}

#[test]
fn wait_until_times_out_and_succeeds() {
    let start = Instant::now();
    assert!(!wait_until(
        Duration::from_millis(50),
        Duration::from_millis(10),
        || false
    ));
    assert!(start.elapsed() >= Duration::from_millis(50));
    let mut n = 0;
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(1),
        || {
            n += 1;
            n == 3
        }
    ));
}

/// Test 1: two namespaces over a veth, ping both ways; plus the other plain-veth tools.
#[test]
fn veth_ping_both_ways() {
    if !require_root() {
        return;
    }
    let a = Netns::new("tba").unwrap();
    let b = Netns::new("tbb").unwrap();
    let link = Link::new(&a, "198.18.0.1/24", &b, "198.18.0.2/24", Some(1400)).unwrap();
    assert_eq!(link.a_ip(), Some(ip("198.18.0.1")));

    assert!(ping_all(&a, None, ip("198.18.0.2"), 2));
    assert!(ping_all(&b, Some(ip("198.18.0.2")), ip("198.18.0.1"), 2));
    // An address nobody has: no reply, and the answer comes in bounded time.
    assert!(!ping(&a, None, ip("198.18.0.99"), 1));

    // `run` really is inside the namespace: it sees this namespace's veth end only.
    let a_devs = interfaces_in(&a);
    assert!(a_devs.contains(link.a_if()), "{a_devs}");
    assert!(!a_devs.contains(link.b_if()), "{a_devs}");
    let mtu = a.exec_ok("cat", [format!("/sys/class/net/{}/mtu", link.a_if())]);
    assert_eq!(String::from_utf8_lossy(&mtu.unwrap().stdout).trim(), "1400");

    // Sysctls are per namespace.
    a.sysctl_set("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(a.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(b.sysctl_get("net.ipv4.ip_forward").unwrap(), "0");

    // exec_ok errors carry the output.
    let err = a.exec_ok("ip", ["link", "show", "nosuchdev0"]).unwrap_err();
    assert!(err.to_string().contains("nosuchdev0"), "{err}");

    // UDP: an echo answers; a port where nothing listens stays silent.
    let echo = UdpEcho::start(&b, sock("198.18.0.2:7000")).unwrap();
    let reply = udp_roundtrip(
        &a,
        Some(ip("198.18.0.1")),
        echo.local_addr(),
        b"hello",
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(reply, Some((b"hello".to_vec(), echo.local_addr())));
    assert_eq!(echo.received(), 1);
    let silent = udp_roundtrip(
        &a,
        None,
        sock("198.18.0.2:7001"),
        b"anyone?",
        Duration::from_millis(300),
    )
    .unwrap();
    assert_eq!(silent, None);

    // TCP with a chosen source address among two.
    a.ip(["addr", "add", "198.18.0.11/24", "dev", link.a_if()])
        .unwrap();
    let report = tcp_transfer(
        &b,
        sock("198.18.0.2:0"),
        &a,
        Some(ip("198.18.0.11")),
        300_000,
    )
    .unwrap();
    assert!(report.is_intact(), "{report}");
    assert_eq!(report.received_bytes, 300_000);
    assert_eq!(report.client_addr.ip(), ip("198.18.0.11"));

    // A client that cannot even start fails fast, and the server gives up with it.
    let t = Instant::now();
    let err =
        tcp_transfer(&b, sock("198.18.0.2:0"), &a, Some(ip("198.18.0.99")), 1000).unwrap_err();
    assert!(err.to_string().contains("198.18.0.99"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // A cable pulled: nothing gets through.
    link.set_up(false).unwrap();
    assert!(!ping(&a, None, ip("198.18.0.2"), 1));
    link.set_up(true).unwrap();
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || ping(&a, None, ip("198.18.0.2"), 1)
    ));
}

#[test]
fn lan_connects_three_nodes() {
    if !require_root() {
        return;
    }
    let lan = Lan::new("tbsw").unwrap();
    let nodes: Vec<Netns> = (0..3).map(|_| Netns::new("tbn").unwrap()).collect();
    for (i, node) in nodes.iter().enumerate() {
        lan.attach(node, &format!("198.19.0.{}/24", i + 1)).unwrap();
    }
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..nodes.len() {
            if i != j {
                let dst = ip(&format!("198.19.0.{}", j + 1));
                assert!(ping(node, None, dst, 1), "node {i} -> {dst}");
            }
        }
    }
    let names: Vec<String> = nodes
        .iter()
        .map(|n| n.name().to_owned())
        .chain([lan.switch().name().to_owned()])
        .collect();
    drop(nodes);
    drop(lan);
    let left = netns_list();
    assert!(names.iter().all(|n| !left.contains(n)), "{left:?}");
}

/// Test 3 (panic path): a test that panics still removes its namespaces and processes.
#[test]
fn cleanup_after_panic() {
    if !require_root() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let ns = Netns::new("tbp").unwrap();
        let other = Netns::new("tbp").unwrap();
        let _link = Link::new(&ns, "198.18.1.1/30", &other, "198.18.1.2/30", None).unwrap();
        let child = ns
            .spawn(std::process::Command::new("sleep").arg("1000"))
            .unwrap();
        assert!(child.is_running());
        // `ip netns exec` joins the namespace a moment after the spawn returns.
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(5),
            || ns.pids().unwrap() == vec![child.pid()]
        ));
        tx.send((
            vec![ns.name().to_owned(), other.name().to_owned()],
            child.pid(),
        ))
        .unwrap();
        panic!("deliberate panic to test cleanup");
    });
    assert!(result.is_err());
    let (names, pid) = rx.recv().unwrap();
    let left = netns_list();
    assert!(names.iter().all(|n| !left.contains(n)), "{left:?}");
    assert!(!still_running(pid, "sleep"), "pid {pid} still runs");
}

/// A guard that outlives its namespace: the namespace stops the process when it goes.
#[test]
fn netns_drop_stops_its_processes() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("tbk").unwrap();
    let name = ns.name().to_owned();
    let mut child = ns
        .spawn(std::process::Command::new("sleep").arg("1000"))
        .unwrap();
    child.set_grace(Duration::from_millis(500));
    drop(ns);
    assert!(!child.is_running());
    assert!(!still_running(child.pid(), "sleep"));
    assert!(!netns_list().contains(&name));
}

#[test]
fn child_guard_output_and_status() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("tbc").unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "echo out; echo err >&2; echo $TB_VAR; exec sleep 1000",
    ])
    .env("TB_VAR", "from-env");
    let child = ns.spawn(&cmd).unwrap();
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || child.read_stdout().contains("from-env")
    ));
    assert!(child.stderr_path().exists());
    let out = child.terminate_and_wait(Duration::from_secs(2)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\nfrom-env\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert!(!out.status.success());
    assert!(!child.is_running());
    assert!(!still_running(child.pid(), "sleep"));
}

/// Test 2: wireguard-go in one namespace and boringtun-cli in another, peers of each
/// other: ping both ways through the tunnel, then 2 MB over TCP with matching digests.
/// Test 3: afterwards no namespace, process, interface or socket of this test remains.
#[test]
fn wireguard_go_and_boringtun_cli_interoperate() {
    if !require_root() || !require_peer(WgKind::WireguardGo) || !require_peer(WgKind::BoringtunCli)
    {
        return;
    }
    let started = Instant::now();
    let a = Netns::new("tbwa").unwrap();
    let b = Netns::new("tbwb").unwrap();
    let link = Link::new(&a, "198.18.2.1/24", &b, "198.18.2.2/24", None).unwrap();

    let (a_priv, a_pub) = genkey().unwrap();
    let (b_priv, b_pub) = genkey().unwrap();
    let a_if = unique_name("wga");
    let b_if = unique_name("wgb");
    let wg_a = WgPeer::start(
        WgKind::WireguardGo,
        &a,
        &a_if,
        &a_priv,
        51820,
        &["10.77.0.1/24"],
        None,
    )
    .unwrap();
    let wg_b = WgPeer::start(
        WgKind::BoringtunCli,
        &b,
        &b_if,
        &b_priv,
        0,
        &["10.77.0.2/24"],
        None,
    )
    .unwrap();
    assert_eq!(wg_a.public_key(), a_pub);
    assert_ne!(wg_b.listen_port(), 0);
    wg_a.add_peer(
        &b_pub,
        &["10.77.0.2/32"],
        Some(SocketAddr::new(link.b_ip().unwrap(), wg_b.listen_port())),
        None,
    )
    .unwrap();
    wg_b.add_peer(
        &a_pub,
        &["10.77.0.1/32"],
        Some(SocketAddr::new(link.a_ip().unwrap(), wg_a.listen_port())),
        None,
    )
    .unwrap();
    let setup = started.elapsed();

    // The first packet triggers the handshake; give it a few seconds.
    let first = Instant::now();
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        ping(&a, None, ip("10.77.0.2"), 1)
    });
    let handshake = first.elapsed();
    assert!(
        up,
        "no ping a -> b through the tunnel\nA:\n{}\n{}\nB:\n{}\n{}",
        wg_a.show().unwrap_or_default(),
        wg_a.process().read_stderr(),
        wg_b.show().unwrap_or_default(),
        wg_b.process().read_stdout(),
    );
    assert!(ping_all(&a, None, ip("10.77.0.2"), 3));
    assert!(ping_all(&b, None, ip("10.77.0.1"), 3));
    assert!(wg_a.latest_handshake(&b_pub).unwrap().is_some());
    assert!(wg_b.latest_handshake(&a_pub).unwrap().is_some());
    assert!(wg_a.show().unwrap().contains(&b_pub));
    let b_seen_by_a = wg_a.peer(&b_pub).unwrap().unwrap();
    assert_eq!(b_seen_by_a.allowed_ips, ["10.77.0.2/32"]);
    assert!(b_seen_by_a.rx_bytes > 0);
    let a_seen_by_b = wg_b.peer(&a_pub).unwrap().unwrap();
    assert!(a_seen_by_b.last_handshake.unwrap() <= std::time::SystemTime::now());

    let transfer = tcp_transfer(
        &b,
        sock("10.77.0.2:5201"),
        &a,
        Some(ip("10.77.0.1")),
        2 * 1024 * 1024,
    )
    .unwrap();
    assert!(transfer.is_intact(), "{transfer}");
    assert_eq!(transfer.received_bytes, 2 * 1024 * 1024);
    // And the other way.
    let back = tcp_transfer(&a, sock("10.77.0.1:5201"), &b, None, 2 * 1024 * 1024).unwrap();
    assert!(back.is_intact(), "{back}");
    eprintln!(
        "interop: setup {:.2} s, first ping {:.2} s, a->b {transfer}, b->a {back}, total {:.2} s",
        setup.as_secs_f64(),
        handshake.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Cleanup, in the worst order: namespaces first.
    let names = [a.name().to_owned(), b.name().to_owned()];
    let pids = [
        (wg_a.process().pid(), "wireguard-go"),
        (wg_b.process().pid(), "boringtun-cli"),
    ];
    let sockets = [wg_a.socket_path(), wg_b.socket_path()];
    drop(a);
    drop(b);
    assert!(sockets.iter().all(|s| s.exists()), "peers keep running");
    drop(wg_a);
    wg_b.stop().unwrap();
    drop(link);
    let left = netns_list();
    assert!(names.iter().all(|n| !left.contains(n)), "{left:?}");
    for (pid, program) in pids {
        assert!(!still_running(pid, program), "{program} ({pid}) still runs");
    }
    for socket in &sockets {
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
    assert!(!Path::new(&format!("/sys/class/net/{a_if}")).exists());
}

#[test]
fn only_names_of_the_testbeds_scheme_count_as_leftovers() {
    assert_eq!(super::creator_of("iow-287f-2e"), Some(0x287f));
    assert_eq!(
        super::creator_of(&unique_name("netns")),
        Some(std::process::id())
    );
    assert_eq!(super::creator_of("cni-1234"), None);
    assert_eq!(super::creator_of("my-ns-abc"), None);
    assert_eq!(super::creator_of("a-b-zz"), None);
}
