//! The daemon's threads in the CPU scheduler.
//!
//! When the cores are busy, a packet waits in the TUN device's queue or the UDP socket
//! for as long as the daemon's thread waits for a core: on two busy cores, several
//! milliseconds behind the workloads' own threads (the README's benchmark section has
//! the figures). The kernel's network path runs in softirq context, which user threads
//! never hold up; the lowest real-time priority gives the daemon that standing. The
//! kernel keeps a share of every core for normal threads even so
//! (`kernel.sched_rt_runtime_us`), and the daemon's threads sleep whenever there is no
//! packet, so they do not spin at that priority.

use std::io;

/// SCHED_FIFO's lowest priority: below interrupt threads and every other real-time
/// thread, above all normal ones.
pub(crate) const REALTIME_PRIORITY: i32 = 1;

/// Puts the calling thread under SCHED_FIFO at `REALTIME_PRIORITY`. Threads and
/// processes it starts afterwards start at normal priority (SCHED_RESET_ON_FORK): the
/// `ip` and `nft` commands, and threads for blocking work.
///
/// Fails with `EPERM` without CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1.
pub(crate) fn make_current_thread_realtime() -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: REALTIME_PRIORITY,
    };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that the
    // kernel only reads during the call.
    let result = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
