//! The snapvmm binary: parses the command line, builds the machine and runs
//! the controller loop. `anyhow` lives only here.

use std::process::ExitCode;

use clap::Parser;
use snapvmm::{cli, demo};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_tracing();
    let result = match cli.command {
        cli::Command::Demo(args) => demo::run(args),
        cli::Command::Run(args) => args.validate().and_then(snapvmm::run),
        cli::Command::ExportGuest { path } => std::fs::write(&path, refguest::ELF)
            .map(|_| 0)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display())),
        cli::Command::SquashImage { image, output } => squash(&image, &output),
    };
    tracing::debug!("exiting");
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("snapvmm: error: {}", snapvmm::describe(&e));
            ExitCode::from(1)
        }
    }
}

/// `squash-image`: a chain of incremental images into one full image.
fn squash(image: &std::path::Path, output: &std::path::Path) -> anyhow::Result<u8> {
    let chain = livesnap::chain::Chain::open(image)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", image.display()))?;
    let written = chain
        .squash(output)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
    println!(
        "{}: {} image(s) squashed, {} MiB of RAM written",
        output.display(),
        chain.len(),
        written >> 20
    );
    Ok(0)
}

/// Warnings and errors go to stderr by default; `SNAPVMM_LOG` (or else `RUST_LOG`)
/// sets the filter, e.g. `SNAPVMM_LOG=debug` shows pause latencies, `off` silences.
fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPVMM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
