//! Scheduling hints for the kernel's own threads.
//!
//! On a machine whose cores are all busy, a thread that sleeps most of the time
//! still waits for a core each time it wakes: the fair scheduler lets the running
//! thread finish its time slice first (0.75 ms or more). For the journal thread,
//! which wakes a few thousand times a second (each time an `fdatasync` returns or a
//! record arrives) and then needs the core for some tens of microseconds, that wait
//! was measured at 40–50 % of the `durable` phase on a 2-core machine: as long as
//! the syncs themselves. Three settings shorten it:
//!
//! - **A short slice.** Since Linux 6.12 a fair-class thread may ask for a shorter
//!   slice (`sched_attr.sched_runtime`); the scheduler then gives it an earlier
//!   deadline, so it is picked sooner after waking, as long as it has not run more
//!   than its share. This needs no privilege and changes neither the thread's
//!   share of the CPU nor its policy.
//! - **A higher weight** (a lower nice value, `ring.journal_nice`, off by default),
//!   where the process may set one (`CAP_SYS_NICE`, or an `RLIMIT_NICE` that allows
//!   it). The slice alone still leaves the journal waiting for a core 25–40 % of
//!   a saturated phase: a thread that needs about a third of a core, among five
//!   busy ones on two cores, is often past its share when it wakes, and then waits
//!   for the running thread's tick. The weight raises its share, not its use: it
//!   still sleeps in each sync. Still the fair class, so a thread gone wrong cannot
//!   shut the rest of the machine out the way a real-time one can (though at -10
//!   it weighs nine normal threads). Off by default: a prompt journal
//!   syncs smaller groups, and where the kernel has one core their CPU comes out
//!   of the requests (measured in docs/ring.md).
//! - **A lower weight for the store's committer** (`ring.committer_nice`, 10 by
//!   default). The committer was what the journal waited behind most often: it
//!   applies a whole group of store writes in one run. Lowering a thread's
//!   priority needs no privilege, so this works everywhere; a committer that gets
//!   the core later takes larger groups, which costs it less per write.

/// The slice asked for: the shortest the kernel accepts.
const SHORT_SLICE_NS: u64 = 100_000;
/// `SCHED_FLAG_RESET_ON_FORK`: the one flag `sched_getattr` reports that a
/// `sched_attr` of this size may carry back.
const RESET_ON_FORK: u64 = 0x01;

/// `struct sched_attr` of `sched_setattr(2)`, up to `sched_period` (its first
/// published size; the kernel accepts it as is).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks the scheduler to run the calling thread promptly when it wakes, by giving
/// it the shortest time slice, keeping its policy and nice value. Returns the
/// slice now in force in nanoseconds, or `None` where the kernel does not keep
/// one (before Linux 6.12, or a thread that is not in the fair class) or refused:
/// a hint, never an error.
pub(crate) fn prefer_prompt_wakeups() -> Option<u64> {
    let mut attr = read_attr()?;
    if !matches!(attr.policy as i32, libc::SCHED_OTHER | libc::SCHED_BATCH) {
        return None;
    }
    attr.runtime = SHORT_SLICE_NS;
    attr.flags &= RESET_ON_FORK;
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is a valid, initialised sched_attr of the size it declares,
    // and 0 names the calling thread.
    let set = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if set != 0 {
        return None;
    }
    slice_of_caller()
}

/// Raises the calling thread's priority to `nice` (-20 to 19, lower runs sooner) if
/// it is lower than the thread's own and the process may set it; a raised thread
/// is marked reset-on-fork, so that threads it starts (the journal's spare-segment
/// filler) begin at nice 0 instead of inheriting its weight.
/// Returns the nice value now in force (the old one where the process may not), or
/// `None` if it cannot be read: a hint, never an error.
pub(crate) fn raise_priority(nice: i32) -> Option<i32> {
    let before = read_attr()?.nice;
    // On Linux the nice value belongs to a thread, and PRIO_PROCESS with 0 names
    // the calling thread alone. A refusal (EACCES, EPERM) leaves it as it was.
    // SAFETY: plain system call on the calling thread, no pointers.
    if nice < before && unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0 {
        let mut attr = read_attr()?;
        // The one flag this size of sched_attr carries. Unprivileged threads may set
        // it; the nice value written back is the one just set, so no privilege is
        // asked for again.
        attr.flags = RESET_ON_FORK;
        attr.size = std::mem::size_of::<SchedAttr>() as u32;
        // SAFETY: `attr` is a valid, initialised sched_attr of the size it declares,
        // and 0 names the calling thread.
        unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    }
    nice_of_caller()
}

