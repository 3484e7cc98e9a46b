//! APIC IDs from the ACPI MADT.
//!
//! Parsed by hand rather than with the `acpi` crate: with everything identity-mapped
//! the tables are plain memory, and the crate's handler/mapping machinery would be more
//! code than the three structures read here (RSDP -> XSDT/RSDT -> MADT entries of
//! type 0, local APIC, and 9, local x2APIC).

use crate::MAX_CPUS;

/// The enabled CPUs' APIC IDs, in MADT order (the boot CPU need not be first).
pub struct Cpus {
    /// APIC IDs.
    pub apic_ids: [u32; MAX_CPUS],
    /// How many.
    pub count: usize,
    /// Enabled CPUs the MADT lists beyond [`MAX_CPUS`].
    pub dropped: usize,
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
    if !checksum_ok(madt, len) {
        return Err("bad MADT checksum");
    }
    let mut cpus = Cpus {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        dropped: 0,
    };
    let mut at = madt + 44;
    while at + 2 <= madt + len {
        let kind: u8 = read(at);
        let elen = usize::from(read::<u8>(at + 1));
        if elen < 2 {
            return Err("MADT entry of length < 2");
        }
        let entry = match kind {
            0 => Some((u32::from(read::<u8>(at + 3)), read::<u32>(at + 4))),
            9 => Some((read::<u32>(at + 4), read::<u32>(at + 8))),
            _ => None,
        };
        if let Some((id, flags)) = entry
            && flags & 1 != 0
            && !cpus.apic_ids[..cpus.count].contains(&id)
        {
            if cpus.count < MAX_CPUS {
                cpus.apic_ids[cpus.count] = id;
                cpus.count += 1;
            } else {
                cpus.dropped += 1;
            }
        }
        at += elen;
    }
    if cpus.count == 0 {
        return Err("MADT lists no enabled CPU");
    }
    Ok(cpus)
}
