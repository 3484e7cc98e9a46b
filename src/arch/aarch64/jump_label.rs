//! Static keys on arm64 (Linux's arch/arm64/include/asm/jump_label.h and
//! arch/arm64/kernel/jump_label.c): a site is one `NOP` or `B` (a CMODX pair, Arm ARM
//! B2.2.5), so a key's sites change through `patch_nosync` without stopping anyone.
//! The batch is written (one alias mapping and one DC CVAU/IC IVAU pass per page run)
//! and then synchronised once: an IPI to every other CPU, whose exception entry and
//! return are context synchronisation events ([`kick_all_cpus_sync`], Linux's
//! `arch_jump_label_transform_apply`). Until a CPU takes it, it may still execute the
//! old instruction: either is a valid instruction there.

use super::{Aarch64, gic, layout, smp, timer, user_context};
use crate::CpuSet;
use crate::patch::insn::{self, Insn, NOP};
use crate::patch::{Patch, PatchError, Text, patch_nosync};
use crate::static_key::{JumpEntry, KeyText, StaticKey, StaticKeys};
use crate::stop::StopError;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

/// A site that is a `NOP` while its key is disabled: `true` while the key is enabled
/// (Linux's `static_branch_unlikely`). The key must be a [`StaticKey`] defined with
/// [`define_static_key!`](crate::define_static_key).
#[macro_export]
macro_rules! static_branch_unlikely {
    ($key:path) => {{
        let mut enabled = false;
        // SAFETY: a NOP with a `__jump_table` entry (site, target, key, kind 0); the
        // static key code only ever makes it a `B` to the label or a NOP again.
        unsafe {
            ::core::arch::asm!(
                "998: nop",
                ".pushsection __jump_table, \"a\"",
                ".balign 8",
                ".quad 998b, {target}, {key}, 0",
                ".popsection",
                key = sym $key,
                target = label { enabled = true; },
                options(nomem, nostack, preserves_flags),
            )
        };
        enabled
    }};
}

/// A site that is a `NOP` while its key is enabled: `true` while the key is enabled,
/// laid out for that case (Linux's `static_branch_likely`; keys start disabled, so the
/// site starts as the branch).
#[macro_export]
macro_rules! static_branch_likely {
    ($key:path) => {{
        let mut enabled = true;
        // SAFETY: as in `static_branch_unlikely!`, kind 1, starting as the branch.
        unsafe {
            ::core::arch::asm!(
                "998: b {target}",
                ".pushsection __jump_table, \"a\"",
                ".balign 8",
                ".quad 998b, {target}, {key}, 1",
                ".popsection",
                key = sym $key,
                target = label { enabled = false; },
                options(nomem, nostack, preserves_flags),
            )
        };
        enabled
    }};
}

/// Sites per key at most (one batch; the buffer is static).
pub const MAX_SITES: usize = 256;

/// The SGI of [`kick_all_cpus_sync`] (not one of the stop, NMI or test SGIs).
pub const KICK_SGI: u32 = 6;
const _: () = assert!(
    KICK_SGI != gic::STOP_SGI
        && KICK_SGI != gic::NMI_SGI
        && (KICK_SGI as usize) < gic::SGI_COUNT
        && KICK_SGI > gic::TEST_SGIS[3]
);

/// How long [`kick_all_cpus_sync`] waits for the acknowledgements.
const KICK_TIMEOUT_NS: u64 = 1_000_000_000;

/// CPUs whose kick was deferred to their next kernel entry (isolated, in user mode).
static KICK_DEFERRED: AtomicU64 = AtomicU64::new(0);

/// How many kick targets were deferred to their next kernel entry so far.
pub fn kicks_deferred() -> u64 {
    KICK_DEFERRED.load(Ordering::Relaxed)
}

/// Generation of the latest kick.
static KICK_GEN: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the latest generation it took.
static KICK_ACK: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];

fn kick_handler(cpu: usize) {
    // Acquire pairs with the AcqRel increment in `kick_all_cpus_sync`.
    let generation = KICK_GEN.load(Ordering::Acquire);
    if let Some(ack) = KICK_ACK.get(cpu) {
        // Release pairs with the Acquire load in the wait. The ERET that ends this
        // handler synchronises the context before the CPU runs anything else.
        ack.store(generation, Ordering::Release);
    }
}

