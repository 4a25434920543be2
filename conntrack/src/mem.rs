//! The table's allocations: anonymous mappings of zeroed elements, asked
//! for transparent huge pages and faulted in at creation, so that no later
//! lookup or insert ever takes a page fault or a TLB walk per 4 KiB.
//!
//! Under `--cfg loom` they are plain boxed slices (loom's atomics cannot live
//! in zeroed memory); the protocol under test is the same.
//!
//! Public so that benchmarks can lay out memory exactly as the table does.

use std::ops::Deref;

/// Types for which the all-zero bit pattern is a valid value.
///
/// # Safety
/// Implement only for types made of integers and atomics of integers.
pub unsafe trait AllZeroValid: Default {}

/// `len` zeroed elements in one anonymous mapping, read through `&[T]`.
#[cfg(not(loom))]
pub struct ZeroedArray<T: AllZeroValid> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    bytes: usize,
}

// SAFETY: the array owns its mapping exclusively; elements hold only
// integers and atomics, which are safe to share between threads.
#[cfg(not(loom))]
unsafe impl<T: AllZeroValid> Send for ZeroedArray<T> {}
// SAFETY: as above; shared access goes through `&[T]` and atomics.
#[cfg(not(loom))]
unsafe impl<T: AllZeroValid> Sync for ZeroedArray<T> {}

#[cfg(not(loom))]
impl<T: AllZeroValid> ZeroedArray<T> {
    /// Maps `len` zeroed elements.
    ///
    /// # Errors
    /// The `mmap` error when the memory cannot be had (e.g. too large for the
    /// machine's overcommit policy).
    pub fn new(len: usize) -> std::io::Result<ZeroedArray<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .map(|b| b.max(1))
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
        let ptr = std::ptr::NonNull::new(raw.cast::<T>()).expect("mmap never returns null on success");
        Ok(ZeroedArray { ptr, len, bytes })
    }

    /// Bytes mapped.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(not(loom))]
impl<T: AllZeroValid> Deref for ZeroedArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the mapping holds `len` elements, is zero-filled by the
        // kernel, and an all-zero `T` is valid (`AllZeroValid`).
        // The mapping lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(not(loom))]
impl<T: AllZeroValid> Drop for ZeroedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into
        // it outlives `self` (slices borrow from `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}

#[cfg(loom)]
pub struct ZeroedArray<T>(Box<[T]>);

#[cfg(loom)]
impl<T: AllZeroValid> ZeroedArray<T> {
    pub fn new(len: usize) -> std::io::Result<ZeroedArray<T>> {
        Ok(ZeroedArray((0..len).map(|_| T::default()).collect()))
    }
    pub fn bytes(&self) -> usize {
        self.0.len() * std::mem::size_of::<T>()
    }
}

#[cfg(loom)]
impl<T> Deref for ZeroedArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}
