//! The identity map with W^X, and the text-patching alias.
//!
//! 0..64 MiB (the image with MAX_CPUS stacks and their guards) is mapped with 4 KiB pages: kernel text read-only and executable, the AP
//! trampoline page read-only and executable, page 0 and the stack guard pages absent
//! (null pointers and stack overflows fault), and
//! everything else (rodata read-only) non-executable. 64 MiB..4 GiB (RAM, ACPI tables,
//! the xAPIC page) is 2 MiB pages, read-write, non-executable. Only `.user_text`
//! (read-only, executable) and `.user_data` (read-write, NX) have U/S set in their
//! leaves: ring 3 reaches nothing else. CR0.WP makes read-only
//! binding for the kernel too: text is never writable through the identity map.
//!
//! [`poke_text`] writes text through a temporary alias at [`ALIAS_VA`]: the one or two
//! 4 KiB pages a write touches, mapped read-write and non-executable for its duration,
//! visible to the poking CPU only. Linux's `text_poke` gets that from `poking_mm`, an address
//! space only the poking CPU loads. Here every CPU runs on a PML4 of its own (all of
//! them share the identity map's PDPT), and the alias is linked into the poking CPU's
//! own PML4, in a slot nobody else's uses, for the length of one poke. No other CPU
//! ever walks a table that maps the alias, so none can cache it, and the write needs
//! neither a TLB shootdown nor a CR3 load: unlinking it and an `invlpg` of the alias
//! pages (which also empties this CPU's paging-structure caches) drop this CPU's
//! copies.

use super::{cpu, layout, timer};
use crate::MAX_CPUS;
use crate::stop::lock_within;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

const P: u64 = 1;
const RW: u64 = 1 << 1;
/// U/S: ring 3 may use the page (needed at every level; set on the upper levels of the
/// small range, and on the leaves of `.user_text` and `.user_data` only).
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const SMALL_LIMIT: usize = 64 << 20;
/// Where the writable alias of kernel text appears: PML4 slot 1 (512 GiB), a slot the
/// kernel's own PML4 leaves empty.
pub const ALIAS_VA: usize = 0x80_0000_0000;
/// The PML4 slot of [`ALIAS_VA`].
const ALIAS_PML4_SLOT: usize = ALIAS_VA >> 39;

#[repr(C, align(4096))]
struct Table([AtomicU64; 512]);

const fn table() -> Table {
    Table([const { AtomicU64::new(0) }; 512])
}

impl Table {
    fn addr(&self) -> u64 {
        self as *const Table as u64
    }
}

static PML4: Table = table();
static PDPT: Table = table();
static PD: [Table; 4] = [const { table() }; 4];
static PT: [Table; SMALL_LIMIT >> 21] = [const { table() }; SMALL_LIMIT >> 21];
/// Each CPU's own PML4: the identity map, plus the alias while that CPU pokes.
static CPU_PML4: [Table; MAX_CPUS] = [const { table() }; MAX_CPUS];
static ALIAS_PDPT: Table = table();
static ALIAS_PD: Table = table();
static ALIAS_PT: Table = table();

/// Serialises alias users; taken with interrupts off.
static ALIAS_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Page tables the boot assembly uses before [`init`]. Exposed for `boot.rs`.
#[repr(C, align(4096))]
pub struct BootTable(pub UnsafeCell<[u64; 512]>);
// SAFETY: written only by the boot assembly before Rust runs, then read by the MMU.
unsafe impl Sync for BootTable {}

/// Boot-time PML4 (first GiB identity-mapped with 2 MiB pages).
pub static BOOT_PML4: BootTable = BootTable(UnsafeCell::new([0; 512]));
/// Boot-time PDPT.
pub static BOOT_PDPT: BootTable = BootTable(UnsafeCell::new([0; 512]));
/// Boot-time PD.
pub static BOOT_PD: BootTable = BootTable(UnsafeCell::new([0; 512]));

