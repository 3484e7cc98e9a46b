//! The MMU: one identity map shared by every CPU, built with aarch64-paging from a
//! static pool of page-table pages (no heap), and the text-patching alias in a
//! translation table of its own that only the patching CPU ever walks.
//!
//! # The map (4 KiB granule, 39-bit VA, TTBR0, ASID 0, global entries)
//!
//! | range                        | attributes                           |
//! |------------------------------|--------------------------------------|
//! | RAM (DTB memory nodes)       | Normal WB, RW, XN (PXN+UXN)          |
//! | the DTB blob                 | Normal WB, read-only, XN             |
//! | kernel text (`.text*`)       | Normal WB, read-only, executable     |
//! | `.rodata`                    | Normal WB, read-only, XN             |
//! | `.data`, stacks, `.bss`      | Normal WB, RW, XN                    |
//! | stack guard pages            | unmapped                             |
//! | GICD, GICR, PL011 (from DTB) | Device-nGnRnE, RW, XN                |
//! | `.user_text`                 | Normal WB, read-only, EL0 executable only (PXN) |
//! | `.user_data`                 | Normal WB, EL0 and EL1 RW, XN        |
//!
//! Every other entry has AP\[1\] = 0: EL0 can neither read nor write it.
//! | [`ALIAS_VA`] (one page, TTBR1) | only in [`poke_text`], only on its CPU |
//!
//! No page is both writable and executable, and SCTLR_EL1.WXN is set as well, so the
//! hardware treats any writable page as execute-never regardless of its entry.
//!
//! # Patching text
//!
//! Text stays read-only. [`poke_text`] maps the physical page holding the target at
//! [`ALIAS_VA`] as writable, non-executable normal memory, stores the word through it
//! and removes the alias again. Linux's arm64 `patch_map()` puts that alias in the
//! shared kernel tables (a fixmap slot), where any CPU's walker may cache it
//! speculatively, so its unmap needs a broadcast `TLBI VAALE1IS` and a `DSB ISH` that
//! waits for every CPU. Here the alias lives in the upper half (TTBR1), and every CPU's
//! TTBR1_EL1 points at an empty root, except the patching CPU's for the length of one
//! poke (x86's `text_poke` does the same with its private `poking_mm`):
//! - map: `TTBR1_EL1` = the alias root, `ISB`; write the valid level-3 entry (invalid
//!   -> valid: no break-before-make), `DSB ISHST` (visible to the walker), `ISB`;
//! - unmap: write the invalid entry, `DSB ISHST` (entry and data stores complete),
//!   `TTBR1_EL1` = the empty root, `ISB` (no walk of ours reaches the alias tables any
//!   more), then `TLBI VAE1` for the alias VA (this CPU only, every level: the
//!   walk-cache copies of the alias's table entries go too), `DSB ISH`, `ISB`.
//!
//! No other CPU can hold the alias in its TLB: its walks of the upper half start at the
//! empty root and fault, and faulting walks are not cached. So no invalidation has to
//! reach, or wait for, another CPU.

use super::dtb::{BootInfo, Region};
use super::{cache, cpu, layout, timer};
use crate::MAX_CPUS;
use crate::stop::lock_within;
use aarch64_cpu::registers::{ID_AA64MMFR0_EL1, TTBR0_EL1};
use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{El1Attributes, PhysicalAddress};
use aarch64_paging::mair::{Mair, MairAttribute, NormalMemory};
use aarch64_paging::paging::{Constraints, El1And0, MemoryRegion, PageTable, Translation, VaRange};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::ops::Range;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use tock_registers::interfaces::Readable;

pub use super::layout::{boot_range, nopatch_range, text_range};

