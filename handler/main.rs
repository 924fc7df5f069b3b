//! `lc`: command-line entry point. Parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Format {
            device,
            block_size,
            segment_size,
            yes,
            force,
        } => {
            let segment_size = match lc::units::parse_size(&segment_size)
                .and_then(|s| u32::try_from(s).map_err(|_| format!("segment size {s} too large")))
            {
                Ok(s) => s,
                Err(e) => return fail(&format!("--segment-size: {e}")),
            };
            let args = lc::admin::FormatArgs {
                device: &device,
                block_size,
                segment_size,
                yes,
                force,
            };
            let stdin = std::io::stdin();
            match lc::admin::format(&args, &mut stdin.lock(), &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Cmd::Check { device, json } => match lc::admin::check(&device, json) {
            Ok(o) => {
                print!("{}", o.text);
                if json {
                    println!();
                }
                if o.clean {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => fail(&e),
        },
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("lc: {msg}");
    ExitCode::from(2)
}
