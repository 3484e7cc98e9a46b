//! The IPI vectors ([`STOP_VECTOR`], [`TEST_IPIS`], [`SYNC_VECTOR`]). Normal-priority
//! IPIs for the self-tests: two fixed vectors, each with one handler `fn(cpu)`, run
//! with interrupts off after the EOI; and the sync IPI of the INT3 protocol
//! ([`sync_all`]). The stop IPI's handler is the stop machine's (see [`super::traps`]).

use super::user_context::USER_CONTEXTS;
use super::{apic, cpu, smp, timer};
use crate::CpuSet;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The stop-IPI vector (highest priority class, so nothing normal delays it).
pub const STOP_VECTOR: u8 = 0xf0;

/// The test IPI vectors (priority class 14: below the stop IPI's 15).
pub const TEST_IPIS: [u32; 2] = [0xe0, 0xe1];

/// Handlers: a `fn(usize)` as usize, 0 = none.
static HANDLERS: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];

fn slot(ipi: u32) -> usize {
    TEST_IPIS
        .iter()
        .position(|&v| v == ipi)
        .unwrap_or_else(|| panic!("IPI {ipi:#x} is not one of the test IPIs {TEST_IPIS:x?}"))
}

/// Installs `handler(cpu)` for test IPI `ipi`.
pub fn set_ipi_handler(ipi: u32, handler: fn(usize)) {
    // Release pairs with the Acquire in `dispatch`: what the handler relies on that was
    // set up before is visible when it runs.
    HANDLERS[slot(ipi)].store(handler as usize, Ordering::Release);
}

/// Removes the handler of test IPI `ipi` (one already running finishes).
pub fn clear_ipi_handler(ipi: u32) {
    HANDLERS[slot(ipi)].store(0, Ordering::Release);
}

/// How one IPI reaches a set of CPUs: the ICR's three ways of naming them (Linux's
/// `__x2apic_send_IPI_shorthand`, `x2apic_cluster`'s `__x2apic_send_IPI_mask` and
/// `x2apic_phys`'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiForm {
    /// One ICR write with the all-excluding-self shorthand: only when the targets are
    /// every other CPU and every CPU the MADT lists is online (the shorthand also
    /// reaches a CPU still waiting for its SIPI, or one that never came up).
    AllButSelf,
    /// x2APIC logical destinations in cluster mode: one ICR write per cluster of up
    /// to 16 CPUs (the LDR's cluster in bits 31:16, one bit of 16 in 15:0).
    Cluster,
    /// One ICR write per target, by physical APIC ID (xAPIC mode has only this).
    Physical,
}

impl IpiForm {
    /// Every form.
    pub const ALL: [IpiForm; 3] = [IpiForm::AllButSelf, IpiForm::Cluster, IpiForm::Physical];

    /// The form's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            IpiForm::AllButSelf => "all-but-self shorthand",
            IpiForm::Cluster => "x2APIC cluster",
            IpiForm::Physical => "physical, one per CPU",
        }
    }
}

/// The cheapest form that reaches exactly `targets` (online CPUs) from the calling CPU:
/// the shorthand for every other CPU, clusters for fewer, one by one in xAPIC mode. The
/// shorthand and the cluster form both need every CPU the MADT lists online: the
/// shorthand would also reach one that is not, and QEMU's logical-mode delivery
/// (`hw/intc/apic.c:apic_get_delivery_bitmask`) truncates the destination to 8 bits
/// for every APIC after the first one still in xAPIC mode (a CPU that never came up),
/// so cluster 1 and up, and bits 8-15 of cluster 0, would lose the IPI. Physical then.
#[unsafe(link_section = ".text.nopatch")]
pub fn form_for(targets: CpuSet) -> IpiForm {
    let me = cpu::current_cpu();
    let online = smp::online_cpus();
    let all_online = online.len() == smp::present();
    if !targets.is_empty() && targets == online.without(me) && all_online {
        IpiForm::AllButSelf
    } else if apic::x2apic_mode() && all_online {
        IpiForm::Cluster
    } else {
        IpiForm::Physical
    }
}

