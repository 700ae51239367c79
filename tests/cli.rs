//! The command line: keys interchangeable with `wg`, `check` summaries and errors, and
//! `up` starting nothing on a broken configuration.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use meshguard::testbed::{find_program, require_root, Netns};

fn meshguard(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// A copy of `config/` with key files made private, in a fresh directory.
fn example_config() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "meshguard-cli-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config"), &dir);
    for entry in std::fs::read_dir(dir.join("keys")).unwrap() {
        let path = entry.unwrap().path();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn genkey_and_pubkey_match_wg() {
    let private = text(&meshguard(&["genkey"], None).stdout);
    assert_eq!(private.len(), 44);
    let ours = meshguard(&["pubkey"], Some(&private));
    assert!(ours.status.success());
    let ours = text(&ours.stdout);
    assert_eq!(ours.len(), 44);
    assert_ne!(ours, private);
    if let Some(wg) = find_program("wg") {
        let mut child = Command::new(wg)
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(private.as_bytes())
            .unwrap();
        let theirs = text(&child.wait_with_output().unwrap().stdout);
        assert_eq!(ours, theirs, "meshguard pubkey and wg pubkey agree");
    }
    let bad = meshguard(&["pubkey"], Some("not a key"));
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("base64"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn check_prints_a_summary_of_the_examples() {
    let dir = example_config();
    let out = meshguard(
        &[
            "check",
            "--config",
            dir.join("node-a.toml").to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    for expected in [
        "node-a",
        "cluster.local/ns/payments/sa/payment-service",
        "cluster.local/ns/web/sa/checkout",
        "10.10.2.2/32",
    ] {
        assert!(
            summary.contains(expected),
            "{expected} missing from:\n{summary}"
        );
    }
    assert!(!summary.contains("STRICT"), "{summary}");

    // With the Istio example's STRICT PeerAuthentication for payments, check says which
    // identities get the plaintext filter.
    let node = dir.join("node-a.toml");
    let with_istio = std::fs::read_to_string(&node).unwrap().replace(
        "files = [\"policy-example.toml\"]",
        "files = [\"istio-example.yaml\"]",
    );
    std::fs::write(&node, with_istio).unwrap();
    let out = meshguard(&["check", "--config", node.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    for identity in ["payment-service", "ledger"] {
        let line = format!(
            "mTLS STRICT: cluster.local/ns/payments/sa/{identity}: plaintext to its addresses \
             is dropped (nftables table inet meshguard_mg0; needs the nft command)"
        );
        assert!(summary.contains(&line), "{line} missing from:\n{summary}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_names_file_key_and_reason() {
    let dir = example_config();
    let peer = dir.join("peers-a/node-b.toml");
    let broken = std::fs::read_to_string(&peer)
        .unwrap()
        .replace("10.10.2.1/32", "10.10.2.1/24");
    std::fs::write(&peer, broken).unwrap();
    let out = meshguard(
        &[
            "check",
            "--config",
            dir.join("node-a.toml").to_str().unwrap(),
        ],
        None,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("node-b.toml"), "{err}");
    assert!(err.contains("allowed_ips"), "{err}");
    assert!(err.contains("host bits"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn up_with_a_broken_config_starts_nothing() {
    if !require_root() {
        return;
    }
    let dir = example_config();
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("keys/a-ledger.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ns = Netns::new("cli").unwrap();
    let config = dir.join("node-a.toml");
    let out = ns
        .exec(
            env!("CARGO_BIN_EXE_meshguard"),
            ["up", "--config", config.to_str().unwrap()],
        )
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("a-ledger.key") && err.contains("chmod 600"),
        "{err}"
    );
    let links = text(&ns.exec("ip", ["-o", "link"]).unwrap().stdout);
    assert!(!links.contains("mg0"), "no device was created: {links}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn up_removes_its_device_on_exit() {
    if !require_root() {
        return;
    }
    let dir = example_config();
    let ns = Netns::new("clx").unwrap();
    let config = dir.join("node-a.toml");
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshguard"));
    command.args(["up", "--config", config.to_str().unwrap()]);
    // The example listens on 198.18.0.1: give the namespace that address.
    ns.ip(["address", "add", "198.18.0.1/32", "dev", "lo"])
        .unwrap();
    let daemon = ns.spawn(&command).unwrap();
    assert!(
        meshguard::testbed::wait_until(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(20),
            || daemon.read_stderr().contains("meshguard is up")
        ),
        "{}",
        daemon.read_stderr()
    );
    let routes = text(&ns.exec("ip", ["route"]).unwrap().stdout);
    assert!(routes.contains("10.10.2.1 dev mg0"), "{routes}");
    daemon
        .terminate_and_wait(std::time::Duration::from_secs(5))
        .unwrap();
    let links = text(&ns.exec("ip", ["-o", "link"]).unwrap().stdout);
    assert!(!links.contains("mg0"), "device removed: {links}");
    let routes = text(&ns.exec("ip", ["route"]).unwrap().stdout);
    assert!(!routes.contains("mg0"), "routes removed: {routes}");
    assert!(daemon.read_stderr().contains("meshguard stopping"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn policy_check_explains_decisions() {
    let dir = example_config();
    let config = dir.join("node-a.toml");
    let config = config.to_str().unwrap();
    let check = |from: &str, to: &str, port: &str| {
        let out = meshguard(
            &[
                "policy", "check", "--config", config, "--from", from, "--to", to, "--port", port,
            ],
            None,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let allowed = check("cluster.local/ns/web/sa/frontend", "10.10.1.1", "8080/tcp");
    assert!(allowed.starts_with("decision: allow"), "{allowed}");
    assert!(
        allowed.contains("payments/frontend-to-payment-service rule 0"),
        "{allowed}"
    );
    let wrong_port = check(
        "spiffe://cluster.local/ns/web/sa/frontend",
        "cluster.local/ns/payments/sa/payment-service",
        "9999/tcp",
    );
    assert!(wrong_port.starts_with("decision: deny"), "{wrong_port}");
    let legacy = check("cluster.local/ns/legacy/sa/old", "10.10.1.2", "icmp");
    assert!(
        legacy.contains("DENY policy istio-system/deny-legacy"),
        "{legacy}"
    );
    assert!(legacy.contains("not a configured peer"), "{legacy}");

    let bad = meshguard(
        &[
            "policy",
            "check",
            "--config",
            config,
            "--from",
            "frontend",
            "--to",
            "10.10.1.1",
            "--port",
            "8080/tcp",
        ],
        None,
    );
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("--from"),
        "{}",
        text(&bad.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_broken_policy_file_is_named_and_nothing_starts() {
    let dir = example_config();
    let policy = dir.join("policy-example.toml");
    let broken = std::fs::read_to_string(&policy).unwrap().replace(
        "namespaces = [\"legacy\"]",
        "namespaces = [\"legacy\"]\nmethods = [\"GET\"]",
    );
    std::fs::write(&policy, broken).unwrap();
    let config = dir.join("node-a.toml");
    let out = meshguard(&["check", "--config", config.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("policy-example.toml") && err.contains("methods"),
        "{err}"
    );
    if require_root() {
        let ns = Netns::new("clp").unwrap();
        let out = ns
            .exec(
                env!("CARGO_BIN_EXE_meshguard"),
                ["up", "--config", config.to_str().unwrap()],
            )
            .unwrap();
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("policy-example.toml"));
        let links = text(&ns.exec("ip", ["-o", "link"]).unwrap().stdout);
        assert!(!links.contains("mg0"), "no device was created: {links}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