/// Page size (4 KiB granule).
pub const PAGE_SIZE: usize = 4096;
/// Virtual address bits translated by TTBR0_EL1 (T0SZ = 64 - 39).
pub const VA_BITS: u32 = 39;
/// The root table level for a 39-bit VA with a 4 KiB granule.
const ROOT_LEVEL: usize = 1;
/// The fixed virtual address of the text-patching alias: the last page of the upper
/// (TTBR1) half of the VA space.
pub const ALIAS_VA: usize = usize::MAX - (PAGE_SIZE - 1);
/// The identity map covers addresses below this.
const IDENTITY_LIMIT: usize = 1 << VA_BITS;
/// Page-table pages available to the identity map.
const POOL_PAGES: usize = 64;

/// MAIR index 0: Device-nGnRnE; index 1: Normal, write-back read/write-allocate.
const MAIR: Mair = Mair::EMPTY
    .with_attribute(0, MairAttribute::DEVICE_NGNRNE)
    .with_attribute(
        1,
        MairAttribute::normal(
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
        ),
    );

const DEVICE: El1Attributes = El1Attributes::ATTRIBUTE_INDEX_0
    .union(El1Attributes::ACCESSED)
    .union(El1Attributes::VALID);
const NORMAL: El1Attributes = El1Attributes::ATTRIBUTE_INDEX_1
    .union(El1Attributes::INNER_SHAREABLE)
    .union(El1Attributes::ACCESSED)
    .union(El1Attributes::VALID);
const XN: El1Attributes = El1Attributes::PXN.union(El1Attributes::UXN);
/// Read-write data: never executable.
const RW_DATA: El1Attributes = NORMAL.union(XN);
/// Read-only data.
const RO_DATA: El1Attributes = NORMAL.union(XN).union(El1Attributes::READ_ONLY);
/// Kernel text: read-only, executable at EL1 only.
const TEXT: El1Attributes = NORMAL
    .union(El1Attributes::READ_ONLY)
    .union(El1Attributes::UXN);
/// Device registers.
const DEVICE_RW: El1Attributes = DEVICE.union(XN);
/// User programs: read-only and executable at EL0, never at EL1 (PXN).
const USER_TEXT: El1Attributes = NORMAL
    .union(El1Attributes::USER)
    .union(El1Attributes::READ_ONLY)
    .union(El1Attributes::PXN);
/// User data: read-write at EL0 (and EL1, but for PAN), never executable.
const USER_RW: El1Attributes = NORMAL.union(El1Attributes::USER).union(XN);

/// Descriptor bits of the alias entry: a valid level-3 page, normal memory, RW, XN.
const ALIAS_ATTRS: u64 = RW_DATA.union(El1Attributes::TABLE_OR_PAGE).bits() as u64;
/// Output-address bits of a descriptor (4 KiB granule, 48-bit PA).
const DESC_ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;

/// SCTLR_EL1 with the MMU and caches off (RES1 bits: EOS, TSCXT, EIS, SPAN, nTLSMD,
/// LSMAOE). The boot code writes it at entry (split into 16-bit halves).
pub const SCTLR_MMU_OFF: u64 = 1 << 29 | 1 << 28 | 1 << 23 | 1 << 22 | 1 << 20 | 1 << 11;
/// SCTLR_EL1 with M (MMU), C (data cache), SA/SA0 (SP alignment checks), I
/// (instruction cache) and WXN (writable implies execute-never) set.
pub const SCTLR_MMU_ON: u64 = SCTLR_MMU_OFF | 1 << 0 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 12 | 1 << 19;

/// The page-table pages (in `.bss`: zeroed by the boot code).
#[repr(C, align(4096))]
struct Pool(UnsafeCell<[PageTable<El1Attributes>; POOL_PAGES]>);

// SAFETY: pages are handed out once each by `PoolAllocator` (only ever used by the boot
// CPU while building the map); afterwards the MMU and `poke_text` access them through
// raw pointers, under the rules described on those functions.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool(UnsafeCell::new([const { PageTable::EMPTY }; POOL_PAGES]));

/// Hands out pool pages; never frees (the kernel map is built once).
struct PoolAllocator {
    next: usize,
}

