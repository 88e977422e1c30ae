//! The one audited place where an argv becomes a shell command string.
//!
//! SSH has no argv: an `exec` request carries a single string that the remote login shell
//! parses (`$SHELL -c STRING`). Every value that reaches a remote command goes through here,
//! so a spec value such as `$(rm -rf /)` arrives as that literal text, never as code.
//!
//! The output is POSIX shell syntax (sh, dash, bash, ksh, zsh). Shells with other quoting
//! rules (fish, csh/tcsh) are not supported as login shells of target accounts.

use std::borrow::Cow;
use std::collections::BTreeMap;

/// Why an argv or environment cannot be turned into a shell command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    /// A C string cannot carry NUL: sshd and `execve` would cut the value short.
    #[error("{what} contains a NUL byte, which cannot be passed through a shell")]
    Nul { what: String },
    #[error("environment variable name {name:?} is invalid (expected [A-Za-z_][A-Za-z0-9_]*)")]
    BadEnvName { name: String },
    #[error("empty command: no program to run")]
    EmptyArgv,
    /// `env` would read a first word containing `=` as one more assignment, not as the program.
    #[error("program name {program:?} contains '=' and cannot follow environment assignments")]
    ProgramLooksLikeAssignment { program: String },
}

/// Bytes that never mean anything special to a POSIX shell in argument position.
fn is_safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'_' | b'@' | b'%' | b'+' | b'=' | b':' | b',' | b'.' | b'/' | b'-'
        )
}

/// Reserved words are only recognised unquoted in command position; quoting the program
/// name keeps `if`, `!`, `time`, … meaning "run the program called that".
const RESERVED_WORDS: &[&str] = &[
    "!",
    "{",
    "}",
    "case",
    "do",
    "done",
    "elif",
    "else",
    "esac",
    "fi",
    "for",
    "if",
    "in",
    "then",
    "until",
    "while",
    "[[",
    "]]",
    "function",
    "select",
    "time",
    "coproc",
    "foreach",
    "repeat",
    "end",
    "nocorrect",
    "noglob",
];

/// Quotes one word for a POSIX shell: bare when it is made only of `[A-Za-z0-9_@%+=:,./-]`,
/// otherwise single-quoted with `'` written as `'\''`; the empty string becomes `''`.
///
/// Inside single quotes nothing is special (no `$`, backquote, `\`, glob or newline
/// handling), so this is exact for every string without NUL. NUL cannot be represented;
/// use [`command_line`] to have it rejected.
pub fn shell_quote(s: &str) -> Cow<'_, str> {
    // a leading `=` is zsh's `=cmd` expansion (the path of cmd): quoted
    if !s.is_empty() && !s.starts_with('=') && s.bytes().all(is_safe_byte) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Cow::Owned(out)
}

/// Joins an argv into one command string that a POSIX shell splits back into exactly `argv`.
///
/// The program name (first word) is also quoted when it is a shell reserved word, contains
/// `=` or starts with `-`, so it can never be read as a keyword, a variable assignment or
/// (first in the `sh -c LINE` sshd runs) the shell's own options. A leading `=` is quoted in
/// every word (zsh's `=cmd` expansion). NUL bytes cannot
/// survive (sshd rejects them, and the word they are in is always left inside an open quote,
/// so the remote shell fails with a syntax error rather than running something else); prefer
/// [`command_line`], which reports them.
pub fn shell_join(argv: &[impl AsRef<str>]) -> String {
    let mut out = String::new();
    for (i, word) in argv.iter().enumerate() {
        let word = word.as_ref();
        if i > 0 {
            out.push(' ');
        }
        match shell_quote(word) {
            // a bare program name that would read as an assignment or a keyword, or, first
            // in `sh -c LINE` as sshd runs it, as the shell's own options: quoted whole
            // (only safe bytes here, so plain quotes are exact)
            Cow::Borrowed(w)
                if i == 0
                    && !w.is_empty()
                    && (w.contains('=') || w.starts_with('-') || RESERVED_WORDS.contains(&w)) =>
            {
                out.push('\'');
                out.push_str(w);
                out.push('\'');
            }
            // anything else that needed quoting is already quoted exactly, `'` included
            // (`x=';id;'` used to be wrapped in bare quotes here and ran `id`)
            q => out.push_str(&q),
        }
    }
    out
}

