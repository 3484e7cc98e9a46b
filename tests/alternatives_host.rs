//! Alternatives tables on the host: entry decoding, every refusal of `check_table`
//! (and that a refused table changes nothing), NOP padding, batch building, the boot
//! path without a stop and the runtime path through `patch_machine`.

#![allow(clippy::result_large_err)]
// One protected range each, as `Text::protected_ranges` returns a slice of them.
#![allow(clippy::single_range_in_vec_init)]

use patch_machine::arch::host::HostArch;
use patch_machine::patch::Text;
use patch_machine::patch::alternatives::{
    AltEntry, AltError, Alternatives, Bounds, Class, Features, Snapshot, Tables, build_batch,
    check_table,
};
use patch_machine::patch::insn::{self, NOP};
use patch_machine::patch::x86;
use patch_machine::stop::{Arch, StopMachine};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::thread;

const WORDS: usize = 64;
/// Words 48..64 play `.text.nopatch`.
const NOPATCH_WORDS: Range<usize> = 48..64;

/// One leaked block that holds every fake text, table and replacement, so that the
/// entries' 32-bit offsets reach (the heap's allocations may lie terabytes apart).
fn carve(len: usize) -> usize {
    static ARENA: std::sync::Mutex<(usize, usize)> = std::sync::Mutex::new((0, 0));
    const SIZE: usize = 1 << 20;
    let mut arena = ARENA.lock().unwrap();
    if arena.0 == 0 {
        arena.0 = Box::leak(vec![0u64; SIZE / 8].into_boxed_slice()).as_ptr() as usize;
    }
    let at = arena.0 + arena.1;
    arena.1 += len.div_ceil(8) * 8;
    assert!(arena.1 <= SIZE, "test arena exhausted");
    at
}

/// Kernel text as real memory (alternative entries hold offsets to real addresses).
struct WordText {
    words: &'static [AtomicU32],
    protected: [Range<usize>; 1],
    lock: spin::Mutex<()>,
    arch: Option<HostArch>,
    writes: AtomicUsize,
    unmasked_write: AtomicBool,
}

impl WordText {
    fn new(arch: Option<HostArch>) -> &'static WordText {
        let at = carve(WORDS * 4);
        // SAFETY: `carve` hands out fresh, 8-aligned, zeroed, never-freed memory.
        let words: &'static [AtomicU32] =
            unsafe { std::slice::from_raw_parts(at as *const AtomicU32, WORDS) };
        for (i, word) in words.iter().enumerate() {
            word.store(insn::movz_x(0, i as u16, 0).unwrap(), Ordering::Relaxed);
        }
        let base = words.as_ptr() as usize;
        let protected = [base + NOPATCH_WORDS.start * 4..base + NOPATCH_WORDS.end * 4];
        Box::leak(Box::new(WordText {
            words,
            protected,
            lock: spin::Mutex::new(()),
            arch,
            writes: AtomicUsize::new(0),
            unmasked_write: AtomicBool::new(false),
        }))
    }

    fn addr(&self, word: usize) -> usize {
        self.words.as_ptr() as usize + word * 4
    }

    fn word(&self, word: usize) -> u32 {
        self.words[word].load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> Vec<u32> {
        (0..WORDS).map(|i| self.word(i)).collect()
    }

    fn nopatch(&self) -> Range<usize> {
        self.protected[0].clone()
    }
}

// SAFETY: real memory; every address in `text_range` is backed; stores are atomic.
unsafe impl Text for WordText {
    type Insn = u32;

    fn text_range(&self) -> Range<usize> {
        self.addr(0)..self.addr(WORDS)
    }
    fn protected_ranges(&self) -> &[Range<usize>] {
        &self.protected
    }
    fn read_insn(&self, addr: usize, _len: usize) -> u32 {
        self.word((addr - self.addr(0)) / 4)
    }
    unsafe fn write_insn(&self, addr: usize, insn: u32) {
        if let Some(arch) = &self.arch {
            let me = arch.cpu_id();
            if arch
                .online_cpus()
                .iter()
                .any(|c| c != me && !arch.is_masked(c))
            {
                self.unmasked_write.store(true, Ordering::Relaxed);
            }
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.words[(addr - self.addr(0)) / 4].store(insn, Ordering::Relaxed);
    }
    fn sync_icache(&self, _range: Range<usize>) {}
    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.lock
    }
}

/// x86 text: bytes of real memory.
struct ByteText {
    bytes: &'static [AtomicU8],
    protected: [Range<usize>; 1],
    lock: spin::Mutex<()>,
}

