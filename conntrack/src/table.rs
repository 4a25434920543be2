//! The flow table: fixed capacity, shared by every worker, lock-free.
//!
//! # Layout
//! One array of 64-byte `Slot`s (one cache line each), in one huge-page
//! mapping made at creation. A flow occupies two slots, one per direction;
//! each slot holds its own key and its peer's key, so the packet's NAT
//! rewrite (the peer key reversed) with its checksum deltas (computed once,
//! at insert), state and last-seen time are all read by one lookup. For an
//! IPv4 flow all of it is in the slot's line (the addresses packed), so its
//! packets read one line of the array; an IPv6 flow's addresses are in a
//! second array of 64-byte entries (`Wide`), one per slot, which its
//! packets read too. Per-flow packet and byte counters, when kept
//! ([`Config::accounting`]), are in a third. Keys are
//! placed by linear probing from their *home* slot (`hash × n >> 64`).
//! The arrays have `2.5 ×` capacity entries, so the load never exceeds 0.8.
//!
//! Beside it, a compact array of 4-byte hints, one per slot (tag, occupied
//! bit, overflow count): 10 MB per million flows, so a random hint line
//! costs less than a slot's (though with 1M flows on the Zen 4 host of
//! bench/README.md it still comes from memory, not the last level cache).
//! Probes walk the hints and read a slot only when its tag matches, so a
//! miss costs no slot access and a hit costs one.
//!
//! # Protocol
//! - `meta` (per slot) = generation (32 bits) | tag (16 hash bits) | kind
//!   (`EMPTY`, `BUSY`, `FULL`) | direction | layout (compact or wide, see
//!   [`Slot`]). Every transition bumps the
//!   generation, so it is also a seqlock: a reader copies the slot and accepts
//!   the copy only if `meta` is unchanged afterwards. Readers never wait; a
//!   failed validation means a writer made progress, and the reader retries.
//! - The hint of a slot carries its key's tag while the slot is claimed or
//!   full: it is set before the slot is published and cleared only after the
//!   slot stopped being `FULL`, so a `FULL` slot always has its tag hinted.
//!   The hint's overflow count is the number of keys whose probe path
//!   crosses the slot (home before it, stored after it). A probe stops at the
//!   first hint whose count is zero, so removal frees a slot at once: there
//!   are no tombstones and churn never lengthens probes.
//! - `ctl` (per slot) is the commit counter of keys whose home is this slot.
//!   An insert claims an `EMPTY` slot by CAS (→ `BUSY`), raises the overflow
//!   counts on its path, then commits by CAS on the home's `ctl` from the
//!   value it read before scanning. Two inserts of the same key share the
//!   home, so at most one commits against the same scan: insert-if-absent
//!   holds without locks. A failed commit undoes its claim and rescans.
//! - An insert that meets a `BUSY` slot carrying its own tag (almost always
//!   the same key being inserted or removed by another worker) waits for that
//!   slot to change, at most [`SPIN_LIMIT`] spins, then reports
//!   [`InsertError::Contended`] rather than block. Lookups never wait.
//! - Mutable per-packet fields (last seen, counters, state) are separate
//!   atomics updated in place; the flow's TCP/UDP state is authoritative in
//!   its original-direction slot and mirrored into the reply slot, so a reply
//!   touches its peer's slot only when the state changes.
//!
//! Nothing here allocates after [`FlowTable::new`] except the diagnostic
//! [`FlowTable::flows`]; nothing takes a lock or makes a system call.

use crate::key::{Addr, FlowKey, Proto};
use crate::mem::{AllZeroValid, ZeroedArray};
use crate::state::{Dir, FlowState, StateWord, TcpState, Timeouts, advance};
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence, spin_loop};
use Ordering::{AcqRel, Acquire, Relaxed, Release};

/// Slots per flow of capacity: 2 directions / 0.8 maximum load.
const SLOTS_PER_FLOW_NUM: usize = 5;
const SLOTS_PER_FLOW_DEN: usize = 2;
/// Longest probe an insert makes to find a free slot. At load 0.8 a probe
/// longer than a few dozen slots is vanishingly rare; past this the insert
/// fails with [`InsertError::ProbeLimit`] instead of scanning the table.
pub const MAX_PROBE: usize = 1024;
/// How long an insert waits for a same-tag slot that another worker is
/// writing before it gives up with [`InsertError::Contended`].
#[cfg(not(loom))]
pub const SPIN_LIMIT: u32 = 1 << 16;
/// Under loom every spin is a yield to the model checker: keep it short.
#[cfg(loom)]
pub const SPIN_LIMIT: u32 = 4;
/// How many rescans an insert makes when its commit loses a race.
const MAX_RESTARTS: u32 = 256;
/// How many slots from the new flow's home early drop looks at.
const EARLY_DROP_SCAN: usize = 256;

const KIND_EMPTY: u64 = 0;
const KIND_BUSY: u64 = 1;
const KIND_FULL: u64 = 2;

/// [`Meta`]'s layout bit: the slot is compact ([`Slot`]).
const META_COMPACT: u64 = 1 << 57;

/// The per-slot header word; see the module documentation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Meta(u64);

impl Meta {
    fn new(generation: u32, tag: u16, kind: u64, dir: Dir) -> Meta {
        let d = match dir {
            Dir::Original => 0u64,
            Dir::Reply => 1,
        };
        Meta(u64::from(generation) | u64::from(tag) << 32 | kind << 48 | d << 56)
    }
    fn generation(self) -> u32 {
        self.0 as u32
    }
    fn tag(self) -> u16 {
        (self.0 >> 32) as u16
    }
    fn kind(self) -> u64 {
        (self.0 >> 48) & 0xff
    }
    fn dir(self) -> Dir {
        if (self.0 >> 56) & 1 == 1 { Dir::Reply } else { Dir::Original }
    }
    /// Whether the slot is compact (IPv4 key and peer, all in the slot's
    /// line) rather than wide. Set when the slot is published `FULL`.
    fn compact(self) -> bool {
        self.0 & META_COMPACT != 0
    }
    fn with_compact(self, compact: bool) -> Meta {
        Meta(if compact { self.0 | META_COMPACT } else { self.0 & !META_COMPACT })
    }
    /// The same slot in its next state: generation + 1, same tag, direction
    /// and layout.
    fn next(self, kind: u64) -> Meta {
        Meta::new(self.generation().wrapping_add(1), self.tag(), kind, self.dir()).with_compact(self.compact())
    }
}

/// The tag of a key: 15 hash bits, compared before a slot is read.
#[inline]
fn tag_of(hash: u64) -> u16 {
    (hash & 0x7fff) as u16
}

const HINT_OVERFLOW: u32 = 0xffff;
const HINT_OCCUPIED: u32 = 1 << 31;

/// Per-slot hint: overflow count (bits 0–15), tag (16–30), occupied (31).
/// The overflow count cannot carry into the tag: at most [`MAX_PROBE`] keys
/// can cross one slot.
#[derive(Default)]
#[repr(transparent)]
pub(crate) struct Hint(AtomicU32);

// SAFETY: an atomic integer; zero is "empty, no overflow".
unsafe impl AllZeroValid for Hint {}

/// One direction of one flow: 64 bytes, one cache line; all-zero is
/// `EMPTY`.
///
/// It holds everything a lookup and a packet of an IPv4 flow read: the key
/// and the peer key with their addresses packed (a *compact* slot,
/// [`Meta::compact`]), the NAT deltas, state and last-seen time. A flow with
/// an IPv6 address keeps its address words in the slot's [`Wide`] entry (a
/// *wide* slot), which its packets read too.
#[repr(C, align(64))]
pub(crate) struct Slot {
    meta: AtomicU64,
    ctl: AtomicU32,
    /// The checksum deltas of this direction's rewrite (see [`nat_deltas`]).
    nat_delta: AtomicU32,
    /// Key word 4 (ports and protocol).
    key_ports: AtomicU64,
    /// The other direction's key word 4, with `service << 32` in place of
    /// the protocol (which both directions share).
    peer_ports: AtomicU64,
    /// A compact slot's key addresses, packed ([`pack_v4`]).
    key_v4: AtomicU64,
    /// A compact slot's peer addresses, packed.
    peer_v4: AtomicU64,
    peer_slot: AtomicU32,
    backend: AtomicU32,
    last_seen: AtomicU32,
    state: AtomicU32,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<Slot>() == 64 && std::mem::size_of::<Wide>() == 64);

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            meta: AtomicU64::new(0),
            ctl: AtomicU32::new(0),
            nat_delta: AtomicU32::new(0),
            key_ports: AtomicU64::new(0),
            peer_ports: AtomicU64::new(0),
            key_v4: AtomicU64::new(0),
            peer_v4: AtomicU64::new(0),
            peer_slot: AtomicU32::new(0),
            backend: AtomicU32::new(0),
            last_seen: AtomicU32::new(0),
            state: AtomicU32::new(0),
        }
    }
}

/// A wide slot's address words (key and peer words 0–3), in an array of
/// their own, one entry per slot, read under the slot's `meta` like the
/// rest of it.
///
/// Not the second half of a 128-byte slot: a batch that reads only the
/// first line of each 128-byte slot (every lookup of an IPv4 flow) was
/// 1.4–1.8× slower than one reading both lines, on the Zen 4 host of
/// 2026-12-05, and 64-byte slots were as fast or faster than both lines;
/// every line such a batch read sat at an even line address.
#[derive(Default)]
#[repr(C, align(64))]
pub(crate) struct Wide {
    key_addrs: [AtomicU64; 4],
    peer_addrs: [AtomicU64; 4],
}

// SAFETY: made only of atomic integers.
unsafe impl AllZeroValid for Wide {}

// SAFETY: made only of atomic integers; all-zero is an EMPTY slot.
unsafe impl AllZeroValid for Slot {}

/// One direction's packet and byte counters, kept apart from the slots
/// (and only with [`Config::accounting`]), so that the slot's line has
/// room for a whole IPv4 flow.
#[derive(Default)]
#[repr(C, align(16))]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
}

// SAFETY: made only of atomic integers; all-zero is zero counts.
unsafe impl AllZeroValid for Counters {}

/// Bytes 8–11 of an IPv4-mapped address (`::ffff:a.b.c.d`), as its second
/// key word holds them, and the mask that selects them.
const V4_PREFIX: u64 = u64::from_ne_bytes([0, 0, 0xff, 0xff, 0, 0, 0, 0]);
const V4_PREFIX_MASK: u64 = u64::from_ne_bytes([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);

/// Both addresses of key words `w` in one word, when both are IPv4-mapped:
/// the source's four bytes where its word holds them, the destination's in
/// the other half. `None` for a key with an IPv6 address.
#[inline(always)]
fn pack_v4(w: &[u64; 5]) -> Option<u64> {
    let v4 = (w[0] | w[2]) == 0 && w[1] & V4_PREFIX_MASK == V4_PREFIX && w[3] & V4_PREFIX_MASK == V4_PREFIX;
    v4.then(|| (w[1] & !V4_PREFIX_MASK) | (w[3] & !V4_PREFIX_MASK).rotate_left(32))
}

/// Inverse of [`pack_v4`]: key words 0–3.
#[inline(always)]
fn unpack_v4(packed: u64) -> [u64; 4] {
    [0, (packed & !V4_PREFIX_MASK) | V4_PREFIX, 0, (packed.rotate_left(32) & !V4_PREFIX_MASK) | V4_PREFIX]
}

/// A consistent copy of a slot's immutable part.
struct Record {
    key: [u64; 5],
    peer: [u64; 5],
    peer_slot: u32,
    backend: u32,
    nat_delta: u32,
}

const PORTS_MASK: u64 = 0xffff_ffff;

impl Record {
    fn service(&self) -> u32 {
        (self.peer[4] >> 32) as u32
    }
    /// The peer key with its protocol restored from our own key.
    fn peer_words(&self) -> [u64; 5] {
        with_proto(self.peer, (self.key[4] >> 32) as u8)
    }
}

/// A peer key's word 4 as a slot stores it: its ports, and the service in
/// place of the protocol (which both directions share).
#[inline(always)]
fn stored_ports(word4: u64, service: u32) -> u64 {
    (word4 & PORTS_MASK) | u64::from(service) << 32
}

/// Peer words as a slot stores them ([`stored_ports`]) with the protocol
/// `proto` put back in place of the service.
#[inline(always)]
fn with_proto(mut peer: [u64; 5], proto: u8) -> [u64; 5] {
    peer[4] = (peer[4] & PORTS_MASK) | u64::from(proto) << 32;
    peer
}

/// Table configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Maximum number of flows (each flow is both directions). Default 1,048,576.
    pub capacity: usize,
    pub timeouts: Timeouts,
    /// When full, evict the oldest not-yet-assured flow near the new one
    /// (Linux's `early_drop`). Established and replied flows are never evicted.
    pub early_drop: bool,
    /// Hash seed; `None` draws a random one (hash-flooding resistance).
    pub seed: Option<u64>,
    /// Count packets and bytes per flow direction ([`FlowInfo`]'s
    /// `packets` and `bytes`), as Linux's `nf_conntrack_acct` does. Off by
    /// default, as there: each counted packet costs two atomic additions
    /// (locked instructions, which also hold back the packet's later loads):
    /// 1.1–1.2× an established packet's time in the fast path.
    /// Off, both stay 0; last-seen times and states are kept either way.
    pub accounting: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config { capacity: 1 << 20, timeouts: Timeouts::default(), early_drop: true, seed: None, accounting: false }
    }
}

