//! Host checks: every check of a HealthCheck compiled once, then each round turned into
//! ONE shell script per host (one exec channel on the host's kept-open connection, where
//! Nagios' `check_by_ssh` pays a handshake per check) and the script's output parsed back
//! into one [`Observation`] per check.
//!
//! The script reads raw values from `/proc` and POSIX tools (`df -P`), never from
//! locale-dependent or distribution-specific output. Each check's output sits between
//! marker lines carrying a per-round random nonce, so nothing a check prints can pass for
//! another check's result. Whatever the host sends back is clipped and parsed defensively:
//! a missing file or tool, a truncated or garbled section is `Unknown` with the reason.

use std::fmt::Write as _;
use std::time::Duration;

use regex::{Regex, RegexBuilder};

use super::baseline::Unit;
use super::{MAX_MESSAGE, Observation};
use crate::api::health_check::Check;

/// Output of one exec check kept for `expectOutput` and messages.
pub const EXEC_OUTPUT_MAX: usize = 4096;
/// Output of the whole script kept (64 checks of at most ~4 KiB each, and /proc files).
pub const SCRIPT_OUTPUT_MAX: usize = 512 * 1024;
/// Longest time one check may be given, whatever the spec says.
const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(3600);

/// A check that cannot be compiled: the field and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CheckError {
    pub field: String,
    pub message: String,
}

/// What a check measures on the host.
#[derive(Clone, Debug)]
pub enum Probe {
    Disk { path: String, max_used_percent: f64 },
    Memory { max_used_percent: f64 },
    Load { max_per_core: f64 },
    ProcessName(String),
    Pidfile(String),
    Exec(Exec),
}

/// An `exec` check.
#[derive(Clone, Debug)]
pub struct Exec {
    /// The shell words to run (already quoted).
    words: String,
    /// What to say in messages: the command or `script`.
    label: String,
    expect_exit_code: i32,
    expect_output: Option<Regex>,
}

/// One compiled check.
#[derive(Clone, Debug)]
pub struct HostCheck {
    pub name: String,
    pub probe: Probe,
    pub timeout: Duration,
}

impl HostCheck {
    /// Compiles a spec check; errors name the field (`spec.checks[app].exec.expectOutput`).
    pub fn new(check: &Check) -> Result<Self, CheckError> {
        let field = |f: &str| format!("spec.checks[{}].{f}", check.name);
        let err = |f: &str, message: String| CheckError {
            field: field(f),
            message,
        };
        let timeout = check
            .timeout
            .to_std()
            .map_err(|e| err("timeout", e.to_string()))?
            .clamp(Duration::from_secs(1), MAX_CHECK_TIMEOUT);
        let no_nul = |f: &str, s: &str| {
            if s.contains('\0') {
                Err(err(f, "must not contain a NUL byte".into()))
            } else {
                Ok(())
            }
        };
        let probe = if let Some(d) = &check.disk {
            no_nul("disk.path", &d.path)?;
            Probe::Disk {
                path: d.path.clone(),
                max_used_percent: f64::from(d.max_used_percent),
            }
        } else if let Some(m) = &check.memory {
            Probe::Memory {
                max_used_percent: f64::from(m.max_used_percent),
            }
        } else if let Some(l) = &check.load {
            if !(l.max_per_core.is_finite() && l.max_per_core > 0.0) {
                return Err(err("load.maxPerCore", "must be a number above 0".into()));
            }
            Probe::Load {
                max_per_core: l.max_per_core,
            }
        } else if let Some(p) = &check.process {
            match (&p.name, &p.pidfile) {
                (Some(name), None) => {
                    no_nul("process.name", name)?;
                    Probe::ProcessName(name.clone())
                }
                (None, Some(file)) => {
                    no_nul("process.pidfile", file)?;
                    Probe::Pidfile(file.clone())
                }
                _ => {
                    return Err(err(
                        "process",
                        "exactly one of name or pidfile must be set".into(),
                    ));
                }
            }
        } else if let Some(x) = &check.exec {
            let (words, label) = match (&x.command, &x.script) {
                (Some(argv), None) if !argv.is_empty() => {
                    for a in argv {
                        no_nul("exec.command", a)?;
                    }
                    let words: Vec<String> = argv.iter().map(|a| quote(a)).collect();
                    (words.join(" "), argv.join(" "))
                }
                (None, Some(script)) => {
                    no_nul("exec.script", script)?;
                    (format!("sh -c {}", quote(script)), "script".to_string())
                }
                _ => {
                    return Err(err(
                        "exec",
                        "exactly one of command or script must be set".into(),
                    ));
                }
            };
            let expect_output = x
                .expect_output
                .as_deref()
                .map(|re| {
                    RegexBuilder::new(re)
                        .size_limit(1 << 20)
                        .dfa_size_limit(1 << 20)
                        .build()
                        .map_err(|e| err("exec.expectOutput", e.to_string()))
                })
                .transpose()?;
            Probe::Exec(Exec {
                words,
                label: crate::text::clip(label, 120),
                expect_exit_code: x.expect_exit_code,
                expect_output,
            })
        } else {
            return Err(err(
                "",
                "exactly one of disk, memory, load, process or exec must be set".into(),
            ));
        };
        Ok(Self {
            name: check.name.clone(),
            probe,
            timeout,
        })
    }