impl Translation<El1Attributes> for PoolAllocator {
    fn allocate_table(&mut self) -> (NonNull<PageTable<El1Attributes>>, PhysicalAddress) {
        assert!(self.next < POOL_PAGES, "page-table pool exhausted");
        let table = POOL
            .0
            .get()
            .cast::<PageTable<El1Attributes>>()
            .wrapping_add(self.next);
        self.next += 1;
        let table = NonNull::new(table).expect("pool address is not null");
        // Identity map: the physical address is the address.
        (table, PhysicalAddress(table.as_ptr() as usize))
    }

    unsafe fn deallocate_table(&mut self, _table: NonNull<PageTable<El1Attributes>>) {
        // Pool pages are never reused: a removed subtable simply stays allocated.
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<El1Attributes>> {
        NonNull::new(pa.0 as *mut PageTable<El1Attributes>).expect("table PA is not null")
    }
}

/// The kernel's mapping, kept after boot for inspection.
struct KernelMap(Mapping<PoolAllocator, El1And0>);

// SAFETY: the mapping's raw pointers point into the static pool; all access goes through
// the mutex below.
unsafe impl Send for KernelMap {}

static KERNEL_MAP: spin::Once<spin::Mutex<KernelMap>> = spin::Once::new();

/// The register values every CPU loads to turn the MMU on. Published (and cleaned to the
/// point of coherency) by the boot CPU before it starts any secondary, which reads them
/// with its MMU off in `boot/aarch64/entry.S`. Layout fixed: the assembly reads
/// `[mair, tcr, ttbr0, sctlr]` with two LDPs and `ttbr1` at offset 32.
#[repr(C, align(64))]
pub struct MmuRegs {
    mair: AtomicU64,
    tcr: AtomicU64,
    ttbr0: AtomicU64,
    sctlr: AtomicU64,
    ttbr1: AtomicU64,
}

/// See [`MmuRegs`].
pub static MMU_REGS: MmuRegs = MmuRegs {
    mair: AtomicU64::new(0),
    tcr: AtomicU64::new(0),
    ttbr0: AtomicU64::new(0),
    sctlr: AtomicU64::new(0),
    ttbr1: AtomicU64::new(0),
};

/// One translation table page, built by hand: aarch64-paging builds the identity map,
/// but these two roots must exist before any CPU turns its MMU on, never change but for
/// one entry, and are three fixed descriptors.
#[repr(C, align(4096))]
struct RawTable([AtomicU64; 512]);

impl RawTable {
    const fn new() -> Self {
        RawTable([const { AtomicU64::new(0) }; 512])
    }

    fn addr(&self) -> u64 {
        self as *const RawTable as u64
    }
}

/// The upper-half root every CPU's TTBR1_EL1 holds: all entries invalid.
static EMPTY_ROOT: RawTable = RawTable::new();
/// The upper-half tables of the alias: level 1 (the root), 2 and 3, each with only the
/// entry for [`ALIAS_VA`] (the last one) in use.
static ALIAS_TABLES: [RawTable; 3] = [RawTable::new(), RawTable::new(), RawTable::new()];
/// Index of [`ALIAS_VA`] in each of its tables.
const ALIAS_INDEX: usize = 511;
/// A table descriptor (valid, table).
const TABLE_DESC: u64 = 0b11;

/// The level-3 descriptor of [`ALIAS_VA`].
#[inline(always)]
fn alias_pte() -> &'static AtomicU64 {
    &ALIAS_TABLES[2].0[ALIAS_INDEX]
}

/// Serialises alias users: there is one alias page.
static ALIAS_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Why the identity map could not be built.
#[derive(Debug)]
pub enum MmuError {
    /// A range could not be mapped.
    Map(&'static str, Region, aarch64_paging::MapError),
    /// A region the kernel must map lies beyond the 39-bit VA space or on the alias.
    OutOfRange(&'static str, Region),
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::Map(what, r, e) => write!(f, "cannot map {what} {r}: {e}"),
            MmuError::OutOfRange(what, r) => {
                write!(f, "{what} {r} lies outside the {VA_BITS}-bit identity map")
            }
        }
    }
}

