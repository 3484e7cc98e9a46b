//! The kprobes core on the host: registry, refusals (text unchanged), enable/disable,
//! missed counting for a probe hit inside a handler, and registration from several CPUs
//! (threads) at once while another CPU keeps hitting the probes; and arm64's A64
//! decoder and simulator, compiled for the host.

use patch_machine::arch::host::kprobes::{HostFrame, HostKprobeArch};
use patch_machine::kprobes::{Forbidden, KprobeError, Kprobes, ProbeHit, ProbeStats};
use patch_machine::patch::insn::{self, Insn};
use patch_machine::stop::Arch;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn movz(imm: u16) -> Insn {
    insn::movz_x(0, imm, 0).unwrap()
}

/// 16 probeable words `MOVZ X0, #i`.
fn plain_text(n: usize) -> Vec<Insn> {
    (0..n).map(|i| movz(i as u16 + 1)).collect()
}

fn words(probes: &Kprobes<HostKprobeArch, 4>) -> Vec<Insn> {
    let text = probes.arch().text();
    (0..text_len(probes)).map(|i| text.word(i)).collect()
}

fn text_len<const N: usize>(probes: &Kprobes<HostKprobeArch, N>) -> usize {
    let range = patch_machine::kprobes::KprobeArch::text_range(probes.arch());
    (range.end - range.start) / 4
}

#[test]
fn register_arms_and_unregister_restores() {
    static PRE: AtomicU64 = AtomicU64::new(0);
    static POST: AtomicU64 = AtomicU64::new(0);
    fn pre(hit: &ProbeHit, frame: &mut HostFrame) {
        assert_eq!(frame.stepped, 0, "pre ran after the original");
        assert_eq!(hit.addr, frame.pc);
        PRE.fetch_add(1, Ordering::Relaxed);
    }
    fn post(_: &ProbeHit, frame: &mut HostFrame) {
        assert_eq!(frame.stepped, movz(3), "post ran before the original");
        POST.fetch_add(1, Ordering::Relaxed);
    }
    let probes: Kprobes<HostKprobeArch, 4> = Kprobes::new(HostKprobeArch::new(1, &plain_text(8)));
    let site = probes.arch().text().addr(2);
    let id = probes.register_kprobe(site, Some(pre), Some(post)).unwrap();
    assert_eq!(probes.arch().text().word(2), probes.arch().breakpoint());
    assert_eq!(probes.lookup(site), Some(id));
    for _ in 0..5 {
        let frame = probes.arch().run(&probes, site);
        assert_eq!((frame.pc, frame.stepped), (site + 4, movz(3)));
    }
    assert_eq!(
        (PRE.load(Ordering::Relaxed), POST.load(Ordering::Relaxed)),
        (5, 5)
    );
    let stats = probes.unregister_kprobe(id).unwrap();
    assert_eq!((stats.hits, stats.missed, stats.addr), (5, 0, site));
    assert_eq!(words(&probes), plain_text(8));
    assert_eq!(probes.stats(id), Err(KprobeError::UnknownProbe(id)));
    assert_eq!(
        probes.unregister_kprobe(id),
        Err(KprobeError::UnknownProbe(id))
    );
    // Unprobed, the word runs without handlers.
    assert_eq!(probes.arch().run(&probes, site).stepped, 0);
    assert_eq!(PRE.load(Ordering::Relaxed), 5);
}