/// Builds the final map and switches to it. Boot CPU, once, before secondaries start
/// (they load [`cr3`] from the trampoline).
pub fn init() {
    let (ts, te) = layout::text();
    let (rs, re) = layout::rodata();
    assert!(
        layout::image_end() <= SMALL_LIMIT,
        "kernel image ends at {:#x}, beyond the 4 KiB-mapped {:#x}",
        layout::image_end(),
        SMALL_LIMIT
    );
    let tramp = layout::TRAMPOLINE_BASE;
    let (user_text, user_data) = (layout::user_text(), layout::user_data());
    // Relaxed stores: the MMU does not walk these tables until the CR3 write below,
    // which is serialising.
    for (i, pt) in PT.iter().enumerate() {
        for (j, e) in pt.0.iter().enumerate() {
            let pa = (i << 21) | (j << 12);
            let flags = if pa == 0 || layout::is_stack_guard(pa) {
                0
            } else if user_text.contains(&pa) {
                P | US
            } else if user_data.contains(&pa) {
                P | RW | US | NX
            } else if (ts..te).contains(&pa) || pa == tramp {
                P
            } else if (rs..re).contains(&pa) {
                P | NX
            } else {
                P | RW | NX
            };
            e.store(
                if flags == 0 { 0 } else { pa as u64 | flags },
                Ordering::Relaxed,
            );
        }
    }
    for (i, pd) in PD.iter().enumerate() {
        for (j, e) in pd.0.iter().enumerate() {
            let pa = (i << 30) | (j << 21);
            let v = if pa < SMALL_LIMIT {
                PT[pa >> 21].addr() | P | RW | US
            } else {
                pa as u64 | P | RW | PS | NX
            };
            e.store(v, Ordering::Relaxed);
        }
        PDPT.0[i].store(pd.addr() | P | RW | US, Ordering::Relaxed);
    }
    PML4.0[0].store(PDPT.addr() | P | RW | US, Ordering::Relaxed);
    ALIAS_PD.0[0].store(ALIAS_PT.addr() | P | RW, Ordering::Relaxed);
    ALIAS_PDPT.0[0].store(ALIAS_PD.addr() | P | RW, Ordering::Relaxed);
    for pml4 in &CPU_PML4 {
        pml4.0[0].store(PDPT.addr() | P | RW | US, Ordering::Relaxed);
    }
    load();
}

/// The physical address of the shared PML4 the AP trampoline starts with (the final
/// identity map; never the alias).
pub fn cr3() -> u64 {
    PML4.addr()
}

/// Switches the calling CPU to its own PML4 (the final map). Once per CPU, after
/// [`init`] and after the CPU knows its index.
pub fn load() {
    let own = CPU_PML4[cpu::current_cpu()].addr();
    // SAFETY: every CPU's PML4 identity-maps everything the kernel touches (image,
    // stacks, low memory, ACPI, the APIC) with at least the permissions it needs.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) own, options(nostack)) };
}

/// Whether any alias page is mapped (it must not be outside [`poke_text`]).
pub fn alias_mapped() -> bool {
    ALIAS_PT.0[..2]
        .iter()
        .any(|e| e.load(Ordering::Relaxed) != 0)
}