/// Lowers the calling thread's priority to `nice` (0 to 19, higher runs later) if
/// that is higher than the thread's own, which needs no privilege. Returns the
/// nice value now in force, or `None` if it cannot be read: a hint, never an error.
pub fn lower_priority(nice: i32) -> Option<i32> {
    let before = nice_of_caller()?;
    if nice > before {
        // SAFETY: plain system call on the calling thread (0 names it), no pointers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    }
    nice_of_caller()
}

/// The calling thread's nice value.
pub(crate) fn nice_of_caller() -> Option<i32> {
    read_attr().map(|attr| attr.nice)
}

/// The calling thread's time slice in nanoseconds, where the kernel keeps a custom
/// one.
pub(crate) fn slice_of_caller() -> Option<u64> {
    read_attr().map(|attr| attr.runtime).filter(|&runtime| runtime > 0)
}

fn read_attr() -> Option<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is writable for `size` bytes, and 0 names the calling thread.
    let read = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &raw mut attr, size, 0) };
    (read == 0).then_some(attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_priority_holds_for_the_calling_thread_alone_or_is_left_as_it_was() {
        let before = nice_of_caller().expect("sched_getattr works on Linux");
        let raised = std::thread::spawn(move || {
            let asked = (before.min(0) - 3).max(-20);
            let now = raise_priority(asked).unwrap();
            // Either the process may raise it, and it is raised exactly, or it is
            // left alone; nothing in between.
            assert!(now == asked || now == before, "{before} -> {now}");
            assert_eq!(nice_of_caller(), Some(now));
            // Never lowered: asking for less than the thread has changes nothing.
            assert_eq!(raise_priority(now + 5), Some(now));
            // A thread it starts does not inherit a raised priority: reset-on-fork
            // starts it at 0 where its parent's is negative.
            let child = std::thread::spawn(nice_of_caller).join().unwrap();
            let inherited = if now < before { now.max(0) } else { before };
            assert_eq!(child, Some(inherited), "a thread started by one at {now}");
            now
        })
        .join()
        .unwrap();
        assert_eq!(nice_of_caller(), Some(before), "the spawning thread keeps its own");
        if raised == before {
            eprintln!("the raise itself was not tested: this process may not raise a thread's priority");
        }
    }

    #[test]
    fn a_lowered_priority_holds_for_the_calling_thread_alone_and_is_never_raised() {
        let before = nice_of_caller().expect("sched_getattr works on Linux");
        if before == 19 {
            eprintln!("not tested: this process already runs at the lowest priority");
            return;
        }
        let asked = (before + 4).min(19);
        let lowered = std::thread::spawn(move || {
            let now = lower_priority(asked);
            // Asking for a higher priority than the thread has changes nothing
            // (where the process may raise priorities; elsewhere the kernel would
            // refuse the raise anyway).
            let again = lower_priority(asked - 2);
            (now, again)
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (Some(asked), Some(asked)), "from {before}");
        assert_eq!(nice_of_caller(), Some(before), "the spawning thread keeps its own");
    }

    #[test]
    fn the_hint_keeps_policy_nice_value_and_flags_and_sets_the_slice_where_kept() {
        std::thread::spawn(|| {
            let before = read_attr().expect("sched_getattr works on Linux");
            let slice = prefer_prompt_wakeups();
            let after = read_attr().unwrap();
            assert_eq!(
                (after.policy, after.nice, after.flags),
                (before.policy, before.nice, before.flags)
            );
            // Kernels that keep a custom slice report it back; older ones keep none.
            if after.runtime != 0 {
                assert_eq!(slice, Some(SHORT_SLICE_NS));
                assert_eq!(after.runtime, SHORT_SLICE_NS);
            } else {
                assert_eq!(slice, None);
            }
        })
        .join()
        .unwrap();
    }
}