#[test]
fn every_refusal_names_its_reason_and_leaves_the_text_alone() {
    let mut text = plain_text(12);
    text[9] = insn::brk(0x77);
    text[10] = insn::b(0x4020_0000 + 40, 0x4020_0000).unwrap();
    text[11] = insn::RET;
    let arch = HostKprobeArch::with_forbidden(
        1,
        &text,
        &[
            (Forbidden::ExceptionEntry, 0..1),
            (Forbidden::NoPatch, 0..3),
            (Forbidden::Kprobes, 3..4),
        ],
    );
    let probes: Kprobes<HostKprobeArch, 4> = Kprobes::new(arch);
    let t = probes.arch().text();
    let before = words(&probes);
    let end = t.addr(12);
    let refused = |addr| probes.register_kprobe(addr, None, None).unwrap_err();
    assert_eq!(
        refused(t.addr(0)),
        KprobeError::Forbidden {
            addr: t.addr(0),
            why: Forbidden::ExceptionEntry,
            range: (t.addr(0), t.addr(1))
        }
    );
    assert!(matches!(
        refused(t.addr(2)),
        KprobeError::Forbidden {
            why: Forbidden::NoPatch,
            ..
        }
    ));
    assert!(matches!(
        refused(t.addr(3)),
        KprobeError::Forbidden {
            why: Forbidden::Kprobes,
            ..
        }
    ));
    assert_eq!(
        refused(t.addr(5) + 2),
        KprobeError::Misaligned {
            addr: t.addr(5) + 2,
            align: 4
        }
    );
    assert_eq!(
        refused(end),
        KprobeError::OutsideText {
            addr: end,
            text: (t.addr(0), end)
        }
    );
    assert!(matches!(
        refused(t.addr(0) - 4),
        KprobeError::OutsideText { .. }
    ));
    for (index, insn) in [(9, text[9]), (10, text[10]), (11, insn::RET)] {
        match refused(t.addr(index)) {
            KprobeError::Unprobeable { addr, reason } => {
                assert_eq!((addr, reason.insn), (t.addr(index), Some(insn)));
                assert!(!reason.why.is_empty());
            }
            other => panic!("word {index}: {other:?}"),
        }
    }
    let id = probes.register_kprobe(t.addr(5), None, None).unwrap();
    let mut armed = before.clone();
    armed[5] = probes.arch().breakpoint();
    assert_eq!(
        refused(t.addr(5)),
        KprobeError::Duplicate {
            addr: t.addr(5),
            existing: id
        }
    );
    for (i, word) in armed.iter_mut().enumerate().take(9).skip(6) {
        probes.register_kprobe(t.addr(i), None, None).unwrap();
        *word = probes.arch().breakpoint();
    }
    assert_eq!(refused(t.addr(4)), KprobeError::Full { capacity: 4 });
    assert_eq!(words(&probes), armed, "a refusal changed the text");
    // The messages say why.
    let msg = refused(t.addr(0)).to_string();
    assert!(msg.contains("exception entry"), "{msg}");
    let msg = refused(t.addr(5)).to_string();
    assert!(msg.contains("already probed"), "{msg}");
    let msg = KprobeError::<Insn>::Full { capacity: 4 }.to_string();
    assert!(msg.contains("all 4"), "{msg}");
}

#[test]
fn a_stale_id_is_refused_even_when_its_slot_was_reused() {
    let probes: Kprobes<HostKprobeArch, 4> = Kprobes::new(HostKprobeArch::new(1, &plain_text(4)));
    let t = probes.arch().text();
    let old = probes.register_kprobe(t.addr(0), None, None).unwrap();
    probes.unregister_kprobe(old).unwrap();
    let new = probes.register_kprobe(t.addr(1), None, None).unwrap();
    assert_ne!(old, new);
    assert_eq!(probes.disable(old), Err(KprobeError::UnknownProbe(old)));
    assert_eq!(probes.enable(old), Err(KprobeError::UnknownProbe(old)));
    assert_eq!(
        probes.unregister_kprobe(old),
        Err(KprobeError::UnknownProbe(old))
    );
    assert_eq!(
        t.word(1),
        probes.arch().breakpoint(),
        "the stale id disarmed the new probe"
    );
}

#[test]
fn disable_restores_the_original_and_enable_rearms() {
    static PRE: AtomicU64 = AtomicU64::new(0);
    fn pre(_: &ProbeHit, _: &mut HostFrame) {
        PRE.fetch_add(1, Ordering::Relaxed);
    }
    let probes: Kprobes<HostKprobeArch, 4> = Kprobes::new(HostKprobeArch::new(1, &plain_text(4)));
    let t = probes.arch().text();
    let site = t.addr(1);
    let id = probes.register_kprobe(site, Some(pre), None).unwrap();
    probes.arch().run(&probes, site);
    probes.disable(id).unwrap();
    probes.disable(id).unwrap();
    assert_eq!(t.word(1), movz(2));
    assert!(!probes.stats(id).unwrap().armed);
    probes.arch().run(&probes, site);
    probes.enable(id).unwrap();
    probes.enable(id).unwrap();
    assert_eq!(t.word(1), probes.arch().breakpoint());
    probes.arch().run(&probes, site);
    let ProbeStats {
        hits,
        missed,
        armed,
        ..
    } = probes.stats(id).unwrap();
    assert_eq!(
        (hits, missed, armed, PRE.load(Ordering::Relaxed)),
        (2, 0, true, 2)
    );
}

