//! The kernel's platform names on x86_64 (see the table in the parent module).
