//! GICv3 (or v4) interrupt controller: arm-gic for set-up, direct system-register
//! accesses for everything per-CPU and hot.
//!
//! The `GicV3` driver object sits behind a spin lock and is used only for the
//! distributor's set-up in [`init`] (boot CPU). Each CPU sets up its own redistributor
//! in [`init_cpu`] through an arm-gic `GicRedistributor` on its own frame, found by
//! affinity in any of the DTB's redistributor regions: no lock, so hundreds of CPUs
//! coming up at once do not queue (the wake, GICR_WAKER, is by hand: arm-gic's waits
//! without bound). SGIs go out in the fewest ICC_SGI1R_EL1 writes (see [`send_sgi`]).
//! Acknowledge, end-of-interrupt, SGI generation and the priority mask
//! are CPU-interface system registers, accessed here with `asm!` (no lock, and not
//! `nomem`, so each is also a compiler barrier; the arm-gic/arm-sysregs accessors are
//! `nomem`). So a CPU that sends an SGI or handles one never waits for a lock another
//! CPU might hold with interrupts masked.
//!
//! Priorities are multiples of 8 (QEMU implements 5 priority bits). All SGIs are
//! Group 1 Non-secure and enabled on every CPU, at [`DEFAULT_PRIORITY`] except two:
//! the NMI SGI ([`NMI_SGI`]) and the stop IPI ([`STOP_SGI`]). With NMIs (see
//! [`super::nmi_mode`]) both are NMI-class: priority [`PRIO_NMI`], below the
//! "IRQs off" mask [`PMR_IRQOFF`], and with FEAT_NMI also the GIC NMI
//! property (GICR_INMIR0), i.e. superpriority. Without NMIs the NMI SGI is never sent
//! and the stop IPI is a normal interrupt at [`STOP_SGI_PRIORITY`]. The priority mask
//! runs at [`PMR_NORMAL`] ("IRQs on"), which admits everything.
//!
//! Memory ordering of an SGI: the sender executes `DSB ISHST` before writing
//! ICC_SGI1R_EL1, so its earlier stores are visible before the SGI can be taken; the
//! receiver executes `DSB SY` right after reading ICC_IAR1_EL1, so its handler's
//! memory accesses come after the acknowledge (the pattern Linux uses).

use super::dtb::BootInfo;
use super::nmi_mode::{self, PMR_IRQOFF, PMR_IRQON, PRIO_NMI};
use super::{cpu, irqflags, smp, timer};
use crate::{CpuSet, MAX_CPUS};
use arm_gic::IntId;
use arm_gic::UniqueMmioPointer;
use arm_gic::gicv3::registers::{Gicd, GicrSgi};
use arm_gic::gicv3::{GicCpuInterface, GicError, GicRedistributor, GicV3, Group};
use core::arch::asm;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, AtomicUsize, Ordering};

/// The SGI used as the NMI IPI (see [`super::nmi`]).
pub const NMI_SGI: u32 = 0;
/// The SGI that asks a CPU to join the stop-machine rendezvous.
pub const STOP_SGI: u32 = 1;
/// The SGI that releases the secondaries from their bring-up sleep (see
/// `smp::wait_for_bringup`); its handler does nothing.
pub const WAKE_SGI: u32 = 7;
/// SGIs reserved for tests (no meaning to the kernel itself).
pub const TEST_SGIS: [u32; 4] = [2, 3, 4, 5];
/// Priority of [`STOP_SGI`] when there are no NMIs (`pseudo_nmi=off`); with NMIs it is
/// [`PRIO_NMI`]. Above (numerically below) [`DEFAULT_PRIORITY`], and at or
/// above the "IRQs off" mask, so it stays a normal interrupt.
pub const STOP_SGI_PRIORITY: u8 = 0x80;
/// Priority of every other SGI.
pub const DEFAULT_PRIORITY: u8 = 0xa0;
/// The priority mask of "IRQs on" ([`PMR_IRQON`]): admits all of the above.
pub const PMR_NORMAL: u8 = PMR_IRQON;

