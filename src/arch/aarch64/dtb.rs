//! Reading the platform description from the flattened device tree (fdt crate).
//!
//! Everything about the machine comes from here: the CPUs (their MPIDR `reg` values),
//! the GICv3 distributor and redistributor, the PL011 and its clock, the PSCI conduit,
//! memory, and `/chosen/bootargs`. The result is copied into a static [`BootInfo`], so
//! nothing refers to the DTB afterwards (it stays mapped read-only for inspection).
//!
//! [`parse`] runs on the boot CPU with the MMU off: it uses plain loads and stores only
//! (no atomic read-modify-write, which Device memory need not support).

use super::psci::Conduit;
use crate::MAX_CPUS;
use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};
use fdt::Fdt;
use fdt::node::FdtNode;

/// The FDT header magic.
pub const FDT_MAGIC: u32 = 0xd00d_feed;

/// Where QEMU puts the DTB for an ELF `-kernel` (x0 is then 0): the start of RAM on
/// `virt`, when the DTB fits below the image (linker.ld links at RAM + 2 MiB). Used only
/// when the boot loader passed no DTB address, and only if the FDT magic is there.
pub const QEMU_VIRT_DTB_FALLBACK: usize = 0x4000_0000;

/// The most memory regions recorded.
pub const MAX_MEMORY_REGIONS: usize = 8;

/// The most GIC redistributor regions recorded (QEMU `virt` uses two above 123 CPUs).
pub const MAX_GICR_REGIONS: usize = 8;

/// Capacity of the bootargs copy.
pub const BOOTARGS_CAPACITY: usize = 1024;

/// A physical address range (identity-mapped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub base: usize,
    /// Length in bytes.
    pub size: usize,
}

impl Region {
    /// One past the last byte.
    pub const fn end(&self) -> usize {
        self.base + self.size
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

/// What the kernel knows about the machine, all of it from the DTB (plus the boot
/// CPU's own MPIDR and entry exception level).
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Number of CPUs the kernel drives: the DTB's CPUs, at most [`MAX_CPUS`].
    pub cpu_count: usize,
    /// Number of CPU nodes in the DTB (more than `cpu_count` if over [`MAX_CPUS`]).
    pub dtb_cpu_count: usize,
    /// MPIDR affinity (DTB `reg`) of each logical CPU: index 0 is the boot CPU, the
    /// others follow in DTB order. Entries at and beyond `cpu_count` are 0.
    pub mpidrs: [u64; MAX_CPUS],
    /// `/chosen/bootargs` (empty if absent), copied out of the DTB; truncated to
    /// [`BOOTARGS_CAPACITY`] bytes at a character boundary if longer, which the kernel
    /// then refuses (see `bootargs_len`).
    pub bootargs: &'static str,
    /// Bytes of `/chosen/bootargs` in the DTB: more than `bootargs.len()` if truncated.
    pub bootargs_len: usize,
    /// How PSCI calls are made (`/psci` `method`).
    pub psci_conduit: Conduit,
    /// GICv3 distributor (`arm,gic-v3` `reg` 0).
    pub gicd: Region,
    /// The first GICv3 redistributor region (`arm,gic-v3` `reg` 1).
    pub gicr: Region,
    /// Every redistributor region (`reg` 1 to `#redistributor-regions`); entries at and
    /// beyond `gicr_regions` are empty.
    pub gicrs: [Region; MAX_GICR_REGIONS],
    /// Number of redistributor regions the DTB declares.
    pub gicr_regions: usize,
    /// The console PL011 (`/chosen/stdout-path` if it is a PL011, else the first
    /// `arm,pl011`).
    pub uart: Region,
    /// The PL011 reference clock (`uartclk`), if the DTB gives it.
    pub uart_clock_hz: Option<u32>,
    /// Memory regions (`device_type = "memory"` nodes), in DTB order.
    pub memory: [Region; MAX_MEMORY_REGIONS],
    /// How many entries of `memory` are valid.
    pub memory_count: usize,
    /// The DTB blob itself.
    pub dtb: Region,
    /// The boot CPU's MPIDR affinity.
    pub boot_mpidr: u64,
    /// Exception level the boot CPU entered the kernel at (1 or 2).
    pub entry_el: u8,
}

impl BootInfo {
    /// The valid memory regions.
    pub fn memory(&self) -> &[Region] {
        &self.memory[..self.memory_count]
    }

