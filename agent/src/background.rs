//! Work the agent does for later (a spare snapshot for the next job,
//! deleting old job trees): on threads of their own that give way to jobs
//! and requests. A spare of a 20,000-file mirror is 20,000 links and the
//! last job's tree as many unlinks, started as the next job prints: on a
//! small machine they took the CPU its log needed.

use std::io;
use std::thread::{Builder, JoinHandle};

/// The niceness of background threads: the lowest priority.
const NICE: i32 = 19;

/// Spawns `f` on a thread named `name` that runs at the lowest priority.
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    Builder::new().name(name.into()).spawn(move || {
        lower_this_thread();
        f()
    })
}

/// Sets the calling thread's niceness to [`NICE`] (best effort).
#[allow(unsafe_code)]
fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let tid = nix::unistd::gettid().as_raw() as nix::libc::id_t;
        // SAFETY: setpriority takes no pointer. On Linux, PRIO_PROCESS with
        // a thread id changes that thread only.
        unsafe {
            nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid, NICE);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_background_thread_runs_at_the_lowest_priority_and_the_caller_does_not() {
        let before = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        fn nice(stat: &str) -> i64 {
            // Field 19 (nice), counted after the command's closing paren.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(16).unwrap().parse().unwrap()
        }
        let theirs = super::spawn("bg-test", || {
            nice(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(theirs, super::NICE as i64);
        let after = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        assert_eq!(nice(&after), nice(&before));
    }
}
