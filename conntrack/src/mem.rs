//! The table's allocations: anonymous mappings of zeroed elements (or, for
//! a table that outlives its process, shared mappings of a file), asked
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
        let bytes = Self::bytes_of(len)?;
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
        unsafe { Self::populate(raw, bytes) };
        let ptr = std::ptr::NonNull::new(raw.cast::<T>()).expect("mmap never returns null on success");
        Ok(ZeroedArray { ptr, len, bytes })
    }

    /// Maps `len` elements of the file `fd` from byte `offset` (a multiple
    /// of the page size), shared: writes go to the file, and a later
    /// process that maps the same range sees them. The range must exist
    /// (the caller sized the file); a range the file never had written is
    /// zeroes. Faulted in as [`ZeroedArray::new`] is.
    ///
    /// Elements are whatever the file holds: valid for any `T` of
    /// integers (`AllZeroValid`), though not necessarily zero.
    ///
    /// # Errors
    /// The `mmap` error.
    pub fn map_shared(fd: &impl std::os::fd::AsRawFd, offset: u64, len: usize) -> std::io::Result<ZeroedArray<T>> {
        let bytes = Self::bytes_of(len)?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset overflows"))?;
        // SAFETY: a shared mapping of the caller's open file with no address
        // hint touches no existing memory; the result is checked against
        // MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is the start of the `bytes`-long mapping made above.
        // Advice only, as in `new`; the file is sized, so the writes of the
        // fallback stay inside it.
        unsafe { Self::populate(raw, bytes) };
        let ptr = std::ptr::NonNull::new(raw.cast::<T>()).expect("mmap never returns null on success");
        Ok(ZeroedArray { ptr, len, bytes })
    }

    fn bytes_of(len: usize) -> std::io::Result<usize> {
        len.checked_mul(std::mem::size_of::<T>())
            .map(|b| b.max(1))
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "table size overflows"))
    }

    /// Asks for huge pages and faults the mapping in.
    ///
    /// # Safety
    /// `raw` is the start of a writable mapping of `bytes` bytes.
    unsafe fn populate(raw: *mut libc::c_void, bytes: usize) {
        // SAFETY: the caller's mapping. Both calls are advice; failure (e.g.
        // THP disabled, kernel < 5.14) only costs speed, so their results
        // are ignored on purpose.
        unsafe {
            libc::madvise(raw, bytes, libc::MADV_HUGEPAGE);
            if libc::madvise(raw, bytes, libc::MADV_POPULATE_WRITE) != 0 {
                // Older kernels: fault the pages in by hand, one read and
                // write back per page (a shared mapping keeps its contents).
                let base = raw.cast::<u8>();
                let mut off = 0;
                while off < bytes {
                    let p = base.add(off);
                    p.write_volatile(p.read_volatile());
                    off += 4096;
                }
            }
        }
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