#[test]
fn several_probes_count_apart() {
    let probes: Kprobes<HostKprobeArch, 4> = Kprobes::new(HostKprobeArch::new(1, &plain_text(4)));
    let t = probes.arch().text();
    let ids: Vec<_> = (0..4)
        .map(|i| probes.register_kprobe(t.addr(i), None, None).unwrap())
        .collect();
    for i in 0..4 {
        for _ in 0..=i {
            assert_eq!(
                probes.arch().run(&probes, t.addr(i)).stepped,
                movz(i as u16 + 1)
            );
        }
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(probes.stats(*id).unwrap().hits, i as u64 + 1);
    }
}

/// The probes of the missed-counting test, reachable from its handlers.
static NESTED: std::sync::OnceLock<Kprobes<HostKprobeArch, 4>> = std::sync::OnceLock::new();
static INNER_PRE: AtomicU64 = AtomicU64::new(0);

#[test]
fn a_probe_hit_inside_a_handler_is_missed_not_recursed_into() {
    fn outer_pre(_: &ProbeHit, frame: &mut HostFrame) {
        let probes = NESTED.get().unwrap();
        assert!(probes.in_probe());
        let t = probes.arch().text();
        // Another probe's site, and this probe's own: both execute their original, no
        // handler runs.
        for site in [t.addr(1), t.addr(0)] {
            let inner = probes.arch().run(probes, site);
            assert_eq!(inner.pc, site + 4);
            assert_ne!(
                inner.stepped, 0,
                "the nested hit did not execute the original"
            );
        }
        frame.x[0] += 1;
    }
    fn inner_pre(_: &ProbeHit, _: &mut HostFrame) {
        INNER_PRE.fetch_add(1, Ordering::Relaxed);
    }
    let probes = NESTED.get_or_init(|| Kprobes::new(HostKprobeArch::new(1, &plain_text(4))));
    let t = probes.arch().text();
    let outer = probes
        .register_kprobe(t.addr(0), Some(outer_pre), None)
        .unwrap();
    let inner = probes
        .register_kprobe(t.addr(1), Some(inner_pre), None)
        .unwrap();
    for _ in 0..3 {
        let frame = probes.arch().run(probes, t.addr(0));
        assert_eq!(frame.x[0], 1);
        assert!(!probes.in_probe());
    }
    // Unnested, the inner probe's handler does run.
    probes.arch().run(probes, t.addr(1));
    let (o, i) = (probes.stats(outer).unwrap(), probes.stats(inner).unwrap());
    assert_eq!((o.hits, o.missed), (3, 3));
    assert_eq!((i.hits, i.missed), (1, 3));
    assert_eq!(INNER_PRE.load(Ordering::Relaxed), 1);
}

static CONCURRENT_PRE: AtomicU64 = AtomicU64::new(0);

