//! Running one command on an open [`Session`]: argv (quoted by the one audited helper) or a
//! script on stdin to `sh -s`; env; stdin; a timeout that kills the remote process and
//! returns what it printed so far; stdout and stderr captured separately within caps.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use russh::{ChannelMsg, Sig};
use zeroize::Zeroizing;

use super::capture::{CappedBuffer, Captured};
use super::client::Session;
use super::{Error, quote};

/// The longest a remote command may be given (30 days).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// An argv: each element reaches the remote program as one literal argument.
    Argv(Vec<String>),
    /// A shell script, fed to `sh -s` on stdin (never pasted into a command line).
    Script(String),
}

/// One remote execution.
#[derive(Clone, Debug)]
pub struct Command {
    pub program: Program,
    pub env: BTreeMap<String, String>,
    /// Bytes for the program's stdin (not allowed with a script, which owns stdin).
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    /// Bytes kept from the start and from the end of each of stdout and stderr.
    pub capture_head: usize,
    pub capture_tail: usize,
}

impl Command {
    fn with(program: Program) -> Self {
        Self {
            program,
            env: BTreeMap::new(),
            stdin: None,
            timeout: Duration::from_secs(300),
            capture_head: 16 * 1024,
            capture_tail: 16 * 1024,
        }
    }
    pub fn argv<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Self::with(Program::Argv(argv.into_iter().map(Into::into).collect()))
    }
    pub fn script(script: impl Into<String>) -> Self {
        Self::with(Program::Script(script.into()))
    }
    /// At most [`MAX_TIMEOUT`]: a schema-valid `timeout: 999999999h` must not overflow
    /// `Instant + Duration` (a panic) when the deadline is computed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.min(MAX_TIMEOUT);
        self
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }
    pub fn capture(mut self, head: usize, tail: usize) -> Self {
        self.capture_head = head;
        self.capture_tail = tail;
        self
    }

    /// The command line sshd hands to the login shell, built only from quoted words. It
    /// never carries `env` values (see [`Command::input`]).
    pub fn command_line(&self, become_user: Option<&str>) -> Result<String, Error> {
        let mut line = String::new();
        if let Some(user) = become_user {
            // -n: a password prompt is an error, never a hang
            line.push_str(&quote::shell_join(&["sudo", "-n", "-u", user, "--"]));
            line.push(' ');
        }
        let bad = |e: quote::QuoteError| Error::BadCommand(e.to_string());
        // names and values checked before anything is sent
        quote::env_exports(&self.env).map_err(bad)?;
        let none = BTreeMap::new();
        match &self.program {
            Program::Argv(argv) if self.env.is_empty() => {
                line.push_str(&quote::command_line(&none, argv).map_err(bad)?)
            }
            Program::Argv(argv) => {
                if self.stdin.is_some() {
                    return Err(Error::BadCommand(
                        "environment values travel on stdin; a command with env cannot take stdin too"
                            .into(),
                    ));
                }
                // checked (empty argv, NUL) even though it is sent in the script
                quote::command_line(&none, argv).map_err(bad)?;
                line.push_str("sh -s");
            }
            Program::Script(_) => {
                if self.stdin.is_some() {
                    return Err(Error::BadCommand(
                        "a script reads itself from stdin; it cannot take stdin too".into(),
                    ));
                }
                line.push_str("sh -s");
            }
        }
        Ok(line)
    }

    /// What the remote side reads on stdin: the script (after the `env` exports), an argv
    /// with `env` as `exports; exec argv`, or the caller's stdin.
    pub fn input(&self) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let bad = |e: quote::QuoteError| Error::BadCommand(e.to_string());
        let exports = quote::env_exports(&self.env).map_err(bad)?;
        let exports = Zeroizing::new(exports);
        Ok(match &self.program {
            Program::Script(script) => Some(format!("{}{script}", *exports).into_bytes()),
            Program::Argv(argv) if !self.env.is_empty() => {
                Some(format!("{}exec {}\n", *exports, quote::shell_join(argv)).into_bytes())
            }
            Program::Argv(_) => self.stdin.clone(),
        }
        .map(Zeroizing::new))
    }
}

