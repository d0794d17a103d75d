//! A throwaway NATS JetStream server that a test owns: it can stop, kill and restart it.
//!
//! [`NatsServer::start`] runs the binary named by `LOOPSYNC_TEST_NATS_BIN`, else `nats-server`
//! from `PATH`, as `-js -sd <temporary folder>` on a free loopback port, and returns once the
//! server answers JetStream's API. [`NatsServer::restart`] brings it back on the same port and
//! with the same store, as an operator restarting the server would. On drop the server is killed
//! and its folder removed. Its log (every start appends to it) is in [`NatsServer::log`], for a
//! failing test's message.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

/// How long a start, a restart or a stop may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// A `nats-server -js` process on loopback, with its own store folder.
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// `--auth TOKEN` when started with a token.
    token: Option<String>,
    /// `-c FILE` when started with a config file: then it is ready when its log says so (a
    /// server that asks for TLS or a user cannot be asked in the plain protocol).
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server. `None` (the test is skipped) when there is no binary, except under CI,
    /// where that fails the test.
    pub async fn start() -> Option<NatsServer> {
        NatsServer::start_with_token(None).await
    }

    /// [`NatsServer::start`] with a config file's `text` besides (`tls { … }`,
    /// `authorization { … }`, with absolute paths).
    pub async fn start_with_config(text: &str) -> Option<NatsServer> {
        let mut server = NatsServer::prepared(None)?;
        let config = server.dir.join("nats.conf");
        std::fs::write(&config, text).expect("write the NATS config");
        server.config = Some(config);
        server.spawn().await;
        Some(server)
    }

    /// [`NatsServer::start`], the server asking clients for `token` (`--auth`).
    pub async fn start_with_token(token: Option<&str>) -> Option<NatsServer> {
        let mut server = NatsServer::prepared(token)?;
        server.spawn().await;
        Some(server)
    }

    /// A server not started yet: its port, its folder.
    fn prepared(token: Option<&str>) -> Option<NatsServer> {
        let bin = binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir = std::env::temp_dir().join(crate::unique("loopsync-nats-"));
        std::fs::create_dir_all(dir.join("store")).expect("create the NATS folder");
        Some(NatsServer {
            bin,
            port,
            dir,
            child: None,
            token: token.map(str::to_owned),
            config: None,
        })
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether the server process is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything the server logged since its first start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGTERM, and waits until the server has exited (it flushes its store first).
    pub async fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal("-TERM");
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if child.try_wait().expect("wait for nats-server").is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "nats-server did not stop within {DEADLINE:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = None;
        self.note("stopped (SIGTERM)");
    }

    /// SIGSTOP: the server keeps its connections open but answers nothing, as a hung host
    /// would, until [`NatsServer::thaw`] (or a kill).
    /// Returns once every thread of the server is stopped: `kill` returns when the signal is
    /// sent, and a thread still running could answer one more request.
    pub fn freeze(&self) {
        self.signal("-STOP");
        let pid = self.child.as_ref().expect("a running nats-server").id();
        let stopped = || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return true; // no procfs: the signal has to do
            };
            tasks.flatten().all(|task| {
                // `pid (comm) S …`: the state follows the command's closing parenthesis.
                std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')').is_some_and(|(_, rest)| {
                        matches!(rest.trim_start().chars().next(), Some('T' | 't'))
                    })
                })
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !stopped() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// SIGCONT after [`NatsServer::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("a running nats-server");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} nats-server failed");
    }

    /// SIGKILL, as a crashed host would, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.note("killed (SIGKILL)");
        }
    }

    /// Stops the server if it runs, then starts it again on the same port and store, and waits
    /// until it answers.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    /// A line of the test's own in the server's log, to tell starts and stops apart.
    fn note(&self, what: &str) {
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            let _ = writeln!(log, "---- test: nats-server {what}");
        }
    }

    async fn spawn(&mut self) {
        self.note(&format!("starting on port {}", self.port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the NATS log");
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .args(self.token.iter().flat_map(|t| ["--auth", t.as_str()]))
            .args(
                self.config
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("-c"), c.as_os_str()]),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the NATS log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("wait for nats-server"))
            {
                self.child = None;
                panic!(
                    "nats-server exited at start ({status}); its log:\n{}",
                    self.log()
                );
            }
            let ready = match &self.config {
                Some(_) => self.log().contains("Server is ready"),
                None => jetstream_answers(self.port, self.token.as_deref()).await,
            };
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server on port {} did not answer within {DEADLINE:?}; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `LOOPSYNC_TEST_NATS_BIN`, else `nats-server` from `PATH`.
fn binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("LOOPSYNC_TEST_NATS_BIN").filter(|b| !b.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| is_executable(candidate))
    });
    if found.is_none() {
        // As for a missing service: a failure, or a skip that is logged when skipping was asked.
        let what = "LOOPSYNC_TEST_NATS_BIN (or nats-server on PATH)";
        assert!(
            crate::services::skipping_allowed(),
            "{what} is not set, so this test, which starts NATS servers of its own, cannot run. \
             Run scripts/test.sh (it installs nats-server), or set {}=1 to skip it",
            crate::services::SKIP_VAR
        );
        crate::services::note_skip(what);
    }
    found
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a server on `port` accepts a client and answers `$JS.API.INFO` (JetStream is up and
/// its store recovered), within a second.
async fn jetstream_answers(port: u16, token: Option<&str>) -> bool {
    let url = match token {
        Some(token) => format!("nats://{token}@127.0.0.1:{port}"),
        None => format!("nats://127.0.0.1:{port}"),
    };
    matches!(
        request(&url, "$JS.API.INFO", b"", Duration::from_secs(1)).await,
        Ok(answer) if answer.contains("account_info_response") && !answer.contains("\"error\"")
    )
}

/// One request over the NATS client protocol (spoken directly, on a connection of its own):
/// publishes `payload` to `subject` and returns the first reply, within `timeout`.
pub async fn request(
    url: &str,
    subject: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<String, String> {
    let address = url
        .strip_prefix("nats://")
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_owned();
    // `nats://TOKEN@host:port`: the token goes in CONNECT.
    let (token, address) = match address.split_once('@') {
        Some((token, host)) => (format!(",\"auth_token\":\"{token}\""), host.to_owned()),
        None => (String::new(), address),
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| format!("connect to {address}: {e}"))?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if !line.starts_with("INFO ") {
            return Err(format!("not a NATS server: {line:?}"));
        }
        // An inbox of this request's own: tests beside this one ask the same server, and a
        // shared inbox hands one the answer meant for another.
        let inbox = format!("_INBOX.testkit.{:016x}", rand::random::<u64>());
        let mut out = Vec::new();
        out.extend_from_slice(
            format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"name\":\"testkit\"{token}}}\r\n\
                 SUB {inbox} 1\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(format!("PUB {subject} {inbox} {}\r\n", payload.len()).as_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        write.write_all(&out).await.map_err(|e| e.to_string())?;
        loop {
            line.clear();
            if reader
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("the server closed the connection".into());
            }
            if line.starts_with("PING") {
                write
                    .write_all(b"PONG\r\n")
                    .await
                    .map_err(|e| e.to_string())?;
            } else if line.starts_with("-ERR") {
                return Err(line.trim_end().to_owned());
            } else if line.starts_with("MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let size: usize = line
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("bad MSG line {line:?}"))?;
                let mut body = vec![0; size + 2];
                reader
                    .read_exact(&mut body)
                    .await
                    .map_err(|e| e.to_string())?;
                body.truncate(size);
                return String::from_utf8(body).map_err(|e| e.to_string());
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer to {subject} within {timeout:?}"))?
}

/// `$JS.API.CONSUMER.INFO`: the state of a durable consumer (`num_pending`, `num_ack_pending`,
/// `ack_floor`, …) as the server reports it.
pub async fn consumer_info(
    url: &str,
    stream: &str,
    consumer: &str,
) -> Result<serde_json::Value, String> {
    let answer = request(
        url,
        &format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        b"",
        Duration::from_secs(2),
    )
    .await?;
    let info: serde_json::Value = serde_json::from_str(&answer).map_err(|e| e.to_string())?;
    match info.get("error") {
        Some(error) => Err(error.to_string()),
        None => Ok(info),
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    /// Requests asked at once, each on a connection of its own, each get their own answer:
    /// tests beside each other ask one server (a shared reply inbox handed one test the
    /// consumer info meant for another).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_each_get_their_own_answer() {
        let Some(url) = crate::nats_url() else {
            return;
        };
        let client = async_nats::connect(&url).await.expect("connect");
        let prefix = crate::unique("echo");
        let mut asked = client
            .subscribe(format!("{prefix}.>"))
            .await
            .expect("subscribe");
        let echo = client.clone();
        tokio::spawn(async move {
            while let Some(message) = asked.next().await {
                if let Some(reply) = message.reply {
                    let _ = echo
                        .publish(reply, message.subject.to_string().into())
                        .await;
                }
            }
        });
        client.flush().await.expect("flush");
        let answers = futures::future::join_all((0..20).map(|i| {
            let (url, subject) = (url.clone(), format!("{prefix}.{i}"));
            async move {
                let answer = super::request(&url, &subject, b"", std::time::Duration::from_secs(5))
                    .await
                    .expect("an answer");
                (subject, answer)
            }
        }))
        .await;
        for (subject, answer) in answers {
            assert_eq!(answer, subject);
        }
    }
}