fn map(
    mapping: &mut Mapping<PoolAllocator, El1And0>,
    what: &'static str,
    r: Region,
    flags: El1Attributes,
) -> Result<(), MmuError> {
    if r.size == 0 {
        return Ok(());
    }
    if r.end() > IDENTITY_LIMIT || r.end() < r.base {
        return Err(MmuError::OutOfRange(what, r));
    }
    mapping
        .map_range(
            &MemoryRegion::new(r.base, r.end()),
            PhysicalAddress(r.base & !(PAGE_SIZE - 1)),
            flags,
            Constraints::NO_CONTIGUOUS_HINT,
        )
        .map_err(|e| MmuError::Map(what, r, e))
}

fn region(r: Range<usize>) -> Region {
    Region {
        base: r.start,
        size: r.end - r.start,
    }
}

/// TCR_EL1: T0SZ = T1SZ = 25, walks of both halves inner-shareable write-back
/// cacheable, 4 KiB granules, ASID from TTBR0 (A1 = 0), IPS from
/// ID_AA64MMFR0_EL1.PARange.
fn tcr() -> u64 {
    let ips = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange).min(5);
    let tsz = 64 - VA_BITS as u64;
    let lower = tsz | 0b01 << 8 | 0b01 << 10 | 0b11 << 12; // T0SZ IRGN0 ORGN0 SH0 (TG0 = 4K)
    let upper = tsz << 16 | 0b01 << 24 | 0b01 << 26 | 0b11 << 28 | 0b10 << 30; // ... TG1 = 4K
    lower | upper | ips << 32
}

/// Builds the identity map from the DTB and the linker layout and turns the MMU and
/// caches on. Boot CPU only, once, with the MMU off (no atomic read-modify-write is
/// used before the switch).
///
/// # Safety
/// Must be called once, on the boot CPU, before any other CPU starts, with the MMU off;
/// `info` must describe the machine truthfully (the map covers the image, the DTB and
/// the devices it names and nothing the kernel uses is left out).
pub unsafe fn init_primary(info: &BootInfo) -> Result<(), MmuError> {
    let mut mapping = Mapping::with_asid_and_va_range(
        PoolAllocator { next: 0 },
        0,
        ROOT_LEVEL,
        El1And0,
        VaRange::Lower,
    );
    let m = &mut mapping;
    for &mem in info.memory() {
        // RAM is data: never executable. Clip anything beyond the map (the kernel only
        // needs RAM it can address).
        let clipped = Region {
            base: mem.base,
            size: mem.size.min(IDENTITY_LIMIT.saturating_sub(mem.base)),
        };
        map(m, "RAM", clipped, RW_DATA)?;
    }
    map(m, "the DTB", info.dtb, RO_DATA)?;
    map(m, "kernel text", region(layout::text_range()), TEXT)?;
    map(m, "kernel rodata", region(layout::rodata_range()), RO_DATA)?;
    map(m, "kernel data", region(layout::writable_range()), RW_DATA)?;
    for cpu in 0..MAX_CPUS {
        map(
            m,
            "a stack guard",
            region(layout::stack_guard(cpu)),
            El1Attributes::empty(),
        )?;
    }
    map(m, "the GIC distributor", info.gicd, DEVICE_RW)?;
    for &gicr in info.gicr_regions() {
        map(m, "the GIC redistributors", gicr, DEVICE_RW)?;
    }
    map(m, "the UART", info.uart, DEVICE_RW)?;
    // Last: these override the RAM and kernel-data entries of the same pages.
    map(m, "user text", region(layout::user_text_range()), USER_TEXT)?;
    map(m, "user data", region(layout::user_data_range()), USER_RW)?;
    let root = mapping.root_address().0 as u64;
    // The alias tables: level 1 -> 2 -> 3, the level-3 entry invalid until a poke.
    for level in 0..2 {
        ALIAS_TABLES[level].0[ALIAS_INDEX].store(
            ALIAS_TABLES[level + 1].addr() | TABLE_DESC,
            Ordering::Relaxed,
        );
    }

    let tcr = tcr();
    // Everything written so far (BSS, boot info, page tables, this stack) went straight
    // to RAM with the caches off. Discard any stale line over the writable image and
    // the DTB (a boot loader may have left clean copies) before caches come on.
    let data = layout::writable_range();
    // SAFETY: the up-to-date contents of this range are in RAM (caches are off).
    unsafe { cache::inval_dcache_range_poc(data.start, data.end) };
    // SAFETY: as above; the DTB is read-only to everyone.
    unsafe { cache::inval_dcache_range_poc(info.dtb.base, info.dtb.end()) };
    // SAFETY: the map covers all code, data, stacks and devices the kernel uses with the
    // same addresses (identity), so execution continues seamlessly; TLBs and the
    // I-cache are invalidated first so nothing from before applies.
    unsafe { enable(MAIR.0, tcr, root, EMPTY_ROOT.addr(), SCTLR_MMU_ON) };

    // From here on caches are on and atomics work.
    mapping.mark_active();
    KERNEL_MAP.call_once(|| spin::Mutex::new(KernelMap(mapping)));
    MMU_REGS.mair.store(MAIR.0, Ordering::Relaxed);
    MMU_REGS.tcr.store(tcr, Ordering::Relaxed);
    MMU_REGS.ttbr0.store(root, Ordering::Relaxed);
    MMU_REGS.ttbr1.store(EMPTY_ROOT.addr(), Ordering::Relaxed);
    MMU_REGS.sctlr.store(SCTLR_MMU_ON, Ordering::Relaxed);
    // Secondaries read the block with their MMU off: push it to the point of coherency.
    let regs = &MMU_REGS as *const MmuRegs as usize;
    cache::clean_inval_dcache_range_poc(regs, regs + size_of::<MmuRegs>());
    Ok(())
}

