//! Every CPU's context state word: user mode or kernel, and the synchronisation a
//! patcher deferred to its next kernel entry (`crate::stop::ContextStates`). The entry
//! and exit code (`user`) change it; the stop machine reads it through
//! `Arch::context_states`, the INT3 protocol's syncs (static keys) through `ipi`. A leaf: it uses no
//! other module of the port.

use crate::stop::ContextStates;

/// The state words (`isolcpus=` marks which CPUs may be deferred).
pub static USER_CONTEXTS: ContextStates = ContextStates::new();
