//! Benchmarks live in the scripts beside this crate (`benches/*.sh`); see benches/README.md.
