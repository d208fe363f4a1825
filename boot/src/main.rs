//! `cargo vm` (being written).
fn main() {}
