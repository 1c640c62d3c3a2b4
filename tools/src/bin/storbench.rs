//! storbench: fio-style benchmark for storaged's devices (and, later, its log
//! and cluster). See `storbench --help` and docs/performance.md.
//!
//! Exit codes: 0 success, 1 bad arguments or a failed run, 2 an engine that
//! is not built yet.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use tools::bench::{self, BenchArgs, BenchError, OutputFormat, report};

fn main() -> ExitCode {
    let args = match BenchArgs::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                // fio exits 1 on bad options; so do we (clap's default is 2).
                _ => ExitCode::from(1),
            };
        }
    };
    // Logs go to stderr so that JSON on stdout stays parseable.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match bench::run(&args) {
        Ok(jobs) => {
            match args.output_format {
                OutputFormat::Json => {
                    let report = report::fio_report(&args.name, &jobs, args.group_reporting);
                    match serde_json::to_string_pretty(&report) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("storbench: error: cannot serialize the report: {e}");
                            return ExitCode::from(1);
                        }
                    }
                }
                OutputFormat::Normal => {
                    print!("{}", report::normal_report(&args.name, &jobs, args.group_reporting));
                }
            }
            ExitCode::SUCCESS
        }
        Err(BenchError::NotBuilt(engine)) => {
            eprintln!("storbench: --engine {engine} is not built yet");
            ExitCode::from(2)
        }
        Err(BenchError::Failed(e)) => {
            eprintln!("storbench: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
