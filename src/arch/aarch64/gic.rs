//! GICv3 (or v4) interrupt controller: arm-gic for set-up, direct system-register
//! accesses for everything per-CPU and hot.
//!
//! The `GicV3` driver object (distributor and redistributor MMIO) sits behind a spin
//! lock and is used only at set-up: [`init`] on the boot CPU, [`init_cpu`] on each CPU
//! as it comes up. Acknowledge, end-of-interrupt, SGI generation and the priority mask
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
use super::{cpu, irqflags};
use crate::{CpuSet, MAX_CPUS};
use arm_gic::IntId;
use arm_gic::UniqueMmioPointer;
use arm_gic::gicv3::registers::{Gicd, GicrSgi};
use arm_gic::gicv3::{GicError, GicV3, Group};
use core::arch::asm;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The SGI used as the NMI IPI (see [`super::nmi`]).
pub const NMI_SGI: u32 = 0;
/// The SGI that asks a CPU to join the stop-machine rendezvous.
pub const STOP_SGI: u32 = 1;
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

/// The driver object, for set-up only.
static GIC: spin::Once<spin::Mutex<GicV3<'static>>> = spin::Once::new();

/// Redistributor index (in the GICR region) of each logical CPU.
static RD_INDEX: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(usize::MAX) }; MAX_CPUS];
/// Redistributor frame base of each logical CPU (0: none).
static RD_BASE: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// MPIDR affinity of each logical CPU, for SGI targeting.
static MPIDR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Number of logical CPUs.
static CPU_COUNT: AtomicUsize = AtomicUsize::new(0);

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
    /// No redistributor frame in the DTB's GICR region has this CPU's affinity.
    NoRedistributor {
        /// Logical CPU.
        cpu: usize,
        /// Its MPIDR affinity.
        mpidr: u64,
    },
    /// The arm-gic driver refused the configuration.
    Driver(GicError),
}

impl fmt::Display for GicInitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GicInitError::NoRedistributor { cpu, mpidr } => {
                write!(
                    f,
                    "no GIC redistributor for cpu{cpu} (MPIDR {mpidr:#x}) in the first \
                     redistributor region (the only one supported)"
                )
            }
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
    for (cpu, &m) in info.cpu_mpidrs().iter().enumerate() {
        MPIDR[cpu].store(m, Ordering::Relaxed);
    }

    // Find each CPU's redistributor by affinity (GICR_TYPER[63:32]). Frames are 128 KiB
    // (RD + SGI), or 256 KiB with virtual LPIs (GICv4: + VLPI + reserved).
    let base = info.gicr.base;
    let stride = if gicr_typer(base) & (1 << 1) != 0 {
        0x4_0000
    } else {
        0x2_0000
    };
    let mut frames = 0;
    let mut frame = base;
    while frame + stride <= info.gicr.end() {
        let typer = gicr_typer(frame);
        let aff = typer >> 32;
        let mpidr = (aff & 0xff00_0000) << 8 | (aff & 0x00ff_ffff);
        if let Some(cpu) = info.cpu_mpidrs().iter().position(|&m| m == mpidr) {
            RD_INDEX[cpu].store(frames, Ordering::Relaxed);
            RD_BASE[cpu].store(frame, Ordering::Relaxed);
        }
        frames += 1;
        frame += stride;
        if typer & (1 << 4) != 0 {
            break; // GICR_TYPER.Last
        }
    }
    if let Some(cpu) = (0..count).find(|&c| RD_BASE[c].load(Ordering::Relaxed) == 0) {
        return Err(GicInitError::NoRedistributor {
            cpu,
            mpidr: info.mpidrs[cpu],
        });
    }

    let gicd = NonNull::new(info.gicd.base as *mut Gicd).expect("GICD base is not null");
    let gicr = NonNull::new(base as *mut GicrSgi).expect("GICR base is not null");
    // SAFETY: the caller guarantees this is the distributor, mapped as device memory and
    // used by nothing else.
    let gicd = unsafe { UniqueMmioPointer::new(gicd) };
    // SAFETY: as above for the redistributors; `frames` frames exist (we just walked
    // them up to GICR_TYPER.Last).
    let mut gic = unsafe { GicV3::new(gicd, gicr, frames) }.map_err(GicInitError::Driver)?;
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
    init_cpu(0)
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
    let rd = RD_INDEX[cpu].load(Ordering::Relaxed);
    let gic = GIC.get().expect("gic::init ran");
    {
        let mut gic = gic.lock();
        gic.init_cpu(rd); // ICC_SRE_EL1.SRE, GICR_WAKER, ICC_CTLR_EL1 = 0 (EOI deactivates)
        let mut redist = gic.redistributor(rd).map_err(GicInitError::Driver)?;
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
        let sgi_frame = RD_BASE[cpu].load(Ordering::Relaxed) + 0x1_0000;
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
/// interrupts masked.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_sgi(sgi: u32, targets: CpuSet) {
    assert!((sgi as usize) < SGI_COUNT, "SGI {sgi} out of range");
    let count = CPU_COUNT.load(Ordering::Relaxed);
    let mut pending = targets.and(CpuSet::first(count));
    if pending.is_empty() {
        return;
    }
    // SAFETY: barrier only: our earlier stores are visible before any target can take
    // the SGI (pairs with the DSB after the acknowledge in `read_iar1`).
    unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) };
    while let Some(first) = pending.lowest() {
        // Aff3.Aff2.Aff1 and the range selector (Aff0[7:4]) identify one SGI1R write;
        // Aff0[3:0] selects the bit in its 16-bit target list.
        let key = MPIDR[first].load(Ordering::Relaxed) & !0xf;
        let mut list = 0u64;
        for cpu in pending {
            let m = MPIDR[cpu].load(Ordering::Relaxed);
            if m & !0xf == key {
                list |= 1 << (m & 0xf);
                pending = pending.without(cpu);
            }
        }
        let aff1 = (key >> 8) & 0xff;
        let rs = (key >> 4) & 0xf;
        let aff2 = (key >> 16) & 0xff;
        let aff3 = (key >> 32) & 0xff;
        let sgi1r = aff3 << 48 | rs << 44 | aff2 << 32 | (sgi as u64) << 24 | aff1 << 16 | list;
        // SAFETY: generates an SGI; ICC_SGI1R_EL1 is enabled for EL1.
        unsafe { asm!("msr S3_0_C12_C11_5, {}", in(reg) sgi1r, options(nostack, preserves_flags)) };
    }
    // SAFETY: barrier only: the SGI writes take effect before we go on.
    unsafe { asm!("isb", options(nostack, preserves_flags)) };
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