/// `env K1=v1 K2='v 2' ` (trailing space) to put in front of a command, or `""` for no
/// variables. Names must match `[A-Za-z_][A-Za-z0-9_]*`: anything else is an error rather
/// than something `env` or the shell might read as an option or an operator.
///
/// `env` rather than bare `K=v cmd` assignments: the variables then reach exactly the program
/// `env` executes, while a bare prefix before a special builtin can change the shell itself.
pub fn env_assignments(env: &BTreeMap<String, String>) -> Result<String, QuoteError> {
    if env.is_empty() {
        return Ok(String::new());
    }
    let mut out = String::from("env ");
    for (name, value) in env {
        check_env(name, value)?;
        out.push_str(name);
        out.push('=');
        out.push_str(&shell_quote(value));
        out.push(' ');
    }
    Ok(out)
}

/// Shell lines that set and export `env` (`NAME='value'` then `export NAME`), for a script
/// read from stdin: values travel in the session's data, never on a command line that
/// every local user of the host can read in `ps`.
pub fn env_exports(env: &BTreeMap<String, String>) -> Result<String, QuoteError> {
    let mut out = String::new();
    for (name, value) in env {
        check_env(name, value)?;
        out.push_str(name);
        out.push('=');
        out.push_str(&shell_quote(value));
        out.push_str("\nexport ");
        out.push_str(name);
        out.push('\n');
    }
    Ok(out)
}

fn check_env(name: &str, value: &str) -> Result<(), QuoteError> {
    if !is_env_name(name) {
        return Err(QuoteError::BadEnvName {
            name: name.to_owned(),
        });
    }
    if value.contains('\0') {
        return Err(QuoteError::Nul {
            what: format!("the value of environment variable {name}"),
        });
    }
    Ok(())
}

