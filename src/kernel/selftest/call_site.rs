//! A call site patched live (`call_site_live`): `pm_call_site` (in `targets_*.S`) cycles
//! NOP -> CALL a -> CALL b -> CALL a -> NOP through `platform::patch_live` (x86: the
//! INT3 protocol, whose #BP handler emulates the CALL by pushing the return address;
//! arm64: NOP <-> BL through `patch_nosync`) while every other CPU runs it.

use super::{Callers, callers_verdict, wait_for_callers};
use super::{JOB_TIMEOUT_NS, Params, Verdict, others};
use crate::kernel::platform::{self, KERNEL_TEXT, NOP, SITE_LEN, current_cpu};
use crate::kernel::smp::run_on;
use crate::patch::{Patch, Text};
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    /// Runs `pm_call_site` with RSP lowered by `pad` (x86: 0 or 8) and returns 0x100 +
    /// what the site left: 0x30 (NOP), 0xa or 0xb (a target); 0xbad1 / 0xbad2 if the
    /// stack pointer / a callee-saved register changed across the site.
    fn pm_call_site_caller(pad: usize) -> u64;
    /// The site: its first instruction (NOP or a call of one of the targets).
    fn pm_call_site();
    fn pm_call_target_a();
    fn pm_call_target_b();
}

/// Calls the targets counted (`targets_*.S` increments them atomically).
#[unsafe(export_name = "pm_call_hits")]
static CALL_HITS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// Target calls whose return address or stack pointer was not the site's.
#[unsafe(export_name = "pm_call_bad_returns")]
static CALL_BAD_RETURNS: AtomicU64 = AtomicU64::new(0);
/// The last such return address.
#[unsafe(export_name = "pm_call_bad_return")]
static CALL_BAD_RETURN: AtomicU64 = AtomicU64::new(0);

const FROM_NOP: u64 = 0x130;
const FROM_A: u64 = 0x10a;
const FROM_B: u64 = 0x10b;
const OUTCOMES: [u64; 3] = [FROM_NOP, FROM_A, FROM_B];

/// What the callers saw, per outcome (NOP, a, b).
struct Seen {
    callers: Callers,
    outcomes: [AtomicU64; 3],
}

/// One call of the site; records a bad outcome, returns the outcome's index.
fn call_once(cpu: usize, seen: &Seen, pad: usize, k: u64) -> Option<usize> {
    // SAFETY: an assembly function following the C ABI, returning a value in RAX/x0.
    let value = unsafe { pm_call_site_caller(pad) };
    let index = match value {
        FROM_NOP => 0,
        FROM_A => 1,
        FROM_B => 2,
        bad => {
            seen.callers.record_bad(cpu, bad, k, k);
            return None;
        }
    };
    seen.outcomes[index].fetch_add(1, Ordering::Relaxed);
    Some(index)
}

fn call_site_caller(cpu: usize, seen: &Seen) {
    let mut pad = 0;
    while !seen.callers.stop.load(Ordering::Acquire) {
        call_once(cpu, seen, pad, 0);
        // Both alignments of the stack pointer at the site (x86's #BP frame sits
        // differently below each).
        pad ^= 8;
        seen.callers.count_call(cpu);
    }
}