/// Loads the translation registers and turns the MMU on.
///
/// # Safety
/// The tables at `ttbr0` must map the running code, its stack and data identically;
/// `ttbr1` must be the empty root.
unsafe fn enable(mair: u64, tcr: u64, ttbr0: u64, ttbr1: u64, sctlr: u64) {
    // One asm, not aarch64-cpu's MAIR/TCR/TTBR/SCTLR_EL1 accessors: the MMU switch must
    // be this exact sequence, with no compiler-placed access in it.
    // SAFETY: forwarded from the caller. Not `nomem`: memory accesses must not move
    // across the switch.
    unsafe {
        asm!(
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr0}",
            "msr ttbr1_el1, {ttbr1}",
            "isb",
            "tlbi vmalle1",
            "dsb nsh",
            "ic iallu",
            "dsb nsh",
            "isb",
            "msr sctlr_el1, {sctlr}",
            "isb",
            mair = in(reg) mair,
            tcr = in(reg) tcr,
            ttbr0 = in(reg) ttbr0,
            ttbr1 = in(reg) ttbr1,
            sctlr = in(reg) sctlr,
            options(nostack, preserves_flags),
        )
    };
}

/// The register block secondaries load (for diagnostics).
pub fn mmu_regs() -> [u64; 4] {
    [
        MMU_REGS.mair.load(Ordering::Relaxed),
        MMU_REGS.tcr.load(Ordering::Relaxed),
        MMU_REGS.ttbr0.load(Ordering::Relaxed),
        MMU_REGS.sctlr.load(Ordering::Relaxed),
    ]
}

/// A leaf found by [`walk`].
#[derive(Clone, Copy, Debug)]
struct Leaf {
    /// Level of the descriptor (1, 2: block; 3: page).
    level: usize,
    /// The descriptor.
    desc: u64,
}