    /// The metrics label `probe` and the table column.
    pub fn kind(&self) -> &'static str {
        match self.probe {
            Probe::Disk { .. } => "disk",
            Probe::Memory { .. } => "memory",
            Probe::Load { .. } => "load",
            Probe::ProcessName(_) | Probe::Pidfile(_) => "process",
            Probe::Exec(_) => "exec",
        }
    }

    /// The unit of the value, for baselines; `None` for checks whose value is not a level.
    pub fn unit(&self) -> Option<Unit> {
        match self.probe {
            Probe::Disk { .. } | Probe::Memory { .. } => Some(Unit::Percent),
            Probe::Load { .. } => Some(Unit::LoadPerCore),
            _ => None,
        }
    }
}

/// Single-quotes a word, always: a quoted word is never a keyword, an assignment or a
/// glob, whatever it contains (`'` is written `'\''`).
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The checks of one HealthCheck, compiled, with the script they make.
#[derive(Clone, Debug)]
pub struct HostChecks {
    pub checks: Vec<HostCheck>,
}

impl HostChecks {
    pub fn new(checks: &[Check]) -> Result<Self, CheckError> {
        Ok(Self {
            checks: checks
                .iter()
                .map(HostCheck::new)
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// How long the whole script may run on one host: every check's timeout (each is
    /// bounded on the host by `timeout(1)` where it exists) plus slack for the shell.
    pub fn deadline(&self) -> Duration {
        self.checks
            .iter()
            .map(|c| c.timeout)
            .fold(Duration::from_secs(5), |a, b| a.saturating_add(b))
    }

    /// The script for one round; `nonce` marks its sections (fresh each round).
    pub fn script(&self, nonce: &str) -> String {
        let mut s = String::with_capacity(512 + self.checks.len() * 160);
        // `o IDX TAG [RC]` prints a marker on a line of its own, whatever came before it.
        let _ = writeln!(s, "N={nonce}");
        s.push_str("o() { printf '\\n@@%s %s %s\\n' \"$N\" \"$1\" \"$2\"; }\n");
        // run_to SECONDS ARGV...: bounded by timeout(1) when the host has it
        s.push_str(
            "if command -v timeout >/dev/null 2>&1; then \
             run_to() { t=$1; shift; timeout -k 2 \"$t\" \"$@\"; }; \
             else run_to() { shift; \"$@\"; }; fi\n",
        );
        for (i, c) in self.checks.iter().enumerate() {
            let secs = c.timeout.as_secs().max(1);
            let _ = writeln!(s, "o {i} begin");
            match &c.probe {
                Probe::Disk { path, .. } => {
                    let _ = writeln!(
                        s,
                        "run_to {secs} df -P -k -- {} </dev/null 2>&1; o {i} \"end $?\"",
                        quote(path)
                    );
                }
                Probe::Memory { .. } => {
                    let _ = writeln!(s, "cat /proc/meminfo </dev/null 2>&1; o {i} \"end $?\"");
                }
                Probe::Load { .. } => {
                    let _ = writeln!(
                        s,
                        "cat /proc/loadavg </dev/null 2>&1; r=$?; \
                         echo \"cores $( (nproc || getconf _NPROCESSORS_ONLN) </dev/null 2>/dev/null)\"; \
                         o {i} \"end $r\""
                    );
                }
                Probe::ProcessName(name) => {
                    // a scan of /proc/*/comm in the shell: no pgrep needed, no fork per process
                    let _ = writeln!(
                        s,
                        "if [ -r /proc/self/comm ]; then c=0; for f in /proc/[0-9]*/comm; do \
                         x=; {{ read -r x < \"$f\"; }} 2>/dev/null; [ \"$x\" = {q} ] && c=$((c+1)); \
                         done; echo \"count $c\"; else echo noproc; fi; o {i} \"end 0\"",
                        q = quote(name)
                    );
                }
                Probe::Pidfile(file) => {
                    let _ = writeln!(
                        s,
                        "f={q}; if [ ! -e \"$f\" ]; then echo nofile; \
                         elif ! {{ read -r p < \"$f\"; }} 2>/dev/null; then echo unreadable; \
                         else case $p in ''|*[!0-9]*) echo \"badpid\";; \
                         *) if [ -d \"/proc/$p\" ]; then echo \"alive $p\"; else echo \"dead $p\"; fi;; \
                         esac; fi; o {i} \"end 0\"",
                        q = quote(file)
                    );
                }
                Probe::Exec(x) => {
                    // rc travels on fd 3, output through head on fd 4: the command is never
                    // killed by a full pipe, and only the first 4 KiB are sent back
                    let _ = writeln!(
                        s,
                        "{{ R=$( {{ {{ run_to {secs} {w} </dev/null 2>&1; echo $? >&3; }} | \
                         {{ head -c {max}; cat >/dev/null; }} >&4; }} 3>&1 ); }} 4>&1; o {i} \"end $R\"",
                        w = x.words,
                        max = EXEC_OUTPUT_MAX
                    );
                }
            }
        }
        let _ = writeln!(s, "o all done");
        s
    }

    /// One observation per check, in check order, from the script's output.
    pub fn parse(&self, nonce: &str, output: &str, latency: Duration) -> Vec<Observation> {
        let sections = sections(nonce, output, self.checks.len());
        self.checks
            .iter()
            .zip(sections)
            .map(|(c, sec)| {
                let obs = match sec {
                    Section::Missing => Observation::unknown(
                        "no result: the host's check script stopped before this check",
                    ),
                    Section::Unfinished => Observation::unknown(
                        "no result: the check did not finish (the script was cut off)",
                    ),
                    Section::Done { body, rc } => evaluate(c, body, rc),
                };
                obs.latency(latency)
            })
            .collect()
    }
}

enum Section<'a> {
    Missing,
    Unfinished,
    Done { body: &'a str, rc: Option<i32> },
}

/// Splits the output at this round's marker lines.
fn sections<'a>(nonce: &str, output: &'a str, n: usize) -> Vec<Section<'a>> {
    let mut out: Vec<Section<'a>> = (0..n).map(|_| Section::Missing).collect();
    let prefix = format!("@@{nonce} ");
    let mut open: Option<(usize, usize)> = None; // (check, body start)
    let mut pos = 0;
    for line in output.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        let Some(rest) = line.trim_end_matches('\n').strip_prefix(&prefix) else {
            continue;
        };
        let mut words = rest.split(' ');
        let (Some(idx), Some(tag)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(idx) = idx.parse::<usize>() else {
            continue;
        };
        if idx >= n {
            continue;
        }
        match tag {
            "begin" => {
                out[idx] = Section::Unfinished;
                open = Some((idx, pos));
            }
            "end" => {
                if let Some((o, body_start)) = open.take()
                    && o == idx
                {
                    // the marker starts with a newline of its own: drop it from the body
                    let body = &output[body_start..start];
                    let body = body.strip_suffix('\n').unwrap_or(body);
                    let rc = words.next().and_then(|r| r.trim().parse::<i32>().ok());
                    out[idx] = Section::Done { body, rc };
                }
            }
            _ => {}
        }
    }
    out
}

fn evaluate(check: &HostCheck, body: &str, rc: Option<i32>) -> Observation {
    match &check.probe {
        Probe::Disk {
            path,
            max_used_percent,
        } => disk(path, *max_used_percent, body, rc),
        Probe::Memory { max_used_percent } => memory(*max_used_percent, body, rc),
        Probe::Load { max_per_core } => load(*max_per_core, body, rc),
        Probe::ProcessName(name) => process(name, body),
        Probe::Pidfile(file) => pidfile(file, body),
        Probe::Exec(x) => exec(x, check.timeout, body, rc),
    }
}

/// The first line of tool output, for messages.
fn first_line(body: &str) -> &str {
    crate::text::head(body.trim().lines().next().unwrap_or("").trim(), 200)
}

fn not_found(rc: Option<i32>) -> bool {
    matches!(rc, Some(126 | 127))
}

/// `df -P -k PATH`: used / (used + available), as df's own Capacity column computes it
/// (root's reserved blocks count as unavailable), from the line's numeric fields.
pub fn parse_df(body: &str) -> Option<(f64, String)> {
    let line = body.lines().rev().find(|l| !l.trim().is_empty())?;
    let words: Vec<&str> = line.split_whitespace().collect();
    // Filesystem may contain spaces: find `total used avail NN%` from the left
    let at = (1..words.len().saturating_sub(3)).find(|&i| {
        words[i..i + 3].iter().all(|w| w.parse::<u64>().is_ok())
            && (words[i + 3].ends_with('%') || words[i + 3] == "-")
    })?;
    let used: u64 = words[at + 1].parse().ok()?;
    let avail: u64 = words[at + 2].parse().ok()?;
    let mount = words[at + 4..].join(" ");
    let total = used.checked_add(avail)?;
    let percent = if total == 0 {
        0.0
    } else {
        used as f64 * 100.0 / total as f64
    };
    Some((percent, mount))
}

fn disk(path: &str, max: f64, body: &str, rc: Option<i32>) -> Observation {
    if not_found(rc) {
        return Observation::unknown(format!(
            "df is not available on the host: {}",
            first_line(body)
        ));
    }
    if rc == Some(124) {
        return Observation::unknown(format!("df {path} timed out (a hung mount?)"));
    }
    if rc != Some(0) {
        return Observation::unknown(format!("cannot read {path}: {}", first_line(body)));
    }
    let Some((used, mount)) = parse_df(body) else {
        return Observation::unknown(format!(
            "unexpected df output for {path}: {}",
            first_line(body)
        ));
    };
    let on = if mount.is_empty() || mount == path {
        String::new()
    } else {
        format!(" (on {mount})")
    };
    let msg = format!("{path}{on} is {used:.0}% used (limit {max:.0}%)");
    let obs = if used > max {
        Observation::fail(msg)
    } else {
        Observation::pass(msg)
    };
    obs.value(round2(used), Some(max))
}

/// `/proc/meminfo` in kB: `(total, available, estimated)`; without `MemAvailable` (kernels
/// before 3.14) available is estimated as free + buffers + cached.
pub fn parse_meminfo(body: &str) -> Option<(u64, u64, bool)> {
    let field = |name: &str| -> Option<u64> {
        body.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    let total = field("MemTotal")?;
    if total == 0 {
        return None;
    }
    if let Some(avail) = field("MemAvailable") {
        return Some((total, avail.min(total), false));
    }
    let free = field("MemFree")?;
    let est = free
        .saturating_add(field("Buffers").unwrap_or(0))
        .saturating_add(field("Cached").unwrap_or(0));
    Some((total, est.min(total), true))
}

fn memory(max: f64, body: &str, rc: Option<i32>) -> Observation {
    if rc != Some(0) {
        return Observation::unknown(format!("cannot read /proc/meminfo: {}", first_line(body)));
    }
    let Some((total, avail, estimated)) = parse_meminfo(body) else {
        return Observation::unknown("no MemTotal in /proc/meminfo");
    };
    let used = (total - avail) as f64 * 100.0 / total as f64;
    let est = if estimated {
        " (estimated: no MemAvailable)"
    } else {
        ""
    };
    let msg = format!(
        "memory is {used:.0}% used{est}, {} MiB available of {} MiB (limit {max:.0}%)",
        avail / 1024,
        total / 1024
    );
    let obs = if used > max {
        Observation::fail(msg)
    } else {
        Observation::pass(msg)
    };
    obs.value(round2(used), Some(max))
}

/// `/proc/loadavg` then `cores N`: `(load1, cores)`.
pub fn parse_load(body: &str) -> Result<(f64, u32), &'static str> {
    let mut lines = body.lines();
    let load1: f64 = lines
        .next()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or("unexpected /proc/loadavg")?;
    let cores: u32 = lines
        .find_map(|l| l.strip_prefix("cores"))
        .and_then(|w| w.trim().parse().ok())
        .filter(|&c| c > 0)
        .ok_or("cannot count the CPUs (no nproc or getconf)")?;
    Ok((load1, cores))
}

fn load(max: f64, body: &str, rc: Option<i32>) -> Observation {
    if rc != Some(0) {
        return Observation::unknown(format!("cannot read /proc/loadavg: {}", first_line(body)));
    }
    match parse_load(body) {
        Err(why) => Observation::unknown(why),
        Ok((load1, cores)) => {
            let per_core = load1 / f64::from(cores);
            let msg =
                format!("load {load1:.2} on {cores} cores is {per_core:.2} per core (limit {max})");
            let obs = if per_core > max {
                Observation::fail(msg)
            } else {
                Observation::pass(msg)
            };
            obs.value(round2(per_core), Some(max))
        }
    }
}

fn process(name: &str, body: &str) -> Observation {
    let line = first_line(body);
    if line == "noproc" {
        return Observation::unknown("/proc is not readable on the host");
    }
    match line
        .strip_prefix("count ")
        .and_then(|c| c.trim().parse::<u32>().ok())
    {
        None => Observation::unknown(format!("unexpected process scan output: {line}")),
        Some(0) => {
            Observation::fail(format!("no process named {name} is running")).value(0.0, None)
        }
        Some(n) => Observation::pass(format!(
            "{n} process{} named {name} running",
            if n == 1 { "" } else { "es" }
        ))
        .value(f64::from(n), None),
    }
}

fn pidfile(file: &str, body: &str) -> Observation {
    let line = first_line(body);
    let mut w = line.split(' ');
    match (w.next(), w.next()) {
        // the daemon writes its pidfile: no file means it is not running
        (Some("nofile"), _) => Observation::fail(format!(
            "pidfile {file} does not exist: the process is not running"
        )),
        (Some("unreadable"), _) => Observation::unknown(format!("cannot read pidfile {file}")),
        (Some("badpid"), _) => {
            Observation::unknown(format!("pidfile {file} does not hold a process id"))
        }
        (Some("alive"), Some(pid)) => {
            Observation::pass(format!("process {pid} from {file} is running"))
        }
        (Some("dead"), Some(pid)) => Observation::fail(format!(
            "process {pid} from {file} is not running (stale pidfile)"
        )),
        _ => Observation::unknown(format!("unexpected pidfile check output: {line}")),
    }
}

fn exec(x: &Exec, timeout: Duration, body: &str, rc: Option<i32>) -> Observation {
    let out = crate::text::head(body, EXEC_OUTPUT_MAX);
    let shown = crate::text::tail(out, MAX_MESSAGE / 2);
    let with_output = |msg: String| {
        if shown.is_empty() {
            msg
        } else {
            format!("{msg}: {shown}")
        }
    };
    let Some(rc) = rc else {
        return Observation::unknown(format!("{}: no exit code came back", x.label));
    };
    if rc == 124 {
        return Observation::fail(format!(
            "{} timed out after {}s",
            x.label,
            timeout.as_secs()
        ));
    }
    if not_found(Some(rc)) && x.expect_exit_code != rc {
        return Observation::unknown(with_output(format!(
            "{} could not be run (exit {rc})",
            x.label
        )));
    }
    if rc != x.expect_exit_code {
        return Observation::fail(with_output(format!(
            "{} exited {rc}, expected {}",
            x.label, x.expect_exit_code
        )))
        .value(f64::from(rc), Some(f64::from(x.expect_exit_code)));
    }
    if let Some(re) = &x.expect_output
        && !re.is_match(out)
    {
        return Observation::fail(with_output(format!(
            "{} output does not match /{}/",
            x.label,
            crate::text::head(re.as_str(), 100)
        )))
        .value(f64::from(rc), Some(f64::from(x.expect_exit_code)));
    }
    Observation::pass(format!("{} exited {rc}", x.label))
        .value(f64::from(rc), Some(f64::from(x.expect_exit_code)))
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
