//! The compiled allow-list evaluator against the plain reference
//! (`testbed::policy_oracle`) on cases built from the fuzzer's bytes: every decision,
//! reason, deciding policy and rule, and AUDIT list must agree.
#![no_main]

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use meshguard::testbed::policy_oracle::{check_case, policy_case};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(case) = policy_case(&mut u) {
        if let Err(disagreement) = check_case(&case) {
            panic!("{disagreement}");
        }
    }
});
