//! Shell quoting (src/ssh/quote.rs): an argv joined by `shell_join` and run by real shells
//! comes back exactly, as the arguments of `printf` and, when the first word can be a file
//! name, as a program found on `PATH` that prints its own name and arguments; variables set
//! by `command_line` (through `env`) and `env_exports` (a script on stdin) arrive verbatim;
//! and the checked entry points refuse exactly what they document.
//!
//! Input: one flags byte, then the words separated by NUL (so no word holds NUL; words with
//! NUL are checked without a shell). Shells: `/bin/{sh,dash,bash,zsh,ksh,mksh}` that exist,
//! plus the colon-separated paths in `OUTRIDER_FUZZ_SHELLS`, each real binary once. Shells
//! run with an empty environment, stdin closed, in a scratch directory, with `PATH` holding
//! only the fake program (and `env`), so a quoting bug runs nothing from the system.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use outrider::ssh::quote::{QuoteError, command_line, env_assignments, env_exports, shell_join};

/// Flags: run the program with a variable set through `command_line`'s `env` prefix.
const WITH_ENV: u8 = 1;
/// Flags: also feed `env_exports` of the last word to each shell on stdin.
const EXPORTS: u8 = 2;

const VAR: &str = "FUZZ_V";

/// Prints its own name (not the path the shell found it at) and arguments, NUL-terminated,
/// then whether `FUZZ_V` is set and to what.
const PROGRAM: &str = "#!/bin/sh\nprintf '%s\\0' \"${0##*/}\" \"$@\"\nif [ \"${FUZZ_V+set}\" ]; then printf 'set:%s\\0' \"$FUZZ_V\"; else printf 'unset\\0'; fi\n";

pub fn check(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let words: Vec<String> = rest
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    if words.len() > 64 {
        return;
    }
    checked_entry_points_refuse_what_they_document(&words);

    let scratch = tempfile::Builder::new()
        .prefix("outrider-fuzz-quote")
        .tempdir_in(super::scratch_root())
        .expect("scratch directory");
    let bin = scratch.path().join("bin");
    let sys = scratch.path().join("sys");
    std::fs::create_dir_all(&bin).expect("bin directory");
    std::fs::create_dir_all(&sys).expect("sys directory");
    // `env` starts the program when variables are set; `printf` for shells without it
    // built in (mksh).
    for (name, real) in [("env", env_path()), ("printf", printf_path())] {
        if let Some(real) = real {
            std::os::unix::fs::symlink(real, sys.join(name)).expect("symlink into sys");
        }
    }
    let path = format!("{}:{}", bin.display(), sys.display());

    for shell in shells() {
        arguments_round_trip(shell, scratch.path(), &path, &words);
        if is_file_name(&words[0]) {
            program_round_trip(shell, scratch.path(), &bin, &path, &words, flags);
        }
        if flags & EXPORTS != 0 {
            exports_round_trip(shell, scratch.path(), &path, &words);
        }
    }
}

/// Words the shell must print back, each followed by NUL.
fn nul_joined<S: AsRef<str>>(words: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in words {
        out.extend_from_slice(w.as_ref().as_bytes());
        out.push(0);
    }
    out
}

fn run(shell: &Path, dir: &Path, path: &str, script: &str, stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(shell);
    if stdin.is_none() {
        cmd.arg("-c").arg(script);
    }
    cmd.env_clear()
        .env("PATH", path)
        .env("HOME", "/nonexistent-home")
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn shell");
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        // A shell that stops reading early closes the pipe; its output tells what happened.
        let _ = w.write_all(text.as_bytes());
    }
    child.wait_with_output().expect("wait for shell")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn arguments_round_trip(shell: &Path, dir: &Path, path: &str, words: &[String]) {
    let mut argv = vec!["printf".to_owned(), "%s\\0".to_owned()];
    argv.extend_from_slice(words);
    let line = shell_join(&argv);
    let out = run(shell, dir, path, &line, None);
    assert!(
        out.status.success() && out.stdout == nul_joined(words),
        "{}: {words:?} as arguments, joined as {line:?}: {}",
        shell.display(),
        show(&out)
    );
}

/// A name a program file can have in the scratch `bin` directory.
fn is_file_name(w: &str) -> bool {
    !w.is_empty() && w != "." && w != ".." && !w.contains('/') && w.len() <= 255
}

fn program_round_trip(
    shell: &Path,
    dir: &Path,
    bin: &Path,
    path: &str,
    words: &[String],
    flags: u8,
) {
    let name = &words[0];
    let with_env = flags & WITH_ENV != 0 && name != "env" && env_path().is_some();
    let value = words.last().map(String::as_str).unwrap_or_default();
    let env: BTreeMap<String, String> = if with_env {
        BTreeMap::from([(VAR.to_owned(), value.to_owned())])
    } else {
        BTreeMap::new()
    };
    let line = match command_line(&env, words) {
        Ok(line) => line,
        Err(QuoteError::ProgramLooksLikeAssignment { .. }) if with_env && name.contains('=') => {
            return;
        }
        Err(e) => panic!("command_line({env:?}, {words:?}): {e}"),
    };
    let prog = bin.join(name);
    std::fs::write(&prog, PROGRAM).expect("write program");
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run(shell, dir, path, &line, None);
    let mut want = nul_joined(words);
    if with_env {
        want.extend_from_slice(format!("set:{value}\0").as_bytes());
    } else {
        want.extend_from_slice(b"unset\0");
    }
    let ok = out.status.success() && out.stdout == want;
    if !ok && !is_builtin(shell, dir, path, name) {
        panic!(
            "{}: {words:?} run as a program, joined as {line:?}: {}",
            shell.display(),
            show(&out)
        );
    }
    std::fs::remove_file(&prog).expect("remove program");
}

