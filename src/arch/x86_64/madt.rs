//! APIC IDs from the ACPI MADT.
//!
//! Parsed by hand rather than with the `acpi` crate: with everything identity-mapped
//! the tables are plain memory, and the crate's handler/mapping machinery would be more
//! code than the three structures read here (RSDP -> XSDT/RSDT -> MADT entries of
//! type 0, Processor Local APIC, and 9, Processor Local x2APIC).
//!
//! The rules are Linux's (`acpi_parse_lapic`, `acpi_parse_x2apic` in
//! arch/x86/kernel/acpi/boot.c) and the ACPI spec's (6.5, 5.2.12.2 and 5.2.12.12):
//! a CPU is present when its entry's Enabled flag is set; one that is only Online
//! Capable may be hot-added later and is counted, not started (no CPU hotplug here);
//! APIC ID 0xff (type 0) and 0xffff_ffff (type 9) are no CPU; when the table has
//! type 0 CPUs, a type 9 entry describes only IDs of 0xff and above (a lower one
//! repeats a type 0 CPU and is skipped); the same ID listed twice is one CPU.

use crate::MAX_CPUS;

/// Processor Local APIC.
const TYPE_LOCAL_APIC: u8 = 0;
/// Processor Local x2APIC.
const TYPE_LOCAL_X2APIC: u8 = 9;
/// Local APIC flags: the CPU is usable now.
const FLAG_ENABLED: u32 = 1 << 0;
/// Local APIC flags (ACPI 6.3+): not enabled now, but may be enabled at run time.
const FLAG_ONLINE_CAPABLE: u32 = 1 << 1;
/// Where the interrupt controller structures start in the MADT.
const MADT_ENTRIES: usize = 44;
/// The highest APIC ID the xAPIC can address (0xff is its broadcast).
pub const XAPIC_MAX_ID: u32 = 0xfe;

/// The enabled CPUs' APIC IDs, in MADT order (the boot CPU need not be first).
pub struct Cpus {
    /// APIC IDs.
    pub apic_ids: [u32; MAX_CPUS],
    /// How many.
    pub count: usize,
    /// Enabled CPUs the MADT lists beyond [`MAX_CPUS`].
    pub dropped: usize,
    /// CPUs listed Online Capable but not Enabled (hot-pluggable, never started here).
    pub online_capable: usize,
    /// Entries repeating an APIC ID already listed (counted once).
    pub duplicates: usize,
    /// The highest APIC ID of an enabled CPU (above [`XAPIC_MAX_ID`] needs x2APIC).
    pub max_apic_id: u32,
}

impl Cpus {
    /// Enabled CPUs the MADT lists, those beyond [`MAX_CPUS`] included.
    pub fn listed(&self) -> usize {
        self.count + self.dropped
    }
}

fn read<T: Copy>(pa: usize) -> T {
    // SAFETY: callers pass addresses inside ACPI tables, which are identity-mapped and
    // readable; unaligned reads because ACPI structures are packed.
    unsafe { core::ptr::read_unaligned(pa as *const T) }
}

fn checksum_ok(pa: usize, len: usize) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read::<u8>(pa + i))) == 0
}

/// Finds the MADT through the RSDP at `rsdp` and lists the enabled CPUs.
pub fn parse(rsdp: usize) -> Result<Cpus, &'static str> {
    if rsdp == 0 || read::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return Err("no RSDP");
    }
    if !checksum_ok(rsdp, 20) {
        return Err("bad RSDP checksum");
    }
    let revision: u8 = read(rsdp + 15);
    let (root, entry_size) = if revision >= 2 && read::<u64>(rsdp + 24) != 0 {
        (read::<u64>(rsdp + 24) as usize, 8)
    } else {
        (read::<u32>(rsdp + 16) as usize, 4)
    };
    let root_len = read::<u32>(root + 4) as usize;
    if !checksum_ok(root, root_len) {
        return Err("bad RSDT/XSDT checksum");
    }
    let entries = (root_len.saturating_sub(36)) / entry_size;
    let madt = (0..entries)
        .map(|i| {
            let at = root + 36 + i * entry_size;
            if entry_size == 8 {
                read::<u64>(at) as usize
            } else {
                read::<u32>(at) as usize
            }
        })
        .find(|&t| read::<[u8; 4]>(t) == *b"APIC")
        .ok_or("no MADT")?;
    let len = read::<u32>(madt + 4) as usize;
    if len < MADT_ENTRIES {
        return Err("MADT shorter than its header");
    }
    if !checksum_ok(madt, len) {
        return Err("bad MADT checksum");
    }
    // SAFETY: the MADT is `len` bytes of identity-mapped, readable ACPI memory (its
    // checksum over those bytes just matched), which nothing writes.
    let table = unsafe { core::slice::from_raw_parts(madt as *const u8, len) };
    parse_entries(&table[MADT_ENTRIES..])
}

