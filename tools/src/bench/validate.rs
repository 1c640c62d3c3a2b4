//! Flags that do not fit the engine, refused before anything runs, with a
//! message that names the flag. Values out of range for every engine are
//! refused by the parsers in [`args`](super::args); what depends on the engine
//! (or on two flags together) is checked here. Both are usage errors: exit
//! code 2, as clap's.

use storaged::io::BLOCK_SIZE;

use super::args::{BenchArgs, EngineKind, Rw, SyncMode};
use super::log_engine::entry_bytes_for;

/// Largest `--bs` of the uring engine: one SQE carries a u32 length; far
/// above useful sizes anyway.
pub const URING_BS_MAX_BYTES: u64 = 64 << 20;
/// Smallest `--bs` with --verify: each write starts with a unique header
/// (committer, sequence number, write index).
pub const VERIFY_BS_MIN_BYTES: u64 = 16;
/// Largest `--bs` of a node engine append: a record changes one 8 KiB page.
const NODE_BS_MAX_BYTES: u64 = 8192;

/// A flag the engine cannot use, or flags that do not fit together.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(UsageError(format!($($arg)*)))
    };
}

/// Checks `args` against its engine.
pub fn check(args: &BenchArgs) -> Result<(), UsageError> {
    let rw = args.rw();
    if args.engine != EngineKind::Uring {
        if args.sync != SyncMode::None {
            usage!(
                "--sync is for --engine uring: the log and node engines always write durably (--log-durability \
                 says how), and every commit of the cluster engine is durable on a write quorum"
            );
        }
        if args.fdatasync != 0 {
            usage!("--fdatasync is for --engine uring (the other engines always write durably)");
        }
    }
    if args.engine != EngineKind::Cluster {
        if args.verify || args.verify_only || args.verify_journal.is_some() {
            usage!("--verify, --verify-only and --verify-journal are for --engine cluster");
        }
        if rw == Rw::Commit {
            usage!(
                "--rw commit is for --engine cluster; --engine {} does {}",
                engine_name(args.engine),
                match args.engine {
                    EngineKind::Uring => "read, write, randread and randwrite",
                    EngineKind::Log => "write",
                    _ => "write and randread",
                }
            );
        }
    }
    match args.engine {
        EngineKind::Uring => check_uring(args),
        EngineKind::Log => check_log(args),
        EngineKind::Node => check_node(args),
        EngineKind::Cluster => check_cluster(args),
    }
}

fn engine_name(e: EngineKind) -> &'static str {
    match e {
        EngineKind::Uring => "uring",
        EngineKind::Log => "log",
        EngineKind::Node => "node",
        EngineKind::Cluster => "cluster",
    }
}

fn check_uring(args: &BenchArgs) -> Result<(), UsageError> {
    if args.filename.is_none() {
        usage!("--engine uring needs --filename FILE (a file or block device)");
    }
    if args.bs % BLOCK_SIZE as u64 != 0 || args.bs > URING_BS_MAX_BYTES {
        usage!(
            "--bs {}: --engine uring needs a multiple of {BLOCK_SIZE} (O_DIRECT alignment), at most {}m",
            args.bs,
            URING_BS_MAX_BYTES >> 20
        );
    }
    if args.time_based && args.runtime.is_none() {
        usage!("--time_based needs --runtime");
    }
    if args.fdatasync == 1 && args.sync == SyncMode::Dsync {
        usage!("--fdatasync=1 and --sync=dsync both make writes durable; pick one");
    }
    Ok(())
}

fn check_log(args: &BenchArgs) -> Result<(), UsageError> {
    if args.rw() != Rw::Write {
        usage!("--engine log appends: use --rw write (the default for this engine)");
    }
    if args.filename.is_none() {
        usage!("--engine log needs --filename DEVICE");
    }
    entry_bytes_for(args.bs).map_err(|e| UsageError(e.to_string()))?;
    check_log_limits(args)
}

/// --log-write-blocks and --log-writes-inflight together stay within what
/// the log engine keeps in flight.
fn check_log_limits(args: &BenchArgs) -> Result<(), UsageError> {
    let config = storaged::log::LogConfig {
        write_blocks_max: args.log_write_blocks,
        writes_inflight_max: args.log_writes_inflight,
        ..storaged::log::LogConfig::default()
    };
    config
        .validate()
        .map_err(|e| UsageError(format!("--log-write-blocks and --log-writes-inflight: {e}")))
}