impl ByteText {
    fn new(len: usize) -> &'static ByteText {
        // SAFETY: as in `WordText::new`.
        let bytes: &'static [AtomicU8] =
            unsafe { std::slice::from_raw_parts(carve(len) as *const AtomicU8, len) };
        for byte in bytes {
            byte.store(0xcc, Ordering::Relaxed);
        }
        let end = bytes.as_ptr() as usize + len;
        Box::leak(Box::new(ByteText {
            bytes,
            protected: [end - 16..end],
            lock: spin::Mutex::new(()),
        }))
    }
    fn addr(&self, i: usize) -> usize {
        self.bytes.as_ptr() as usize + i
    }
    fn put(&self, at: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.bytes[at + i].store(*b, Ordering::Relaxed);
        }
    }
    fn get(&self, at: usize, len: usize) -> Vec<u8> {
        (at..at + len)
            .map(|i| self.bytes[i].load(Ordering::Relaxed))
            .collect()
    }
}

// SAFETY: real memory; every address in `text_range` is backed.
unsafe impl Text for ByteText {
    type Insn = x86::Insn;

    fn text_range(&self) -> Range<usize> {
        self.addr(0)..self.addr(self.bytes.len())
    }
    fn protected_ranges(&self) -> &[Range<usize>] {
        &self.protected
    }
    fn read_insn(&self, addr: usize, len: usize) -> x86::Insn {
        x86::Insn::from_bytes(&self.get(addr - self.addr(0), len)).unwrap()
    }
    unsafe fn write_insn(&self, addr: usize, insn: x86::Insn) {
        self.put(addr - self.addr(0), insn.bytes());
    }
    fn sync_icache(&self, _range: Range<usize>) {}
    fn writer_lock(&self) -> &spin::Mutex<()> {
        &self.lock
    }
}

/// One entry to build: site address, replacement address, feature, lengths.
type Spec = (usize, usize, u16, u8, u8);

/// A table in real (leaked) memory whose offsets point at the given sites.
fn table(specs: &[Spec]) -> &'static [AltEntry] {
    let at = carve(specs.len() * std::mem::size_of::<AltEntry>());
    // SAFETY: fresh arena memory, aligned, as long as the table; zero is a valid entry.
    let entries: &'static mut [AltEntry] =
        unsafe { std::slice::from_raw_parts_mut(at as *mut AltEntry, specs.len()) };
    for (entry, &(site, repl, feature, site_len, repl_len)) in entries.iter_mut().zip(specs) {
        let here = entry as *const AltEntry as usize;
        // SAFETY: stored at `here`; every replacement is arena bytes that never change.
        *entry = unsafe { AltEntry::at(here, site, repl, feature, (site_len, repl_len)) };
    }
    entries
}

/// Replacement code: data outside the text.
fn replacement(words: &[u32]) -> usize {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes_at(&bytes)
}

fn bytes_at(bytes: &[u8]) -> usize {
    let at = carve(bytes.len());
    // SAFETY: fresh arena memory of this length, written before anyone reads it.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
    at
}

fn movz(value: u16) -> u32 {
    insn::movz_x(0, value, 0).unwrap()
}

const LSE: u16 = 0;
const OTHER: u16 = 1;
const NAMES: [(u16, &str); 2] = [(LSE, "lse"), (OTHER, "other")];

fn bounds(text: &WordText) -> Bounds<'_> {
    Bounds {
        text: text.text_range(),
        nopatch: text.nopatch(),
        protected: text.protected_ranges(),
        known: Features::NONE.with(LSE).with(OTHER),
    }
}

#[test]
fn an_entry_decodes_to_the_addresses_it_was_built_from() {
    let text = WordText::new(None);
    let repl = replacement(&[NOP, NOP]);
    let t = table(&[(text.addr(3), repl, OTHER, 8, 8)]);
    assert_eq!(t[0].site(), text.addr(3));
    assert_eq!(t[0].replacement(), repl);
    assert_eq!(t[0].site_range(), text.addr(3)..text.addr(5));
    assert_eq!((t[0].feature, t[0].site_len, t[0].repl_len), (OTHER, 8, 8));
    assert_eq!(std::mem::size_of::<AltEntry>(), 12);
}

