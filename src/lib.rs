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
//! The design follows Mark Rutland's arm64 `patch_machine()` series: every CPU must be
//! quiescent, with every asynchronous exception masked, before the first byte changes.
#![cfg_attr(target_os = "none", no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![warn(missing_docs)]
// Errors are carried by value (the kernel has no heap), and a stop-machine failure
// carries one code per CPU: 136 bytes on paths that are anything but hot.
#![allow(clippy::result_large_err)]

pub mod console_line;
pub mod cpuset;
// Before every module that writes tests: `#[macro_use]` puts `msg!`, `fail!` and
// `check!` in their scope.
#[macro_use]
pub mod harness;
pub mod ktap;
pub mod nmi_handlers;
pub mod patch;
pub mod static_key;
pub mod stop;

pub mod arch;

/// The porting reference (`docs/porting.md`): each x86 mechanism of the seed posts next
/// to its arm64 counterpart and the code implementing each side, and what the
/// [`stop::Arch`] trait asks of a third architecture.
pub mod porting {
    #![doc = include_str!("../docs/porting.md")]
}

#[cfg(target_os = "none")]
pub mod kernel;

pub use cpuset::{CpuSet, MAX_CPUS};