    /// The redistributor regions, in DTB order.
    pub fn gicr_regions(&self) -> &[Region] {
        &self.gicrs[..self.gicr_regions]
    }

    /// The MPIDR affinities of the logical CPUs.
    pub fn cpu_mpidrs(&self) -> &[u64] {
        &self.mpidrs[..self.cpu_count]
    }

    /// Whether `bootargs` contains the word `key` or `key=...`.
    pub fn has_bootarg(&self, key: &str) -> bool {
        self.bootargs
            .split_ascii_whitespace()
            .any(|w| w == key || w.strip_prefix(key).is_some_and(|r| r.starts_with('=')))
    }

    /// The value of the first `key=value` word of `bootargs`.
    pub fn bootarg(&self, key: &str) -> Option<&'static str> {
        self.bootargs
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Why the DTB could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtbError {
    /// x0 was 0 and there is no FDT magic at the fallback address.
    NotFound,
    /// The header is malformed.
    BadHeader(usize),
    /// No `/cpus` node, or no usable CPU in it.
    NoCpus,
    /// A CPU node's `reg` is missing or has an unsupported size.
    BadCpuReg,
    /// The boot CPU's MPIDR is not among the DTB's CPUs (or beyond [`MAX_CPUS`]).
    BootCpuMissing(u64),
    /// No `arm,gic-v3` node with distributor and redistributor `reg` entries.
    NoGicV3,
    /// More redistributor regions than [`MAX_GICR_REGIONS`], or fewer `reg` entries
    /// than `#redistributor-regions` says.
    BadGicrRegions(usize),
    /// The machine has a GICv2 only (QEMU: add `gic-version=3` to `-machine`).
    OnlyGicV2,
    /// No `/psci` node, or its `method` is neither "hvc" nor "smc".
    NoPsci,
    /// No memory node.
    NoMemory,
}

impl fmt::Display for DtbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtbError::NotFound => write!(
                f,
                "no DTB: x0 was 0 and no FDT magic at {QEMU_VIRT_DTB_FALLBACK:#x}"
            ),
            DtbError::BadHeader(at) => write!(f, "malformed FDT header at {at:#x}"),
            DtbError::NoCpus => write!(f, "no CPU nodes under /cpus"),
            DtbError::BadCpuReg => write!(f, "a /cpus/cpu node has no usable reg"),
            DtbError::BootCpuMissing(m) => {
                write!(
                    f,
                    "boot CPU MPIDR {m:#x} is not among the first {MAX_CPUS} DTB CPUs"
                )
            }
            DtbError::NoGicV3 => write!(f, "no usable arm,gic-v3 node"),
            DtbError::BadGicrRegions(n) => write!(
                f,
                "arm,gic-v3: #redistributor-regions = {n}, but the kernel supports 1 to \
                 {MAX_GICR_REGIONS} and needs a reg entry for each"
            ),
            DtbError::OnlyGicV2 => {
                write!(
                    f,
                    "the GIC is a GICv2; this kernel needs GICv3 (-machine virt,gic-version=3)"
                )
            }
            DtbError::NoPsci => write!(f, "no /psci node with method hvc or smc"),
            DtbError::NoMemory => write!(f, "no memory node"),
        }
    }
}

/// Reads a big-endian u32 from a physical address (the FDT header).
///
/// # Safety
/// `addr` must be readable and 4-byte aligned.
unsafe fn read_be32(addr: usize) -> u32 {
    // SAFETY: forwarded from the caller.
    u32::from_be(unsafe { core::ptr::read_volatile(addr as *const u32) })
}

/// Finds the DTB: `x0` if non-zero, else [`QEMU_VIRT_DTB_FALLBACK`] if it holds the
/// FDT magic.
///
/// # Safety
/// Whichever address is chosen must be readable RAM (true with the MMU off for the
/// loader's x0 and for the RAM base).
pub unsafe fn locate(x0: usize) -> Result<usize, DtbError> {
    if x0 != 0 {
        return Ok(x0);
    }
    // SAFETY: the fallback is the start of RAM on QEMU virt; readable with the MMU off.
    if unsafe { read_be32(QEMU_VIRT_DTB_FALLBACK) } == FDT_MAGIC {
        Ok(QEMU_VIRT_DTB_FALLBACK)
    } else {
        Err(DtbError::NotFound)
    }
}

