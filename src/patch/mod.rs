//! Batches of instruction patches.
pub mod insn;
