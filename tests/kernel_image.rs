//! Properties of the built kernel image, checked without booting it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds the release kernel once and returns its path.
fn kernel_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--target",
                "aarch64-unknown-none",
                "--bin",
                "patch-machine",
            ])
            .output()
            .expect("running cargo build");
        assert!(
            output.status.success(),
            "kernel build failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target_dir.join("aarch64-unknown-none/release/patch-machine")
    })
}

struct Segment {
    kind: u32,
    flags: u32,
    vaddr: u64,
    memsz: u64,
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;

/// The program headers of a little-endian ELF64 file.
fn program_headers(elf: &[u8]) -> Vec<Segment> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(elf[5], 1, "not little-endian");
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    let phoff = u64_at(0x20) as usize;
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let at = phoff + i * phentsize;
            Segment {
                kind: u32_at(at),
                flags: u32_at(at + 4),
                vaddr: u64_at(at + 0x10),
                memsz: u64_at(at + 0x28),
            }
        })
        .collect()
}

#[test]
fn no_segment_is_both_writable_and_executable() {
    let elf = std::fs::read(kernel_image()).expect("reading the kernel image");
    let segments = program_headers(&elf);
    assert!(
        segments
            .iter()
            .any(|s| s.kind == PT_LOAD && s.flags & PF_X != 0)
    );
    for s in &segments {
        assert!(
            s.flags & (PF_W | PF_X) != (PF_W | PF_X),
            "segment at {:#x} (+{:#x}) is writable and executable (flags {:#x})",
            s.vaddr,
            s.memsz,
            s.flags
        );
    }
}

#[test]
fn kernel_is_linked_above_the_dtb_slot() {
    // QEMU places the DTB at the start of RAM only if it fits below the image.
    let elf = std::fs::read(kernel_image()).expect("reading the kernel image");
    let lowest = program_headers(&elf)
        .iter()
        .filter(|s| s.kind == PT_LOAD && s.memsz > 0)
        .map(|s| s.vaddr)
        .min()
        .unwrap();
    assert!(lowest >= 0x4020_0000, "image starts at {lowest:#x}");
}