/// A big-endian cell list as u64 values of `cells` cells each.
fn read_cells(bytes: &[u8], cells: usize) -> Option<u64> {
    match cells {
        1 => Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as u64),
        2 => Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

fn prop_u32(node: FdtNode<'_, '_>, name: &str) -> Option<u32> {
    let value = node.property(name)?.value;
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

fn prop_str<'a>(node: FdtNode<'_, 'a>, name: &str) -> Option<&'a str> {
    let value = node.property(name)?.value;
    let value = value.split(|&b| b == 0).next()?;
    core::str::from_utf8(value).ok()
}

fn is_compatible(node: FdtNode<'_, '_>, with: &str) -> bool {
    node.compatible()
        .is_some_and(|c| c.all().any(|s| s == with))
}

fn reg_entry(node: FdtNode<'_, '_>, index: usize) -> Option<Region> {
    let r = node.reg()?.nth(index)?;
    Some(Region {
        base: r.starting_address as usize,
        size: r.size.unwrap_or(0),
    })
}

/// The static home of [`BootInfo`]: written once by the boot CPU before any other CPU
/// starts, read-only afterwards.
struct BootInfoCell(UnsafeCell<MaybeUninit<BootInfo>>);

// SAFETY: written only by `parse` on the boot CPU before `READY` is set (Release) and
// before any secondary starts; only read after `READY` is seen (Acquire).
unsafe impl Sync for BootInfoCell {}

static BOOT_INFO: BootInfoCell = BootInfoCell(UnsafeCell::new(MaybeUninit::uninit()));
static READY: AtomicBool = AtomicBool::new(false);

/// Bootargs copied out of the DTB.
struct BootargsBuf(UnsafeCell<[u8; BOOTARGS_CAPACITY]>);

// SAFETY: as for `BootInfoCell`: written once by `parse` before publication.
unsafe impl Sync for BootargsBuf {}

static BOOTARGS: BootargsBuf = BootargsBuf(UnsafeCell::new([0; BOOTARGS_CAPACITY]));

/// The boot information. Panics if called before the boot CPU parsed the DTB.
pub fn boot_info() -> &'static BootInfo {
    assert!(
        READY.load(Ordering::Acquire),
        "boot_info() before the DTB was parsed"
    );
    let cell = BOOT_INFO.0.get();
    // SAFETY: READY (Acquire, pairing with the Release in `parse`) proves the cell was
    // fully written, and it is never written again, so a shared 'static borrow is fine.
    let info = unsafe { &*cell };
    // SAFETY: initialised, as above.
    unsafe { info.assume_init_ref() }
}

/// Parses the DTB at `dtb` and publishes the result as [`boot_info`]. Boot CPU only,
/// once, before secondaries start.
///
/// # Safety
/// `dtb` must point to a readable FDT blob (from [`locate`]) that nothing writes while
/// this runs; must be called once, before any other CPU runs.
pub unsafe fn parse(
    dtb: usize,
    boot_mpidr: u64,
    entry_el: u8,
) -> Result<&'static BootInfo, DtbError> {
    // SAFETY: the caller guarantees a readable FDT at `dtb`; Fdt::from_ptr validates the
    // header and bounds every access by `totalsize`.
    let fdt = unsafe { Fdt::from_ptr(dtb as *const u8) }.map_err(|_| DtbError::BadHeader(dtb))?;

    let (uart, uart_clock_hz) = find_uart(&fdt);
    let psci_conduit = find_psci(&fdt).ok_or(DtbError::NoPsci)?;
    let chosen = fdt.find_node("/chosen");

    // CPUs: DTB order; the boot CPU becomes logical CPU 0.
    let cpus = fdt.find_node("/cpus").ok_or(DtbError::NoCpus)?;
    let addr_cells = cpus.cell_sizes().address_cells;
    let mut dtb_order = [0u64; MAX_CPUS];
    let mut dtb_cpu_count = 0;
    let mut boot_seen = false;
    for node in cpus.children() {
        let is_cpu = node.name.split('@').next() == Some("cpu")
            || prop_str(node, "device_type") == Some("cpu");
        if !is_cpu || node.name.starts_with("cpu-map") {
            continue;
        }
        if let Some(status) = prop_str(node, "status")
            && status != "okay"
            && status != "ok"
        {
            continue;
        }
        let reg = node.property("reg").ok_or(DtbError::BadCpuReg)?;
        let mpidr = read_cells(reg.value, addr_cells).ok_or(DtbError::BadCpuReg)?;
        if dtb_cpu_count < MAX_CPUS {
            dtb_order[dtb_cpu_count] = mpidr;
            boot_seen |= mpidr == boot_mpidr;
        }
        dtb_cpu_count += 1;
    }
    if dtb_cpu_count == 0 {
        return Err(DtbError::NoCpus);
    }
    if !boot_seen {
        return Err(DtbError::BootCpuMissing(boot_mpidr));
    }
    let cpu_count = dtb_cpu_count.min(MAX_CPUS);
    let mut mpidrs = [0u64; MAX_CPUS];
    mpidrs[0] = boot_mpidr;
    let mut next = 1;
    for &m in &dtb_order[..cpu_count] {
        if m != boot_mpidr {
            mpidrs[next] = m;
            next += 1;
        }
    }

    // GICv3.
    let gic = fdt
        .all_nodes()
        .find(|n| is_compatible(*n, "arm,gic-v3"))
        .ok_or_else(|| {
            let v2 = fdt
                .all_nodes()
                .any(|n| is_compatible(n, "arm,cortex-a15-gic") || is_compatible(n, "arm,gic-400"));
            if v2 {
                DtbError::OnlyGicV2
            } else {
                DtbError::NoGicV3
            }
        })?;
    let gicd = reg_entry(gic, 0).ok_or(DtbError::NoGicV3)?;
    let gicr = reg_entry(gic, 1).ok_or(DtbError::NoGicV3)?;
    let gicr_regions = prop_u32(gic, "#redistributor-regions").unwrap_or(1) as usize;
    if !(1..=MAX_GICR_REGIONS).contains(&gicr_regions) {
        return Err(DtbError::BadGicrRegions(gicr_regions));
    }
    let mut gicrs = [Region::default(); MAX_GICR_REGIONS];
    for (i, slot) in gicrs.iter_mut().take(gicr_regions).enumerate() {
        *slot = reg_entry(gic, 1 + i)
            .filter(|r| r.size > 0)
            .ok_or(DtbError::BadGicrRegions(gicr_regions))?;
    }

    // Memory.
    let mut memory = [Region::default(); MAX_MEMORY_REGIONS];
    let mut memory_count = 0;
    for node in fdt.all_nodes() {
        if prop_str(node, "device_type") != Some("memory") {
            continue;
        }
        let Some(regs) = node.reg() else { continue };
        for r in regs {
            if memory_count < MAX_MEMORY_REGIONS && r.size.unwrap_or(0) > 0 {
                memory[memory_count] = Region {
                    base: r.starting_address as usize,
                    size: r.size.unwrap_or(0),
                };
                memory_count += 1;
            }
        }
    }
    if memory_count == 0 {
        return Err(DtbError::NoMemory);
    }

    // Bootargs, copied (truncated at a character boundary if too long).
    let args = chosen.and_then(|c| prop_str(c, "bootargs")).unwrap_or("");
    let mut len = args.len().min(BOOTARGS_CAPACITY);
    while !args.is_char_boundary(len) {
        len -= 1;
    }
    // SAFETY: only the boot CPU runs, once (caller's contract); nothing else has a
    // reference into BOOTARGS yet.
    let buf = unsafe { &mut *BOOTARGS.0.get() };
    buf[..len].copy_from_slice(&args.as_bytes()[..len]);
    // SAFETY: the static buffer is never written again, so the shared borrow is
    // 'static.
    let stored: &'static [u8] =
        unsafe { core::slice::from_raw_parts(BOOTARGS.0.get().cast::<u8>(), len) };
    let bootargs = core::str::from_utf8(stored).unwrap_or("");

    let info = BootInfo {
        cpu_count,
        dtb_cpu_count,
        mpidrs,
        bootargs,
        bootargs_len: args.len(),
        psci_conduit,
        gicd,
        gicr,
        gicrs,
        gicr_regions,
        uart,
        uart_clock_hz,
        memory,
        memory_count,
        dtb: Region {
            base: dtb,
            size: fdt.total_size(),
        },
        boot_mpidr,
        entry_el,
    };
    // SAFETY: single writer before publication (caller's contract).
    unsafe { (*BOOT_INFO.0.get()).write(info) };
    // Release pairs with the Acquire in `boot_info`. A plain store (not an atomic
    // read-modify-write), so it is fine with the MMU off.
    READY.store(true, Ordering::Release);
    Ok(boot_info())
}

