//! AF_XDP sockets (xsk-rs) and the worker loop around the pure pipeline.
//!
//! A [`Port`] is one socket on one (interface, queue) with its own UMEM.
//! A [`Worker`] owns queue `q` of every interface, so a frame that enters on
//! one interface and leaves by another stays on one thread: it is copied
//! into a free frame of the egress UMEM and sent on that socket.
//!
//! Frame discipline per port: every UMEM frame is in exactly one place —
//! the fill ring, the RX ring, the worker's hands during a batch, the TX
//! ring, the completion ring, or the port's free stack. Received frames
//! that are dropped go back to the free stack; sent frames come back
//! through the completion ring. The free stack keeps a reserve for copies
//! from other ports; the rest is given to the fill ring.
//!
//! Per batch: one load of the service table and of the FIB (arc-swap), no
//! allocation, no lock; system calls only to kick TX (copy mode needs it),
//! to wake the fill ring when the kernel asks, and to sleep when idle.

use super::route::{Fib, Link};
use crate::AffinityTable;
use crate::io::capture::DropCapture;
use crate::nat;
use crate::pipeline::{self, BATCH, Frame, Tables, WorkerState};
use crate::service::{ServiceTable, ServiceTableHandle};
use crate::verdict::Verdict;
use crate::wire;
use arc_swap::ArcSwap;
use std::io::Write;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xsk_rs::config::{BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};
use xskgate_conntrack::{Addr, FlowTable};

/// Frames per UMEM and ring sizes.
const FRAMES: u32 = 4096;
const RING: u32 = 2048;
const FRAME_SIZE: u32 = 2048;
/// Free frames kept back from the fill ring for copies from other ports.
const COPY_RESERVE: usize = 512;
/// Empty rounds before a worker sleeps in `poll()`.
const SPIN_ROUNDS: u32 = 1 << 14;
const IDLE_POLL_MS: i32 = 10;
/// Kicks per port and round (each sends up to 32 frames in copy mode).
const MAX_KICKS: usize = 8;
/// Frames a worker holds while their next hops are resolved, and for how
/// long (the kernel's ARP queue does the same).
const HELD_MAX: usize = 256;
const HELD_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a worker publishes its counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Why a socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IoError(pub String);

macro_rules! io_counters {
    ($($field:ident => $doc:literal;)*) => {
        /// What the I/O layer did, beside the pipeline's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct IoCounters { $(#[doc = $doc] pub $field: u64,)* }

        impl IoCounters {
            /// (name, help, value) of every counter.
            pub fn fields(&self) -> [(&'static str, &'static str, u64); [$(stringify!($field)),*].len()] {
                [$((stringify!($field), $doc, self.$field)),*]
            }
            pub fn add(&mut self, o: &IoCounters) { $(self.$field += o.$field;)* }
        }
    };
}

io_counters! {
    rx_packets => "Frames received from the AF_XDP sockets.";
    tx_packets => "Frames handed to the AF_XDP TX rings.";
    copied_across => "Frames copied into another interface's UMEM to leave by it.";
    routed_unchanged => "Steered frames the pipeline passed (not a Service's), routed on without NAT as the kernel would.";
    passed_ttl_expired => "Dropped: a steered frame the pipeline passed whose TTL or hop limit ran out.";
    no_route => "Dropped: no route to the next hop.";
    neighbor_queued => "Frames held until their next hop's MAC address was resolved (resolution requested).";
    no_neighbor => "Dropped: the next hop's MAC address was not resolved within 1 s, or too many frames were waiting.";
    no_egress_socket => "Dropped: the route leaves by an interface xskgate does not run on.";
    steered_local => "Dropped: a steered frame for this node's own stack that the pipeline did not own.";
    tx_ring_full => "Dropped: the TX ring or the egress UMEM had no room.";
    too_big_sent => "Frames larger than their egress link's MTU answered with fragmentation-needed (IPv4, DF set) or Packet Too Big (IPv6).";
    too_big_fragmentable => "Dropped: an IPv4 frame without DF larger than its egress link's MTU (the kernel would fragment it; xskgate does not).";
    tx_device_dropped => "Dropped by the kernel on TX: the egress device refused a frame (sendto EBUSY, e.g. its queue was full).";
    tx_kick_errors => "TX kicks (sendto) that failed otherwise than busy, e.g. the link is down (the frames stay in the TX ring and are kicked again next round).";
    xsk_rx_dropped => "Dropped by the kernel before the socket: no room in the UMEM (XDP_STATISTICS rx_dropped).";
    xsk_rx_ring_full => "Dropped by the kernel: the socket's RX ring was full (rx_ring_full).";
    xsk_fill_ring_empty => "Times the kernel found the fill ring empty (rx_fill_ring_empty_descs).";
    xsk_invalid_descs => "Invalid RX or TX descriptors (rx_invalid_descs + tx_invalid_descs).";
    busy_polls => "Worker rounds that found frames.";
    idle_polls => "Worker rounds that found none.";
}

