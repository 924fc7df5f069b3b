//! `lc`: command-line entry point. Parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use lc::api::Request;
use lc::Error;

const DEFAULT_SOCKET: &str = "/run/lc/control.sock";

#[derive(Parser)]
#[command(
    name = "lc",
    version,
    about = "Log-structured write-back cache for Linux block storage (LIO/TCMU)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: serve every TCMU device of subtype `lc` (user:lc backstores).
    Serve {
        /// Configuration file.
        #[arg(long, default_value = "/etc/lc/lc.toml")]
        config: PathBuf,
        /// Log level (overrides the config).
        #[arg(long, value_parser = ["error", "warning", "info", "debug"])]
        log_level: Option<String>,
    },
    /// Format a cache device (destroys its content).
    Format {
        /// Cache device: a block device or a regular file.
        device: PathBuf,
        /// Logical block size offered to initiators: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Segment size: a power of two from 64KiB to 4MiB.
        #[arg(long, default_value = "1MiB")]
        segment_size: String,
        /// On-disk format version: 2, or 1 for a cache that lc builds before format 2
        /// can open (a flush then seals a whole segment).
        #[arg(long, default_value_t = lc_cache::format::FORMAT_VERSION,
              value_parser = clap::value_parser!(u32).range(1..=2))]
        format_version: u32,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Format even if the device already holds an lc cache (its dirty data is lost).
        #[arg(long)]
        force: bool,
    },
    /// Read-only metadata check of a cache device (superblock and log).
    Check {
        /// Cache device.
        device: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Caches, LUNs and served devices of the running daemon.
    Status {
        #[command(flatten)]
        c: Conn,
    },
    /// Statistics of the running daemon's caches.
    Stats {
        /// Only this cache.
        cache: Option<String>,
        /// Prometheus text format (for node_exporter's textfile collector).
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
        #[command(flatten)]
        c: Conn,
    },
    /// Set a tunable of a cache (see docs/CONFIG.md).
    Set {
        /// Cache name.
        cache: String,
        /// Tunable name.
        key: String,
        /// New value.
        value: String,
        #[command(flatten)]
        c: Conn,
    },
    /// Seal the open segment of a cache and wait until everything is durable.
    Flush {
        /// Cache name.
        cache: String,
        #[command(flatten)]
        c: Conn,
    },
    /// Write the superblock of a cache now.
    Commit {
        /// Cache name.
        cache: String,
        #[command(flatten)]
        c: Conn,
    },
    /// Reset the access counters of a cache.
    ClearStats {
        /// Cache name.
        cache: String,
        #[command(flatten)]
        c: Conn,
    },
    /// Re-read /etc/lc/lc.toml in the running daemon (like SIGHUP or `systemctl
    /// reload lc`): new caches and LUNs come up, tunables and the log level change.
    Reload {
        #[command(flatten)]
        c: Conn,
    },
    /// Accept data lost to cache log damage: print what was lost (backing device and
    /// sector ranges), then let reads return the older data instead of failing.
    AcceptLoss {
        /// Cache name.
        cache: String,
        #[command(flatten)]
        c: Conn,
    },
    /// Print a shell completion script (e.g. `lc completions bash >
    /// /usr/share/bash-completion/completions/lc`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print a man page in roff: `lc` (lc(8), from these definitions) or `lc.toml`
    /// (lc.toml(5), from docs/CONFIG.md).
    Man {
        /// Which page.
        #[arg(value_parser = ["lc", "lc.toml"], default_value = "lc")]
        page: String,
    },
    /// Read every line a cache holds on its cache device and check it against its
    /// line checksum: rotten dirty lines are reported lost (as a read of them would
    /// find), rotten clean copies dropped.
    Scrub {
        /// Cache name.
        cache: String,
        #[command(flatten)]
        c: Conn,
    },
    /// Write back every dirty line of a LUN's backing device (the detach step).
    Drain {
        /// LUN name.
        lun: String,
        #[command(flatten)]
        c: Conn,
    },
}

#[derive(clap::Args)]
struct Conn {
    /// Control socket of the daemon.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve { config, log_level } => lc::config::load(&config)
            .map_err(Error::from)
            .and_then(|cfg| {
                let log = lc::cli::logger(log_level.as_deref().unwrap_or(&cfg.daemon.log_level));
                lc::daemon::serve(cfg, lc::daemon::Paths::default(), log)
            }),
        Cmd::Format {
            device,
            block_size,
            segment_size,
            format_version,
            yes,
            force,
        } => lc::units::parse_size(&segment_size)
            .map_err(Error::SegmentSize)
            .and_then(|s| u32::try_from(s).map_err(|_| Error::SegmentSizeTooLarge(s)))
            .and_then(|segment_size| {
                let args = lc::admin::FormatArgs {
                    device: &device,
                    block_size,
                    segment_size,
                    version: format_version,
                    yes,
                    force,
                };
                lc::admin::format(&args, &mut std::io::stdin().lock(), &mut std::io::stdout())
            }),
        Cmd::Check { device, json } => match lc::admin::check(&device, json) {
            Ok(o) => {
                print!("{}", o.text);
                if json {
                    println!();
                }
                return if o.clean {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
            }
            Err(e) => Err(e),
        },
        Cmd::Status { c } => lc::cli::run(&c.socket, Request::Status, c.json),
        Cmd::Stats {
            cache,
            prometheus: true,
            c,
        } => lc::cli::prometheus(&c.socket, cache),
        Cmd::Stats { cache, c, .. } => lc::cli::run(&c.socket, Request::Stats { cache }, c.json),
        Cmd::Set {
            cache,
            key,
            value,
            c,
        } => lc::cli::run(&c.socket, Request::Set { cache, key, value }, c.json),
        Cmd::Flush { cache, c } => lc::cli::run(&c.socket, Request::Flush { cache }, c.json),
        Cmd::Commit { cache, c } => lc::cli::run(&c.socket, Request::Commit { cache }, c.json),
        Cmd::ClearStats { cache, c } => {
            lc::cli::run(&c.socket, Request::ClearStats { cache }, c.json)
        }
        Cmd::Reload { c } => lc::cli::run(&c.socket, Request::Reload, c.json),
        Cmd::AcceptLoss { cache, c } => {
            lc::cli::run(&c.socket, Request::AcceptLoss { cache }, c.json)
        }
        Cmd::Drain { lun, c } => lc::cli::run(&c.socket, Request::Drain { lun }, c.json),
        Cmd::Scrub { cache, c } => lc::cli::run(&c.socket, Request::Scrub { cache }, c.json),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lc", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { page } => {
            let mut out = std::io::stdout();
            match page.as_str() {
                "lc.toml" => {
                    print!("{}", lc::man::config_page());
                    Ok(())
                }
                _ => clap_mangen::Man::new(Cli::command())
                    .section("8")
                    .render(&mut out)
                    .map_err(Error::from),
            }
        }
    };
    // The one place errors become text and exit codes.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lc: {e}");
            ExitCode::from(2)
        }
    }
}
