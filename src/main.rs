//! The patch-machine kernel binary.
//!
//! On `aarch64-unknown-none` and `x86_64-unknown-none` the image is the library's
//! platform code (`patch_machine::arch::*`: boot assembly, entry points) plus the panic
//! handler below; boot it with `./qemu.sh [--arch x86_64]`. On the host this is a stub
//! that says so.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

/// The panic handler of both kernels. It reaches the machine through
/// `kernel::platform`, as the rest of the kernel does.
#[cfg(target_os = "none")]
mod panic {
    use core::panic::PanicInfo;
    use core::sync::atomic::Ordering;
    use patch_machine::kernel::platform::{
        current_cpu, exit, mask_for_panic, write_forced, write_raw_forced,
    };
    use patch_machine::{AtomicCpuSet, MAX_CPUS};

    /// CPUs that are panicking (a panic inside the panic path exits at once).
    static PANICKING: AtomicCpuSet = AtomicCpuSet::new();

    #[panic_handler]
    fn panic(info: &PanicInfo<'_>) -> ! {
        mask_for_panic();
        let me = current_cpu();
        // Checked: a panic from `insert` here would recurse.
        if me < MAX_CPUS && PANICKING.insert(me, Ordering::Relaxed) {
            write_raw_forced(b"PANIC: recursive panic\n");
            exit(false);
        }
        match info.location() {
            Some(loc) => write_forced(format_args!(
                "\nPANIC cpu {me}: {} at {}:{}:{}\n",
                info.message(),
                loc.file(),
                loc.line(),
                loc.column()
            )),
            None => write_forced(format_args!("\nPANIC cpu {me}: {}\n", info.message())),
        }
        exit(false)
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    println!(
        "patch-machine is a bare-metal aarch64 kernel: build and boot it with ./qemu.sh \
         (cargo build --release --target aarch64-unknown-none --bin patch-machine)."
    );
}