/// Counters a worker publishes for the metrics reader.
#[derive(Clone, Debug, Default)]
pub struct WorkerSnapshot {
    pub pipeline: crate::Counters,
    pub io: IoCounters,
}

/// One AF_XDP socket with its UMEM.
pub struct Port {
    pub ifindex: u32,
    pub ifname: String,
    pub queue: u32,
    umem: Umem,
    fill: FillQueue,
    comp: CompQueue,
    tx: TxQueue,
    rx: RxQueue,
    free: Vec<FrameDesc>,
    pending_tx: Vec<FrameDesc>,
    /// The TX ring holds frames the kernel has not taken yet: kick again
    /// next round, even without new frames (see [`Port::kick_tx`]).
    tx_backlog: bool,
}

fn setsockopt_int(fd: i32, opt: i32, v: i32) -> std::io::Result<()> {
    // SAFETY: `fd` is an open socket; the option value is a live i32 of the
    // size passed.
    let r = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&v as *const i32).cast(), std::mem::size_of::<i32>() as u32)
    };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

impl Port {
    /// Opens a socket on `ifname` queue `queue`. The XDP program must not be
    /// loaded by libxdp: ours is attached separately and the socket is put
    /// into its XSKMAP by the caller.
    pub fn open(ifname: &str, ifindex: u32, queue: u32) -> Result<Port, IoError> {
        let size = |n| QueueSize::new(n).expect("power of two");
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).expect("valid frame size"))
            .fill_queue_size(size(RING))
            .comp_queue_size(size(RING))
            .build()
            .map_err(|e| IoError(format!("UMEM config: {e}")))?;
        let (umem, mut descs) = Umem::new(umem_config, NonZeroU32::new(FRAMES).expect("nonzero"), false)
            .map_err(|e| IoError(format!("cannot create the UMEM for {ifname}: {e}")))?;
        let socket_config = SocketConfig::builder()
            .rx_queue_size(size(RING))
            .tx_queue_size(size(RING))
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        let name = ifname.parse().map_err(|e| IoError(format!("interface name {ifname:?}: {e}")))?;
        // SAFETY: the UMEM is new and used by this socket only; it lives in
        // the returned Port as long as the queues.
        let (tx, rx, fq_cq) = unsafe { Socket::new(socket_config, &umem, &name, queue) }
            .map_err(|e| IoError(format!("cannot open an AF_XDP socket on {ifname} queue {queue}: {e}")))?;
        let (mut fill, comp) = fq_cq.ok_or_else(|| IoError("the socket came without fill/completion rings".into()))?;
        let fd = rx.fd().as_raw_fd();
        // Busy-poll options (SO_PREFER_BUSY_POLL, SO_BUSY_POLL, SO_BUSY_POLL_BUDGET):
        // accepted by every driver; they matter on real NICs.
        for (opt, v) in [(69, 1), (46, 20), (70, BATCH as i32)] {
            if let Err(e) = setsockopt_int(fd, opt, v) {
                tracing::debug!(interface = ifname, option = opt, "busy-poll socket option refused: {e}");
            }
        }
        let to_fill = descs.split_off(descs.len() - RING as usize);
        // SAFETY: the frames are fresh from this UMEM and owned by nobody else.
        let filled = unsafe { fill.produce(&to_fill) };
        if filled != to_fill.len() {
            return Err(IoError(format!("the fill ring of {ifname} took {filled} of {} frames", to_fill.len())));
        }
        let mut free = Vec::with_capacity(FRAMES as usize);
        free.extend(descs);
        Ok(Port {
            ifindex,
            ifname: ifname.to_string(),
            queue,
            umem,
            fill,
            comp,
            tx,
            rx,
            free,
            pending_tx: Vec::with_capacity(FRAMES as usize),
            tx_backlog: false,
        })
    }

    /// The socket, for the XSKMAP.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Takes back sent frames.
    fn reclaim(&mut self) {
        let mut done = [FrameDesc::default(); BATCH];
        loop {
            // SAFETY: the completion ring hands back frames of this UMEM that
            // the kernel finished sending.
            let n = unsafe { self.comp.consume(&mut done) };
            self.free.extend_from_slice(&done[..n]);
            if n < BATCH {
                break;
            }
        }
    }

    /// Gives free frames (beyond the copy reserve) to the fill ring.
    fn refill(&mut self) {
        let spare = self.free.len().saturating_sub(COPY_RESERVE);
        let room = self.fill.nb_free(spare as u32) as usize;
        let n = spare.min(room);
        if n > 0 {
            let from = self.free.len() - n;
            // SAFETY: the frames are free (owned by user space, not in any ring).
            let given = unsafe { self.fill.produce(&self.free[from..]) };
            if given == n {
                self.free.truncate(from);
            }
        }
        if self.fill.needs_wakeup() {
            let _ = self.fill.wakeup(self.rx.fd_mut(), 0);
        }
    }

    /// Sends the pending frames (the ring takes all or none), and kicks the
    /// kernel for them and for any backlog of earlier rounds.
    fn flush_tx(&mut self, io: &mut IoCounters) {
        if !self.pending_tx.is_empty() {
            let n = self.pending_tx.len();
            // SAFETY: every pending frame belongs to this UMEM, holds a frame to
            // send and is in no ring.
            let sent = unsafe { self.tx.produce(&self.pending_tx) };
            if sent == n {
                io.tx_packets += n as u64;
                self.tx_backlog = true;
            } else {
                io.tx_ring_full += n as u64;
                self.free.extend_from_slice(&self.pending_tx);
            }
            self.pending_tx.clear();
        }
        if self.tx_backlog {
            self.kick_tx(io);
        }
    }

    /// Kicks the kernel (`sendto`) until the TX ring is empty, at most
    /// [`MAX_KICKS`] times; what is left is kicked again next round
    /// (`tx_backlog`). In copy mode, the mode of veths and of drivers
    /// without zero-copy, one kick sends at most 32 frames (the socket's TX
    /// budget); kicked once, a batch of 64 left 32 in the ring until the
    /// port's next frame, for good if none came. A kick says `EAGAIN` both
    /// when its budget ran out and when the device was busy; the ring's fill
    /// tells them apart. A zero-copy driver drains the ring by itself and
    /// asks for a kick through the ring's need-wakeup flag. A syscall per 32
    /// frames, never per frame.
    fn kick_tx(&mut self, io: &mut IoCounters) {
        for _ in 0..MAX_KICKS {
            let free = self.tx.nb_free_exact();
            if free == RING {
                self.tx_backlog = false;
                return;
            }
            if !self.tx.needs_wakeup() {
                // A zero-copy driver is sending by itself; look again next round.
                return;
            }
            // SAFETY: a zero-length send on this port's open socket; no
            // buffer is passed.
            let r = unsafe {
                libc::sendto(self.tx.fd().as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0)
            };
            if r < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    // The kick's budget was spent (it sent some: go on),
                    // or the device is busy (it sent none: next round).
                    Some(libc::EAGAIN | libc::ENOBUFS) if self.tx.nb_free_exact() > free => {}
                    Some(libc::EAGAIN | libc::ENOBUFS) => return,
                    // The device refused a frame (it was completed unsent).
                    Some(libc::EBUSY) => io.tx_device_dropped += 1,
                    _ => {
                        io.tx_kick_errors += 1;
                        return;
                    }
                }
            }
        }
    }

    /// Points at a frame's whole data segment (its capacity).
    fn buffer(&self, desc: &mut FrameDesc) -> (*mut u8, usize) {
        // SAFETY: `desc` is a frame of this UMEM held by the worker (from
        // the RX ring or the free stack), so nothing else accesses it.
        let mut data = unsafe { self.umem.data_mut(desc) };
        let len = data.contents().len();
        let mut cursor = data.cursor();
        let cap = cursor.buf_len();
        cursor.set_pos(cap);
        let ptr = data.contents_mut().as_mut_ptr();
        data.cursor().set_pos(len);
        (ptr, cap)
    }

    /// Sends up to `n` (at most [`BATCH`]) new frames, each written by
    /// `write(i, buffer) -> length`; returns how many the TX ring took. For
    /// generators: no pipeline, no allocation.
    pub fn send_with(&mut self, n: usize, mut write: impl FnMut(usize, &mut [u8]) -> usize) -> usize {
        self.reclaim();
        let n = n.min(BATCH).min(self.free.len());
        for i in 0..n {
            let mut d = self.free.pop().expect("counted above");
            let (ptr, cap) = self.buffer(&mut d);
            // SAFETY: the frame came from the free stack: this port holds it alone.
            let len = write(i, unsafe { std::slice::from_raw_parts_mut(ptr, cap) });
            self.set_len(&mut d, len.min(cap));
            self.pending_tx.push(d);
        }
        let mut io = IoCounters::default();
        self.flush_tx(&mut io);
        io.tx_packets as usize
    }

    /// Receives up to a batch and hands each frame to `f(buffer, length)`:
    /// `Some(length)` sends it back out of this port, `None` frees it.
    /// Returns how many frames were received. For reflectors and sinks.
    pub fn reflect_with(&mut self, mut f: impl FnMut(&mut [u8], usize) -> Option<usize>) -> usize {
        self.reclaim();
        self.refill();
        let mut descs = [FrameDesc::default(); BATCH];
        // SAFETY: the RX ring hands over frames of this port's UMEM.
        let n = unsafe { self.rx.consume(&mut descs) };
        for d in descs[..n].iter_mut() {
            let len = d.lengths().data();
            let (ptr, cap) = self.buffer(d);
            // SAFETY: a received frame is held by this port until sent or freed.
            match f(unsafe { std::slice::from_raw_parts_mut(ptr, cap) }, len) {
                Some(l) => {
                    self.set_len(d, l.min(cap));
                    self.pending_tx.push(*d);
                }
                None => self.free.push(*d),
            }
        }
        let mut io = IoCounters::default();
        self.flush_tx(&mut io);
        n
    }

    fn set_len(&self, desc: &mut FrameDesc, len: usize) {
        // SAFETY: as in `buffer`.
        unsafe { self.umem.data_mut(desc) }.cursor().set_pos(len);
    }
}

