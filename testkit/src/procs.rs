//! The process table (Linux `/proc`), signals, and leftover shared memory.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// The fields of `/proc/<pid>/stat` the harness needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProcStat {
    /// `R`, `S`, `T`, `Z`, ...
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Start time in clock ticks since boot; with the pid it names a process
    /// uniquely.
    pub starttime: u64,
}

fn parse_stat(s: &str) -> Option<ProcStat> {
    // "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    // Fields 5..=21 come next; starttime is field 22.
    let starttime = fields.nth(17)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        starttime,
    })
}

/// The process's stat, or `None` if there is no such process.
pub(crate) fn stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether the process exists and is not a zombie.
pub(crate) fn is_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// Whether the process exists but is a zombie (dead, not yet reaped).
pub(crate) fn is_zombie(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state == 'Z')
}

/// All live descendants of `root` (children, grandchildren, ...), not `root`.
pub(crate) fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(s) = stat(pid) {
            children.entry(s.ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                if k != root && !out.contains(&k) {
                    out.push(k);
                    todo.push(k);
                }
            }
        }
    }
    out
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub(crate) fn signal(pid: u32, sig: Signal) -> std::io::Result<()> {
    let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ok(());
    };
    match rustix::process::kill_process(p, sig) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sends `sig` to each of `pids`, ignoring the ones already gone.
pub(crate) fn signal_all(pids: &[u32], sig: Signal) {
    for &p in pids {
        let _ = signal(p, sig);
    }
}

/// Blocks until none of `pids` is alive, or `timeout` passes; returns whether
/// they are all gone.
pub(crate) fn wait_gone_blocking(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| !is_alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until none of `pids` is alive, or `timeout` passes; returns whether
/// they are all gone.
pub(crate) async fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| !is_alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stops a postmaster and everything it forked the way `pg_ctl stop -m
/// immediate` does (SIGQUIT), falling back to SIGKILL; blocking. Resumes the
/// processes first in case they were paused.
pub(crate) fn shutdown_immediate_blocking(postmaster: u32) {
    let mut all = vec![postmaster];
    all.extend(descendants(postmaster));
    signal_all(&all, Signal::CONT);
    let _ = signal(postmaster, Signal::QUIT);
    if !wait_gone_blocking(&all, Duration::from_secs(10)) {
        let mut rest = vec![postmaster];
        rest.extend(descendants(postmaster));
        rest.extend(all.iter().copied());
        signal_all(&rest, Signal::KILL);
        wait_gone_blocking(&rest, Duration::from_secs(5));
    }
}

/// The lines of a `postmaster.pid` file.
#[derive(Debug, Default)]
pub(crate) struct PidFile {
    /// Line 1: the postmaster's pid.
    pub pid: Option<u32>,
    /// Line 7: the SysV shared memory id.
    pub shmid: Option<u64>,
    /// Line 8: `starting`, `stopping`, `ready` or `standby`.
    pub status: Option<String>,
}

/// Reads `<data_dir>/postmaster.pid`, or `None` if there is none.
pub(crate) fn read_pid_file(data_dir: &Path) -> Option<PidFile> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    Some(PidFile {
        pid: lines.first().and_then(|l| l.trim().parse().ok()),
        shmid: lines
            .get(6)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok()),
        status: lines.get(7).map(|l| l.trim().to_owned()),
    })
}

/// After a postmaster was SIGKILLed, its small SysV shared memory segment
/// stays behind (only a clean exit, or the next start in the same data dir,
/// removes it). Removes it if it is still there, unattached, and was created
/// by `postmaster`, so killed servers do not slowly exhaust the system's
/// segment limit. Best effort.
pub(crate) fn remove_stale_shmem(postmaster: u32, shmid: u64) {
    let Ok(table) = std::fs::read_to_string("/proc/sysvipc/shm") else {
        return;
    };
    // key shmid perms size cpid lpid nattch ...
    let ours = table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 6
            && f[1].parse() == Ok(shmid)
            && f[4].parse() == Ok(postmaster)
            && f[6].parse() == Ok(0u64)
    });
    if ours {
        let _ = std::process::Command::new("ipcrm")
            .arg("-m")
            .arg(shmid.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "1234 (a (weird) name) S 77 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 77);
        assert_eq!(s.starttime, 987654);
    }

    #[test]
    fn sees_itself() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert!(stat(me).unwrap().starttime > 0);
    }
}
