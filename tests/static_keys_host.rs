//! Static keys on the host: site tables, the encodings each site flips between, the
//! reference counts, the refusals (nothing changes), and several threads flipping keys
//! at once. The text is an array of words patched through the real `patch_nosync`
//! (arm64 encodings); the x86 encodings are checked on the batches built for them.

#![allow(clippy::result_large_err)]

use patch_machine::arch::host::HostArch;
use patch_machine::patch::insn::{self, NOP};
use patch_machine::patch::x86;
use patch_machine::patch::{Patch, PatchError, Text, patch_nosync};
use patch_machine::static_key::{
    BranchKind, JumpEntry, KeyError, KeyText, StaticKey, StaticKeys, build_batch, check_tables,
};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::thread;

const BASE: usize = 0x4020_0000;
const WORDS: usize = 256;
/// Words 200..208 play `.text.nopatch`.
const PROTECTED: Range<usize> = BASE + 200 * 4..BASE + 208 * 4;

fn addr(word: usize) -> usize {
    BASE + word * 4
}

/// Kernel text as a row of words; every word starts as a NOP.
struct Words {
    words: Vec<AtomicU32>,
    protected: [Range<usize>; 1],
    lock: spin::Mutex<()>,
    /// `write_batch` calls.
    batches_written: AtomicUsize,
}

// SAFETY: a plain in-memory array: every address in `text_range` is backed, writes are
// single atomic stores, and "instruction fetch" is an atomic load.
unsafe impl Text for Words {
    type Insn = u32;
    fn text_range(&self) -> Range<usize> {
        BASE..BASE + WORDS * 4
    }
    fn protected_ranges(&self) -> &[Range<usize>] {
        &self.protected
    }
    fn read_insn(&self, addr: usize, _len: usize) -> u32 {
        self.words[(addr - BASE) / 4].load(Ordering::Relaxed)
    }
    unsafe fn write_insn(&self, addr: usize, insn: u32) {
        self.words[(addr - BASE) / 4].store(insn, Ordering::Relaxed);
    }
    fn sync_icache(&self, _range: Range<usize>) {}
    unsafe fn write_batch(&self, batch: &[Patch<u32>]) {
        self.batches_written.fetch_add(1, Ordering::Relaxed);
        for p in batch {
            // SAFETY: forwarded from the caller.
            unsafe { self.write_insn(p.addr, p.new) };
        }
    }
    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.lock
    }
}

/// The tables and the text of one test.
struct Tables {
    arch: HostArch,
    text: Words,
    entries: Vec<JumpEntry>,
    keys: Vec<&'static StaticKey>,
    /// Calls of `patch` and the sites they carried.
    batches: AtomicUsize,
    sites: AtomicUsize,
}

impl KeyText for Tables {
    type Insn = u32;
    fn entries(&self) -> &[JumpEntry] {
        &self.entries
    }
    fn keys(&self) -> &[&StaticKey] {
        &self.keys
    }
    fn text_range(&self) -> Range<usize> {
        self.text.text_range()
    }
    fn protected_ranges(&self) -> &[Range<usize>] {
        self.text.protected_ranges()
    }
    fn nop(&self) -> u32 {
        NOP
    }
    fn branch(&self, site: usize, target: usize) -> Result<u32, &'static str> {
        insn::b(site, target).map_err(|_| "out of B's range")
    }
    fn patch(&self, batch: &[Patch<u32>]) -> Result<(), PatchError<u32>> {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.sites.fetch_add(batch.len(), Ordering::Relaxed);
        patch_nosync(&self.arch, &self.text, batch)
    }
    fn read(&self, site: usize) -> u32 {
        self.text.read_insn(site, 4)
    }
    fn now_ns(&self) -> u64 {
        patch_machine::stop::Arch::now_ns(&self.arch)
    }
    fn relax(&self) {
        std::hint::spin_loop();
    }
}