/// `env` may hold Secret values (a plan's `secretEnv`): wiped when the command is dropped.
impl Drop for Command {
    fn drop(&mut self) {
        for value in self.env.values_mut() {
            zeroize::Zeroize::zeroize(value);
        }
    }
}

/// How a command ended.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    pub exit_status: Option<u32>,
    /// Signal name when the remote process was killed by one.
    pub exit_signal: Option<String>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub duration: Duration,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }

    /// `Ok(self)` on exit status 0, else [`Error::NonZeroExit`] with the stderr tail.
    pub fn check(self, host: &str) -> Result<Self, Error> {
        if self.success() {
            return Ok(self);
        }
        Err(Error::NonZeroExit {
            host: host.to_string(),
            status: self.status_text(),
            stderr: tail_text(&self.stderr, 512),
        })
    }

    pub fn status_text(&self) -> String {
        match (&self.exit_status, &self.exit_signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "no exit status (connection lost?)".into(),
        }
    }
}

fn tail_text(c: &Captured, max: usize) -> String {
    crate::text::tail(&c.to_string_lossy(), max)
}

/// Recognises sudo's own refusals (as opposed to the command failing).
fn sudo_refusal(stderr: &str) -> bool {
    stderr.starts_with("sudo:")
        && [
            "password is required",
            "not in the sudoers",
            "may not run sudo",
            "is not allowed to",
            "terminal is required",
        ]
        .iter()
        .any(|m| stderr.contains(m))
}

/// Longest signal name kept: the server chooses it (`Custom("...")`), status holds it.
pub const SIGNAL_NAME_MAX: usize = 32;

/// A signal name from the server, as status may hold it: printable ASCII only, clipped.
fn signal_text(raw: &str) -> String {
    let clean: String = raw
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    crate::text::head(&clean, SIGNAL_NAME_MAX).to_string()
}

fn protocol(host: &str, what: &str, e: russh::Error) -> Error {
    Error::Protocol {
        host: host.to_string(),
        message: format!("{what}: {e}"),
    }
}

