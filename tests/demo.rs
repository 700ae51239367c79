//! The README's first command: `meshguard demo` runs the embedded two-node mesh, sees
//! every expected outcome (allowed and denied pings, an intact transfer, a denied port,
//! an unowned source dropped) and cleans up. Needs root; skips otherwise.

use std::process::Command;

use meshguard::testbed::require_root;

#[test]
fn the_demo_runs_through_with_every_expected_outcome() {
    if !require_root() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .arg("demo")
        .output()
        .expect("run meshguard demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Columns are padded; compare with runs of spaces folded.
    let folded = stdout
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for expected in [
        "web/frontend -> payments/payment-service passes (allowed)",
        "web/frontend -> payments/ledger dropped (denied)",
        "web/checkout -> payments/payment-service dropped (denied)",
        "web/checkout -> payments/ledger passes (allowed)",
        "sha256",
        "connect: dropped (denied)",
        "decision: deny",
        "dropped, nothing sent",
        "done; namespaces, devices and daemons are removed",
    ] {
        assert!(folded.contains(expected), "{expected:?} missing:\n{stdout}");
    }
}
