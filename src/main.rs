//! The `mlops` binary: parse, run one command, render errors, map outcomes to exit codes.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = <cli::Cli as clap::Parser>::parse();
    match cli::run(args) {
        Ok(cli::Outcome::Success) => ExitCode::SUCCESS,
        Ok(cli::Outcome::GateFailed) => ExitCode::from(3),
        Err(err) => {
            if is_broken_pipe(&err) {
                // A closed pipe (`mlops inspect x | head`) is a normal way to stop.
                return ExitCode::SUCCESS;
            }
            cli::printer::to_stderr(format_args!("{}\n", cli::render_error(&err)));
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
