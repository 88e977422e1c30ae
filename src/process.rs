//! Process hardening at start-up. The controller holds every tenant's SSH keys and the agent
//! their sink credentials: a core dump (or a same-uid ptrace) would hand them to whoever
//! reads it. Core files are disabled (`RLIMIT_CORE` 0, soft and hard) and the process is
//! made non-dumpable, which also refuses `ptrace` attachment by other processes of its uid.

/// Disables core dumps and ptrace attachment for this process. An error means the kernel
/// refused; the caller logs it and goes on (the process is still correct, only less hardened).
pub fn no_core_dumps() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; no memory is retained.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_off_and_the_process_is_not_dumpable() {
        // in a child process: the test runner itself must stay as it is
        let exe = std::env::current_exe().unwrap();
        if std::env::var_os("OUTRIDER_HARDEN_CHILD").is_some() {
            no_core_dumps().unwrap();
            let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
            let core = limits
                .lines()
                .find(|l| l.starts_with("Max core file size"))
                .unwrap();
            assert!(
                core.split_whitespace().filter(|w| *w == "0").count() == 2,
                "{core}"
            );
            // SAFETY: PR_GET_DUMPABLE takes no pointer.
            assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
            return;
        }
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "process::tests::core_dumps_are_off_and_the_process_is_not_dumpable",
                "--nocapture",
            ])
            .env("OUTRIDER_HARDEN_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }
}