/// A new flow: the tuple of its first packet, the tuple its replies will
/// carry (after DNAT and SNAT), and what the flow refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewFlow {
    pub orig: FlowKey,
    pub reply: FlowKey,
    /// Stable reference to the endpoint (assigned by the control plane).
    pub backend: u32,
    /// Stable reference to the service port.
    pub service: u32,
    pub state: FlowState,
}

/// The packet whose lookup missed, given to [`FlowTable::insert_missed`]
/// to be recorded on its flow as [`FlowTable::touch`] records a packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirstPacket {
    /// Its length from the network header on (what the counters count).
    pub bytes: u64,
    /// Its TCP flags (0 for other protocols).
    pub tcp_flags: u8,
}

/// One insert's inputs, as [`FlowTable::insert`] and
/// [`FlowTable::insert_missed`] hand them down: the flow, its original
/// tuple's hash, the time, the packet to record on it (if any), and the
/// SNAT port search for a taken reply tuple.
struct InsertArgs<'a> {
    flow: &'a NewFlow,
    orig: &'a KeyHash,
    /// The hash of `flow.reply`, when the caller has it.
    reply: Option<&'a KeyHash>,
    now: u32,
    first: Option<FirstPacket>,
    next_reply_port: &'a mut dyn FnMut() -> Option<u16>,
}

/// One direction's part of a new flow, as [`FlowTable::fill`] writes it.
struct Half<'a> {
    key: &'a [u64; 5],
    peer: &'a [u64; 5],
    /// Key and peer addresses packed ([`pack_v4`]) when both are IPv4: the
    /// slot is then compact.
    packed: Option<(u64, u64)>,
    nat_delta: u32,
    peer_slot: usize,
    packets: u64,
    bytes: u64,
}

/// What a lookup finds: one direction of a flow.
///
/// A packet of this direction is rewritten to [`FlowView::rewrite`], the
/// other direction's tuple reversed. The fast path reads the rewrite in the
/// form it writes ([`FlowView::rewrite_src`], [`FlowView::rewrite_dst`],
/// [`FlowView::rewrite_ports`]) with its checksum deltas
/// ([`FlowView::checksum_deltas`]), all computed when the flow was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowView {
    pub dir: Dir,
    pub backend: u32,
    pub service: u32,
    /// The other direction's tuple, as words ([`FlowKey::to_words`]),
    /// word 4 as the slot stores it: the service in place of the protocol.
    peer: [u64; 5],
    /// The protocol of both directions.
    proto: u8,
    nat_delta: u32,
    slot: u32,
    generation: u32,
    peer_slot: u32,
}

impl FlowView {
    /// The other direction's tuple.
    pub fn peer(&self) -> FlowKey {
        FlowKey::from_words(&self.peer_words())
    }

    /// The other direction's tuple as words, the protocol restored.
    fn peer_words(&self) -> [u64; 5] {
        with_proto(self.peer, self.proto)
    }

    /// The tuple a packet of this direction must carry after NAT.
    pub fn rewrite(&self) -> FlowKey {
        self.peer().reversed()
    }

    /// The source address after NAT.
    #[inline]
    pub fn rewrite_src(&self) -> Addr {
        Addr(words_to_addr(self.peer[2], self.peer[3]))
    }

    /// The destination address after NAT.
    #[inline]
    pub fn rewrite_dst(&self) -> Addr {
        Addr(words_to_addr(self.peer[0], self.peer[1]))
    }

    /// Source and destination port after NAT, big-endian, as the TCP and
    /// UDP headers carry them.
    #[inline]
    pub fn rewrite_ports(&self) -> [u8; 4] {
        let (peer_sport, peer_dport) = (self.peer[4] as u16, (self.peer[4] >> 16) as u16);
        let [a, b] = peer_dport.to_be_bytes();
        let [c, d] = peer_sport.to_be_bytes();
        [a, b, c, d]
    }

    /// The RFC 1624 deltas of the rewrite, for a packet that carries this
    /// direction's tuple: `(addresses, addresses and ports)`, for the IPv4
    /// header checksum and for the TCP/UDP checksum (whose pseudo-header
    /// covers the addresses). Each is `~m + m'` summed over the fields that
    /// change, folded to 16 bits; 0 when none changes.
    #[inline]
    pub fn checksum_deltas(&self) -> (u16, u16) {
        (self.nat_delta as u16, (self.nat_delta >> 16) as u16)
    }
}

/// Whether two keys' words are equal (a branch-free compare: `==` on arrays
/// becomes a call to `memcmp`).
#[inline(always)]
fn same_key(a: &[u64; 5], b: &[u64; 5]) -> bool {
    a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[inline(always)]
fn words_to_addr(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_ne_bytes());
    out[8..].copy_from_slice(&b.to_ne_bytes());
    out
}

/// The sum of the 16-bit lanes of two key words (16 address bytes). A key
/// word holds 8 address bytes in memory order, so on a little-endian
/// machine its lanes are the packet's big-endian words byte-swapped;
/// one's-complement sums commute with byte swapping (RFC 1071 §2(B)), so
/// [`nat_deltas`] sums lanes and swaps the folded result once. The lanes
/// are added two at a time in 32-bit halves (each half stays below 2^18).
#[inline(always)]
fn lane_sum(a: u64, b: u64) -> u64 {
    const M: u64 = 0x0000_ffff_0000_ffff;
    let x = (a & M) + ((a >> 16) & M) + (b & M) + ((b >> 16) & M);
    (x & 0xffff_ffff) + (x >> 32)
}

/// `~m` summed over the 8 lanes of an address: 8 × 0xffff minus their sum.
const ADDRESS_ONES: u64 = 8 * 0xffff;
/// The same over the 2 port words.
const PORTS_ONES: u64 = 2 * 0xffff;

/// RFC 1624's `~m + m'` over the lanes of a 16-byte address changing from
/// `old` to `new`, with whether it changed; 0 when it does not change, so
/// that an unchanged field leaves a checksum exactly as it was.
#[inline(always)]
fn address_delta(old: [u64; 2], new: [u64; 2]) -> (u64, u64) {
    if old[0] == new[0] && old[1] == new[1] {
        (0, 0)
    } else {
        (ADDRESS_ONES - lane_sum(old[0], old[1]) + lane_sum(new[0], new[1]), 1)
    }
}

/// Folds a 64-bit one's-complement accumulator to 16 bits (the Internet
/// checksum's end-around carry; `xskgate_fastpath::checksum` uses it too).
#[inline(always)]
pub fn fold_checksum(sum: u64) -> u16 {
    // Four end-around-carry steps, no loop: 2^32 and 2^16 are 1 modulo
    // 0xffff, so each step keeps the value modulo 0xffff (and nonzero
    // stays nonzero); the bounds are < 2^33, <= 0x2fffe, <= 0x10001, <= 0xffff.
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The folded deltas of one direction, packed as [`FlowView::checksum_deltas`]
/// reads them, from the raw address delta (lanes, little-endian domain) and
/// the raw port delta (big-endian domain).
#[inline(always)]
fn pack_deltas(address_lanes: u64, ports: u64) -> u32 {
    let folded = fold_checksum(address_lanes);
    let addresses = if cfg!(target_endian = "little") { folded.swap_bytes() } else { folded };
    let with_ports = fold_checksum(u64::from(addresses) + ports);
    u32::from(addresses) | (with_ports as u32) << 16
}

/// The checksum deltas (see [`FlowView::checksum_deltas`]) of both
/// directions of a flow whose tuples are `orig` and `reply`: a packet
/// carrying `orig` is rewritten to the reverse of `reply`, and the other
/// way round. For IPv4-mapped addresses the 12 prefix bytes are equal on
/// both sides, so the 16-byte delta is the 4-byte one (both are congruent
/// modulo 0xffff and zero together); [`nat_deltas_v4`] is this function
/// for packed IPv4 keys.
#[inline]
fn nat_deltas(orig: &[u64; 5], reply: &[u64; 5]) -> (u32, u32) {
    // The original direction's rewrite: source becomes the reply's
    // destination, destination the reply's source, and the ports swap.
    let src = address_delta([orig[0], orig[1]], [reply[2], reply[3]]);
    let dst = address_delta([orig[2], orig[3]], [reply[0], reply[1]]);
    finish_deltas(src, dst, orig[4], reply[4])
}

/// [`nat_deltas`] from the packed addresses ([`pack_v4`]) of a flow whose
/// keys are both IPv4-mapped, bit for bit the same result: in
/// [`address_delta`] the prefix lanes of the old and the new address
/// cancel, leaving `ADDRESS_ONES` minus the old address's two lanes plus
/// the new one's.
#[inline(always)]
fn nat_deltas_v4(orig: u64, reply: u64, orig_ports: u64, reply_ports: u64) -> (u32, u32) {
    // The two lanes of a 4-byte address.
    let lanes = |a: u64| (a & 0xffff) + (a >> 16);
    let delta = |old: u64, new: u64| {
        if old == new { (0, 0) } else { (ADDRESS_ONES - lanes(old) + lanes(new), 1) }
    };
    // Each half of a packed word holds one address; with the reply's
    // halves swapped, the same half of `new` holds its replacement.
    let new = reply.rotate_left(32);
    let low = delta(orig & 0xffff_ffff, new & 0xffff_ffff);
    let high = delta(orig >> 32, new >> 32);
    finish_deltas(low, high, orig_ports, reply_ports)
}

/// The rest of [`nat_deltas`] from the two address deltas (raw lanes, and
/// whether the address changed; in either order) and both keys' word 4.
///
/// The reply direction undoes the original one field by field (its source
/// change is the inverse of the original destination change, and so on),
/// and a changed field's delta plus its inverse's is exactly twice the
/// field's `~m` sum, so the reply's raw deltas follow from the original's.
#[inline(always)]
fn finish_deltas(src: (u64, u64), dst: (u64, u64), orig_ports: u64, reply_ports: u64) -> (u32, u32) {
    let lanes = src.0 + dst.0;
    let reply_lanes = 2 * ADDRESS_ONES * (src.1 + dst.1) - lanes;
    // Ports are numbers in the key: already the packet's big-endian words.
    let (sport, dport) = (orig_ports & 0xffff, (orig_ports >> 16) & 0xffff);
    let (new_sport, new_dport) = ((reply_ports >> 16) & 0xffff, reply_ports & 0xffff);
    let (ports, reply_ports) = if (sport, dport) == (new_sport, new_dport) {
        (0, 0)
    } else {
        let d = PORTS_ONES - sport - dport + new_sport + new_dport;
        (d, 2 * PORTS_ONES - d)
    };
    (pack_deltas(lanes, ports), pack_deltas(reply_lanes, reply_ports))
}

/// Result of a successful insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// The flow was created.
    New(FlowView),
    /// The original tuple was already tracked (possibly just inserted by
    /// another worker); this is that flow, and the new one was not stored.
    Existing(FlowView),
}

impl Inserted {
    pub fn view(&self) -> &FlowView {
        match self {
            Inserted::New(v) | Inserted::Existing(v) => v,
        }
    }
}

/// Why an insert stored nothing. Each has a stable metric name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum InsertError {
    /// The table holds `capacity` flows (after early drop, if enabled).
    #[error("conntrack_full")]
    Full,
    /// Another flow already owns the reply tuple: the SNAT allocator must
    /// pick another port.
    #[error("conntrack_reply_taken")]
    ReplyTaken,
    /// Another worker kept a same-tag slot busy for [`SPIN_LIMIT`] spins.
    #[error("conntrack_contended")]
    Contended,
    /// No free slot within [`MAX_PROBE`] of the key's home.
    #[error("conntrack_probe_limit")]
    ProbeLimit,
    /// The reply tuple equals the original tuple, or their protocols differ.
    #[error("conntrack_invalid_tuple")]
    InvalidTuple,
}

impl InsertError {
    pub fn name(self) -> &'static str {
        match self {
            InsertError::Full => "conntrack_full",
            InsertError::ReplyTaken => "conntrack_reply_taken",
            InsertError::Contended => "conntrack_contended",
            InsertError::ProbeLimit => "conntrack_probe_limit",
            InsertError::InvalidTuple => "conntrack_invalid_tuple",
        }
    }
}

