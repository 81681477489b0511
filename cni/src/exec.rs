//! Calling another CNI plugin as the spec says: find its binary on `CNI_PATH`, run it with
//! the CNI_* environment and the network config on stdin, and read its result or its error.
//!
//! The meta-plugin calls delegates this way, and a delegate calls its `ipam` plugin.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use crate::{CniError, Command, Env, ErrorCode};
use serde_json::Value;

/// One call: the command and the CNI_* variables it carries.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub command: Command,
    pub container_id: &'a str,
    /// Empty when the runtime gave none (DEL of a gone sandbox, GC, STATUS).
    pub netns: &'a str,
    pub ifname: &'a str,
    /// `CNI_ARGS`, passed as it is.
    pub args: &'a str,
    /// The directories of `CNI_PATH`, searched in order.
    pub path: &'a [PathBuf],
}

impl<'a> Call<'a> {
    /// `command` for the attachment of `env`, with its `CNI_ARGS` and `CNI_PATH` as given.
    pub fn from_env(env: &'a Env, command: Command) -> Call<'a> {
        Call {
            command,
            container_id: &env.container_id,
            netns: &env.netns,
            ifname: &env.ifname,
            args: &env.args,
            path: &env.path,
        }
    }

    /// `CNI_PATH` as the child sees it.
    fn path_var(&self) -> String {
        let dirs: Vec<_> = self.path.iter().map(|p| p.to_string_lossy()).collect();
        dirs.join(":")
    }
}

/// The binary for plugin `kind` (the config's `type`) in the first directory that has it.
pub fn find(kind: &str, path: &[PathBuf]) -> Result<PathBuf, CniError> {
    if kind.is_empty() || kind.contains('/') || kind == "." || kind == ".." {
        return Err(CniError::new(
            ErrorCode::INVALID_CONFIG,
            format!("plugin type {kind:?} is not a plugin name"),
        ));
    }
    path.iter().map(|d| d.join(kind)).find(|p| p.is_file()).ok_or_else(|| {
        let dirs: Vec<_> = path.iter().map(|p| p.display().to_string()).collect();
        CniError::new(
            ErrorCode::INVALID_CONFIG,
            format!("plugin {kind:?} not found in CNI_PATH [{}]", dirs.join(", ")),
        )
    })
}

/// A plugin answered by a function of this process instead of a binary: what the binary
/// would print and its exit status, from the call's environment and stdin.
pub type InProcess = fn(&Env, &[u8]) -> crate::Output;

static IN_PROCESS: std::sync::OnceLock<Vec<(&'static str, InProcess)>> = std::sync::OnceLock::new();

/// Makes [`run`] answer these plugin types in this process, for the rest of its life,
/// instead of starting their binaries: the thick daemon does this for our own link
/// delegates, saving a process per network. Only the first call counts (false after).
pub fn answer_in_process(plugins: Vec<(&'static str, InProcess)>) -> bool {
    IN_PROCESS.set(plugins).is_ok()
}

/// Runs plugin `kind` with `config` on stdin. Returns its result: the parsed JSON of its
/// stdout, or `Value::Null` when a successful DEL, CHECK, GC or STATUS printed nothing.
/// A plugin's own error JSON comes back as that `CniError`, code and all.
pub fn run(kind: &str, call: &Call<'_>, config: &[u8]) -> Result<Value, CniError> {
    if let Some(f) = IN_PROCESS.get().and_then(|p| p.iter().find(|(k, _)| *k == kind)).map(|(_, f)| *f) {
        return run_in_process(kind, f, call, config);
    }
    let binary = find(kind, call.path)?;
    run_binary(&binary, call, config)
}

/// As [`run_binary`], for a plugin answered by `f` in this process; a panic in it is an
/// error of the call, not of the process.
fn run_in_process(kind: &str, f: InProcess, call: &Call<'_>, config: &[u8]) -> Result<Value, CniError> {
    let failed = |what: String| CniError::new(ErrorCode::PLUGIN_FAILED, what);
    let env = Env {
        command: call.command,
        container_id: call.container_id.to_string(),
        netns: call.netns.to_string(),
        ifname: call.ifname.to_string(),
        args: call.args.to_string(),
        path: call.path.to_vec(),
    };
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&env, config)))
        .map_err(|_| failed(format!("{kind} {} panicked (in process)", call.command.name())))?;
    match (out.success, out.stdout) {
        (true, Some(v)) => Ok(v),
        (true, None) if matches!(call.command, Command::Add | Command::Version) => {
            Err(failed(format!("{kind} {} succeeded but gave no result", call.command.name())))
        }
        (true, None) => Ok(Value::Null),
        (false, v) => Err(v.as_ref().and_then(CniError::from_json).unwrap_or_else(|| {
            failed(format!("{kind} {} failed (in process) without an error", call.command.name()))
        })),
    }
}