impl Session {
    /// Runs `cmd` on its own channel of this connection.
    pub async fn exec(&self, cmd: &Command) -> Result<ExecOutput, Error> {
        let host = self.endpoint.name.as_str();
        let become_user = self.config.become_user.as_deref();
        let line = cmd.command_line(become_user)?;
        let input = cmd.input()?;
        let started = Instant::now();
        let deadline = crate::deadline::from_now(cmd.timeout);
        let mut stdout = CappedBuffer::new(cmd.capture_head, cmd.capture_tail);
        let mut stderr = CappedBuffer::new(cmd.capture_head, cmd.capture_tail);
        let mut exit_status = None;
        let mut exit_signal = None;

        let mut channel = self
            .handle()
            .channel_open_session()
            .await
            .map_err(|e| protocol(host, "opening a channel", e))?;
        let run = async {
            channel
                .exec(true, line.as_bytes())
                .await
                .map_err(|e| protocol(host, "exec request", e))?;
            if let Some(input) = &input {
                channel
                    .data(input.as_slice())
                    .await
                    .map_err(|e| protocol(host, "sending stdin", e))?;
            }
            channel
                .eof()
                .await
                .map_err(|e| protocol(host, "closing stdin", e))?;
            // read until the channel is gone, even after ExitStatus: data may still follow
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => stdout.push(&data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => stderr.push(&data),
                    ChannelMsg::ExitStatus { exit_status: code } => exit_status = Some(code),
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        exit_signal = Some(signal_text(&format!("{signal_name:?}")))
                    }
                    ChannelMsg::Failure => {
                        return Err(Error::Protocol {
                            host: host.to_string(),
                            message: "the server refused the exec request".into(),
                        });
                    }
                    _ => {}
                }
            }
            Ok::<(), Error>(())
        };
        let outcome = tokio::time::timeout_at(deadline, run).await;
        match outcome {
            Err(_) => {
                // kill the remote process rather than leave it running, then drop the channel
                let _ = channel.signal(Sig::KILL).await;
                let _ = channel.close().await;
                let partial = [stdout.finish(), stderr.finish()]
                    .iter()
                    .map(|c| tail_text(c, 1024))
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(Error::TimedOut {
                    host: host.to_string(),
                    after: cmd.timeout,
                    output: partial,
                });
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        let output = ExecOutput {
            exit_status,
            exit_signal,
            stdout: stdout.finish(),
            stderr: stderr.finish(),
            duration: started.elapsed(),
        };
        if let Some(user) = become_user {
            let err = output.stderr.to_string_lossy();
            if output.exit_status == Some(1) && sudo_refusal(&err) {
                return Err(Error::BecomeFailed {
                    host: host.to_string(),
                    user: user.to_string(),
                    message: err.trim().to_string(),
                });
            }
        }
        Ok(output)
    }

    /// Writes `contents` to `path` with `mode`, atomically (temp file + rename). The path
    /// travels as a quoted argument to a fixed script, never inside a shell string.
    pub async fn upload(
        &self,
        path: &str,
        contents: &[u8],
        mode: u32,
        timeout: Duration,
    ) -> Result<(), Error> {
        const SCRIPT: &str = r#"set -e; t="$1.outrider-tmp.$$"; trap 'rm -f "$t"' EXIT; cat > "$t"; chmod "$2" "$t"; mv -f "$t" "$1"; trap - EXIT"#;
        let cmd = Command::argv(["sh", "-c", SCRIPT, "sh", path, &format!("{mode:o}")])
            .stdin(contents.to_vec())
            .timeout(timeout);
        self.exec(&cmd)
            .await?
            .check(&self.endpoint.name)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_timeout_is_clamped_so_the_deadline_cannot_overflow() {
        let huge = crate::api::common::parse_duration("5124095576030431h").expect("parses");
        let cmd = Command::argv(["true"]).timeout(huge);
        assert_eq!(cmd.timeout, MAX_TIMEOUT);
        let _deadline = crate::deadline::from_now(cmd.timeout);
    }

    #[test]
    fn argv_is_quoted_and_become_wraps_it_with_non_interactive_sudo() {
        let cmd = Command::argv(["echo", "$(rm -rf /)", "it's"]).env("RELEASE", "42");
        assert_eq!(
            cmd.command_line(Some("root")).unwrap(),
            "sudo -n -u root -- sh -s"
        );
        assert_eq!(
            String::from_utf8(cmd.input().unwrap().unwrap().to_vec()).unwrap(),
            "RELEASE=42\nexport RELEASE\nexec echo '$(rm -rf /)' 'it'\\''s'\n"
        );
        let plain = Command::argv(["echo", "hi"]);
        assert_eq!(plain.command_line(None).unwrap(), "echo hi");
        assert!(plain.input().unwrap().is_none());
        assert_eq!(
            Command::script("echo hi").command_line(None).unwrap(),
            "sh -s"
        );
    }

    #[test]
    fn a_hostile_signal_name_is_clipped_and_made_printable() {
        let raw = format!(
            "{:?}",
            Sig::Custom(format!("EVIL\n\u{1b}[2J{}", "X".repeat(5000)))
        );
        let s = signal_text(&raw);
        assert!(s.len() <= SIGNAL_NAME_MAX, "{s}");
        assert!(s.chars().all(|c| c.is_ascii_graphic()), "{s:?}");
        assert_eq!(signal_text(&format!("{:?}", Sig::KILL)), "KILL");
    }

    #[test]
    fn bad_commands_are_refused_before_anything_is_sent() {
        assert!(matches!(
            Command::argv(Vec::<String>::new()).command_line(None),
            Err(Error::BadCommand(_))
        ));
        assert!(matches!(
            Command::argv(["a\0b"]).command_line(None),
            Err(Error::BadCommand(_))
        ));
        assert!(matches!(
            Command::script("x").stdin("y").command_line(None),
            Err(Error::BadCommand(_))
        ));
        assert!(matches!(
            Command::argv(["true"])
                .env("BAD KEY", "v")
                .command_line(None),
            Err(Error::BadCommand(_))
        ));
    }

    #[test]
    fn sudo_refusals_are_told_apart_from_command_failures() {
        assert!(sudo_refusal("sudo: a password is required\n"));
        assert!(sudo_refusal("sudo: bob is not in the sudoers file.\n"));
        assert!(!sudo_refusal("grep: no such file\n"));
    }
}