/// Walks the tables at `root` for `va`: the last descriptor reached (a block, a page,
/// or the first invalid entry). `None` if `va` is outside the map.
fn walk(root: u64, va: usize) -> Option<Leaf> {
    if va >= 1 << VA_BITS {
        return None;
    }
    let mut table = (root & DESC_ADDR_MASK) as usize;
    let mut level = ROOT_LEVEL;
    loop {
        let index = (va >> (12 + 9 * (3 - level))) & 0x1ff;
        let entry_addr = table + index * 8;
        // SAFETY: tables live in the static pool, identity-mapped and readable; entries
        // are aligned u64s, only ever written with single-copy-atomic stores (aarch64
        // paging's AtomicUsize descriptors, or `poke_text`), so an atomic load is sound.
        let desc = unsafe { AtomicU64::from_ptr(entry_addr as *mut u64) }.load(Ordering::Relaxed);
        let is_table = level < 3 && desc & 0b11 == 0b11;
        if !is_table {
            return Some(Leaf { level, desc });
        }
        table = (desc & DESC_ADDR_MASK) as usize;
        level += 1;
    }
}

fn current_root() -> u64 {
    TTBR0_EL1.get()
}

/// What the identity map says about one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// The entry is valid.
    pub valid: bool,
    /// Writable at EL1.
    pub writable: bool,
    /// Executable at EL1.
    pub executable: bool,
    /// Device memory (MAIR index 0).
    pub device: bool,
    /// Level of the entry (1, 2 = block, 3 = page).
    pub level: usize,
}

/// Looks `addr` up in the live tables (never takes a lock; reads descriptors
/// atomically). `None` if `addr` is outside the translated range.
pub fn page_info(addr: usize) -> Option<PageInfo> {
    let root = current_root();
    if root & DESC_ADDR_MASK == 0 {
        return None;
    }
    let leaf = walk(root, addr)?;
    let valid = leaf.desc & 1 != 0;
    let bits = El1Attributes::from_bits_truncate(leaf.desc as usize);
    Some(PageInfo {
        valid,
        writable: valid && !bits.contains(El1Attributes::READ_ONLY),
        executable: valid && !bits.contains(El1Attributes::PXN),
        device: valid && (leaf.desc >> 2) & 0b111 == 0,
        level: leaf.level,
    })
}

/// Whether `addr` is writable through its normal (identity) mapping. For kernel text
/// this must always be false.
pub fn is_text_writable(addr: usize) -> bool {
    page_info(addr).is_some_and(|p| p.writable)
}

/// Whether the patch alias is currently mapped (true only inside [`poke_text`]).
pub fn alias_mapped() -> bool {
    alias_pte().load(Ordering::Relaxed) & 1 != 0
}

/// Writes the 32-bit word `insn` at kernel-text address `addr` through a temporary
/// writable, non-executable alias of its page, then removes the alias (see the module
/// docs for the exact TLB maintenance). Masks every exception on the calling CPU and
/// holds the alias lock meanwhile.
///
/// This only stores the word: the caller then makes it visible to instruction fetch
/// with [`cache::sync_icache_range`] over the text address, and each CPU that executes
/// it with a context synchronisation event.
///
/// # Safety
/// - `addr` must be 4-byte aligned and inside [`text_range`] (checked; panics
///   otherwise), and must not be in [`nopatch_range`] unless the caller has
///   established that nothing executes that code concurrently.
/// - No CPU may be executing the word at `addr` while it changes, unless the old/new
///   pair is one the architecture allows to be modified concurrently (CMODX: B, BL,
///   NOP, BRK, SVC/HVC/SMC, ISB) — e.g. the machine is stopped.
/// - After the MMU is on ([`init_primary`] ran).
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
pub unsafe fn poke_text(addr: usize, insn: u32) {
    // SAFETY: forwarded from the caller.
    unsafe { poke_text_page(&[(addr, insn)]) }
}