/// Sends `low` (vector | delivery mode) to every online CPU in `targets` (the caller
/// too, if in it) in `form`; [`IpiForm::AllButSelf`] reaches every other CPU whatever
/// `targets` says (the caller chose it with [`form_for`]), and [`IpiForm::Cluster`]
/// outside x2APIC mode falls back to physical. Returns the ICR writes made.
/// Interrupts are off inside (see [`apic::send_ipi`]); callable from NMI context. In
/// `.text.nopatch`: the stop IPI and the patch window's test IPIs go through it.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_to(targets: CpuSet, low: u32, form: IpiForm) -> usize {
    let saved = cpu::cli_save();
    let mut writes = 0;
    match form {
        IpiForm::AllButSelf => {
            apic::send_ipi(0, low | apic::ALL_BUT_SELF);
            writes = 1;
        }
        IpiForm::Cluster if apic::x2apic_mode() => {
            // Targets of one cluster next to each other (QEMU numbers APIC IDs in MADT
            // order) share one write; a cluster met again later costs one more.
            let mut pending: Option<u32> = None;
            for t in targets.and(smp::online_cpus()).iter() {
                let ldr = smp::logical_id(t);
                pending = match pending {
                    Some(dest) if dest >> 16 == ldr >> 16 => Some(dest | (ldr & 0xffff)),
                    Some(dest) => {
                        apic::send_ipi(dest, low | apic::DEST_LOGICAL);
                        writes += 1;
                        Some(ldr)
                    }
                    None => Some(ldr),
                };
            }
            if let Some(dest) = pending {
                apic::send_ipi(dest, low | apic::DEST_LOGICAL);
                writes += 1;
            }
        }
        IpiForm::Cluster | IpiForm::Physical => {
            for t in targets.and(smp::online_cpus()).iter() {
                apic::send_ipi(smp::apic_id(t), low);
                writes += 1;
            }
        }
    }
    cpu::restore_if(saved);
    writes
}

/// Sends test IPI `ipi` to every online CPU in `targets` (the caller too, if in it).
/// In `.text.nopatch`: the patch-masking self-test sends it from inside the patch window.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_ipi(ipi: u32, targets: CpuSet) {
    send_ipi_as(ipi, targets, form_for(targets));
}

/// [`send_ipi`] in a given form (the platform self-test checks each); returns the ICR
/// writes made.
#[unsafe(link_section = ".text.nopatch")]
pub fn send_ipi_as(ipi: u32, targets: CpuSet, form: IpiForm) -> usize {
    send_to(targets, apic::DM_FIXED | TEST_IPIS[slot(ipi)], form)
}

/// Runs the handler of test IPI `ipi` (from the trap dispatch, after the EOI). Part of
/// the trap path, so it lives in `.text.nopatch` with it.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn dispatch(ipi: u32) {
    let Some(i) = TEST_IPIS.iter().position(|&v| v == ipi) else {
        return;
    };
    // Acquire pairs with the Release in `set_ipi_handler`.
    let f = HANDLERS[i].load(Ordering::Acquire);
    if f != 0 {
        // SAFETY: only `set_ipi_handler` stores non-zero values: `fn(usize)` pointers.
        let f: fn(usize) = unsafe { core::mem::transmute(f) };
        f(cpu::current_cpu());
    }
}

/// The sync IPI vector (priority class 15, with the stop IPI): its handler executes a
/// serialising instruction and acknowledges, for [`sync_all`].
pub const SYNC_VECTOR: u8 = 0xf1;

/// Generation of the latest [`sync_all`] request.
static SYNC_GEN: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the latest generation it serialised for.
static SYNC_ACK: [AtomicU64; crate::MAX_CPUS] = [const { AtomicU64::new(0) }; crate::MAX_CPUS];

