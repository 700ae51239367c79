//! The compiled allow-list evaluator against a slow, plain reference of the same
//! semantics (`testbed::policy_oracle`), on random policies, identities and requests:
//! every decision, its reason, the deciding policy and rule, and the AUDIT policies must
//! agree. The fuzz target `policy_differential` runs the same check on fuzzed cases.

use arbitrary::Unstructured;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use meshguard::testbed::policy_oracle::{check_case, policy_case};

#[test]
fn the_evaluator_decides_as_the_reference_on_random_cases() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x9011c7);
    let mut bytes = vec![0u8; 4096];
    let (mut cases, mut requests, mut with_policies) = (0, 0, 0);
    for _ in 0..20_000 {
        rng.fill_bytes(&mut bytes);
        let mut u = Unstructured::new(&bytes);
        let Ok(case) = policy_case(&mut u) else {
            continue;
        };
        if let Err(disagreement) = check_case(&case) {
            panic!("case {cases}: {disagreement}");
        }
        cases += 1;
        requests += case.requests.len();
        with_policies += usize::from(!case.set.policies.is_empty());
    }
    eprintln!("{cases} cases ({with_policies} with policies), {requests} requests agree");
    assert!(cases > 19_000 && with_policies > 15_000);
}
