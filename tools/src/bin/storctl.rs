//! storctl: the operator's tool. Exit codes follow fsck: 0 clean, 1 problems
//! found and corrected, 4 problems left uncorrected, 8 operational error;
//! and 2, clap's, for a usage error (a bad flag).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use storaged::cli;
use storaged::inspect::inspect;
use storaged::io::uring::{UringConfig, UringDevice};
use storaged::{errln, out, outln};
use tools::devcluster::{self, UpOptions};
use tools::{repair, scrub, status};

const EXIT_CLEAN: u8 = 0;
const EXIT_UNCORRECTED: u8 = 4;
const EXIT_OPERATIONAL: u8 = 8;

#[derive(Parser)]
#[command(
    name = "storctl",
    version,
    about = "Operate the storage service: inspect devices, show a cluster's status, scrub it now, repair it, run a local dev cluster",
    after_help = "Exit status (fsck's): 0 clean; 1 problems found and corrected; 4 problems left uncorrected; \
                  8 operational error (the message says why); 2 usage error (a bad flag). Each command's \
                  --help says which it uses.\n\
                  Output into a closed pipe (`storctl status ... | head -1`) ends storctl quietly, as it ends \
                  cat: by SIGPIPE (a shell shows 141). Logs go to stderr, coloured only on a terminal without NO_COLOR."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline check of a device: superblocks, log anchor, log head and tail,
    /// record count, and a CRC check of every written block.
    ///
    /// Exit status: 0 clean, 4 corruption found (left as is), 8 the device
    /// could not be read or is not a storaged device. Never writes: opens
    /// the device read-only under a shared lock, so no writer can start
    /// while it reads. A device a writer (`storaged run`) already has open
    /// is still read, and the report says so first ("in use by pid N";
    /// JSON `in_use_by`): it is then a snapshot of a device being written.
    Inspect {
        /// Block device or file formatted by `storaged format`.
        #[arg(long)]
        device: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Online view of a cluster: per node up/down, epoch and scrubbing; per
    /// PG each segment's SCL and lag behind the PGCL; the volume's VCL and VDL.
    ///
    /// Each node is asked GetSegmentStatus (epoch 0, read-only) for every
    /// segment the placement puts on it; a node that does not answer within
    /// 3 s is down. A node whose Hello names another node id than the file
    /// gives its address has the wrong identity (swapped address lines):
    /// it is not asked, and its segments count as down. PGCL is the
    /// 4th-highest SCL of a PG's 6 (a down segment counts as 0); while a
    /// segment is being moved, the lower of that of the old set and the new.
    ///
    /// Membership: each PG's membership epoch and members, as its segments
    /// hold it, and a change under way (old and new sets).
    ///
    /// Scrubbing: each node is also asked ScrubStatus: its last completed
    /// scrub pass (number, when it ended, bytes read, damage found, repaired
    /// and left), a pass under way, and its damage counters since it
    /// started. A node that does not answer it (one that predates scrub)
    /// shows "scrub: unknown" and is not counted down for it.
    ///
    /// VDL: commits at or below it are durable and acknowledged (from
    /// computed). VCL: every LSN at or below it is on its PG's write quorum,
    /// or annulled; from computed's metrics endpoint when the cluster file
    /// names one (`vcl_source` "computed"), else derived from the SCLs as a
    /// lower bound ("derived"). After a recovery the VCL stands above the
    /// VDL by up to a million: the recovery annulled the LSNs above the VDL
    /// (listed in `annulled`), and the writer allocates above them.
    ///
    /// Exit status: 0 healthy; 4 problems (a node down or with the wrong
    /// identity, a PG below its write quorum of 4, a segment that lost
    /// records to a damaged log block, a segment with damaged page versions
    /// or whose node found a segment table slot damaged at start, a node
    /// whose scrubbing left damage unrepaired);
    /// 8 operational error
    /// (unreadable cluster file, computed unreachable: reported as a
    /// problem too).
    ///
    /// --json keys (stable): status ("healthy"|"problems"), problems [text],
    /// volume, vdl, vcl, vcl_source ("computed"|"derived"),
    /// annulled [{first, last}],
    /// computed {address, up, epoch, vdl, error},
    /// nodes [{id, address, az, up, epoch, wrong_identity, error,
    /// scrub {last_pass {pass, priority, started_unix_secs, ended_unix_secs,
    /// bytes_read, found, repaired, left}, running {pass, priority,
    /// bytes_done, bytes_total}, found_total, repaired_total, left_now},
    /// scrub_error, room {page_store_bytes, page_store_free_bytes, log_bytes,
    /// log_free_bytes}}],
    /// pgs [{pg, pgcl, segments_up, write_quorum,
    /// membership {epoch, changing, old [node], new [node]},
    /// segments [{node, up, scl, lag, epoch, highest_lsn, holes [{first, last}],
    /// damaged_pages [page], damaged_pages_total, table_damaged}]}].
    /// A PG's segments are the members of the newest membership its
    /// segments hold (both sets while a segment is being moved; nodes the
    /// placement does not name are asked too), else the placement's;
    /// membership is null when no segment holds one. PGCL and write_quorum
    /// count by every set of it.
    /// Unknown values (a node down) are null; wrong_identity is the id the
    /// node at that address gave, null when it is the right node; scrub is
    /// null when unknown (scrub_error says why for a node that is up), its
    /// last_pass null before a pass completed, its running null when none runs.
    #[command(verbatim_doc_comment)]
    Status {
        /// The cluster file (TOML).
        #[arg(long)]
        cluster: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify every log block and page version of the chosen segments now,
    /// repair what is damaged, and report per node and per segment.
    ///
    /// Each chosen node (every node of the cluster file by default) is asked
    /// for a priority scrub pass: its whole log, and every segment it holds
    /// (with --pg N, only the segment of PG N; a node the placement gives no
    /// segment of PG N is skipped). A pass reads at the node's scrub ceiling
    /// rate. A damaged block or page version is repaired from what the node
    /// still holds, else from a peer whose copy verifies. storctl asks each
    /// node every 200 ms how its pass stands, shows the bytes read over all
    /// nodes as a progress bar on a terminal (none with --json or when stderr
    /// is not a terminal), and reports once every pass completed: per node
    /// and per area (the log, each segment) blocks and page versions checked,
    /// damage found, repaired and left, and where each damage left lies
    /// (device offset, what, page, LSN, why it does not verify).
    ///
    /// A node that cannot be reached, refuses the pass, or does not answer
    /// within 3 s is named with the reason; the other nodes are still
    /// scrubbed and reported.
    ///
    /// Exit status: 0 clean; 1 damage found and all of it repaired; 4 damage
    /// left (not repaired); 8 operational error (the cluster file unreadable,
    /// a node unreachable, refusing or silent), which wins over 4 and 1;
    /// 2 usage error (a bad flag, or --node/--pg the cluster file does not
    /// have).
    ///
    /// --json keys (stable): status ("clean"|"repaired"|"damage_left"|"error"),
    /// volume, pg (null: every segment), found, repaired, left,
    /// nodes [{id, address, error, pass {pass, priority, started_unix_secs,
    /// ended_unix_secs, bytes_read, found, repaired, left,
    /// areas [{area ("log"|"segment"), volume, pg, blocks_checked,
    /// pages_checked, found, repaired, left,
    /// left_listed [{offset, what ("log_block"|"page_version"|"older_slot"|
    /// "page_map"), page, lsn, error}]}]}}].
    /// error is null for a node that was scrubbed, pass null for one that was
    /// not; page and lsn are null where the damage has none.
    #[command(verbatim_doc_comment)]
    Scrub {
        /// The cluster file (TOML).
        #[arg(long)]
        cluster: PathBuf,
        /// Only this node (an id of the cluster file).
        #[arg(long)]
        node: Option<u64>,
        /// Only the segments of this PG, on the nodes its membership names.
        #[arg(long)]
        pg: Option<u32>,
        /// Print the report as JSON (and no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Fill every gap of a PG now; move a PG's segment to another node, or
    /// roll a move back; or move every segment of a node.
    ///
    /// storctl repair --cluster FILE --pg N
    ///   Gap fill. Asks every member of PG N its SCL (storage nodes only:
    ///   works with computed down). The target is the PGCL when the run
    ///   starts; each member behind it is asked to fill its gaps from its
    ///   peers now, and storctl waits until every member that is up has
    ///   reached it.
    /// storctl repair --cluster FILE --pg N --replace F --with G
    ///   Move PG N's segment from node F to node G (G must not hold one):
    ///   computed makes the membership dual (old set with F, new set with
    ///   G; writes count by both), G copies the PG from its peers, then the
    ///   new set alone is the membership. A move to G already under way is
    ///   waited for.
    /// storctl repair --cluster FILE --pg N --abort
    ///   Roll the move under way back to the old set.
    /// storctl repair --cluster FILE --node F --with G
    ///   Move every segment of node F (each PG whose membership has F) to
    ///   G, all at once.
    ///
    /// Every node named must be in the cluster file (add it there first).
    /// Before a move starts, the new node is asked for its page store's
    /// room; a move it has no room for is refused, with nothing changed.
    /// Resumable and idempotent: nothing is kept by storctl; run it again
    /// after a crash of storctl, computed or a node, at any step, and it
    /// finishes the work or says exactly where it stands. A progress bar
    /// (a gap fill: LSNs filled; a move: bytes of the PGs' pages hydrated;
    /// rate, ETA) is drawn on stderr when stdout is a terminal and --json is
    /// not given.
    ///
    /// Exit status: 0 nothing needed (no gap; the move already done; no
    /// change to abort); 1 repaired, moved or rolled back; 4 could not
    /// finish within --timeout, the new node has no room or refused the
    /// segment, or computed refused the change (the message says why,
    /// where each PG stands, and what to run); 8
    /// operational error (cluster file unreadable, a node or PG it does
    /// not have, computed unreachable for a move or an abort, no node of
    /// the PG answering: the message says which); 2 usage error.
    ///
    /// --json keys (stable): status ("nothing_needed"|"repaired"|
    /// "not_finished"|"error"), action ("gap_fill"|"replace"|"abort"|"node"),
    /// error, pgs [{pg, result ("nothing_needed"|"repaired"|"moved"|"aborted"|
    /// "not_finished"|"error"), exit, message, membership {epoch, changing,
    /// old [node], new [node]}, pgcl, target, behind [{node, scl, up}]}].
    #[command(verbatim_doc_comment)]
    Repair {
        /// The cluster file (TOML).
        #[arg(long)]
        cluster: PathBuf,
        /// The PG to repair.
        #[arg(long, required_unless_present = "node", conflicts_with = "node")]
        pg: Option<u32>,
        /// Move this node's segment of --pg (needs --with).
        #[arg(long, value_name = "ID", requires_all = ["pg", "with"])]
        replace: Option<u64>,
        /// The node that takes the segment(s) over (with --replace or --node).
        #[arg(long = "with", value_name = "ID")]
        with: Option<u64>,
        /// Roll back the move of --pg under way.
        #[arg(long, requires = "pg", conflicts_with_all = ["replace", "with"])]
        abort: bool,
        /// Move every segment of this node (needs --with).
        #[arg(long, value_name = "ID", requires = "with")]
        node: Option<u64>,
        /// Wait at most this many seconds for the repair to finish (then exit 4).
        #[arg(long, value_name = "SECS", default_value_t = repair::TIMEOUT_DEFAULT.as_secs())]
        timeout: u64,
        /// Print the report as JSON (and no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Run a local cluster on 127.0.0.1 for development: `up` or `down`.
    #[command(name = "dev-cluster", subcommand)]
    DevCluster(DevClusterCommand),
}

#[derive(Subcommand)]
enum DevClusterCommand {
    /// Start N storaged and one computed in the background, on file devices
    /// under DIR; return once the cluster has acknowledged a commit.
    ///
    /// Writes DIR/cluster.toml, DIR/devN (one device per node), DIR/logs/NAME.log
    /// (each daemon's output) and DIR/pids/storaged-N.pid, DIR/pids/computed.pid.
    /// The daemons run detached (their own session) and outlive storctl.
    ///
    /// Without --keep the devices are formatted afresh: a new, empty volume
    /// (the devices of an earlier cluster in DIR are deleted). With --keep,
    /// the cluster of DIR/cluster.toml starts again on its existing devices
    /// and ports: computed recovers the volume and every commit acknowledged
    /// before is there (--nodes, --device-size, --pgs and --base-port are
    /// the file's then, and refused with --keep).
    ///
    /// `up` refuses a DIR whose daemons are still running: one its pid files
    /// name, or any process holding a lock on one of its devices (a node
    /// whose pid file was lost); it neither deletes nor reuses those devices.
    /// The volume's PG size is chosen so every node's page store holds its
    /// segments; a --device-size too small is refused.
    ///
    /// Needs `storaged` and `computed` next to storctl (`cargo build --release`).
    /// On failure (a port taken, a daemon exiting, no commit within 30 s) it
    /// stops what it started and names the daemon's log. Exit status: 0 up, 2 a flag out of range, 8 failed.
    #[command(verbatim_doc_comment)]
    Up {
        /// Directory for the cluster's devices, logs, pid files and cluster.toml.
        #[arg(long)]
        dir: PathBuf,
        /// Storage nodes (at least 6), in AZs az1..az3 round-robin.
        #[arg(long, default_value_t = devcluster::NODES_DEFAULT)]
        nodes: usize,
        /// Size of each node's file device, e.g. 128m (a quarter is log).
        #[arg(long = "device-size", value_parser = storaged::units::parse_bytes, default_value = "128m")]
        device_size: u64,
        /// Protection groups in the volume.
        #[arg(long, default_value_t = devcluster::PGS_DEFAULT)]
        pgs: u32,
        /// Use consecutive ports from this one (nodes, computed, computed's
        /// metrics) instead of free ports the kernel picks.
        #[arg(long = "base-port")]
        base_port: Option<u16>,
        /// Start the cluster of DIR/cluster.toml again on its existing
        /// devices, keeping the volume's data.
        #[arg(long, conflicts_with_all = ["nodes", "device_size", "pgs", "base_port"])]
        keep: bool,
    },
    /// Stop the cluster in DIR: SIGTERM every process of its pid files, wait
    /// up to 10 s, SIGKILL the rest, remove the pid files. Running it again,
    /// or on a DIR with no cluster, does nothing. Exit status: 0, or 8 if a
    /// process could not be stopped.
    Down {
        /// The directory `dev-cluster up --dir` was given.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    cli::init_logging("warn");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { device, json } => run_inspect(&device, json),
        Command::Status { cluster, json } => run_status(&cluster, json),
        Command::Scrub {
            cluster,
            node,
            pg,
            json,
        } => run_scrub(&cluster, node, pg, json),
        Command::Repair {
            cluster,
            pg,
            replace,
            with,
            abort,
            node,
            timeout,
            json,
        } => {
            let action = match (pg, replace, with, abort, node) {
                (Some(pg), None, None, false, None) => repair::Action::GapFill { pg },
                (Some(pg), Some(old), Some(new), false, None) => repair::Action::Replace { pg, old, new },
                (Some(pg), None, None, true, None) => repair::Action::Abort { pg },
                (None, None, Some(new), false, Some(old)) => repair::Action::Node { old, new },
                _ => <Cli as clap::CommandFactory>::command()
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        "--with goes with --replace ID (and --pg) or with --node ID",
                    )
                    .exit(),
            };
            run_repair(&cluster, &action, Duration::from_secs(timeout), json)
        }
        Command::DevCluster(DevClusterCommand::Up {
            dir,
            nodes,
            device_size,
            pgs,
            base_port,
            keep,
        }) => {
            // The sizes are checked before anything starts, as flags: a
            // bad one is a usage error (exit 2), not a failed start.
            if !keep && let Err(why) = devcluster::plan_geometry(nodes, pgs, device_size) {
                <Cli as clap::CommandFactory>::command()
                    .error(clap::error::ErrorKind::ValueValidation, why)
                    .exit()
            }
            run_up(UpOptions {
                dir,
                nodes,
                device_bytes: device_size,
                pgs,
                base_port,
                keep,
            })
        }
        Command::DevCluster(DevClusterCommand::Down { dir }) => run_down(&dir),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if cli::is_stdout_closed(&e) => cli::die_of_sigpipe(),
        Err(e) => {
            errln!("storctl: error: {e:#}");
            ExitCode::from(EXIT_OPERATIONAL)
        }
    }
}

fn run_status(path: &Path, json: bool) -> Result<u8> {
    let cluster = computed::cluster::Cluster::load(path)?;
    let s = status::collect(&cluster)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&s).context("encoding the report")?)?;
    } else {
        out!("{}", status::render(&s))?;
    }
    if let Some(e) = &s.computed.error {
        errln!("storctl: error: computed at {} is unreachable: {e}", s.computed.address);
        return Ok(EXIT_OPERATIONAL);
    }
    Ok(if s.healthy() { EXIT_CLEAN } else { EXIT_UNCORRECTED })
}