fn key(name: &'static str) -> &'static StaticKey {
    Box::leak(Box::new(StaticKey::new(name)))
}

fn key_addr(key: &StaticKey) -> usize {
    key as *const StaticKey as usize
}

fn entry(site_word: usize, target_word: usize, key: &StaticKey, kind: BranchKind) -> JumpEntry {
    JumpEntry {
        site: addr(site_word),
        target: addr(target_word),
        key: key_addr(key),
        kind: kind as usize,
    }
}

/// Tables whose text has every site as it is laid out with the keys disabled: NOP for
/// unlikely sites, the branch for likely ones.
fn tables(entries: Vec<JumpEntry>, keys: Vec<&'static StaticKey>) -> StaticKeys<Tables, 16> {
    let arch = HostArch::new(1);
    arch.bind_current_thread(0);
    let text = Words {
        words: (0..WORDS).map(|_| AtomicU32::new(NOP)).collect(),
        protected: [PROTECTED],
        lock: spin::Mutex::new(()),
        batches_written: AtomicUsize::new(0),
    };
    for e in &entries {
        if e.kind == BranchKind::Likely as usize
            && let Ok(b) = insn::b(e.site, e.target)
        {
            text.words[(e.site - BASE) / 4].store(b, Ordering::Relaxed);
        }
    }
    StaticKeys::new(
        Tables {
            arch,
            text,
            entries,
            keys,
            batches: AtomicUsize::new(0),
            sites: AtomicUsize::new(0),
        },
        NOP,
    )
}

fn snapshot(keys: &StaticKeys<Tables, 16>) -> Vec<u32> {
    let words = &keys.text().text.words;
    words.iter().map(|w| w.load(Ordering::Relaxed)).collect()
}

fn word(keys: &StaticKeys<Tables, 16>, w: usize) -> u32 {
    keys.text().text.read_insn(addr(w), 4)
}

#[test]
fn a_flip_patches_exactly_the_keys_sites_in_one_batch_with_the_right_encodings() {
    let (a, b) = (key("a"), key("b"));
    let keys = tables(
        vec![
            entry(40, 50, a, BranchKind::Unlikely),
            entry(10, 60, b, BranchKind::Unlikely),
            entry(20, 5, a, BranchKind::Likely),
            entry(30, 70, a, BranchKind::Unlikely),
        ],
        vec![a, b],
    );
    assert_eq!(keys.check(), Ok(()));
    assert_eq!(keys.sites(a).count(), 3);
    let before = snapshot(&keys);
    let syncs = keys.text().arch.syncs(0);
    keys.enable(a).unwrap();
    // patch_nosync: one write pass and one context synchronisation for the batch.
    assert_eq!(
        (
            keys.text().text.batches_written.load(Ordering::Relaxed),
            keys.text().arch.syncs(0) - syncs
        ),
        (1, 1),
        "write passes and syncs for one 3-site flip"
    );
    assert_eq!(a.count(), 1);
    assert_eq!(keys.text().batches.load(Ordering::Relaxed), 1, "one batch");
    assert_eq!(
        keys.text().sites.load(Ordering::Relaxed),
        3,
        "all three sites"
    );
    // Unlikely sites: NOP -> B to the target; the likely one: B -> NOP; b's site stays.
    assert_eq!(word(&keys, 40), insn::b(addr(40), addr(50)).unwrap());
    assert_eq!(word(&keys, 30), insn::b(addr(30), addr(70)).unwrap());
    assert_eq!(word(&keys, 20), NOP);
    assert_eq!(word(&keys, 10), NOP);
    let changed: Vec<usize> = (0..WORDS)
        .filter(|&w| snapshot(&keys)[w] != before[w])
        .collect();
    assert_eq!(changed, vec![20, 30, 40]);
    keys.disable(a).unwrap();
    assert_eq!(
        snapshot(&keys),
        before,
        "disabled again: the text as it was"
    );
    assert_eq!(keys.text().batches.load(Ordering::Relaxed), 2);
}

#[test]
fn x86_sites_flip_between_nop5_and_jmp_rel32() {
    struct X86;
    static K: StaticKey = StaticKey::new("x86");
    impl KeyText for X86 {
        type Insn = x86::Insn;
        fn entries(&self) -> &[JumpEntry] {
            &[]
        }
        fn keys(&self) -> &[&StaticKey] {
            &[]
        }
        fn text_range(&self) -> Range<usize> {
            0x20_0000..0x40_0000
        }
        fn protected_ranges(&self) -> &[Range<usize>] {
            &[]
        }
        fn nop(&self) -> x86::Insn {
            x86::nop(5).unwrap()
        }
        fn branch(&self, site: usize, target: usize) -> Result<x86::Insn, &'static str> {
            x86::jmp_rel32(site, target).map_err(|_| "rel32")
        }
        fn patch(&self, _: &[Patch<x86::Insn>]) -> Result<(), PatchError<x86::Insn>> {
            unreachable!()
        }
        fn read(&self, _: usize) -> x86::Insn {
            unreachable!()
        }
        fn now_ns(&self) -> u64 {
            0
        }
        fn relax(&self) {}
    }
    let entries = [
        JumpEntry {
            site: 0x20_1000,
            target: 0x20_1100,
            key: key_addr(&K),
            kind: BranchKind::Unlikely as usize,
        },
        JumpEntry {
            site: 0x20_2000,
            target: 0x20_1f00,
            key: key_addr(&K),
            kind: BranchKind::Likely as usize,
        },
    ];
    let filler = x86::nop(5).unwrap();
    let mut out = [Patch::new(0, filler, filler); 4];
    // The encodings of `X86`, the entries above.
    struct View<'a>(&'a [JumpEntry]);
    impl KeyText for View<'_> {
        type Insn = x86::Insn;
        fn entries(&self) -> &[JumpEntry] {
            self.0
        }
        fn keys(&self) -> &[&StaticKey] {
            &[]
        }
        fn text_range(&self) -> Range<usize> {
            X86.text_range()
        }
        fn protected_ranges(&self) -> &[Range<usize>] {
            &[]
        }
        fn nop(&self) -> x86::Insn {
            X86.nop()
        }
        fn branch(&self, site: usize, target: usize) -> Result<x86::Insn, &'static str> {
            X86.branch(site, target)
        }
        fn patch(&self, b: &[Patch<x86::Insn>]) -> Result<(), PatchError<x86::Insn>> {
            X86.patch(b)
        }
        fn read(&self, s: usize) -> x86::Insn {
            X86.read(s)
        }
        fn now_ns(&self) -> u64 {
            0
        }
        fn relax(&self) {}
    }
    let view = View(&entries);
    let n = build_batch(&view, &K, true, &mut out).unwrap();
    assert_eq!(n, 2);
    // Sorted by address; unlikely: NOP5 -> E9 rel32; likely: E9 rel32 -> NOP5.
    assert_eq!(out[0].addr, 0x20_1000);
    assert_eq!(out[0].old.bytes(), &[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    assert_eq!(out[0].new.bytes(), &[0xe9, 0xfb, 0x00, 0x00, 0x00]);
    assert_eq!(out[1].addr, 0x20_2000);
    assert_eq!(out[1].old.bytes(), &[0xe9, 0xfb, 0xfe, 0xff, 0xff]);
    assert_eq!(out[1].new.bytes(), &[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    let n = build_batch(&view, &K, false, &mut out).unwrap();
    assert_eq!((n, out[0].new, out[1].old), (2, X86.nop(), X86.nop()));
}

#[test]
fn references_patch_on_zero_to_one_and_one_to_zero_only() {
    let k = key("counted");
    let keys = tables(vec![entry(8, 9, k, BranchKind::Unlikely)], vec![k]);
    let batches = || keys.text().batches.load(Ordering::Relaxed);
    let branch = insn::b(addr(8), addr(9)).unwrap();
    for (step, (count, patched, site)) in
        [(1, 1, branch), (2, 1, branch), (1, 1, branch), (0, 2, NOP)]
            .into_iter()
            .enumerate()
    {
        if step < 2 {
            keys.inc(k).unwrap();
        } else {
            keys.dec(k).unwrap();
        }
        assert_eq!(
            (k.count(), batches(), word(&keys, 8)),
            (count, patched, site),
            "step {step}"
        );
    }
    let before = snapshot(&keys);
    let err = keys.dec(k).unwrap_err();
    assert_eq!(err, KeyError::Underflow { key: "counted" });
    assert_eq!(
        err.to_string(),
        "static key counted: dec with count 0 (unbalanced inc/dec)"
    );
    assert_eq!((k.count(), batches(), snapshot(&keys)), (0, 2, before));
    // enable/disable: set 1 and 0, whatever the count was.
    keys.inc(k).unwrap();
    keys.inc(k).unwrap();
    keys.enable(k).unwrap();
    assert_eq!((k.count(), batches()), (2, 3));
    keys.disable(k).unwrap();
    assert_eq!((k.count(), batches(), word(&keys, 8)), (0, 4, NOP));
}

#[test]
fn bad_keys_and_bad_sites_are_refused_with_nothing_changed() {
    let k = key("k");
    let rogue = key("rogue");
    let keys = tables(vec![entry(8, 9, k, BranchKind::Unlikely)], vec![k]);
    let before = snapshot(&keys);
    let err = keys.enable(rogue).unwrap_err();
    assert_eq!(
        err,
        KeyError::UnknownKey {
            addr: key_addr(rogue)
        }
    );
    assert!(err.to_string().contains("is not a static key"), "{err}");
    assert_eq!((rogue.count(), snapshot(&keys)), (0, before));

    let cases: Vec<(Vec<JumpEntry>, &str)> = vec![
        (
            vec![
                entry(8, 9, k, BranchKind::Unlikely),
                entry(10, 11, rogue, BranchKind::Unlikely),
            ],
            "names",
        ),
        (
            vec![entry(202, 9, k, BranchKind::Unlikely)],
            "never patched",
        ),
        (
            vec![JumpEntry {
                site: BASE - 64,
                target: BASE,
                key: key_addr(k),
                kind: 0,
            }],
            "outside kernel text",
        ),
        (
            vec![JumpEntry {
                kind: 7,
                ..entry(8, 9, k, BranchKind::Unlikely)
            }],
            "unknown branch kind",
        ),
        (
            (0..17)
                .map(|w| entry(w, 100, k, BranchKind::Unlikely))
                .collect(),
            "more than one batch holds",
        ),
        (
            vec![JumpEntry {
                target: addr(8) + (256 << 20),
                ..entry(8, 9, k, BranchKind::Unlikely)
            }],
            "out of B's range",
        ),
    ];
    for (entries, why) in cases {
        let keys = tables(entries, vec![k]);
        let before = snapshot(&keys);
        let err = keys.enable(k).unwrap_err();
        assert!(err.to_string().contains(why), "{why}: got {err}");
        assert_eq!(keys.check(), Err(err), "the refusal is kept");
        assert_eq!(
            (
                k.count(),
                snapshot(&keys),
                keys.text().batches.load(Ordering::Relaxed)
            ),
            (0, before, 0),
            "{why}: something changed"
        );
    }
    // A site in protected text names itself and the range.
    let keys = tables(vec![entry(202, 9, k, BranchKind::Unlikely)], vec![k]);
    assert_eq!(
        check_tables(keys.text(), 16),
        Err(KeyError::SiteProtected {
            site: addr(202),
            key: "k",
            range: (PROTECTED.start, PROTECTED.end)
        })
    );
}

#[test]
fn a_patch_the_text_refuses_changes_neither_count_nor_text() {
    let k = key("stale");
    let keys = tables(vec![entry(8, 9, k, BranchKind::Unlikely)], vec![k]);
    // Someone else changed the site: the old instruction no longer matches.
    keys.text().text.words[8].store(insn::movz_x(0, 1, 0).unwrap(), Ordering::Relaxed);
    let before = snapshot(&keys);
    match keys.enable(k) {
        Err(KeyError::Patch {
            error: PatchError::OldMismatch { .. },
            ..
        }) => {}
        other => panic!("got {other:?}"),
    }
    assert_eq!((k.count(), snapshot(&keys)), (0, before));
}

#[test]
fn threads_flipping_keys_at_once_keep_counts_and_text_in_step() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 2000;
    let (a, b) = (key("shared_a"), key("shared_b"));
    let keys = Arc::new(tables(
        (0..8)
            .map(|w| {
                entry(
                    w,
                    100 + w,
                    if w % 2 == 0 { a } else { b },
                    BranchKind::Unlikely,
                )
            })
            .collect(),
        vec![a, b],
    ));
    // The highest count any thread saw while holding a reference: at least 2 means
    // two threads really held the same key at once.
    let most = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (keys, most) = (keys.clone(), most.clone());
            thread::spawn(move || {
                keys.text().arch.bind_current_thread(t);
                let branch = |w: usize| insn::b(addr(w), addr(100 + w)).unwrap();
                for round in 0..ROUNDS {
                    let key = if (round + t) % 2 == 0 { a } else { b };
                    keys.inc(key).unwrap();
                    // Holding a reference: every site of the key is the branch, whatever
                    // the other threads do.
                    for w in (0..8).filter(|w| (w % 2 == 0) == std::ptr::eq(key, a)) {
                        assert_eq!(word(&keys, w), branch(w), "site {w} with a reference held");
                    }
                    let count = key.count();
                    assert!(count >= 1);
                    most.fetch_max(count, Ordering::Relaxed);
                    if round % 16 == 0 {
                        thread::yield_now();
                    }
                    keys.dec(key).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!((a.count(), b.count()), (0, 0));
    assert!(
        (0..8).all(|w| word(&keys, w) == NOP),
        "every site disabled at the end"
    );
    let batches = keys.text().batches.load(Ordering::Relaxed);
    assert_eq!(batches % 2, 0, "every 0 -> 1 batch has its 1 -> 0 batch");
    assert_eq!(batches, keys.flips());
    assert!(batches >= 4, "both keys flipped at least once each way");
    assert!(
        most.load(Ordering::Relaxed) >= 2,
        "no two threads ever held a key at once: nothing concurrent was tested"
    );
}