/// A flow as diagnostics, flushes and tests see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    pub orig: FlowKey,
    pub reply: FlowKey,
    pub backend: u32,
    pub service: u32,
    pub state: FlowState,
    /// Latest of both directions' last-seen times.
    pub last_seen: u32,
    /// Packets and bytes, `[original, reply]` (0 unless the table counts
    /// them: [`Config::accounting`]).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// Counters of rare table events, shared by all users of the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub full: u64,
    pub early_drops: u64,
    pub expired: u64,
    pub flushed: u64,
    /// Closed TCP flows (TIME_WAIT or CLOSE) removed because a new flow
    /// needed their reply tuple (a SNAT port), as Linux's NAT reuses them.
    pub closed_reused: u64,
}

#[derive(Default)]
struct SharedStats {
    full: AtomicU64,
    early_drops: AtomicU64,
    expired: AtomicU64,
    flushed: AtomicU64,
    closed_reused: AtomicU64,
}

/// A pre-computed key hash, so a batch can prefetch before it looks up.
/// The default is the hash of no key in particular (a placeholder for
/// arrays that a batch fills).
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyHash {
    words: [u64; 5],
    hash: u64,
    /// Both addresses in one word ([`pack_v4`]) for an IPv4 key: found
    /// once here, where the hash needs it, not again by every stage that
    /// reads the key (the slot prefetch, the compare, the insert).
    packed: Option<u64>,
}

/// The slot where [`FlowTable::prefetch_slot`] found a key's tag, for
/// [`FlowTable::lookup_candidate`]. The default is no slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate(u32);

impl Candidate {
    /// No slot: the lookup walks the key's chain.
    pub const NONE: Candidate = Candidate(0);
    /// No slot, and the key's chain ended without its tag: the key was not
    /// in the table when [`FlowTable::prefetch_slot`] looked (a batch takes
    /// it for a new flow's first packet). The lookup walks the chain all
    /// the same, since another worker may have inserted the key since.
    /// (In a table of [`MAX_CAPACITY`] flows the last slot's candidate has
    /// the same value; it is then read as this, which is only slower.)
    pub const ABSENT: Candidate = Candidate(u32::MAX);

    /// Whether a slot carrying the key's tag was found (the key is most
    /// likely in the table).
    pub fn has_slot(self) -> bool {
        self != Candidate::NONE && self != Candidate::ABSENT
    }
}

/// Why a table could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("conntrack capacity must be at least 1 flow")]
    ZeroCapacity,
    /// Capacity beyond what 32-bit slot references can address.
    #[error("conntrack capacity {0} is above the maximum of {MAX_CAPACITY} flows")]
    TooLarge(usize),
    /// The memory could not be mapped.
    #[error("cannot allocate the conntrack table: {0}")]
    Memory(std::io::Error),
    /// The table's file could not be opened, locked, sized or mapped.
    #[error("conntrack file {}: {source}", path.display())]
    File { path: std::path::PathBuf, source: std::io::Error },
}

/// Largest capacity: slot numbers must fit in 32 bits.
pub const MAX_CAPACITY: usize = (u32::MAX as usize / SLOTS_PER_FLOW_NUM) * SLOTS_PER_FLOW_DEN;

/// The shared connection-tracking table. See the module documentation.
pub struct FlowTable {
    slots: ZeroedArray<Slot>,
    /// IPv6 addresses of wide slots, one entry per slot.
    wide: ZeroedArray<Wide>,
    hints: ZeroedArray<Hint>,
    /// Per-slot counters, with [`Config::accounting`] only.
    counters: Option<ZeroedArray<Counters>>,
    n: usize,
    seed: [u64; 6],
    capacity: usize,
    config: Config,
    /// Flows stored (a flow counts once for both directions).
    len: CachePadded<AtomicUsize>,
    stats: SharedStats,
    /// When the table's clock read 0 (see [`FlowTable::epoch`]).
    epoch: std::time::Instant,
    /// The file the arrays live in, locked, for [`FlowTable::open_file`].
    #[cfg(not(loom))]
    _file: Option<std::fs::File>,
}

#[repr(align(128))]
struct CachePadded<T>(T);

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable")
            .field("flows", &self.len())
            .field("capacity", &self.capacity)
            .field("slots", &self.n)
            .field("memory_bytes", &self.memory_bytes())
            .finish()
    }
}

/// How far [`FlowTable::prefetch_slot`] looks for a matching tag.
const PREFETCH_PROBE: usize = 8;

/// Starts loading the cache line at `p` into the second-level cache (a
/// hint that never faults; no-op elsewhere than x86-64). Public for the
/// fast path's own batches.
///
/// The hint is `T1` (L2 and beyond), not `T0` (L1 too). A batch asks for
/// about three lines per packet, nearly 200 at once, and the first-level
/// cache tracks only a few dozen misses. On an AMD Zen 4 (EPYC) core, where
/// `T1` fills only the L2, `T0` prefetches did not arrive: the lookups
/// waited for memory as if there were none (plain loads in their place
/// were 1.2–1.4× faster). With `T1`, 1M flows: established packets
/// 1.5–1.7× faster (9–10 → 15–17 Mpps), new flows 1.0–1.15×, a
/// cache-resident table within the noise; the later load hits the L2, whose
/// latency the out-of-order core hides. Intel cores, too, fill only the L2
/// and L3 for `T1`.
#[inline(always)]
pub fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        // SAFETY: prefetching is a hint: it never faults and has no effect
        // other than on the cache, whatever the address.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(p.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The table's arrays, however they were mapped.
struct Arrays {
    slots: ZeroedArray<Slot>,
    wide: ZeroedArray<Wide>,
    hints: ZeroedArray<Hint>,
    counters: Option<ZeroedArray<Counters>>,
}

