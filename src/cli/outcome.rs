//! How a command ends: the one place that prints a command's final error and picks
//! its exit code (0 done, 1 failed, 2 bad usage or config).

use std::process::ExitCode;

use crate::error::ErrorChain;

/// Why a command did not succeed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The command line or the config asks for something that cannot be: exit 2.
    Usage(String),
    /// The command ran and failed: exit 1.
    Failed(String),
    /// Failed, and what went wrong is already printed (check's lines, status's
    /// problems): exit 1.
    Reported,
}

/// A command's result.
pub(super) type Outcome = Result<(), Failure>;

impl Failure {
    /// A failure from an error, with its chain of causes.
    pub(super) fn of(e: &(dyn std::error::Error + 'static)) -> Failure {
        Failure::Failed(ErrorChain(e).to_string())
    }
}

impl From<crate::ops::OpError> for Failure {
    fn from(e: crate::ops::OpError) -> Failure {
        Failure::of(&e)
    }
}

/// Prints the failure and maps it to the exit code.
pub(super) fn exit(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Reported) => ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_by_failure() {
        assert_eq!(exit(Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit(Err(Failure::Usage("u".into()))), ExitCode::from(2));
        assert_eq!(exit(Err(Failure::Failed("f".into()))), ExitCode::from(1));
        assert_eq!(exit(Err(Failure::Reported)), ExitCode::from(1));
    }
}