/// What a worker reads, shared with the control plane.
#[derive(Clone)]
pub struct Shared {
    pub services: Arc<ServiceTableHandle>,
    pub conntrack: Arc<FlowTable>,
    pub affinity: Arc<AffinityTable>,
    pub fib: Arc<ArcSwap<Fib>>,
    /// Dropped frames copied out while a capture is on.
    pub capture: Arc<DropCapture>,
    /// Asks the control plane to resolve a next hop (ifindex, address);
    /// must not block (it is called on the drop path of a worker).
    pub resolve: Arc<dyn Fn(u32, Addr) + Send + Sync>,
    pub stop: Arc<AtomicBool>,
    /// The process clock: conntrack's `now` is whole seconds since this.
    pub epoch: Instant,
}

/// One worker thread's loop state.
pub struct Worker {
    ports: Vec<Port>,
    shared: Shared,
    state: WorkerState,
    io: IoCounters,
    snapshot: Arc<Mutex<WorkerSnapshot>>,
    /// Frames waiting for a next hop's MAC (capacity [`HELD_MAX`]).
    held: Vec<Held>,
}

/// Where one received frame goes after the pipeline.
enum Out {
    Free,
    Tx {
        port: usize,
        len: usize,
    },
    /// Waits for the next hop's MAC (kept by the worker, like the kernel's
    /// ARP queue).
    Hold {
        oif: u32,
        via: Addr,
    },
}

