//! Authentication micro-benchmarks (see the helper)
fn main() {}