fn check_node(args: &BenchArgs) -> Result<(), UsageError> {
    if args.filename.is_none() && args.node_addr.is_none() {
        usage!("--engine node needs --filename DEVICE or --node-addr ADDR");
    }
    match args.rw() {
        Rw::Write => {
            entry_bytes_for(args.bs).map_err(|e| UsageError(e.to_string()))?;
            if args.bs > NODE_BS_MAX_BYTES {
                usage!(
                    "--bs {}: --engine node records change one 8 KiB page; at most 8k",
                    args.bs
                );
            }
        }
        Rw::Randread => {
            if !(args.bs.is_power_of_two() && (512..=65536).contains(&args.bs)) {
                usage!(
                    "--bs {}: --engine node --rw randread takes the page size, a power of two from 512 to 64k",
                    args.bs
                );
            }
        }
        _ => usage!("--engine node appends (--rw write, the default) or reads pages (--rw randread)"),
    }
    if args.node_addr.is_none() {
        check_log_limits(args)?;
    }
    Ok(())
}

fn check_cluster(args: &BenchArgs) -> Result<(), UsageError> {
    let rw = args.rw();
    if args.verify_only {
        if args.verify_journal.is_none() {
            usage!("--verify-only reads back what a journal holds: give --verify-journal FILE");
        }
        if args.cluster.is_none() {
            usage!("--verify-only checks a running cluster: give --cluster FILE (a --local-cluster starts empty)");
        }
        if args.verify {
            usage!("--verify-only runs no commits: leave out --verify");
        }
        return Ok(());
    }
    if !matches!(rw, Rw::Commit | Rw::Randread) {
        usage!("--engine cluster runs --rw commit (the default) or --rw randread");
    }
    if args.verify && rw != Rw::Commit {
        usage!("--verify checks commits: use it with --rw commit");
    }
    if args.verify && args.bs < VERIFY_BS_MIN_BYTES {
        usage!(
            "--bs {}: --verify needs at least {VERIFY_BS_MIN_BYTES} bytes (a unique header in each write)",
            args.bs
        );
    }
    if args.verify_journal.is_some() && !args.verify {
        usage!(
            "--verify-journal records the commits --verify checks: give --verify (to record) or --verify-only \
             (to read back)"
        );
    }
    if args.cluster.is_none() && args.local_cluster.is_none() {
        usage!("--engine cluster needs --cluster FILE (a running cluster) or --local-cluster N (start one)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn check_of(argv: &[&str]) -> Result<(), UsageError> {
        let mut full = vec!["storbench"];
        full.extend_from_slice(argv);
        check(&BenchArgs::try_parse_from(full).expect("parses"))
    }

    fn refused(argv: &[&str], needle: &str) {
        match check_of(argv) {
            Ok(()) => panic!("{argv:?} was accepted"),
            Err(e) => assert!(e.0.contains(needle), "{argv:?}: `{needle}` not in `{}`", e.0),
        }
    }

    #[test]
    fn each_engine_takes_what_it_can_use() {
        check_of(&["--filename=f", "--bs=8k", "--sync=dsync"]).unwrap();
        check_of(&["--engine=log", "--filename=f", "--bs=128"]).unwrap();
        check_of(&["--engine=node", "--filename=f", "--bs=4k"]).unwrap();
        check_of(&["--engine=cluster", "--cluster=c", "--bs=3000"]).unwrap();
        check_of(&["--engine=cluster", "--cluster=c", "--verify", "--verify-journal=j"]).unwrap();
        check_of(&["--engine=cluster", "--cluster=c", "--verify-only", "--verify-journal=j"]).unwrap();

        refused(&["--filename=f", "--bs=3000"], "--bs 3000");
        refused(&["--bs=4k"], "--filename");
        refused(&["--engine=cluster", "--cluster=c", "--sync=dsync"], "--sync");
        refused(&["--engine=log", "--filename=f", "--sync=dsync"], "--sync");
        refused(&["--filename=f", "--rw=commit"], "--rw commit is for --engine cluster");
        refused(&["--engine=node", "--filename=f", "--bs=16k"], "--bs");
        refused(
            &["--engine=cluster", "--cluster=c", "--verify", "--bs=8"],
            "at least 16",
        );
        refused(&["--engine=cluster", "--cluster=c", "--verify-journal=j"], "--verify");
        refused(
            &["--engine=cluster", "--cluster=c", "--verify-only"],
            "--verify-journal",
        );
        refused(
            &[
                "--engine=cluster",
                "--local-cluster=6",
                "--verify-only",
                "--verify-journal=j",
            ],
            "--cluster FILE",
        );
        refused(&["--filename=f", "--verify"], "--engine cluster");
    }
}