/// The sync IPI's handler (from the trap dispatch, after the EOI): serialise, then
/// acknowledge. Code the INT3 protocol runs, so it lives in `.text.nopatch`.
#[unsafe(link_section = ".text.nopatch")]
pub(crate) fn handle_sync() {
    // Acquire pairs with the AcqRel increment in `sync_all`: the generation read is at
    // least the one whose IPI brought us here (a later one is fine: it was requested
    // after the earlier writes too, and we serialise after reading it).
    let generation = SYNC_GEN.load(Ordering::Acquire);
    cpu::serialize();
    if let Some(ack) = SYNC_ACK.get(cpu::current_cpu()) {
        // Release pairs with the Acquire load in `sync_all`'s wait: the serialisation
        // above happened before the requester sees the acknowledgement.
        ack.store(generation, Ordering::Release);
    }
}

/// Sync targets deferred to their next kernel entry (isolated, in ring 3) so far.
static SYNCS_DEFERRED: AtomicU64 = AtomicU64::new(0);

/// How many [`sync_all`] targets were deferred to their next kernel entry so far (the
/// static-key kick's, through the INT3 protocol).
pub fn syncs_deferred() -> u64 {
    SYNCS_DEFERRED.load(Ordering::Relaxed)
}

/// [`sync_all`] calls so far: with [`sync_acked`], what the static key self-test checks.
pub fn sync_generation() -> u64 {
    SYNC_GEN.load(Ordering::Acquire)
}

/// The latest [`sync_all`] generation `cpu` serialised for.
pub fn sync_acked(cpu: usize) -> u64 {
    SYNC_ACK.get(cpu).map_or(0, |a| a.load(Ordering::Acquire))
}

/// Makes every online CPU execute a serialising instruction (Linux's
/// `text_poke_sync`: an IPI to the others, `sync_core` locally) and waits up to
/// `timeout_ns` for each to acknowledge. A CPU spinning with IF clear cannot take the
/// IPI: the error names the CPUs that did not acknowledge and how long we waited.
///
/// Callers are serialised (the text writer lock): a late acknowledgement of an
/// earlier generation never satisfies a later call.
pub fn sync_all(timeout_ns: u64) -> Result<(), (CpuSet, u64)> {
    let me = cpu::current_cpu();
    // AcqRel: Release pairs with the Acquire in `handle_sync` (our text writes before
    // this point are ordered before the IPI's handler reads the generation).
    let generation = SYNC_GEN.fetch_add(1, Ordering::AcqRel) + 1;
    // An isolated CPU in ring 3 serialises at its next kernel entry instead (one CAS
    // that succeeds only while it is in user mode; `traps::from_user`). Our writes are
    // complete: no stop window to wait out. The CAS is AcqRel (context.rs): it orders
    // the writes before the entry's swap, which reads PENDING.
    let deferred = USER_CONTEXTS.defer(smp::online_cpus().without(me), None);
    SYNCS_DEFERRED.fetch_add(deferred.len() as u64, Ordering::Relaxed);
    let others = smp::online_cpus().without(me).minus(deferred);
    // As the stop IPI: one ICR write for all where the shorthand may be used.
    send_to(
        others,
        apic::DM_FIXED | u32::from(SYNC_VECTOR),
        form_for(others),
    );
    cpu::serialize();
    let start = timer::now_ns();
    loop {
        // Acquire pairs with the Release store in `handle_sync`.
        let missing = others
            .iter()
            .filter(|&c| {
                SYNC_ACK
                    .get(c)
                    .is_none_or(|a| a.load(Ordering::Acquire) < generation)
            })
            .fold(CpuSet::EMPTY, CpuSet::with);
        if missing.is_empty() {
            return Ok(());
        }
        let waited_ns = timer::now_ns().saturating_sub(start);
        if waited_ns > timeout_ns {
            return Err((missing, waited_ns));
        }
        cpu::pause();
    }
}
