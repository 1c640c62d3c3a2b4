//! computed: the single writer of a volume. Not built yet: the quorum writer
//! comes after the storage node's network service (see README, "Status").

fn main() -> std::process::ExitCode {
    eprintln!("computed: not implemented yet; see README.md, Status");
    std::process::ExitCode::from(2)
}
