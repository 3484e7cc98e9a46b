//! What the kernel proper (self-tests, job mailboxes, the panic handler) needs from the
//! platform, under one set of names on every architecture. Each architecture's file
//! maps these names onto its own modules; the kernel names nothing else of `crate::arch`.
//!
//! | name | meaning |
//! |---|---|
//! | `STOP`, `Platform` | the system's stop machine and its `Arch` |
//! | `cpu_count`, `bootargs`, `exit` | what firmware listed and passed; ending the run |
//! | `current_cpu`, `online_cpus`, `now_ns` | the calling CPU, the online set, the clock |
//! | `idle_wait`, `wake_idle`, `cpu_yield` | a bounded low-power wait, its wake-up, a spin hint that lets an emulator run other vCPUs |
//! | `TEST_IPIS`, `set_ipi_handler`, `clear_ipi_handler`, `send_ipi` | normal-priority IPIs for the self-tests |
//! | `IrqFlags`, `local_irq_save`, `local_irq_restore`, `irqs_disabled` | "IRQs off", which NMIs pass |
//! | `nmi` | NMI IPIs, the NMI handler registry, `in_nmi` |
//! | `nmi_mechanism`, `stop_ipi_reaches_irqs_off`, `nmi_free_window` | what the NMI self-tests expect here |
//! | `NmiMechanism`, `expected_nmi_mechanism`, `observe_nmi_mechanism` | the NMI mechanism the hardware and bootargs call for, and the one a CPU really uses |
//! | `Insn`, `NOP`, `returning`, `SITE_LEN` | patch-site encodings: a do-nothing instruction and "return `value`" of one site's length |
//! | `KERNEL_TEXT`, `KernelText`, `text_range`, `protected_ranges`, `alias_mapped` | kernel text as the patcher sees it (the `Text` each port implements next to its `poke_text`) |
//! | `SELFTESTS`, `FAULT_MODES`, `provoke` | the platform's own checks (KTAP suite `platform`) and the fatal conditions `platform_selftest=` provokes |
//! | `ASSUMPTIONS` | the platform checks of the design's assumptions, run at every boot before any test |
//! | `set_write_probe` | a function the text writer calls after each write, inside the patch window (self-tests only) |
//! | `mask_for_panic`, `write_forced`, `write_raw_forced` | the panic handler's: mask for good, report past a held console lock |
//! | `static_branch_unlikely!`, `static_branch_likely!`, `define_static_key!`, `StaticKey`, `STATIC_KEYS`, `KernelKeys` | static keys: sites, keys, and the kernel's key table (flipped through the live path) |
//! | `live_branch`, `live_call`, `patch_live`, `live_calls_emulated` | the jump and call encodings patched while other CPUs run them, the path that patches them without a stop, and how many calls ran emulated meanwhile (x86's #BP handler) |
//! | `SYNCS_PER_KEY_BATCH`, `key_syncs` | the cross-CPU synchronisations a static key batch makes, and a counter of them with each CPU's acknowledgement |
//! | `KPROBES`, `KprobePlatform`, `KprobeFrame`, `kprobe_frame_reg`, `kprobes_unsupported` | the system's kprobes registry on this architecture, the register frame its handlers get, or why there are none yet (the kprobe tests then skip) |
//! | `KPROBE_TARGET`, `kprobe_target_stepped` | the hammered target (`targets_*.S`: returns `x * 3 + 7`, probed at an instruction run out of line), and whether a post handler's frame shows that instruction's effect |
//! | `KPROBE_FIXTURES`, `KPROBE_UNPROBEABLE`, `kprobe_forbidden_sites`, `kprobe_misaligned_site` | one fixture per instruction class run out of line or simulated (the first one not the target: `kprobe_contexts` probes both), sites that must be refused as unprobeable, (region, address) pairs that must be refused as that region, and an address off the instruction grid (none on x86) |
//! | `BENCH_KEY_1`, `BENCH_KEY_100` | keys of the benchmark's static-key sites (`targets_*.S`, on pages of their own) |
//!
//! The patch targets the self-tests flip (`targets_aarch64.S`, `targets_x86_64.S`) are
//! assembled here too, so the kernel proper holds no assembly.

/// `KPROBE_FIXTURES` from `"name": call at site with [args];` lines: declares each
/// fixture's function and site label (`targets_*.S`) and lists them, one fixture per
/// instruction class the port's kprobes run out of line, simulate or emulate.
macro_rules! kprobe_fixtures {
    ($($name:literal: $call:ident at $site:ident with $args:expr;)*) => {
        unsafe extern "C" {
            $(fn $call(x: u64) -> u64; fn $site();)*
        }
        /// One fixture per instruction class kprobes runs out of line, simulates or
        /// emulates.
        pub const KPROBE_FIXTURES: &[KprobeFixture] = &[$(KprobeFixture {
            name: $name,
            call: $call,
            site: $site,
            args: $args,
        },)*];
    };
}

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

pub use crate::static_key::StaticKey;
pub use crate::{define_static_key, static_branch_likely, static_branch_unlikely};

define_static_key!(
    /// The key of the one static-key site in `targets_*.S` (the 1-site benchmark).
    #[unsafe(no_mangle)]
    pub BENCH_KEY_1,
    "bench_1"
);
define_static_key!(
    /// The key of the 100 static-key sites in `targets_*.S` (the 100-site benchmark).
    #[unsafe(no_mangle)]
    pub BENCH_KEY_100,
    "bench_100"
);

/// A function of `targets_*.S` for the kprobes self-tests: `call(arg)` returns a value
/// that depends on how its instruction at `site` executed.
#[derive(Clone, Copy)]
pub struct KprobeFixture {
    /// What the probed instruction is.
    pub name: &'static str,
    /// The function.
    pub call: unsafe extern "C" fn(u64) -> u64,
    /// The probed instruction.
    pub site: unsafe extern "C" fn(),
    /// Arguments to call it with (for a conditional branch: one taken, one not).
    pub args: [u64; 2],
}

impl KprobeFixture {
    /// The probed instruction's address.
    pub fn site_addr(&self) -> usize {
        self.site as usize
    }

    /// Calls the function.
    pub fn run(&self, arg: u64) -> u64 {
        // SAFETY: the fixtures are assembly functions of the C ABI taking and returning
        // one integer, touching nothing but their scratch registers and stack.
        unsafe { (self.call)(arg) }
    }
}
