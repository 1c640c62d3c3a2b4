//! storbench: fio-style benchmark for storaged's devices, log, nodes and
//! cluster. See `storbench --help` and docs/performance.md.
//!
//! Exit codes (`--help` lists them): 0 success, 1 a failed run (the report
//! of what ran is still printed), 2 a usage error (clap's, for every bad
//! flag); after SIGINT, SIGTERM or SIGHUP (cluster engine) and on a closed
//! stdout it ends by the signal, once its local cluster is down.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use storaged::cli;
use storaged::{errln, out, outln};
use tools::bench::{self, BenchArgs, BenchError, Ending, JobStats, OutputFormat, report};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args = match BenchArgs::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    // Logs go to stderr so that JSON on stdout stays parseable.
    cli::init_logging("warn");
    let (jobs, ending) = match bench::run(&args) {
        Ok(jobs) => (jobs, None),
        Err(BenchError::Ended(ended)) => (ended.jobs, Some(ended.why)),
        Err(BenchError::Usage(msg)) => {
            errln!("storbench: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(BenchError::Failed(e)) if cli::is_stdout_closed(&e) => cli::die_of_sigpipe(),
        Err(BenchError::Failed(e)) => {
            errln!("storbench: error: {e:#}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    // --verify-only measures nothing: its verdict is on stderr and in the status.
    if !args.verify_only {
        match print_report(&args, &jobs) {
            Ok(()) => {}
            Err(e) if cli::is_stdout_closed(&e) => cli::die_of_sigpipe(),
            Err(e) => {
                errln!("storbench: error: {e:#}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    match ending {
        None => ExitCode::SUCCESS,
        Some(Ending::Failed(why)) => {
            errln!("storbench: error: {why}");
            ExitCode::from(EXIT_FAILED)
        }
        Some(Ending::Signal(signal)) => cli::die_of_signal(signal),
    }
}

fn print_report(args: &BenchArgs, jobs: &[JobStats]) -> anyhow::Result<()> {
    match args.output_format {
        OutputFormat::Json => {
            let report = report::fio_report(&args.name, jobs, args.group_reporting);
            let text = serde_json::to_string_pretty(&report)?;
            outln!("{text}")?;
        }
        OutputFormat::Normal => out!("{}", report::normal_report(&args.name, jobs, args.group_reporting))?,
    }
    Ok(())
}
