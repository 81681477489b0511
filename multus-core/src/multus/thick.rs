//! Thick mode: a daemon per node (`rust-multus-daemon`, [`super::daemon`]) answers the CNI
//! calls, and a shim binary (`rust-multus-shim`) is what the runtime runs. The shim sends
//! the whole invocation (the CNI_* variables and stdin) over a unix socket and prints the
//! daemon's answer with the same exit status, so the runtime cannot tell it from the thin
//! `rust-multus`.
//!
//! The wire: one connection per call; the shim writes one JSON [`Request`] and shuts its
//! side down, the daemon writes one JSON [`Response`] and closes. Anything else is an
//! error in the protocol's shape naming the socket.
//!
//! The shim's budget (`daemonTimeoutSeconds`, default [`DEFAULT_BUDGET`]) covers a daemon
//! that is restarting: it retries connecting until the budget is spent; a call whose
//! connection breaks before the answer is sent again (DEL, CHECK, GC and STATUS are
//! idempotent; an ADD is first undone with a DEL of the same attachment, so its retry
//! starts from nothing).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cni::{CniError, Command, ErrorCode, Output};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where the daemon listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/rust-multus/daemon.sock";
/// The shim's budget for one call, retries included: under the kubelet's 2-minute runtime
/// request timeout, above the daemon's default wait for a free slot (60 s).
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(110);
/// The largest request or answer either side reads (a config with every delegate inline
/// is a few KiB).
pub const MAX_MESSAGE: u64 = 16 << 20;
/// The CNI variables the shim forwards.
pub const CNI_VARS: [&str; 6] =
    ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];

/// One CNI invocation, as the shim received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The CNI_* variables that were set, unchanged.
    pub env: BTreeMap<String, String>,
    /// Stdin, base64 (it is the runtime's bytes, not necessarily UTF-8).
    pub stdin: String,
}

impl Request {
    /// A request from variables and stdin.
    pub fn new(env: BTreeMap<String, String>, stdin: &[u8]) -> Request {
        Request { env, stdin: base64::engine::general_purpose::STANDARD.encode(stdin) }
    }

    /// Stdin, decoded.
    pub fn stdin(&self) -> Result<Vec<u8>, CniError> {
        base64::engine::general_purpose::STANDARD.decode(&self.stdin).map_err(|e| {
            CniError::new(ErrorCode::DECODE, format!("the shim's request: stdin is not base64: {e}"))
        })
    }

    /// `CNI_COMMAND`, when it is one.
    pub fn command(&self) -> Option<Command> {
        self.env.get("CNI_COMMAND").and_then(|c| Command::parse(c).ok())
    }
}

/// What the shim prints and how it exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The JSON to print on stdout; none for a quiet success.
    pub stdout: Option<Value>,
    /// Exit status 0 (true) or 1.
    pub success: bool,
}

impl From<Output> for Response {
    fn from(o: Output) -> Response {
        Response { stdout: o.stdout, success: o.success }
    }
}

impl From<Response> for Output {
    fn from(r: Response) -> Output {
        Output { stdout: r.stdout, success: r.success }
    }
}

/// The config a call runs with: the daemon's config with the node's CNI config (stdin)
/// laid over it key by key, except `type` (the shim's) and the shim's own keys. With the
/// whole rust-multus config on the node, the daemon needs none; with a small node config
/// (`cniVersion`, `name`, `type`), the daemon's config supplies the rest.
pub fn effective_config(base: Option<&Map<String, Value>>, stdin: &[u8]) -> Vec<u8> {
    let Some(base) = base else { return stdin.to_vec() };
    // A stdin that is no JSON object is passed on as it is: the plugin reports it.
    let Ok(Value::Object(over)) = serde_json::from_slice::<Value>(stdin) else { return stdin.to_vec() };
    let mut conf = base.clone();
    for (k, v) in over {
        if !matches!(k.as_str(), "type" | "daemonSocket" | "daemonTimeoutSeconds") {
            conf.insert(k, v);
        }
    }
    serde_json::to_vec(&Value::Object(conf)).unwrap_or_else(|_| stdin.to_vec())
}

