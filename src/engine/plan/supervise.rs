//! Host-side supervision of an SSH stage. sshd does not signal a session's processes when
//! the channel closes (no pty), so neither the controller's timeout nor its death stops
//! what a stage started. Each stage therefore runs under a small POSIX `sh` supervisor:
//! - a lock (`flock`) named after the run, host and stage, held by the supervisor and the
//!   stage's processes, so an attempt started after a resume or a leader change waits for
//!   a previous attempt still running on the host instead of running beside it;
//! - the stage in its own session (`setsid`), so the whole process group can be killed;
//! - a watchdog that kills that group when the stage's time is up, on the host's clock,
//!   whatever happened to the controller; leftovers of the group are killed when the
//!   stage's main process ends (as systemd does for a unit's control group).
//!
//! State lives in `/run/outrider` (root) or a private `$TMPDIR/outrider-<uid>` directory.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::ssh::quote::shell_quote;

/// What the supervisor prints on stderr when the watchdog killed the stage.
pub const TIMED_OUT_MARK: &str = "outrider: stage timed out";
/// The supervisor's exit code when the stage timed out (as `timeout(1)`).
pub const TIMED_OUT_EXIT: u32 = 124;
/// The supervisor's exit code when an earlier attempt held the lock for the whole timeout.
pub const LOCK_BUSY_EXIT: u32 = 75;
/// The controller's own deadline trails the host's by this much, so the host reports the
/// timeout (with the output so far) before the controller gives up on the channel.
pub const BACKSTOP: Duration = Duration::from_secs(5);

/// The lock name of one stage of one run on one host: hex, safe as a file name.
pub fn lock_key(scope: &str, host: &str, stage: &str) -> String {
    let mut h = Sha256::new();
    for part in [scope, host, stage] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// The private state directory, computed on the host.
const STATE_DIR: &str = r#"if [ "$(id -u)" = 0 ]; then d=/run/outrider; else d="${TMPDIR:-/tmp}/outrider-$(id -u)"; fi
mkdir -p -m 700 "$d" 2>/dev/null
if [ -L "$d" ] || [ ! -d "$d" ] || [ ! -O "$d" ]; then echo "outrider: $d is not a private directory of $(id -un)" >&2; exit 70; fi
"#;

/// The supervisor script for a stage whose own shell text is `body` (a script, or
/// `exec <argv>`), given `timeout` in all (waiting for the lock included).
pub fn wrap(key: &str, body: &str, timeout: Duration) -> String {
    let secs = timeout.as_secs().max(1);
    let body = shell_quote(body);
    format!(
        r#"{STATE_DIR}command -v flock >/dev/null 2>&1 && command -v setsid >/dev/null 2>&1 || {{ echo "outrider: this host needs flock and setsid (util-linux) to run stages" >&2; exit 69; }}
k={key}; t={secs}; s=$(date +%s)
exec 9>>"$d/$k.lock"
if ! flock -n 9; then
  echo "outrider: an earlier attempt of this stage still runs on this host; waiting for it" >&2
  flock -w "$t" 9 || {{ echo "outrider: the earlier attempt still ran after ${{t}}s" >&2; exit {LOCK_BUSY_EXIT}; }}
  t=$((t - ($(date +%s) - s)))
  [ "$t" -gt 0 ] || {{ echo "{TIMED_OUT_MARK} waiting for the earlier attempt" >&2; exit {TIMED_OUT_EXIT}; }}
fi
rm -f "$d/$k.timedout"
printf '%s\n' {body} > "$d/$k.sh"
# the stage keeps the lock's descriptor: the lock outlives this supervisor if it is killed
setsid sh "$d/$k.sh" </dev/null &
p=$!
echo "$p" > "$d/$k.pid"
setsid sh -c 'sleep "$1"; : > "$3"; kill -KILL "-$2"' outrider-watchdog "$t" "$p" "$d/$k.timedout" </dev/null >/dev/null 2>&1 9>&- &
w=$!
trap 'kill -KILL "-$p" 2>/dev/null' HUP INT TERM
wait "$p"; rc=$?
kill -KILL "-$w" "-$p" 2>/dev/null
rm -f "$d/$k.sh" "$d/$k.pid"
if [ -e "$d/$k.timedout" ]; then rm -f "$d/$k.timedout"; echo "{TIMED_OUT_MARK} after ${{t}}s; its processes were killed" >&2; exit {TIMED_OUT_EXIT}; fi
# killed by a signal: end the same way, so sshd reports the signal and not 128+n
if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then trap - HUP INT TERM; exec 9>&-; kill -s "$(kill -l "$rc")" $$; fi
exit "$rc"
"#
    )
}

/// Kills the process group of the attempt running under `key`, if any (a cancelled run:
/// the plan was deleted, stopped or changed). Checks the pid still runs that stage first.
pub fn kill_script(key: &str) -> String {
    format!(
        r#"{STATE_DIR}k={key}
p=$(cat "$d/$k.pid" 2>/dev/null) || exit 0
case "$p" in ''|*[!0-9]*) exit 0;; esac
grep -q "$k.sh" "/proc/$p/cmdline" 2>/dev/null && kill -KILL "-$p" 2>/dev/null
exit 0
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_hex_and_differ_by_run_host_and_stage() {
        let k = lock_key("ns/uid/1", "web-1", "deploy");
        assert_eq!(k.len(), 24);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(k, lock_key("ns/uid/1", "web-1", "deploy"));
        assert_ne!(k, lock_key("ns/uid/2", "web-1", "deploy"));
        assert_ne!(k, lock_key("ns/uid/1", "web-2", "deploy"));
        assert_ne!(k, lock_key("ns/uid/1", "web-1", "migrate"));
        // no ambiguity from concatenation
        assert_ne!(lock_key("a", "bc", "d"), lock_key("ab", "c", "d"));
    }

    #[test]
    fn the_stage_body_reaches_the_host_as_one_quoted_word() {
        let script = wrap(
            "abc",
            "echo 'it''s' \"$HOME\"; exit 3",
            Duration::from_secs(30),
        );
        assert!(
            script.contains(
                r#"printf '%s\n' 'echo '\''it'\'''\''s'\'' "$HOME"; exit 3' > "$d/$k.sh""#
            ),
            "{script}"
        );
        assert!(script.contains("k=abc; t=30;"));
    }
}