/// The checked entry point: environment prefix plus quoted argv, rejecting an empty argv,
/// NUL bytes, bad variable names and a program name `env` would misread as an assignment.
/// With variables set, the program is started by `env`, so it must be an executable, not a
/// shell builtin or function.
pub fn command_line(
    env: &BTreeMap<String, String>,
    argv: &[impl AsRef<str>],
) -> Result<String, QuoteError> {
    let Some(program) = argv.first() else {
        return Err(QuoteError::EmptyArgv);
    };
    for (i, word) in argv.iter().enumerate() {
        if word.as_ref().contains('\0') {
            return Err(QuoteError::Nul {
                what: format!("argument {i}"),
            });
        }
    }
    let prefix = env_assignments(env)?;
    if !prefix.is_empty() && program.as_ref().contains('=') {
        return Err(QuoteError::ProgramLooksLikeAssignment {
            program: program.as_ref().to_owned(),
        });
    }
    // bash reads a command word starting with `%` as a job spec and runs `fg`, quoted or not:
    // `env` looks the program up on PATH instead (by the absolute path every shebang relies
    // on, so the user's PATH need not hold it; with variables set, `env` already runs it)
    let prefix = if prefix.is_empty() && program.as_ref().starts_with('%') {
        String::from("/usr/bin/env ")
    } else {
        prefix
    };
    Ok(prefix + &shell_join(argv))
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// Inputs that have broken real-world quoting helpers.
    const TRICKY: &[&str] = &[
        "",
        " ",
        "  leading and trailing  ",
        "$(rm -rf /)",
        "`rm -rf /`",
        "${HOME}",
        "$HOME",
        "$0",
        "$@",
        "$*",
        "$$",
        "a;b",
        "; rm -rf / ;",
        "a && b",
        "a || b",
        "a | b",
        "a & b",
        "a\nb",
        "\n",
        "line1\nline2\n",
        "\r\n",
        "tab\there",
        "'",
        "''",
        "'''",
        "it's",
        "\"",
        "\"double\"",
        "'\"'\"'",
        "\\",
        "\\'",
        "'\\",
        "a\\nb",
        "*",
        "*.txt",
        "?",
        "[a-z]",
        "~",
        "~root",
        "~/x",
        "-rf",
        "--",
        "-n",
        "-e",
        "--help=yes",
        "héllo wörld",
        "日本語",
        "emoji 🦀",
        "\u{7f}\u{1}\u{1b}[31m",
        "#not a comment",
        "a#b",
        "!",
        "!!",
        "!$",
        "{a,b}",
        "{}",
        "a=b",
        "A=$(id)",
        "<in",
        ">out",
        "2>&1",
        "(subshell)",
        "%s",
        "%%",
        "plain",
        "with/slash.and-dash_and:colon,comma+plus@at%pct=eq",
    ];

    /// Runs `SHELL -c "printf '%s\0' <joined>"` and returns the words the shell saw.
    fn round_trip(shell: &str, argv: &[&str]) -> Vec<String> {
        let script = format!("printf '%s\\0' {}", shell_join(argv));
        let out = Command::new(shell)
            .arg("-c")
            .arg(&script)
            .env("HOME", "/nonexistent-home")
            .output()
            .expect("spawn shell");
        assert!(
            out.status.success(),
            "{shell} failed on {script:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut words: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .map(|w| String::from_utf8(w.to_vec()).expect("utf8"))
            .collect();
        assert_eq!(words.pop().as_deref(), Some(""), "output ends with NUL");
        words
    }

    fn shells() -> Vec<&'static str> {
        let found: Vec<&str> = [
            "/bin/sh",
            "/bin/dash",
            "/bin/bash",
            "/bin/zsh",
            "/bin/ksh",
            "/bin/mksh",
        ]
        .into_iter()
        .filter(|s| Path::new(s).exists())
        .collect();
        assert!(!found.is_empty(), "no POSIX shell found");
        found
    }

    #[test]
    fn safe_words_stay_bare() {
        for w in [
            "plain",
            "a=b",
            "/usr/bin/env",
            "-rf",
            "user@host:22",
            "1.2.3.4",
            "a,b+c%d",
        ] {
            assert!(matches!(shell_quote(w), Cow::Borrowed(_)), "{w}");
            assert_eq!(shell_quote(w), w);
        }
    }

    #[test]
    fn empty_string_is_two_quotes() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_join(&["echo", ""]), "echo ''");
    }

    #[test]
    fn metacharacters_are_single_quoted() {
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote("`id`"), "'`id`'");
        assert_eq!(shell_quote("a;b"), "'a;b'");
        assert_eq!(shell_quote("a && b"), "'a && b'");
        assert_eq!(shell_quote("a|b"), "'a|b'");
        assert_eq!(shell_quote("a\nb"), "'a\nb'");
        assert_eq!(shell_quote("\"x\""), "'\"x\"'");
        assert_eq!(shell_quote("*"), "'*'");
        assert_eq!(shell_quote("~"), "'~'");
        assert_eq!(shell_quote("日本"), "'日本'");
        assert_eq!(shell_quote("#x"), "'#x'");
        assert_eq!(shell_quote("!"), "'!'");
    }

    #[test]
    fn single_quote_is_closed_escaped_and_reopened() {
        assert_eq!(shell_quote("'"), r#"''\'''"#);
        assert_eq!(shell_quote("it's"), r#"'it'\''s'"#);
    }

    #[test]
    fn leading_dash_is_not_special_to_the_shell() {
        assert_eq!(shell_join(&["rm", "-rf", "--", "-x"]), "rm -rf -- -x");
    }

    #[test]
    fn program_name_is_never_a_keyword_or_assignment() {
        assert_eq!(shell_join(&["if", "x"]), "'if' x");
        assert_eq!(shell_join(&["time", "ls"]), "'time' ls");
        assert_eq!(shell_join(&["A=b", "c"]), "'A=b' c");
        // Only the program name: later words are plain arguments.
        assert_eq!(shell_join(&["echo", "if", "A=b"]), "echo if A=b");
        // A shell really runs a program named like a keyword instead of failing to parse.
        for shell in shells() {
            for argv in [["if"], ["A=b"], ["!"]] {
                let out = Command::new(shell)
                    .arg("-c")
                    .arg(shell_join(&argv))
                    .output()
                    .expect("spawn shell");
                assert_eq!(out.status.code(), Some(127), "{shell} {argv:?}: {out:?}");
            }
        }
    }

    #[test]
    fn join_of_nothing_is_empty() {
        let none: [&str; 0] = [];
        assert_eq!(shell_join(&none), "");
    }

    #[test]
    fn join_accepts_owned_strings() {
        let argv = vec!["echo".to_owned(), "a b".to_owned()];
        assert_eq!(shell_join(&argv), "echo 'a b'");
    }

    #[test]
    fn tricky_words_round_trip_through_real_shells() {
        for shell in shells() {
            // All at once, and each on its own (an empty argv list would print nothing).
            assert_eq!(round_trip(shell, TRICKY), TRICKY, "{shell}");
            for w in TRICKY {
                assert_eq!(round_trip(shell, &[w]), [*w], "{shell}: {w:?}");
            }
        }
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Runs `shell_join(argv)` as a command in `shell`, with PATH holding one program named
    /// `argv[0]` that prints its name and arguments: what the shell actually ran.
    fn run_as_program(shell: &str, argv: &[&str]) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let prog = dir.path().join(argv[0]);
        std::fs::write(&prog, "#!/bin/sh\nprintf '%s\\0' \"${0##*/}\" \"$@\"\n").expect("program");
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let out = Command::new(shell)
            .arg("-c")
            .arg(command_line(&BTreeMap::new(), argv).expect("valid argv"))
            .env("PATH", dir.path())
            .env("HOME", "/nonexistent-home")
            .output()
            .expect("spawn shell");
        let mut words: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        words.pop();
        words
    }

    #[test]
    fn hostile_program_names_run_that_program_and_nothing_else() {
        let names = [
            "x=';id;'", "x=$(id)", "a=b", "=ls", "~root", "if", "!", "it's", "x='", "a b", "*",
            "-n", "%1", "%%", "%x y",
        ];
        for shell in shells() {
            for name in names {
                assert_eq!(
                    run_as_program(shell, &[name, "arg;id", "'"]),
                    [name, "arg;id", "'"],
                    "{shell}: {name:?} as the program: {}",
                    shell_join(&[name])
                );
            }
        }
    }

    #[test]
    fn random_program_names_from_the_hostile_alphabet_run_exactly_that_program() {
        let alphabet: Vec<char> = (1u8..=127)
            .map(char::from)
            .filter(|c| *c != '/')
            .chain(['é', '日'])
            .collect();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for shell in shells() {
            for _ in 0..40 {
                let name: String = (0..1 + rng.below(10))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect();
                if name == "." || name == ".." {
                    continue;
                }
                assert_eq!(
                    run_as_program(shell, &[&name, "x"]),
                    [name.as_str(), "x"],
                    "{shell}: {name:?}"
                );
            }
        }
    }

    #[test]
    fn random_words_round_trip_through_real_shells() {
        // Every ASCII byte except NUL, plus multi-byte characters.
        let mut alphabet: Vec<char> = (1u8..=127).map(char::from).collect();
        alphabet.extend(['é', 'ß', '日', '🦀', '\u{a0}', '\u{2028}', '\u{feff}']);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for shell in shells() {
            for _ in 0..60 {
                let argv: Vec<String> = (0..1 + rng.below(8))
                    .map(|_| {
                        (0..rng.below(12))
                            .map(|_| alphabet[rng.below(alphabet.len())])
                            .collect()
                    })
                    .collect();
                let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
                assert_eq!(round_trip(shell, &refs), refs, "{shell}");
            }
        }
    }

    #[test]
    fn env_assignments_quote_values_and_sort_names() {
        let env = BTreeMap::from([
            ("B".to_owned(), "two words".to_owned()),
            ("A_1".to_owned(), "plain".to_owned()),
            ("_C".to_owned(), "$(id)'x".to_owned()),
            ("D".to_owned(), String::new()),
        ]);
        assert_eq!(
            env_assignments(&env).unwrap(),
            r#"env A_1=plain B='two words' D='' _C='$(id)'\''x' "#
        );
        assert_eq!(env_assignments(&BTreeMap::new()).unwrap(), "");
    }

    #[test]
    fn env_assignments_reject_bad_names() {
        for bad in ["", "1A", "A-B", "A B", "A=B", "-i", "A;B", "É", "A\0"] {
            let env = BTreeMap::from([(bad.to_owned(), "v".to_owned())]);
            assert_eq!(
                env_assignments(&env),
                Err(QuoteError::BadEnvName {
                    name: bad.to_owned()
                }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn env_exports_set_and_export_quoted_values() {
        let env = BTreeMap::from([
            ("B".to_owned(), "two words".to_owned()),
            ("_C".to_owned(), "$(id)'x".to_owned()),
        ]);
        assert_eq!(
            env_exports(&env).unwrap(),
            "B='two words'\nexport B\n_C='$(id)'\\''x'\nexport _C\n"
        );
        let bad = BTreeMap::from([("A;B".to_owned(), "v".to_owned())]);
        assert!(env_exports(&bad).is_err());
    }

    #[test]
    fn env_assignments_reject_nul() {
        let env = BTreeMap::from([("A".to_owned(), "x\0y".to_owned())]);
        assert!(matches!(env_assignments(&env), Err(QuoteError::Nul { .. })));
    }

    #[test]
    fn command_line_checks_everything() {
        let none = BTreeMap::new();
        let empty: [&str; 0] = [];
        assert_eq!(command_line(&none, &empty), Err(QuoteError::EmptyArgv));
        assert_eq!(
            command_line(&none, &["echo", "a\0b"]),
            Err(QuoteError::Nul {
                what: "argument 1".to_owned()
            })
        );
        assert_eq!(command_line(&none, &["A=b"]).unwrap(), "'A=b'");
        let env = BTreeMap::from([("X".to_owned(), "1".to_owned())]);
        assert_eq!(
            command_line(&env, &["echo", "$X"]).unwrap(),
            "env X=1 echo '$X'"
        );
        assert!(matches!(
            command_line(&env, &["A=b"]),
            Err(QuoteError::ProgramLooksLikeAssignment { .. })
        ));
    }

    #[test]
    fn command_line_env_reaches_the_program_verbatim() {
        let env = BTreeMap::from([
            (
                "V1".to_owned(),
                "$(echo pwned) `id` ; | & 'q' \"d\" \n *".to_owned(),
            ),
            ("V2".to_owned(), String::new()),
        ]);
        let cmd = command_line(&env, &["sh", "-c", "printf '%s\\0' \"$V1\" \"$V2\""]).unwrap();
        for shell in shells() {
            let out = Command::new(shell)
                .arg("-c")
                .arg(&cmd)
                .output()
                .expect("spawn");
            assert!(out.status.success(), "{shell}: {out:?}");
            let expected = format!("{}\0\0", env["V1"]);
            assert_eq!(String::from_utf8(out.stdout).unwrap(), expected, "{shell}");
        }
    }
}
