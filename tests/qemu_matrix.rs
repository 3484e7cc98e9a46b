//! Boots the kernel under QEMU across a matrix of CPU models, vCPU counts and
//! machine options, through `./qemu.sh` (which checks the kernel's KTAP report).
//!
//! The release image is built once, by the first cell that runs. The cells then
//! run one at a time: QEMU's vCPUs spin, and the project's machines have only
//! two host cores. A missing QEMU is a failure with the command that fixes it,
//! never a silent skip. Each cell's serial log is kept under
//! `target/tmp/qemu-matrix/<cell>.log`.
//!
//! Each cell is one `#[test]` named after it, so libtest selects cells:
//!
//! ```text
//! cargo test --test qemu_matrix                                  # every cell
//! cargo test --test qemu_matrix -- --list                        # the cells' names
//! cargo test --test qemu_matrix -- --exact aarch64_max_smp4_el2  # one cell
//! cargo test --test qemu_matrix -- cortex_a7                     # cells whose name contains it
//! ```
//!
//! A failing cell's message starts with the cell's name and QEMU configuration,
//! then the kernel's failing KTAP results (`not ok N name`), then qemu.sh's
//! verdict, the commands that rerun it and the end of the serial output. On
//! GitHub Actions the first line is also an `::error` annotation.
//! `.github/workflows/ci.yml` runs each cell as its own job; `tests/ci_workflow.rs`
//! checks that its list of cells is this file's.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

mod support;

/// Torture parameters for most cells; `aarch64_max_smp4` runs the kernel's
/// full default, as plain `./qemu.sh` does.
const QUICK: &str = "flips=2000";
/// Per-cell limit handed to `qemu.sh --timeout`.
const TIMEOUT_S: u32 = 240;
/// Serial lines shown in a failure message.
const TAIL_LINES: usize = 40;

const BIN: &str = "patch-machine";

/// Serialises the cells (cargo runs tests on parallel threads).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
/// The outcome of the one release build per architecture, shared by its cells.
static BUILD_AARCH64: OnceLock<Result<(), String>> = OnceLock::new();
static BUILD_X86_64: OnceLock<Result<(), String>> = OnceLock::new();

/// An architecture of the matrix: its kernel target and its QEMU.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arch {
    Aarch64,
    X86_64,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64",
            Arch::X86_64 => "x86_64",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64-unknown-none",
            Arch::X86_64 => "x86_64-unknown-none",
        }
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::Aarch64 => "qemu-system-aarch64",
            Arch::X86_64 => "qemu-system-x86_64",
        }
    }

    fn build(self) -> &'static OnceLock<Result<(), String>> {
        match self {
            Arch::Aarch64 => &BUILD_AARCH64,
            Arch::X86_64 => &BUILD_X86_64,
        }
    }
}

/// One configuration of the matrix.
struct Cell {
    name: &'static str,
    arch: Arch,
    cpu: &'static str,
    smp: u32,
    /// Appended to `virt,gic-version=3`.
    machine_opts: &'static str,
    /// Kernel command line (`-append`).
    bootargs: &'static str,
    /// `--accel`; empty for qemu.sh's default (single-threaded TCG).
    accel: &'static str,
    timeout_s: u32,
}

impl Cell {
    const fn new(name: &'static str, cpu: &'static str, smp: u32) -> Self {
        Cell {
            name,
            arch: Arch::Aarch64,
            cpu,
            smp,
            machine_opts: "",
            bootargs: QUICK,
            accel: "",
            timeout_s: TIMEOUT_S,
        }
    }

    /// The same cell on x86_64 (`-machine q35`), booted with the kernel's default tests.
    const fn on_x86_64(mut self) -> Self {
        self.arch = Arch::X86_64;
        self.bootargs = "";
        self
    }

    const fn accel(mut self, accel: &'static str) -> Self {
        self.accel = accel;
        self
    }

    const fn machine_opts(mut self, opts: &'static str) -> Self {
        self.machine_opts = opts;
        self
    }

    const fn bootargs(mut self, bootargs: &'static str) -> Self {
        self.bootargs = bootargs;
        self
    }

    const fn timeout_s(mut self, seconds: u32) -> Self {
        self.timeout_s = seconds;
        self
    }

