//! Any bytes as a userspace API request, line by line as the daemon reads it: an
//! operation or an errno, never a panic; a set request always answers an errno.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshguard::ops::uapi::{Operation, SetRequest, EINVAL, EMSGSIZE, EOPNOTSUPP, EPROTO};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let Some(first) = lines.next() else {
        return;
    };
    if Operation::parse(first) != Ok(Operation::Set) {
        return;
    }
    let mut request = SetRequest::default();
    for line in lines {
        if !request.line(line) {
            break;
        }
    }
    assert!([EINVAL, EMSGSIZE, EOPNOTSUPP, EPROTO].contains(&request.errno()));
});
