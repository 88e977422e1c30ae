//! Safe apply on one host, the way `iptables-apply` and commit-confirmed routers do it, made
//! to survive the loss of the session that applied:
//!
//! 1. one script over the current connection uploads the new ruleset and a backup of
//!    Outrider's current table, checks the new one (`nft -c -f`), arms a restore timer that
//!    does not depend on the SSH session (`systemd-run --on-active` where systemd runs, else a
//!    `setsid` waiter), then applies (`nft -f`, one transaction);
//! 2. a NEW connection confirms: an established session survives a ruleset that blocks SSH,
//!    a new one proves management access still works. Confirming cancels the timer and reads
//!    the live table back for the drift digest;
//! 3. if no new connection gets through before the timer fires, the host restores the backup
//!    by itself and the result is `RolledBack`. Whoever of confirm and timer comes first wins
//!    (`mkdir` of a per-apply directory is the lock), so a late confirm cannot keep a ruleset
//!    the timer already undid, and a late timer cannot undo a confirmed one.
//!
//! An unconfirmed apply still waiting on its timer blocks the next apply on that host
//! (`RollbackPending`): backing up the unconfirmed ruleset would make it permanent.

use std::time::Duration;

use rand::Rng;

use super::drift;
use super::{Compiled, IPT_CHAIN, NFT_TABLE, Output, parse_owner};
use crate::api::security_policy::Backend;
use crate::ssh::{Command, Endpoint, Fleet, Session};

/// Host directory of rulesets, backups and the per-apply locks (root only).
pub const STATE_DIR: &str = "/var/lib/outrider/firewall";
/// Shortest honoured confirm timeout: a new connection needs a few round trips.
pub const MIN_CONFIRM: Duration = Duration::from_secs(3);
/// Longest honoured confirm timeout.
pub const MAX_CONFIRM: Duration = Duration::from_secs(3600);
/// Bytes of a tool's error kept for status.
const MESSAGE_MAX: usize = 900;

/// How applying to one host ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostOutcome {
    /// The ruleset runs and was confirmed over a new connection; `digest` is its drift digest.
    Applied { digest: String },
    /// Nothing was changed (or the change was undone): the old ruleset runs.
    Failed { reason: String, message: String },
    /// The ruleset was applied but not confirmed: the host restored (or is about to restore)
    /// the previous one by itself.
    RolledBack { reason: String, message: String },
}

impl HostOutcome {
    fn failed(reason: &str, message: impl Into<String>) -> Self {
        HostOutcome::Failed {
            reason: reason.into(),
            message: crate::text::clip(message.into(), MESSAGE_MAX),
        }
    }
    fn rolled_back(reason: &str, message: impl Into<String>) -> Self {
        HostOutcome::RolledBack {
            reason: reason.into(),
            message: crate::text::clip(message.into(), MESSAGE_MAX),
        }
    }
}

/// What a read-back found on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    /// Drift digest of Outrider's table/chain; `None` when it does not exist.
    pub digest: Option<String>,
    /// The ownership tag found in it, if any.
    pub tag: Option<String>,
}

/// Progress of one host, for live output (`outrider policy apply`) and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Uploading,
    Confirming,
}

