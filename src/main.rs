use clap::Parser;

use isoformer_engine::cli::{run, Cli};

fn main() -> std::process::ExitCode {
    restore_sigpipe();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Rust starts programs with SIGPIPE ignored, so printing into a closed pipe (`plan | head`) makes
/// `println!` panic. A command-line tool should end quietly instead, as Unix tools do: the default action.
#[cfg(target_os = "linux")]
fn restore_sigpipe() {
    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: sets the default action of one signal before any other thread exists; nothing else changes.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(target_os = "linux"))]
fn restore_sigpipe() {}
