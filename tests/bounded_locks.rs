//! Every lock the stop machine and the patchers wait for is waited for with a bound
//! (`stop::lock_within`): a held lock turns into a `Busy` error that says how long the
//! caller waited, and nothing runs or changes.

#![allow(clippy::result_large_err)]

use patch_machine::CpuSet;
use patch_machine::arch::host::HostArch;
use patch_machine::patch::insn::{self, NOP};
use patch_machine::patch::{Patch, PatchError, Text, patch_machine, patch_nosync};
use patch_machine::stop::{CallContext, StopError, StopMachine, StopOptions};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const BASE: usize = 0x4020_0000;
const SHORT: StopOptions = StopOptions {
    arrival_timeout_ns: 5_000_000,
    ..StopOptions::DEFAULT
};

/// Runs `job` on a thread bound as CPU 0 of a one-CPU machine; fails, rather than
/// hangs, if it takes more than 10 s (a wait that lost its bound).
fn on_one_cpu<R: Send + 'static>(
    job: impl FnOnce(&StopMachine<HostArch>) -> R + Send + 'static,
) -> R {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let stop = StopMachine::new(HostArch::new(1));
        stop.arch().bind_current_thread(0);
        let _ = tx.send(job(&stop));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the job did not finish in 10 s: an unbounded lock wait")
}

#[test]
fn a_stop_machine_call_waits_for_the_machine_with_a_bound() {
    // Three CPUs and no stop-IPI handler connected, so neither other CPU ever arrives:
    // CPU 0's call holds the machine for its whole arrival timeout; CPU 1, calling
    // meanwhile from normal context, gives up on the machine after its own bound.
    let stop = std::sync::Arc::new(StopMachine::new(HostArch::new(3)));
    let holder = {
        let stop = stop.clone();
        thread::spawn(move || {
            stop.arch().bind_current_thread(0);
            stop.stop_machine(
                &|_| Ok(()),
                CpuSet::single(0),
                StopOptions {
                    arrival_timeout_ns: 1_000_000_000,
                    ..StopOptions::DEFAULT
                },
            )
        })
    };
    let (tx, rx) = mpsc::channel();
    let ran = std::sync::Arc::new(AtomicBool::new(false));
    {
        let (stop, ran) = (stop.clone(), ran.clone());
        thread::spawn(move || {
            stop.arch().bind_current_thread(1);
            // CPU 0 holds the machine once it has sent its stop IPIs.
            let start = std::time::Instant::now();
            while stop.arch().ipis_sent() == 0 && start.elapsed() < Duration::from_secs(5) {
                thread::yield_now();
            }
            let _ = tx.send(stop.stop_machine(
                &|_| {
                    ran.store(true, Ordering::Relaxed);
                    Ok(())
                },
                CpuSet::single(1),
                SHORT,
            ));
        });
    }
    let inner = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the second caller did not finish in 10 s: an unbounded lock wait");
    let outer = holder.join().unwrap();
    assert!(
        matches!(outer, Err(StopError::Timeout { missing, .. }) if missing == CpuSet::first(3).without(0)),
        "{outer:?}"
    );
    assert!(
        !ran.load(Ordering::Relaxed),
        "the refused call's function ran"
    );
    match inner {
        Err(err @ StopError::Busy { waited_ns, .. }) => {
            assert!(
                waited_ns >= SHORT.arrival_timeout_ns,
                "waited only {waited_ns} ns"
            );
            assert!(waited_ns < 5_000_000_000, "waited {waited_ns} ns");
            assert!(
                err.to_string()
                    .starts_with("the stop machine (another stop_machine call) stayed held for"),
                "{err}"
            );
        }
        other => panic!("expected Busy, got {other:?}"),
    }
}

#[test]
fn a_stop_machine_call_from_inside_a_stop_is_refused_at_once() {
    let (outer, inner) = on_one_cpu(|stop| {
        let inner = spin::Mutex::new(None);
        let ran = AtomicBool::new(false);
        let outer = stop.stop_machine(
            &|_| {
                // Everything is masked here: a nested call must not even wait.
                *inner.lock() = Some(stop.stop_machine(
                    &|_| {
                        ran.store(true, Ordering::Relaxed);
                        Ok(())
                    },
                    CpuSet::single(0),
                    SHORT,
                ));
                Ok(())
            },
            CpuSet::single(0),
            StopOptions::DEFAULT,
        );
        assert!(
            !ran.load(Ordering::Relaxed),
            "the nested call's function ran"
        );
        (outer, inner.into_inner())
    });
    assert_eq!(outer, Ok(()));
    match inner {
        Some(Err(
            err @ StopError::WrongContext {
                cpu: 0,
                context: CallContext::IrqsMasked,
            },
        )) => assert!(
            err.to_string()
                .starts_with("called on cpu0 from code with interrupts masked: refused"),
            "{err}"
        ),
        other => panic!("expected WrongContext, got {other:?}"),
    }
}

/// Two words of text; nothing but the lock matters here.
struct TwoWords {
    words: [AtomicU32; 2],
    lock: spin::Mutex<()>,
}

// SAFETY: an in-memory array: both addresses are backed, writes are atomic stores.
unsafe impl Text for TwoWords {
    type Insn = u32;

    fn text_range(&self) -> Range<usize> {
        BASE..BASE + 8
    }
    fn protected_ranges(&self) -> &[Range<usize>] {
        &[]
    }
    fn read_insn(&self, addr: usize, _len: usize) -> u32 {
        self.words[(addr - BASE) / 4].load(Ordering::Relaxed)
    }
    unsafe fn write_insn(&self, addr: usize, insn: u32) {
        self.words[(addr - BASE) / 4].store(insn, Ordering::Relaxed);
    }
    fn sync_icache(&self, _range: Range<usize>) {}
    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.lock
    }
}

#[test]
fn patchers_wait_for_the_text_writer_lock_with_a_bound() {
    let movz = insn::movz_x(0, 1, 0).unwrap();
    let results = on_one_cpu(move |stop| {
        let text = TwoWords {
            words: [AtomicU32::new(movz), AtomicU32::new(NOP)],
            lock: spin::Mutex::new(()),
        };
        let held = text.writer_lock().lock();
        let stopped = patch_machine(stop, &text, &[Patch::new(BASE, movz, NOP)], SHORT).map(|_| ());
        let nosync = patch_nosync(stop.arch(), &text, &[Patch::new(BASE + 4, NOP, NOP)]);
        drop(held);
        let words = [0, 1].map(|i| text.words[i].load(Ordering::Relaxed));
        (stopped, nosync, words)
    });
    let (stopped, nosync, words) = results;
    assert_eq!(words, [movz, NOP], "a refused batch changed the text");
    for (what, result, bound) in [
        ("patch_machine", stopped, SHORT.arrival_timeout_ns),
        (
            "patch_nosync",
            nosync,
            StopOptions::DEFAULT.arrival_timeout_ns,
        ),
    ] {
        match result {
            Err(err @ PatchError::Busy { waited_ns }) => {
                assert!(waited_ns >= bound, "{what}: waited only {waited_ns} ns");
                assert!(
                    err.to_string()
                        .starts_with("another patcher held the text for"),
                    "{what}: {err}"
                );
            }
            other => panic!("{what}: expected Busy, got {other:?}"),
        }
    }
}