/// The shim's own keys of the node's CNI config.
#[derive(Debug, Clone, PartialEq)]
pub struct ShimConf {
    /// `daemonSocket`.
    pub socket: PathBuf,
    /// `daemonTimeoutSeconds`.
    pub budget: Duration,
}

impl ShimConf {
    /// Reads `daemonSocket` and `daemonTimeoutSeconds` from stdin; absent keys take the
    /// defaults, a wrong one is error 7 naming it.
    pub fn parse(stdin: &[u8]) -> Result<ShimConf, CniError> {
        let obj = cni::config_object(stdin)?;
        let socket = match obj.get("daemonSocket") {
            None | Some(Value::Null) => PathBuf::from(DEFAULT_SOCKET),
            Some(Value::String(s)) if s.starts_with('/') => PathBuf::from(s),
            Some(other) => {
                return Err(CniError::new(
                    ErrorCode::INVALID_CONFIG,
                    format!("daemonSocket is {other}, not an absolute path"),
                ));
            }
        };
        let budget = match obj.get("daemonTimeoutSeconds") {
            None | Some(Value::Null) => DEFAULT_BUDGET,
            Some(v) => match v.as_f64() {
                Some(s) if s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
                _ => {
                    return Err(CniError::new(
                        ErrorCode::INVALID_CONFIG,
                        format!(
                            "daemonTimeoutSeconds is {v}, not a number of seconds above 0 and at most 3600"
                        ),
                    ));
                }
            },
        };
        Ok(ShimConf { socket, budget })
    }
}

/// Why one exchange with the daemon failed.
#[derive(Debug)]
enum Failed {
    /// Nothing was sent: the daemon is not there (yet).
    Connect(std::io::Error),
    /// The request went out and no whole answer came back.
    Lost(String),
    /// The budget ran out while waiting for the answer.
    TimedOut,
}

/// One exchange: connect, send, read the answer before `deadline`.
fn exchange(socket: &Path, req: &[u8], deadline: Instant) -> Result<Response, Failed> {
    let mut s = UnixStream::connect(socket).map_err(Failed::Connect)?;
    let lost = |what: &str, e: std::io::Error| Failed::Lost(format!("{what}: {e}"));
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    s.set_write_timeout(Some(left)).map_err(|e| lost("setting a timeout", e))?;
    s.write_all(req).map_err(|e| lost("sending the call", e))?;
    s.shutdown(std::net::Shutdown::Write).map_err(|e| lost("sending the call", e))?;
    let mut answer = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failed::TimedOut);
        }
        s.set_read_timeout(Some(left)).map_err(|e| lost("setting a timeout", e))?;
        let mut buf = [0u8; 16 * 1024];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() as u64 > MAX_MESSAGE {
                    return Err(Failed::Lost(format!("the answer is larger than {MAX_MESSAGE} bytes")));
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(Failed::TimedOut);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(lost("reading the answer", e)),
        }
    }
    if answer.is_empty() {
        return Err(Failed::Lost("the connection closed before an answer".into()));
    }
    serde_json::from_slice(&answer).map_err(|e| Failed::Lost(format!("the answer is not one: {e}")))
}

/// Pause between attempts: short at first (a daemon restarts in well under a second), at
/// most a second.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1000))
}

