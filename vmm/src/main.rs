//! The `vmm` binary: parse the command line, build the VM, run it, turn the outcome into an
//! exit code and at most one line on stderr.

use std::process::ExitCode;

use vmm::config::{parse_args, Command, USAGE};
use vmm::{MachineConfig, VmExit, Vmm};

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    // Quiet unless RUST_LOG asks; logs go to stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();

    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(cfg)) => cfg,
        Err(e) => return fail(e),
    };

    let vmm = match Vmm::build(MachineConfig::from_vm_config(&cfg)) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    match vmm.run() {
        Ok(VmExit::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Reboot { cause }) => {
            eprintln!("vmm: guest rebooted ({cause}); exiting");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Halted) => {
            eprintln!("vmm: guest halted");
            ExitCode::SUCCESS
        }
        Ok(VmExit::GuestPanic) => {
            eprintln!("vmm: guest kernel panicked");
            ExitCode::FAILURE
        }
        Ok(VmExit::Failed(msg)) => fail(msg),
        Err(e) => fail(e),
    }
}
