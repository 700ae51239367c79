//! The daemon's threads in the CPU scheduler.
//!
//! When the cores are busy, a packet waits in the TUN device's queue or the UDP socket
//! for as long as the daemon's thread waits for a core: on two busy cores, several
//! milliseconds behind the workloads' own threads (the README's benchmark section has
//! the figures). The kernel's network path runs in softirq context, which user threads
//! never hold up; the lowest real-time priority gives the daemon that standing.
//!
//! A real-time thread runs before every normal one for as long as it has work, so a
//! flood through the tunnel would take the cores from the workloads (the kernel keeps
//! them only `kernel.sched_rt_runtime_us`, 5 %). Like the kernel's softirqs, which hand
//! a long burst to a normal-priority thread, each thread keeps real-time priority only
//! while it uses at most `RealtimeShare`'s share of a core; above it, it competes as a
//! normal thread until its use falls again.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// SCHED_FIFO's lowest priority: below interrupt threads and every other real-time
/// thread, above all normal ones.
pub(crate) const REALTIME_PRIORITY: i32 = 1;

/// Puts thread `tid` (0: the calling thread) under SCHED_FIFO at `REALTIME_PRIORITY`
/// or back under SCHED_OTHER, keeping SCHED_RESET_ON_FORK.
fn set_thread_policy(tid: libc::pid_t, realtime: bool) -> io::Result<()> {
    let (policy, priority) = if realtime {
        (libc::SCHED_FIFO, REALTIME_PRIORITY)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that the kernel only reads during the call.
    let result =
        unsafe { libc::sched_setscheduler(tid, policy | libc::SCHED_RESET_ON_FORK, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's id and the clock of its CPU time.
fn current_thread_id_and_clock() -> io::Result<(libc::pid_t, libc::clockid_t)> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: gettid cannot fail; pthread_self names the calling thread, which is alive,
    // and `clock` is a valid clockid_t the call writes.
    let (tid, result) = unsafe {
        (
            libc::gettid(),
            libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock),
        )
    };
    if result == 0 {
        Ok((tid, clock))
    } else {
        Err(io::Error::from_raw_os_error(result))
    }
}

/// CPU time used so far by the thread whose CPU-time clock is `clock`.
fn thread_cpu_time(clock: libc::clockid_t) -> io::Result<Duration> {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec the kernel writes during the call.
    if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let seconds = u64::try_from(time.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(time.tv_nsec).unwrap_or(0);
    Ok(Duration::from_secs(seconds) + Duration::from_nanos(nanos))
}

/// How much of a core a thread may use at real-time priority: at most `percent` of
/// each `WINDOW`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RealtimeShare {
    pub(crate) percent: u32,
}

impl RealtimeShare {
    /// Short enough that a burst above the share keeps real-time priority for a few
    /// milliseconds only; long enough that the CPU clocks are read rarely.
    const WINDOW: Duration = Duration::from_millis(20);

    /// Whether a thread that used `cpu` in `elapsed` stayed within the share.
    fn allows(&self, cpu: Duration, elapsed: Duration) -> bool {
        cpu.as_nanos() * 100 <= elapsed.as_nanos() * u128::from(self.percent)
    }
}

/// The threads that took real-time priority within a share, measured together so that
/// a thread gone quiet at normal priority is raised again by whichever thread measures
/// next (see `next_measurement`).
struct Group {
    share: RealtimeShare,
    window_start: Instant,
    members: Vec<Member>,
}

struct Member {
    tid: libc::pid_t,
    clock: libc::clockid_t,
    cpu_at_window_start: Duration,
    realtime: bool,
}

static GROUP: Mutex<Option<Group>> = Mutex::new(None);

/// When the group's window ends, in nanoseconds after `EPOCH` (`u64::MAX`: never, the
/// share being a whole core). A copy of `Group::window_start` + `WINDOW` that every call
/// reads without the lock, so that between window ends busy workers share no written
/// cache line.
static WINDOW_ENDS_AT: AtomicU64 = AtomicU64::new(u64::MAX);
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn nanos_after_epoch(at: Instant) -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// Starts a window at `now`: at 100 % none ever ends.
fn start_window(group: &mut Group, now: Instant) {
    group.window_start = now;
    let ends_at = if group.share.percent >= 100 {
        u64::MAX
    } else {
        nanos_after_epoch(now + RealtimeShare::WINDOW)
    };
    WINDOW_ENDS_AT.store(ends_at, Ordering::Relaxed);
}

/// The group, also after a panic while it was held (its state stays consistent: every
/// change is one field at a time).
fn lock_group() -> MutexGuard<'static, Option<Group>> {
    GROUP
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A failed change of priority has been logged at warn (once per process).
static CHANGE_FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

/// Times a thread went over its share and dropped to normal priority, in this process.
static DROPS_TO_NORMAL: AtomicU64 = AtomicU64::new(0);

/// Times a thread used more than its share and dropped to normal priority.
pub(crate) fn drops_to_normal() -> u64 {
    DROPS_TO_NORMAL.load(Ordering::Relaxed)
}

/// Puts the calling thread under SCHED_FIFO at `REALTIME_PRIORITY`, to keep while it
/// uses at most `share` of a core (see `keep_within_share`). Processes and threads it
/// starts afterwards start at normal priority (SCHED_RESET_ON_FORK): the `ip` and `nft`
/// commands, and threads the runtime does not hand to this function itself. A thread
/// that joins must `leave_realtime_group` before it ends.
///
/// Fails with `EPERM` without CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1.
pub(crate) fn take_realtime_within(share: RealtimeShare) -> io::Result<()> {
    let (tid, clock) = current_thread_id_and_clock()?;
    let cpu_at_window_start = thread_cpu_time(clock)?;
    set_thread_policy(0, true)?;
    let mut group = lock_group();
    let group = group.get_or_insert_with(|| {
        let now = Instant::now();
        let mut group = Group {
            share,
            window_start: now,
            members: Vec::new(),
        };
        start_window(&mut group, now);
        group
    });
    group.members.push(Member {
        tid,
        clock,
        cpu_at_window_start,
        realtime: true,
    });
    Ok(())
}

/// Takes the calling thread out of the group (its id may be reused once it ends).
pub(crate) fn leave_realtime_group() {
    let Ok((tid, _)) = current_thread_id_and_clock() else {
        return;
    };
    let mut group = lock_group();
    if let Some(group) = group.as_mut() {
        group.members.retain(|member| member.tid != tid);
    }
}

/// When the threads' shares are next to be measured so that a thread dropped to normal
/// priority is raised again: `None` while every thread is at real-time priority. A
/// thread that went quiet at normal priority measures nothing itself, so another one
/// must wake for it (with a single worker, the same thread on a timer).
pub(crate) fn next_measurement() -> Option<Instant> {
    let group = lock_group();
    let group = group.as_ref()?;
    let any_dropped = group.members.iter().any(|member| !member.realtime);
    any_dropped.then(|| group.window_start + RealtimeShare::WINDOW)
}

/// At the end of each window, drops every thread of the group that used more than its
/// share of a core to normal priority, and raises every one that used less to
/// real-time priority again. Cheap between window ends (a clock read and an atomic
/// load); does nothing while another thread measures or before any thread joined.
pub(crate) fn keep_within_share() {
    let now = Instant::now();
    if nanos_after_epoch(now) < WINDOW_ENDS_AT.load(Ordering::Relaxed) {
        return;
    }
    let mut group = match GROUP.try_lock() {
        Ok(group) => group,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return,
    };
    let Some(group) = group.as_mut() else { return };
    let elapsed = now.duration_since(group.window_start);
    if elapsed < RealtimeShare::WINDOW {
        // Another thread measured after this one read the window's end.
        return;
    }
    start_window(group, now);
    let share = group.share;
    // A member whose clock cannot be read has ended without leaving: it leaves now
    // rather than being counted as idle.
    group.members.retain_mut(|member| {
        let Ok(cpu) = thread_cpu_time(member.clock) else {
            return false;
        };
        let used = cpu.saturating_sub(member.cpu_at_window_start);
        member.cpu_at_window_start = cpu;
        let within = share.allows(used, elapsed);
        if within != member.realtime {
            change_priority(member, within);
        }
        true
    });
}

fn change_priority(member: &mut Member, realtime: bool) {
    match set_thread_policy(member.tid, realtime) {
        Ok(()) => {
            member.realtime = realtime;
            if !realtime {
                DROPS_TO_NORMAL.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => {
            if !CHANGE_FAILURE_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = %e,
                    realtime,
                    "a thread's priority could not be changed; it keeps its present one \
                     (logged once)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_real_time_priority_up_to_its_share_of_the_window() {
        let half = RealtimeShare { percent: 50 };
        let window = RealtimeShare::WINDOW;
        assert!(half.allows(Duration::ZERO, window));
        assert!(half.allows(window / 2, window));
        assert!(!half.allows(window / 2 + Duration::from_nanos(1), window));
        // A window read late counts the CPU time against the whole time elapsed.
        assert!(half.allows(window, window * 2));
        let all = RealtimeShare { percent: 100 };
        assert!(all.allows(window, window));
        assert!(!RealtimeShare { percent: 1 }.allows(window / 50, window));
    }
}
