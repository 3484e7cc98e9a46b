//! The trap frame the entry stubs in `boot/x86_64/vectors.S` build: a leaf, so the
//! dispatcher ([`super::traps`]) and the handlers it calls (the INT3 protocol's
//! `text_poke::handle_int3`, the kprobes hooks) share it without naming each other, and
//! kprobe handlers receive it.

/// Saved state, as pushed by the stubs and the CPU.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    pub(super) rdi: u64,
    pub(super) rsi: u64,
    pub(super) rdx: u64,
    rcx: u64,
    rbx: u64,
    /// Interrupted RAX (the INT3 handler emulates `MOV $imm32, %eax`).
    pub(super) rax: u64,
    /// Vector number.
    pub vector: u64,
    /// Error code (0 where the CPU pushes none).
    pub error: u64,
    /// Interrupted RIP.
    pub rip: u64,
    /// Interrupted CS (its RPL: the ring interrupted).
    pub(super) cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP (the INT3 handler pushes an emulated CALL's return address).
    pub(super) rsp: u64,
    pub(super) ss: u64,
}

impl TrapFrame {
    /// Whether the trap interrupted ring 3.
    #[inline(always)]
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }

    /// General register `n` in the encoding's numbering (0 RAX, 1 RCX, 2 RDX, 3 RBX,
    /// 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15); 0 for any other `n`.
    pub fn reg(&self, n: usize) -> u64 {
        match n {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => self.rsp,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            15 => self.r15,
            _ => 0,
        }
    }
}