#[test]
fn every_kind_of_bad_entry_is_refused_with_its_reason() {
    let text = WordText::new(None);
    let repl = replacement(&[NOP; 8]);
    let check = |specs: &[Spec], class| check_table::<u32>(table(specs), class, &bounds(text));
    let good = (text.addr(2), repl, LSE, 8, 8);
    assert_eq!(check(&[good], Class::Runtime), Ok(()));
    assert!(matches!(
        check(&[(text.addr(2), repl, LSE, 8, 4)], Class::Runtime),
        Err(AltError::LengthMismatch {
            index: 0,
            site_len: 8,
            repl_len: 4,
            ..
        })
    ));
    assert!(matches!(
        check(&[good, (text.addr(10), repl, LSE, 0, 0)], Class::Runtime),
        Err(AltError::BadLength {
            index: 1,
            len: 0,
            ..
        })
    ));
    assert!(matches!(
        check(&[(text.addr(2) + 2, repl, LSE, 8, 8)], Class::Runtime),
        Err(AltError::Misaligned { index: 0, .. })
    ));
    assert!(matches!(
        check(&[(text.addr(WORDS - 1), repl, LSE, 8, 8)], Class::Boot),
        Err(AltError::SiteOutsideText { index: 0, .. })
    ));
    assert!(matches!(
        check(&[(text.addr(2), text.addr(20), LSE, 8, 8)], Class::Runtime),
        Err(AltError::ReplacementInText { index: 0, .. })
    ));
    assert!(matches!(
        check(&[(text.addr(2), repl, 7, 8, 8)], Class::Runtime),
        Err(AltError::UnknownFeature {
            index: 0,
            feature: 7
        })
    ));
    assert!(matches!(
        check(&[good, (text.addr(3), repl, LSE, 8, 8)], Class::Runtime),
        Err(AltError::Overlap {
            index: 1,
            first: 0,
            ..
        })
    ));
    // A runtime site in the code the rendezvous runs, and a boot site outside it.
    let in_nopatch = (text.addr(50), repl, LSE, 8, 8);
    let err = check(&[good, in_nopatch], Class::Runtime).unwrap_err();
    assert!(matches!(
        err,
        AltError::RuntimeSiteProtected { index: 1, .. }
    ));
    assert!(err.to_string().contains("use the boot form"), "{err}");
    let err = check(&[in_nopatch, good], Class::Boot).unwrap_err();
    assert!(matches!(
        err,
        AltError::BootSiteOutsideNopatch { index: 1, .. }
    ));
    assert!(err.to_string().contains("outside .text.nopatch"), "{err}");
    assert_eq!(check(&[in_nopatch], Class::Boot), Ok(()));
}

#[test]
fn a_batch_writes_only_what_the_features_call_for_and_can_be_reverted() {
    let text = WordText::new(None);
    let lse = replacement(&[movz(100), movz(101)]);
    let other = replacement(&[movz(200)]);
    let t = table(&[
        (text.addr(4), lse, LSE, 8, 8),
        (text.addr(10), other, OTHER, 4, 4),
    ]);
    check_table::<u32>(t, Class::Runtime, &bounds(text)).unwrap();
    let snapshot = Snapshot::take(text, t);
    let mut out = [patch_machine::patch::Patch::new(0, NOP, NOP); 16];
    let n = build_batch(text, t, &snapshot, Features::NONE.with(LSE), &mut out).unwrap();
    assert_eq!(n, 2, "two words of the LSE site, nothing of the other");
    assert_eq!(
        (out[0].addr, out[0].old, out[0].new),
        (text.addr(4), movz(4), movz(100))
    );
    assert_eq!((out[1].addr, out[1].new), (text.addr(5), movz(101)));
    // SAFETY: one thread: nothing executes the fake text.
    unsafe { text.write_batch(&out[..n]) };
    // Applied once: nothing left to do. Back to no features: the originals return.
    let again = build_batch(text, t, &snapshot, Features::NONE.with(LSE), &mut out).unwrap();
    assert_eq!(again, 0);
    let back = build_batch(text, t, &snapshot, Features::NONE, &mut out).unwrap();
    assert_eq!(back, 2);
    assert_eq!((out[0].old, out[0].new), (movz(100), movz(4)));
}

#[test]
fn x86_replacements_are_padded_with_nops_and_may_not_be_longer() {
    let text = ByteText::new(64);
    text.put(0, &[0x65, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0]); // mov rax, gs:[0]
    let rdpid = bytes_at(&[0xf3, 0x0f, 0xc7, 0xf8]);
    let t = table(&[(text.addr(0), rdpid, 0, 9, 4)]);
    let bounds = Bounds {
        text: text.text_range(),
        nopatch: text.protected_ranges()[0].clone(),
        protected: text.protected_ranges(),
        known: Features::NONE.with(0),
    };
    check_table::<x86::Insn>(t, Class::Runtime, &bounds).unwrap();
    let snapshot = Snapshot::take(text, t);
    let nop = x86::nop(1).unwrap();
    let mut out = [patch_machine::patch::Patch::new(0, nop, nop); 8];
    let n = build_batch(text, t, &snapshot, Features::NONE.with(0), &mut out).unwrap();
    // SAFETY: one thread.
    unsafe { text.write_batch(&out[..n]) };
    let mut expected = vec![0xf3, 0x0f, 0xc7, 0xf8];
    expected.extend_from_slice(x86::nop(5).unwrap().bytes());
    assert_eq!(text.get(0, 9), expected);
    let too_long = table(&[(text.addr(20), rdpid, 0, 3, 4)]);
    assert!(matches!(
        check_table::<x86::Insn>(too_long, Class::Runtime, &bounds),
        Err(AltError::LengthMismatch {
            site_len: 3,
            repl_len: 4,
            ..
        })
    ));
}

