#![no_main]
//! Fuzz target: `isoformer_engine::testing::fuzz::fasta_index` must return on any input, never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    isoformer_engine::testing::fuzz::fasta_index(data);
});