/// A seed from the standard library's per-process random keys.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FlowTable {
    /// Allocates (and faults in) the whole table.
    ///
    /// # Errors
    /// [`TableError`] for a zero or too large capacity, or when the memory
    /// cannot be mapped.
    pub fn new(config: Config) -> Result<FlowTable, TableError> {
        if config.capacity == 0 {
            return Err(TableError::ZeroCapacity);
        }
        if config.capacity > MAX_CAPACITY {
            return Err(TableError::TooLarge(config.capacity));
        }
        let n = Self::slots_for(config.capacity);
        let slots = ZeroedArray::new(n).map_err(TableError::Memory)?;
        let wide = ZeroedArray::new(n).map_err(TableError::Memory)?;
        let hints = ZeroedArray::new(n).map_err(TableError::Memory)?;
        let counters = if config.accounting { Some(ZeroedArray::new(n).map_err(TableError::Memory)?) } else { None };
        let s = config.seed.unwrap_or_else(random_seed);
        Ok(FlowTable::from_arrays(config, Arrays { slots, wide, hints, counters }, s, std::time::Instant::now()))
    }

    /// Slots for `capacity` flows.
    fn slots_for(capacity: usize) -> usize {
        (capacity * SLOTS_PER_FLOW_NUM).div_ceil(SLOTS_PER_FLOW_DEN).max(8)
    }

    fn from_arrays(config: Config, a: Arrays, mut s: u64, epoch: std::time::Instant) -> FlowTable {
        let seed = std::array::from_fn(|_| splitmix(&mut s) | 1);
        FlowTable {
            n: a.slots.len(),
            slots: a.slots,
            wide: a.wide,
            hints: a.hints,
            counters: a.counters,
            seed,
            capacity: config.capacity,
            config,
            len: CachePadded(AtomicUsize::new(0)),
            stats: SharedStats::default(),
            epoch,
            #[cfg(not(loom))]
            _file: None,
        }
    }

    /// The table in the file at `path` (see [`crate::persist`] for the
    /// contract): its flows resumed when the file holds a table of this
    /// layout and capacity from this boot, else a new, empty table in a file
    /// made anew; [`Resume`](crate::persist::Resume) says which, and why.
    /// `config.seed` is used only for a new file (a resumed one keeps its
    /// own, as its flows are placed by it).
    ///
    /// # Errors
    /// [`TableError::File`] when the file cannot be opened, locked (another
    /// process holds it past [`LOCK_WAIT`](crate::persist::LOCK_WAIT)),
    /// sized or mapped; the capacity errors of [`FlowTable::new`].
    #[cfg(not(loom))]
    pub fn open_file(
        config: Config,
        path: &std::path::Path,
    ) -> Result<(FlowTable, crate::persist::Resume), TableError> {
        use crate::persist::{self, Resume};
        if config.capacity == 0 {
            return Err(TableError::ZeroCapacity);
        }
        if config.capacity > MAX_CAPACITY {
            return Err(TableError::TooLarge(config.capacity));
        }
        let file_err = |source| TableError::File { path: path.to_path_buf(), source };
        let n = Self::slots_for(config.capacity);
        let sizes = [size_of::<Slot>(), size_of::<Wide>(), size_of::<Hint>(), size_of::<Counters>()].map(|s| s as u32);
        let seed = config.seed.unwrap_or_else(random_seed);
        let want = persist::header_for(config.capacity, n, config.accounting, sizes, seed);
        let opened = persist::open(path, want).map_err(file_err)?;
        let (offsets, _) = opened.header.offsets();
        let arrays = Arrays {
            slots: ZeroedArray::map_shared(&opened.file, offsets[0], n).map_err(file_err)?,
            wide: ZeroedArray::map_shared(&opened.file, offsets[1], n).map_err(file_err)?,
            hints: ZeroedArray::map_shared(&opened.file, offsets[2], n).map_err(file_err)?,
            counters: match config.accounting {
                true => Some(ZeroedArray::map_shared(&opened.file, offsets[3], n).map_err(file_err)?),
                false => None,
            },
        };
        let epoch = persist::epoch_of(opened.header.created_ns);
        let mut table = FlowTable::from_arrays(config, arrays, opened.header.seed, epoch);
        table._file = Some(opened.file);
        let resume = match opened.resume {
            Resume::Resumed { .. } => {
                let (flows, dropped) = table.repair();
                Resume::Resumed { flows, dropped }
            }
            other => other,
        };
        Ok((table, resume))
    }

    /// The instant at which the table's clock read 0: `now` for its
    /// operations is `epoch().elapsed()` in seconds. A new table's is its
    /// creation; a resumed one's is its file's, so that its flows' ages
    /// carry over.
    pub fn epoch(&self) -> std::time::Instant {
        self.epoch
    }

    /// Makes a table written by a process that may have died mid-write
    /// whole again, before anyone else uses it: a slot left `BUSY` is
    /// emptied; a flow whose two directions do not point at each other,
    /// whose tag is not its key's, or whose key is stored twice, is dropped
    /// (both slots); then the hints (tags and overflow counts) and the flow
    /// count are recomputed from the flows kept. Returns (flows kept, flows
    /// dropped: the slots emptied, two to a flow, rounded up). Exclusive
    /// use: called before the table is shared.
    #[cfg(not(loom))]
    fn repair(&self) -> (usize, usize) {
        let occupied = (0..self.n).filter(|&i| Meta(self.slots[i].meta.load(Relaxed)).kind() != KIND_EMPTY).count();
        let clear = |i: usize| {
            let s = &self.slots[i];
            let m = Meta(s.meta.load(Relaxed));
            s.meta.store(Meta::new(m.generation().wrapping_add(1), 0, KIND_EMPTY, Dir::Original).0, Relaxed);
        };
        for i in 0..self.n {
            if !matches!(Meta(self.slots[i].meta.load(Relaxed)).kind(), KIND_EMPTY | KIND_FULL) {
                clear(i);
            }
        }
        // A slot is whole when its key's tag is its own and its peer is its
        // other half; dropping one half makes its peer not whole, hence the
        // passes until none is dropped (two at most).
        let whole = |i: usize| -> Option<[u64; 5]> {
            let m = Meta(self.slots[i].meta.load(Relaxed));
            let r = self.read_record(i, m)?;
            let p = r.peer_slot as usize;
            let pm = Meta(self.slots.get(p)?.meta.load(Relaxed));
            let pr = self.read_record(p, pm)?;
            let ok = m.tag() == tag_of(self.hash_words(&r.key))
                && pm.kind() == KIND_FULL
                && pm.dir() != m.dir()
                && pm.compact() == m.compact()
                && pr.key == r.peer_words()
                && pr.peer_slot as usize == i;
            ok.then_some(r.key)
        };
        loop {
            let mut seen = std::collections::HashSet::new();
            let mut bad = Vec::new();
            for i in 0..self.n {
                let m = Meta(self.slots[i].meta.load(Relaxed));
                if m.kind() != KIND_FULL {
                    continue;
                }
                match whole(i) {
                    Some(key) if seen.insert(key) => {}
                    _ => bad.push(i),
                }
            }
            if bad.is_empty() {
                break;
            }
            for &i in &bad {
                clear(i);
            }
        }
        for h in self.hints.iter() {
            h.0.store(0, Relaxed);
        }
        let mut flows = 0;
        for i in 0..self.n {
            let s = &self.slots[i];
            let m = Meta(s.meta.load(Relaxed));
            if m.kind() != KIND_FULL {
                continue;
            }
            let key = Self::load_key(s, &self.wide[i], m);
            let hash = self.hash_words(&key);
            self.hints[i].0.fetch_or(HINT_OCCUPIED | u32::from(tag_of(hash)) << 16, Relaxed);
            let home = self.home(hash);
            let dist = if i >= home { i - home } else { i + self.n - home };
            self.add_overflow(home, dist, true);
            if m.dir() == Dir::Original {
                flows += 1;
            }
        }
        self.len.0.store(flows, Relaxed);
        std::sync::atomic::fence(Release);
        // Flows' worth of slots that held something and were emptied.
        (flows, occupied.saturating_sub(2 * flows).div_ceil(2))
    }

    /// Maximum number of flows.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows stored now.
    pub fn len(&self) -> usize {
        self.len.0.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the table holds for its whole life (fixed at creation).
    pub fn memory_bytes(&self) -> usize {
        let counters = self.counters.as_ref().map_or(0, |c| c.bytes());
        self.slots.bytes() + self.wide.bytes() + self.hints.bytes() + counters + std::mem::size_of::<FlowTable>()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            full: self.stats.full.load(Relaxed),
            early_drops: self.stats.early_drops.load(Relaxed),
            expired: self.stats.expired.load(Relaxed),
            flushed: self.stats.flushed.load(Relaxed),
            closed_reused: self.stats.closed_reused.load(Relaxed),
        }
    }

    #[inline]
    fn hash_words(&self, w: &[u64; 5]) -> u64 {
        self.hash_parts(w, pack_v4(w))
    }

    /// The hash of key words `w`, whose addresses pack to `packed` if both
    /// are IPv4. An IPv4 key is hashed from its packed addresses and its
    /// ports word, two multiplies instead of three; every key of the table
    /// is hashed here, so the two forms never meet. Neither multiply can
    /// lose the whole key: if the first one's factors cancel (one address
    /// pair or port word, found only with the seed), the second still
    /// mixes both words.
    #[inline(always)]
    fn hash_parts(&self, w: &[u64; 5], packed: Option<u64>) -> u64 {
        let s = &self.seed;
        match packed {
            Some(p) => fold(fold(p ^ s[0], w[4] ^ s[1]) ^ s[5], p.rotate_left(32) ^ w[4] ^ s[2]),
            None => {
                let a = fold(w[0] ^ s[0], w[1] ^ s[1]);
                let b = fold(w[2] ^ s[2], w[3] ^ s[3]);
                fold(a ^ s[5], fold(w[4] ^ s[4], b ^ s[5]))
            }
        }
    }

    /// Hashes key words once, for [`FlowTable::prefetch`] and [`FlowTable::lookup_hashed`].
    #[inline(always)]
    fn key_hash(&self, words: [u64; 5]) -> KeyHash {
        let packed = pack_v4(&words);
        KeyHash { hash: self.hash_parts(&words, packed), words, packed }
    }

    /// Hashes a key once, for [`FlowTable::prefetch`] and [`FlowTable::lookup_hashed`].
    #[inline]
    pub fn hash(&self, key: &FlowKey) -> KeyHash {
        self.key_hash(key.to_words())
    }

    /// The hash of `h`'s key with its destination port replaced by `dport`
    /// (the SNAT search's next reply tuple), from the words in `h`: the
    /// tuple is not read back from where a caller has just stored the new
    /// port (a load of the ports that spans that store waits for it to
    /// reach the cache, behind a batch's misses).
    #[inline]
    pub fn hash_with_dport(&self, h: &KeyHash, dport: u16) -> KeyHash {
        let mut words = h.words;
        words[4] = (words[4] & !0xffff_0000) | u64::from(dport) << 16;
        KeyHash { hash: self.hash_parts(&words, h.packed), words, packed: h.packed }
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.n as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.n { 0 } else { i + 1 }
    }

    /// Hint `i` of a probe: `i` comes from [`FlowTable::home`] or
    /// [`FlowTable::next`], which return only indices below `n`. (Unchecked
    /// because the lookup's hot loop paid a reload and a compare of the
    /// length for every slot it looked at.)
    #[inline(always)]
    fn probe_hint(&self, i: usize) -> &Hint {
        debug_assert!(i < self.n && self.hints.len() == self.n);
        // SAFETY: `i < n` (see above), and `hints` has `n` elements (`new`).
        unsafe { self.hints.get_unchecked(i) }
    }

    /// Slot `i` of a probe, as [`FlowTable::probe_hint`].
    #[inline(always)]
    fn probe_slot(&self, i: usize) -> &Slot {
        debug_assert!(i < self.n && self.slots.len() == self.n);
        // SAFETY: `i < n` (see `probe_hint`), and `slots` has `n` elements (`new`).
        unsafe { self.slots.get_unchecked(i) }
    }

    /// Wide entry `i` of a probe, as [`FlowTable::probe_hint`].
    #[inline(always)]
    fn probe_wide(&self, i: usize) -> &Wide {
        debug_assert!(i < self.n && self.wide.len() == self.n);
        // SAFETY: `i < n` (see `probe_hint`), and `wide` has `n` elements (`new`).
        unsafe { self.wide.get_unchecked(i) }
    }

    /// Stage one of a batched lookup: starts loading the key's home hint
    /// into the cache (no-op elsewhere than x86-64).
    ///
    /// A batch calls this for every key, then [`FlowTable::prefetch_slot`]
    /// for every key, then looks them up ([`FlowTable::lookup_candidate`]):
    /// each stage finds the memory the previous one asked for already
    /// arriving, and the misses of the whole batch overlap.
    #[inline]
    pub fn prefetch(&self, h: &KeyHash) {
        prefetch_line(std::ptr::from_ref(self.probe_hint(self.home(h.hash))).cast());
    }

    /// Stage two of a batched lookup: reads the key's hints (which
    /// [`FlowTable::prefetch`] started loading) and starts loading the first
    /// slot whose tag matches, the one a lookup will read (with its [`Wide`]
    /// entry for a key with an IPv6 address). When no tag
    /// matches, the key is most likely about to be inserted: its home slot
    /// (whose commit counter the insert updates) and the first free slot
    /// (which the insert claims) are loaded instead. A key whose probe is
    /// longer than a few slots prefetches nothing.
    ///
    /// Returns the slot it prefetched for a matching tag, for
    /// [`FlowTable::lookup_candidate`] to read first: the lookup then does
    /// not walk the hints a second time (a walk's first step is a coin toss
    /// for the branch predictor at the table's usual load). Without one:
    /// [`Candidate::ABSENT`] when the chain ended without the tag,
    /// [`Candidate::NONE`] when the probe was too long to tell.
    #[inline]
    pub fn prefetch_slot(&self, h: &KeyHash) -> Candidate {
        let hinted = HINT_OCCUPIED | u32::from(tag_of(h.hash)) << 16;
        let home = self.home(h.hash);
        let mut i = home;
        for _ in 0..PREFETCH_PROBE {
            let hint = self.probe_hint(i).0.load(Relaxed);
            if hint & !HINT_OVERFLOW == hinted {
                prefetch_line(std::ptr::from_ref(self.probe_slot(i)).cast());
                if h.packed.is_none() {
                    prefetch_line(std::ptr::from_ref(self.probe_wide(i)).cast());
                }
                // `i < n <= u32::MAX` (`MAX_CAPACITY`), so `i + 1` fits.
                return Candidate(i as u32 + 1);
            }
            if hint & HINT_OVERFLOW == 0 {
                self.prefetch_free(home, h.packed.is_none());
                return Candidate::ABSENT;
            }
            i = self.next(i);
        }
        Candidate::NONE
    }

    /// For a key not in the table: starts loading its home slot (whose
    /// commit counter the insert updates) and the first free slot from
    /// there (whose hints are in the cache by now), with its [`Wide`] entry
    /// when the key is `wide` (an IPv6 flow's). Left unfetched, a line the
    /// insert writes was a demand miss on every new flow, which the next
    /// atomic operation waited for (a new flow 1.2× slower with 1M flows,
    /// 1.4× with 64K).
    #[inline(never)]
    fn prefetch_free(&self, home: usize, wide: bool) {
        prefetch_line(std::ptr::from_ref(self.probe_slot(home)).cast());
        let mut i = home;
        for _ in 0..PREFETCH_PROBE {
            if self.probe_hint(i).0.load(Relaxed) & HINT_OCCUPIED == 0 {
                if i != home {
                    prefetch_line(std::ptr::from_ref(self.probe_slot(i)).cast());
                }
                if wide {
                    prefetch_line(std::ptr::from_ref(self.probe_wide(i)).cast());
                }
                return;
            }
            i = self.next(i);
        }
    }

    /// Starts loading what inserting the key `h` will touch first: its home
    /// hint and its home slot. For a key known only late, such as a new
    /// flow's reply tuple once the endpoint and SNAT port are chosen, so
    /// that a batch's inserts find their memory arriving; a later
    /// [`FlowTable::prefetch_slot`] of the same key then reads the hints and
    /// loads the free slot the insert will claim.
    #[inline]
    pub fn prefetch_insert(&self, h: &KeyHash) {
        let home = self.home(h.hash);
        prefetch_line(std::ptr::from_ref(self.probe_hint(home)).cast());
        prefetch_line(std::ptr::from_ref(self.probe_slot(home)).cast());
    }

    /// Copies slot `i`'s immutable part if `meta` still equals `m` afterwards.
    #[inline]
    fn read_record(&self, i: usize, m: Meta) -> Option<Record> {
        let (s, x) = (&self.slots[i], &self.wide[i]);
        let key = Self::load_key(s, x, m);
        let peer = Self::load_peer(s, x, m);
        let peer_slot = s.peer_slot.load(Relaxed);
        let backend = s.backend.load(Relaxed);
        let nat_delta = s.nat_delta.load(Relaxed);
        // Seqlock read side: the data loads above must not be reordered after
        // the validating load below.
        fence(Acquire);
        (s.meta.load(Relaxed) == m.0).then_some(Record { key, peer, peer_slot, backend, nat_delta })
    }

    /// The key words of slot `s` (whose [`Wide`] entry is `x`), in the
    /// layout `m` names (unvalidated).
    #[inline(always)]
    fn load_key(s: &Slot, x: &Wide, m: Meta) -> [u64; 5] {
        Self::load_words(m, &s.key_v4, &x.key_addrs, &s.key_ports)
    }

    /// The peer words of slot `s` as stored (word 4 with the service), as
    /// [`FlowTable::load_key`].
    #[inline(always)]
    fn load_peer(s: &Slot, x: &Wide, m: Meta) -> [u64; 5] {
        Self::load_words(m, &s.peer_v4, &x.peer_addrs, &s.peer_ports)
    }

    /// Key words from a compact slot's `packed` addresses or a wide slot's
    /// `addrs`, as `m` says, and word 4 from `ports`.
    #[inline(always)]
    fn load_words(m: Meta, packed: &AtomicU64, addrs: &[AtomicU64; 4], ports: &AtomicU64) -> [u64; 5] {
        let [a, b, c, d] =
            if m.compact() { unpack_v4(packed.load(Relaxed)) } else { std::array::from_fn(|k| addrs[k].load(Relaxed)) };
        [a, b, c, d, ports.load(Relaxed)]
    }

    /// The probe's read of slot `s` (whose [`Wide`] entry is `x`), seen
    /// with meta `m`: its record if its key is `w`, `Some(None)` if it
    /// holds another key, `None` if a writer changed it meanwhile. The key
    /// is compared as it is read, and the rest read only on a match, so that
    /// a probe keeps one word of the key's comparison live instead of five.
    /// A compact slot holds only IPv4 keys, and a wide one only keys with an
    /// IPv6 address (or peer).
    #[inline(always)]
    fn read_if_key(s: &Slot, x: &Wide, m: Meta, h: &KeyHash) -> Option<Option<Record>> {
        let w = &h.words;
        let ports = s.key_ports.load(Relaxed) ^ w[4];
        let diff = if m.compact() {
            h.packed.map_or(1, |packed| ports | (s.key_v4.load(Relaxed) ^ packed))
        } else {
            x.key_addrs.iter().zip(w).fold(ports, |acc, (k, word)| acc | (k.load(Relaxed) ^ word))
        };
        let rest = (diff == 0).then(|| {
            (Self::load_peer(s, x, m), s.peer_slot.load(Relaxed), s.backend.load(Relaxed), s.nat_delta.load(Relaxed))
        });
        // Seqlock read side, as in `read_record`.
        fence(Acquire);
        if s.meta.load(Relaxed) != m.0 {
            return None;
        }
        Some(rest.map(|(peer, peer_slot, backend, nat_delta)| Record { key: *w, peer, peer_slot, backend, nat_delta }))
    }

    #[inline]
    fn view(i: usize, m: Meta, r: &Record) -> FlowView {
        FlowView {
            dir: m.dir(),
            peer: r.peer,
            proto: (r.key[4] >> 32) as u8,
            nat_delta: r.nat_delta,
            backend: r.backend,
            service: r.service(),
            slot: i as u32,
            generation: m.generation(),
            peer_slot: r.peer_slot,
        }
    }

    /// Finds the flow direction whose tuple is `key`. Never waits.
    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<FlowView> {
        self.lookup_hashed(&self.hash(key))
    }

    /// [`FlowTable::lookup`] with a hash from [`FlowTable::hash`].
    #[inline]
    pub fn lookup_hashed(&self, h: &KeyHash) -> Option<FlowView> {
        self.probe(h, |i, m, r| Self::view(i, m, &r))
    }

    /// [`FlowTable::lookup_hashed`] that reads the slot `c` (from
    /// [`FlowTable::prefetch_slot`] of the same key) first, and walks the
    /// key's chain only if that slot does not hold the key. Any candidate
    /// gives the same answer; a wrong one costs one slot's read.
    #[inline]
    pub fn lookup_candidate(&self, h: &KeyHash, c: Candidate) -> Option<FlowView> {
        // Written as two calls (the same code as one body with an early
        // return): the compiler then keeps the fast path's view in
        // registers, 13 instructions fewer per established packet.
        self.lookup_at(h, c).or_else(|| self.lookup_hashed(h))
    }

    /// [`FlowTable::lookup_candidate`] that takes [`Candidate::ABSENT`] at
    /// its word: `None` without a walk of the key's chain. For a caller
    /// that read the candidate after the flows it must find were stored
    /// (see the fast path's batch); a flow stored since is not found.
    #[inline]
    pub fn lookup_unless_absent(&self, h: &KeyHash, c: Candidate) -> Option<FlowView> {
        self.lookup_at(h, c).or_else(|| if c == Candidate::ABSENT { None } else { self.lookup_hashed(h) })
    }

    /// The flow direction in slot `c`, if it holds the key `h`; `None`
    /// says nothing about the rest of the table.
    #[inline(always)]
    fn lookup_at(&self, h: &KeyHash, c: Candidate) -> Option<FlowView> {
        if c != Candidate::ABSENT
            && let Some(i) = c.0.checked_sub(1)
            && let (Some(s), Some(x)) = (self.slots.get(i as usize), self.wide.get(i as usize))
            && let Some((m, r)) = Self::read_candidate(s, x, tag_of(h.hash), h)
        {
            return Some(Self::view(i as usize, m, &r));
        }
        None
    }

    #[inline]
    fn find(&self, h: &KeyHash) -> Option<(usize, Meta, Record)> {
        self.probe(h, |i, m, r| (i, m, r))
    }

    /// The probe of every lookup: walks the hints from the key's home and
    /// reads (seqlock) each slot whose tag matches, until the key or the end
    /// of its chain. A hit is handed to `hit` where it is read, so that each
    /// caller's copy of the probe keeps what it needs in registers (the fast
    /// path's lookup builds its view directly; a probe returning the whole
    /// record through memory cost it about 40 instructions).
    #[inline(always)]
    fn probe<T>(&self, h: &KeyHash, hit: impl Fn(usize, Meta, Record) -> T) -> Option<T> {
        let tag = tag_of(h.hash);
        let hinted = HINT_OCCUPIED | u32::from(tag) << 16;
        let mut i = self.home(h.hash);
        for _ in 0..MAX_PROBE {
            let hint = self.probe_hint(i).0.load(Acquire);
            if hint & !HINT_OVERFLOW == hinted
                && let Some((m, r)) = Self::read_candidate(self.probe_slot(i), self.probe_wide(i), tag, h)
            {
                return Some(hit(i, m, r));
            }
            if hint & HINT_OVERFLOW == 0 {
                return None;
            }
            i = self.next(i);
        }
        None
    }

    /// The record of slot `s` (whose [`Wide`] entry is `x`) if it holds the
    /// key `h` (whose tag is `tag`), read again for as long as a writer
    /// changes it under us.
    #[inline(always)]
    fn read_candidate(s: &Slot, x: &Wide, tag: u16, h: &KeyHash) -> Option<(Meta, Record)> {
        loop {
            let m = Meta(s.meta.load(Acquire));
            if m.kind() != KIND_FULL || m.tag() != tag {
                return None;
            }
            match Self::read_if_key(s, x, m, h) {
                Some(Some(r)) => return Some((m, r)),
                Some(None) => return None,
                None => continue, // a writer changed the slot under us: read again
            }
        }
    }

    /// Raises (or lowers) the overflow counts of the `dist` slots from `home`.
    fn add_overflow(&self, home: usize, dist: usize, up: bool) {
        let mut j = home;
        for _ in 0..dist {
            if up {
                self.hints[j].0.fetch_add(1, AcqRel);
            } else {
                self.hints[j].0.fetch_sub(1, AcqRel);
            }
            j = self.next(j);
        }
    }

    /// Waits (bounded) until slot `i` leaves the busy state `m`.
    fn wait_while(&self, i: usize, m: Meta) -> Result<(), InsertError> {
        for _ in 0..SPIN_LIMIT {
            if self.slots[i].meta.load(Acquire) != m.0 {
                return Ok(());
            }
            spin_loop();
        }
        Err(InsertError::Contended)
    }

    /// Insert-if-absent of one key: returns the existing direction, or a
    /// committed `BUSY` claim that the caller fills and publishes (or releases).
    ///
    /// Inlined into its two calls (a new flow's two tuples), as is
    /// [`FlowTable::fill`]: out of line, their prologues, the results
    /// returned through memory and the arguments re-read cost a new flow
    /// about 185 of its 1,890 instructions.
    #[inline(always)]
    fn claim(&self, w: &[u64; 5], hash: u64, dir: Dir, own: Option<usize>) -> Result<ClaimResult, InsertError> {
        let tag = tag_of(hash);
        let home = self.home(hash);
        let home_slot = &self.slots[home];
        'restart: for _ in 0..MAX_RESTARTS {
            let c0 = home_slot.ctl.load(Acquire);
            let mut free: Option<(usize, Meta, usize)> = None;
            let mut in_chain = true;
            let mut i = home;
            for dist in 0..MAX_PROBE {
                let hint = self.hints[i].0.load(Acquire);
                let occupied = hint & HINT_OCCUPIED != 0;
                if in_chain && occupied && ((hint >> 16) & 0x7fff) as u16 == tag && Some(i) != own {
                    let m = Meta(self.slots[i].meta.load(Acquire));
                    match m.kind() {
                        KIND_FULL => match self.read_record(i, m) {
                            Some(r) if same_key(&r.key, w) => return Ok(ClaimResult::Found(Self::view(i, m, &r))),
                            Some(_) => {}
                            None => continue 'restart,
                        },
                        KIND_BUSY if m.tag() == tag => {
                            self.wait_while(i, m)?;
                            continue 'restart;
                        }
                        _ => {}
                    }
                }
                if !occupied && free.is_none() {
                    let m = Meta(self.slots[i].meta.load(Acquire));
                    if m.kind() == KIND_EMPTY {
                        free = Some((i, m, dist));
                    }
                }
                if in_chain && hint & HINT_OVERFLOW == 0 {
                    in_chain = false;
                }
                if !in_chain && free.is_some() {
                    break;
                }
                i = self.next(i);
            }
            let Some((f, empty, dist)) = free else {
                return Err(InsertError::ProbeLimit);
            };
            let busy = Meta::new(empty.generation().wrapping_add(1), tag, KIND_BUSY, dir);
            if self.slots[f].meta.compare_exchange(empty.0, busy.0, AcqRel, Relaxed).is_err() {
                continue 'restart;
            }
            // Hint before commit: an insert that reads `ctl` after our commit
            // must see this slot in its scan.
            self.hints[f].0.fetch_or(HINT_OCCUPIED | u32::from(tag) << 16, AcqRel);
            self.add_overflow(home, dist, true);
            if home_slot.ctl.compare_exchange(c0, c0.wrapping_add(1), AcqRel, Relaxed).is_err() {
                // Another key homed here committed since our scan: it may be ours.
                self.release(Claim { slot: f, meta: busy, home, dist });
                continue 'restart;
            }
            return Ok(ClaimResult::Claimed(Claim { slot: f, meta: busy, home, dist }));
        }
        Err(InsertError::Contended)
    }

    /// Gives a claimed (or claimed-for-removal) slot back: `BUSY` → `EMPTY`.
    fn release(&self, c: Claim) {
        self.hints[c.slot].0.fetch_and(HINT_OVERFLOW, AcqRel);
        self.add_overflow(c.home, c.dist, false);
        self.slots[c.slot].meta.store(c.meta.next(KIND_EMPTY).0, Release);
    }

    /// Writes one direction of a new flow into its claimed slot (still
    /// `BUSY`, so no reader accepts a copy of it yet).
    #[inline(always)]
    fn fill(&self, c: &Claim, half: &Half<'_>, flow: &NewFlow, now: u32, state: StateWord) {
        let (s, x) = (&self.slots[c.slot], &self.wide[c.slot]);
        // Seqlock write side: the BUSY generation must be visible before any
        // data store, so that a reader who sees new data also sees a changed
        // `meta` and discards its copy. The claim CAS orders earlier writes
        // only; this fence orders the later ones (free on x86, found by loom).
        fence(Release);
        match half.packed {
            Some((key, peer)) => {
                s.key_v4.store(key, Relaxed);
                s.peer_v4.store(peer, Relaxed);
            }
            None => {
                for (slot_word, word) in x.key_addrs.iter().zip(half.key) {
                    slot_word.store(*word, Relaxed);
                }
                for (slot_word, word) in x.peer_addrs.iter().zip(half.peer) {
                    slot_word.store(*word, Relaxed);
                }
            }
        }
        s.key_ports.store(half.key[4], Relaxed);
        s.peer_ports.store(stored_ports(half.peer[4], flow.service), Relaxed);
        s.nat_delta.store(half.nat_delta, Relaxed);
        s.peer_slot.store(half.peer_slot as u32, Relaxed);
        s.backend.store(flow.backend, Relaxed);
        s.last_seen.store(now, Relaxed);
        s.state.store(state.0, Relaxed);
        if let Some(counters) = &self.counters {
            counters[c.slot].packets.store(half.packets, Relaxed);
            counters[c.slot].bytes.store(half.bytes, Relaxed);
        }
    }

    /// Inserts a flow if its original tuple is not tracked yet.
    ///
    /// Both directions become visible together for practical purposes (the
    /// reply slot is published first). Two workers inserting the same flow at
    /// once get one `New` and one `Existing` naming the same flow.
    ///
    /// # Errors
    /// [`InsertError`]; nothing is stored and no existing flow is touched
    /// (except by early drop, which evicts only not-yet-assured flows).
    pub fn insert(&self, flow: &NewFlow, now: u32) -> Result<Inserted, InsertError> {
        if flow.orig == flow.reply || flow.orig.proto != flow.reply.proto {
            return Err(InsertError::InvalidTuple);
        }
        let o = self.hash(&flow.orig);
        if let Some((i, m, r)) = self.find(&o) {
            return Ok(Inserted::Existing(Self::view(i, m, &r)));
        }
        self.insert_absent(InsertArgs { flow, orig: &o, reply: None, now, first: None, next_reply_port: &mut || None })
    }

    /// [`FlowTable::insert`] for a caller whose lookup of `flow.orig` has
    /// just missed, such as the fast path's first packet of a flow: the
    /// table does not look the tuple up again first. It is still an
    /// insert-if-absent: a flow that another worker stored meanwhile is
    /// found when the original slot is claimed, and comes back as
    /// `Existing` (but as `Full` when the table is at capacity: room is
    /// reserved first).
    ///
    /// `first` is the packet whose lookup missed. It is recorded on the
    /// flow it belongs to exactly as [`FlowTable::touch`] would record it
    /// (counters, last seen, state), so the caller does not touch the flow
    /// again: a new flow's slot is written with it (two atomic additions
    /// fewer per new flow), an existing flow is touched here. Nothing is
    /// recorded when the insert fails.
    ///
    /// `next_reply_port` is the SNAT port allocator's search: when the
    /// reply tuple is taken by another flow, the reply's destination port
    /// becomes the next port it yields, and the claim is retried; `None`
    /// ends the search with [`InsertError::ReplyTaken`]. The original
    /// tuple's slot stays claimed meanwhile, so a retry costs one claim of
    /// the reply tuple, not a whole insert. The stored reply tuple is the
    /// returned view's [`FlowView::peer`].
    ///
    /// # Errors
    /// As [`FlowTable::insert`].
    pub fn insert_missed(
        &self,
        flow: &NewFlow,
        now: u32,
        first: FirstPacket,
        next_reply_port: impl FnMut() -> Option<u16>,
    ) -> Result<Inserted, InsertError> {
        let (orig, reply) = (self.hash(&flow.orig), self.hash(&flow.reply));
        self.insert_missed_hashed(flow, [&orig, &reply], now, first, next_reply_port)
    }

    /// [`FlowTable::insert_missed`] with the hashes of `flow.orig` and
    /// `flow.reply` from [`FlowTable::hash`] of this table, which a batch
    /// has computed already to prefetch (a new flow's two hashes are about
    /// 80 instructions). Hashes of other tuples, or from another table,
    /// would store the flow where lookups do not find it (checked in debug
    /// builds only).
    ///
    /// # Errors
    /// As [`FlowTable::insert`].
    pub fn insert_missed_hashed(
        &self,
        flow: &NewFlow,
        [orig, reply]: [&KeyHash; 2],
        now: u32,
        first: FirstPacket,
        mut next_reply_port: impl FnMut() -> Option<u16>,
    ) -> Result<Inserted, InsertError> {
        if flow.orig == flow.reply || flow.orig.proto != flow.reply.proto {
            return Err(InsertError::InvalidTuple);
        }
        debug_assert!(orig.words == flow.orig.to_words() && orig.hash == self.hash_words(&orig.words));
        debug_assert!(reply.words == flow.reply.to_words() && reply.hash == self.hash_words(&reply.words));
        let args = InsertArgs {
            flow,
            orig,
            reply: Some(reply),
            now,
            first: Some(first),
            next_reply_port: &mut next_reply_port,
        };
        let result = self.insert_absent(args);
        if let Ok(Inserted::Existing(v)) = &result {
            self.touch(v, now, first.bytes, first.tcp_flags);
        }
        result
    }

    fn insert_absent(&self, args: InsertArgs<'_>) -> Result<Inserted, InsertError> {
        self.reserve(self.home(args.orig.hash))?;
        let result = self.insert_reserved(args);
        if !matches!(result, Ok(Inserted::New(_))) {
            self.len.0.fetch_sub(1, Relaxed);
        }
        result
    }

    fn insert_reserved(&self, args: InsertArgs<'_>) -> Result<Inserted, InsertError> {
        let InsertArgs { flow, orig: o, reply: reply_hash, now, first, next_reply_port } = args;
        let oc = match self.claim(&o.words, o.hash, Dir::Original, None)? {
            ClaimResult::Found(v) => return Ok(Inserted::Existing(v)),
            ClaimResult::Claimed(c) => c,
        };
        // The original tuple stays claimed while the reply's port moves; a
        // port whose reply tuple would be the original tuple is skipped. At
        // most one try per port. The first try is `flow.reply` itself,
        // whose hash the caller may have given; later tries have other
        // ports, hashed from the words of the one before.
        let mut r = reply_hash.copied().unwrap_or_else(|| self.hash(&flow.reply));
        let mut claimed = None;
        for _ in 0..=u16::MAX {
            if !same_key(&r.words, &o.words) {
                // A closed TCP flow that holds the tuple gives it up: one
                // removal, then one more claim of the same tuple.
                let mut claim = self.claim(&r.words, r.hash, Dir::Reply, Some(oc.slot));
                if let Ok(ClaimResult::Found(v)) = &claim
                    && self.remove_if_closed(v)
                {
                    self.stats.closed_reused.fetch_add(1, Relaxed);
                    claim = self.claim(&r.words, r.hash, Dir::Reply, Some(oc.slot));
                }
                match claim {
                    Ok(ClaimResult::Claimed(c)) => {
                        claimed = Some((r, c));
                        break;
                    }
                    Ok(ClaimResult::Found(_)) => {}
                    Err(e) => {
                        self.release(oc);
                        return Err(e);
                    }
                }
            }
            match next_reply_port() {
                Some(port) => r = self.hash_with_dport(&r, port),
                None => break,
            }
        }
        let Some((r, rc)) = claimed else {
            self.release(oc);
            return Err(InsertError::ReplyTaken);
        };
        let mut state = StateWord::new(flow.state);
        let (mut packets, mut bytes) = (0, 0);
        if let Some(p) = first {
            state = advance(state, Dir::Original, p.tcp_flags);
            if self.config.accounting {
                (packets, bytes) = (1, p.bytes);
            }
        }
        let packed = o.packed.zip(r.packed);
        let (orig_delta, reply_delta) = match packed {
            Some((po, pr)) => nat_deltas_v4(po, pr, o.words[4], r.words[4]),
            None => nat_deltas(&o.words, &r.words),
        };
        let compact = packed.is_some();
        let orig =
            Half { key: &o.words, peer: &r.words, packed, nat_delta: orig_delta, peer_slot: rc.slot, packets, bytes };
        let reply = Half {
            key: &r.words,
            peer: &o.words,
            packed: packed.map(|(o, r)| (r, o)),
            nat_delta: reply_delta,
            peer_slot: oc.slot,
            packets: 0,
            bytes: 0,
        };
        self.fill(&oc, &orig, flow, now, state);
        self.fill(&rc, &reply, flow, now, state);
        self.slots[rc.slot].meta.store(rc.meta.next(KIND_FULL).with_compact(compact).0, Release);
        let full = oc.meta.next(KIND_FULL).with_compact(compact);
        self.slots[oc.slot].meta.store(full.0, Release);
        Ok(Inserted::New(FlowView {
            dir: Dir::Original,
            peer: [r.words[0], r.words[1], r.words[2], r.words[3], stored_ports(r.words[4], flow.service)],
            proto: flow.orig.proto.0,
            nat_delta: orig_delta,
            backend: flow.backend,
            service: flow.service,
            slot: oc.slot as u32,
            generation: full.generation(),
            peer_slot: rc.slot as u32,
        }))
    }

    /// Reserves room for one flow, early-dropping once if allowed.
    fn reserve(&self, home: usize) -> Result<(), InsertError> {
        for attempt in 0..2 {
            if self.len.0.fetch_add(1, Relaxed) < self.capacity {
                return Ok(());
            }
            self.len.0.fetch_sub(1, Relaxed);
            if attempt == 0 && !(self.config.early_drop && self.early_drop(home)) {
                break;
            }
        }
        self.stats.full.fetch_add(1, Relaxed);
        Err(InsertError::Full)
    }

    /// Evicts the least recently seen not-assured flow among the slots near
    /// `start`. Returns whether one was evicted.
    fn early_drop(&self, start: usize) -> bool {
        let mut victim: Option<(usize, Meta, u32)> = None;
        let mut i = start;
        for _ in 0..EARLY_DROP_SCAN.min(self.n) {
            let s = &self.slots[i];
            let m = Meta(s.meta.load(Acquire));
            if m.kind() == KIND_FULL && m.dir() == Dir::Original {
                let state = StateWord(s.state.load(Relaxed)).state();
                let seen = s.last_seen.load(Relaxed);
                if !state.is_assured() && victim.is_none_or(|(_, _, v)| seen < v) {
                    victim = Some((i, m, seen));
                }
            }
            i = self.next(i);
        }
        match victim {
            Some((i, m, _)) if self.remove_flow_at(i, m) => {
                self.stats.early_drops.fetch_add(1, Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Removes the TCP flow that `v` (either direction) belongs to if it
    /// has closed: FIN both ways (TIME_WAIT) or a reset (CLOSE). A new flow
    /// that needs one of its tuples takes it at once instead of waiting
    /// out the closed flow's timeout, as Linux's NAT does when it picks a
    /// source port. Returns whether the flow was removed here; false when
    /// it is open, not TCP, or changed meanwhile.
    fn remove_if_closed(&self, v: &FlowView) -> bool {
        if v.proto != Proto::TCP.0 {
            return false;
        }
        let i = match v.dir {
            Dir::Original => v.slot,
            Dir::Reply => v.peer_slot,
        } as usize;
        let Some(s) = self.slots.get(i) else {
            return false;
        };
        let m = Meta(s.meta.load(Acquire));
        if m.kind() != KIND_FULL || m.dir() != Dir::Original {
            return false;
        }
        if !matches!(StateWord(s.state.load(Acquire)).state(), FlowState::Tcp(TcpState::TimeWait | TcpState::Close)) {
            return false;
        }
        let same_flow = match v.dir {
            Dir::Original => m.generation() == v.generation,
            Dir::Reply => self.read_record(i, m).is_some_and(|r| r.key == v.peer_words()),
        };
        same_flow && self.remove_flow_at(i, m)
    }

    /// Removes the flow whose original slot is `i`, read as `m`. Returns
    /// false when the slot changed meanwhile (someone else removed it).
    fn remove_flow_at(&self, i: usize, m: Meta) -> bool {
        let Some(rec) = self.read_record(i, m) else {
            return false;
        };
        let busy = m.next(KIND_BUSY);
        if self.slots[i].meta.compare_exchange(m.0, busy.0, AcqRel, Relaxed).is_err() {
            return false;
        }
        // We own the original slot; only its owner removes the reply slot.
        let reply = rec.peer_words();
        let p = rec.peer_slot as usize;
        if p < self.n {
            loop {
                let pm = Meta(self.slots[p].meta.load(Acquire));
                if pm.kind() != KIND_FULL || pm.dir() != Dir::Reply {
                    break;
                }
                match self.read_record(p, pm) {
                    None => continue,
                    Some(pr) if pr.key != reply => break,
                    Some(_) => {
                        let pbusy = pm.next(KIND_BUSY);
                        if self.slots[p].meta.compare_exchange(pm.0, pbusy.0, AcqRel, Relaxed).is_ok() {
                            self.finish_remove(p, &reply, pbusy);
                            break;
                        }
                    }
                }
            }
        }
        self.finish_remove(i, &rec.key, busy);
        self.len.0.fetch_sub(1, Relaxed);
        true
    }

    fn finish_remove(&self, i: usize, key: &[u64; 5], busy: Meta) {
        let home = self.home(self.hash_words(key));
        let dist = if i >= home { i - home } else { i + self.n - home };
        self.release(Claim { slot: i, meta: busy, home, dist });
    }

    /// Removes the flow that `key` (either direction) belongs to.
    pub fn remove(&self, key: &FlowKey) -> bool {
        loop {
            let h = self.hash(key);
            let Some((i, m, r)) = self.find(&h) else {
                return false;
            };
            let (oi, om) = match m.dir() {
                Dir::Original => (i, m),
                Dir::Reply => {
                    let oi = r.peer_slot as usize;
                    let om = Meta(self.slots[oi].meta.load(Acquire));
                    let orig = r.peer_words();
                    match self.read_record(oi, om) {
                        Some(or) if om.kind() == KIND_FULL && or.key == orig => (oi, om),
                        Some(_) => return false,
                        None => continue,
                    }
                }
            };
            if self.remove_flow_at(oi, om) {
                return true;
            }
            // Lost a race with another remover or a writer: look again.
        }
    }

    /// Records a packet of the flow direction `v`: last-seen time, counters
    /// (with [`Config::accounting`]), and the state transition its TCP
    /// `flags` cause. Returns the flow's state after the packet, or `None`
    /// if the flow is gone meanwhile.
    ///
    /// Counters use relaxed atomic adds: exact, never torn.
    #[inline(always)]
    pub fn touch(&self, v: &FlowView, now: u32, bytes: u64, flags: u8) -> Option<FlowState> {
        let s = &self.slots[v.slot as usize];
        let m = Meta(s.meta.load(Relaxed));
        if m.kind() != KIND_FULL || m.generation() != v.generation {
            return None;
        }
        if s.last_seen.load(Relaxed) != now {
            s.last_seen.store(now, Relaxed);
        }
        if let Some(counters) = &self.counters {
            counters[v.slot as usize].packets.fetch_add(1, Relaxed);
            counters[v.slot as usize].bytes.fetch_add(bytes, Relaxed);
        }
        let cur = StateWord(s.state.load(Relaxed));
        let next = advance(cur, v.dir, flags);
        if next == cur {
            return Some(cur.state());
        }
        let after = self.advance_state(v.slot as usize, v.peer_slot as usize, v.dir, v.peer_words(), flags);
        Some(after.unwrap_or(next).state())
    }

    /// Applies a transition on the authoritative (original) slot and mirrors
    /// it to the other one. `slot`, `p` (its peer slot) and `dir` are a
    /// view's, and `peer_key` its peer's key words.
    ///
    /// Out of line, and given no reference to the view: a view the caller
    /// has in registers stays there. (With `&FlowView` here, the fast path
    /// kept every established packet's view in memory for this rare call:
    /// about 20 stores and the loads after them, 30 instructions of 508.)
    #[inline(never)]
    fn advance_state(&self, slot: usize, p: usize, dir: Dir, peer_key: [u64; 5], flags: u8) -> Option<StateWord> {
        let own = &self.slots[slot];
        let peer = self.slots.get(p)?;
        // The peer must still be this flow's other half.
        let pm = Meta(peer.meta.load(Acquire));
        let pr = self.read_record(p, pm)?;
        if pm.kind() != KIND_FULL || pr.key != peer_key {
            return None;
        }
        let (auth, mirror) = match dir {
            Dir::Original => (own, peer),
            Dir::Reply => (peer, own),
        };
        let mut cur = auth.state.load(Acquire);
        loop {
            let next = advance(StateWord(cur), dir, flags).0;
            if next == cur {
                break;
            }
            match auth.state.compare_exchange_weak(cur, next, AcqRel, Acquire) {
                Ok(_) => {
                    cur = next;
                    break;
                }
                Err(actual) => cur = actual,
            }
        }
        mirror.state.store(cur, Release);
        Some(StateWord(cur))
    }

    /// The state of the flow `v` belongs to, read from its original slot.
    pub fn state(&self, v: &FlowView) -> FlowState {
        let i = match v.dir {
            Dir::Original => v.slot,
            Dir::Reply => v.peer_slot,
        };
        let s = self.slots.get(i as usize).unwrap_or(&self.slots[v.slot as usize]);
        StateWord(s.state.load(Acquire)).state()
    }

    /// A consistent description of the flow whose original slot is `i`.
    fn info_at(&self, i: usize) -> Option<(Meta, FlowInfo)> {
        loop {
            let s = &self.slots[i];
            let m = Meta(s.meta.load(Acquire));
            if m.kind() != KIND_FULL || m.dir() != Dir::Original {
                return None;
            }
            let Some(r) = self.read_record(i, m) else { continue };
            let pls = self.slots.get(r.peer_slot as usize).map_or(0, |p| p.last_seen.load(Relaxed));
            let count = |j: usize| {
                let c = self.counters.as_ref().and_then(|c| c.get(j));
                c.map_or((0, 0), |c| (c.packets.load(Relaxed), c.bytes.load(Relaxed)))
            };
            let ((op, ob), (pp, pb)) = (count(i), count(r.peer_slot as usize));
            return Some((
                m,
                FlowInfo {
                    orig: FlowKey::from_words(&r.key),
                    reply: FlowKey::from_words(&r.peer_words()),
                    backend: r.backend,
                    service: r.service(),
                    state: StateWord(s.state.load(Acquire)).state(),
                    last_seen: s.last_seen.load(Relaxed).max(pls),
                    packets: [op, pp],
                    bytes: [ob, pb],
                },
            ));
        }
    }

    /// Removes expired flows among `budget` slots from `*cursor`, advancing
    /// the cursor (wrapping), so a sweeper can spread a pass over time.
    /// Returns how many flows expired.
    pub fn sweep(&self, now: u32, cursor: &mut usize, budget: usize) -> usize {
        let timeouts = &self.config.timeouts;
        let mut expired = 0;
        let mut i = *cursor % self.n;
        for _ in 0..budget.min(self.n) {
            if let Some((m, info)) = self.info_at(i) {
                let idle = now.saturating_sub(info.last_seen);
                if idle >= timeouts.for_state(info.state) && self.remove_flow_at(i, m) {
                    expired += 1;
                }
            }
            i = self.next(i);
        }
        *cursor = i;
        self.stats.expired.fetch_add(expired as u64, Relaxed);
        expired
    }

    /// One full sweep pass. Returns how many flows expired.
    pub fn sweep_all(&self, now: u32) -> usize {
        let mut cursor = 0;
        self.sweep(now, &mut cursor, self.n)
    }

    /// Removes every flow for which `pred` is true, e.g. all UDP flows to a
    /// removed endpoint, or all flows of a deleted service. Returns how many.
    pub fn flush(&self, mut pred: impl FnMut(&FlowInfo) -> bool) -> usize {
        let mut removed = 0;
        for i in 0..self.n {
            if let Some((m, info)) = self.info_at(i)
                && pred(&info)
                && self.remove_flow_at(i, m)
            {
                removed += 1;
            }
        }
        self.stats.flushed.fetch_add(removed as u64, Relaxed);
        removed
    }

    /// Visits every flow without collecting them (for counts over a large
    /// table: `xskgate status`). Not for the hot path.
    pub fn for_each(&self, mut f: impl FnMut(&FlowInfo)) {
        for i in 0..self.n {
            if let Some((_, info)) = self.info_at(i) {
                f(&info);
            }
        }
    }

    /// The whole flow a lookup found (either direction), for diagnostics
    /// (`xskgate explain --gateway`); `None` if it went away since.
    pub fn info(&self, v: &FlowView) -> Option<FlowInfo> {
        let original = if v.dir == Dir::Original { v.slot } else { v.peer_slot };
        self.info_at(original as usize).map(|(_, f)| f)
    }

    /// Every flow, for diagnostics and tests. Allocates; not for the hot path.
    pub fn flows(&self) -> Vec<FlowInfo> {
        (0..self.n).filter_map(|i| self.info_at(i).map(|(_, f)| f)).collect()
    }

    /// Checks the structural invariants of a quiescent table (no concurrent
    /// writers): every original slot has its reply slot and back, no key is
    /// stored twice, every key is found by lookup, overflow counts equal a
    /// recount, and `len` equals the flows stored.
    ///
    /// # Errors
    /// A description of the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        let mut overflow = vec![0u32; self.n];
        let mut originals = 0;
        for i in 0..self.n {
            let m = Meta(self.slots[i].meta.load(Acquire));
            match m.kind() {
                KIND_EMPTY if self.hints[i].0.load(Acquire) & !HINT_OVERFLOW != 0 => {
                    return Err(format!("slot {i} is empty but hinted"));
                }
                KIND_EMPTY => continue,
                KIND_FULL => {}
                _ => return Err(format!("slot {i} is busy in a quiescent table")),
            }
            let r = self.read_record(i, m).ok_or("slot changed during check")?;
            if !seen.insert(r.key) {
                return Err(format!("key {:?} stored twice", FlowKey::from_words(&r.key)));
            }
            let key_hash = self.key_hash(r.key);
            let hash = key_hash.hash;
            let hint = self.hints[i].0.load(Acquire);
            if m.tag() != tag_of(hash) || hint & !HINT_OVERFLOW != HINT_OCCUPIED | u32::from(tag_of(hash)) << 16 {
                return Err(format!("slot {i}: tag or hint does not match its key"));
            }
            match self.find(&key_hash) {
                Some((j, _, _)) if j == i => {}
                other => return Err(format!("slot {i}: lookup finds {:?}", other.map(|o| o.0))),
            }
            let home = self.home(hash);
            let mut j = home;
            while j != i {
                overflow[j] += 1;
                j = self.next(j);
            }
            let p = r.peer_slot as usize;
            let pm = Meta(self.slots.get(p).ok_or("peer slot out of range")?.meta.load(Acquire));
            let pr = self.read_record(p, pm).ok_or("peer changed during check")?;
            if pm.kind() != KIND_FULL || pm.dir() == m.dir() || pr.key != r.peer_words() || pr.peer_slot as usize != i {
                return Err(format!("slot {i}: peer slot {p} is not its other half"));
            }
            if m.dir() == Dir::Original {
                originals += 1;
            }
        }
        for (i, want) in overflow.iter().enumerate() {
            let have = self.hints[i].0.load(Acquire) & HINT_OVERFLOW;
            if have != *want {
                return Err(format!("slot {i}: overflow count {have}, recount {want}"));
            }
        }
        if originals != self.len() {
            return Err(format!("len {} but {originals} flows stored", self.len()));
        }
        Ok(())
    }
}

enum ClaimResult {
    Found(FlowView),
    Claimed(Claim),
}

/// A slot this worker holds `BUSY`, with the probe path that leads to it.
#[derive(Clone, Copy)]
struct Claim {
    slot: usize,
    meta: Meta,
    home: usize,
    dist: usize,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::key::Proto;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    proptest! {
        /// Packing a key's IPv4 addresses loses nothing, and only keys whose
        /// addresses are both IPv4-mapped are packed.
        #[test]
        fn packed_addresses_unpack_to_the_key(src: [u8; 16], dst: [u8; 16], v4: bool, ports: u32) {
            let (src, dst) = if v4 {
                (Ipv4Addr::from(src[0..4].try_into().map(u32::from_be_bytes).unwrap()).to_ipv6_mapped().octets(),
                 Ipv4Addr::from(dst[0..4].try_into().map(u32::from_be_bytes).unwrap()).to_ipv6_mapped().octets())
            } else {
                (src, dst)
            };
            let key = FlowKey::new(Proto::UDP, Ipv6Addr::from(src), ports as u16, Ipv6Addr::from(dst), (ports >> 16) as u16);
            let w = key.to_words();
            let mapped = |a: [u8; 16]| Ipv6Addr::from(a).to_ipv4_mapped().is_some();
            prop_assert_eq!(pack_v4(&w).is_some(), mapped(src) && mapped(dst));
            if let Some(packed) = pack_v4(&w) {
                prop_assert_eq!(unpack_v4(packed), [w[0], w[1], w[2], w[3]]);
            }
        }
    }

    proptest! {
        /// The packed IPv4 deltas are bit for bit the 16-byte ones, with
        /// each address and the ports changed or not (`same` picks which
        /// fields the rewrite leaves alone).
        #[test]
        fn packed_ipv4_deltas_equal_the_wide_ones(a: [u32; 4], p: [u16; 4], same: [bool; 3]) {
            let ip = |x: u32| Ipv4Addr::from(x);
            let orig = FlowKey::new(Proto::TCP, ip(a[0]), p[0], ip(a[1]), p[1]);
            // The original is rewritten to the reply's reverse: reply.dst
            // replaces orig.src, reply.src replaces orig.dst.
            let new_src = if same[0] { a[0] } else { a[2] };
            let new_dst = if same[1] { a[1] } else { a[3] };
            let (new_sport, new_dport) = if same[2] { (p[0], p[1]) } else { (p[2], p[3]) };
            let reply = FlowKey::new(Proto::TCP, ip(new_dst), new_dport, ip(new_src), new_sport);
            let (o, r) = (orig.to_words(), reply.to_words());
            let (po, pr) = (pack_v4(&o).unwrap(), pack_v4(&r).unwrap());
            prop_assert_eq!(nat_deltas_v4(po, pr, o[4], r[4]), nat_deltas(&o, &r));
        }
    }

    /// A flow between an IPv4 client and an IPv6 endpoint is stored wide on
    /// both sides, an IPv4 flow compact, and a compact slot does not accept
    /// an IPv6 key that shares its IPv4 key's packed words.
    #[test]
    fn compact_and_wide_slots_are_told_apart() {
        let table = FlowTable::new(Config { capacity: 64, seed: Some(7), ..Config::default() }).unwrap();
        let client = Ipv4Addr::new(198, 18, 0, 10);
        let vip = Ipv4Addr::new(198, 18, 1, 1);
        let v4 = NewFlow {
            orig: FlowKey::new(Proto::TCP, client, 40000, vip, 80),
            reply: FlowKey::new(Proto::TCP, Ipv4Addr::new(198, 19, 0, 5), 8080, Ipv4Addr::new(198, 18, 0, 1), 61000),
            backend: 1,
            service: 2,
            state: FlowState::Udp { replied: false },
        };
        let pod6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let gw6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mixed = NewFlow {
            orig: FlowKey::new(Proto::TCP, client, 40001, vip, 80),
            reply: FlowKey::new(Proto::TCP, pod6, 8080, gw6, 61001),
            ..v4
        };
        for flow in [v4, mixed] {
            assert!(matches!(table.insert(&flow, 0), Ok(Inserted::New(_))));
        }
        let compact = |k: &FlowKey| {
            let v = table.lookup(k).unwrap();
            Meta(table.slots[v.slot as usize].meta.load(Relaxed)).compact()
        };
        assert!(compact(&v4.orig) && compact(&v4.reply));
        assert!(!compact(&mixed.orig) && !compact(&mixed.reply));
        assert_eq!(table.lookup(&mixed.orig).unwrap().rewrite(), mixed.reply.reversed());
        assert_eq!(table.lookup(&mixed.reply).unwrap().rewrite(), mixed.orig.reversed());
        assert_eq!(table.lookup(&v4.reply).unwrap().rewrite(), v4.orig.reversed());
        // The IPv6 key whose second and fourth words equal an IPv4 key's.
        let mut src = client.to_ipv6_mapped().octets();
        src[0] = 0x20;
        let lookalike = FlowKey::new(Proto::TCP, Ipv6Addr::from(src), 40000, vip.to_ipv6_mapped(), 80);
        let slot = &table.slots[table.lookup(&v4.orig).unwrap().slot as usize];
        let meta = Meta(slot.meta.load(Relaxed));
        let wide = &table.wide[table.lookup(&v4.orig).unwrap().slot as usize];
        assert!(matches!(FlowTable::read_if_key(slot, wide, meta, &table.hash(&lookalike)), Some(None)));
        assert!(matches!(FlowTable::read_if_key(slot, wide, meta, &table.hash(&v4.orig)), Some(Some(_))));
        let mut flows = table.flows();
        flows.sort_by_key(|f| f.orig.sport);
        assert_eq!(
            flows.iter().map(|f| (f.orig, f.reply)).collect::<Vec<_>>(),
            [(v4.orig, v4.reply), (mixed.orig, mixed.reply)]
        );
        table.check_invariants().unwrap();
        assert!(table.remove(&v4.reply) && table.remove(&mixed.orig));
        table.check_invariants().unwrap();
        assert!(table.is_empty());
    }

    /// The next SNAT port's reply tuple hashed from the words of the one
    /// before is the tuple's own hash, for IPv4 and IPv6 keys.
    #[test]
    fn hash_with_dport_is_the_hash_of_the_tuple_with_that_port() {
        let table = FlowTable::new(Config { capacity: 64, seed: Some(7), ..Config::default() }).unwrap();
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let keys = [
            FlowKey::new(Proto::TCP, Ipv4Addr::new(198, 19, 0, 9), 8080, Ipv4Addr::new(198, 18, 0, 1), 1024),
            FlowKey::new(Proto::UDP, v6, 53, "2001:db8::1".parse::<Ipv6Addr>().unwrap(), 65535),
        ];
        for key in keys {
            for port in [0, 1, 1025, 40000, 65535] {
                let moved = table.hash_with_dport(&table.hash(&key), port);
                let own = table.hash(&FlowKey { dport: port, ..key });
                assert_eq!(
                    (moved.words, moved.hash, moved.packed),
                    (own.words, own.hash, own.packed),
                    "{key:?} to {port}"
                );
            }
        }
    }

    /// An IPv4 key's hash (from its packed addresses) spreads keys that
    /// differ in one field only over homes and tags as random values
    /// would, and is the hash every path computes (`hash_words`).
    #[test]
    fn ipv4_keys_that_differ_in_one_field_spread_over_homes_and_tags() {
        let table = FlowTable::new(Config { capacity: 1 << 14, seed: Some(7), ..Config::default() }).unwrap();
        let (client, vip) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 19, 0, 1));
        let by_port = (0..8192u16).map(|p| FlowKey::new(Proto::TCP, client, 1024 + p, vip, 80));
        let by_client = (0..8192u32).map(|c| FlowKey::new(Proto::TCP, Ipv4Addr::from(0xC612_0000 + c), 40000, vip, 80));
        let by_service =
            (0..8192u32).map(|c| FlowKey::new(Proto::UDP, client, 40000, Ipv4Addr::from(0xC613_0000 + c), 53));
        for (what, keys) in
            [("port", by_port.collect::<Vec<_>>()), ("client", by_client.collect()), ("service", by_service.collect())]
        {
            let mut homes = std::collections::HashSet::new();
            let mut tags = std::collections::HashSet::new();
            for k in &keys {
                let h = table.hash(k);
                assert!(h.packed.is_some());
                assert_eq!(h.hash, table.hash_words(&k.to_words()));
                homes.insert(table.home(h.hash));
                tags.insert(tag_of(h.hash));
            }
            // 8,192 random values: about 7,440 distinct of 40,960 homes,
            // and about 7,260 distinct of 32,768 tags.
            assert!(homes.len() > 7_200, "{what}: {} distinct homes of {}", homes.len(), table.n);
            assert!(tags.len() > 7_000, "{what}: {} distinct tags", tags.len());
        }
    }

    /// A table file in a fresh temporary directory (removed on drop).
    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(name: &str) -> TempFile {
            let dir = std::env::temp_dir().join(format!("xskgate-ct-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempFile(dir.join("conntrack"))
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    /// `count` Cluster flows (SNAT to the gateway, ports from 61000), every
    /// third one IPv6.
    fn snat_flows(count: u16) -> Vec<NewFlow> {
        (0..count)
            .map(|i| {
                let (client, vip, pod, gw): (Addr, Addr, Addr, Addr) = if i % 3 == 2 {
                    let a = |s: &str| s.parse::<Ipv6Addr>().unwrap().into();
                    (a("2001:db8::10"), a("2001:db8:1::1"), a("2001:db8:2::5"), a("2001:db8::1"))
                } else {
                    let a = |o: u8| Ipv4Addr::new(198, 18, o, 1 + o).into();
                    (a(0), a(1), a(2), a(3))
                };
                NewFlow {
                    orig: FlowKey::new(Proto::TCP, client, 30000 + i, vip, 80),
                    reply: FlowKey::new(Proto::TCP, pod, 8080, gw, 61000 + i),
                    backend: u32::from(i % 5),
                    service: 1,
                    state: FlowState::Tcp(TcpState::Established),
                }
            })
            .collect()
    }

    /// A table reopened from its file has every flow, found by either
    /// tuple with the same translation, the same clock, and passes the
    /// invariants; a new flow goes in beside them.
    #[test]
    fn a_table_file_reopened_resumes_every_flow() {
        let f = TempFile::new("resume");
        let config = Config { capacity: 300, ..Config::default() };
        let flows = snat_flows(200);
        let (epoch, seen) = {
            let (t, resume) = FlowTable::open_file(config.clone(), &f.0).unwrap();
            assert_eq!(resume, crate::persist::Resume::Created);
            for (i, fl) in flows.iter().enumerate() {
                assert!(matches!(t.insert(fl, i as u32), Ok(Inserted::New(_))));
            }
            (t.epoch(), t.lookup(&flows[7].orig).map(|v| t.info(&v).unwrap().last_seen))
        };
        let (t, resume) = FlowTable::open_file(config, &f.0).unwrap();
        assert_eq!(resume, crate::persist::Resume::Resumed { flows: 200, dropped: 0 });
        assert_eq!(t.len(), 200);
        t.check_invariants().unwrap();
        let drift = t.epoch().max(epoch) - t.epoch().min(epoch);
        assert!(drift < std::time::Duration::from_millis(5), "the clock moved by {drift:?}");
        for fl in &flows {
            let back = t.lookup(&fl.reply).expect("the reply tuple");
            assert_eq!(back.rewrite(), fl.orig.reversed());
            assert_eq!(t.lookup(&fl.orig).unwrap().rewrite(), fl.reply.reversed());
            assert_eq!(back.backend, fl.backend);
        }
        assert_eq!(t.lookup(&flows[7].orig).map(|v| t.info(&v).unwrap().last_seen), seen);
        let more = snat_flows(201)[200];
        assert!(matches!(t.insert(&more, 9), Ok(Inserted::New(_))));
        assert!(matches!(t.insert(&flows[3], 9), Ok(Inserted::Existing(_))), "no duplicate of a resumed flow");
        t.check_invariants().unwrap();
    }

    /// What a process killed mid-write leaves (a slot `BUSY`, a flow with
    /// one direction) is dropped on reopening, and only that.
    #[test]
    fn a_half_written_flow_is_dropped_on_reopening() {
        let f = TempFile::new("torn");
        let config = Config { capacity: 300, ..Config::default() };
        let flows = snat_flows(100);
        {
            let (t, _) = FlowTable::open_file(config.clone(), &f.0).unwrap();
            for fl in &flows {
                t.insert(fl, 1).unwrap();
            }
            // Flow 10: its original slot caught mid-write. Flow 20: its
            // reply slot gone (emptied), the original left pointing at it.
            let o = t.lookup(&flows[10].orig).unwrap().slot as usize;
            let m = Meta(t.slots[o].meta.load(Relaxed));
            t.slots[o].meta.store(m.next(KIND_BUSY).0, Relaxed);
            let r = t.lookup(&flows[20].reply).unwrap().slot as usize;
            let m = Meta(t.slots[r].meta.load(Relaxed));
            t.slots[r].meta.store(m.next(KIND_EMPTY).0, Relaxed);
        }
        let (t, resume) = FlowTable::open_file(config, &f.0).unwrap();
        assert_eq!(resume, crate::persist::Resume::Resumed { flows: 98, dropped: 2 });
        t.check_invariants().unwrap();
        for (i, fl) in flows.iter().enumerate() {
            let gone = i == 10 || i == 20;
            assert_eq!(t.lookup(&fl.orig).is_none(), gone, "flow {i}");
            assert_eq!(t.lookup(&fl.reply).is_none(), gone, "flow {i}");
        }
        // Their tuples are free again.
        assert!(matches!(t.insert(&flows[10], 2), Ok(Inserted::New(_))));
        assert!(matches!(t.insert(&flows[20], 2), Ok(Inserted::New(_))));
        t.check_invariants().unwrap();
    }

    /// A file of another capacity, with a corrupt header, or not a table
    /// file at all, is replaced by an empty table and the reason named.
    #[test]
    fn a_file_that_does_not_fit_is_replaced_with_its_reason() {
        use crate::persist::Resume;
        let f = TempFile::new("replace");
        let config = Config { capacity: 300, ..Config::default() };
        let fill = |t: &FlowTable| {
            for fl in snat_flows(10) {
                t.insert(&fl, 1).unwrap();
            }
        };
        fill(&FlowTable::open_file(config.clone(), &f.0).unwrap().0);
        let reason = |r: Resume| match r {
            Resume::Replaced { reason } => reason,
            other => panic!("not replaced: {other:?}"),
        };
        let (t, r) = FlowTable::open_file(Config { capacity: 400, ..config.clone() }, &f.0).unwrap();
        assert!(reason(r).contains("capacity 300 flows, asked for 400"));
        assert!(t.is_empty());
        fill(&t);
        drop(t);
        let mut bytes = std::fs::read(&f.0).unwrap();
        bytes[30] ^= 0xff;
        std::fs::write(&f.0, &bytes).unwrap();
        let (t, r) = FlowTable::open_file(Config { capacity: 400, ..config.clone() }, &f.0).unwrap();
        assert!(reason(r).contains("checksum"));
        assert!(t.is_empty() && t.lookup(&snat_flows(1)[0].orig).is_none());
        drop(t);
        std::fs::write(&f.0, b"hello").unwrap();
        let (t, r) = FlowTable::open_file(config, &f.0).unwrap();
        assert!(reason(r).contains("shorter than a header"));
        t.check_invariants().unwrap();
    }

    /// A second opener waits for the first to let go of the file (a
    /// restarted gateway whose predecessor is still stopping).
    #[test]
    fn a_second_opener_waits_for_the_first() {
        let f = TempFile::new("lock");
        let config = Config { capacity: 64, ..Config::default() };
        let (t, _) = FlowTable::open_file(config.clone(), &f.0).unwrap();
        t.insert(&snat_flows(1)[0], 0).unwrap();
        let started = std::time::Instant::now();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(t);
        });
        let (t2, r) = FlowTable::open_file(config, &f.0).unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(300), "it did not wait");
        assert_eq!(r, crate::persist::Resume::Resumed { flows: 1, dropped: 0 });
        holder.join().unwrap();
        t2.check_invariants().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Whatever bytes of the slot arrays are damaged (a crash, a stray
        /// write), the reopened table holds only whole flows: it passes the
        /// invariants, every flow it finds by one tuple is found by the
        /// other with the reverse translation, and new flows go in.
        #[test]
        fn a_damaged_table_file_reopens_whole(damage in proptest::collection::vec((0usize..1 << 20, any::<u8>()), 1..64)) {
            let f = TempFile::new(&format!("damage-{}", damage[0].0));
            let config = Config { capacity: 300, ..Config::default() };
            let flows = snat_flows(200);
            let slots_at = {
                let (t, _) = FlowTable::open_file(config.clone(), &f.0).unwrap();
                for fl in &flows {
                    t.insert(fl, 1).unwrap();
                }
                t.n
            };
            // The slot and wide arrays start at 2 MiB and 4 MiB (see
            // `persist::Header::offsets`), 64 bytes per slot each.
            let mut bytes = std::fs::read(&f.0).unwrap();
            for &(at, b) in &damage {
                let region = if at % 2 == 0 { 2 << 20 } else { 4 << 20 };
                bytes[region + (at >> 1) % (slots_at * 64)] ^= b | 1;
            }
            std::fs::write(&f.0, &bytes).unwrap();
            let (t, resume) = FlowTable::open_file(config, &f.0).unwrap();
            prop_assert!(matches!(resume, crate::persist::Resume::Resumed { .. }), "{:?}", resume);
            t.check_invariants().map_err(TestCaseError::fail)?;
            for info in t.flows() {
                let there = t.lookup(&info.orig).expect("by its original tuple");
                let back = t.lookup(&info.reply).expect("by its reply tuple");
                prop_assert_eq!(there.rewrite(), info.reply.reversed());
                prop_assert_eq!(back.rewrite(), info.orig.reversed());
            }
            let fresh = NewFlow { orig: FlowKey::new(Proto::UDP, Ipv4Addr::new(198, 18, 9, 9), 1, Ipv4Addr::new(198, 18, 9, 8), 2), ..flows[0] };
            let fresh = NewFlow { reply: fresh.orig.reversed(), state: FlowState::Udp { replied: false }, ..fresh };
            prop_assert!(t.insert(&fresh, 2).is_ok());
            t.check_invariants().map_err(TestCaseError::fail)?;
        }
    }
}
