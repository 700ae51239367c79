//! Any text as a node file and as a peer file: loaded and validated (a clear error or a
//! configuration), never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("meshguard-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("peers")).expect("fuzz directory");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let node = dir().join("node.toml");
    std::fs::write(&node, text).expect("write");
    let _ = meshguard::config::load(&node);
    let peer = dir().join("peer.toml");
    std::fs::write(&peer, text).expect("write");
    let _ = meshguard::config::load_peer_file(&peer);
});
