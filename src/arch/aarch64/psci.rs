//! PSCI calls through the conduit the DTB names (`/psci` `method`: "hvc" or "smc").

use core::sync::atomic::{AtomicU8, Ordering};
use smccc::psci;
use smccc::{Hvc, Smc};

/// How PSCI calls reach the firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    /// `HVC #0` (QEMU `virt` when the kernel starts at EL1).
    Hvc,
    /// `SMC #0` (QEMU `virt,virtualization=on`: the kernel starts at EL2).
    Smc,
}

/// The conduit as a byte: 0 unknown, 1 HVC, 2 SMC. Also read by the exception vectors'
/// last-resort SYSTEM_OFF (boot/aarch64/vectors.S), hence a plain byte.
pub(crate) static CONDUIT: AtomicU8 = AtomicU8::new(0);

/// Records the conduit (boot CPU, from the DTB, before anything calls PSCI).
pub fn set_conduit(conduit: Conduit) {
    CONDUIT.store(
        match conduit {
            Conduit::Hvc => 1,
            Conduit::Smc => 2,
        },
        Ordering::Relaxed,
    );
}

/// The conduit, if the DTB has been read.
pub fn conduit() -> Option<Conduit> {
    match CONDUIT.load(Ordering::Relaxed) {
        1 => Some(Conduit::Hvc),
        2 => Some(Conduit::Smc),
        _ => None,
    }
}

/// PSCI CPU_ON (64-bit): starts the CPU `mpidr` at physical address `entry` with
/// `context` in x0.
///
/// Memory the new CPU reads with its MMU off must have been cleaned to the point of
/// coherency before this call; the call itself is ordered after prior program-order
/// memory accesses (the smccc asm is not `nomem`, and the firmware call is an exception).
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> Result<(), psci::error::Error> {
    match conduit() {
        Some(Conduit::Hvc) => psci::cpu_on::<Hvc>(mpidr, entry, context),
        Some(Conduit::Smc) => psci::cpu_on::<Smc>(mpidr, entry, context),
        None => Err(psci::error::Error::NotSupported),
    }
}

/// PSCI AFFINITY_INFO for one CPU (level 0): `Ok(true)` if it is on.
pub fn is_cpu_on(mpidr: u64) -> Result<bool, psci::error::Error> {
    let state = match conduit() {
        Some(Conduit::Hvc) => psci::affinity_info::<Hvc>(mpidr, psci::LowestAffinityLevel::All),
        Some(Conduit::Smc) => psci::affinity_info::<Smc>(mpidr, psci::LowestAffinityLevel::All),
        None => return Err(psci::error::Error::NotSupported),
    }?;
    Ok(state == psci::AffinityState::On)
}

/// PSCI CPU_OFF for the calling CPU: does not return when it succeeds (the firmware
/// powers the core down and does the power-down cache maintenance; a later CPU_ON
/// starts it afresh at its entry point). Returns the error otherwise.
pub fn cpu_off() -> psci::error::Error {
    let result = match conduit() {
        Some(Conduit::Hvc) => psci::cpu_off::<Hvc>(),
        Some(Conduit::Smc) => psci::cpu_off::<Smc>(),
        None => Err(psci::error::Error::NotSupported),
    };
    // CPU_OFF returns only on failure, and DENIED when it cannot power the core down.
    result.err().unwrap_or(psci::error::Error::Denied)
}

/// PSCI AFFINITY_INFO for one CPU (level 0): `Ok(true)` once it is off.
pub fn is_cpu_off(mpidr: u64) -> Result<bool, psci::error::Error> {
    let state = match conduit() {
        Some(Conduit::Hvc) => psci::affinity_info::<Hvc>(mpidr, psci::LowestAffinityLevel::All),
        Some(Conduit::Smc) => psci::affinity_info::<Smc>(mpidr, psci::LowestAffinityLevel::All),
        None => return Err(psci::error::Error::NotSupported),
    }?;
    Ok(state == psci::AffinityState::Off)
}

/// PSCI SYSTEM_OFF. Returns only if the call failed or no conduit is known.
pub fn system_off() {
    let _ = match conduit() {
        Some(Conduit::Hvc) => psci::system_off::<Hvc>(),
        Some(Conduit::Smc) => psci::system_off::<Smc>(),
        None => Ok(()),
    };
}

/// The PSCI version, as "major.minor".
pub fn version() -> Option<psci::Version> {
    match conduit()? {
        Conduit::Hvc => psci::version::<Hvc>().ok(),
        Conduit::Smc => psci::version::<Smc>().ok(),
    }
}