const _: () = assert!(PRIO_NMI < PMR_IRQOFF && PMR_IRQOFF < DEFAULT_PRIORITY);
const _: () = assert!(STOP_SGI_PRIORITY >= PMR_IRQOFF && DEFAULT_PRIORITY < PMR_IRQON);

/// The INTID the CPU interface returns when nothing is pending.
pub const SPURIOUS: u32 = 1023;
/// The INTID ICC_IAR1_EL1 returns when the highest-priority pending interrupt is an NMI
/// (superpriority, SCTLR_EL1.NMI set): acknowledge it with ICC_NMIAR1_EL1 instead.
pub const INTID_NMI: u32 = 1022;
/// The first special INTID (1020-1023).
pub const INTID_SPECIAL_FIRST: u32 = 1020;
/// GICR_INMIR0: the NMI property of SGIs and PPIs (offset in the SGI_base frame).
const GICR_INMIR0: usize = 0x0f80;
/// GICD_TYPER.
const GICD_TYPER: usize = 0x0004;

/// Number of SGIs.
pub const SGI_COUNT: usize = 16;

/// The driver object, for the distributor's set-up only (each CPU sets up its own
/// redistributor through its own frame, without a lock: see [`init_cpu`]).
static GIC: spin::Once<spin::Mutex<GicV3<'static>>> = spin::Once::new();

/// Redistributor frame base of each logical CPU (0: none).
static RD_BASE: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// Number of logical CPUs.
static CPU_COUNT: AtomicUsize = AtomicUsize::new(0);

/// SGI target groups: the CPUs that one ICC_SGI1R_EL1 write can name together, i.e.
/// those with the same Aff3.Aff2.Aff1 and the same range (Aff0[7:4], the RS field).
/// `GROUP_KEY[g]` is that write without INTID and target list; `GROUP_OF[cpu]` is the
/// CPU's group and `TARGET_BIT[cpu]` its bit (Aff0[3:0]) in the target list. Written
/// by [`init`] before any SGI is sent, read-only afterwards.
static GROUP_KEY: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static GROUP_OF: [AtomicU16; MAX_CPUS] = [const { AtomicU16::new(0) }; MAX_CPUS];
static TARGET_BIT: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];
/// Number of SGI target groups.
static GROUP_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Whether both the distributor and the CPU interface take range-selected SGIs.
static RANGE_SELECTOR: AtomicBool = AtomicBool::new(false);

/// ICC_SGI1R_EL1.IRM: "all PEs but the sender" (the target fields are ignored).
const SGI1R_IRM: u64 = 1 << 40;
/// GICD_TYPER.RSS: the distributor takes range-selected SGIs (Aff0 up to 255).
const GICD_TYPER_RSS: u32 = 1 << 26;
/// ICC_CTLR_EL1.RSS: the CPU interface sends range-selected SGIs.
const ICC_CTLR_RSS: u64 = 1 << 18;
/// How long a redistributor may take to wake (GICR_WAKER.ChildrenAsleep to clear).
pub const WAKE_TIMEOUT_NS: u64 = 100_000_000;

/// SGI handlers: a `fn(usize)` as usize, 0 = none.
static HANDLERS: [AtomicUsize; SGI_COUNT] = [const { AtomicUsize::new(0) }; SGI_COUNT];
/// Interrupts taken per SGI, per CPU (for tests and diagnostics).
static SGI_COUNTS: [[AtomicU64; SGI_COUNT]; MAX_CPUS] =
    [const { [const { AtomicU64::new(0) }; SGI_COUNT] }; MAX_CPUS];
/// Interrupts that had no handler or were not SGIs.
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);

/// ICC system registers by encoding (the assembler needs no GIC feature for these).
macro_rules! icc_read {
    ($enc:literal) => {{
        let v: u64;
        // SAFETY: reading a GIC CPU-interface register; EL1 access is enabled (SRE, and
        // ICC_SRE_EL2.Enable when entered at EL2). Not `nomem`: see the module docs.
        unsafe { asm!(concat!("mrs {}, ", $enc), out(reg) v, options(nostack, preserves_flags)) };
        v
    }};
}

