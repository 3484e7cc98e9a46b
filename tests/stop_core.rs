//! The stop-machine core on the host, with threads as CPUs.

// `StopError` carries one code per CPU by value (the kernel has no heap).
#![allow(clippy::result_large_err)]

use patch_machine::arch::host::HostArch;
#[cfg(feature = "stop-machine-nmi")]
use patch_machine::stop::NmiSafe;
use patch_machine::stop::{Arch, CallContext, MaskLevel, StopError, StopMachine, StopOptions};
use patch_machine::{AtomicCpuSet, CpuSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

type Stop = StopMachine<HostArch>;
type Job = Box<dyn FnOnce(&Stop) + Send>;

/// A host machine: one thread per CPU, each polling for stop IPIs between jobs.
struct Machine {
    stop: Arc<Stop>,
    jobs: Vec<mpsc::Sender<Job>>,
    quit: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    /// Per CPU: how many times it has gone round its idle loop.
    idle_rounds: Arc<Vec<AtomicU64>>,
}

impl Machine {
    fn new(cpus: usize) -> Machine {
        let stop = Arc::new(StopMachine::new(HostArch::new(cpus)));
        HostArch::connect(&stop);
        let quit = Arc::new(AtomicBool::new(false));
        let idle_rounds = Arc::new((0..cpus).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for cpu in 0..cpus {
            let (tx, rx) = mpsc::channel::<Job>();
            jobs.push(tx);
            let (stop, quit, idle_rounds) = (stop.clone(), quit.clone(), idle_rounds.clone());
            threads.push(thread::spawn(move || {
                stop.arch().bind_current_thread(cpu);
                while !quit.load(Ordering::Relaxed) {
                    stop.arch().poll_interrupts();
                    if let Ok(job) = rx.try_recv() {
                        job(&stop);
                    }
                    idle_rounds[cpu].fetch_add(1, Ordering::Relaxed);
                    thread::yield_now();
                }
            }));
        }
        Machine {
            stop,
            jobs,
            quit,
            threads,
            idle_rounds,
        }
    }

    /// Runs `job` on `cpu` and waits (bounded) for its result.
    fn on_cpu<R: Send + 'static>(
        &self,
        cpu: usize,
        job: impl FnOnce(&Stop) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = mpsc::channel();
        self.jobs[cpu]
            .send(Box::new(move |stop| {
                let _ = tx.send(job(stop));
            }))
            .unwrap();
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("cpu{cpu} did not finish its job within 60 s"))
    }

    /// Starts `job` on `cpu` without waiting; the receiver yields its result.
    fn spawn_on<R: Send + 'static>(
        &self,
        cpu: usize,
        job: impl FnOnce(&Stop) -> R + Send + 'static,
    ) -> mpsc::Receiver<R> {
        let (tx, rx) = mpsc::channel();
        self.jobs[cpu]
            .send(Box::new(move |stop| {
                let _ = tx.send(job(stop));
            }))
            .unwrap();
        rx
    }

    /// Waits until every CPU has gone round its idle loop again: nobody is left inside
    /// a rendezvous.
    fn all_idle_again(&self, cpus: CpuSet) -> bool {
        let before: Vec<u64> = self
            .idle_rounds
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cpus
                .iter()
                .all(|cpu| self.idle_rounds[cpu].load(Ordering::Relaxed) > before[cpu] + 1)
            {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

const QUICK: StopOptions = StopOptions {
    arrival_timeout_ns: 5_000_000_000,
    stall_timeout_ns: 20_000_000_000,
    ..StopOptions::DEFAULT
};

#[test]
fn runs_on_exactly_the_active_cpus() {
    for cpus in [1, 2, 3, 4, 8] {
        let machine = Machine::new(cpus);
        let all = CpuSet::first(cpus);
        let mut subsets = vec![all, CpuSet::single(0), CpuSet::single(cpus - 1)];
        if cpus > 2 {
            subsets.push(CpuSet::of(&[0, 2]));
        }
        for active in subsets {
            for initiator in [0, cpus - 1] {
                let ran = machine.on_cpu(initiator, move |stop| {
                    let ran = AtomicCpuSet::new();
                    let runs = AtomicU32::new(0);
                    stop.stop_machine(
                        &|cpu| {
                            ran.insert(cpu, Ordering::Relaxed);
                            runs.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        },
                        active,
                        QUICK,
                    )
                    .unwrap();
                    (ran.load(Ordering::Relaxed), runs.load(Ordering::Relaxed))
                });
                assert_eq!(
                    ran,
                    (active, active.len() as u32),
                    "cpus={cpus} active={active} initiator={initiator}"
                );
            }
        }
    }
}

#[test]
fn other_cpus_are_masked_while_the_function_runs() {
    let cpus = 4;
    let machine = Machine::new(cpus);
    let all = CpuSet::first(cpus);
    let result = machine.on_cpu(1, move |stop| {
        let seen = Mutex::new(Vec::new());
        let outcome = stop.stop_machine(
            &|cpu| {
                let arch = stop.arch();
                // Watch for a while: a CPU that left early takes a moment to unmask.
                let mut unmasked: Vec<usize> = Vec::new();
                let watch_until = Instant::now() + Duration::from_millis(20);
                while Instant::now() < watch_until {
                    for c in (0..cpus).filter(|&c| !arch.is_masked(c)) {
                        if !unmasked.contains(&c) {
                            unmasked.push(c);
                        }
                    }
                    thread::yield_now();
                }
                let quiescence = stop.quiescence();
                let stamp = stop.stamp();
                seen.lock()
                    .unwrap()
                    .push((cpu, unmasked, quiescence, stamp));
                Ok(())
            },
            CpuSet::single(2),
            QUICK,
        );
        (outcome, seen.into_inner().unwrap())
    });
    let (outcome, seen) = result;
    outcome.unwrap();
    assert_eq!(seen.len(), 1);
    let (cpu, unmasked, quiescence, stamp) = &seen[0];
    assert_eq!(*cpu, 2);
    assert!(
        unmasked.is_empty(),
        "CPUs {unmasked:?} were not masked during the run"
    );
    assert_eq!(quiescence.masked, all, "not every CPU reported quiescence");
    assert!(
        *stamp > quiescence.last_ack_stamp,
        "the function ran (stamp {stamp}) before the last quiescence ack ({})",
        quiescence.last_ack_stamp
    );
    // And afterwards everyone unmasked again.
    assert!(machine.all_idle_again(all));
    for c in 0..cpus {
        assert!(!machine.stop.arch().is_masked(c), "cpu{c} left masked");
    }
}

#[test]
fn every_cpu_synchronises_context_after_the_write_and_before_it_unmasks() {
    let cpus = 4;
    let machine = Machine::new(cpus);
    let arch = machine.stop.arch().clone();
    let before: Vec<u64> = (0..cpus).map(|c| arch.syncs(c)).collect();
    let write = Arc::new(AtomicU64::new(0));
    let write_in_fn = write.clone();
    machine.on_cpu(0, move |stop| {
        stop.stop_machine(
            &|_| {
                // The "text write": every CPU must synchronise after this tick.
                write_in_fn.store(stop.arch().tick(), Ordering::SeqCst);
                Ok(())
            },
            CpuSet::single(0),
            QUICK,
        )
        .unwrap();
    });
    // The initiator does not wait for the others to leave; they do on their own.
    assert!(machine.all_idle_again(CpuSet::first(cpus)));
    let write = write.load(Ordering::SeqCst);
    for (cpu, &before) in before.iter().enumerate() {
        assert_eq!(
            arch.syncs(cpu),
            before + 1,
            "cpu{cpu} did not synchronise exactly once"
        );
        let (sync, restore) = (arch.last_sync(cpu), arch.last_restore(cpu));
        assert!(
            write < sync && sync < restore,
            "cpu{cpu}: write at tick {write}, sync at {sync}, unmask at {restore}: \
             it must synchronise after the write and before it unmasks"
        );
    }
}

#[test]
fn back_to_back_calls_synchronise_every_cpu_once_per_call() {
    // The initiator leaves as soon as it has opened `Exit`, so its next call starts
    // while the others may still be leaving the last one: their IPI waits until they
    // have unmasked, and they join the next call normally.
    let cpus = 4;
    let calls = 300;
    let machine = Machine::new(cpus);
    let arch = machine.stop.arch().clone();
    let before: Vec<u64> = (0..cpus).map(|c| arch.syncs(c)).collect();
    let ran = machine.on_cpu(1, move |stop| {
        let ran = AtomicU64::new(0);
        for _ in 0..calls {
            stop.stop_machine(
                &|_| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
                CpuSet::first(cpus),
                QUICK,
            )
            .unwrap();
        }
        ran.load(Ordering::Relaxed)
    });
    assert_eq!(ran, calls * cpus as u64);
    assert!(machine.all_idle_again(CpuSet::first(cpus)));
    for (cpu, &before) in before.iter().enumerate() {
        assert_eq!(
            arch.syncs(cpu),
            before + calls,
            "cpu{cpu} synchronised {} times in {calls} calls",
            arch.syncs(cpu) - before
        );
        assert!(!arch.is_masked(cpu), "cpu{cpu} left masked");
    }
}

#[test]
fn errors_from_all_cpus_are_accumulated() {
    let cpus = 4;
    let machine = Machine::new(cpus);
    let err = machine.on_cpu(0, move |stop| {
        stop.stop_machine(
            &|cpu| match cpu {
                1 => Err(-5),
                3 => Err(-22),
                _ => Ok(()),
            },
            CpuSet::first(cpus),
            QUICK,
        )
    });
    let Err(StopError::Failed(failures)) = err else {
        panic!("expected Failed, got {err:?}");
    };
    assert_eq!(failures.cpus(), CpuSet::of(&[1, 3]));
    assert_eq!(failures.code(1), Some(-5));
    assert_eq!(failures.code(3), Some(-22));
    assert_eq!(failures.code(0), None);
    let message = StopError::Failed(failures).to_string();
    assert!(
        message.contains("cpu1=-5") && message.contains("cpu3=-22"),
        "{message}"
    );
}

#[test]
fn invalid_cpu_sets_are_rejected_and_nothing_runs() {
    let machine = Machine::new(2);
    let ran = Arc::new(AtomicUsize::new(0));
    for bad in [CpuSet::EMPTY, CpuSet::single(2), CpuSet::first(3)] {
        let ran = ran.clone();
        let err = machine.on_cpu(0, move |stop| {
            stop.stop_machine(
                &|_| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
                bad,
                QUICK,
            )
        });
        assert!(
            matches!(err, Err(StopError::InvalidCpus { .. })),
            "{bad}: {err:?}"
        );
    }
    assert_eq!(ran.load(Ordering::Relaxed), 0);
    assert_eq!(machine.stop.arch().ipis_sent(), 0);
}

#[test]
fn a_cpu_that_never_arrives_times_out_cleanly_and_the_next_call_succeeds() {
    let cpus = 4;
    let machine = Machine::new(cpus);
    let held = 2;
    // CPU 2 masks everything and spins until released: it cannot take the stop IPI.
    let release = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicBool::new(false));
    let (r, h) = (release.clone(), holding.clone());
    let held_done = machine.spawn_on(held, move |stop| {
        let saved = patch_machine::stop::Arch::mask_all(stop.arch());
        h.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !r.load(Ordering::Acquire) && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        patch_machine::stop::Arch::restore(stop.arch(), saved);
    });
    while !holding.load(Ordering::Acquire) {
        thread::yield_now();
    }

    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = ran.clone();
    let err = machine.on_cpu(0, move |stop| {
        stop.stop_machine(
            &|_| {
                ran2.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
            CpuSet::first(4),
            StopOptions {
                arrival_timeout_ns: 50_000_000,
                ..QUICK
            },
        )
    });
    match err {
        Err(StopError::Timeout { missing, waited_ns }) => {
            assert_eq!(missing, CpuSet::single(held));
            assert!(waited_ns >= 50_000_000);
            assert!(err.unwrap_err().to_string().contains("{2}"));
        }
        other => panic!("expected a timeout naming cpu{held}, got {other:?}"),
    }
    assert_eq!(
        ran.load(Ordering::Relaxed),
        0,
        "the function ran despite the timeout"
    );
    // The CPUs that did arrive are not left spinning.
    assert!(
        machine.all_idle_again(CpuSet::of(&[0, 1, 3])),
        "a CPU was left in the rendezvous"
    );
    for cpu in [0, 1, 3] {
        assert!(!machine.stop.arch().is_masked(cpu));
    }

    // Release the held CPU: it takes its stale IPI, finds nothing to join, and the next
    // call includes it.
    release.store(true, Ordering::Release);
    held_done.recv_timeout(Duration::from_secs(60)).unwrap();
    let ran_on = machine.on_cpu(0, |stop| {
        let ran_on = AtomicCpuSet::new();
        stop.stop_machine(
            &|cpu| {
                ran_on.insert(cpu, Ordering::Relaxed);
                Ok(())
            },
            CpuSet::first(4),
            QUICK,
        )
        .map(|()| ran_on.load(Ordering::Relaxed))
    });
    assert_eq!(ran_on, Ok(CpuSet::first(4)));
}

#[test]
fn concurrent_callers_are_serialised() {
    let cpus = 4;
    let machine = Machine::new(cpus);
    let inside = Arc::new(AtomicU32::new(0));
    let overlaps = Arc::new(AtomicU32::new(0));
    let runs = Arc::new(AtomicU32::new(0));
    let calls = 50;
    let receivers: Vec<_> = (0..cpus)
        .map(|caller| {
            let (inside, overlaps, runs) = (inside.clone(), overlaps.clone(), runs.clone());
            machine.spawn_on(caller, move |stop| {
                for _ in 0..calls {
                    stop.stop_machine(
                        &|_| {
                            // Exactly one CPU is active per call: any overlap means two
                            // calls ran at once.
                            if inside.fetch_add(1, Ordering::AcqRel) != 0 {
                                overlaps.fetch_add(1, Ordering::Relaxed);
                            }
                            runs.fetch_add(1, Ordering::Relaxed);
                            inside.fetch_sub(1, Ordering::AcqRel);
                            Ok(())
                        },
                        CpuSet::single(caller),
                        QUICK,
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for rx in receivers {
        rx.recv_timeout(Duration::from_secs(120))
            .expect("a caller did not finish");
    }
    assert_eq!(overlaps.load(Ordering::Relaxed), 0);
    assert_eq!(runs.load(Ordering::Relaxed), cpus as u32 * calls);
}

#[test]
fn stale_ipis_after_completed_calls_are_harmless() {
    let machine = Machine::new(3);
    let arch = machine.stop.arch().clone();
    machine
        .on_cpu(0, |stop| {
            stop.stop_machine(&|_| Ok(()), CpuSet::single(0), QUICK)
        })
        .unwrap();
    // A spurious stop IPI with no call in flight: taken, nothing joined.
    patch_machine::stop::Arch::send_stop_ipi(&arch, CpuSet::of(&[1, 2]));
    assert!(machine.all_idle_again(CpuSet::first(3)));
    assert!(!arch.ipi_pending(1) && !arch.ipi_pending(2));
    machine
        .on_cpu(2, |stop| {
            stop.stop_machine(&|_| Ok(()), CpuSet::first(3), QUICK)
        })
        .unwrap();
}

/// A host CPU that spins with interrupts masked, until released.
fn hold(machine: &Machine, cpu: usize, mask: MaskLevel) -> (Arc<AtomicBool>, mpsc::Receiver<()>) {
    let release = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicBool::new(false));
    let (r, h) = (release.clone(), holding.clone());
    let done = machine.spawn_on(cpu, move |stop| {
        let arch = stop.arch();
        let saved = match mask {
            MaskLevel::All => patch_machine::stop::Arch::mask_all(arch),
            MaskLevel::IrqsOnly => patch_machine::stop::Arch::mask_irqs(arch),
        };
        h.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !r.load(Ordering::Acquire) && Instant::now() < deadline {
            // Interrupts are still "taken" here if the mask lets them through.
            arch.poll_interrupts();
            thread::yield_now();
        }
        patch_machine::stop::Arch::restore(arch, saved);
    });
    while !holding.load(Ordering::Acquire) {
        thread::yield_now();
    }
    (release, done)
}

#[test]
#[cfg(feature = "stop-machine-nmi")]
fn nmi_mode_runs_the_function_from_nmi_on_exactly_the_active_cpus() {
    for cpus in [1, 2, 4] {
        let machine = Machine::new(cpus);
        for active in [CpuSet::first(cpus), CpuSet::single(cpus - 1)] {
            let (ran, in_nmi, delivered) = machine.on_cpu(0, move |stop| {
                let ran = AtomicCpuSet::new();
                let in_nmi = AtomicCpuSet::new();
                let function = |cpu: usize| {
                    ran.insert(cpu, Ordering::Relaxed);
                    if stop.arch().in_nmi() {
                        in_nmi.insert(cpu, Ordering::Relaxed);
                    }
                    Ok(())
                };
                // SAFETY: the function only touches atomics.
                let function = unsafe { NmiSafe::new(&function) };
                stop.stop_machine_nmi(function, active, QUICK).unwrap();
                (
                    ran.load(Ordering::Relaxed),
                    in_nmi.load(Ordering::Relaxed),
                    stop.nmi_delivered(),
                )
            });
            assert_eq!(ran, active, "cpus={cpus}");
            assert_eq!(in_nmi, active, "cpus={cpus}: ran outside NMI context");
            assert_eq!(delivered, active);
        }
    }
}

#[test]
#[cfg(feature = "stop-machine-nmi")]
fn nmi_mode_accumulates_errors_and_times_out_a_lost_nmi() {
    let machine = Machine::new(4);
    let arch = machine.stop.arch().clone();
    arch.lose_nmis(CpuSet::single(2));
    let (result, delivered) = machine.on_cpu(0, |stop| {
        let function = |cpu: usize| if cpu == 1 { Err(-7) } else { Ok(()) };
        // SAFETY: pure function.
        let function = unsafe { NmiSafe::new(&function) };
        let result = stop.stop_machine_nmi(function, CpuSet::first(4), QUICK);
        (result, stop.nmi_delivered())
    });
    let Err(StopError::Failed(failures)) = result else {
        panic!("expected failures, got {result:?}");
    };
    assert_eq!(failures.code(1), Some(-7));
    assert_eq!(failures.code(2), Some(patch_machine::stop::ETIMEDOUT));
    assert_eq!(failures.cpus(), CpuSet::of(&[1, 2]));
    assert_eq!(delivered, CpuSet::of(&[0, 1, 3]));
    // A late NMI finds nothing to run; the next call succeeds.
    arch.lose_nmis(CpuSet::EMPTY);
    arch.send_nmi(CpuSet::single(2));
    assert!(machine.all_idle_again(CpuSet::first(4)));
    let ok = machine.on_cpu(0, |stop| {
        let function = |_| Ok(());
        // SAFETY: pure function.
        stop.stop_machine_nmi(unsafe { NmiSafe::new(&function) }, CpuSet::first(4), QUICK)
    });
    assert_eq!(ok, Ok(()));
}

#[test]
fn a_cpu_with_only_irqs_masked_is_reached_by_nmi_but_not_by_ipi() {
    let machine = Machine::new(3);
    // CPU 2 masks normal interrupts only; a stop IPI cannot reach it...
    let (release, done) = hold(&machine, 2, MaskLevel::IrqsOnly);
    let err = machine.on_cpu(0, |stop| {
        stop.stop_machine(
            &|_| Ok(()),
            CpuSet::single(0),
            StopOptions {
                arrival_timeout_ns: 50_000_000,
                ..QUICK
            },
        )
    });
    assert!(matches!(err, Err(StopError::Timeout { missing, .. }) if missing == CpuSet::single(2)));
    // ...but its own NMI still runs there while it keeps IRQs masked.
    assert!(machine.stop.arch().nmis_taken(2) == 0);
    machine.stop.arch().send_nmi(CpuSet::single(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    while machine.stop.arch().nmis_taken(2) == 0 && Instant::now() < deadline {
        thread::yield_now();
    }
    assert_eq!(
        machine.stop.arch().nmis_taken(2),
        1,
        "the NMI did not get through an IRQ mask"
    );
    release.store(true, Ordering::Release);
    done.recv_timeout(Duration::from_secs(60)).unwrap();
}

#[test]
fn mask_all_blocks_nmis_in_the_window_and_irqs_only_lets_them_in() {
    for (mask, expect_in_window) in [(MaskLevel::All, false), (MaskLevel::IrqsOnly, true)] {
        let machine = Machine::new(2);
        let arch = machine.stop.arch().clone();
        let before = arch.nmis_taken(1);
        let taken_in_window = machine.on_cpu(0, move |stop| {
            let taken = AtomicU64::new(0);
            stop.stop_machine(
                &|_| {
                    // An NMI aimed at CPU 1 while it waits inside the window.
                    stop.arch().send_nmi(CpuSet::single(1));
                    let deadline = Instant::now() + Duration::from_millis(200);
                    while Instant::now() < deadline && stop.arch().nmis_taken(1) == before {
                        thread::yield_now();
                    }
                    taken.store(stop.arch().nmis_taken(1) - before, Ordering::Relaxed);
                    Ok(())
                },
                CpuSet::single(0),
                StopOptions { mask, ..QUICK },
            )
            .unwrap();
            taken.load(Ordering::Relaxed)
        });
        assert_eq!(
            taken_in_window > 0,
            expect_in_window,
            "{mask:?}: {taken_in_window} NMIs in the window"
        );
        // Blocked NMIs are taken once the window closes.
        assert!(machine.all_idle_again(CpuSet::first(2)));
        assert_eq!(arch.nmis_taken(1), before + 1);
    }
}

/// Where NMIs pass `mask_all` (x86, `HostArch::nmis_like_x86`): a function run through
/// `stop_machine_nmi_free` runs from the active CPU's NMI, and an NMI another CPU takes
/// while it runs reaches the handlers after the stop machine's slot (the hook) only once
/// the function has returned, that CPU context-synchronised and out of the window
/// (Ankur Arora, "x86/alternatives: NMI safe runtime patching", LKML, 2020). The same
/// function through plain `stop_machine` lets the other CPU's hook in mid-function.
#[test]
#[cfg(feature = "stop-machine-nmi")]
fn nmis_wait_for_the_function_where_they_pass_mask_all() {
    let machine = Machine::new(2);
    let arch = machine.stop.arch().clone();
    arch.nmis_like_x86(true);
    let writing = Arc::new(AtomicBool::new(false));
    let hook_runs = Arc::new(AtomicU32::new(0));
    let hook_saw = Arc::new(Mutex::new(Vec::new()));
    {
        let (writing, hook_runs, hook_saw, stop) = (
            writing.clone(),
            hook_runs.clone(),
            hook_saw.clone(),
            machine.stop.clone(),
        );
        arch.set_nmi_hook(Some(Arc::new(move |cpu| {
            if cpu == 1 {
                let in_window = stop.in_masked_window().contains(1);
                hook_saw.lock().unwrap().push((
                    writing.load(Ordering::SeqCst),
                    in_window,
                    stop.arch().syncs(1),
                ));
                hook_runs.fetch_add(1, Ordering::SeqCst);
            }
        })));
    }
    for held in [true, false] {
        hook_saw.lock().unwrap().clear();
        let (writing, hook_runs) = (writing.clone(), hook_runs.clone());
        let (result, in_nmi, syncs_before) = machine.on_cpu(0, move |stop| {
            let in_nmi = AtomicBool::new(false);
            let syncs_before = stop.arch().syncs(1);
            let function = |_cpu: usize| {
                in_nmi.store(stop.arch().in_nmi(), Ordering::Relaxed);
                writing.store(true, Ordering::SeqCst);
                let (taken, runs) = (stop.arch().nmis_taken(1), hook_runs.load(Ordering::SeqCst));
                stop.arch().send_nmi(CpuSet::single(1));
                // CPU 1 takes the NMI while this "writes"; its hook must not run yet.
                let deadline = Instant::now() + Duration::from_secs(5);
                while stop.arch().nmis_taken(1) == taken && Instant::now() < deadline {
                    thread::yield_now();
                }
                let settle = Instant::now() + Duration::from_millis(20);
                while Instant::now() < settle && hook_runs.load(Ordering::SeqCst) == runs {
                    thread::yield_now();
                }
                writing.store(false, Ordering::SeqCst);
                Ok(())
            };
            let function: patch_machine::stop::StopFn = &function;
            let result = if held {
                // SAFETY: the function touches atomics and the host machine only.
                unsafe { stop.stop_machine_nmi_free(&function, CpuSet::single(0), QUICK) }
            } else {
                stop.stop_machine(function, CpuSet::single(0), QUICK)
            };
            (result, in_nmi.load(Ordering::Relaxed), syncs_before)
        });
        assert_eq!(result, Ok(()), "held={held}");
        assert_eq!(
            in_nmi, held,
            "held={held}: the function ran from NMI: {in_nmi}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while hook_saw.lock().unwrap().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        let saw = hook_saw.lock().unwrap().clone();
        assert_eq!(saw.len(), 1, "held={held}: cpu1's NMI hook runs: {saw:?}");
        let (mid_write, in_window, syncs) = saw[0];
        if held {
            assert!(!mid_write, "cpu1's NMI handlers ran while the function ran");
            assert!(!in_window, "cpu1's NMI handlers ran inside its window");
            assert!(
                syncs > syncs_before,
                "cpu1 did not synchronise before its NMI handlers"
            );
        } else {
            assert!(
                mid_write && in_window,
                "control: plain stop_machine let no NMI handler in mid-function ({saw:?})"
            );
        }
        assert!(machine.all_idle_again(CpuSet::first(2)));
    }
    arch.set_nmi_hook(None);
}

/// The most CPUs there are: 512 threads on a 2-core host, a few calls each.
const WIDE: usize = patch_machine::MAX_CPUS;

/// Generous limits for 512 threads sharing two host cores.
const WIDE_LIMITS: StopOptions = StopOptions {
    arrival_timeout_ns: 60_000_000_000,
    stall_timeout_ns: 120_000_000_000,
    ..StopOptions::DEFAULT
};

#[test]
fn the_core_stops_512_cpus_with_every_guarantee() {
    let machine = Machine::new(WIDE);
    let all = CpuSet::first(WIDE);
    let arch = machine.stop.arch().clone();
    let syncs_before: Vec<u64> = (0..WIDE).map(|c| arch.syncs(c)).collect();
    // One active CPU (the last, not the initiator): it sees every other CPU masked
    // and quiescent before it "writes", and every CPU synchronises after the write.
    let write = Arc::new(AtomicU64::new(0));
    let write_in_fn = write.clone();
    let (outcome, unmasked, quiescence, stamp) = machine.on_cpu(0, move |stop| {
        let seen = Mutex::new(None);
        let outcome = stop.stop_machine(
            &|_| {
                let arch = stop.arch();
                let unmasked = (0..WIDE)
                    .filter(|&c| !arch.is_masked(c))
                    .fold(CpuSet::EMPTY, CpuSet::with);
                let quiescence = stop.quiescence();
                let stamp = stop.stamp();
                write_in_fn.store(arch.tick(), Ordering::SeqCst);
                *seen.lock().unwrap() = Some((unmasked, quiescence, stamp));
                Ok(())
            },
            CpuSet::single(WIDE - 1),
            WIDE_LIMITS,
        );
        let (unmasked, quiescence, stamp) = seen.into_inner().unwrap().expect("never ran");
        (outcome, unmasked, quiescence, stamp)
    });
    outcome.unwrap();
    assert!(
        unmasked.is_empty(),
        "CPUs {unmasked} were not masked during the run"
    );
    assert_eq!(quiescence.masked, all, "not every CPU reported quiescence");
    assert!(
        stamp > quiescence.last_ack_stamp,
        "the function ran (stamp {stamp}) before the last quiescence ack ({})",
        quiescence.last_ack_stamp
    );
    let profile = machine.on_cpu(0, |stop| stop.last_call_profile());
    assert!(profile.masked_unreported.is_empty(), "{profile:?}");
    assert!(
        profile.masked_max_cpu.is_some_and(|cpu| cpu != 0) && profile.masked_max_ns > 0,
        "no other CPU's masked time: {profile:?}"
    );
    assert!(machine.all_idle_again(all));
    let write = write.load(Ordering::SeqCst);
    for (cpu, before) in syncs_before.into_iter().enumerate() {
        assert_eq!(arch.syncs(cpu), before + 1, "cpu{cpu} syncs");
        let (sync, restore) = (arch.last_sync(cpu), arch.last_restore(cpu));
        assert!(
            write < sync && sync < restore,
            "cpu{cpu}: write at tick {write}, sync at {sync}, unmask at {restore}"
        );
    }

    // Every CPU active, every odd one failing: all 256 errors kept, from any initiator.
    for initiator in [WIDE - 1, 200] {
        let (result, ran) = machine.on_cpu(initiator, move |stop| {
            let ran = AtomicCpuSet::new();
            let result = stop.stop_machine(
                &|cpu| {
                    ran.insert(cpu, Ordering::Relaxed);
                    if cpu % 2 == 1 {
                        Err(-1000 - cpu as i32)
                    } else {
                        Ok(())
                    }
                },
                CpuSet::first(WIDE),
                WIDE_LIMITS,
            );
            (result, ran.load(Ordering::Relaxed))
        });
        assert_eq!(ran, all, "initiator cpu{initiator}");
        let Err(StopError::Failed(failures)) = result else {
            panic!("initiator cpu{initiator}: expected failures, got {result:?}");
        };
        let odd = (1..WIDE).step_by(2).fold(CpuSet::EMPTY, CpuSet::with);
        assert_eq!(failures.cpus(), odd);
        assert!(
            failures
                .iter()
                .all(|(cpu, code)| code == -1000 - cpu as i32)
        );
    }
    assert!(machine.all_idle_again(all));
}

#[test]
fn a_cpu_missing_among_512_aborts_the_call_naming_it_and_the_next_includes_it() {
    let machine = Machine::new(WIDE);
    let held_cpu = 300;
    let (release, held_done) = hold(&machine, held_cpu, MaskLevel::All);
    let result = machine.on_cpu(5, |stop| {
        let ran = AtomicCpuSet::new();
        let result = stop.stop_machine(
            &|cpu| {
                ran.insert(cpu, Ordering::Relaxed);
                Ok(())
            },
            CpuSet::first(WIDE),
            StopOptions {
                arrival_timeout_ns: 2_000_000_000,
                ..WIDE_LIMITS
            },
        );
        (result, ran.load(Ordering::Relaxed))
    });
    match result {
        (Err(StopError::Timeout { missing, .. }), ran) => {
            assert_eq!(missing, CpuSet::single(held_cpu));
            assert!(
                ran.is_empty(),
                "the function ran on {ran} in an aborted call"
            );
        }
        other => panic!("expected a timeout naming cpu{held_cpu}, got {other:?}"),
    }
    // The others left the aborted call.
    assert!(machine.all_idle_again(CpuSet::first(WIDE).without(held_cpu)));
    // The held CPU takes the aborted call's IPI as it unmasks, finds nothing to join,
    // and the next call includes it.
    release.store(true, Ordering::Release);
    held_done.recv_timeout(Duration::from_secs(120)).unwrap();
    let ran = machine.on_cpu(0, |stop| {
        let ran = AtomicCpuSet::new();
        stop.stop_machine(
            &|cpu| {
                ran.insert(cpu, Ordering::Relaxed);
                Ok(())
            },
            CpuSet::first(WIDE),
            WIDE_LIMITS,
        )
        .map(|()| ran.load(Ordering::Relaxed))
    });
    assert_eq!(ran, Ok(CpuSet::first(WIDE)));
}

#[test]
fn masked_max_is_the_longest_other_cpu_masked_in_that_call() {
    let cpus = 4;
    let machine = Machine::new(cpus);
    let long = Duration::from_millis(30);
    // Call 1: the function (on the initiator) runs for `long`: every other CPU is
    // masked at least that long.
    let slow = machine.on_cpu(1, move |stop| {
        stop.stop_machine(
            &|_| {
                thread::sleep(long);
                Ok(())
            },
            CpuSet::single(1),
            QUICK,
        )
        .unwrap();
        stop.last_call_profile()
    });
    assert!(slow.masked_unreported.is_empty(), "{slow:?}");
    let cpu = slow.masked_max_cpu.expect("no masked time reported");
    assert_ne!(cpu, 1, "the initiator is not an other CPU: {slow:?}");
    assert!(
        slow.masked_max_ns >= long.as_nanos() as u64,
        "masked_max_ns {} < the {long:?} the function ran",
        slow.masked_max_ns
    );
    // Call 2, right after, with nothing to do: its own figure, not call 1's.
    let fast = machine.on_cpu(1, |stop| {
        stop.stop_machine(&|_| Ok(()), CpuSet::single(1), QUICK)
            .unwrap();
        stop.last_call_profile()
    });
    assert!(fast.masked_unreported.is_empty(), "{fast:?}");
    assert!(
        fast.masked_max_ns < long.as_nanos() as u64,
        "call 2 reports call 1's masked time: {fast:?}"
    );
}

#[test]
fn an_acknowledgement_left_from_an_earlier_call_is_not_an_arrival() {
    let cpus = 4;
    let machine = Machine::new(cpus);
    // Call 1 completes: every CPU's line holds its acknowledgement of call 1.
    machine
        .on_cpu(0, move |stop| {
            stop.stop_machine(&|_| Ok(()), CpuSet::first(cpus), QUICK)
        })
        .unwrap();
    assert!(machine.all_idle_again(CpuSet::first(cpus)));
    // CPU 2 cannot take call 2's IPI: its line still says "call 1", which must not
    // count for call 2.
    let held = 2;
    let (release, held_done) = hold(&machine, held, MaskLevel::All);
    let (result, ran) = machine.on_cpu(0, move |stop| {
        let ran = AtomicCpuSet::new();
        let result = stop.stop_machine(
            &|cpu| {
                ran.insert(cpu, Ordering::Relaxed);
                Ok(())
            },
            CpuSet::first(cpus),
            StopOptions {
                arrival_timeout_ns: 200_000_000,
                ..QUICK
            },
        );
        (result, ran.load(Ordering::Relaxed))
    });
    release.store(true, Ordering::Release);
    held_done.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        ran.is_empty(),
        "the function ran on {ran} while cpu{held} had not arrived"
    );
    assert!(
        matches!(result, Err(StopError::Timeout { missing, .. }) if missing == CpuSet::single(held)),
        "expected a timeout naming cpu{held}, got {result:?}"
    );
}

#[test]
fn a_call_from_an_nmi_or_with_interrupts_masked_is_refused_before_anything() {
    let stop = Arc::new(StopMachine::new(HostArch::new(2)));
    HostArch::connect(&stop);
    stop.arch().bind_current_thread(0);
    let ran = Arc::new(AtomicBool::new(false));
    let from_nmi = Arc::new(Mutex::new(None));
    {
        let (weak, ran, from_nmi) = (Arc::downgrade(&stop), ran.clone(), from_nmi.clone());
        stop.arch().set_nmi_hook(Some(Arc::new(move |_cpu| {
            if let Some(stop) = weak.upgrade() {
                let result = stop.stop_machine(
                    &|_| {
                        ran.store(true, Ordering::Relaxed);
                        Ok(())
                    },
                    CpuSet::first(2),
                    StopOptions::DEFAULT,
                );
                *from_nmi.lock().unwrap() = Some(result);
            }
        })));
    }
    stop.arch().send_nmi(CpuSet::single(0));
    assert!(!stop.arch().poll_interrupts(), "no stop IPI was pending");
    stop.arch().set_nmi_hook(None);
    let masked = {
        let saved = stop.arch().mask_irqs();
        let result = stop.stop_machine(&|_| Ok(()), CpuSet::first(2), StopOptions::DEFAULT);
        stop.arch().restore(saved);
        result
    };
    assert!(
        !ran.load(Ordering::Relaxed),
        "a refused call's function ran"
    );
    // CPU 1 has no thread: a call that went ahead would have waited for it to arrive.
    assert_eq!(stop.arch().ipis_sent(), 0, "a refused call sent a stop IPI");
    let from_nmi = from_nmi.lock().unwrap().take();
    assert_eq!(
        from_nmi,
        Some(Err(StopError::WrongContext {
            cpu: 0,
            context: CallContext::Nmi
        }))
    );
    assert_eq!(
        masked,
        Err(StopError::WrongContext {
            cpu: 0,
            context: CallContext::IrqsMasked
        })
    );
}