/// One CPU entry (`entry`, at least 2 bytes, starts with its type and length): APIC ID, flags, and
/// whether it is type 9. `None` for other types.
fn cpu_entry(entry: &[u8]) -> Result<Option<(u32, u32, bool)>, &'static str> {
    let u32_at = |at: usize| {
        entry
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    Ok(match entry[0] {
        TYPE_LOCAL_APIC => {
            let flags = u32_at(4).ok_or("MADT local APIC entry shorter than 8 bytes")?;
            Some((u32::from(entry[3]), flags, false))
        }
        TYPE_LOCAL_X2APIC => {
            let id = u32_at(4).ok_or("MADT local x2APIC entry shorter than 16 bytes")?;
            let flags = u32_at(8).ok_or("MADT local x2APIC entry shorter than 16 bytes")?;
            u32_at(12).ok_or("MADT local x2APIC entry shorter than 16 bytes")?;
            Some((id, flags, true))
        }
        _ => None,
    })
}

/// The MADT's entries, each whole (type and length bytes included), or the error that
/// ends the walk: a header or an entry running past the table, a length below 2.
fn entries_of(entries: &[u8]) -> impl Iterator<Item = Result<&[u8], &'static str>> {
    let mut at = 0;
    core::iter::from_fn(move || {
        if at >= entries.len() {
            return None;
        }
        let Some(&elen) = entries.get(at + 1) else {
            at = entries.len();
            return Some(Err("MADT entry header runs past the table"));
        };
        let elen = usize::from(elen);
        let entry = if elen < 2 {
            Err("MADT entry of length < 2")
        } else {
            entries
                .get(at..at + elen)
                .ok_or("MADT entry runs past the table")
        };
        at = if entry.is_ok() {
            at + elen
        } else {
            entries.len()
        };
        Some(entry)
    })
}

/// Lists the enabled CPUs of the MADT's interrupt controller structures `entries`
/// (the bytes after its 44-byte header). Types other than 0 and 9 are skipped; an
/// entry that runs past the end or is too short for its type is an error.
pub fn parse_entries(entries: &[u8]) -> Result<Cpus, &'static str> {
    let mut cpus = Cpus {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        dropped: 0,
        online_capable: 0,
        duplicates: 0,
        max_apic_id: 0,
    };
    // Linux's `has_lapic_cpus`: does the table describe enabled CPUs with type 0
    // entries? Decided first, then every entry is read in table order.
    let mut has_lapic_cpus = false;
    for entry in entries_of(entries) {
        let entry = entry?;
        if let Some((id, flags, false)) = cpu_entry(entry)? {
            has_lapic_cpus |= id != 0xff && flags & FLAG_ENABLED != 0;
        }
    }
    for entry in entries_of(entries) {
        let entry = entry?;
        let Some((id, flags, x2)) = cpu_entry(entry)? else {
            continue;
        };
        if (!x2 && id == 0xff) || (x2 && id == u32::MAX) || (x2 && has_lapic_cpus && id < 0xff) {
            continue;
        }
        if flags & FLAG_ENABLED == 0 {
            if flags & FLAG_ONLINE_CAPABLE != 0 {
                cpus.online_capable += 1;
            }
            continue;
        }
        if cpus.apic_ids[..cpus.count].contains(&id) {
            cpus.duplicates += 1;
            continue;
        }
        cpus.max_apic_id = cpus.max_apic_id.max(id);
        if cpus.count < MAX_CPUS {
            cpus.apic_ids[cpus.count] = id;
            cpus.count += 1;
        } else {
            cpus.dropped += 1;
        }
    }
    if cpus.count == 0 {
        return Err("MADT lists no enabled CPU");
    }
    Ok(cpus)
}