fn run_scrub(path: &Path, node: Option<u64>, pg: Option<u32>, json: bool) -> Result<u8> {
    let cluster = computed::cluster::Cluster::load(path)?;
    // The PG's segments say where they are now; the file only where they began.
    let members = match pg {
        Some(pg) if (pg as usize) < cluster.placement.len() => status::pg_members(&cluster, pg)?,
        _ => None,
    };
    let plan = match scrub::plan(&cluster, node, pg, members.as_deref()) {
        Ok(plan) => plan,
        // Flags the file does not have are usage errors, as bad flags are.
        Err(why) => <Cli as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::ValueValidation, why)
            .exit(),
    };
    let bar = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = scrub::run(&plan, bar)?;
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        )?;
    } else {
        out!("{}", scrub::render(&report))?;
    }
    for n in &report.nodes {
        if let Some(e) = &n.error {
            errln!("storctl: error: node {} ({}): {e}", n.id, n.address);
        }
    }
    Ok(report.exit_code())
}

fn run_repair(path: &Path, action: &repair::Action, timeout: Duration, json: bool) -> Result<u8> {
    let cluster = computed::cluster::Cluster::load(path)?;
    if let Err(why) = repair::check(&cluster, action) {
        errln!("storctl: error: {why}");
        return Ok(EXIT_OPERATIONAL);
    }
    let bar = !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let report = repair::run(&cluster, &path.display().to_string(), action, timeout, bar)?;
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        )?;
    } else {
        out!("{}", repair::render(&report))?;
    }
    if let Some(e) = &report.error {
        errln!("storctl: error: {e}");
    }
    for p in report.pgs.iter().filter(|p| p.exit == repair::EXIT_OPERATIONAL) {
        errln!("storctl: error: PG {}: {}", p.pg, p.message);
    }
    Ok(report.exit_code())
}