/// CPUs 1..=3 register and unregister probes (each its own sites, and all of them one
/// shared site) while CPU 0 executes every site in a loop: no breakpoint is ever
/// unclaimed, the shared site has exactly one owner at a time, and the hits the
/// registry counted equal the probed executions CPU 0 saw.
#[test]
fn registration_from_several_cpus_while_another_hits() {
    fn pre(_: &ProbeHit, _: &mut HostFrame) {
        CONCURRENT_PRE.fetch_add(1, Ordering::Relaxed);
    }
    const ROUNDS: usize = 60;
    const REGISTRARS: usize = 3;
    let probes: Arc<Kprobes<HostKprobeArch, 8>> = Arc::new(Kprobes::new(HostKprobeArch::new(
        REGISTRARS + 1,
        &plain_text(8),
    )));
    let sites: Vec<usize> = (0..8).map(|i| probes.arch().text().addr(i)).collect();
    let shared_site = sites[7];
    let quit = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let counted_hits = Arc::new(AtomicU64::new(0));
    let shared_owners = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(REGISTRARS + 1));
    let done = Arc::new(AtomicUsize::new(0));

    let hitter = {
        let (probes, sites, quit, start) =
            (probes.clone(), sites.clone(), quit.clone(), start.clone());
        std::thread::spawn(move || {
            let arch = probes.arch().stop().arch();
            arch.bind_current_thread(0);
            start.wait();
            let mut probed = 0u64;
            while !quit.load(Ordering::Relaxed) {
                for &site in &sites {
                    let frame = probes.arch().run(&probes, site);
                    assert_eq!(frame.pc, site + 4);
                    probed += u64::from(frame.stepped != 0);
                    arch.poll_interrupts();
                }
            }
            probed
        })
    };
    let registrars: Vec<_> = (1..=REGISTRARS)
        .map(|cpu| {
            let (probes, sites) = (probes.clone(), sites.clone());
            let (in_flight, max_in_flight, counted_hits, shared_owners) = (
                in_flight.clone(),
                max_in_flight.clone(),
                counted_hits.clone(),
                shared_owners.clone(),
            );
            let (start, done) = (start.clone(), done.clone());
            std::thread::spawn(move || {
                probes.arch().stop().arch().bind_current_thread(cpu);
                let own = [sites[2 * (cpu - 1)], sites[2 * (cpu - 1) + 1]];
                let note = |result: Result<ProbeStats, _>| {
                    counted_hits.fetch_add(result.unwrap().hits, Ordering::Relaxed);
                };
                start.wait();
                for round in 0..ROUNDS {
                    let site = own[round % 2];
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_in_flight.fetch_max(now, Ordering::SeqCst);
                    let id = probes.register_kprobe(site, Some(pre), None).unwrap();
                    let shared = probes.register_kprobe(shared_site, Some(pre), None);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    if round % 3 == 0 {
                        probes.disable(id).unwrap();
                        probes.enable(id).unwrap();
                    }
                    note(probes.unregister_kprobe(id));
                    match shared {
                        Ok(shared) => {
                            shared_owners.fetch_add(1, Ordering::Relaxed);
                            note(probes.unregister_kprobe(shared));
                        }
                        Err(KprobeError::Duplicate { addr, .. }) => assert_eq!(addr, shared_site),
                        Err(other) => panic!("cpu {cpu}: shared site: {other}"),
                    }
                }
                // Take stop IPIs until every registrar is done (bounded).
                done.fetch_add(1, Ordering::SeqCst);
                let arch = probes.arch().stop().arch();
                let deadline = Instant::now() + Duration::from_secs(60);
                while done.load(Ordering::SeqCst) < REGISTRARS {
                    assert!(
                        Instant::now() < deadline,
                        "cpu {cpu}: the other registrars never finished"
                    );
                    arch.relax();
                }
            })
        })
        .collect();
    for r in registrars {
        r.join().unwrap();
    }
    quit.store(true, Ordering::Relaxed);
    let probed = hitter.join().unwrap();
    assert!(
        max_in_flight.load(Ordering::SeqCst) > 1,
        "the registrations never overlapped: this test saw no concurrency"
    );
    assert!(
        probed > 0,
        "CPU 0 never hit an armed probe: this test saw no concurrency"
    );
    assert!(shared_owners.load(Ordering::Relaxed) >= 1);
    assert_eq!(
        counted_hits.load(Ordering::Relaxed),
        probed,
        "hits counted != probed executions"
    );
    assert_eq!(
        CONCURRENT_PRE.load(Ordering::Relaxed),
        probed,
        "pre handler runs != probed executions"
    );
    assert_eq!(
        (0..8)
            .map(|i| probes.arch().text().word(i))
            .collect::<Vec<_>>(),
        plain_text(8),
        "a site was left armed"
    );
}

// arm64's instruction decoder and simulator (`src/arch/aarch64/kprobes_insn.rs`),
// compiled here against a stand-in trap frame: encodings from GNU as
// (`aarch64-linux-gnu-as -march=armv8.8-a`), backward offsets and every condition,
// which the kernel's fixtures (forward branches, a few conditions) do not reach.

/// What `kprobes_insn` needs of its `super::exceptions`.
mod exceptions {
    #[derive(Default)]
    pub struct TrapFrame {
        pub x: [u64; 31],
        pub elr: u64,
        pub spsr: u64,
    }
}

#[path = "../src/arch/aarch64/kprobes_insn.rs"]
#[allow(dead_code)]
mod kprobes_insn;

