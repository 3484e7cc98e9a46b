//! The running kernel's alternatives, the same on both ports: the linker's two tables
//! ([`super::linker_tables`]), the boot CPU's features, [`KernelText`] as the writer,
//! and the system's stop machine for the runtime table. Each port makes one
//! ([`KernelAlternatives::new`]) with its feature reader and its own way to synchronise
//! the boot CPU's instruction stream.

use super::kernel_text::KernelText;
use super::linker_tables::{alt_boot_table, alt_runtime_table};
use crate::patch::Text;
use crate::patch::alternatives::{AltError, Alternatives, Features, SiteView, Tables};
use crate::stop::{Arch, StopMachine};
use core::ops::Range;

/// The instruction type of kernel text on this port.
type Insn = <KernelText as Text>::Insn;

/// The kernel's alternatives ([`Alternatives`] with what this kernel knows about them).
pub struct KernelAlternatives<A: Arch + 'static, const N: usize> {
    tables: Alternatives<KernelText, N>,
    stop: &'static StopMachine<A>,
    /// Reads the boot CPU's features from its ID registers or CPUID.
    features: fn() -> Features,
    /// The code the rendezvous runs: boot sites must be in it, runtime sites outside.
    nopatch: fn() -> Range<usize>,
    /// Synchronises this CPU's instruction stream (arm64 ISB, x86 serialise).
    sync_core: fn(),
}

impl<A: Arch + 'static, const N: usize> KernelAlternatives<A, N> {
    /// The kernel's alternatives, applied through `stop`.
    pub const fn new(
        tables: Alternatives<KernelText, N>,
        stop: &'static StopMachine<A>,
        features: fn() -> Features,
        nopatch: fn() -> Range<usize>,
        sync_core: fn(),
    ) -> Self {
        KernelAlternatives {
            tables,
            stop,
            features,
            nopatch,
            sync_core,
        }
    }

    fn linked(&self) -> Tables {
        Tables {
            boot: alt_boot_table(),
            runtime: alt_runtime_table(),
            nopatch: (self.nopatch)(),
        }
    }

    /// The name of feature `bit`.
    pub fn feature_name(&self, bit: u16) -> &'static str {
        self.tables.feature_name(bit)
    }

    /// Reads the boot CPU's features, checks both tables and writes the boot table's
    /// sites. A bad table is reported and nothing is written.
    ///
    /// # Safety
    /// The boot CPU, before any other CPU started, with the text alias available.
    pub unsafe fn apply_boot(&self) {
        let features = (self.features)();
        // SAFETY: forwarded from the caller: no other CPU runs.
        let written = unsafe { self.tables.apply_boot(&self.linked(), features) };
        // The boot CPU runs the new instructions from here on.
        (self.sync_core)();
        match written {
            Ok(chunks) => crate::kprintln!(
                "alternatives: features {:#x}; boot: {} sites, {chunks} chunks written; runtime: {} sites",
                features.0,
                alt_boot_table().len(),
                alt_runtime_table().len()
            ),
            Err(err) => crate::kprintln!("alternatives: tables refused, nothing patched: {err}"),
        }
    }

    /// Applies the runtime table through `patch_machine` (every CPU quiescent first),
    /// once every CPU is online. Returns the chunks written.
    pub fn apply_runtime(&self) -> Result<usize, AltError<Insn>> {
        self.tables.apply_runtime(self.stop, &self.linked())
    }

    /// The benchmark: the runtime table as the features call for with the benchmark
    /// feature `on`, through `patch_machine`. Returns the chunks written.
    pub fn flip_bench(&self, on: bool) -> Result<usize, AltError<Insn>> {
        self.tables.flip_bench(self.stop, &self.linked(), on)
    }

    /// The features applied, and whether both tables were accepted and applied.
    pub fn status(&self) -> (Features, Result<(), AltError<Insn>>) {
        self.tables.status()
    }

    /// Calls `each` with every site of both tables.
    pub fn sites(&self, each: &mut dyn FnMut(SiteView)) {
        self.tables.sites(&self.linked(), each)
    }
}