/// What the exit and early-report paths need, found before the rest of the DTB is
/// parsed (by [`early_devices`]) so that a failure further on can still be reported and
/// end the run. The caller sets them up; this module configures nothing.
#[derive(Clone, Copy, Debug)]
pub struct EarlyDevices {
    /// The console PL011 (size 0: none).
    pub uart: Region,
    /// How PSCI calls are made, if the DTB says (`/psci` `method`).
    pub psci: Option<Conduit>,
}

/// Finds the console UART and the PSCI conduit in the DTB at `dtb`. Boot CPU, MMU off.
///
/// # Safety
/// As for [`parse`]: `dtb` must point to a readable FDT blob that nothing writes while
/// this runs.
pub unsafe fn early_devices(dtb: usize) -> Result<EarlyDevices, DtbError> {
    // SAFETY: the caller guarantees a readable FDT at `dtb`; Fdt::from_ptr validates the
    // header and bounds every access by `totalsize`.
    let fdt = unsafe { Fdt::from_ptr(dtb as *const u8) }.map_err(|_| DtbError::BadHeader(dtb))?;
    Ok(EarlyDevices {
        uart: find_uart(&fdt).0,
        psci: find_psci(&fdt),
    })
}

/// The console PL011 (the stdout-path node if it is a PL011, else the first PL011;
/// size 0: none) and its reference clock.
fn find_uart(fdt: &Fdt<'_>) -> (Region, Option<u32>) {
    let stdout = fdt
        .find_node("/chosen")
        .and_then(|c| prop_str(c, "stdout-path"))
        .map(|p| p.split(':').next().unwrap_or(p))
        .and_then(|p| fdt.find_node(p))
        .filter(|n| is_compatible(*n, "arm,pl011"));
    let uart_node = stdout.or_else(|| fdt.all_nodes().find(|n| is_compatible(*n, "arm,pl011")));
    let uart = uart_node.and_then(|n| reg_entry(n, 0)).unwrap_or_default();
    (uart, uart_node.and_then(|n| uart_clock(fdt, n)))
}