    /// The machine, CPU and command line, for messages.
    fn describe(&self) -> String {
        let mut machine = String::from(match self.arch {
            Arch::Aarch64 => "virt,gic-version=3",
            Arch::X86_64 => "q35",
        });
        if !self.machine_opts.is_empty() {
            machine.push(',');
            machine.push_str(self.machine_opts);
        }
        let bootargs = if self.bootargs.is_empty() {
            "(none: kernel defaults)"
        } else {
            self.bootargs
        };
        let accel = if self.accel.is_empty() {
            "tcg,thread=single"
        } else {
            self.accel
        };
        format!(
            "-machine {machine} -cpu {} -smp {} -accel {accel}, timeout {} s, bootargs: {bootargs}",
            self.cpu, self.smp, self.timeout_s
        )
    }

    fn qemu_sh_args(&self, log: &Path) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--no-build".into(),
            "--arch".into(),
            self.arch.name().into(),
            "--cpu".into(),
            self.cpu.into(),
            "--smp".into(),
            self.smp.to_string(),
            "--timeout".into(),
            self.timeout_s.to_string(),
            "--log".into(),
            log.display().to_string(),
        ];
        if !self.accel.is_empty() {
            args.push("--accel".into());
            args.push(self.accel.into());
        }
        if !self.machine_opts.is_empty() {
            args.push("--machine-opts".into());
            args.push(self.machine_opts.into());
        }
        if !self.bootargs.is_empty() {
            args.push("--".into());
            args.extend(self.bootargs.split_whitespace().map(String::from));
        }
        args
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fix_qemu() -> String {
    format!(
        "install it with: sudo bash {}",
        root().join(".ci/install-qemu.sh").display()
    )
}

/// Fails (never skips) when QEMU is missing and cannot be installed.
fn require_qemu(arch: Arch) {
    let qemu = arch.qemu();
    support::ensure_installed(qemu).unwrap_or_else(|e| panic!("{e}"));
    match Command::new(qemu).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{qemu} --version` failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            fix_qemu()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("{qemu} not found; {}", fix_qemu())
        }
        Err(e) => panic!("cannot run {qemu}: {e}; {}", fix_qemu()),
    }
}

/// `cargo build --release --target <arch>-unknown-none --bin patch-machine`.
fn build_kernel(arch: Arch) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = [
        "build",
        "--release",
        "--target",
        arch.target(),
        "--bin",
        BIN,
    ];
    let shown = format!("cargo {}", args.join(" "));
    support::ensure_rust_target(arch.target())?;
    eprintln!("qemu_matrix: building the kernel: {shown}");
    let out = Command::new(cargo)
        .args(args)
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{shown}` failed ({}):\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stderr), TAIL_LINES)
    ))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn log_path(cell: &Cell) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("qemu-matrix")
        .join(format!("{}.log", cell.name))
}

/// What one boot through qemu.sh produced.
struct Boot {
    out: std::process::Output,
    shown: String,
    log: PathBuf,
    verdict: String,
}

/// Boots `cell` through `./qemu.sh --no-build ...` (one cell at a time, after the one
/// kernel build).
fn boot(cell: &Cell) -> Boot {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_qemu(cell.arch);
    if let Err(e) = cell.arch.build().get_or_init(|| build_kernel(cell.arch)) {
        panic!(
            "cell {} ({}) not run: the kernel build failed\n{e}",
            cell.name,
            cell.describe()
        );
    }

    let log = log_path(cell);
    let args = cell.qemu_sh_args(&log);
    let shown = format!("./qemu.sh {}", args.join(" "));
    eprintln!("qemu_matrix: {}: {shown}", cell.name);
    let out = Command::new("bash")
        .arg(root().join("qemu.sh"))
        .args(&args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let verdict = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("qemu.sh:") && (l.contains(": PASS (") || l.contains(": FAIL (")))
        .unwrap_or("qemu.sh: (no verdict line)")
        .to_string();
    Boot {
        out,
        shown,
        log,
        verdict,
    }
}

/// The kernel's failing KTAP results (`not ok N name ...`, not `# SKIP`) in `serial`,
/// those inside subtest suites (indented) too.
fn failing_ktap_results(serial: &str) -> Vec<&str> {
    serial
        .lines()
        .map(|l| l.trim_end_matches('\r').trim_start_matches(' '))
        .filter(|l| {
            l.strip_prefix("not ok ").is_some_and(|rest| {
                rest.starts_with(|c: char| c.is_ascii_digit())
                    && !rest.split_once(" #").is_some_and(|(_, directive)| {
                        directive
                            .trim_start()
                            .to_ascii_uppercase()
                            .starts_with("SKIP")
                    })
            })
        })
        .collect()
}

/// The command that reruns just `cell`.
fn rerun(cell: &Cell) -> String {
    format!("cargo test --test qemu_matrix -- --exact {}", cell.name)
}