/// The per-apply random token: names the lock directory and the systemd unit.
pub fn nonce() -> String {
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

/// Clamps a confirm timeout into what the protocol can honour.
pub fn confirm_window(d: Duration) -> Duration {
    d.clamp(MIN_CONFIRM, MAX_CONFIRM)
}

/// A heredoc delimiter that does not occur in `body`.
fn delimiter(body: &str, nonce: &str) -> String {
    let mut d = format!("OUTRIDER_EOF_{nonce}");
    while body.lines().any(|l| l == d) {
        d.push('_');
    }
    d
}

fn heredoc(path: &str, body: &str, nonce: &str) -> String {
    let d = delimiter(body, nonce);
    let mut body = body.to_string();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    format!("cat > {path} <<'{d}'\n{body}{d}\n")
}

/// The shell prelude every step shares: root, the state dir, the backend's tools.
fn prelude(backend: Backend) -> String {
    let tools = match backend {
        Backend::Nftables => "nft",
        Backend::Iptables => {
            "iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore"
        }
    };
    format!(
        r#"set -u
umask 077
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
fail() {{ echo "OUTRIDER-ERR $1"; shift; printf '%s\n' "$*"; exit 3; }}
[ "$(id -u)" = 0 ] || fail PrivilegeRequired "changing the firewall needs root: set spec.ssh.become on the Inventory or log in as root"
for t in {tools}; do command -v "$t" >/dev/null 2>&1 || fail NoFirewallTool "$t not found on the host"; done
dir={STATE_DIR}
"#
    )
}

/// The read-back of Outrider's table or chain, between markers.
fn readback(backend: Backend) -> String {
    match backend {
        // nft 1.0's JSON leaves the table comment out: it comes from the text listing
        Backend::Nftables => format!(
            r#"echo OUTRIDER-LIVE-BEGIN
if live=$(nft list table inet {NFT_TABLE} 2>/dev/null); then
  printf '%s\n' "$live" | sed -n 's/^[[:space:]]*comment "\(.*\)"$/OUTRIDER-TAG \1/p' | head -n 1
  nft -j list table inet {NFT_TABLE}
else
  echo OUTRIDER-NO-TABLE
fi
echo OUTRIDER-LIVE-END
"#
        ),
        Backend::Iptables => "echo OUTRIDER-LIVE-BEGIN\niptables-save -t filter\necho OUTRIDER-V6\nip6tables-save -t filter\necho OUTRIDER-LIVE-END\n".to_string(),
    }
}

/// Step 1: upload, back up, check, arm, apply. Prints `OUTRIDER-APPLIED` on success or
/// `OUTRIDER-ERR <Reason>` and the message.
pub fn prepare_script(compiled: &Compiled, policy: &str, confirm: Duration, nonce: &str) -> String {
    let secs = confirm_window(confirm).as_secs().max(1);
    let mut s = prelude(compiled.backend);
    let owner_prefix = format!("outrider {} g", super::owner_name(policy));
    s.push_str(&format!("nonce={nonce}\nsecs={secs}\n"));
    s.push_str("mkdir -p \"$dir\" || fail StateDir \"cannot create $dir\"\n");
    // an unconfirmed apply still pending: its backup is the last good ruleset
    s.push_str(
        r#"if [ -f "$dir/armed" ]; then
  prev=$(cat "$dir/armed")
  if [ ! -d "$dir/decided-$prev" ]; then
    alive=
    # the waiter itself: not a zombie (an init that does not reap), not a reused pid
    p=$(cat "$dir/rollback.pid" 2>/dev/null)
    if [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null \
       && tr '\0' ' ' < "/proc/$p/cmdline" | grep -q "$prev"; then alive=1; fi
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "outrider-fw-rollback-$prev.timer" 2>/dev/null; then alive=1; fi
    [ -n "$alive" ] && fail RollbackPending "an earlier apply ($prev) is unconfirmed; the host restores its previous ruleset when its timer fires"
  fi
fi
"#,
    );
    match &compiled.output {
        Output::Nft(text) => {
            s.push_str(&heredoc("\"$dir/new.nft\"", text, nonce));
            s.push_str(&format!(
                r#"if nft list table inet {NFT_TABLE} > "$dir/current.nft" 2>/dev/null; then
  owner=$(sed -n 's/^[[:space:]]*comment "\(.*\)"$/\1/p' "$dir/current.nft" | head -n 1)
  case "$owner" in
    "outrider "*) case "$owner" in '{owner_prefix}'*) ;; *) fail OwnedByOtherPolicy "table inet {NFT_TABLE} belongs to: $owner" ;; esac ;;
  esac
  {{ echo 'table inet {NFT_TABLE} {{}}'; echo 'delete table inet {NFT_TABLE}'; cat "$dir/current.nft"; }} > "$dir/backup.nft"
else
  printf 'table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n' > "$dir/backup.nft"
fi
out=$(nft -c -f "$dir/new.nft" 2>&1) || fail RulesetRejected "nft -c: $out"
cat > "$dir/rollback.sh" <<'OUTRIDER_ROLLBACK'
dir={STATE_DIR}
mkdir "$dir/decided-$1" 2>/dev/null || exit 0
nft -f "$dir/backup.nft" && echo "$1 $(date +%s)" > "$dir/rolled-back"
OUTRIDER_ROLLBACK
"#
            ));
        }
        Output::Iptables { v4, v6 } => {
            s.push_str(&heredoc("\"$dir/new.v4\"", v4, nonce));
            s.push_str(&heredoc("\"$dir/new.v6\"", v6, nonce));
            s.push_str(&format!(
                r#"backup() {{ # $1 iptables|ip6tables, $2 file
  if "$1" -S {IPT_CHAIN} >/dev/null 2>&1; then
    owner=$("$1" -S {IPT_CHAIN} | sed -n 's/.*--comment "\{{0,1\}}\(outrider [^"]*\)"\{{0,1\}}.*/\1/p' | head -n 1)
    case "$owner" in
      "outrider "*) case "$owner" in '{owner_prefix}'*) ;; *) fail OwnedByOtherPolicy "chain {IPT_CHAIN} belongs to: $owner" ;; esac ;;
    esac
    {{ echo '*filter'; echo ':{IPT_CHAIN} - [0:0]'; "$1"-save -t filter | grep '^-A {IPT_CHAIN} '; echo COMMIT; }} > "$2"
    "$1" -C INPUT -j {IPT_CHAIN} 2>/dev/null && echo keep > "$2.jump" || echo drop > "$2.jump"
  else
    echo none > "$2.jump"; : > "$2"
  fi
}}
backup iptables "$dir/backup.v4"
backup ip6tables "$dir/backup.v6"
out=$(iptables-restore --test --noflush "$dir/new.v4" 2>&1) || fail RulesetRejected "iptables-restore --test: $out"
out=$(ip6tables-restore --test --noflush "$dir/new.v6" 2>&1) || fail RulesetRejected "ip6tables-restore --test: $out"
cat > "$dir/rollback.sh" <<'OUTRIDER_ROLLBACK'
dir={STATE_DIR}
mkdir "$dir/decided-$1" 2>/dev/null || exit 0
for f in v4 v6; do
  if [ "$f" = v4 ]; then t=iptables; else t=ip6tables; fi
  case "$(cat "$dir/backup.$f.jump")" in
    none) "$t" -D INPUT -j {IPT_CHAIN} 2>/dev/null; "$t" -F {IPT_CHAIN} 2>/dev/null; "$t" -X {IPT_CHAIN} 2>/dev/null ;;
    *) "$t-restore" --noflush "$dir/backup.$f"
       if [ "$(cat "$dir/backup.$f.jump")" = drop ]; then "$t" -D INPUT -j {IPT_CHAIN} 2>/dev/null; fi ;;
  esac