/// Why the GIC could not be set up.
#[derive(Debug)]
pub enum GicInitError {
    /// No redistributor frame in the DTB's GICR regions has this CPU's affinity.
    NoRedistributor {
        /// Logical CPU.
        cpu: usize,
        /// Its MPIDR affinity.
        mpidr: u64,
        /// Redistributor frames found, over how many regions.
        frames: usize,
        /// Regions searched.
        regions: usize,
    },
    /// A CPU's Aff0 is 16 or more, but the GIC cannot send range-selected SGIs
    /// (GICD_TYPER.RSS or ICC_CTLR_EL1.RSS is 0), so no SGI could reach it.
    NotTargetable {
        /// Logical CPU.
        cpu: usize,
        /// Its MPIDR affinity.
        mpidr: u64,
    },
    /// A CPU's redistributor did not wake (GICR_WAKER.ChildrenAsleep stayed set).
    WakeTimeout {
        /// Logical CPU.
        cpu: usize,
    },
    /// The arm-gic driver refused the configuration.
    Driver(GicError),
}

impl fmt::Display for GicInitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GicInitError::NoRedistributor {
                cpu,
                mpidr,
                frames,
                regions,
            } => write!(
                f,
                "no GIC redistributor for cpu{cpu} (MPIDR {mpidr:#x}) among the {frames} \
                 frames of the DTB's {regions} redistributor region(s)"
            ),
            GicInitError::NotTargetable { cpu, mpidr } => write!(
                f,
                "cpu{cpu} (MPIDR {mpidr:#x}) has Aff0 >= 16, but the GIC has no \
                 range-selector SGIs (GICD_TYPER.RSS/ICC_CTLR_EL1.RSS = 0)"
            ),
            GicInitError::WakeTimeout { cpu } => write!(
                f,
                "cpu{cpu}: the redistributor did not wake (GICR_WAKER.ChildrenAsleep) \
                 within {} ms",
                WAKE_TIMEOUT_NS / 1_000_000
            ),
            GicInitError::Driver(e) => write!(f, "arm-gic: {e}"),
        }
    }
}

/// GICR_TYPER (offset 0x8 of an RD frame).
fn gicr_typer(frame: usize) -> u64 {
    // SAFETY: `frame` is an RD frame inside the DTB's GICR region, mapped as device
    // memory; GICR_TYPER is a 64-bit read-only register.
    unsafe { core::ptr::read_volatile((frame + 0x8) as *const u64) }
}