/// [`poke_text`] for several words of one page: the alias is mapped once for all of
/// them, which saves two TTBR1 switches and a TLB invalidation per word in batches.
///
/// # Safety
/// As [`poke_text`], for every word; all of them must lie in the same page (checked;
/// panics otherwise).
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
pub unsafe fn poke_text_page(words: &[(usize, u32)]) {
    let Some(&(first, _)) = words.first() else {
        return;
    };
    let text = layout::text_range();
    for &(addr, _) in words {
        assert!(
            addr.is_multiple_of(4) && addr >= text.start && addr + 4 <= text.end,
            "poke_text: {addr:#x} is not an aligned kernel text address"
        );
        assert!(
            addr & !(PAGE_SIZE - 1) == first & !(PAGE_SIZE - 1),
            "poke_text_page: {addr:#x} is not in the page of {first:#x}"
        );
    }
    let page = first & !(PAGE_SIZE - 1);
    // SAFETY: `page` is a kernel text page (checked above); only the words are stored.
    let alias = unsafe { TextAlias::map(page) };
    for &(addr, insn) in words {
        let offset = addr & (PAGE_SIZE - 1);
        // SAFETY: the alias maps `page`, which holds every word (checked above),
        // writable; `offset` keeps the access in it and 4-byte aligned. The caller
        // guarantees nobody executes the words unsafely meanwhile.
        unsafe { core::ptr::write_volatile((alias.addr() + offset) as *mut u32, insn) };
    }
    drop(alias);
}

/// [`poke_text`] for a run of whole instructions inside one page: `words` (in memory
/// order) are stored from `addr` on under one mapping of the alias, one 32-bit store
/// each (single-copy atomic, as every A64 instruction write must be). A patch plan's
/// run is copied this way, with no per-word address check or mapping.
///
/// # Safety
/// As [`poke_text`], for every word; `addr..addr + 4 * words.len()` must lie in one page
/// (checked; panics otherwise).
#[unsafe(link_section = ".text.nopatch")]
#[inline(never)]
pub unsafe fn poke_text_run(addr: usize, words: &[u32]) {
    let Some(last) = words.len().checked_sub(1) else {
        return;
    };
    let text = layout::text_range();
    let end = addr.saturating_add(4 * words.len());
    assert!(
        addr.is_multiple_of(4) && addr >= text.start && end <= text.end,
        "poke_text_run: {addr:#x}..{end:#x} is not aligned kernel text"
    );
    let page = addr & !(PAGE_SIZE - 1);
    assert!(
        (addr + 4 * last) & !(PAGE_SIZE - 1) == page,
        "poke_text_run: {addr:#x}..{end:#x} crosses a page"
    );
    // SAFETY: `page` is a kernel text page (checked above); only the words are stored.
    let alias = unsafe { TextAlias::map(page) };
    let dst = (alias.addr() + (addr - page)) as *mut u32;
    for (i, &word) in words.iter().enumerate() {
        // SAFETY: the alias maps `page` writable and the run lies in it (checked above);
        // `dst + i` stays 4-byte aligned. The caller guarantees nobody executes the
        // words unsafely meanwhile.
        unsafe { dst.add(i).write_volatile(word) };
    }
    drop(alias);
}

/// The text alias, mapped on this CPU only: [`TextAlias::map`] maps a page writable at
/// [`ALIAS_VA`]; dropping it removes the mapping again (see the module docs for the
/// exact steps). Every exception stays masked and the alias lock held meanwhile.
pub struct TextAlias {
    saved: u64,
    lock: Option<spin::MutexGuard<'static, ()>>,
}

