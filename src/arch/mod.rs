//! Architecture glue: each port implements [`crate::stop::Arch`] and owns its boot path.

// First: the ports below use its `alternative!`.
#[cfg(target_os = "none")]
#[macro_use]
mod alternative;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod aarch64;

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
pub mod x86_64;

#[cfg(not(target_os = "none"))]
pub mod host;

#[cfg(target_os = "none")]
mod fault_fixup;
#[cfg(target_os = "none")]
pub mod kernel_alternatives;
#[cfg(target_os = "none")]
pub mod kernel_text;
#[cfg(target_os = "none")]
pub mod linker_tables;
#[cfg(target_os = "none")]
mod user_programs;
#[cfg(target_os = "none")]
pub mod write_probe;