/// As [`run`], for a binary already found.
pub fn run_binary(binary: &Path, call: &Call<'_>, config: &[u8]) -> Result<Value, CniError> {
    let failed = |what: String| CniError::new(ErrorCode::PLUGIN_FAILED, what);
    let shown = binary.display();
    let mut child = Process::new(binary)
        .env("CNI_COMMAND", call.command.name())
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", call.args)
        .env("CNI_PATH", call.path_var())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run {shown}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading its stdin closes the pipe; its exit status
        // and output tell what happened, so a write error here is not the story.
        let _ = stdin.write_all(config);
    }
    let out = child.wait_with_output().map_err(|e| failed(format!("waiting for {shown}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = stdout.trim();
    if !out.status.success() {
        if let Some(e) = serde_json::from_str(text).ok().as_ref().and_then(CniError::from_json) {
            return Err(e);
        }
        return Err(failed(format!("{shown} {} failed ({})", call.command.name(), out.status))
            .with_details(format!("stdout: {text:?}; stderr: {:?}", stderr.trim())));
    }
    if text.is_empty() {
        return match call.command {
            Command::Add | Command::Version => {
                Err(failed(format!("{shown} {} succeeded but printed no result", call.command.name())))
            }
            _ => Ok(Value::Null),
        };
    }
    serde_json::from_str(text).map_err(|e| {
        failed(format!("{shown} {} printed a result that is not JSON: {e}", call.command.name()))
            .with_details(format!("stdout: {text:?}"))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;

    /// Writes an executable shell script named `name` into `dir`.
    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn call(command: Command, path: &[PathBuf]) -> Call<'_> {
        Call { command, container_id: "cid", netns: "/proc/1/ns/net", ifname: "net1", args: "A=1", path }
    }

    /// Plugins answered in this process read like binaries: a result, a quiet DEL, a
    /// missing ADD result, the plugin's own error, and a panic as error 110.
    #[test]
    fn in_process_plugins_answer_as_binaries_do() {
        fn echo(env: &Env, stdin: &[u8]) -> crate::Output {
            let v: Value = serde_json::from_slice(stdin).unwrap_or_default();
            match env.command {
                Command::Add if v["quiet"] == true => crate::Output { stdout: None, success: true },
                Command::Add => crate::Output {
                    stdout: Some(json!({"ifname": env.ifname, "args": env.args})),
                    success: true,
                },
                Command::Check => crate::Output::error(&CniError::new(ErrorCode(121), "differs"), "1.0.0"),
                _ => crate::Output { stdout: None, success: true },
            }
        }
        fn boom(_: &Env, _: &[u8]) -> crate::Output {
            panic!("boom")
        }
        assert!(answer_in_process(vec![("inproc-echo", echo), ("inproc-boom", boom)]));
        assert!(!answer_in_process(Vec::new()), "only the first call counts");
        let path = [PathBuf::from("/nonexistent")];
        assert_eq!(
            run("inproc-echo", &call(Command::Add, &path), b"{}"),
            Ok(json!({"ifname": "net1", "args": "A=1"}))
        );
        assert_eq!(run("inproc-echo", &call(Command::Del, &path), b"{}"), Ok(Value::Null));
        assert_eq!(
            run("inproc-echo", &call(Command::Add, &path), br#"{"quiet":true}"#),
            Err(CniError::new(ErrorCode::PLUGIN_FAILED, "inproc-echo ADD succeeded but gave no result"))
        );
        assert_eq!(
            run("inproc-echo", &call(Command::Check, &path), b"{}"),
            Err(CniError::new(ErrorCode(121), "differs"))
        );
        assert_eq!(
            run("inproc-boom", &call(Command::Add, &path), b"{}"),
            Err(CniError::new(ErrorCode::PLUGIN_FAILED, "inproc-boom ADD panicked (in process)"))
        );
        // Other types still need their binary.
        assert_eq!(
            run("inproc-other", &call(Command::Add, &path), b"{}").expect_err("no binary").code,
            ErrorCode::INVALID_CONFIG
        );
    }

    #[test]
    fn passes_environment_and_stdin_and_reads_the_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Echoes what it was given as a result, so the test sees exactly what arrived.
        script(
            dir.path(),
            "echo-plugin",
            r#"in=$(cat); printf '{"cmd":"%s","cid":"%s","netns":"%s","if":"%s","args":"%s","path":"%s","in":%s}' \
               "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" "$CNI_IFNAME" "$CNI_ARGS" "$CNI_PATH" "$in""#,
        );
        let path = vec![PathBuf::from("/nonexistent"), dir.path().to_path_buf()];
        let got = run("echo-plugin", &call(Command::Add, &path), br#"{"x":1}"#).expect("run");
        assert_eq!(
            got,
            json!({"cmd": "ADD", "cid": "cid", "netns": "/proc/1/ns/net", "if": "net1", "args": "A=1",
                   "path": format!("/nonexistent:{}", dir.path().display()), "in": {"x": 1}})
        );
    }

    #[test]
    fn plugin_errors_come_back_with_their_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        script(
            dir.path(),
            "refuses",
            r#"echo '{"cniVersion":"1.0.0","code":7,"msg":"bad master","details":"eth9"}'; exit 1"#,
        );
        script(dir.path(), "crashes", "echo garbage; echo boom >&2; exit 2");
        script(dir.path(), "silent", "exit 0");
        script(dir.path(), "nonsense", "echo '{not json'");
        let path = vec![dir.path().to_path_buf()];
        let e = run("refuses", &call(Command::Add, &path), b"{}").expect_err("refused");
        assert_eq!(e, CniError::new(ErrorCode::INVALID_CONFIG, "bad master").with_details("eth9"));
        let e = run("crashes", &call(Command::Add, &path), b"{}").expect_err("crashed");
        assert_eq!(e.code, ErrorCode::PLUGIN_FAILED);
        assert!(e.msg.ends_with("crashes ADD failed (exit status: 2)"), "{e}");
        assert_eq!(e.details, "stdout: \"garbage\"; stderr: \"boom\"");
        assert!(
            run("silent", &call(Command::Add, &path), b"{}")
                .expect_err("no result")
                .msg
                .ends_with("silent ADD succeeded but printed no result")
        );
        assert_eq!(run("silent", &call(Command::Del, &path), b"{}").expect("del"), Value::Null);
        let e = run("nonsense", &call(Command::Add, &path), b"{}").expect_err("not json");
        assert!(e.msg.contains("printed a result that is not JSON"), "{e}");
    }

    #[test]
    fn missing_and_unsafe_plugin_names_are_config_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = vec![dir.path().to_path_buf()];
        let e = find("macvlan", &path).expect_err("absent");
        assert_eq!(e.code, ErrorCode::INVALID_CONFIG);
        assert_eq!(e.msg, format!("plugin \"macvlan\" not found in CNI_PATH [{}]", dir.path().display()));
        assert_eq!(
            find("../bin/sh", &path).expect_err("path").msg,
            "plugin type \"../bin/sh\" is not a plugin name"
        );
        assert_eq!(find("", &path).expect_err("empty").code, ErrorCode::INVALID_CONFIG);
    }
}