/// A frame waiting for its next hop to be resolved.
struct Held {
    port: usize,
    desc: FrameDesc,
    len: usize,
    oif: u32,
    via: Addr,
    since: Instant,
}

impl Worker {
    pub fn new(ports: Vec<Port>, shared: Shared) -> (Worker, Arc<Mutex<WorkerSnapshot>>) {
        let snapshot = Arc::new(Mutex::new(WorkerSnapshot::default()));
        let w = Worker {
            ports,
            shared,
            state: WorkerState::new(),
            io: IoCounters::default(),
            snapshot: snapshot.clone(),
            held: Vec::with_capacity(HELD_MAX),
        };
        (w, snapshot)
    }

    /// Runs until `shared.stop` is set.
    pub fn run(mut self) {
        let mut empty_rounds = 0u32;
        let mut last_publish = Instant::now();
        let mut rx_descs = [FrameDesc::default(); BATCH];
        let mut verdicts = [Verdict::Pass; BATCH];
        let conntrack = self.shared.conntrack.clone();
        let affinity = self.shared.affinity.clone();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now_instant = Instant::now();
            let now = now_instant.duration_since(self.shared.epoch).as_secs() as u32;
            let services = self.shared.services.load();
            let fib = self.shared.fib.load();
            let tables = Tables { services: &services, conntrack: &conntrack, affinity: &affinity };
            let capture = self.shared.capture.reasons();
            let mut received = 0;
            for i in 0..self.ports.len() {
                let port = &mut self.ports[i];
                port.reclaim();
                port.refill();
                // SAFETY: the RX ring hands over frames of this port's UMEM.
                let n = unsafe { port.rx.consume(&mut rx_descs) };
                if n == 0 {
                    continue;
                }
                received += n;
                self.io.rx_packets += n as u64;
                let mut bufs = [(std::ptr::null_mut::<u8>(), 0usize); BATCH];
                for (b, d) in bufs.iter_mut().zip(rx_descs[..n].iter_mut()) {
                    *b = port.buffer(d);
                }
                let lens: [usize; BATCH] =
                    std::array::from_fn(|j| if j < n { rx_descs[j].lengths().data() } else { 0 });
                {
                    let mut frames: [Frame<'_>; BATCH] = std::array::from_fn(|j| {
                        if j < n {
                            // SAFETY: each buffer is a distinct frame held by
                            // this worker for the batch; the UMEM mapping
                            // outlives it.
                            Frame { buf: unsafe { std::slice::from_raw_parts_mut(bufs[j].0, bufs[j].1) }, len: lens[j] }
                        } else {
                            Frame { buf: &mut [], len: 0 }
                        }
                    });
                    pipeline::process_batch(&mut frames[..n], &tables, &mut self.state, now, &mut verdicts[..n]);
                    for j in 0..n {
                        let f = &mut frames[j];
                        if capture != 0
                            && let Verdict::Drop(reason) = verdicts[j]
                        {
                            let ifindex = self.ports[i].ifindex;
                            self.shared.capture.offer(capture, reason, ifindex, &f.buf[..f.len.min(f.buf.len())]);
                        }
                        let out = self.egress(i, f, verdicts[j], &fib, &tables, now, true);
                        match out {
                            Out::Free => self.ports[i].free.push(rx_descs[j]),
                            Out::Tx { port, len } if port == i => {
                                let p = &mut self.ports[i];
                                p.set_len(&mut rx_descs[j], len);
                                p.pending_tx.push(rx_descs[j]);
                            }
                            Out::Tx { port, len } => {
                                self.copy_to(port, &f.buf[..len]);
                                self.ports[i].free.push(rx_descs[j]);
                            }
                            Out::Hold { oif, via } => self.held.push(Held {
                                port: i,
                                desc: rx_descs[j],
                                len: f.len,
                                oif,
                                via,
                                since: now_instant,
                            }),
                        }
                    }
                }
            }
            if !self.held.is_empty() {
                self.release_held(&fib, now_instant);
            }
            for p in &mut self.ports {
                p.flush_tx(&mut self.io);
            }
            if received > 0 {
                self.io.busy_polls += 1;
                empty_rounds = 0;
            } else {
                self.io.idle_polls += 1;
                empty_rounds += 1;
                // Not while a TX ring holds frames the kernel has yet to take.
                if empty_rounds >= SPIN_ROUNDS && !self.ports.iter().any(|p| p.tx_backlog) {
                    self.sleep_until_rx();
                }
            }
            if now_instant.duration_since(last_publish) >= PUBLISH_EVERY {
                self.publish();
                last_publish = now_instant;
            }
        }
        self.publish();
    }

    /// Decides where a processed frame goes; rewrites its L2 header. A
    /// frame its egress link cannot carry is answered (`answer_too_big`)
    /// as a router answers it ([`Worker::too_big`]).
    #[allow(clippy::too_many_arguments)]
    fn egress(
        &mut self,
        from: usize,
        f: &mut Frame<'_>,
        v: Verdict,
        fib: &Fib,
        tables: &Tables<'_>,
        now: u32,
        answer_too_big: bool,
    ) -> Out {
        let dst = match v {
            Verdict::Drop(_) => return Out::Free,
            Verdict::Reply => return Out::Tx { port: from, len: f.len },
            Verdict::Forward { next_hop } => next_hop,
            Verdict::Pass => match self.route_passed(f, fib, tables.services) {
                Some(dst) => dst,
                None => return Out::Free,
            },
        };
        self.egress_to(from, f, dst, fib, tables, now, answer_too_big)
    }

    /// [`Worker::egress`] for a frame going to `dst`.
    #[allow(clippy::too_many_arguments)]
    fn egress_to(
        &mut self,
        from: usize,
        f: &mut Frame<'_>,
        dst: Addr,
        fib: &Fib,
        tables: &Tables<'_>,
        now: u32,
        answer_too_big: bool,
    ) -> Out {
        let Some(hop) = fib.next_hop(&dst) else {
            self.io.no_route += 1;
            return Out::Free;
        };
        let Some(link) = fib.link(hop.oif) else {
            self.io.no_route += 1;
            return Out::Free;
        };
        // One comparison per frame; a VLAN tag's 4 bytes are checked below.
        let mtu = link.mtu as usize;
        if answer_too_big && mtu != 0 && f.len > mtu + 14 {
            return self.too_big(from, f, dst, mtu, fib, tables, now);
        }
        if fib.neighbour(hop.oif, &hop.via).is_none() {
            if self.held.len() < HELD_MAX {
                (self.shared.resolve)(hop.oif, hop.via);
                self.io.neighbor_queued += 1;
                return Out::Hold { oif: hop.oif, via: hop.via };
            }
            self.io.no_neighbor += 1;
            (self.shared.resolve)(hop.oif, hop.via);
            return Out::Free;
        }
        self.l2(f.buf, f.len, link, &hop.via, fib)
    }

    /// A frame larger than its egress link's MTU (`mtu`), as the kernel's
    /// forwarding answers it: an IPv4 packet with DF and every IPv6 packet
    /// becomes an ICMP fragmentation-needed / Packet Too Big with that MTU,
    /// from this gateway's address to the packet's source (`too_big_sent`),
    /// and the other IPv4 packets, which only fragmenting would carry, are
    /// dropped (`too_big_fragmentable`). The error is about the packet as it
    /// was translated, so it goes through the pipeline again, which
    /// translates it back for the client (as it does a router's; under
    /// Cluster it was addressed to this gateway's masquerade address), and
    /// then leaves as any frame does. Only frames too big pay for this.
    #[allow(clippy::too_many_arguments)]
    fn too_big(
        &mut self,
        from: usize,
        f: &mut Frame<'_>,
        dst: Addr,
        mtu: usize,
        fib: &Fib,
        tables: &Tables<'_>,
        now: u32,
    ) -> Out {
        let Ok(p) = wire::parse(&f.buf[..f.len]) else {
            self.io.too_big_fragmentable += 1;
            return Out::Free;
        };
        if f.len - p.l3 <= mtu {
            // It fits: a VLAN tag made the frame longer, not the packet.
            return self.egress_to(from, f, dst, fib, tables, now, false);
        }
        // A packet this gateway encapsulated (direct server return): the
        // error is about the client's packet inside, whose path is this
        // link less the outer header.
        let tunnel_proto = if p.v6 { f.buf[p.l3 + 6] } else { f.buf[p.l3 + 9] };
        let mut mtu = mtu;
        let mut p = p;
        if tunnel_proto == if p.v6 { 41 } else { 4 }
            && (fib.is_local(&p.src) || tables.services.is_node_address(&p.src))
        {
            let inner = nat::decapsulate(f.buf, f.len, p.l3, p.v6).and_then(|len| {
                let inner = wire::parse(&f.buf[..len]).ok()?;
                Some((len, inner))
            });
            let Some((len, inner)) = inner else {
                self.io.too_big_fragmentable += 1;
                return Out::Free;
            };
            f.len = len;
            mtu = mtu.saturating_sub(nat::encapsulation_overhead(p.v6));
            p = inner;
        }
        let dont_fragment = p.v6 || f.buf[p.l3 + 6] & 0x40 != 0;
        let ours = tables.services.node().snat_for(&p.src);
        let (Some(ours), true) = (ours, dont_fragment) else {
            self.io.too_big_fragmentable += 1;
            return Out::Free;
        };
        let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        let Some(len) = nat::icmp_error_reply(f.buf, &p, &ours, nat::IcmpErrorKind::TooBig { mtu }) else {
            self.io.too_big_fragmentable += 1;
            return Out::Free;
        };
        f.len = len;
        self.io.too_big_sent += 1;
        let mut verdict = [Verdict::Pass];
        pipeline::process_batch(std::slice::from_mut(f), tables, &mut self.state, now, &mut verdict);
        self.egress(from, f, verdict[0], fib, tables, now, false)
    }

    /// A frame the pipeline passed: not a Service's, so the kernel's. It
    /// reached a socket because the steering program matched its address
    /// and port (a reply port, an address of a Service), and a frame taken
    /// from a socket cannot be handed back to the kernel's stack, so it is
    /// treated as the kernel's IP forwarding would treat it: for this node
    /// it is discarded (`steered_local`), and so is one whose TTL ran out
    /// (`passed_ttl_expired`); any other is routed on, unchanged but for
    /// its TTL (`routed_unchanged`). Returns where it goes.
    fn route_passed(&mut self, f: &mut Frame<'_>, fib: &Fib, services: &ServiceTable) -> Option<Addr> {
        let Ok(p) = wire::parse(&f.buf[..f.len]) else {
            self.io.steered_local += 1;
            return None;
        };
        if fib.is_local(&p.dst) || services.is_node_address(&p.dst) {
            self.io.steered_local += 1;
            return None;
        }
        if p.ttl <= 1 {
            self.io.passed_ttl_expired += 1;
            return None;
        }
        nat::route_unchanged(f.buf, &p);
        self.io.routed_unchanged += 1;
        Some(p.dst)
    }

    /// Writes the Ethernet addresses for leaving by `oif` towards `via`.
    fn l2(&mut self, buf: &mut [u8], len: usize, link: &Link, via: &Addr, fib: &Fib) -> Out {
        let Some(mac) = fib.neighbour(link.ifindex, via) else {
            self.io.no_neighbor += 1;
            return Out::Free;
        };
        let Some(port) = self.ports.iter().position(|p| p.ifindex == link.ifindex) else {
            self.io.no_egress_socket += 1;
            return Out::Free;
        };
        if len < 14 {
            return Out::Free;
        }
        buf[0..6].copy_from_slice(&mac);
        buf[6..12].copy_from_slice(&link.mac);
        Out::Tx { port, len }
    }

    /// Sends held frames whose next hop got resolved; drops those that
    /// waited longer than [`HELD_TIMEOUT`].
    fn release_held(&mut self, fib: &Fib, now: Instant) {
        let mut i = 0;
        while i < self.held.len() {
            let h = &self.held[i];
            let (resolved, expired) =
                (fib.neighbour(h.oif, &h.via).is_some(), now.duration_since(h.since) > HELD_TIMEOUT);
            if !resolved && !expired {
                i += 1;
                continue;
            }
            let mut h = self.held.swap_remove(i);
            if !resolved {
                self.io.no_neighbor += 1;
                self.ports[h.port].free.push(h.desc);
                continue;
            }
            let (ptr, cap) = self.ports[h.port].buffer(&mut h.desc);
            // SAFETY: the held frame belongs to this worker until sent or freed.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, cap) };
            let Some(link) = fib.link(h.oif) else {
                self.io.no_route += 1;
                self.ports[h.port].free.push(h.desc);
                continue;
            };
            match self.l2(buf, h.len, link, &h.via, fib) {
                Out::Tx { port, len } if port == h.port => {
                    let p = &mut self.ports[port];
                    p.set_len(&mut h.desc, len);
                    p.pending_tx.push(h.desc);
                }
                Out::Tx { port, len } => {
                    self.copy_to(port, &buf[..len]);
                    self.ports[h.port].free.push(h.desc);
                }
                Out::Free | Out::Hold { .. } => self.ports[h.port].free.push(h.desc),
            }
        }
    }

    /// Copies a frame into a free frame of port `to` and queues it there.
    fn copy_to(&mut self, to: usize, bytes: &[u8]) {
        let port = &mut self.ports[to];
        if port.free.is_empty() {
            port.reclaim();
        }
        let Some(mut desc) = port.free.pop() else {
            self.io.tx_ring_full += 1;
            return;
        };
        // SAFETY: the frame came from the port's free stack.
        let mut data = unsafe { port.umem.data_mut(&mut desc) };
        let mut cursor = data.cursor();
        cursor.set_pos(0);
        if cursor.write_all(bytes).is_err() {
            port.free.push(desc);
            self.io.tx_ring_full += 1;
            return;
        }
        port.pending_tx.push(desc);
        self.io.copied_across += 1;
    }

    /// Blocks in `poll()` until a socket has frames (or a short timeout, to
    /// notice `stop` and publish counters).
    fn sleep_until_rx(&mut self) {
        let mut fds = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; 16];
        let n = self.ports.len().min(fds.len());
        for (f, p) in fds.iter_mut().zip(&self.ports) {
            f.fd = p.fd();
        }
        // SAFETY: `fds[..n]` are initialized pollfds of open sockets.
        unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, IDLE_POLL_MS) };
    }

    fn publish(&mut self) {
        // The kernel's per-socket drop counters (one getsockopt per socket,
        // every PUBLISH_EVERY, never per packet).
        let (mut dropped, mut full, mut empty, mut invalid) = (0, 0, 0, 0);
        for p in &self.ports {
            if let Ok(st) = p.rx.fd().xdp_statistics() {
                dropped += st.rx_dropped();
                full += st.rx_ring_full();
                empty += st.rx_fill_ring_empty_descs();
                invalid += st.rx_invalid_descs() + st.tx_invalid_descs();
            }
        }
        self.io.xsk_rx_dropped = dropped;
        self.io.xsk_rx_ring_full = full;
        self.io.xsk_fill_ring_empty = empty;
        self.io.xsk_invalid_descs = invalid;
        if let Ok(mut s) = self.snapshot.try_lock() {
            s.pipeline.copy_from(&self.state.counters);
            s.io = self.io;
        }
    }
}
