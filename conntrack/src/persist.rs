//! A flow table that outlives its process: its arrays in one file (on a
//! memory file system such as `/dev/shm`), mapped shared, so that a
//! restarted gateway, even after `kill -9`, finds every flow its
//! predecessor had, SNAT mappings included.
//!
//! Contract of [`FlowTable::open_file`](crate::FlowTable::open_file):
//! - The file starts with a header (magic, layout version, the sizes of the
//!   table's element types, capacity, slots, accounting, hash seed, the
//!   monotonic clock's reading at creation, the boot it was made in, a
//!   checksum). A header that is missing, corrupt, of another layout or
//!   capacity, or of an earlier boot is named in [`Resume::Replaced`] and
//!   the table starts empty in a file made anew; nothing of it is read.
//! - A matching file is resumed: before any worker sees the table, a
//!   repair pass drops what a process killed mid-write left (a slot half
//!   written, a flow with one direction) and recomputes the probe hints and
//!   the flow count, so no flow is ever half-read; [`Resume::Resumed`] says
//!   how many flows were kept and how many dropped.
//! - The file is held with an exclusive `flock` for the table's life (the
//!   kernel releases it when the process dies, however it dies): a second
//!   process waits for it up to [`LOCK_WAIT`], then gets
//!   [`TableError::Locked`](crate::TableError::Locked).
//! - Timestamps stay meaningful across processes: the table's clock
//!   ([`FlowTable::epoch`](crate::FlowTable::epoch)) is the monotonic clock
//!   since the file's creation.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// The file's magic bytes.
const MAGIC: [u8; 8] = *b"XSKGCT\0\0";
/// The layout of the slot arrays. Raise it with any change to `Slot`,
/// `Wide`, `Hint`, `Counters`, `Meta`, the state word or the hash: a file of
/// another version starts empty.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes of the header region; the arrays start at multiples of
/// [`ARRAY_ALIGN`] after it.
const HEADER_BYTES: usize = 256;
/// Alignment of each array in the file (a huge page, so that a file system
/// with huge pages can back them).
const ARRAY_ALIGN: u64 = 2 << 20;
/// How long [`FlowTable::open_file`](crate::FlowTable::open_file) waits for
/// the file's lock (a predecessor still stopping).
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// What opening a table file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// There was no file: a new, empty table.
    Created,
    /// The file's flows, resumed: `flows` kept, `dropped` (slots emptied,
    /// two to a flow: half-written by a process that died mid-write, or
    /// damaged) removed.
    Resumed { flows: usize, dropped: usize },
    /// The file could not be used (the reason, for the log): a new, empty
    /// table in its place.
    Replaced { reason: String },
}

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub layout: u32,
    /// Sizes of `Slot`, `Wide`, `Hint`, `Counters`.
    pub sizes: [u32; 4],
    pub capacity: u64,
    pub slots: u64,
    pub accounting: bool,
    pub seed: u64,
    /// `CLOCK_MONOTONIC` at creation, in nanoseconds.
    pub created_ns: u64,
    pub boot_id: [u8; 36],
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            b[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&MAGIC);
        put(&self.layout.to_le_bytes());
        for s in self.sizes {
            put(&s.to_le_bytes());
        }
        put(&self.capacity.to_le_bytes());
        put(&self.slots.to_le_bytes());
        put(&u32::from(self.accounting).to_le_bytes());
        put(&self.seed.to_le_bytes());
        put(&self.created_ns.to_le_bytes());
        put(&self.boot_id);
        let end = at;
        let sum = fnv1a(&b[..end]);
        b[end..end + 8].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The header in `b`, or why it is not one.
    fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, String> {
        let mut rest: &[u8] = b;
        let mut take = |n: usize| {
            let (s, r) = rest.split_at(n);
            rest = r;
            s
        };
        let u32_at = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
        let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
        if take(8) != MAGIC {
            return Err("not an xskgate conntrack file (bad magic)".into());
        }
        let layout = u32_at(take(4));
        let sizes = [u32_at(take(4)), u32_at(take(4)), u32_at(take(4)), u32_at(take(4))];
        let capacity = u64_at(take(8));
        let slots = u64_at(take(8));
        let accounting = u32_at(take(4)) != 0;
        let seed = u64_at(take(8));
        let created_ns = u64_at(take(8));
        let boot_id: [u8; 36] = take(36).try_into().expect("36 bytes");
        let sum = u64_at(take(8));
        let end = HEADER_BYTES - rest.len() - 8;
        if sum != fnv1a(&b[..end]) {
            return Err("header checksum mismatch (corrupt header)".into());
        }
        Ok(Header { layout, sizes, capacity, slots, accounting, seed, created_ns, boot_id })
    }

    /// Byte offsets of the four arrays and the file's length, for a table
    /// of `slots` slots.
    pub(crate) fn offsets(&self) -> ([u64; 4], u64) {
        let mut at = ARRAY_ALIGN;
        let mut offs = [0u64; 4];
        for (o, size) in offs.iter_mut().zip(self.sizes) {
            *o = at;
            at += (self.slots * u64::from(size)).next_multiple_of(ARRAY_ALIGN);
        }
        (offs, at)
    }
}

/// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`); zeroes
/// when it cannot be read.
fn boot_id() -> [u8; 36] {
    let mut id = [0u8; 36];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let s = s.trim().as_bytes();
        let n = s.len().min(36);
        id[..n].copy_from_slice(&s[..n]);
    }
    id
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock `Instant` reads).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// The `Instant` at which the monotonic clock read `created_ns` (now, if
/// that is in the future or before the clock's origin).
pub(crate) fn epoch_of(created_ns: u64) -> Instant {
    let now = Instant::now();
    now.checked_sub(Duration::from_nanos(monotonic_ns().saturating_sub(created_ns))).unwrap_or(now)
}

/// The opened, locked file and its header; `resume` is `Created` or
/// `Replaced` when the file was (re)made empty, else `Resumed` with zero
/// counts (the repair fills them in).
pub(crate) struct Opened {
    pub file: File,
    pub header: Header,
    pub resume: Resume,
}

/// Opens (or makes) the table file at `path` for `want`.
pub(crate) fn open(path: &Path, want: Header) -> std::io::Result<Opened> {
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    lock(&file, path)?;
    let len = file.metadata()?.len();
    let found = if len == 0 {
        Err(None)
    } else {
        let mut b = [0u8; HEADER_BYTES];
        file.seek(SeekFrom::Start(0))?;
        match file.read_exact(&mut b) {
            Ok(()) => Header::decode(&b).map_err(Some),
            Err(_) => Err(Some(format!("file of {len} bytes is shorter than a header"))),
        }
    };
    let found = found.and_then(|h| match mismatch(&h, &want, len) {
        None => Ok(h),
        Some(why) => Err(Some(why)),
    });
    match found {
        Ok(header) => Ok(Opened { file, header, resume: Resume::Resumed { flows: 0, dropped: 0 } }),
        Err(why) => {
            // Made anew: emptied, sized (sparse: unwritten pages read as
            // zero), and the header written last, so that a crash in
            // between leaves a file that is replaced again.
            file.set_len(0)?;
            let (_, total) = want.offsets();
            file.set_len(total)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&want.encode())?;
            file.sync_data()?;
            let resume = match why {
                None => Resume::Created,
                Some(reason) => Resume::Replaced { reason },
            };
            Ok(Opened { file, header: want, resume })
        }
    }
}

/// Why a file with header `have` (and `len` bytes) cannot hold the table
/// `want` describes.
fn mismatch(have: &Header, want: &Header, len: u64) -> Option<String> {
    if have.layout != want.layout || have.sizes != want.sizes {
        return Some(format!(
            "layout {} {:?}, this build's is {} {:?}",
            have.layout, have.sizes, want.layout, want.sizes
        ));
    }
    if have.capacity != want.capacity || have.slots != want.slots {
        return Some(format!("capacity {} flows, asked for {}", have.capacity, want.capacity));
    }
    if have.accounting != want.accounting {
        return Some(format!("accounting {}, asked for {}", have.accounting, want.accounting));
    }
    if have.boot_id != want.boot_id {
        return Some("made before the last boot".into());
    }
    let (_, total) = have.offsets();
    if len < total {
        return Some(format!("file of {len} bytes, the layout needs {total}"));
    }
    if have.created_ns > monotonic_ns() {
        return Some("created in the future of this boot's clock".into());
    }
    None
}

/// Takes the file's exclusive lock, waiting up to [`LOCK_WAIT`].
fn lock(file: &File, path: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on an open descriptor this function borrows.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        if Instant::now() >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!("{} is held by another process (still running?) after {LOCK_WAIT:?}", path.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The header this build writes for a table of `capacity` flows in `slots`
/// slots, with the given seed.
pub(crate) fn header_for(capacity: usize, slots: usize, accounting: bool, sizes: [u32; 4], seed: u64) -> Header {
    Header {
        layout: LAYOUT_VERSION,
        sizes,
        capacity: capacity as u64,
        slots: slots as u64,
        accounting,
        seed,
        created_ns: monotonic_ns(),
        boot_id: boot_id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_decodes_to_itself_and_a_flipped_byte_is_caught() {
        let h = header_for(1000, 2500, false, [64, 64, 4, 16], 42);
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in [0, 9, 40, 70, 100] {
            let mut bad = b;
            bad[i] ^= 1;
            assert!(Header::decode(&bad).is_err(), "byte {i}");
        }
    }
}
