//! Processes of a test: every wait has a deadline, and a process that overruns it is killed
//! and its stderr printed in the failure.

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// How long a `loopsync` command of a test may take, unless the test says otherwise.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `command` to its end within `deadline`, collecting stdout and stderr. On expiry the
/// process is killed and the test fails with `what` and everything the process wrote.
pub async fn output_within(
    command: &mut tokio::process::Command,
    deadline: Duration,
    what: &str,
) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    match tokio::time::timeout(deadline, child.wait()).await {
        Ok(status) => Output {
            status: status.unwrap_or_else(|e| panic!("{what}: wait: {e}")),
            stdout: stdout.await.unwrap_or_default(),
            stderr: stderr.await.unwrap_or_default(),
        },
        Err(_) => {
            let _ = child.kill().await;
            let out = String::from_utf8_lossy(&stdout.await.unwrap_or_default()).into_owned();
            let err = String::from_utf8_lossy(&stderr.await.unwrap_or_default()).into_owned();
            panic!(
                "{what}: still running after {deadline:?}, killed.\n--- stdout\n{out}\n--- stderr\n{err}"
            )
        }
    }
}

/// Reads a pipe to its end in a task of its own.
pub fn collect<R>(pipe: Option<R>) -> tokio::task::JoinHandle<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes).await;
        }
        bytes
    })
}

/// Polls `check` every 20 ms until it holds, for at most `deadline`; then fails with `what`
/// and what `explain` says about the state it saw last.
pub async fn until<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= end {
            panic!("{what}: not reached within {deadline:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