/// Writes `bytes` over kernel text at `addr` through the temporary writable alias.
/// Other CPUs must serialise (`cpuid`) before running the new bytes.
///
/// # Safety
/// - No CPU may execute `[addr, addr + len)` while it changes (e.g. the machine is
///   stopped), except as x86's cross-modifying-code rules allow: one byte becoming or
///   ceasing to be an INT3 whose handler covers the site, as [`text_poke_bp`] does.
/// - `[addr, addr + len)` must not be in `.text.nopatch` unless nothing executes that
///   code meanwhile, and must hold whole instructions once the write is done.
/// - The calling CPU runs on its own PML4 ([`load`] ran on it).
///
/// # Panics
/// If `[addr, addr + len)` is not inside kernel text or crosses more than one page
/// boundary.
///
/// [`text_poke_bp`]: super::text_poke::text_poke_bp
#[unsafe(link_section = ".text.nopatch")]
pub unsafe fn poke_text(addr: usize, bytes: &[u8]) {
    let (ts, te) = layout::text();
    let end = addr
        .checked_add(bytes.len())
        .expect("poke_text: address overflow");
    assert!(
        addr >= ts && end <= te,
        "poke_text: {addr:#x}..{end:#x} is outside kernel text {ts:#x}..{te:#x}"
    );
    let page = addr & !0xfff;
    assert!(end <= page + 0x2000, "poke_text: more than two pages");
    // Only the pages the write touches: each mapped page costs an `invlpg` on the way
    // out (under QEMU also a TLB refill), and most writes stay within one page.
    let pages = if end <= page + 0x1000 { 1 } else { 2 };
    // SAFETY: `page` is a page of kernel text (checked above); what is written through
    // the alias is the caller's write, which it is allowed to make.
    let alias = unsafe { TextAlias::map_pages(page, pages) };
    let dst = alias.addr() + (addr - page);
    // Bytes up to an 8-byte boundary, then whole quadwords, then the tail: one store per
    // quadword, not per byte (under QEMU each store to a page holding translated code
    // takes the slow self-modifying-code path, so a 1000-site batch costs 5x less).
    let head = dst.next_multiple_of(8).wrapping_sub(dst).min(bytes.len());
    let (head, rest) = bytes.split_at_checked(head).unwrap_or((bytes, &[]));
    let words = rest.chunks_exact(8);
    let tail = words.remainder();
    let store_bytes = |at: usize, part: &[u8]| {
        for (i, &byte) in part.iter().enumerate() {
            // SAFETY: `at + i` lies in the alias pages just mapped read-write onto kernel
            // text (the write is inside them, checked above); a single byte.
            unsafe { ((at + i) as *mut u8).write_volatile(byte) };
        }
    };
    store_bytes(dst, head);
    let mut at = dst + head.len();
    for word in words {
        let word = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        // SAFETY: at..at+8 lies in the alias pages (as above) and is 8-byte aligned;
        // volatile so the store is not elided.
        unsafe { (at as *mut u64).write_volatile(word) };
        at += 8;
    }
    store_bytes(at, tail);
    drop(alias);
}

/// The text alias, mapped on this CPU only: [`TextAlias::map`] links the alias tables
/// into this CPU's own PML4 and maps two pages ([`TextAlias::map_pages`]: one or two) of
/// kernel text writable at
/// [`ALIAS_VA`]; dropping it unlinks and flushes them. Interrupts stay off and the alias
/// lock held meanwhile.
pub struct TextAlias {
    pml4_slot: &'static AtomicU64,
    /// Alias pages mapped (1 or 2).
    pages: usize,
    saved_flags: u64,
    lock: Option<spin::MutexGuard<'static, ()>>,
}