/// On GitHub Actions, prints `line` as an error annotation (the workflow's summary
/// then names the cell without opening its log).
fn annotate(cell: &Cell, line: &str) {
    if std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true") {
        let escaped = line
            .replace('%', "%25")
            .replace('\r', "%0D")
            .replace('\n', "%0A");
        println!("::error title=QEMU matrix cell {}::{escaped}", cell.name);
    }
}

/// Boots `cell`, which must FAIL (a provoked fatal condition), and checks that the
/// serial output (without `\r`) or qemu.sh's verdict says everything in `report` and
/// that qemu.sh saw a failure status.
fn run_cell_expecting_failure(cell: &Cell, report: &[&str]) {
    let boot = boot(cell);
    let serial = String::from_utf8_lossy(&boot.out.stdout);
    let said = format!("{}\n{}", serial.replace('\r', ""), boot.verdict);
    let missing: Vec<&&str> = report.iter().filter(|w| !said.contains(**w)).collect();
    if boot.out.status.success() || !missing.is_empty() {
        let first = format!(
            "{} [{}]: should fail and report {report:?}; qemu.sh {}, missing {missing:?}",
            cell.name,
            cell.describe(),
            boot.out.status
        );
        annotate(cell, &first);
        panic!(
            "{first}\n  qemu.sh verdict: {}\n  rerun this cell: {}\n  qemu.sh command: {}\n  full serial log: {}\n\
             --- last {TAIL_LINES} lines of serial output ---\n{}",
            boot.verdict.trim_start_matches("qemu.sh: "),
            rerun(cell),
            boot.shown,
            boot.log.display(),
            tail(&serial, TAIL_LINES)
        );
    }
    println!("{}: failed as it must: {}", cell.name, boot.verdict);
}

/// Boots `cell` through `./qemu.sh --no-build ...` and, unless it passed, panics
/// with a message that starts with the cell's name, its configuration and the
/// failing KTAP results, then qemu.sh's verdict, how to rerun it and the end of
/// the serial output.
/// x86 cells with more than one CPU and the default tests must run `nmi_safe_patching`
/// (the writes from the patcher's NMI), not skip it; x86 cells that run the kprobe tests
/// (the default tests or `tests=all`) must run every one of them (`kprobe_registry`
/// needs two CPUs), and `user_faults`; x86 cells with `isolcpus=`/`nohz_full=` must
/// run `user_faults`, `isolation_quiet` and `isolation_torture`: the reason why not, if
/// one skipped or is missing.
fn skipped_on_x86(cell: &Cell, serial: &str) -> Option<String> {
    if cell.arch != Arch::X86_64 {
        return None;
    }
    let default_tests = !cell.bootargs.contains("tests=");
    let all_tests = default_tests || cell.bootargs.contains("tests=all");
    let mut required: Vec<&str> = Vec::new();
    if default_tests && cell.smp >= 2 {
        required.push("nmi_safe_patching");
    }
    if all_tests {
        required.extend([
            "kprobe_refusals",
            "kprobe_simulate",
            "kprobe_contexts",
            "kprobe_hammer",
        ]);
        if cell.smp >= 2 {
            required.push("kprobe_registry");
        }
        required.push("user_faults");
    }
    // Ring 3 exists on x86: the isolation tests of an `isolcpus=` cell run, never skip.
    if cell.bootargs.contains("isolcpus=") || cell.bootargs.contains("nohz_full=") {
        required.extend(["user_faults", "isolation_quiet", "isolation_torture"]);
    }
    required.into_iter().find_map(|test| {
        let named = format!(" {test}");
        let result = serial.lines().find(|l| {
            l.starts_with("ok ")
                && l.split(" #")
                    .next()
                    .is_some_and(|head| head.ends_with(&named))
        });
        match result {
            Some(line) if !line.contains("# SKIP") => None,
            Some(line) => Some(format!("{test} was skipped on x86: {line}")),
            None => Some(format!("no `ok N {test}` result on x86")),
        }
    })
}

/// The cells whose default run must show CPU hotplug working (2, 4 and 8 CPUs on both
/// architectures).
const HOTPLUG_CELLS: &[&str] = &[
    "aarch64_max_smp2",
    "aarch64_max_smp4",
    "aarch64_max_smp8",
    "x86_64_max_smp2",
    "x86_64_max_smp4",
    "x86_64_max_smp8",
];