/// The PSCI conduit (`/psci`, or the first PSCI-compatible node: its `method`).
fn find_psci(fdt: &Fdt<'_>) -> Option<Conduit> {
    let psci = fdt.find_node("/psci").or_else(|| {
        fdt.all_nodes().find(|n| {
            is_compatible(*n, "arm,psci-1.0")
                || is_compatible(*n, "arm,psci-0.2")
                || is_compatible(*n, "arm,psci")
        })
    })?;
    match prop_str(psci, "method") {
        Some("hvc") => Some(Conduit::Hvc),
        Some("smc") => Some(Conduit::Smc),
        _ => None,
    }
}

/// The PL011's `uartclk` frequency: the `clocks` phandle named "uartclk" in
/// `clock-names` (else the first), resolved to its `clock-frequency`.
fn uart_clock(fdt: &Fdt<'_>, uart: FdtNode<'_, '_>) -> Option<u32> {
    let clocks = uart.property("clocks")?.value;
    let index = uart
        .property("clock-names")
        .and_then(|names| names.value.split(|&b| b == 0).position(|n| n == b"uartclk"))
        .unwrap_or(0);
    // Fixed clocks have #clock-cells = 0, so each entry is a single phandle.
    let phandle = u32::from_be_bytes(clocks.get(index * 4..index * 4 + 4)?.try_into().ok()?);
    let clock = fdt.find_phandle(phandle)?;
    prop_u32(clock, "clock-frequency")
}
