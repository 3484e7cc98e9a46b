//! patch-machine: a kernel that patches its own code while other CPUs run.
//!
//! The crate is one library used three ways:
//! - on `aarch64-unknown-none` it is the kernel (see [`arch`] and the `patch-machine` binary);
//! - on the host it is a `std` library whose [`stop`] core runs with threads as CPUs, so
//!   `cargo test` exercises the rendezvous, the instruction encoders and batch validation;
//! - `x86_64-unknown-none` shares the same [`stop`] core through the [`stop::Arch`] trait.
//!
//! The [`porting`] reference maps Linux's x86 text patching and NMI machinery onto
//! arm64, with links to the code here.
//!
//! The design follows Mark Rutland, "arm64: ensure CPUs are quiescent before patching"
//! (linux-arm-kernel, 2021): every CPU must be quiescent, with every asynchronous
//! exception masked, before the first byte changes.
//!
//! # Usage
//!
//! The same calls the kernel makes (there with `kernel::platform`'s `STOP` and
//! `KERNEL_TEXT`), here on the host architecture, whose CPUs are threads:
//!
//! ```
//! use patch_machine::{AtomicCpuSet, CpuSet};
//! use patch_machine::arch::host::{HostArch, HostText};
//! use patch_machine::patch::{Patch, insn, patch_machine, patch_nosync};
//! use patch_machine::stop::{StopMachine, StopOptions};
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//!
//! // Two CPUs: this thread is CPU 0, and CPU 1 idles, taking stop IPIs as they come.
//! let stop = Arc::new(StopMachine::new(HostArch::new(2)));
//! HostArch::connect(&stop);
//! stop.arch().bind_current_thread(0);
//! let quit = Arc::new(AtomicBool::new(false));
//! let cpu1 = {
//!     let (stop, quit) = (stop.clone(), quit.clone());
//!     std::thread::spawn(move || {
//!         stop.arch().bind_current_thread(1);
//!         while !quit.load(Ordering::Relaxed) {
//!             stop.arch().poll_interrupts();
//!             std::thread::yield_now();
//!         }
//!     })
//! };
//!
//! // Kernel text: `MOVZ X0, #1; RET`, then a NOP.
//! let (movz1, movz2) = (insn::movz_x(0, 1, 0)?, insn::movz_x(0, 2, 0)?);
//! let text = HostText::new(&[movz1, insn::RET, insn::NOP]);
//!
//! // Any instruction: every other CPU is quiescent, everything masked, before the write.
//! let batch = [Patch::new(text.addr(0), movz1, movz2)];
//! patch_machine(&stop, &text, &batch, StopOptions::DEFAULT)?;
//! assert_eq!(text.word(0), movz2);
//!
//! // A CMODX-safe pair (NOP <-> B) while the other CPUs run, without stopping them...
//! let branch = insn::b(text.addr(2), text.addr(0))?;
//! patch_nosync(stop.arch(), &text, &[Patch::new(text.addr(2), insn::NOP, branch)])?;
//! // ...and anything else is refused there, changing nothing.
//! let refused = patch_nosync(stop.arch(), &text, &[Patch::new(text.addr(0), movz2, movz1)]);
//! assert!(refused.is_err() && text.word(0) == movz2);
//!
//! // A function on chosen CPUs while every other one is held quiescent.
//! let ran_on = AtomicCpuSet::new();
//! let record = |cpu: usize| {
//!     ran_on.insert(cpu, Ordering::Relaxed);
//!     Ok(())
//! };
//! stop.stop_machine(&record, CpuSet::single(1), StopOptions::DEFAULT)?;
//! assert_eq!(ran_on.load(Ordering::Relaxed), CpuSet::single(1));
//!
//! quit.store(true, Ordering::Relaxed);
//! cpu1.join().unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(target_os = "none", no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![warn(missing_docs)]
// Errors are carried by value (the kernel has no heap), and a stop-machine failure
// carries one code per CPU: about 2 KiB on paths that are anything but hot.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

pub mod bootargs;
pub mod console_line;
pub mod cpuset;
// Before every module that writes tests: `#[macro_use]` puts `msg!`, `fail!` and
// `check!` in their scope.
#[macro_use]
pub mod harness;
pub mod kprobes;
pub mod ktap;
pub mod nmi_handlers;
pub mod patch;
pub mod static_key;
pub mod stop;
pub mod sync;

pub mod arch;

/// The porting reference (`docs/porting.md`): each x86 mechanism of the upstream posts next
/// to its arm64 counterpart and the code implementing each side, and what the
/// [`stop::Arch`] trait asks of a third architecture.
pub mod porting {
    #![doc = include_str!("../docs/porting.md")]
}

#[cfg(target_os = "none")]
pub mod kernel;

pub use cpuset::{AtomicCpuSet, CpuSet, MAX_CPUS};
