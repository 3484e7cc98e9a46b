//! CPU hotplug exclusion on the host (threads as CPUs): every stop call holds the
//! hotplug read side for its whole length, so hotplug (the write side) cannot change
//! the online set under it, and a stop call cannot start while hotplug holds it
//! (Linux's `cpus_read_lock` in `stop_machine`).

use patch_machine::CpuSet;
use patch_machine::arch::host::HostArch;
use patch_machine::stop::{StopError, StopMachine, StopOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// A 2-CPU machine: this thread is CPU 0; CPU 1 idles taking stop IPIs until `quit`.
fn machine() -> (
    Arc<StopMachine<HostArch>>,
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let stop = Arc::new(StopMachine::new(HostArch::new(2)));
    HostArch::connect(&stop);
    stop.arch().bind_current_thread(0);
    let quit = Arc::new(AtomicBool::new(false));
    let cpu1 = {
        let (stop, quit) = (stop.clone(), quit.clone());
        std::thread::spawn(move || {
            stop.arch().bind_current_thread(1);
            while !quit.load(Ordering::Relaxed) {
                stop.arch().poll_interrupts();
                std::thread::yield_now();
            }
        })
    };
    (stop, quit, cpu1)
}

#[test]
fn a_stop_call_holds_the_hotplug_read_side_and_excludes_the_writer() {
    let (stop, quit, cpu1) = machine();
    let readers_inside = AtomicU32::new(u32::MAX);
    let writer_got_in = AtomicBool::new(false);
    let result = stop.stop_machine(
        &|_| {
            readers_inside.store(stop.hotplug_lock().readers(), Ordering::Relaxed);
            // Hotplug trying to start now must wait the whole (short) bound and fail.
            writer_got_in.store(stop.cpus_write_lock(2_000_000).is_ok(), Ordering::Relaxed);
            Ok(())
        },
        CpuSet::single(0),
        StopOptions::DEFAULT,
    );
    assert_eq!(result, Ok(()));
    assert_eq!(
        readers_inside.load(Ordering::Relaxed),
        1,
        "the stop call did not hold the hotplug read side while its function ran"
    );
    assert!(
        !writer_got_in.load(Ordering::Relaxed),
        "hotplug took the write side during a stop call"
    );
    assert_eq!(
        stop.hotplug_lock().readers(),
        0,
        "the call left a reader behind"
    );
    quit.store(true, Ordering::Relaxed);
    cpu1.join().unwrap();
}

#[test]
fn no_stop_call_starts_while_hotplug_holds_the_write_side() {
    let (stop, quit, cpu1) = machine();
    let ran = AtomicU32::new(0);
    let count = |_: usize| {
        ran.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    let short = StopOptions {
        arrival_timeout_ns: 5_000_000,
        ..StopOptions::DEFAULT
    };
    let writer = stop.cpus_write_lock(0).expect("a free hotplug lock");
    let refused = stop.stop_machine(&count, CpuSet::first(2), short);
    assert!(
        matches!(refused, Err(StopError::Busy { waited_ns, .. }) if waited_ns > 5_000_000),
        "a stop call during hotplug: {refused:?}"
    );
    // The message names the lock that was held, not another stop call.
    let message = refused.unwrap_err().to_string();
    assert!(
        message.starts_with("the CPU hotplug lock (a CPU is going up or down) stayed held for"),
        "{message}"
    );
    assert_eq!(
        ran.load(Ordering::Relaxed),
        0,
        "the function ran during hotplug"
    );
    drop(writer);
    assert_eq!(stop.stop_machine(&count, CpuSet::first(2), short), Ok(()));
    assert_eq!(ran.load(Ordering::Relaxed), 2);
    quit.store(true, Ordering::Relaxed);
    cpu1.join().unwrap();
}