/// Sets up the distributor and the boot CPU's redistributor and CPU interface. Boot
/// CPU, once, after the MMU is on.
///
/// # Safety
/// `info.gicd`/`info.gicr` must be the GIC's registers, mapped as device memory, used by
/// nothing but this module.
pub unsafe fn init(info: &BootInfo) -> Result<(), GicInitError> {
    let count = info.cpu_count;
    CPU_COUNT.store(count, Ordering::Relaxed);
    let mpidrs = info.cpu_mpidrs();

    // Find each CPU's redistributor by affinity (GICR_TYPER[63:32]) in every region the
    // DTB gives. Frames are 128 KiB (RD + SGI), or 256 KiB with virtual LPIs (GICv4:
    // + VLPI + reserved); each region ends at its size or at GICR_TYPER.Last.
    let mut frames = 0;
    let mut first_region_frames = 0;
    for (region_index, region) in info.gicr_regions().iter().enumerate() {
        let stride = if gicr_typer(region.base) & (1 << 1) != 0 {
            0x4_0000
        } else {
            0x2_0000
        };
        let mut frame = region.base;
        while frame + stride <= region.end() {
            let typer = gicr_typer(frame);
            let aff = typer >> 32;
            let mpidr = (aff & 0xff00_0000) << 8 | (aff & 0x00ff_ffff);
            if let Some(cpu) = mpidrs.iter().position(|&m| m == mpidr) {
                RD_BASE[cpu].store(frame, Ordering::Relaxed);
            }
            frames += 1;
            if region_index == 0 {
                first_region_frames += 1;
            }
            frame += stride;
            if typer & (1 << 4) != 0 {
                break; // GICR_TYPER.Last
            }
        }
    }
    if let Some(cpu) = (0..count).find(|&c| RD_BASE[c].load(Ordering::Relaxed) == 0) {
        return Err(GicInitError::NoRedistributor {
            cpu,
            mpidr: info.mpidrs[cpu],
            frames,
            regions: info.gicr_regions,
        });
    }
    group_targets(mpidrs);

    let gicd = NonNull::new(info.gicd.base as *mut Gicd).expect("GICD base is not null");
    let gicr = NonNull::new(info.gicr.base as *mut GicrSgi).expect("GICR base is not null");
    // SAFETY: the caller guarantees this is the distributor, mapped as device memory and
    // used by nothing else.
    let gicd = unsafe { UniqueMmioPointer::new(gicd) };
    // SAFETY: as above for the first redistributor region; `first_region_frames` frames
    // exist there (we just walked them). The driver object never touches a
    // redistributor here: each CPU sets up its own in `init_cpu`.
    let mut gic =
        unsafe { GicV3::new(gicd, gicr, first_region_frames) }.map_err(GicInitError::Driver)?;
    // Affinity routing, Group 1 enabled, all SPIs Group 1 NS, disabled.
    gic.distributor().configure_default_settings();
    gic.gicd_barrier();
    GIC.call_once(|| spin::Mutex::new(gic));
    // SAFETY: GICD_TYPER of the distributor the caller vouched for; a read-only
    // register, no side effect.
    let typer = unsafe { core::ptr::read_volatile((info.gicd.base + GICD_TYPER) as *const u32) };
    nmi_mode::select_mode(
        info.bootarg("pseudo_nmi"),
        info.bootarg("platform_feat_nmi") != Some("off"),
        typer,
    );
    init_cpu(0)?;
    // Range-selected SGIs are needed only for a CPU with Aff0 >= 16.
    let rss = typer & GICD_TYPER_RSS != 0 && icc_read!("S3_0_C12_C12_4") & ICC_CTLR_RSS != 0;
    RANGE_SELECTOR.store(rss, Ordering::Relaxed);
    if !rss && let Some(cpu) = mpidrs.iter().position(|&m| m & 0xf0 != 0) {
        return Err(GicInitError::NotTargetable {
            cpu,
            mpidr: mpidrs[cpu],
        });
    }
    Ok(())
}

/// Splits the CPUs into SGI target groups (see [`GROUP_KEY`]). Boot CPU, in [`init`].
fn group_targets(mpidrs: &[u64]) {
    let mut groups = 0;
    for (cpu, &m) in mpidrs.iter().enumerate() {
        let aff1 = (m >> 8) & 0xff;
        let rs = (m >> 4) & 0xf;
        let aff2 = (m >> 16) & 0xff;
        let aff3 = (m >> 32) & 0xff;
        let key = aff3 << 48 | rs << 44 | aff2 << 32 | aff1 << 16;
        let group = (0..groups)
            .find(|&g| GROUP_KEY[g].load(Ordering::Relaxed) == key)
            .unwrap_or_else(|| {
                GROUP_KEY[groups].store(key, Ordering::Relaxed);
                groups += 1;
                groups - 1
            });
        GROUP_OF[cpu].store(group as u16, Ordering::Relaxed);
        TARGET_BIT[cpu].store((m & 0xf) as u8, Ordering::Relaxed);
    }
    GROUP_COUNT.store(groups, Ordering::Relaxed);
}