done
echo "$1 $(date +%s)" > "$dir/rolled-back"
OUTRIDER_ROLLBACK
"#
            ));
        }
    }
    // arm, then apply; a failed apply changed nothing (one transaction), so it disarms
    s.push_str(
        r#"rm -rf "$dir"/decided-*
echo "$nonce" > "$dir/armed"
rm -f "$dir/rollback.pid" "$dir/rollback.unit"
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1 \
   && systemd-run --quiet --unit="outrider-fw-rollback-$nonce" --on-active="${secs}s" --timer-property=AccuracySec=1s /bin/sh "$dir/rollback.sh" "$nonce" >/dev/null 2>&1; then
  echo "outrider-fw-rollback-$nonce" > "$dir/rollback.unit"
else
  setsid /bin/sh -c "sleep $secs; exec /bin/sh '$dir/rollback.sh' '$nonce'" </dev/null >/dev/null 2>&1 &
  echo $! > "$dir/rollback.pid"
fi
disarm() {
  mkdir "$dir/decided-$nonce" 2>/dev/null
  if [ -f "$dir/rollback.unit" ]; then systemctl stop "$(cat "$dir/rollback.unit").timer" >/dev/null 2>&1; fi
  if [ -f "$dir/rollback.pid" ]; then kill -- -"$(cat "$dir/rollback.pid")" 2>/dev/null || kill "$(cat "$dir/rollback.pid")" 2>/dev/null; fi
}
"#,
    );
    match compiled.backend {
        Backend::Nftables => s.push_str(
            r#"out=$(nft -f "$dir/new.nft" 2>&1) || { disarm; fail ApplyFailed "nft -f: $out"; }
"#,
        ),
        Backend::Iptables => s.push_str(&format!(
            r#"out=$(iptables-restore --noflush "$dir/new.v4" 2>&1) || {{ disarm; fail ApplyFailed "iptables-restore: $out"; }}
out=$(ip6tables-restore --noflush "$dir/new.v6" 2>&1) || {{ /bin/sh "$dir/rollback.sh" "$nonce"; disarm; fail ApplyFailed "ip6tables-restore: $out"; }}
iptables -C INPUT -j {IPT_CHAIN} 2>/dev/null || iptables -I INPUT 1 -j {IPT_CHAIN}
ip6tables -C INPUT -j {IPT_CHAIN} 2>/dev/null || ip6tables -I INPUT 1 -j {IPT_CHAIN}
"#
        )),
    }
    s.push_str("echo OUTRIDER-APPLIED\n");
    s
}

