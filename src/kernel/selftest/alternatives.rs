//! `alternatives`: every alternative site holds the variant the CPU's features call
//! for, read back from the text, and every kernel path with a site runs and computes
//! the right result; the runtime table goes through `patch_machine` again (the
//! benchmark's sites, on and off) and the paths still agree.

use super::{JOB_TIMEOUT_NS, Params, Verdict};
use crate::kernel::platform::{self, current_cpu, online_cpus};
use crate::kernel::smp::run_on;
use crate::kprint;
use crate::patch::alternatives::{Class, Features, SiteView};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The features each CPU reads, and the index its `current_cpu` returns.
struct PerCpu {
    features: [AtomicU64; crate::MAX_CPUS],
    index: [AtomicUsize; crate::MAX_CPUS],
}

fn report_cpu(cpu: usize, per_cpu: &PerCpu) {
    per_cpu.features[cpu].store(platform::cpu_features().0, Ordering::Relaxed);
    per_cpu.index[cpu].store(current_cpu(), Ordering::Relaxed);
}

/// Feature names of a set, comma-separated.
struct Names(Features);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for bit in (0..64).filter(|&bit| self.0.has(bit)) {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(platform::ALTERNATIVES.feature_name(bit))?;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

fn variant(in_text: Option<bool>) -> &'static str {
    match in_text {
        Some(true) => "replacement",
        Some(false) => "original",
        None => "neither variant",
    }
}

/// Checks every site; returns (boot, runtime) counts, or the first wrong site.
fn check_sites() -> Result<(usize, usize), SiteView> {
    let mut counts = (0, 0);
    let mut wrong = None;
    platform::ALTERNATIVES.sites(&mut |site| {
        kprint!(
            "# alternatives: {:?} site {} at {:#x} ({} bytes, feature {}): {} (wanted {})\n",
            site.class,
            site.index,
            site.site,
            site.len,
            site.feature.1,
            variant(site.in_text),
            variant(Some(site.wanted)),
        );
        match site.class {
            Class::Boot => counts.0 += 1,
            Class::Runtime => counts.1 += 1,
        }
        if site.in_text != Some(site.wanted) && wrong.is_none() {
            wrong = Some(site);
        }
    });
    match wrong {
        Some(site) => Err(site),
        None => Ok(counts),
    }
}

pub fn alternatives(params: &Params) -> Verdict {
    let (features, status) = platform::ALTERNATIVES.status();
    if let Err(err) = status {
        fail!("tables not applied: {err}");
    }
    kprint!("# alternatives: features {}\n", Names(features));
    if let Some(expected) = params.expect_features {
        check!(
            features == expected,
            "features {} read from the ID registers, but expect_features={} (this CPU model)",
            Names(features),
            Names(expected)
        );
    }

    // The text the secondaries run relies on the boot CPU's features: each must have
    // them, and its `current_cpu` (a site on x86) must name it.
    let me = current_cpu();
    let per_cpu = PerCpu {
        features: [const { AtomicU64::new(0) }; crate::MAX_CPUS],
        index: [const { AtomicUsize::new(usize::MAX) }; crate::MAX_CPUS],
    };
    report_cpu(me, &per_cpu);
    let others = online_cpus().without(me);
    // SAFETY: `per_cpu` outlives the jobs: we wait for them before returning.
    let jobs = unsafe { run_on(others, report_cpu, &per_cpu) };
    if let Err(late) = jobs.wait(JOB_TIMEOUT_NS) {
        fail!("cpus {late} did not report their features within 30 s");
    }
    for cpu in online_cpus().iter() {
        let theirs = Features(per_cpu.features[cpu].load(Ordering::Relaxed));
        check!(
            theirs == features,
            "cpu{cpu} has features {} but the text was patched for {}",
            Names(theirs),
            Names(features)
        );
        let index = per_cpu.index[cpu].load(Ordering::Relaxed);
        check!(index == cpu, "current_cpu() on cpu{cpu} returned {index}");
    }

    let (boot, runtime) = match check_sites() {
        Ok(counts) => counts,
        Err(site) => fail!(
            "{:?} site {} at {:#x} (feature {}, {}): holds {}",
            site.class,
            site.index,
            site.site,
            site.feature.1,
            if site.wanted { "present" } else { "absent" },
            variant(site.in_text)
        ),
    };
    let (bench_sites, _) = platform::bench_sites_applied();
    check!(
        boot >= 1 && runtime as u64 > bench_sites,
        "{boot} boot and {runtime} runtime sites: expected a kernel path in each table \
         besides the {bench_sites} bench sites"
    );
    for path in platform::ALTERNATIVE_PATHS {
        if let Err(why) = (path.run)() {
            fail!("{}: {why}", path.name);
        }
    }

    // The runtime table through patch_machine again: the bench sites on, then off.
    for on in [true, false] {
        let written = match platform::ALTERNATIVES.flip_bench(on) {
            Ok(written) => written,
            Err(err) => fail!("bench sites {}: {err}", if on { "on" } else { "off" }),
        };
        let (sites, applied) = platform::bench_sites_applied();
        let expected = if on { sites } else { 0 };
        check!(
            applied == expected && written > 0,
            "bench sites {}: {applied} of {sites} run their replacement ({written} chunks \
             written), expected {expected}",
            if on { "on" } else { "off" }
        );
        if let Err(site) = check_sites() {
            fail!(
                "bench {}: {:?} site {} at {:#x} holds {}",
                if on { "on" } else { "off" },
                site.class,
                site.index,
                site.site,
                variant(site.in_text)
            );
        }
    }
    let paths = platform::ALTERNATIVE_PATHS.len();
    Verdict::Pass(msg!(
        "features {}: {boot} boot and {runtime} runtime sites hold their variant on {} CPUs; \
         {paths} paths ran",
        Names(features),
        online_cpus().len()
    ))
}