fn run_up(opts: UpOptions) -> Result<u8> {
    let c = devcluster::up(&opts)?;
    outln!(
        "dev cluster up in {}: {} storage nodes, computed on {}, {} PGs of {} pages{}",
        c.dir.display(),
        c.nodes,
        c.computed,
        c.geometry.pgs,
        c.geometry.pg_pages,
        if c.kept {
            " (on its existing devices: the volume recovered)"
        } else {
            ""
        }
    )?;
    outln!("  cluster file  {}", c.cluster_file.display())?;
    outln!("  logs          {}/logs/", c.dir.display())?;
    outln!("  status        storctl status --cluster {}", c.cluster_file.display())?;
    outln!("  stop          storctl dev-cluster down --dir {}", c.dir.display())?;
    Ok(EXIT_CLEAN)
}

fn run_down(dir: &Path) -> Result<u8> {
    let r = devcluster::down(dir)?;
    if r.stopped.is_empty() && r.killed.is_empty() {
        outln!("no dev cluster running in {}", dir.display())?;
    } else {
        outln!("stopped: {}", r.stopped.join(", "))?;
        if !r.killed.is_empty() {
            outln!("killed after {} s: {}", 10, r.killed.join(", "))?;
        }
    }
    Ok(EXIT_CLEAN)
}

fn run_inspect(path: &Path, json: bool) -> Result<u8> {
    // Read-only under a shared lock: no writer starts while it reads, and one
    // already running is named in the report.
    let config = UringConfig {
        open: storaged::io::device::OpenOptions {
            access: storaged::io::device::Access::Read,
            ..Default::default()
        },
        ..UringConfig::default()
    };
    let dev = Arc::new(UringDevice::open(path, &config)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut report = rt
        .block_on(inspect(&dev))
        .with_context(|| format!("inspecting {}", path.display()))?;
    report.in_use_by = dev.info().in_use_by.as_ref().map(Into::into);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        )?;
    } else {
        out!("{}", report.render())?;
    }
    Ok(if report.check.problems_found == 0 {
        EXIT_CLEAN
    } else {
        EXIT_UNCORRECTED
    })
}