/// Step 2, over a new connection: take the lock before the timer does, cancel the timer,
/// read the live ruleset back. Prints `OUTRIDER-CONFIRMED` + the read-back, or
/// `OUTRIDER-TOO-LATE` when the timer won.
pub fn confirm_script(backend: Backend, nonce: &str) -> String {
    let mut s = prelude(backend);
    s.push_str(&format!("nonce={nonce}\n"));
    s.push_str(
        r#"if mkdir "$dir/decided-$nonce" 2>/dev/null; then
  if [ -f "$dir/rollback.unit" ]; then systemctl stop "$(cat "$dir/rollback.unit").timer" >/dev/null 2>&1; fi
  if [ -f "$dir/rollback.pid" ]; then kill -- -"$(cat "$dir/rollback.pid")" 2>/dev/null || kill "$(cat "$dir/rollback.pid")" 2>/dev/null; fi
  echo OUTRIDER-CONFIRMED
else
  echo OUTRIDER-TOO-LATE
fi
"#,
    );
    s.push_str(&readback(backend));
    s
}

/// A drift check: the live ruleset only.
pub fn read_script(backend: Backend) -> String {
    let mut s = prelude(backend);
    s.push_str(&readback(backend));
    s
}

/// The `OUTRIDER-ERR` reason and message in a step's output, if it failed.
fn error_in(out: &str) -> Option<(String, String)> {
    let mut lines = out.lines();
    while let Some(line) = lines.next() {
        if let Some(reason) = line.strip_prefix("OUTRIDER-ERR ") {
            let message: Vec<&str> = lines.collect();
            return Some((
                reason.trim().to_string(),
                message.join("\n").trim().to_string(),
            ));
        }
    }
    None
}

/// Parses the read-back between the markers.
pub fn parse_live(backend: Backend, out: &str) -> Result<Live, String> {
    let begin = out
        .find("OUTRIDER-LIVE-BEGIN\n")
        .ok_or_else(|| "the host's reply has no read-back".to_string())?;
    let body = &out[begin + "OUTRIDER-LIVE-BEGIN\n".len()..];
    let end = body
        .find("OUTRIDER-LIVE-END")
        .ok_or_else(|| "the host's read-back was cut off".to_string())?;
    let body = &body[..end];
    match backend {
        Backend::Nftables => {
            if body.trim() == "OUTRIDER-NO-TABLE" {
                return Ok(Live {
                    digest: None,
                    tag: None,
                });
            }
            let mut tag = None;
            let mut json = String::new();
            for line in body.lines() {
                match line.strip_prefix("OUTRIDER-TAG ") {
                    Some(t) => tag = Some(t.to_string()),
                    None => {
                        json.push_str(line);
                        json.push('\n');
                    }
                }
            }
            let normal = drift::normalise_nft(json.trim()).map_err(|e| e.to_string())?;
            let digest_input = format!("{}\n{normal}", tag.as_deref().unwrap_or_default());
            Ok(Live {
                digest: Some(super::sha256(digest_input.as_bytes())),
                tag,
            })
        }
        Backend::Iptables => {
            let (v4, v6) = body.split_once("OUTRIDER-V6\n").unwrap_or((body, ""));
            let (n4, n6) = (drift::normalise_iptables(v4), drift::normalise_iptables(v6));
            if n4.is_empty() && n6.is_empty() {
                return Ok(Live {
                    digest: None,
                    tag: None,
                });
            }
            let tag = n4.lines().find_map(|l| {
                let (_, rest) = l.split_once("--comment ")?;
                let rest = rest.trim_start_matches('"');
                let end = rest.find('"').unwrap_or(rest.len());
                let tag = &rest[..end];
                parse_owner(tag).map(|_| tag.to_string())
            });
            Ok(Live {
                digest: Some(super::sha256(format!("{n4}\0{n6}").as_bytes())),
                tag,
            })
        }
    }
}