/// Sends `req` to the daemon at `conf.socket` and returns its answer, retrying within the
/// budget as the module says. The error is what the shim prints when no answer came.
pub fn forward(conf: &ShimConf, req: &Request) -> Result<Response, CniError> {
    let started = Instant::now();
    let deadline = started + conf.budget;
    let sock = conf.socket.display();
    let body = serde_json::to_vec(req)
        .map_err(|e| CniError::new(ErrorCode::IO_FAILURE, format!("encoding the call for {sock}: {e}")))?;
    let is_add = req.command() == Some(Command::Add);
    let mut undo_first = false;
    let mut attempt = 0u32;
    let mut last = String::new();
    while Instant::now() < deadline {
        if undo_first {
            // The ADD may have made part of the attachment before the daemon went away:
            // a DEL of the same attachment takes it back (DEL succeeds for what is not there).
            let mut del = req.clone();
            del.env.insert("CNI_COMMAND".into(), "DEL".into());
            let del_body = serde_json::to_vec(&del).unwrap_or_default();
            match exchange(&conf.socket, &del_body, deadline) {
                Ok(r) if r.success => undo_first = false,
                Ok(r) => {
                    last = format!("undoing the interrupted ADD failed: {}", r.stdout.unwrap_or_default());
                }
                Err(Failed::Connect(e)) => last = format!("connecting: {e}"),
                Err(Failed::Lost(m)) => last = format!("undoing the interrupted ADD: {m}"),
                Err(Failed::TimedOut) => break,
            }
            if undo_first {
                std::thread::sleep(backoff(attempt).min(deadline.saturating_duration_since(Instant::now())));
                attempt += 1;
                continue;
            }
        }
        match exchange(&conf.socket, &body, deadline) {
            Ok(r) => return Ok(r),
            Err(Failed::Connect(e)) => last = format!("connecting: {e}"),
            Err(Failed::Lost(m)) => {
                last = format!("the call was interrupted ({m})");
                undo_first = is_add;
            }
            Err(Failed::TimedOut) => {
                last = "no answer yet".into();
                break;
            }
        }
        std::thread::sleep(backoff(attempt).min(deadline.saturating_duration_since(Instant::now())));
        attempt += 1;
    }
    Err(CniError::new(
        ErrorCode::TRY_AGAIN_LATER,
        format!(
            "rust-multus daemon at {sock} did not answer within {:.1} s ({} attempts; last: {last}); is rust-multus-daemon running on this node?",
            started.elapsed().as_secs_f64(),
            attempt + 1
        ),
    ))
}