/// The `key=value` count in a KTAP result's note, if present.
fn count_in(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// In a hotplug cell: every secondary went down and came back (`hotplug_cycle`), and
/// at 3 CPUs or more `hotplug_torture` counted hotplug cycles that overlapped patching
/// (at 2 it must say why it skipped). The reason why not, if they did not.
fn hotplug_counts_wrong(cell: &Cell, serial: &str) -> Option<String> {
    if !HOTPLUG_CELLS.contains(&cell.name) {
        return None;
    }
    let result = |name: &str| {
        serial
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .find(|l| l.starts_with("ok ") && l.contains(&format!(" {name} #")))
    };
    let secondaries = cell.smp - 1;
    match result("hotplug_cycle") {
        Some(line) if line.contains(&format!("# {secondaries} CPUs down and up")) => {}
        Some(line) => {
            return Some(format!(
                "hotplug_cycle did not cycle {secondaries} CPUs: {line}"
            ));
        }
        None => return Some("no `ok N hotplug_cycle` result".into()),
    }
    let Some(line) = result("hotplug_torture") else {
        return Some("no `ok N hotplug_torture` result".into());
    };
    if cell.smp < 3 {
        return (!line.contains("# SKIP needs 3 CPUs"))
            .then(|| format!("hotplug_torture at {} CPUs: {line}", cell.smp));
    }
    let cycles = count_in(line, "cycles").unwrap_or(0);
    let interleaved = count_in(line, "interleaved").unwrap_or(0);
    let while_down = count_in(line, "while_down").unwrap_or(0);
    (cycles == 0 || interleaved == 0 || while_down == 0)
        .then(|| format!("hotplug_torture shows no overlap of hotplug and patching: {line}"))
}

fn run_cell(cell: &Cell) {
    let Boot {
        out,
        shown,
        log,
        verdict,
    } = boot(cell);
    let serial = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // qemu.sh's own messages start with "qemu.sh:"; the rest of its stderr is
    // QEMU's (or bash's).
    let (ours, theirs): (Vec<&str>, Vec<&str>) =
        stderr.lines().partition(|l| l.starts_with("qemu.sh:"));
    if out.status.success() {
        if let Some(why) =
            skipped_on_x86(cell, &serial).or_else(|| hotplug_counts_wrong(cell, &serial))
        {
            panic!(
                "{} [{}]: {why}\n  rerun this cell: {}",
                cell.name,
                cell.describe(),
                rerun(cell)
            );
        }
        println!("{}: {verdict}", cell.name);
        return;
    }
    let verdict = verdict.trim_start_matches("qemu.sh: ");
    let failing = failing_ktap_results(&serial);
    let mut msg = String::new();
    let first = if failing.is_empty() {
        format!(
            "{} [{}]: {verdict} (no `not ok` KTAP result)",
            cell.name,
            cell.describe()
        )
    } else {
        format!(
            "{} [{}]: {}",
            cell.name,
            cell.describe(),
            failing.join("; ")
        )
    };
    annotate(cell, &first);
    let _ = writeln!(msg, "{first}");
    let _ = writeln!(msg, "  failing KTAP results: {}", failing.len());
    for line in &failing {
        let _ = writeln!(msg, "    {line}");
    }
    let _ = writeln!(msg, "  qemu.sh verdict: {verdict}");
    let _ = writeln!(msg, "  rerun this cell: {}", rerun(cell));
    let _ = writeln!(msg, "  qemu.sh command: {shown}");
    let status = out
        .status
        .code()
        .map_or("none (killed)".into(), |c| c.to_string());
    let _ = writeln!(msg, "  qemu.sh exit status: {status}");
    let _ = writeln!(msg, "  full serial log: {}", log.display());
    let _ = writeln!(msg, "--- qemu.sh ---\n{}", ours.join("\n"));
    if !theirs.is_empty() {
        let _ = writeln!(
            msg,
            "--- QEMU stderr ---\n{}",
            tail(&theirs.join("\n"), TAIL_LINES)
        );
    }
    let _ = write!(
        msg,
        "--- last {TAIL_LINES} lines of serial output ---\n{}",
        tail(&serial, TAIL_LINES)
    );
    panic!("{msg}");
}

#[test]
fn aarch64_max_smp1() {
    run_cell(&Cell::new("aarch64_max_smp1", "max", 1).bootargs("flips=2000 expect_nmi=feat_nmi"));
}

#[test]
fn aarch64_max_smp2() {
    run_cell(
        &Cell::new("aarch64_max_smp2", "max", 2)
            .bootargs("flips=2000 expect_nmi=feat_nmi expect_features=lse,idc,dic,nmi"),
    );
}

/// Two vCPUs truly in parallel (multi-threaded TCG, one host core each), for the
/// rendezvous and the torture test under real concurrency. Everything but `nosync`:
/// multi-threaded TCG does not keep cross-modified code coherent (a vCPU translating
/// the page while another writes it can publish a stale translation that the writer
/// then runs, after its own DC CVAU/IC IVAU/DSB/ISB); `nosync` catches that, and it
/// passes 6 of 6 runs when the other vCPU does not execute the patched page. The kprobe
/// tests run here too: they patch only through `patch_machine`, with the other vCPU in
/// the rendezvous; so do the hotplug tests that need no third CPU (PSCI CPU_OFF and
/// CPU_ON of a truly parallel vCPU), and three fault tests (`fault_concurrent_patchers`
/// has calls that overlap there without its gating).
#[test]
fn aarch64_max_smp2_mttcg() {
    run_cell(
        &Cell::new("aarch64_max_smp2_mttcg", "max", 2)
            .accel("tcg,thread=multi")
            .bootargs(
                "tests=cpus_online,stop_machine_active_cpus,stop_machine_errors,\
                 stop_machine_timeout,patch_quiescence,patch_masking,bad_batches,torture,\
                 kprobe_refusals,kprobe_simulate,kprobe_contexts,kprobe_registry,kprobe_hammer,\
                 hotplug_refusals,hotplug_cycle,hotplug_patch_offline,\
                 fault_stop_fn_errors,fault_stop_fn_faults,fault_concurrent_patchers flips=2000",
            ),
    );
}

/// The same configuration and full torture run as a plain `./qemu.sh`.
#[test]
fn aarch64_max_smp4() {
    run_cell(
        &Cell::new("aarch64_max_smp4", "max", 4)
            .bootargs("")
            .timeout_s(300),
    );
}

/// Also the full static-key run (10,000 flips) and the full kprobe run (10,000 arm/disarm
/// cycles), under callers on 7 CPUs.
#[test]
fn aarch64_max_smp8() {
    run_cell(
        &Cell::new("aarch64_max_smp8", "max", 8)
            .bootargs(
                "flips=2000 static_key_flips=10000 kprobe_cycles=10000 hotplug_cycles=200 \
                 expect_nmi=feat_nmi",
            )
            .timeout_s(400),
    );
}

/// The rendezvous, patching and torture tests and the platform's checks at scale (a
/// macro, so that `concat!` can add each cell's reduced flip count).
macro_rules! scale_tests {
    () => {
        "tests=platform,cpus_online,stop_machine_active_cpus,stop_machine_errors,\
         stop_machine_timeout,patch_quiescence,patch_masking,bad_batches,torture"
    };
}

/// 64 CPUs in four Aff1 clusters of 16: SGIs by IRM and by one write per cluster, the
/// rendezvous, patching and torture tests.
#[test]
fn aarch64_max_smp64() {
    run_cell(
        &Cell::new("aarch64_max_smp64", "max", 64)
            .bootargs(concat!(scale_tests!(), " flips=200"))
            .timeout_s(300),
    );
}

/// QEMU `virt`'s maximum: 512 CPUs, 32 Aff1 clusters, the second redistributor region
/// (frames 123 and up), every secondary started at once.
#[test]
fn aarch64_max_smp512() {
    run_cell(
        &Cell::new("aarch64_max_smp512", "max", 512)
            .bootargs(concat!(scale_tests!(), " flips=20"))
            .timeout_s(900),
    );
}

/// Starts at EL2; PSCI goes through SMC. The platform's checks run too: `entry_el`
/// asserts the EL2 entry the cell asks for.
#[test]
fn aarch64_max_smp4_el2() {
    run_cell(
        &Cell::new("aarch64_max_smp4_el2", "max", 4)
            .machine_opts("virtualization=on")
            .bootargs(EL2_BOOTARGS),
    );
}

/// Isolated CPUs running user code (issue 13): CPUs 1 and 2 run the EL0 loop while the
/// boot CPU patches; they take no patching interrupt, run the new code after their next
/// entry, and a high-rate torture sees no stale code. CPU 3 stays in the kernel.
#[test]
fn aarch64_max_smp4_isolcpus() {
    run_cell(&Cell::new("aarch64_max_smp4_isolcpus", "max", 4).bootargs(
        "isolcpus=1-2 tests=user_faults,isolation_quiet,isolation_torture,torture,static_keys \
         isolation_rounds=500 user_spins=1 flips=500",
    ));
}

/// The same on a v8.0 CPU without PAN (cortex-a72), `nohz_full=` spelling.
#[test]
fn aarch64_cortex_a72_smp4_nohz_full() {
    run_cell(
        &Cell::new("aarch64_cortex_a72_smp4_nohz_full", "cortex-a72", 4)
            .bootargs("nohz_full=2-3 tests=user_faults,isolation_quiet,isolation_torture"),
    );
}

/// The EL2 cells' command line: the kernel's tests and the platform's, with the entry
/// exception level `entry_el` must see.
const EL2_BOOTARGS: &str = "tests=all,platform platform_entry_el=2 flips=2000 expect_nmi=feat_nmi";

/// GICv4 (TCG accepts it only with `virtualization=on`).
#[test]
fn aarch64_max_smp4_el2_gicv4() {
    run_cell(
        &Cell::new("aarch64_max_smp4_el2_gicv4", "max", 4)
            .machine_opts("virtualization=on,gic-version=4")
            .bootargs(EL2_BOOTARGS),
    );
}

/// No `CTR_EL0.{IDC,DIC}`: the full `DC CVAU` / `IC IVAU` path; 62.5 MHz timer.
#[test]
fn aarch64_cortex_a72_smp4() {
    run_cell(
        &Cell::new("aarch64_cortex_a72_smp4", "cortex-a72", 4)
            .bootargs("flips=2000 expect_nmi=pseudo_nmi"),
    );
}

#[test]
fn aarch64_cortex_a57_smp2() {
    run_cell(
        &Cell::new("aarch64_cortex_a57_smp2", "cortex-a57", 2)
            .bootargs("flips=2000 expect_nmi=pseudo_nmi expect_features=none"),
    );
}

#[test]
fn aarch64_cortex_a53_smp2() {
    run_cell(
        &Cell::new("aarch64_cortex_a53_smp2", "cortex-a53", 2)
            .bootargs("flips=2000 expect_nmi=pseudo_nmi"),
    );
}

/// IRQs off = DAIF.I and no NMIs at all: the NMI tests must say so (skip) or show the
/// other world (a CPU with IRQs off is not reachable and is named); the platform's
/// checks too (its NMI checks skip, `no_nmis_with_pseudo_nmi_off` runs).
#[test]
fn aarch64_max_smp4_pseudo_nmi_off() {
    run_cell(
        &Cell::new("aarch64_max_smp4_pseudo_nmi_off", "max", 4)
            .bootargs("tests=all,platform pseudo_nmi=off flips=2000 expect_nmi=none"),
    );
}

/// No FEAT_NMI on this CPU: NMIs are GICv3 pseudo-NMIs (PMR masking).
#[test]
fn aarch64_cortex_a72_smp4_pseudo_nmi_off() {
    run_cell(
        &Cell::new("aarch64_cortex_a72_smp4_pseudo_nmi_off", "cortex-a72", 4)
            .bootargs("pseudo_nmi=off flips=2000 expect_nmi=none"),
    );
}

/// The platform's own checks (entry EL, page permissions, stack guards, SGIs, BRK hook,
/// alias poke, I-cache maintenance, NMIs), KTAP suite `platform`, before the kernel's
/// tests.
#[test]
fn aarch64_platform_selftest() {
    run_cell(
        &Cell::new("aarch64_platform_selftest", "cortex-a72", 2)
            .bootargs("tests=all,platform platform_entry_el=1 flips=200"),
    );
}

/// Kernel text is never writable: a store through its own mapping is a permission
/// fault, reported with ESR, ELR, FAR and the CPU, and the run fails; the KTAP header,
/// plan and test name come first, so qemu.sh reads the fault as that test crashing.
#[test]
fn aarch64_text_write_faults() {
    run_cell_expecting_failure(
        &Cell::new("aarch64_text_write_faults", "max", 2).bootargs("platform_selftest=text_write"),
        &[
            FAULT_KTAP,
            "UNEXPECTED EXCEPTION",
            "ESR",
            "ELR",
            "FAR",
            "cpu",
            FAULT_VERDICT,
        ],
    );
}

/// What a provoked `platform_selftest=text_write` prints before it faults, and the
/// crash qemu.sh then reports.
const FAULT_KTAP: &str = "KTAP version 1\n1..1\n";
const FAULT_VERDICT: &str = "FAIL (kernel crashed in platform_selftest=text_write: ";

/// A CPU that never comes online makes `cpus_online` fail, naming the count.
#[test]
fn aarch64_missing_cpu_is_reported() {
    run_cell_expecting_failure(
        &Cell::new("aarch64_missing_cpu_is_reported", "max", 4)
            .bootargs("platform_offline_cpu=3 tests=cpus_online"),
        &["not ok 1 cpus_online", "but the DTB lists 4"],
    );
}

/// The benchmarks run to completion (figures are printed, never asserted).
#[test]
fn aarch64_bench_smp2() {
    run_cell(&Cell::new("aarch64_bench_smp2", "max", 2).bootargs("tests=bench"));
}

/// x86_64 (q35, PVH boot) through the same stop-machine core.
#[test]
fn x86_64_max_smp1() {
    run_cell(
        &Cell::new("x86_64_max_smp1", "max", 1)
            .on_x86_64()
            .bootargs("expect_nmi=x2apic"),
    );
}

#[test]
fn x86_64_max_smp2() {
    run_cell(
        &Cell::new("x86_64_max_smp2", "max", 2)
            .on_x86_64()
            .bootargs("expect_nmi=x2apic expect_features=rdpid"),
    );
}

/// Also the full static-key run: 10,000 flips, each one INT3 round of three syncs.
#[test]
fn x86_64_max_smp4() {
    run_cell(
        &Cell::new("x86_64_max_smp4", "max", 4)
            .on_x86_64()
            .bootargs("static_key_flips=10000 expect_nmi=x2apic"),
    );
}

/// Ring 3 on isolated CPUs 1-2 (issue 13, x86): they run the user loop (`INT 0x80`)
/// while the boot CPU patches; they take no patching interrupt (stop IPIs and INT3
/// syncs deferred), run the new code after their next entry, and a high-rate torture
/// sees no stale code. CPU 3 stays in the kernel. SMEP/SMAP on (`-cpu max`).
#[test]
fn x86_64_max_smp4_isolcpus() {
    run_cell(
        &Cell::new("x86_64_max_smp4_isolcpus", "max", 4)
            .on_x86_64()
            .bootargs(
                "isolcpus=1-2 tests=user_faults,isolation_quiet,isolation_torture,torture,static_keys \
                 isolation_rounds=500 user_spins=1 flips=500",
            ),
    );
}

#[test]
fn x86_64_max_smp8() {
    run_cell(
        &Cell::new("x86_64_max_smp8", "max", 8)
            .on_x86_64()
            .bootargs("hotplug_cycles=200 kprobe_cycles=10000 expect_nmi=x2apic"),
    );
}

/// Without x2APIC: the xAPIC MMIO path.
#[test]
fn x86_64_qemu64_smp4() {
    run_cell(
        &Cell::new("x86_64_qemu64_smp4", "qemu64", 4)
            .on_x86_64()
            .bootargs("expect_nmi=xapic expect_features=none"),
    );
}

/// 64 CPUs: every kernel and platform test (the rendezvous, patching, torture, live
/// patching, NMIs, the IPI destination forms over four x2APIC clusters) with flip
/// counts cut to a tenth or less. About 30 s here.
#[test]
fn x86_64_max_smp64() {
    run_cell(
        &Cell::new("x86_64_max_smp64", "max", 64)
            .on_x86_64()
            .bootargs(
                "tests=all,platform flips=200 nosync_flips=200 static_key_flips=100 expect_nmi=x2apic",
            )
            .timeout_s(600),
    );
}

/// 288 CPUs: x2APIC IDs above 255 (MADT type 9 entries), 18 clusters, parallel
/// INIT-SIPI-SIPI, then every test as at 64 CPUs with fewer flips: with 200,
/// `nmi_safe_patching` alone took 196 s of a 240 s run here (each flip's NMI storm
/// round-robins 288 vCPUs on one host thread).
#[test]
fn x86_64_max_smp288() {
    run_cell(
        &Cell::new("x86_64_max_smp288", "max", 288)
            .on_x86_64()
            .bootargs(
                "tests=all,platform flips=40 nosync_flips=100 static_key_flips=50 expect_nmi=x2apic",
            )
            .timeout_s(900),
    );
}

/// A CPU that never gets its SIPI is waited for (bounded), named, and makes
/// `cpus_online` fail naming the count; the others still come up in parallel, and
/// IPIs still reach exactly them (`test_ipi`, `ipi_forms`, `nmi_ipi` pass: with a CPU
/// left in xAPIC mode the IPIs must not use x2APIC clusters, which QEMU then
/// misdelivers to CPUs past it, here 8-19).
#[test]
fn x86_64_missing_cpu_is_reported() {
    run_cell_expecting_failure(
        &Cell::new("x86_64_missing_cpu_is_reported", "max", 20)
            .on_x86_64()
            .bootargs(
                "platform_offline_cpu=5 tests=platform.test_ipi,platform.ipi_forms,cpus_online,nmi_ipi",
            ),
        &[
            "smp: cpu 5 (APIC ID 5) did not come online within",
            "smp: 19 of 20 CPUs online",
            "\nok 1 platform\n",
            "not ok 2 cpus_online # online CPUs {0-4,6-19}, but the MADT lists 20",
            "\nok 3 nmi_ipi",
        ],
    );
}

/// The x86_64 platform's own checks (APIC test vectors, text alias, NMI-held timeout,
/// nested NMIs), KTAP suite `platform`.
#[test]
fn x86_64_platform_selftest() {
    run_cell(
        &Cell::new("x86_64_platform_selftest", "max", 4)
            .on_x86_64()
            .bootargs("tests=platform"),
    );
}

/// A write to kernel text through its own mapping faults (#PF, write to a present
/// read-only page) and is reported.
#[test]
fn x86_64_text_write_faults() {
    run_cell_expecting_failure(
        &Cell::new("x86_64_text_write_faults", "max", 2)
            .on_x86_64()
            .bootargs("platform_selftest=text_write"),
        &[
            FAULT_KTAP,
            "UNEXPECTED EXCEPTION",
            "#PF",
            "error code 0x3",
            "RIP",
            "CR2",
            FAULT_VERDICT,
        ],
    );
}

/// A bad kernel argument is one failing KTAP result named after the word, with the
/// range a number must be in (a number past `u64` included).
#[test]
fn aarch64_bad_bootarg_is_named() {
    run_cell_expecting_failure(
        &Cell::new("aarch64_bad_bootarg_is_named", "max", 2)
            .bootargs("tests=torture flips=99999999999999999999"),
        &[
            "KTAP version 1\n1..1\n",
            "not ok 1 flips=99999999999999999999 # 'flips=99999999999999999999': out of range (min 1, max 10000000)",
            "FAIL (1 of 1 test(s) failed: not ok 1 flips=99999999999999999999",
        ],
    );
}

/// 64 words of 17 bytes and their spaces: 1151 bytes, over both kernels' copies of the
/// command line (aarch64 1024 bytes, x86_64 512). Cut, it would run `cpus_online` and pass.
const LONG_BOOTARGS: &str = concat!(
    "tests=cpus_online platform_pad=0002 platform_pad=0003 platform_pad=0004 ",
    "platform_pad=0005 platform_pad=0006 platform_pad=0007 platform_pad=0008 ",
    "platform_pad=0009 platform_pad=0010 platform_pad=0011 platform_pad=0012 ",
    "platform_pad=0013 platform_pad=0014 platform_pad=0015 platform_pad=0016 ",
    "platform_pad=0017 platform_pad=0018 platform_pad=0019 platform_pad=0020 ",
    "platform_pad=0021 platform_pad=0022 platform_pad=0023 platform_pad=0024 ",
    "platform_pad=0025 platform_pad=0026 platform_pad=0027 platform_pad=0028 ",
    "platform_pad=0029 platform_pad=0030 platform_pad=0031 platform_pad=0032 ",
    "platform_pad=0033 platform_pad=0034 platform_pad=0035 platform_pad=0036 ",
    "platform_pad=0037 platform_pad=0038 platform_pad=0039 platform_pad=0040 ",
    "platform_pad=0041 platform_pad=0042 platform_pad=0043 platform_pad=0044 ",
    "platform_pad=0045 platform_pad=0046 platform_pad=0047 platform_pad=0048 ",
    "platform_pad=0049 platform_pad=0050 platform_pad=0051 platform_pad=0052 ",
    "platform_pad=0053 platform_pad=0054 platform_pad=0055 platform_pad=0056 ",
    "platform_pad=0057 platform_pad=0058 platform_pad=0059 platform_pad=0060 ",
    "platform_pad=0061 platform_pad=0062 platform_pad=0063 platform_pad=0064"
);

/// A command line longer than the kernel keeps is refused whole, never cut.
#[test]
fn aarch64_long_bootargs_are_refused() {
    run_cell_expecting_failure(
        &Cell::new("aarch64_long_bootargs_are_refused", "max", 1).bootargs(LONG_BOOTARGS),
        &[
            "not ok 1 bootargs # the command line is 1151 bytes, out of range (max 1024): refused rather than cut",
            "FAIL (1 of 1 test(s) failed: not ok 1 bootargs",
        ],
    );
}

#[test]
fn x86_64_long_bootargs_are_refused() {
    run_cell_expecting_failure(
        &Cell::new("x86_64_long_bootargs_are_refused", "max", 1)
            .on_x86_64()
            .bootargs(LONG_BOOTARGS),
        &[
            "not ok 1 bootargs # the command line is 1151 bytes, out of range (max 512): refused rather than cut",
            "FAIL (1 of 1 test(s) failed: not ok 1 bootargs",
        ],
    );
}