use exceptions::TrapFrame;
use kprobes_insn::{Literal, Plan, Sim, condition_holds, decode, simulate};

#[test]
fn a64_decode_sorts_every_class() {
    let simulated = |insn: u32| match decode(insn) {
        Ok(Plan::Simulate(sim)) => sim,
        other => panic!("{insn:#010x}: {other:?}"),
    };
    assert_eq!(
        simulated(0x1400_0001),
        Sim::Branch {
            offset: 4,
            link: false
        }
    );
    assert_eq!(
        simulated(0x17ff_fffe),
        Sim::Branch {
            offset: -8,
            link: false
        }
    );
    assert_eq!(
        simulated(0x9400_0040),
        Sim::Branch {
            offset: 0x100,
            link: true
        }
    );
    assert_eq!(
        simulated(0x5400_0040),
        Sim::BranchCond { offset: 8, cond: 0 }
    );
    assert_eq!(
        simulated(0x54ff_ffe1),
        Sim::BranchCond {
            offset: -4,
            cond: 1
        }
    );
    let cbnz = Sim::CompareBranch {
        offset: -16,
        rt: 3,
        wide: false,
        nonzero: true,
    };
    assert_eq!(simulated(0x35ff_ff83), cbnz);
    let cbz = Sim::CompareBranch {
        offset: 8,
        rt: 0,
        wide: true,
        nonzero: false,
    };
    assert_eq!(simulated(0xb400_0040), cbz);
    let tbz = Sim::TestBranch {
        offset: 8,
        rt: 0,
        bit: 3,
        nonzero: false,
    };
    assert_eq!(simulated(0x3618_0040), tbz);
    let tbnz = Sim::TestBranch {
        offset: -8,
        rt: 5,
        bit: 40,
        nonzero: true,
    };
    assert_eq!(simulated(0xb747_ffc5), tbnz);
    assert_eq!(
        simulated(0x1000_0201),
        Sim::Address {
            rd: 1,
            offset: 0x40,
            page: false
        }
    );
    assert_eq!(
        simulated(0x30ff_ffe2),
        Sim::Address {
            rd: 2,
            offset: -3,
            page: false
        }
    );
    assert_eq!(
        simulated(0xf000_0001),
        Sim::Address {
            rd: 1,
            offset: 0x3000,
            page: true
        }
    );
    assert_eq!(
        simulated(0xf0ff_ffc4),
        Sim::Address {
            rd: 4,
            offset: -0x5000,
            page: true
        }
    );
    for (insn, kind) in [
        (0x5800_0041, Literal::Double),
        (0x1800_0041, Literal::Word),
        (0x9800_0041, Literal::SignedWord),
    ] {
        assert_eq!(
            simulated(insn),
            Sim::Load {
                rt: 1,
                offset: 8,
                kind
            }
        );
    }
    assert_eq!(
        simulated(0xd800_0040),
        Sim::Load {
            rt: 0,
            offset: 8,
            kind: Literal::Prefetch
        }
    );
    assert_eq!(
        simulated(0xd65f_03c0),
        Sim::BranchReg {
            rn: 30,
            link: false
        }
    );
    assert_eq!(
        simulated(0xd61f_0020),
        Sim::BranchReg { rn: 1, link: false }
    );
    assert_eq!(simulated(0xd63f_0020), Sim::BranchReg { rn: 1, link: true });
    // NOP, YIELD, DMB ISH, ISB, ADD (shifted), STR through SP: anywhere.
    for insn in [
        0xd503_201f,
        0xd503_203f,
        0xd503_3bbf,
        0xd503_3fdf,
        0x8b00_0401,
        0xf900_07e0,
    ] {
        assert_eq!(decode(insn), Ok(Plan::OutOfLine), "{insn:#010x}");
    }
    // BC.EQ, LDR Q0 literal, RETAA, ERET, BRK #4, SVC #1, HLT #0, LDXR, STXR, LDAR,
    // MSR DAIFSet, MRS CurrentEL, UDF #0.
    for insn in [
        0x5400_0050,
        0x9c00_0040,
        0xd65f_0bff,
        0xd69f_03e0,
        0xd420_0080,
        0xd400_0021,
        0xd440_0000,
        0xc85f_7c20,
        0xc802_7c20,
        0xc8df_fc20,
        0xd503_42df,
        0xd538_4240,
        0,
    ] {
        assert!(
            decode(insn).is_err(),
            "{insn:#010x} accepted: {:?}",
            decode(insn)
        );
    }
}