/// The shim's whole work for one invocation: VERSION is answered here (it needs no
/// daemon), every other command goes to the daemon.
pub fn shim(env: BTreeMap<String, String>, stdin: &[u8]) -> Output {
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| cni::LATEST_VERSION.to_string());
    let command = match Command::parse(env.get("CNI_COMMAND").map_or("", String::as_str)) {
        Ok(c) => c,
        Err(e) => return Output::error(&e, &version),
    };
    if command == Command::Version {
        return Output { stdout: Some(cni::version_info(&version)), success: true };
    }
    let conf = match ShimConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return Output::error(&e, &version),
    };
    match forward(&conf, &Request::new(env, stdin)) {
        Ok(r) => r.into(),
        Err(e) => Output::error(&e, &version),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use serde_json::json;

    use super::*;

    fn env(command: &str) -> BTreeMap<String, String> {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn conf(socket: &Path, budget_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&json!({"cniVersion": "1.0.0", "name": "n", "type": "rust-multus-shim",
            "daemonSocket": socket, "daemonTimeoutSeconds": budget_ms as f64 / 1000.0}))
        .expect("json")
    }

    /// A daemon stand-in answering each connection with `answer(nth, request)`; `None`
    /// closes the connection without an answer (a daemon killed mid-call).
    fn serve(
        socket: &Path,
        answer: impl Fn(usize, Request) -> Option<Response> + Send + 'static,
    ) -> Arc<Mutex<Vec<Request>>> {
        let listener = UnixListener::bind(socket).expect("bind");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            let n = AtomicUsize::new(0);
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = Vec::new();
                conn.read_to_end(&mut buf).expect("read");
                let req: Request = serde_json::from_slice(&buf).expect("a request");
                seen2.lock().expect("lock").push(req.clone());
                if let Some(r) = answer(n.fetch_add(1, Ordering::SeqCst), req) {
                    conn.write_all(&serde_json::to_vec(&r).expect("json")).expect("write");
                }
            }
        });
        seen
    }

    #[test]
    fn the_call_and_the_answer_cross_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("d.sock");
        let seen = serve(&sock, |_, _| {
            Some(Response {
                stdout: Some(json!({"cniVersion": "1.0.0", "code": 7, "msg": "no"})),
                success: false,
            })
        });
        let stdin = conf(&sock, 5000);
        let out = shim(env("ADD"), &stdin);
        assert_eq!(
            out,
            Output { stdout: Some(json!({"cniVersion": "1.0.0", "code": 7, "msg": "no"})), success: false }
        );
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].env, env("ADD"));
        assert_eq!(seen[0].stdin().expect("stdin"), stdin);
    }

    #[test]
    fn version_is_answered_without_a_daemon() {
        let out = shim(env("VERSION"), br#"{"cniVersion":"0.4.0"}"#);
        assert!(out.success);
        assert_eq!(out.stdout.expect("answer")["cniVersion"], "0.4.0");
    }

    #[test]
    fn no_daemon_is_a_try_again_error_naming_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("absent.sock");
        let started = Instant::now();
        let out = shim(env("DEL"), &conf(&sock, 300));
        assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(!out.success);
        let v = out.stdout.expect("error JSON");
        assert_eq!(v["code"], 11);
        assert_eq!(v["cniVersion"], "1.0.0");
        let msg = v["msg"].as_str().expect("msg");
        assert!(
            msg.starts_with(&format!("rust-multus daemon at {} did not answer within 0.", sock.display())),
            "{msg}"
        );
        assert!(msg.contains("last: connecting: No such file or directory"), "{msg}");
    }

    #[test]
    fn a_daemon_that_comes_up_within_the_budget_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("late.sock");
        let sock2 = sock.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            serve(&sock2, |_, _| Some(Response { stdout: None, success: true }))
        });
        let out = shim(env("DEL"), &conf(&sock, 5000));
        assert_eq!(out, Output { stdout: None, success: true });
        assert_eq!(t.join().expect("thread").lock().expect("lock").len(), 1);
    }

    #[test]
    fn an_interrupted_add_is_undone_then_sent_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("flaky.sock");
        let seen = serve(&sock, |n, _| match n {
            0 => None,
            _ => Some(Response { stdout: Some(json!({"cniVersion": "1.0.0"})), success: true }),
        });
        let out = shim(env("ADD"), &conf(&sock, 5000));
        assert!(out.success, "{out:?}");
        let commands: Vec<String> =
            seen.lock().expect("lock").iter().map(|r| r.env["CNI_COMMAND"].clone()).collect();
        assert_eq!(commands, ["ADD", "DEL", "ADD"]);
    }

    #[test]
    fn shim_keys_are_checked() {
        let e =
            ShimConf::parse(br#"{"cniVersion":"1.0.0","daemonSocket":"run/x.sock"}"#).expect_err("relative");
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::INVALID_CONFIG, "daemonSocket is \"run/x.sock\", not an absolute path")
        );
        let e = ShimConf::parse(br#"{"cniVersion":"1.0.0","daemonTimeoutSeconds":0}"#).expect_err("zero");
        assert_eq!(e.msg, "daemonTimeoutSeconds is 0, not a number of seconds above 0 and at most 3600");
        let c = ShimConf::parse(br#"{"cniVersion":"1.0.0"}"#).expect("defaults");
        assert_eq!(c, ShimConf { socket: DEFAULT_SOCKET.into(), budget: DEFAULT_BUDGET });
        let out = shim(env("ADD"), b"not json");
        assert_eq!(out.stdout.expect("error")["code"], 6);
    }

    #[test]
    fn the_node_config_is_laid_over_the_daemon_config() {
        let base =
            json!({"cniVersion": "0.3.1", "name": "base", "type": "rust-multus", "clusterNetwork": "k8s"});
        let base = base.as_object().expect("object");
        let stdin = br#"{"cniVersion":"1.1.0","name":"multus-cni-network","type":"rust-multus-shim","daemonSocket":"/s","runtimeConfig":{"mac":"x"}}"#;
        let got: Value = serde_json::from_slice(&effective_config(Some(base), stdin)).expect("json");
        assert_eq!(
            got,
            json!({"cniVersion": "1.1.0", "name": "multus-cni-network", "type": "rust-multus",
                "clusterNetwork": "k8s", "runtimeConfig": {"mac": "x"}})
        );
        assert_eq!(effective_config(None, stdin), stdin.to_vec());
        assert_eq!(effective_config(Some(base), b"[1]"), b"[1]".to_vec());
    }
}
