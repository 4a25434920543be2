//! The table's single allocation: an anonymous mapping of zeroed slots,
//! asked for transparent huge pages and faulted in at creation, so that no
//! later lookup or insert ever takes a page fault or a TLB walk per 4 KiB.
//!
//! Under `--cfg loom` it is a plain boxed slice (loom's atomics cannot live in
//! zeroed memory); the protocol under test is the same.

use crate::table::Slot;
use std::ops::Deref;

#[cfg(not(loom))]
pub(crate) struct SlotArray {
    ptr: std::ptr::NonNull<Slot>,
    len: usize,
    bytes: usize,
}

// SAFETY: SlotArray owns its mapping exclusively; `Slot` holds only atomics,
// which are safe to share between threads.
#[cfg(not(loom))]
unsafe impl Send for SlotArray {}
// SAFETY: as above; shared access goes through `&[Slot]` and atomics.
#[cfg(not(loom))]
unsafe impl Sync for SlotArray {}

#[cfg(not(loom))]
impl SlotArray {
    /// Maps `len` zeroed slots.
    ///
    /// # Errors
    /// The `mmap` error when the memory cannot be had (e.g. too large for the
    /// machine's overcommit policy).
    pub(crate) fn new(len: usize) -> std::io::Result<SlotArray> {
        let bytes = len
            .checked_mul(std::mem::size_of::<Slot>())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "table size overflows"))?;
        // SAFETY: an anonymous private mapping with no address hint touches no
        // existing memory; the result is checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is the start of the `bytes`-long mapping made above.
        // Both calls are advice; failure (e.g. THP disabled, kernel < 5.14)
        // only costs speed, so their results are ignored on purpose.
        unsafe {
            libc::madvise(raw, bytes, libc::MADV_HUGEPAGE);
            if libc::madvise(raw, bytes, libc::MADV_POPULATE_WRITE) != 0 {
                // Older kernels: fault the pages in by hand, one write per page.
                let base = raw.cast::<u8>();
                let mut off = 0;
                while off < bytes {
                    base.add(off).write_volatile(0);
                    off += 4096;
                }
            }
        }
        let ptr = std::ptr::NonNull::new(raw.cast::<Slot>()).expect("mmap never returns null on success");
        Ok(SlotArray { ptr, len, bytes })
    }

    /// Bytes mapped for the slots.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(not(loom))]
impl Deref for SlotArray {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        // SAFETY: the mapping holds `len` slots, is zero-filled by the kernel,
        // and an all-zero `Slot` is valid (it is made of integers in atomics).
        // The mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(not(loom))]
impl Drop for SlotArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into
        // it outlives `self` (slices borrow from `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}

#[cfg(loom)]
pub(crate) struct SlotArray(Box<[Slot]>);

#[cfg(loom)]
impl SlotArray {
    pub(crate) fn new(len: usize) -> std::io::Result<SlotArray> {
        Ok(SlotArray((0..len).map(|_| Slot::default()).collect()))
    }
    pub(crate) fn bytes(&self) -> usize {
        self.0.len() * std::mem::size_of::<Slot>()
    }
}

#[cfg(loom)]
impl Deref for SlotArray {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        &self.0
    }
}