/// Whether the shell has a builtin of this name (it runs instead of a program on PATH,
/// quoted or not: not something quoting can change). Keywords and aliases do not count:
/// quoting must keep those from applying.
fn is_builtin(shell: &Path, dir: &Path, path: &str, name: &str) -> bool {
    let out = run(
        shell,
        dir,
        path,
        &format!("command -V -- {}", shell_join(&[name])),
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().is_some_and(|l| l.ends_with("builtin"))
}

fn exports_round_trip(shell: &Path, dir: &Path, path: &str, words: &[String]) {
    let value = words.last().map(String::as_str).unwrap_or_default();
    let env = BTreeMap::from([(VAR.to_owned(), value.to_owned())]);
    let script = env_exports(&env).expect("valid name, no NUL") + "printf '%s\\0' \"$FUZZ_V\"\n";
    let out = run(shell, dir, path, "", Some(&script));
    let want = nul_joined(&[value]);
    assert!(
        out.status.success() && out.stdout == want,
        "{}: env_exports of {value:?} on stdin as {script:?}: {}",
        shell.display(),
        show(&out)
    );
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`, written out independently of the code under test.
fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn checked_entry_points_refuse_what_they_document(words: &[String]) {
    let none = BTreeMap::new();
    let empty: [&str; 0] = [];
    assert_eq!(command_line(&none, &empty), Err(QuoteError::EmptyArgv));
    // A NUL anywhere is refused, naming the first word that has one.
    for i in [0, words.len() - 1] {
        let mut with_nul = words.to_vec();
        with_nul[i].push('\0');
        assert_eq!(
            command_line(&none, &with_nul),
            Err(QuoteError::Nul {
                what: format!("argument {i}")
            }),
            "{with_nul:?}"
        );
    }
    // Any word as a variable name: accepted exactly when it is a valid name.
    for w in words.iter().take(4) {
        let env = BTreeMap::from([(w.clone(), "v".to_owned())]);
        let got = env_assignments(&env);
        if valid_env_name(w) {
            assert_eq!(got, Ok(format!("env {w}=v ")), "{w:?}");
        } else {
            assert_eq!(
                got,
                Err(QuoteError::BadEnvName { name: w.clone() }),
                "{w:?}"
            );
        }
        assert_eq!(env_exports(&env).is_ok(), valid_env_name(w), "{w:?}");
        let nul = BTreeMap::from([("V".to_owned(), format!("{w}\0"))]);
        assert!(matches!(env_exports(&nul), Err(QuoteError::Nul { .. })));
    }
    let env = BTreeMap::from([("V".to_owned(), "1".to_owned())]);
    assert_eq!(
        matches!(
            command_line(&env, words),
            Err(QuoteError::ProgramLooksLikeAssignment { .. })
        ),
        words[0].contains('='),
        "{words:?}"
    );
    // Without variables the line is the joined argv, nothing more (but the `env` that keeps
    // bash from reading a leading `%` as a job).
    let bare = shell_join(words);
    let want = if words[0].starts_with('%') {
        format!("/usr/bin/env {bare}")
    } else {
        bare
    };
    assert_eq!(command_line(&none, words), Ok(want));
}

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

fn env_path() -> Option<&'static Path> {
    static ENV: OnceLock<Option<PathBuf>> = OnceLock::new();
    ENV.get_or_init(|| find(&["/usr/bin/env", "/bin/env"]))
        .as_deref()
}

fn printf_path() -> Option<&'static Path> {
    static PRINTF: OnceLock<Option<PathBuf>> = OnceLock::new();
    PRINTF
        .get_or_init(|| find(&["/usr/bin/printf", "/bin/printf"]))
        .as_deref()
}

/// The shells to test, each real binary once (`/bin/sh` is often dash).
pub fn shells() -> &'static [PathBuf] {
    static SHELLS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    SHELLS.get_or_init(|| {
        let extra = std::env::var("OUTRIDER_FUZZ_SHELLS").unwrap_or_default();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for s in [
            "/bin/sh",
            "/bin/dash",
            "/bin/bash",
            "/bin/zsh",
            "/bin/ksh",
            "/bin/mksh",
        ]
        .into_iter()
        .chain(extra.split(':').filter(|s| !s.is_empty()))
        {
            let Ok(real) = std::fs::canonicalize(s) else {
                continue;
            };
            if !seen.contains(&real) {
                seen.push(real);
                out.push(PathBuf::from(s));
            }
        }
        assert!(!out.is_empty(), "no POSIX shell found");
        out
    })
}
