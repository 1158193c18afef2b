//! Operation sequences against the in-memory model on a fault-injecting device (redb's
//! fuzz_redb is the bar): the input decodes into operations and injected faults. After a
//! fault the pool is reopened and must hold a state the model allows; after every reopen and
//! at the end `check()` must be clean (no leak, no over-reference).
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::ops_fuzz::run(data));