impl TextAlias {
    /// Maps the two pages from `page` at [`ALIAS_VA`] on this CPU.
    ///
    /// # Safety
    /// The caller makes through the alias only writes it is allowed to make to that
    /// text (see [`poke_text`]); the calling CPU runs on its own PML4 ([`load`] ran on
    /// it).
    ///
    /// # Panics
    /// If `page` is not page-aligned inside kernel text, or the alias lock stays held
    /// for a second.
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(never)]
    pub unsafe fn map(page: usize) -> TextAlias {
        // SAFETY: forwarded from the caller.
        unsafe { Self::map_pages(page, 2) }
    }

    /// Maps `pages` (1 or 2; more are capped at 2) pages from `page` at [`ALIAS_VA`] on
    /// this CPU.
    ///
    /// # Safety
    /// As for [`map`](Self::map).
    ///
    /// # Panics
    /// As for [`map`](Self::map).
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(never)]
    pub unsafe fn map_pages(page: usize, pages: usize) -> TextAlias {
        let pages = pages.clamp(1, 2);
        let (ts, te) = layout::text();
        assert!(
            page.is_multiple_of(0x1000) && page >= ts && page < te,
            "TextAlias::map: {page:#x} is not a kernel text page"
        );
        let saved_flags = cpu::cli_save();
        // Bounded: the holder keeps it for a few stores with interrupts off.
        let lock = match lock_within(
            &ALIAS_LOCK,
            "the text alias lock",
            1_000_000_000,
            timer::now_ns,
            cpu::pause,
        ) {
            Ok(guard) => guard,
            Err(timeout) => panic!("poke_text: {timeout}"),
        };
        // Relaxed: only this CPU walks these tables (its own PML4 is the only one that
        // links them, from here to the drop), and its next access to the alias comes
        // after these stores in program order. The slot and the entries were invalid,
        // and invalid entries are never cached: nothing to invalidate first.
        for (i, entry) in ALIAS_PT.0.iter().take(pages).enumerate() {
            entry.store((page + i * 0x1000) as u64 | P | RW | NX, Ordering::Relaxed);
        }
        // `current_cpu() < MAX_CPUS` (set_cpu_index checks); the modulo keeps the
        // bounds-check panic, a call out of `.text.nopatch`, out of the code.
        let pml4_slot = &CPU_PML4[cpu::current_cpu() % MAX_CPUS].0[ALIAS_PML4_SLOT];
        pml4_slot.store(ALIAS_PDPT.addr() | P | RW, Ordering::Relaxed);
        TextAlias {
            pml4_slot,
            pages,
            saved_flags,
            lock: Some(lock),
        }
    }

    /// The alias's address ([`ALIAS_VA`]): `page` appears there.
    pub fn addr(&self) -> usize {
        ALIAS_VA
    }
}

impl Drop for TextAlias {
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(never)]
    fn drop(&mut self) {
        self.pml4_slot.store(0, Ordering::Relaxed);
        // Only the pages `map_pages` filled: an entry never made valid is in no TLB.
        for (i, entry) in ALIAS_PT.0.iter().take(self.pages).enumerate() {
            entry.store(0, Ordering::Relaxed);
            // Drops this CPU's TLB entry for the page and, INVLPG being what it is, every
            // paging-structure-cache entry of this CPU (SDM 4.10.4.1).
            cpu::invlpg(ALIAS_VA + i * 0x1000);
        }
        // The new bytes run on this CPU from here on.
        cpu::serialize();
        // Unlock before interrupts come back: a handler must not find it held.
        drop(self.lock.take());
        cpu::restore_if(self.saved_flags);
    }
}

/// Whether the page tables at `cr3` map `va` writable (every level present and
/// writable). A software walk: on the CPU that loaded `cr3`, a translation absent here
/// can be in no TLB either, because no table it ever walked held it.
pub fn maps_writable(cr3: u64, va: usize) -> bool {
    let mut table = cr3 & 0x000f_ffff_ffff_f000;
    for level in (0..4).rev() {
        let index = (va >> (12 + 9 * level)) & 0x1ff;
        // SAFETY: page tables are identity-mapped statics; entries are aligned u64s
        // only ever stored whole (atomically).
        let entry = unsafe { AtomicU64::from_ptr((table + index as u64 * 8) as *mut u64) }
            .load(Ordering::Relaxed);
        if entry & P == 0 || entry & RW == 0 {
            return false;
        }
        if level == 0 || entry & PS != 0 {
            return true;
        }
        table = entry & 0x000f_ffff_ffff_f000;
    }
    false
}

/// The calling CPU's CR3.
pub fn current_cr3() -> u64 {
    let cr3: u64;
    // SAFETY: reads a control register.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    cr3
}
