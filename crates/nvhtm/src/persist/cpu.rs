//! The `Cpu` domain: cache-line write-back instructions and `sfence`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{cas_plain, copy_plain, counters, lines, store_plain, Domain, DomainKind, PersistError};

/// Copies at least this long use non-temporal stores (they bypass the cache, so no flush is
/// needed and no line is read for ownership); shorter ones use ordinary stores plus a flush.
pub(crate) const NT_THRESHOLD: usize = 256;

/// The write-back instruction a [`Cpu`] domain uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushInstr {
    /// Writes the line back and keeps it cached; weakly ordered until `sfence`.
    Clwb,
    /// Writes the line back and evicts it; weakly ordered until `sfence`.
    Clflushopt,
    /// Writes the line back and evicts it; ordered with other stores and flushes (slow).
    Clflush,
}

impl FlushInstr {
    /// The best instruction this CPU supports, by CPUID: `clwb`, else `clflushopt`, else
    /// `clflush` (every x86-64 CPU has it).
    pub fn detect() -> FlushInstr {
        Self::supported().into_iter().next().unwrap_or(FlushInstr::Clflush)
    }

    /// Every instruction this CPU supports, best first.
    pub fn supported() -> Vec<FlushInstr> {
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID leaf 7 sub-leaf 0, EBX: bit 24 CLWB, bit 23 CLFLUSHOPT. Leaf 1 EDX bit 19:
            // CLFLUSH. `__cpuid_count` is safe to call on every x86-64 CPU.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let leaf1 = std::arch::x86_64::__cpuid(1);
            if leaf7.ebx & (1 << 24) != 0 {
                found.push(FlushInstr::Clwb);
            }
            if leaf7.ebx & (1 << 23) != 0 {
                found.push(FlushInstr::Clflushopt);
            }
            if leaf1.edx & (1 << 19) != 0 {
                found.push(FlushInstr::Clflush);
            }
        }
        found
    }
}

/// Durability by cache-line write-back (`clwb`/`clflushopt`/`clflush`) and `sfence`.
///
/// Correct on a DAX mapping of persistent memory (where the CPU caches are the only volatile
/// part) and on `/dev/shm`, which emulates it (survives process crashes, not power loss).
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    instr: FlushInstr,
}

impl Cpu {
    /// A domain using the best write-back instruction of this CPU.
    pub fn detect() -> Cpu {
        Cpu { instr: FlushInstr::detect() }
    }

    /// A domain using `instr`, or `None` when this CPU lacks it.
    pub fn with_instr(instr: FlushInstr) -> Option<Cpu> {
        FlushInstr::supported().contains(&instr).then_some(Cpu { instr })
    }

    /// The instruction in use.
    pub fn instr(&self) -> FlushInstr {
        self.instr
    }
}

impl Default for Cpu {
    fn default() -> Cpu {
        Cpu::detect()
    }
}

#[cfg(target_arch = "x86_64")]
mod isa {
    use std::arch::asm;