/// Makes every other online CPU take an interrupt (a context synchronisation event on
/// the way in and out) and waits for each to acknowledge: Linux's
/// `kick_all_cpus_sync`. A CPU spinning with IRQs masked cannot take it: the error
/// names it.
pub fn kick_all_cpus_sync() -> Result<(), StopError> {
    static INSTALLED: spin::Once<()> = spin::Once::new();
    INSTALLED.call_once(|| gic::set_sgi_handler(KICK_SGI, kick_handler));
    let me = smp::current_cpu();
    // AcqRel: Release orders our text writes before any target reads the generation
    // (`send_sgi`'s DSB ISHST makes them visible before the SGI).
    let generation = KICK_GEN.fetch_add(1, Ordering::AcqRel) + 1;
    // An isolated CPU in user mode synchronises at its next kernel entry instead: one
    // CAS on its context state word, after the writes (their maintenance is complete:
    // the CAS's Release orders them before the mark the entry acquires).
    let deferred = user_context::USER_CONTEXTS.defer(smp::online_cpus().without(me), None);
    KICK_DEFERRED.fetch_add(deferred.len() as u64, Ordering::Relaxed);
    let others = smp::online_cpus().without(me).minus(deferred);
    if others.is_empty() {
        return Ok(());
    }
    gic::send_sgi(KICK_SGI, others);
    let start = timer::now_ns();
    loop {
        // Acquire pairs with the Release in `kick_handler`.
        let missing = others
            .iter()
            .filter(|&c| KICK_ACK[c].load(Ordering::Acquire) < generation)
            .fold(CpuSet::EMPTY, CpuSet::with);
        if missing.is_empty() {
            return Ok(());
        }
        let waited_ns = timer::now_ns().saturating_sub(start);
        if waited_ns > KICK_TIMEOUT_NS {
            return Err(StopError::Timeout { missing, waited_ns });
        }
        // SAFETY: a hint; under single-threaded TCG it lets the targets run.
        unsafe { core::arch::asm!("yield", options(nomem, nostack, preserves_flags)) };
    }
}

/// Kicks so far (one per static key batch): with [`kick_acked`], what the self-test
/// checks a flip synchronised.
pub fn kick_generation() -> u64 {
    KICK_GEN.load(Ordering::Acquire)
}

/// The latest kick `cpu` took.
pub fn kick_acked(cpu: usize) -> u64 {
    KICK_ACK.get(cpu).map_or(0, |a| a.load(Ordering::Acquire))
}

/// The kernel's jump table and key table.
pub struct KernelKeys;

impl KeyText for KernelKeys {
    type Insn = Insn;

    fn entries(&self) -> &[JumpEntry] {
        crate::arch::linker_tables::jump_entries()
    }

    fn keys(&self) -> &[&StaticKey] {
        crate::arch::linker_tables::static_keys()
    }

    fn text_range(&self) -> Range<usize> {
        layout::text_range()
    }

    fn protected_ranges(&self) -> &[Range<usize>] {
        super::text::KERNEL_TEXT.protected_ranges()
    }

    fn nop(&self) -> Insn {
        NOP
    }

    fn branch(&self, site: usize, target: usize) -> Result<Insn, &'static str> {
        insn::b(site, target).map_err(|_| "the branch target is out of B's range")
    }

    fn patch(&self, batch: &[Patch<Insn>]) -> Result<(), PatchError<Insn>> {
        patch_nosync(&Aarch64, &super::text::KERNEL_TEXT, batch)?;
        // The kick waits for each online CPU: none goes down or comes up meanwhile. A
        // CPU that comes up after the write synchronises on its way in. Taken after
        // `patch_nosync` released the text writer lock: `patch_machine` takes the writer
        // lock first, then (in its stop call) this one.
        let _cpus = super::STOP
            .cpus_read_lock(KICK_TIMEOUT_NS)
            .map_err(StopError::from)?;
        kick_all_cpus_sync().map_err(PatchError::Stop)
    }

    fn read(&self, site: usize) -> Insn {
        super::text::KERNEL_TEXT.read_insn(site, 4)
    }

    fn now_ns(&self) -> u64 {
        timer::now_ns()
    }

    fn relax(&self) {
        // SAFETY: a hint instruction.
        unsafe { core::arch::asm!("yield", options(nomem, nostack, preserves_flags)) };
    }
}

/// The kernel's static keys.
pub static STATIC_KEYS: StaticKeys<KernelKeys, MAX_SITES> = StaticKeys::new(KernelKeys, NOP);