/// `pm_call_site` flips `nosync_flips` times through NOP -> CALL a -> CALL b -> CALL a
/// -> NOP while every other CPU calls it (each between every two flips, as in
/// `nosync`). Every call must land in one of the targets the site held (each counts
/// itself and checks its return address is the instruction after the site and its
/// stack pointer the caller's minus the return address), return there (the caller
/// computes its result after the site and checks its stack pointer and a callee-saved
/// register), and every target call must be one a caller saw return; the patching CPU
/// sees each new instruction at once. Where calls in flight are emulated (x86), some
/// must have been: otherwise no caller reached the window. Stops at the first bad call.
pub(super) fn call_site_live(params: &Params) -> Verdict {
    let site = pm_call_site as *const () as usize;
    let call = |target: unsafe extern "C" fn()| platform::live_call(site, target as usize);
    let (call_a, call_b) = match (call(pm_call_target_a), call(pm_call_target_b)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) | (_, Err(why)) => return Verdict::Skip(msg!("{why}")),
    };
    check!(
        KERNEL_TEXT.read_insn(site, SITE_LEN) == NOP,
        "the call site does not start as the NOP"
    );
    // (old, new, what a call returns once `new` is in)
    let cycle = [
        (NOP, call_a, FROM_A),
        (call_a, call_b, FROM_B),
        (call_b, call_a, FROM_A),
        (call_a, NOP, FROM_NOP),
    ];
    let hits0 = CALL_HITS.each_ref().map(|h| h.load(Ordering::Relaxed));
    let bad0 = CALL_BAD_RETURNS.load(Ordering::Relaxed);
    let emulated0 = platform::live_calls_emulated();
    let seen = Seen {
        callers: Callers::new(),
        outcomes: [const { AtomicU64::new(0) }; 3],
    };
    let others = others();
    // SAFETY: `seen` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, call_site_caller, &seen) };
    let mut failure = None;
    let mut starved = None;
    let idle = wait_for_callers(&seen.callers, others, &[0; crate::MAX_CPUS]);
    if !idle.is_empty() {
        starved = Some((None, idle));
    }
    let calls_before = seen.callers.calls.load(Ordering::Relaxed);
    let flips = if starved.is_none() {
        params.nosync_flips
    } else {
        0
    };
    let mut state = 0;
    for k in 0..u64::from(flips) {
        let (old, new, expected) = cycle[(k % 4) as usize];
        if let Err(err) = platform::patch_live(&[Patch::new(site, old, new)]) {
            failure = Some((k, err));
            break;
        }
        state = ((k + 1) % 4) as usize;
        let me = current_cpu();
        let pad = (k % 2 * 8) as usize;
        // The patching CPU sees the new instruction at once.
        if let Some(value) = call_once(me, &seen, pad, k).map(|i| OUTCOMES[i])
            && value != expected
        {
            seen.callers.record_bad(me, value, k, k);
        }
        // Stop at the first bad call: a wrong return address sends a caller back into
        // the site, which under single-threaded TCG makes every later flip crawl.
        if CALL_BAD_RETURNS.load(Ordering::Relaxed) != bad0
            || seen.callers.bad.load(Ordering::Relaxed) != 0
        {
            break;
        }
        let since: [u64; crate::MAX_CPUS] =
            core::array::from_fn(|cpu| seen.callers.calls_by[cpu].load(Ordering::Relaxed));
        let idle = wait_for_callers(&seen.callers, others, &since);
        if !idle.is_empty() {
            starved = Some((Some(k), idle));
            break;
        }
    }
    let concurrent = seen.callers.calls.load(Ordering::Relaxed) - calls_before;
    seen.callers.stop.store(true, Ordering::Release);
    let waited = jobs.wait(JOB_TIMEOUT_NS);
    if state != 0 {
        // Back to the NOP (the cycle's `state`th step left its new instruction).
        let _ = platform::patch_live(&[Patch::new(site, cycle[state - 1].1, NOP)]);
    }
    if let Some((k, err)) = failure {
        fail!("flip {k}: {err}");
    }
    if let Some(verdict) = callers_verdict(starved, waited) {
        return verdict;
    }
    let bad_returns = CALL_BAD_RETURNS.load(Ordering::Relaxed) - bad0;
    check!(
        bad_returns == 0,
        "{bad_returns} target calls returned to {:#x} (or with the wrong stack pointer), not the site's next instruction {:#x}",
        CALL_BAD_RETURN.load(Ordering::Relaxed),
        site + SITE_LEN
    );
    if let Some((cpu, value, k, _)) = *seen.callers.first_bad.lock() {
        fail!(
            "cpu{cpu} got {value:#x} from the call site (flip {k}; {} bad calls)",
            seen.callers.bad.load(Ordering::Relaxed)
        );
    }
    let hits = [0, 1].map(|i| CALL_HITS[i].load(Ordering::Relaxed) - hits0[i]);
    let outcomes = seen.outcomes.each_ref().map(|o| o.load(Ordering::Relaxed));
    check!(
        hits == [outcomes[1], outcomes[2]],
        "targets a, b ran {hits:?} times, but calls returned from them {:?} times",
        [outcomes[1], outcomes[2]]
    );
    // Where calls in flight are emulated (x86), some caller must have hit the window.
    let emulated = emulated0
        .zip(platform::live_calls_emulated())
        .map(|(a, b)| b - a);
    check!(
        others.is_empty() || flips < 4 || emulated != Some(0),
        "no CALL was emulated in {flips} flips: no caller reached the site while it was in flight"
    );
    let mut note = msg!("");
    if let Some(n) = emulated {
        let _ = write!(note, ", {n} emulated");
    }
    Verdict::Pass(msg!(
        "{flips} flips, {concurrent} concurrent calls on {} CPUs: {} NOP, {} a, {} b{}",
        others.len(),
        outcomes[0],
        outcomes[1],
        outcomes[2],
        note.as_str()
    ))
}