fn tables(text: &WordText, boot: &'static [AltEntry], runtime: &'static [AltEntry]) -> Tables {
    Tables {
        boot,
        runtime,
        nopatch: text.nopatch(),
    }
}

#[test]
fn boot_sites_are_written_without_a_stop_and_a_bad_table_writes_nothing() {
    let arch = HostArch::new(1);
    arch.bind_current_thread(0);
    let text = WordText::new(Some(arch.clone()));
    let alts: &'static Alternatives<WordText, 64> =
        Box::leak(Box::new(Alternatives::new(text, &NAMES, OTHER, NOP)));
    let lse = replacement(&[movz(300), movz(301)]);
    let boot = table(&[(text.addr(50), lse, LSE, 8, 8)]);
    // A runtime site inside nopatch: the whole thing is refused before any write.
    let bad_runtime = table(&[(text.addr(56), lse, LSE, 8, 8)]);
    let before = text.snapshot();
    // SAFETY: one CPU.
    let err =
        unsafe { alts.apply_boot(&tables(text, boot, bad_runtime), Features::NONE.with(LSE)) }
            .unwrap_err();
    assert!(
        matches!(err, AltError::RuntimeSiteProtected { .. }),
        "{err}"
    );
    assert_eq!(text.snapshot(), before, "a refused table changed the text");
    assert_eq!(text.writes.load(Ordering::Relaxed), 0);
    assert!(alts.status().1.is_err());

    let alts: &'static Alternatives<WordText, 64> =
        Box::leak(Box::new(Alternatives::new(text, &NAMES, OTHER, NOP)));
    // SAFETY: one CPU.
    let written =
        unsafe { alts.apply_boot(&tables(text, boot, &[]), Features::NONE.with(LSE)) }.unwrap();
    assert_eq!(written, 2);
    assert_eq!((text.word(50), text.word(51)), (movz(300), movz(301)));
}

#[test]
fn runtime_sites_go_through_patch_machine_with_every_cpu_masked() {
    const CPUS: usize = 3;
    let stop = Arc::new(StopMachine::new(HostArch::new(CPUS)));
    HostArch::connect(&stop);
    let text = WordText::new(Some(stop.arch().clone()));
    let quit = Arc::new(AtomicBool::new(false));
    let others: Vec<_> = (1..CPUS)
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
    stop.arch().bind_current_thread(0);
    let alts: &'static Alternatives<WordText, 64> =
        Box::leak(Box::new(Alternatives::new(text, &NAMES, OTHER, NOP)));
    let lse = replacement(&[movz(400)]);
    let bench = replacement(&[movz(500)]);
    let runtime = table(&[
        (text.addr(8), lse, LSE, 4, 4),
        (text.addr(9), bench, OTHER, 4, 4),
    ]);
    let t = tables(text, &[], runtime);
    // SAFETY: the other CPUs only poll for stop IPIs; none runs the fake text.
    unsafe { alts.apply_boot(&t, Features::NONE.with(LSE)) }.unwrap();
    assert_eq!(text.word(8), movz(8), "boot must leave runtime sites alone");
    assert_eq!(alts.apply_runtime(&stop, &t), Ok(1));
    assert_eq!(text.word(8), movz(400));
    assert_eq!(alts.status().1, Ok(()));
    // The benchmark's feature (here OTHER) on and off again.
    assert_eq!(alts.flip_bench(&stop, &t, true), Ok(1));
    assert_eq!(text.word(9), movz(500));
    assert_eq!(alts.flip_bench(&stop, &t, false), Ok(1));
    assert_eq!(text.word(9), movz(9));
    let mut seen = Vec::new();
    alts.sites(&t, &mut |site| {
        seen.push((site.index, site.wanted, site.in_text))
    });
    assert_eq!(seen, [(0, true, Some(true)), (1, false, Some(false))]);
    assert!(
        !text.unmasked_write.load(Ordering::Relaxed),
        "a runtime site was written while another CPU was unmasked"
    );
    quit.store(true, Ordering::Relaxed);
    for t in others {
        t.join().unwrap();
    }
}