fn ssh_failure(e: &crate::ssh::Error) -> String {
    crate::text::clip(e.to_string(), MESSAGE_MAX)
}

/// Reads one host's live ruleset over `session`.
pub async fn read(session: &Session, backend: Backend, timeout: Duration) -> Result<Live, String> {
    let cmd = Command::script(read_script(backend))
        .timeout(timeout)
        .capture(4 << 20, 0);
    let out = session.exec(&cmd).await.map_err(|e| ssh_failure(&e))?;
    let stdout = out.stdout.to_string_lossy();
    if let Some((reason, message)) = error_in(&stdout) {
        return Err(format!("{reason}: {message}"));
    }
    if !out.success() {
        return Err(format!(
            "read-back exited with {}: {}",
            out.status_text(),
            crate::text::tail(&out.stderr.to_string_lossy(), 300)
        ));
    }
    parse_live(backend, &stdout)
}

/// Applies `compiled` to one host: steps 1–3 of the module docs. `session` is an open
/// connection to it (used for step 1 only); the confirm dials anew through `fleet`.
pub async fn apply(
    fleet: &Fleet,
    endpoint: &Endpoint,
    session: Session,
    compiled: &Compiled,
    policy: &str,
    confirm: Duration,
    progress: &(dyn Fn(Step) + Send + Sync),
) -> HostOutcome {
    let confirm = confirm_window(confirm);
    let nonce = nonce();
    progress(Step::Uploading);
    let cmd = Command::script(prepare_script(compiled, policy, confirm, &nonce))
        .timeout(Duration::from_secs(120))
        .capture(64 << 10, 16 << 10);
    let started = tokio::time::Instant::now();
    let out = match session.exec(&cmd).await {
        Ok(o) => o,
        Err(e) => {
            // the session died during the apply: the timer (if armed) decides
            drop(session);
            return confirm_over_new(
                fleet,
                endpoint,
                compiled.backend,
                &nonce,
                started,
                confirm,
                progress,
            )
            .await
            .unwrap_or_else(|| HostOutcome::failed("ConnectionLost", ssh_failure(&e)));
        }
    };
    drop(session);
    let stdout = out.stdout.to_string_lossy();
    if let Some((reason, message)) = error_in(&stdout) {
        return HostOutcome::failed(&reason, message);
    }
    if !stdout.lines().any(|l| l == "OUTRIDER-APPLIED") {
        // cut off between arming and reporting: the timer (if armed) decides
        return confirm_over_new(
            fleet,
            endpoint,
            compiled.backend,
            &nonce,
            started,
            confirm,
            progress,
        )
        .await
        .unwrap_or_else(|| {
            HostOutcome::failed(
                "ApplyFailed",
                format!(
                    "the apply script ended with {}: {}",
                    out.status_text(),
                    crate::text::tail(&out.stderr.to_string_lossy(), 400)
                ),
            )
        });
    }
    match confirm_over_new(
        fleet,
        endpoint,
        compiled.backend,
        &nonce,
        started,
        confirm,
        progress,
    )
    .await
    {
        Some(outcome) => outcome,
        None => HostOutcome::rolled_back(
            "NotConfirmed",
            "applied, but no new SSH connection could confirm it; the host restores its previous ruleset when the confirm timeout ends",
        ),
    }
}