/// Wakes the redistributor at `rd` (GICR_WAKER.ProcessorSleep = 0) and waits, bounded,
/// for ChildrenAsleep to clear. By hand: arm-gic's `mark_core_awake` waits unbounded.
fn wake_redistributor(cpu: usize, rd: usize) -> Result<(), GicInitError> {
    const GICR_WAKER: usize = 0x14;
    const PROCESSOR_SLEEP: u32 = 1 << 1;
    const CHILDREN_ASLEEP: u32 = 1 << 2;
    let waker = (rd + GICR_WAKER) as *mut u32;
    // SAFETY: GICR_WAKER of this CPU's own redistributor frame (found in `init`),
    // mapped as device memory; only this CPU writes it.
    unsafe { core::ptr::write_volatile(waker, core::ptr::read_volatile(waker) & !PROCESSOR_SLEEP) };
    let start = timer::now_ns();
    // SAFETY: as above; a read has no side effect.
    while unsafe { core::ptr::read_volatile(waker) } & CHILDREN_ASLEEP != 0 {
        if timer::now_ns().wrapping_sub(start) > WAKE_TIMEOUT_NS {
            return Err(GicInitError::WakeTimeout { cpu });
        }
        cpu::relax();
    }
    Ok(())
}

/// The priority of SGI `sgi` in the mode chosen at boot.
fn sgi_priority(sgi: u32) -> u8 {
    let nmis = nmi_mode::pseudo_nmi_enabled();
    if nmis && (sgi == STOP_SGI || sgi == NMI_SGI) {
        PRIO_NMI
    } else if sgi == STOP_SGI {
        STOP_SGI_PRIORITY
    } else {
        DEFAULT_PRIORITY
    }
}

/// The GICR_INMIR0 value of the mode chosen at boot: the NMI SGIs are superpriority
/// interrupts with FEAT_NMI, nothing otherwise.
fn inmir0() -> u32 {
    if nmi_mode::feat_nmi_in_use() {
        1 << STOP_SGI | 1 << NMI_SGI
    } else {
        0
    }
}

/// Sets up the calling CPU's redistributor and CPU interface: wakes the redistributor,
/// makes every SGI Group 1 NS at its priority (and NMI property), enables them, sets the
/// priority mask to [`PMR_NORMAL`] and enables Group 1 interrupts. Interrupts stay
/// masked in DAIF.
pub fn init_cpu(cpu: usize) -> Result<(), GicInitError> {
    let rd = RD_BASE[cpu].load(Ordering::Relaxed);
    assert!(rd != 0 && GIC.get().is_some(), "gic::init ran");
    GicCpuInterface::enable_system_register_el1();
    wake_redistributor(cpu, rd)?;
    // ICC_CTLR_EL1 = 0 (EOI deactivates, no PMR hint), as arm-gic's `init_cpu` does.
    // SAFETY: CPU-interface configuration of the calling CPU only.
    unsafe {
        asm!(
            "msr S3_0_C12_C12_4, xzr",
            "isb",
            options(nostack, preserves_flags)
        )
    };
    {
        // SAFETY: `rd` is this CPU's redistributor frame, found in `init`, mapped as
        // device memory; only this CPU configures it (other CPUs only read its
        // pending and NMI registers), so this pointer is its only writer.
        let regs = unsafe { UniqueMmioPointer::new(NonNull::new(rd as *mut GicrSgi).expect("rd")) };
        let mut redist = GicRedistributor::new(regs);
        redist.configure_default_settings();
        for sgi in 0..SGI_COUNT as u32 {
            let id = IntId::sgi(sgi);
            redist
                .set_group(id, Group::Group1NS)
                .map_err(GicInitError::Driver)?;
            redist
                .set_interrupt_priority(id, sgi_priority(sgi))
                .map_err(GicInitError::Driver)?;
        }
        // The NMI property is set while the SGIs are still disabled (arm-gic's
        // `configure_default_settings` disabled them; Linux, too, refuses to change the
        // NMI property of an enabled interrupt).
        let sgi_frame = rd + 0x1_0000;
        // SAFETY: GICR_INMIR0 of this CPU's redistributor (found in `init`), mapped as
        // device memory; RES0 (writes ignored) on a GIC without the NMI extension, and
        // written non-zero only if GICD_TYPER.NMI said the GIC has it.
        unsafe { core::ptr::write_volatile((sgi_frame + GICR_INMIR0) as *mut u32, inmir0()) };
        for sgi in 0..SGI_COUNT as u32 {
            redist
                .enable_interrupt(IntId::sgi(sgi), true)
                .map_err(GicInitError::Driver)?;
        }
        redist.wait_for_pending_write();
    }
    // SAFETY: CPU-interface configuration of the calling CPU only: binary point 0, the
    // normal priority mask, Group 1 on. DAIF still masks IRQs.
    unsafe {
        asm!(
            "isb",
            "msr S3_0_C12_C12_3, xzr", // ICC_BPR1_EL1
            "msr S3_0_C4_C6_0, {pmr}", // ICC_PMR_EL1
            "msr S3_0_C12_C12_7, {one}", // ICC_IGRPEN1_EL1
            "isb",
            pmr = in(reg) PMR_NORMAL as u64,
            one = in(reg) 1u64,
            options(nostack, preserves_flags),
        )
    };
    // ICC_CTLR_EL1 as arm-gic left it (PMHE may be forced by EL3).
    nmi_mode::note_cpu_interface(cpu, icc_read!("S3_0_C12_C12_4"));
    Ok(())
}