impl TextAlias {
    /// Maps the physical page `page` writable at [`ALIAS_VA`] on this CPU.
    ///
    /// # Safety
    /// `page` must be a page-aligned page of the kernel image; the caller makes through
    /// the alias only the writes it is allowed to make there.
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(never)]
    pub unsafe fn map(page: usize) -> TextAlias {
        // `init_primary` links the alias tables before the MMU goes on.
        assert!(
            ALIAS_TABLES[0].0[ALIAS_INDEX].load(Ordering::Relaxed) != 0,
            "poke_text before the MMU is on"
        );
        let saved = cpu::mask_all();
        // Bounded: the holder keeps it for one poke with every exception masked.
        let lock = match lock_within(
            &ALIAS_LOCK,
            "the text alias lock",
            1_000_000_000,
            timer::now_ns,
            cpu::relax,
        ) {
            Ok(guard) => guard,
            Err(timeout) => panic!("poke_text: {timeout}"),
        };
        // One asm with its ISB: aarch64-cpu's `TTBR1_EL1.set()` is `nomem`, no ISB.
        // SAFETY: TTBR1 only translates the upper half, where nothing but the alias
        // lives: switching it to the alias tables changes no other mapping. The ISB makes
        // the walker use the new root; after the entry is stored, DSB ISHST makes it
        // visible to the walker and the ISB orders our accesses through the alias after
        // it.
        unsafe {
            asm!(
                "msr ttbr1_el1, {root}",
                "isb",
                root = in(reg) ALIAS_TABLES[0].addr(),
                options(nostack, preserves_flags),
            )
        };
        alias_pte().store(page as u64 | ALIAS_ATTRS, Ordering::Relaxed);
        // SAFETY: barriers only (see above).
        unsafe { asm!("dsb ishst", "isb", options(nostack, preserves_flags)) };
        TextAlias {
            saved,
            lock: Some(lock),
        }
    }

    /// The alias's address ([`ALIAS_VA`]).
    pub fn addr(&self) -> usize {
        ALIAS_VA
    }
}

impl Drop for TextAlias {
    #[unsafe(link_section = ".text.nopatch")]
    #[inline(never)]
    fn drop(&mut self) {
        alias_pte().store(0, Ordering::Relaxed);
        // SAFETY: barriers, the switch back to the empty root and TLB maintenance. DSB
        // ISHST: the invalid entry and the data stores are complete. TTBR1 = the empty
        // root, then ISB: from here no walk of ours can reach the alias tables, so
        // nothing can be cached from them again. TLBI VAE1 (this CPU only; every level,
        // so the walk-cache copies of the alias's table entries go too; global entries
        // included): no other CPU ever walked the alias tables (their TTBR1 is the empty
        // root), so none can hold any of it. DSB ISH completes the invalidation, the ISB
        // orders what follows.
        unsafe {
            asm!(
                "dsb ishst",
                "msr ttbr1_el1, {empty}",
                "isb",
                "tlbi vae1, {va}",
                "dsb ish",
                "isb",
                va = in(reg) ((ALIAS_VA >> 12) & ((1 << 44) - 1)) as u64,
                empty = in(reg) EMPTY_ROOT.addr(),
                options(nostack, preserves_flags),
            )
        };
        // Unlock before unmasking: an interrupt taken here must not find it held.
        drop(self.lock.take());
        cpu::restore(self.saved);
    }
}

/// Whether this CPU can translate a write to [`ALIAS_VA`] right now (`AT S1E1W`: a real
/// stage-1 walk, or a TLB hit, with the write permission checked). Outside
/// a [`TextAlias`] of this very CPU it must be false on every CPU.
#[unsafe(link_section = ".text.nopatch")]
pub fn alias_writable_here() -> bool {
    let saved = cpu::mask_all();
    let par: u64;
    // SAFETY: AT only writes PAR_EL1, which nothing else here uses, and exceptions are
    // masked so no handler's AT can interleave; the ISB makes the result readable.
    unsafe {
        asm!(
            "at s1e1w, {va}",
            "isb",
            "mrs {par}, par_el1",
            va = in(reg) ALIAS_VA as u64,
            par = out(reg) par,
            options(nostack, preserves_flags),
        )
    };
    cpu::restore(saved);
    par & 1 == 0
}

/// Page-table pages the identity map uses (of the static pool).
pub fn page_table_pages_used() -> usize {
    KERNEL_MAP
        .get()
        .map_or(0, |map| map.lock().0.translation().next)
}

/// Page-table pages available in the static pool.
pub const PAGE_TABLE_POOL_PAGES: usize = POOL_PAGES;