#[test]
fn a64_conditions_follow_the_arm_arm_table() {
    for nzcv in 0..16u64 {
        let (n, z, c, v) = (nzcv & 8 != 0, nzcv & 4 != 0, nzcv & 2 != 0, nzcv & 1 != 0);
        let table = [
            z,
            !z,
            c,
            !c,
            n,
            !n,
            v,
            !v,
            c && !z,
            !c || z,
            n == v,
            n != v,
            !z && n == v,
            z || n != v,
            true,
            true,
        ];
        for (cond, expected) in table.into_iter().enumerate() {
            assert_eq!(
                condition_holds(cond as u8, nzcv << 28),
                expected,
                "cond {cond:#x}, NZCV {nzcv:04b}"
            );
        }
    }
}

#[test]
fn a64_simulation_moves_the_pc_and_the_registers() {
    let pc = 0x4020_1004u64;
    let run = |insn: u32, setup: &dyn Fn(&mut TrapFrame)| {
        let mut frame = TrapFrame::default();
        setup(&mut frame);
        let Ok(Plan::Simulate(sim)) = decode(insn) else {
            panic!("{insn:#010x} is not simulated");
        };
        simulate(sim, pc, &mut frame);
        frame
    };
    let nothing = |_: &mut TrapFrame| {};
    assert_eq!(run(0x17ff_fffe, &nothing).elr, pc - 8);
    let bl = run(0x9400_0040, &nothing);
    assert_eq!((bl.elr, bl.x[30]), (pc + 0x100, pc + 4));
    // B.NE -4: taken with Z clear, not with Z set.
    assert_eq!(run(0x54ff_ffe1, &nothing).elr, pc - 4);
    assert_eq!(run(0x54ff_ffe1, &|f| f.spsr = 1 << 30).elr, pc + 4);
    // CBNZ W3: the upper half does not count.
    assert_eq!(run(0x35ff_ff83, &|f| f.x[3] = 1 << 32).elr, pc + 4);
    assert_eq!(run(0x35ff_ff83, &|f| f.x[3] = 1).elr, pc - 16);
    // TBNZ X5, #40.
    assert_eq!(run(0xb747_ffc5, &|f| f.x[5] = 1 << 40).elr, pc - 8);
    assert_eq!(run(0xb747_ffc5, &|f| f.x[5] = 1 << 39).elr, pc + 4);
    let adr = run(0x30ff_ffe2, &nothing);
    assert_eq!((adr.x[2], adr.elr), (pc - 3, pc + 4));
    assert_eq!(run(0xf0ff_ffc4, &nothing).x[4], (pc & !0xfff) - 0x5000);
    let ret = run(0xd65f_03c0, &|f| f.x[30] = 0x1234);
    assert_eq!(ret.elr, 0x1234);
    let blr = run(0xd63f_0020, &|f| f.x[1] = 0x5678);
    assert_eq!((blr.elr, blr.x[30]), (0x5678, pc + 4));
    // BLR X30: the target is read before the link is written.
    let blr30 = run(0xd63f_03c0, &|f| f.x[30] = 0x9abc);
    assert_eq!((blr30.elr, blr30.x[30]), (0x9abc, pc + 4));
}

#[test]
fn a64_literal_loads_read_next_to_the_instruction() {
    // The literal 8 bytes past a made-up PC: the words of `pool`.
    let pool: [u32; 2] = [0x8000_0010, 0x1122_3344];
    let literal = pool.as_ptr() as u64;
    let mut frame = TrapFrame::default();
    let load = |insn: u32, frame: &mut TrapFrame| {
        let Ok(Plan::Simulate(sim)) = decode(insn) else {
            panic!("{insn:#010x} is not simulated");
        };
        simulate(sim, literal - 8, frame);
        frame.x[1]
    };
    assert_eq!(load(0x1800_0041, &mut frame), 0x8000_0010);
    assert_eq!(load(0x9800_0041, &mut frame), 0xffff_ffff_8000_0010);
    assert_eq!(load(0x5800_0041, &mut frame), 0x1122_3344_8000_0010);
    assert_eq!(frame.elr, literal - 4);
}
