//! Batch validation, patch_machine and the nosync path on the host.

#![allow(clippy::result_large_err)]

use patch_machine::CpuSet;
use patch_machine::arch::host::HostArch;
use patch_machine::patch::insn::{self, NOP};
use patch_machine::patch::{
    ECHANGED, Patch, PatchError, Text, patch_machine, patch_nosync, validate,
};
use patch_machine::stop::{StopError, StopMachine, StopOptions};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

const BASE: usize = 0x4020_0000;
const WORDS: usize = 64;
/// Words 48..56 play the code the rendezvous runs.
const PROTECTED: Range<usize> = BASE + 48 * 4..BASE + 56 * 4;

/// Kernel text as a row of words, with the machine it belongs to so that every write
/// can check who was masked at that moment.
struct HostText {
    words: Vec<AtomicU32>,
    protected: [Range<usize>; 1],
    lock: spin::Mutex<()>,
    arch: HostArch,
    cpus: usize,
    writes: AtomicUsize,
    syncs: AtomicUsize,
    /// Set if a write happened while some other CPU had interrupts unmasked.
    unmasked_write: AtomicBool,
    /// Every write and every cache maintenance, in order, stamped with the machine's
    /// [`HostArch::tick`] (the sequence `last_sync` and `last_restore` share).
    events: std::sync::Mutex<Vec<TextEvent>>,
    /// A write that bypasses the writer lock: the first read of this address stores this
    /// word there right after it was read.
    tamper: std::sync::Mutex<Option<(usize, u32)>>,
}

/// What [`HostText`] saw happen, in order.
#[derive(Clone, Debug, PartialEq)]
enum TextEvent {
    Write { range: Range<usize>, tick: u64 },
    SyncIcache { range: Range<usize>, tick: u64 },
}

impl HostText {
    fn new(arch: HostArch, cpus: usize) -> Self {
        HostText {
            words: (0..WORDS)
                .map(|i| AtomicU32::new(insn::movz_x(0, i as u16, 0).unwrap()))
                .collect(),
            protected: [PROTECTED],
            lock: spin::Mutex::new(()),
            arch,
            cpus,
            writes: AtomicUsize::new(0),
            syncs: AtomicUsize::new(0),
            unmasked_write: AtomicBool::new(false),
            events: std::sync::Mutex::new(Vec::new()),
            tamper: std::sync::Mutex::new(None),
        }
    }

    fn events(&self) -> Vec<TextEvent> {
        self.events.lock().unwrap().clone()
    }

    fn record(&self, event: impl FnOnce(u64) -> TextEvent) {
        let mut events = self.events.lock().unwrap();
        let tick = self.arch.tick();
        events.push(event(tick));
    }

    fn snapshot(&self) -> Vec<u32> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    fn at(&self, addr: usize) -> &AtomicU32 {
        &self.words[(addr - BASE) / 4]
    }
}

// SAFETY: a plain in-memory array: every address in `text_range` is backed, writes are
// single atomic stores, and "instruction fetch" is an atomic load.
unsafe impl Text for HostText {
    type Insn = u32;

    fn text_range(&self) -> Range<usize> {
        BASE..BASE + WORDS * 4
    }
    fn protected_ranges(&self) -> &[Range<usize>] {
        &self.protected
    }
    fn read_insn(&self, addr: usize, _len: usize) -> u32 {
        let found = self.at(addr).load(Ordering::Relaxed);
        let mut tamper = self.tamper.lock().unwrap();
        if let Some((at, word)) = *tamper
            && at == addr
        {
            self.at(addr).store(word, Ordering::Relaxed);
            *tamper = None;
        }
        found
    }
    unsafe fn write_insn(&self, addr: usize, insn: u32) {
        let me = patch_machine::stop::Arch::cpu_id(&self.arch);
        if (0..self.cpus).any(|cpu| cpu != me && !self.arch.is_masked(cpu)) {
            self.unmasked_write.store(true, Ordering::Relaxed);
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.at(addr).store(insn, Ordering::Relaxed);
        self.record(|tick| TextEvent::Write {
            range: addr..addr + 4,
            tick,
        });
    }
    fn sync_icache(&self, range: Range<usize>) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.record(|tick| TextEvent::SyncIcache { range, tick });
    }
    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.lock
    }
}