/// GICR_INMIR0 of `cpu`'s redistributor: bit n set = SGI/PPI n has the NMI property.
pub fn nmi_property(cpu: usize) -> u32 {
    let base = RD_BASE.get(cpu).map_or(0, |b| b.load(Ordering::Relaxed));
    if base == 0 {
        return 0;
    }
    // SAFETY: GICR_INMIR0 of a redistributor found in `init`, mapped as device memory;
    // reading it has no side effect.
    unsafe { core::ptr::read_volatile((base + 0x1_0000 + GICR_INMIR0) as *const u32) }
}

/// Registers `handler(cpu)` for SGI `sgi` (replacing any earlier one). It runs in IRQ
/// context with every exception masked, on the CPU that took the SGI.
pub fn set_sgi_handler(sgi: u32, handler: fn(usize)) {
    assert!((sgi as usize) < SGI_COUNT, "SGI {sgi} out of range");
    // Release pairs with the Acquire in `dispatch`: whatever the handler relies on that
    // was set up before registration is visible when it runs.
    HANDLERS[sgi as usize].store(handler as usize, Ordering::Release);
}

/// Removes the handler of SGI `sgi`.
pub fn clear_sgi_handler(sgi: u32) {
    assert!((sgi as usize) < SGI_COUNT, "SGI {sgi} out of range");
    HANDLERS[sgi as usize].store(0, Ordering::Release);
}

/// Sends SGI `sgi` to every CPU in `targets` (the caller only if it is in the set).
/// CPUs beyond the machine's CPU count are ignored. Lock-free; callable with
/// interrupts masked. Returns the number of ICC_SGI1R_EL1 writes it took.
///
/// The fewest writes the GICv3 allows: one with IRM = 1 ("every PE but the sender")
/// when `targets` is every CPU but the caller and every CPU is online (IRM also reaches
/// a CPU that is not, so only then is it exactly `targets`); otherwise one per SGI
/// target group (same Aff3.Aff2.Aff1 and range selector, up to 16 CPUs), with the
/// group's CPUs in its target list. QEMU `virt` packs 16 CPUs per Aff1 cluster, so 511
/// targets of 512 that are not "all others" take 32 writes.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_sgi(sgi: u32, targets: CpuSet) -> usize {
    assert!((sgi as usize) < SGI_COUNT, "SGI {sgi} out of range");
    let all = CpuSet::first(CPU_COUNT.load(Ordering::Relaxed));
    let targets = targets.and(all);
    if targets.is_empty() {
        return 0;
    }
    let intid = (sgi as u64) << 24;
    // SAFETY: barrier only: our earlier stores are visible before any target can take
    // the SGI (pairs with the DSB after the acknowledge in `read_iar1`).
    unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) };
    let me = cpu::current_cpu();
    let writes = if targets == all.without(me) && smp::online_cpus() == all {
        write_sgi1r(SGI1R_IRM | intid);
        1
    } else {
        let mut lists = [0u16; MAX_CPUS];
        let groups = GROUP_COUNT.load(Ordering::Relaxed);
        // `get`, not indexing: a bounds-check panic would leave `.text.nopatch`.
        for cpu in targets.iter() {
            let (Some(group), Some(bit)) = (GROUP_OF.get(cpu), TARGET_BIT.get(cpu)) else {
                continue;
            };
            if let Some(list) = lists.get_mut(group.load(Ordering::Relaxed) as usize) {
                *list |= 1 << (bit.load(Ordering::Relaxed) & 0xf);
            }
        }
        let mut writes = 0;
        for (key, &list) in GROUP_KEY.iter().zip(&lists).take(groups) {
            if list != 0 {
                write_sgi1r(key.load(Ordering::Relaxed) | intid | list as u64);
                writes += 1;
            }
        }
        writes
    };
    // SAFETY: barrier only: the SGI writes take effect before we go on.
    unsafe { asm!("isb", options(nostack, preserves_flags)) };
    writes
}

