//! berth-vmm: Berth's virtual machine monitor, and its device backends for
//! external VMMs.

use berth_vmm::vhost_user;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "berth-vmm", version, about = "Berth's virtual machine monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a Berth device to an external VMM (QEMU) over vhost-user.
    #[command(name = "vhost-user", subcommand)]
    VhostUser(VhostUserDevice),
}

#[derive(Debug, Subcommand)]
enum VhostUserDevice {
    /// virtio-vsock, host side on unix sockets (Firecracker's convention).
    Vsock {
        /// The vhost-user socket the VMM connects to.
        #[arg(long)]
        socket: PathBuf,
        /// Host side of the device: connect here and send `CONNECT <port>`;
        /// guest connections to port P reach `<uds>_P`.
        #[arg(long)]
        uds: PathBuf,
        /// The guest's CID.
        #[arg(long, default_value_t = 3)]
        guest_cid: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::VhostUser(VhostUserDevice::Vsock {
            socket,
            uds,
            guest_cid,
        }) => vhost_user::vsock::serve(&socket, &uds, guest_cid).map(|m| {
            tracing::info!("vhost-user vsock: VMM disconnected; {m:?}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
