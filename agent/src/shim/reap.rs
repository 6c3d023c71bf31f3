//! Killing what a step leaves behind.
//!
//! The shim is a child subreaper, so a process that daemonizes (double fork,
//! `setsid`) is reparented to the shim rather than to init: every process a
//! job started is a descendant of the shim until it is reaped. After a step's
//! main process exits, [`kill_leftovers`] walks `/proc` for those descendants,
//! asks them to stop (SIGTERM), and after the grace kills them (SIGKILL),
//! reaping as they die. Processes are signalled by pid, never by group id: the
//! group's leader is already reaped at that point and its id could be reused.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How often the shim looks again while leftovers are stopping.
const POLL: Duration = Duration::from_millis(10);
/// How long SIGKILLed processes may take to disappear before the shim gives up
/// on them (a process in uninterruptible sleep cannot be killed).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A process in `/proc`.
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: i32,
    ppid: i32,
    zombie: bool,
}

/// Parses `/proc/PID/stat`: `pid (comm) state ppid …`, where comm may hold
/// spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat(pid: i32, stat: &str) -> Option<Proc> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        zombie: state == "Z",
    })
}

fn all_procs() -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(pid, &stat)
        })
        .collect()
}

/// Every process below `root` (children, their children, …), zombies included.
fn descendants_of(root: i32, procs: &[Proc]) -> Vec<Proc> {
    let mut children: HashMap<i32, Vec<Proc>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(*p);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for c in children.get(&pid).into_iter().flatten() {
            if c.pid != root {
                out.push(*c);
                stack.push(c.pid);
            }
        }
    }
    out
}

/// The live (non-zombie) descendants of this process.
pub fn live_descendants() -> Vec<i32> {
    let me = std::process::id() as i32;
    descendants_of(me, &all_procs())
        .into_iter()
        .filter(|p| !p.zombie)
        .map(|p| p.pid)
        .collect()
}

/// Reaps every child that has exited, without blocking. False when no
/// child is left: then no descendant is either (an orphaned grandchild is
/// reparented to this subreaper, so it would be a child).
pub fn reap_exited() -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Err(Errno::ECHILD) => return false,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return true,
        }
    }
}

/// Stops every remaining descendant: SIGTERM, up to `grace` for them to exit,
/// then SIGKILL; reaps them all. Returns how many processes were left over.
/// The fast path (no child left) costs one `waitpid`: a scan of `/proc` reads
/// every process's `stat`, ~140 files on a quiet machine, which was a tenth
/// of a short sweep trial's CPU.
pub fn kill_leftovers(grace: Duration) -> usize {
    let start = Instant::now();
    let mut termed: HashSet<i32> = HashSet::new();
    let mut seen: HashSet<i32> = HashSet::new();
    loop {
        if !reap_exited() {
            return seen.len();
        }
        let live = live_descendants();
        if live.is_empty() {
            reap_exited();
            return seen.len();
        }
        let elapsed = start.elapsed();
        if elapsed > grace + KILL_WAIT {
            tracing::warn!(
                pids = ?live,
                "leftover processes survived SIGKILL; giving up on them"
            );
            return seen.len();
        }
        // New processes (forked while we looked) get their SIGTERM too.
        for pid in live {
            seen.insert(pid);
            let sig = if elapsed >= grace {
                Some(Signal::SIGKILL)
            } else if termed.insert(pid) {
                Some(Signal::SIGTERM)
            } else {
                None
            };
            if let Some(sig) = sig {
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let p = parse_stat(42, "42 (a) b (c)) S 7 42 42 0 -1").unwrap();
        assert_eq!((p.pid, p.ppid, p.zombie), (42, 7, false));
        let z = parse_stat(43, "43 (x y) Z 1 43").unwrap();
        assert!(z.zombie);
        assert!(parse_stat(1, "garbage").is_none());
    }

    #[test]
    fn descendants_are_transitive() {
        let procs = [
            Proc {
                pid: 10,
                ppid: 1,
                zombie: false,
            },
            Proc {
                pid: 11,
                ppid: 10,
                zombie: false,
            },
            Proc {
                pid: 12,
                ppid: 11,
                zombie: true,
            },
            Proc {
                pid: 13,
                ppid: 1,
                zombie: false,
            },
        ];
        let mut d: Vec<i32> = descendants_of(10, &procs).iter().map(|p| p.pid).collect();
        d.sort();
        assert_eq!(d, [11, 12]);
    }
}