/// Confirms over new connections until shortly before the host's timer fires. `None` when
/// no connection got through (nothing is known but that the timer will restore).
async fn confirm_over_new(
    fleet: &Fleet,
    endpoint: &Endpoint,
    backend: Backend,
    nonce: &str,
    started: tokio::time::Instant,
    confirm: Duration,
    progress: &(dyn Fn(Step) + Send + Sync),
) -> Option<HostOutcome> {
    progress(Step::Confirming);
    // leave the timer a margin: a confirm racing it is decided by the lock anyway
    let until = started + confirm.saturating_sub(Duration::from_millis(500));
    let mut last = String::new();
    let mut pause = Duration::from_millis(200);
    while tokio::time::Instant::now() < until {
        let attempt = async {
            let session = fleet.connect(endpoint).await.map_err(|e| ssh_failure(&e))?;
            let cmd = Command::script(confirm_script(backend, nonce))
                .timeout(Duration::from_secs(60))
                .capture(4 << 20, 0);
            let out = session.exec(&cmd).await.map_err(|e| ssh_failure(&e));
            session.close().await;
            out
        };
        match tokio::time::timeout_at(until, attempt).await {
            Ok(Ok(out)) => {
                let stdout = out.stdout.to_string_lossy();
                if let Some((reason, message)) = error_in(&stdout) {
                    return Some(HostOutcome::rolled_back(&reason, message));
                }
                if stdout.lines().any(|l| l == "OUTRIDER-TOO-LATE") {
                    return Some(HostOutcome::rolled_back(
                        "ConfirmTooLate",
                        "a new connection got through only after the confirm timeout: the host restored its previous ruleset",
                    ));
                }
                if stdout.lines().any(|l| l == "OUTRIDER-CONFIRMED") {
                    return Some(match parse_live(backend, &stdout) {
                        Ok(Live {
                            digest: Some(digest),
                            ..
                        }) => HostOutcome::Applied { digest },
                        Ok(Live { digest: None, .. }) => HostOutcome::failed(
                            "Vanished",
                            "confirmed, but the ruleset is gone from the host",
                        ),
                        Err(e) => HostOutcome::failed("ReadBackFailed", e),
                    });
                }
                last = format!(
                    "confirm exited with {}: {}",
                    out.status_text(),
                    crate::text::tail(&out.stderr.to_string_lossy(), 300)
                );
            }
            Ok(Err(e)) => last = e,
            Err(_) => break,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
    if last.is_empty() {
        None
    } else {
        Some(HostOutcome::rolled_back(
            "NotConfirmed",
            format!(
                "no new SSH connection confirmed the ruleset ({last}); the host restores its previous ruleset when the confirm timeout ends"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heredoc_delimiter_never_occurs_in_the_body() {
        let body = "a\nOUTRIDER_EOF_ab\nb\n";
        let d = delimiter(body, "ab");
        assert_eq!(d, "OUTRIDER_EOF_ab_");
        assert!(heredoc("f", body, "ab").ends_with("b\nOUTRIDER_EOF_ab_\n"));
    }

    #[test]
    fn step_errors_carry_reason_and_message() {
        let out = "noise\nOUTRIDER-ERR RulesetRejected\nnft -c: Error: syntax error\nline 2\n";
        assert_eq!(
            error_in(out),
            Some((
                "RulesetRejected".into(),
                "nft -c: Error: syntax error\nline 2".into()
            ))
        );
        assert_eq!(error_in("OUTRIDER-APPLIED\n"), None);
    }

    #[test]
    fn a_missing_table_reads_as_no_digest() {
        let out = "OUTRIDER-LIVE-BEGIN\nOUTRIDER-NO-TABLE\nOUTRIDER-LIVE-END\n";
        assert_eq!(
            parse_live(Backend::Nftables, out),
            Ok(Live {
                digest: None,
                tag: None
            })
        );
        assert!(parse_live(Backend::Nftables, "OUTRIDER-LIVE-BEGIN\n{\"nftables\":[]").is_err());
    }

    #[test]
    fn confirm_timeouts_are_clamped() {
        assert_eq!(confirm_window(Duration::from_millis(10)), MIN_CONFIRM);
        assert_eq!(
            confirm_window(Duration::from_secs(86400 * 365)),
            MAX_CONFIRM
        );
        assert_eq!(
            confirm_window(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }
}
