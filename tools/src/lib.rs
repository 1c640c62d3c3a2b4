//! Library side of the operator tools, shared by the binaries and their tests.
//!
//! - [`bench`]: storbench's engines, fio-compatible reporting and argument parsing;
//! - [`devcluster`]: `storctl dev-cluster up|down`, a local cluster of real processes;
//! - [`repair`]: `storctl repair`, gap fill and segment moves, resumable;
//! - [`scrub`]: `storctl scrub`, a priority scrub pass on chosen nodes and its report;
//! - [`status`]: `storctl status`, a live view of a cluster.

pub mod bench;
pub mod devcluster;
pub mod repair;
pub mod scrub;
pub mod status;

/// `n` distinct addresses on 127.0.0.1 that nothing listens on (as tests
/// leave them): all bound at once, so the kernel gives `n` different
/// ports, then released. One at a time, it may give the same one twice.
#[cfg(test)]
pub(crate) fn closed_ports(n: usize) -> Vec<std::net::SocketAddr> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"))
        .collect();
    held.iter().map(|l| l.local_addr().expect("a bound address")).collect()
}