    /// # Safety
    /// `line` lies inside a live mapping.
    #[inline(always)]
    pub unsafe fn clwb(line: usize) {
        // SAFETY: the caller guarantees the address is mapped; clwb has no other effect than
        // writing the line back. The CPU supports it (checked when the domain was built).
        unsafe { asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags)) };
    }

    /// # Safety
    /// `line` lies inside a live mapping.
    #[inline(always)]
    pub unsafe fn clflushopt(line: usize) {
        // SAFETY: as for clwb.
        unsafe { asm!("clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags)) };
    }

    /// # Safety
    /// `line` lies inside a live mapping.
    #[inline(always)]
    pub unsafe fn clflush(line: usize) {
        // SAFETY: as for clwb; clflush exists on every x86-64 CPU.
        unsafe { asm!("clflush [{0}]", in(reg) line, options(nostack, preserves_flags)) };
    }

    #[inline(always)]
    pub fn sfence() {
        // SAFETY: sfence only orders stores; it touches no memory and every x86-64 CPU has it.
        unsafe { asm!("sfence", options(nostack, preserves_flags)) };
    }

    /// Non-temporal store of one 8-byte word.
    ///
    /// # Safety
    /// `dst` is 8-byte aligned and valid for writes.
    #[inline(always)]
    pub unsafe fn movnti(dst: *mut u64, value: u64) {
        // SAFETY: the caller guarantees `dst` is aligned and writable.
        unsafe { asm!("movnti [{0}], {1}", in(reg) dst, in(reg) value, options(nostack, preserves_flags)) };
    }
}

impl Cpu {
    /// # Safety
    /// The range lies inside a live mapping.
    #[inline]
    unsafe fn write_back(&self, addr: *const u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        for line in lines(addr, len) {
            // SAFETY: every line of the range is mapped (caller's contract).
            unsafe {
                match self.instr {
                    FlushInstr::Clwb => isa::clwb(line),
                    FlushInstr::Clflushopt => isa::clflushopt(line),
                    FlushInstr::Clflush => isa::clflush(line),
                }
            }
        }
        counters::add_lines(super::line_count(addr, len));
    }
}

impl Domain for Cpu {
    fn kind(&self) -> DomainKind {
        DomainKind::Cpu
    }

    #[inline]
    unsafe fn write(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: forwarded caller contract.
        unsafe { copy_plain(dst, src) }
    }

    #[track_caller]
    unsafe fn write_persistent(&self, dst: *mut u8, src: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        if src.len() >= NT_THRESHOLD {
            // Head and tail that are not whole 8-byte words go through the cache and are
            // flushed; the aligned middle is streamed with movnti.
            let head = dst.align_offset(8).min(src.len());
            let body = (src.len() - head) & !7;
            // SAFETY: all three pieces lie inside dst..dst+len (caller's contract).
            unsafe {
                self.write(dst, &src[..head]);
                self.write_back(dst, head);
                let words = dst.add(head) as *mut u64;
                for (i, chunk) in src[head..head + body].chunks_exact(8).enumerate() {
                    let word = u64::from_ne_bytes(chunk.try_into().unwrap_or_default());
                    isa::movnti(words.add(i), word);
                }
                counters::add_bytes(body as u64);
                let tail = dst.add(head + body);
                self.write(tail, &src[head + body..]);
                self.write_back(tail, src.len() - head - body);
            }
            return;
        }
        // SAFETY: forwarded caller contract.
        unsafe {
            self.write(dst, src);
            self.write_back(dst, src.len());
        }
    }

    #[inline]
    unsafe fn store_u64(&self, dst: *const AtomicU64, value: u64, order: Ordering) {
        // SAFETY: forwarded caller contract.
        unsafe { store_plain(dst, value, order) }
    }

    #[inline]
    unsafe fn compare_exchange_u64(
        &self,
        dst: *const AtomicU64,
        current: u64,
        new: u64,
        order: Ordering,
    ) -> Result<u64, u64> {
        // SAFETY: forwarded caller contract.
        unsafe { cas_plain(dst, current, new, order) }
    }

    #[inline]
    #[track_caller]
    unsafe fn flush(&self, addr: *const u8, len: usize) {
        // SAFETY: forwarded caller contract.
        unsafe { self.write_back(addr, len) }
    }

    #[inline]
    #[track_caller]
    fn fence(&self) -> Result<(), PersistError> {
        #[cfg(target_arch = "x86_64")]
        isa::sfence();
        #[cfg(not(target_arch = "x86_64"))]
        std::sync::atomic::fence(Ordering::SeqCst);
        counters::add_fence();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_an_instruction_this_cpu_runs() {
        let cpu = Cpu::detect();
        assert!(FlushInstr::supported().contains(&cpu.instr()));
    }

    #[test]
    fn every_supported_instruction_flushes_and_counts() {
        let mut buf = vec![0u8; 4096];
        let data: Vec<u8> = (0..1000).map(|i| i as u8).collect();
        for instr in FlushInstr::supported() {
            let cpu = Cpu::with_instr(instr).expect("supported");
            let before = crate::persist::thread_stats();
            // SAFETY: `buf` is a live allocation of 4096 bytes; offsets stay inside.
            unsafe {
                cpu.write_persistent(buf.as_mut_ptr().add(3), &data);
                cpu.write(buf.as_mut_ptr().add(2000), &data[..10]);
                cpu.persist(buf.as_ptr().add(2000), 10).unwrap();
            }
            let used = crate::persist::thread_stats() - before;
            assert_eq!(&buf[3..1003], &data[..]);
            assert_eq!(&buf[2000..2010], &data[..10]);
            assert_eq!(used.fences, 1);
            assert_eq!(used.bytes_written, 1010);
            assert!(used.lines_flushed >= 1, "{used:?}");
        }
    }
}