/// One ICC_SGI1R_EL1 write.
#[inline(always)]
fn write_sgi1r(value: u64) {
    // SAFETY: generates an SGI; ICC_SGI1R_EL1 is enabled for EL1.
    unsafe { asm!("msr S3_0_C12_C11_5, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// The ICC_SGI1R_EL1 value (without INTID) of the SGI target group `cpu` is in, and its
/// bit in that group's target list: what [`send_sgi`] writes for it.
pub fn sgi_target(cpu: usize) -> (u64, u16) {
    let group = GROUP_OF[cpu].load(Ordering::Relaxed) as usize;
    (
        GROUP_KEY[group].load(Ordering::Relaxed),
        1 << TARGET_BIT[cpu].load(Ordering::Relaxed),
    )
}

/// Whether the GIC takes range-selected SGIs (GICD_TYPER.RSS and ICC_CTLR_EL1.RSS):
/// without, only CPUs with Aff0 < 16 can be targeted and the RS field must be 0.
pub fn range_selector_supported() -> bool {
    RANGE_SELECTOR.load(Ordering::Relaxed)
}

/// Number of SGI target groups (the most writes [`send_sgi`] takes).
pub fn sgi_groups() -> usize {
    GROUP_COUNT.load(Ordering::Relaxed)
}

/// Sends SGI `sgi` to the calling CPU.
pub fn send_sgi_self(sgi: u32) {
    send_sgi(sgi, CpuSet::single(cpu::current_cpu()));
}

/// Whether SGI `sgi` is pending at `cpu`'s redistributor (GICR_ISPENDR0).
pub fn pending_sgi(cpu: usize, sgi: u32) -> bool {
    let base = RD_BASE.get(cpu).map_or(0, |b| b.load(Ordering::Relaxed));
    if base == 0 || sgi as usize >= SGI_COUNT {
        return false;
    }
    // SAFETY: GICR_ISPENDR0 (SGI frame + 0x200) of a redistributor found in `init`,
    // mapped as device memory; reading it has no side effect.
    let pend = unsafe { core::ptr::read_volatile((base + 0x1_0000 + 0x200) as *const u32) };
    pend & (1 << sgi) != 0
}

/// How many times `cpu` has taken SGI `sgi`.
pub fn sgi_count(cpu: usize, sgi: u32) -> u64 {
    SGI_COUNTS[cpu][sgi as usize].load(Ordering::Relaxed)
}

/// Interrupts taken that were not SGIs with a handler.
pub fn unexpected_interrupts() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// The calling CPU's priority mask (ICC_PMR_EL1).
pub fn priority_mask() -> u8 {
    icc_read!("S3_0_C4_C6_0") as u8
}

/// Sets the calling CPU's priority mask (ICC_PMR_EL1): only interrupts of numerically
/// lower priority are signalled. Followed by `DSB SY` if ICC_CTLR_EL1.PMHE asks for it
/// (see [`super::irqflags`]) and an ISB, so newly admitted interrupts are taken right
/// here. Prefer [`super::irqflags::local_irq_save`] and friends; an exception return puts back the
/// PMR the exception interrupted.
pub fn set_priority_mask(pmr: u8) {
    irqflags::pmr_write(pmr);
    cpu::isb();
}

/// The calling CPU's running priority (ICC_RPR_EL1; 0xff when idle).
pub fn running_priority() -> u8 {
    icc_read!("S3_0_C12_C11_3") as u8
}

/// The running priority, for the IRQ path (inlined: it runs in `.text.nopatch`).
#[inline(always)]
pub(crate) fn running_priority_now() -> u8 {
    icc_read!("S3_0_C12_C11_3") as u8
}

/// The INTID field of an acknowledge value.
#[inline(always)]
pub(crate) fn intid(iar: u64) -> u32 {
    (iar & 0xff_ffff) as u32
}

/// Acknowledges the highest-priority pending Group 1 interrupt (ICC_IAR1_EL1); returns
/// [`INTID_NMI`] instead if that is a superpriority interrupt (FEAT_NMI).
#[inline(always)]
pub(crate) fn read_iar1() -> u64 {
    let iar: u64;
    // SAFETY: acknowledges an interrupt (the caller ends it with `eoi`). The DSB orders
    // the handler's memory accesses after the acknowledge (see module docs).
    unsafe {
        asm!(
            "mrs {}, S3_0_C12_C12_0", // ICC_IAR1_EL1
            "dsb sy",
            out(reg) iar,
            options(nostack, preserves_flags),
        )
    };
    iar
}

/// Acknowledges the highest-priority pending NMI (ICC_NMIAR1_EL1, FEAT_NMI + GICv3.3).
#[inline(always)]
pub(crate) fn read_nmiar1() -> u64 {
    let iar: u64;
    // SAFETY: as for `read_iar1`; only called after IAR1 returned INTID_NMI, so the CPU
    // has FEAT_NMI and the GIC the NMI extension.
    unsafe {
        asm!(
            "mrs {}, S3_0_C12_C9_5", // ICC_NMIAR1_EL1
            "dsb sy",
            out(reg) iar,
            options(nostack, preserves_flags),
        )
    };
    iar
}

/// Ends (priority drop + deactivate, EOImode 0) an acknowledged interrupt.
#[inline(always)]
pub(crate) fn eoi(iar: u64) {
    // SAFETY: ends the interrupt the caller acknowledged (acknowledges and EOIs nest).
    unsafe {
        asm!(
            "msr S3_0_C12_C12_1, {}", // ICC_EOIR1_EL1
            "isb",
            in(reg) iar,
            options(nostack, preserves_flags),
        )
    };
}

/// Counts an SGI taken by `cpu`.
#[inline(always)]
pub(crate) fn count_interrupt(cpu: usize, intid: u32) {
    if let Some(count) = SGI_COUNTS.get(cpu).and_then(|c| c.get(intid as usize)) {
        // LSE STADD where the CPU has it (a boot alternative).
        super::atomic::add_relaxed_nopatch(count, 1);
    }
}

/// Counts and runs the registered handler of SGI `intid`, or reports it as unexpected.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn dispatch(cpu: usize, intid: u32) {
    if (intid as usize) < SGI_COUNT {
        count_interrupt(cpu, intid);
        // Acquire pairs with the Release in `set_sgi_handler`.
        let handler = HANDLERS[intid as usize].load(Ordering::Acquire);
        if handler != 0 {
            // SAFETY: only `set_sgi_handler` stores non-zero values, and those are
            // `fn(usize)` pointers.
            let handler: fn(usize) = unsafe { core::mem::transmute(handler) };
            handler(cpu);
            return;
        }
    }
    UNEXPECTED.fetch_add(1, Ordering::Relaxed);
    crate::kprintln!("cpu{cpu}: unexpected interrupt {intid} (no handler); ignored");
}
