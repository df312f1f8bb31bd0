//! End to end through the real clients: the `berth` CLI, the `docker` CLI
//! (and docker-compose) on the forwarded socket, against one Berth VM that
//! all cases share. The VM runs with whatever driver `auto` picks: QEMU
//! with TCG on hosts without a usable hypervisor, `berth-vmm` elsewhere.
//!
//! A custom harness (`harness = false`): one boot, cases in order (later
//! ones restart and kill the VM), each reported as `case <name> ... ok`.
//! `cargo test -p berth-core --test e2e_docker -- <filter>` runs the cases
//! whose names contain `<filter>` (plus the setup they need).

mod e2e;

fn main() -> std::process::ExitCode {
    e2e::main()
}
