//! Any text as Istio YAML (AuthorizationPolicy and PeerAuthentication documents): a
//! policy set or an error naming the key, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = meshguard::policy::parse_istio_yaml(text, Path::new("fuzz.yaml"));
    }
});