fn addr(word: usize) -> usize {
    BASE + word * 4
}

fn movz(value: u16) -> u32 {
    insn::movz_x(0, value, 0).unwrap()
}

/// A machine with `cpus` CPU threads; CPU 0 runs `job`, the others spin taking IPIs.
fn on_machine<R: Send + 'static>(
    cpus: usize,
    job: impl FnOnce(&StopMachine<HostArch>, &HostText) -> R + Send + 'static,
) -> (R, Arc<HostText>) {
    let stop = Arc::new(StopMachine::new(HostArch::new(cpus)));
    HostArch::connect(&stop);
    let text = Arc::new(HostText::new(stop.arch().clone(), cpus));
    let quit = Arc::new(AtomicBool::new(false));
    let others: Vec<_> = (1..cpus)
        .map(|cpu| {
            let (stop, quit) = (stop.clone(), quit.clone());
            thread::spawn(move || {
                stop.arch().bind_current_thread(cpu);
                while !quit.load(Ordering::Relaxed) {
                    stop.arch().poll_interrupts();
                    thread::yield_now();
                }
            })
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    let (s, t) = (stop.clone(), text.clone());
    thread::spawn(move || {
        s.arch().bind_current_thread(0);
        let _ = tx.send(job(&s, &t));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("cpu0's job did not finish in 60 s");
    quit.store(true, Ordering::Relaxed);
    for t in others {
        t.join().unwrap();
    }
    (result, text)
}

#[test]
fn every_kind_of_bad_entry_rejects_the_whole_batch_unchanged() {
    let arch = HostArch::new(1);
    let text = HostText::new(arch, 1);
    let before = text.snapshot();
    let good = Patch::new(addr(1), movz(1), movz(100));
    type Expect = fn(&PatchError) -> bool;
    let cases: Vec<(Vec<Patch>, Expect)> = vec![
        (vec![], |e| matches!(e, PatchError::EmptyBatch)),
        (vec![good, Patch::new(addr(2) + 2, 0, 0)], |e| {
            matches!(e, PatchError::Misaligned { index: 1, .. })
        }),
        (vec![good, Patch::new(BASE - 4, 0, 0)], |e| {
            matches!(e, PatchError::OutsideText { index: 1, .. })
        }),
        (vec![good, Patch::new(addr(WORDS), 0, 0)], |e| {
            matches!(e, PatchError::OutsideText { index: 1, .. })
        }),
        (vec![good, Patch::new(addr(50), movz(50), NOP)], |e| {
            matches!(e, PatchError::Protected { index: 1, .. })
        }),
        (vec![good, Patch::new(addr(3), movz(4), NOP)], |e| {
            matches!(e, PatchError::OldMismatch { index: 1, expected, found, .. }
                if *expected == movz(4) && *found == movz(3))
        }),
        (vec![good, Patch::new(addr(3), movz(3), NOP), good], |e| {
            matches!(
                e,
                PatchError::Duplicate {
                    index: 2,
                    first: 0,
                    ..
                }
            )
        }),
    ];
    for (batch, expected) in cases {
        let err = validate(&text, &batch).unwrap_err();
        assert!(expected(&err), "batch {batch:x?}: unexpected error {err:?}");
        // The message names the entry and the reason.
        let message = err.to_string();
        assert!(!message.is_empty());
        let (err2, _) = on_machine(2, move |stop, text| {
            patch_machine(stop, text, &batch, StopOptions::DEFAULT).unwrap_err()
        });
        assert_eq!(err2, err);
    }
    assert_eq!(text.snapshot(), before);
    assert_eq!(text.writes.load(Ordering::Relaxed), 0);
}

#[test]
fn error_messages_say_which_entry_and_why() {
    let text = HostText::new(HostArch::new(1), 1);
    let err = validate(&text, &[Patch::new(addr(5), movz(6), NOP)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "entry 0 ({:#x}): expected old instruction {:#010x}, found {:#010x}",
            addr(5),
            movz(6),
            movz(5)
        )
    );
}

#[test]
fn patch_machine_writes_only_while_every_other_cpu_is_masked() {
    for cpus in [1, 2, 4, 8] {
        let batch: Vec<Patch> = (0..10)
            .map(|i| Patch::new(addr(i), movz(i as u16), movz(1000 + i as u16)))
            .collect();
        let expected_new: Vec<u32> = batch.iter().map(|p| p.new).collect();
        let (report, text) = on_machine(cpus, move |stop, text| {
            patch_machine(stop, text, &batch, StopOptions::DEFAULT)
        });
        let report = report.unwrap();
        assert_eq!(report.cpus, CpuSet::first(cpus));
        assert_eq!(report.quiescence.masked, CpuSet::first(cpus));
        assert!(report.first_write_stamp > report.quiescence.last_ack_stamp);
        assert_eq!(report.sites, 10);
        assert!(
            !text.unmasked_write.load(Ordering::Relaxed),
            "cpus={cpus}: wrote while a CPU was unmasked"
        );
        assert_eq!(&text.snapshot()[..10], &expected_new[..]);
        assert_eq!(text.syncs.load(Ordering::Relaxed), 10);
    }
}

/// The window re-checks the sites: a write that bypassed the writer lock between
/// validation and the stop (here: right after validation read the site) makes the call
/// fail with `ECHANGED`, and nothing is written.
#[test]
fn a_site_changed_after_validation_fails_the_window_and_nothing_is_written() {
    let (result, text) = on_machine(2, |stop, text| {
        let batch: Vec<Patch> = (4..12)
            .map(|i| Patch::new(addr(i), movz(i as u16), movz(500 + i as u16)))
            .collect();
        *text.tamper.lock().unwrap() = Some((addr(9), movz(999)));
        patch_machine(stop, text, &batch, StopOptions::DEFAULT)
    });
    let err = result.unwrap_err();
    let PatchError::Stop(StopError::Failed(failures)) = err else {
        panic!("expected the window's ECHANGED, got {err}");
    };
    assert_eq!(
        failures.iter().collect::<Vec<_>>(),
        [(0, ECHANGED)],
        "{err}"
    );
    assert_eq!(
        text.writes.load(Ordering::Relaxed),
        0,
        "nothing may be written"
    );
    let words = text.snapshot();
    assert_eq!(words[9], movz(999));
    for i in (4..12).filter(|&i| i != 9) {
        assert_eq!(words[i], movz(i as u16), "word {i} changed");
    }
}

#[test]
fn nosync_accepts_only_cmodx_safe_pairs() {
    let (results, text) = on_machine(2, |stop, text| {
        let arch = stop.arch();
        let b = insn::b(addr(7), addr(9)).unwrap();
        // movz -> nop is not CMODX-safe: refused, untouched.
        let refused = patch_nosync(arch, text, &[Patch::new(addr(7), movz(7), NOP)]);
        // Make the site a NOP the safe way (through the stop machine), then flip it
        // between NOP and B without stopping anything.
        patch_machine(
            stop,
            text,
            &[Patch::new(addr(7), movz(7), NOP)],
            StopOptions::DEFAULT,
        )
        .unwrap();
        let to_branch = patch_nosync(arch, text, &[Patch::new(addr(7), NOP, b)]);
        let mixed = patch_nosync(
            arch,
            text,
            &[
                Patch::new(addr(7), b, NOP),
                Patch::new(addr(8), movz(8), NOP),
            ],
        );
        (refused, to_branch, mixed, b)
    });
    let (refused, to_branch, mixed, b) = results;
    assert!(matches!(
        refused,
        Err(PatchError::NotCmodxSafe { index: 0, .. })
    ));
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("use patch_machine")
    );
    assert_eq!(to_branch, Ok(()));
    assert!(matches!(
        mixed,
        Err(PatchError::NotCmodxSafe { index: 1, .. })
    ));
    // The refused mixed batch left even its valid first entry alone.
    assert_eq!(text.read_insn(addr(7), 4), b);
    assert_eq!(text.read_insn(addr(8), 4), movz(8));
}

/// Checks the order QEMU's TCG cannot observe (it keeps instruction fetch coherent with
/// any store): every write is followed by a `sync_icache` covering it, and returns the
/// tick of the last maintenance.
fn every_write_made_coherent(events: &[TextEvent]) -> u64 {
    let mut last = 0;
    for (i, event) in events.iter().enumerate() {
        match event {
            TextEvent::Write { range, tick } => {
                let covered = events[i + 1..].iter().any(|later| {
                    matches!(later, TextEvent::SyncIcache { range: synced, .. }
                        if synced.start <= range.start && range.end <= synced.end)
                });
                assert!(
                    covered,
                    "write of {range:x?} (tick {tick}) is never followed by a sync_icache \
                     covering it: {events:x?}"
                );
            }
            TextEvent::SyncIcache { tick, .. } => last = *tick,
        }
    }
    last
}

/// After the writes and their cache maintenance, every CPU context-synchronises before
/// it unmasks: write, clean + invalidate, then (per CPU) ISB, then restore.
#[test]
fn patch_machine_makes_every_write_coherent_before_any_cpu_unmasks() {
    for cpus in [1, 2, 4] {
        // Scattered, adjacent and out-of-order sites.
        let sites = [3, 4, 5, 20, 9, 40, 41];
        let batch: Vec<Patch> = sites
            .iter()
            .map(|&i| Patch::new(addr(i), movz(i as u16), movz(2000 + i as u16)))
            .collect();
        let (report, text) = on_machine(cpus, move |stop, text| {
            patch_machine(stop, text, &batch, StopOptions::DEFAULT)
        });
        report.unwrap();
        let events = text.events();
        let writes = events
            .iter()
            .filter(|e| matches!(e, TextEvent::Write { .. }))
            .count();
        assert_eq!(writes, sites.len(), "{events:x?}");
        let last_maintenance = every_write_made_coherent(&events);
        for cpu in 0..cpus {
            let (sync, restore) = (text.arch.last_sync(cpu), text.arch.last_restore(cpu));
            assert!(
                last_maintenance < sync && sync < restore,
                "cpus={cpus}: cpu{cpu} must synchronise its context (tick {sync}) after the \
                 last cache maintenance (tick {last_maintenance}) and before it unmasks \
                 (tick {restore})"
            );
        }
    }
}

/// The nosync path maintains every site it writes, then synchronises the caller.
#[test]
fn patch_nosync_makes_every_write_coherent_before_it_returns() {
    let (last_sync, text) = on_machine(1, |stop, text| {
        let arch = stop.arch();
        let b = |from: usize, to: usize| insn::b(addr(from), addr(to)).unwrap();
        let nop = |i: usize| Patch::new(addr(i), movz(i as u16), NOP);
        patch_machine(
            stop,
            text,
            &[nop(10), nop(11), nop(30)],
            StopOptions::DEFAULT,
        )
        .unwrap();
        text.events.lock().unwrap().clear();
        let flips = [
            Patch::new(addr(10), NOP, b(10, 12)),
            Patch::new(addr(11), NOP, b(11, 12)),
            Patch::new(addr(30), NOP, b(30, 31)),
        ];
        patch_nosync(arch, text, &flips).unwrap();
        arch.last_sync(0)
    });
    let events = text.events();
    let writes = events
        .iter()
        .filter(|e| matches!(e, TextEvent::Write { .. }))
        .count();
    assert_eq!(writes, 3, "{events:x?}");
    let last_maintenance = every_write_made_coherent(&events);
    assert!(
        last_maintenance < last_sync,
        "the caller must synchronise its context after the last maintenance"
    );
}

mod icache_plan {
    //! `patch::icache::plan`, the arm64 maintenance decision, over cache types and
    //! ranges (QEMU reports IDC and DIC on `-cpu max` and neither on `cortex-a72`, and
    //! TCG would not notice a missed line anyway).

    use patch_machine::patch::icache::{CacheType, Lines, plan};

    /// CTR_EL0 decoded: DminLine and IminLine are log2 of the line size in words.
    fn ctr(dmin_words_log2: u32, imin_words_log2: u32, idc: bool, dic: bool) -> CacheType {
        CacheType {
            dcache_line: 4 << dmin_words_log2,
            icache_line: 4 << imin_words_log2,
            idc,
            dic,
        }
    }

    /// `lines` maintains every byte of `start..end` by `line`-byte lines, each line
    /// once, and nothing outside the lines the range touches.
    fn assert_covers(lines: Lines, start: usize, end: usize, line: usize, what: &str) {
        assert_eq!(lines.line, line, "{what}: line size");
        let addrs: Vec<usize> = lines.collect();
        let first = start & !(line - 1);
        let expected: Vec<usize> = (0..)
            .map(|i| first + i * line)
            .take_while(|&a| a < end)
            .collect();
        assert_eq!(
            addrs, expected,
            "{what}: lines maintained for {start:#x}..{end:#x} by {line}"
        );
        // The same property as a reader states it: every byte is in a maintained line.
        for byte in [start, end - 1, start + (end - start) / 2] {
            assert!(
                addrs.iter().any(|&a| a <= byte && byte < a + line),
                "{what}: byte {byte:#x} of {start:#x}..{end:#x} not maintained"
            );
        }
    }

    fn check(ctr: CacheType, start: usize, end: usize) {
        let p = plan(ctr, start..end);
        let what = format!("{ctr:?}");
        match p.clean {
            None => assert!(ctr.idc, "{what}: clean skipped without IDC"),
            Some(lines) => {
                assert!(!ctr.idc, "{what}: clean despite IDC");
                assert_covers(lines, start, end, ctr.dcache_line, &what);
            }
        }
        match p.invalidate {
            None => assert!(ctr.dic, "{what}: invalidate skipped without DIC"),
            Some(lines) => {
                assert!(!ctr.dic, "{what}: invalidate despite DIC");
                assert_covers(lines, start, end, ctr.icache_line, &what);
            }
        }
    }

    #[test]
    fn every_written_line_is_maintained_and_skips_follow_idc_dic() {
        let base = 0x4021_0000usize;
        for flags in 0..4 {
            let (idc, dic) = (flags & 1 != 0, flags & 2 != 0);
            // Line sizes from 4 bytes to 2 KiB (the architectural maximum), D and I apart.
            for d in 0..=9 {
                for i in 0..=9 {
                    let ctr = ctr(d, i, idc, dic);
                    for offset in (0..300).step_by(4) {
                        for len in [4, 8, 12, 60, 64, 68, 128, 256, 4096 + 4] {
                            check(ctr, base + offset, base + offset + len);
                        }
                    }
                }
            }
        }
    }

    /// Pseudo-random cache types and unaligned ranges.
    #[test]
    fn random_ranges_and_cache_types() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let raw = next();
            // DminLine and IminLine above 9 (2 KiB) are reserved.
            let ctr = ctr(
                (raw % 10) as u32,
                ((raw >> 8) % 10) as u32,
                raw & 1 << 28 != 0,
                raw & 1 << 29 != 0,
            );
            let start = 0x4020_0000 + (next() % 0x10000) as usize;
            let len = 1 + (next() % 5000) as usize;
            check(ctr, start, start + len);
        }
    }

    #[test]
    fn an_empty_range_needs_nothing() {
        for flags in 0..4 {
            let p = plan(
                ctr(4, 4, flags & 1 != 0, flags & 2 != 0),
                0x4020_0010..0x4020_0010,
            );
            assert_eq!((p.clean, p.invalidate), (None, None));
        }
    }

    #[test]
    fn a_range_at_the_top_of_the_address_space_ends_there() {
        let lines: Vec<usize> = plan(ctr(4, 4, false, false), usize::MAX - 100..usize::MAX)
            .clean
            .unwrap()
            .collect();
        assert_eq!(lines.first(), Some(&((usize::MAX - 100) & !63)));
        assert_eq!(lines.last(), Some(&(usize::MAX & !63)));
    }
}

mod write_plan {
    //! `patch::plan::prepare`: the write plan `patch_machine` builds before the stop.
    //! Every site lands in exactly one run, runs are maximal stretches of back-to-back
    //! entries in address order, whatever order the batch came in, and a batch the plan
    //! refuses gets exactly `validate`'s error.

    use super::{BASE, HostText, WORDS, addr, movz};
    use patch_machine::arch::host::HostArch;
    use patch_machine::patch::plan::{MAX_SITES, PlanSpace, Run, WritePlan, prepare};
    use patch_machine::patch::x86::{self, Insn as X86Insn};
    use patch_machine::patch::{Instruction, Patch, PatchError, Text, validate};
    use std::ops::Range;
    use std::sync::atomic::{AtomicU8, Ordering};

    fn space() -> Box<PlanSpace> {
        Box::new(PlanSpace::new())
    }

    /// The bytes of `insns` in memory order, back to back.
    fn image<I: Instruction>(insns: impl Iterator<Item = I>) -> Vec<u8> {
        insns
            .flat_map(|i| i.to_le_word().to_le_bytes().into_iter().take(i.size()))
            .collect()
    }

    /// Checks `plan` against `batch`: runs ascending, disjoint and maximal; each run's
    /// entries back to back from its address, its bytes those entries' new and old
    /// instructions; every entry of the batch in exactly one run. Returns the runs'
    /// byte ranges.
    fn check_plan<I: Instruction>(
        plan: &WritePlan<'_, I>,
        batch: &[Patch<I>],
    ) -> Vec<Range<usize>> {
        let mut seen = vec![0usize; batch.len()];
        let mut ranges: Vec<Range<usize>> = Vec::new();
        let runs: Vec<Run<'_, I>> = plan.runs().collect();
        for run in &runs {
            let entries: Vec<&Patch<I>> = run.entries().collect();
            assert!(!entries.is_empty(), "an empty run at {:#x}", run.addr);
            assert_eq!(entries[0].addr, run.addr, "a run starts at its first entry");
            let mut at = run.addr;
            for entry in &entries {
                assert_eq!(entry.addr, at, "entries of a run lie back to back");
                at += entry.old.size();
                let index = batch
                    .iter()
                    .position(|p| std::ptr::eq(p, *entry))
                    .expect("a run's entry is an entry of the batch");
                seen[index] += 1;
            }
            assert_eq!(run.range(), run.addr..at);
            assert_eq!(run.new, &image(entries.iter().map(|p| p.new))[..]);
            assert_eq!(run.old, &image(entries.iter().map(|p| p.old))[..]);
            if let Some(previous) = ranges.last() {
                assert!(
                    previous.end < run.addr,
                    "runs {previous:x?} and {:x?} are out of order, overlap or should be one",
                    run.range()
                );
            }
            ranges.push(run.range());
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "every entry in exactly one run (times seen, by batch index): {seen:?}"
        );
        assert_eq!(plan.sites(), batch.len());
        ranges
    }

    /// The orders a batch may come in: as given, reversed, and shuffled.
    fn orders<T: Clone>(batch: &[T]) -> Vec<(&'static str, Vec<T>)> {
        let reversed: Vec<T> = batch.iter().rev().cloned().collect();
        // A fixed permutation: a stride coprime with the length, from an offset.
        let n = batch.len();
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let stride = [7, 5, 11, 13]
            .into_iter()
            .find(|&s| gcd(s, n) == 1)
            .unwrap();
        let shuffled: Vec<T> = (0..n)
            .map(|i| batch[(i * stride + 3) % n].clone())
            .collect();
        vec![
            ("ascending", batch.to_vec()),
            ("descending", reversed),
            ("shuffled", shuffled),
        ]
    }

    #[test]
    fn runs_coalesce_back_to_back_sites_and_cover_each_once() {
        let text = HostText::new(HostArch::new(1), 1);
        // Four stretches: 0-2, 5-6, 9, 20-29.
        let sites: Vec<usize> = [0, 1, 2, 5, 6, 9].into_iter().chain(20..30).collect();
        let batch: Vec<Patch> = sites
            .iter()
            .map(|&i| Patch::new(addr(i), movz(i as u16), movz(3000 + i as u16)))
            .collect();
        for (order, batch) in orders(&batch) {
            let mut space = space();
            let plan = prepare(&text, &batch, &mut space)
                .unwrap_or_else(|e| panic!("{order}: {e}"))
                .unwrap_or_else(|| panic!("{order}: no plan"));
            let ranges = check_plan(&plan, &batch);
            assert_eq!(
                ranges,
                [
                    addr(0)..addr(3),
                    addr(5)..addr(7),
                    addr(9)..addr(10),
                    addr(20)..addr(30)
                ],
                "{order}"
            );
        }
    }

    #[test]
    fn duplicates_are_refused_as_validate_refuses_them() {
        let text = HostText::new(HostArch::new(1), 1);
        let mut batch: Vec<Patch> = (0..12)
            .map(|i| Patch::new(addr(i), movz(i as u16), movz(100 + i as u16)))
            .collect();
        batch.push(Patch::new(addr(4), movz(4), movz(7)));
        for (order, batch) in orders(&batch) {
            let expected = validate(&text, &batch).unwrap_err();
            assert!(matches!(expected, PatchError::Duplicate { .. }), "{order}");
            let got = prepare(&text, &batch, &mut space()).err();
            assert_eq!(got, Some(expected), "{order}");
        }
    }

    #[test]
    fn a_plan_refuses_what_validate_refuses_and_only_that() {
        let text = HostText::new(HostArch::new(1), 1);
        let good = |i: usize| Patch::new(addr(i), movz(i as u16), movz(200 + i as u16));
        let bad = [
            Patch::new(addr(2) + 2, 0, 0),
            Patch::new(BASE - 4, 0, 0),
            Patch::new(addr(WORDS), 0, 0),
            Patch::new(addr(WORDS - 1) + 4, 0, 0),
            Patch::new(usize::MAX - 3, 0, 0),
            Patch::new(addr(50), movz(50), 0),
            Patch::new(addr(47), movz(47), 0),
            Patch::new(addr(56), movz(56), 0),
            Patch::new(addr(3), movz(4), 0),
        ];
        for entry in bad {
            let batch: Vec<Patch> = [good(0), good(1), entry, good(10)].into();
            for (order, batch) in orders(&batch) {
                let expected = validate(&text, &batch).err();
                let got = prepare(&text, &batch, &mut space()).err();
                assert_eq!(got, expected, "{order}, entry {entry:x?}");
            }
        }
        // Protected range 48..56: its neighbours are fine.
        let batch = [good(47), good(56)];
        assert!(validate(&text, &batch).is_ok());
        let mut space = space();
        let plan = prepare(&text, &batch, &mut space).unwrap().unwrap();
        check_plan(&plan, &batch);
    }

    #[test]
    fn a_batch_larger_than_the_plan_is_valid_but_unplanned() {
        let words: Vec<u32> = vec![patch_machine::patch::insn::NOP; MAX_SITES + 1];
        let text = patch_machine::arch::host::HostText::new(&words);
        let batch: Vec<Patch> = (0..=MAX_SITES)
            .map(|i| Patch::new(text.addr(i), words[i], movz(1)))
            .collect();
        assert!(matches!(prepare(&text, &batch, &mut space()), Ok(None)));
        assert!(
            prepare(&text, &batch[..MAX_SITES], &mut space())
                .unwrap()
                .is_some()
        );
    }

    /// x86 text on the host: bytes, instructions of 1 to 8 bytes.
    struct ByteText {
        bytes: Vec<AtomicU8>,
        protected: Range<usize>,
        lock: spin::Mutex<()>,
    }

    const BYTE_BASE: usize = 0x20_0000;

    impl ByteText {
        fn new(len: usize) -> Self {
            ByteText {
                bytes: (0..len).map(|_| AtomicU8::new(0x90)).collect(),
                protected: 0..0,
                lock: spin::Mutex::new(()),
            }
        }
    }

    // SAFETY: a plain byte array; nothing executes it.
    unsafe impl Text for ByteText {
        type Insn = X86Insn;

        fn text_range(&self) -> Range<usize> {
            BYTE_BASE..BYTE_BASE + self.bytes.len()
        }
        fn protected_ranges(&self) -> &[Range<usize>] {
            std::slice::from_ref(&self.protected)
        }
        fn read_insn(&self, addr: usize, len: usize) -> X86Insn {
            let bytes: Vec<u8> = (addr..addr + len)
                .map(|a| self.bytes[a - BYTE_BASE].load(Ordering::Relaxed))
                .collect();
            X86Insn::from_bytes(&bytes).unwrap()
        }
        unsafe fn write_insn(&self, addr: usize, insn: X86Insn) {
            for (i, &b) in insn.bytes().iter().enumerate() {
                self.bytes[addr - BYTE_BASE + i].store(b, Ordering::Relaxed);
            }
        }
        fn sync_icache(&self, _range: Range<usize>) {}
        fn writer_lock(&self) -> &spin::Mutex<()> {
            &self.lock
        }
    }

    fn nop(len: usize) -> X86Insn {
        x86::nop(len).unwrap()
    }

    #[test]
    fn variable_length_runs_and_overlaps() {
        let text = ByteText::new(64);
        // Every site first holds the NOP its entry expects; 5-byte sites become
        // `MOV $imm, %eax`.
        let layout = [(0, 5), (5, 3), (8, 1), (12, 2), (14, 8), (30, 4)];
        let mut batch = Vec::new();
        for &(offset, len) in &layout {
            let old = nop(len);
            // SAFETY: host bytes.
            unsafe { text.write_insn(BYTE_BASE + offset, old) };
            let new = if len == 5 {
                x86::mov_eax_imm32(offset as u32)
            } else {
                nop(len)
            };
            batch.push(Patch::new(BYTE_BASE + offset, old, new));
        }
        for (order, batch) in orders(&batch) {
            let mut space = space();
            let plan = prepare(&text, &batch, &mut space)
                .unwrap_or_else(|e| panic!("{order}: {e}"))
                .unwrap();
            let ranges = check_plan(&plan, &batch);
            let base = BYTE_BASE;
            assert_eq!(
                ranges,
                [base..base + 9, base + 12..base + 22, base + 30..base + 34],
                "{order}"
            );
        }
        // Overlaps: a 2-byte entry inside the 5-byte NOP at 0, and one straddling it
        // and the 3-byte NOP at 5 (each expecting the bytes that are there).
        for overlapping in [
            Patch::new(
                BYTE_BASE + 3,
                X86Insn::from_bytes(&[0x00, 0x00]).unwrap(),
                nop(2),
            ),
            Patch::new(
                BYTE_BASE + 4,
                X86Insn::from_bytes(&[0x00, 0x0f]).unwrap(),
                nop(2),
            ),
        ] {
            let batch: Vec<_> = batch.iter().copied().chain([overlapping]).collect();
            for (order, batch) in orders(&batch) {
                let expected = validate(&text, &batch).unwrap_err();
                assert!(
                    matches!(expected, PatchError::Duplicate { .. }),
                    "{order}: {expected:?}"
                );
                assert_eq!(
                    prepare(&text, &batch, &mut space()).err(),
                    Some(expected),
                    "{order}"
                );
            }
        }
    }
}
