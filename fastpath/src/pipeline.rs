//! The per-packet pipeline, a pure function of (frame bytes, tables, clock):
//! [`process_batch`] takes up to [`BATCH`] frames, rewrites each in place and
//! returns a [`Verdict`] per frame. The AF_XDP loop only moves descriptors
//! around it; tests and benchmarks call it directly.
//!
//! For each frame: parse (malformed → `Drop(malformed)`); an ICMP error about
//! a tracked flow is translated; a packet of a tracked flow (either
//! direction) is rewritten by its conntrack entry; a packet to a service
//! frontend starts a flow exactly as kube-proxy decides it (traffic class,
//! source ranges, the class's endpoint set and policy, ClientIP affinity,
//! Maglev, masquerade); anything else is passed to the kernel.
//!
//! The batch is processed in passes, so that the memory misses of a batch
//! overlap: parse, hash and prefetch every frame's conntrack hint; prefetch
//! the slot each hint points to, which the lookup then reads first (or, for
//! a key not there, the slots an insert will touch); decide every frame,
//! forwarding tracked flows and planning new ones (endpoint, SNAT
//! candidate), whose reply tuples' hints and home slots are prefetched;
//! read those hints, moving a new flow whose reply tuple looks taken to the
//! next SNAT port (and prefetching again), and prefetch the free slots the
//! inserts will claim; then store the new flows and forward their packets.
//! No allocation, no lock, no system call: counters live in the caller's
//! [`WorkerState`], tables are read-only or lock-free.

use crate::affinity::AffinityTable;
use crate::nat;
use crate::service::{EndpointSet, Found, FrontendKind, ServicePort, ServiceTable, TrafficPolicy};
use crate::wire::{self, Inner, L4, Parsed, Unparsed};
use xskgate_conntrack::{
    Addr, Candidate, FirstPacket, FlowKey, FlowState, FlowTable, FlowView, InsertError, Inserted, KeyHash, NewFlow,
    Proto, TcpState, tcp_flags,
};

/// Frames per batch (the AF_XDP ring batch).
pub const BATCH: usize = 64;

/// Service ids at or above this share the last per-service counter.
pub const MAX_SERVICE_IDS: usize = 1 << 16;

/// How many SNAT ports a new flow tries before giving up.
pub const SNAT_TRIES: u16 = 64;
/// How many times a batch moves a new flow whose reply tuple looks taken
/// to the next SNAT port before its insert (which then tries the rest).
const SNAT_PRECHECK_ROUNDS: usize = 2;

/// A frame buffer: `buf` is the whole buffer (its length is the capacity a
/// generated reply may grow into), `len` the bytes of the frame.
#[derive(Debug)]
pub struct Frame<'a> {
    pub buf: &'a mut [u8],
    pub len: usize,
}

/// What the I/O layer does with a frame after the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on towards `next_hop` (the IP destination after NAT); the I/O
    /// layer resolves the route and neighbour and rewrites the L2 header.
    Forward { next_hop: Addr },
    /// Not ours: give it to the kernel's stack.
    Pass,
    /// Dropped, for a reason an operator can see.
    Drop(DropReason),
    /// A reject was generated in place (MACs swapped): send it back out of
    /// the interface it came in on.
    Reply,
}

macro_rules! reasons {
    ($($variant:ident => $name:literal, $doc:literal;)*) => {
        /// Why a frame was dropped. Every reason has a stable snake_case name
        /// used in metrics and logs.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DropReason { $(#[doc = $doc] $variant,)* }

        impl DropReason {
            pub const ALL: &[DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = DropReason::ALL.len();
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
            /// What the reason means, for metric help texts and docs.
            pub fn description(self) -> &'static str {
                match self { $(DropReason::$variant => $doc,)* }
            }
        }
    };
}

reasons! {
    Malformed => "malformed", "Truncated or inconsistent headers.";
    Fragment => "fragment", "An IP fragment: ports are not in every fragment, so it cannot be matched to a flow.";
    NoLocalEndpoints => "no_local_endpoints", "Traffic policy Local and no usable endpoint on this node (kube-proxy's KUBE-MARK-DROP).";
    NoEndpoints => "no_endpoints", "No usable endpoint anywhere, and the packet may not be answered with a reject (a RST or an ICMP error).";
    SourceRange => "source_range", "The client is outside the Service's loadBalancerSourceRanges.";
    TtlExpired => "ttl_expired", "TTL or hop limit would reach zero.";
    ConntrackFull => "conntrack_full", "The conntrack table is full (after early drop).";
    ConntrackContended => "conntrack_contended", "Another worker held the flow's conntrack slot too long.";
    SnatExhausted => "snat_exhausted", "No free SNAT port for the new flow's reply tuple.";
    NoSnatAddress => "no_snat_address", "Masquerade needed but no SNAT address of the packet's family is configured.";
    InvalidTuple => "invalid_tuple", "NAT would give an impossible tuple (address family mismatch, reply equals original).";
}

/// Packets and bytes of one service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// One worker's counters; a reader sums them over workers.
#[derive(Clone, Debug)]
pub struct Counters {
    pub forwarded: u64,
    pub passed: u64,
    /// Rejects generated in place (TCP RST, ICMP port unreachable).
    pub rejected: u64,
    pub flows_created: u64,
    /// SNAT ports new flows passed over because their reply tuple was
    /// taken (seen by the batch before the insert, or by the insert). A
    /// rising rate warns of SNAT port exhaustion before `snat_exhausted`
    /// drops begin.
    pub snat_port_retries: u64,
    pub icmp_errors_translated: u64,
    pub drops: [u64; DropReason::COUNT],
    /// Indexed by service port id (ids ≥ [`MAX_SERVICE_IDS`] share the last).
    pub per_service: Box<[ServiceCounters; MAX_SERVICE_IDS]>,
    /// Every entry of `per_service` from this index on is zero (the
    /// pipeline raises it as it counts), so copies and sums stop there.
    pub services_used: usize,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            forwarded: 0,
            passed: 0,
            rejected: 0,
            flows_created: 0,
            snat_port_retries: 0,
            icmp_errors_translated: 0,
            drops: [0; DropReason::COUNT],
            per_service: vec![ServiceCounters::default(); MAX_SERVICE_IDS]
                .into_boxed_slice()
                .try_into()
                .expect("MAX_SERVICE_IDS entries"),
            services_used: 0,
        }
    }
}

impl Counters {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }

    pub fn service(&self, id: u32) -> ServiceCounters {
        self.per_service[(id as usize).min(MAX_SERVICE_IDS - 1)]
    }

    /// Adds another worker's counters into these.
    pub fn add(&mut self, o: &Counters) {
        self.forwarded += o.forwarded;
        self.passed += o.passed;
        self.rejected += o.rejected;
        self.flows_created += o.flows_created;
        self.snat_port_retries += o.snat_port_retries;
        self.icmp_errors_translated += o.icmp_errors_translated;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        let used = o.services_used.min(o.per_service.len());
        for (a, b) in self.per_service.iter_mut().zip(&o.per_service[..used]) {
            a.packets += b.packets;
            a.bytes += b.bytes;
        }
        self.services_used = self.services_used.max(used);
    }

    /// Makes these counters equal to `o` without copying the per-service
    /// entries past the ones in use (a worker publishes its counters every
    /// 100 ms; the whole array is 1 MiB).
    pub fn copy_from(&mut self, o: &Counters) {
        self.forwarded = o.forwarded;
        self.passed = o.passed;
        self.rejected = o.rejected;
        self.flows_created = o.flows_created;
        self.snat_port_retries = o.snat_port_retries;
        self.icmp_errors_translated = o.icmp_errors_translated;
        self.drops = o.drops;
        let used = o.services_used.min(o.per_service.len()).min(self.per_service.len());
        self.per_service[..used].copy_from_slice(&o.per_service[..used]);
        let stale = self.services_used.min(self.per_service.len());
        if stale > used {
            self.per_service[used..stale].fill(ServiceCounters::default());
        }
        self.services_used = used;
    }
}

/// Everything a worker owns: its counters and the scratch space of a
/// batch. Allocated once.
#[derive(Clone, Debug, Default)]
pub struct WorkerState {
    pub counters: Counters,
    scratch: Box<BatchScratch>,
}

/// What a batch computes in one pass for the next: each frame's parse and
/// its conntrack key's hash. Kept between batches so that a batch does not
/// initialise 7 KB of stack.
#[derive(Clone, Debug)]
struct BatchScratch {
    parsed: [Result<Parsed, Unparsed>; BATCH],
    hashes: [KeyHash; BATCH],
    /// Where each hashed frame's lookup reads first.
    candidates: [Candidate; BATCH],
    planned: [Option<Planned>; BATCH],
    /// The service port of each frame that likely starts a flow.
    found: [Option<Found>; BATCH],
    /// The hash of each planned flow's first reply tuple.
    reply_hashes: [KeyHash; BATCH],
    /// The [`flow_hash`] of each frame that likely starts a flow.
    flow_hashes: [u64; BATCH],
}

impl Default for BatchScratch {
    fn default() -> BatchScratch {
        BatchScratch {
            parsed: [Err(Unparsed::NotIp); BATCH],
            hashes: [KeyHash::default(); BATCH],
            candidates: [Candidate::NONE; BATCH],
            planned: [None; BATCH],
            found: [None; BATCH],
            reply_hashes: [KeyHash::default(); BATCH],
            flow_hashes: [0; BATCH],
        }
    }
}

impl WorkerState {
    pub fn new() -> WorkerState {
        WorkerState::default()
    }
}

impl Counters {
    #[inline]
    fn count_service(&mut self, id: u32, bytes: usize) {
        let i = (id as usize).min(MAX_SERVICE_IDS - 1);
        let c = &mut self.per_service[i];
        c.packets += 1;
        c.bytes += bytes as u64;
        if i >= self.services_used {
            self.services_used = i + 1;
        }
    }

    #[inline]
    fn drop(&mut self, r: DropReason) -> Verdict {
        self.drops[r as usize] += 1;
        Verdict::Drop(r)
    }

    /// Counts a final verdict (drops were counted with their reason).
    #[inline]
    fn account(&mut self, v: Verdict) -> Verdict {
        match v {
            Verdict::Forward { .. } => self.forwarded += 1,
            Verdict::Pass => self.passed += 1,
            Verdict::Reply => self.rejected += 1,
            Verdict::Drop(_) => {}
        }
        v
    }
}

/// The tables a batch reads.
#[derive(Clone, Copy, Debug)]
pub struct Tables<'a> {
    pub services: &'a ServiceTable,
    pub conntrack: &'a FlowTable,
    pub affinity: &'a AffinityTable,
}

/// A fixed (unseeded) hash of a flow's original tuple: the same flow picks
/// the same endpoint on every gateway.
#[inline]
pub fn flow_hash(k: &FlowKey) -> u64 {
    let w = k.to_words();
    let m = |a: u64, b: u64| {
        let p = u128::from(a ^ 0xa076_1d64_78bd_642f) * u128::from(b ^ 0xe703_7ed1_a0b4_28db);
        (p as u64) ^ ((p >> 64) as u64)
    };
    m(m(w[0], w[1]) ^ w[4], m(w[2], w[3]))
}

/// Processes up to [`BATCH`] frames (more are processed in chunks), writing
/// one verdict per frame into `verdicts` (which must be as long as `frames`).
///
/// # Panics
/// If `verdicts` is shorter than `frames` (a caller bug, not packet data).
pub fn process_batch(
    frames: &mut [Frame<'_>],
    t: &Tables<'_>,
    w: &mut WorkerState,
    now: u32,
    verdicts: &mut [Verdict],
) {
    assert!(verdicts.len() >= frames.len(), "one verdict per frame");
    for (frames, verdicts) in frames.chunks_mut(BATCH).zip(verdicts.chunks_mut(BATCH)) {
        let WorkerState { counters, scratch } = &mut *w;
        let BatchScratch { parsed, hashes, candidates, planned, found, reply_hashes, flow_hashes } = &mut **scratch;
        // Bit i: frame i is TCP or UDP, and hashes[i] is its key's hash.
        let mut hashed = 0u64;
        for (i, f) in frames.iter().enumerate() {
            let frame = &f.buf[..f.len.min(f.buf.len())];
            // The key is taken from the parse while it is in registers: read
            // back from `parsed`, its two ports (stored as two halves) would
            // be loaded as one word, which waits for the stores to retire.
            let key = match wire::parse_common(frame) {
                Some(p) => {
                    let key = key_of(&p);
                    parsed[i] = Ok(p);
                    Some(key)
                }
                None => {
                    parsed[i] = wire::parse_general(frame);
                    match &parsed[i] {
                        Ok(p) if matches!(p.l4_kind, L4::Tcp | L4::Udp) => Some(key_of(p)),
                        _ => None,
                    }
                }
            };
            if let Some(key) = key {
                hashes[i] = t.conntrack.hash(&key);
                t.conntrack.prefetch(&hashes[i]);
                hashed |= 1 << i;
            }
        }
        // A new flow's decision reads a chain of memory, each link found in
        // the one before: frontend index entry, service port, Maglev entry,
        // endpoint. With 10,000 Services each link is a cache miss; the
        // passes below prefetch one link each for the whole batch, so the
        // misses overlap instead of following one another per frame.
        //
        // Bit i: frame i's key was absent (its frontend entry is on its way).
        let mut absent = 0u64;
        for i in bits(hashed) {
            candidates[i] = t.conntrack.prefetch_slot(&hashes[i]);
            if candidates[i] == Candidate::ABSENT
                && let Ok(p) = &parsed[i]
            {
                t.services.prefetch_frontend(&p.dst, p.proto, p.dport);
                absent |= 1 << i;
            }
        }
        // Bit i: frame i is to a service port, found[i], and its key was
        // absent: it most likely starts a flow. (found[i] is set for every
        // frame whose key was absent; the decision reads it. A key whose
        // probe was too long to tell is looked up as usual: prefetching a
        // decision for it would cost established flows memory traffic.)
        let mut likely_new = 0u64;
        for i in bits(absent) {
            if let Ok(p) = &parsed[i] {
                found[i] = t.services.find(&p.dst, p.proto, p.dport);
                if let Some(service) = found[i] {
                    t.services.prefetch(service);
                    likely_new |= 1 << i;
                }
            }
        }
        // The Maglev entry the flow's hash picks in its class's endpoint
        // set, then the endpoint that entry names.
        // Bit i: frame i's class uses the Local endpoint set.
        let mut local = 0u64;
        for i in bits(likely_new) {
            if let Ok(p) = &parsed[i]
                && let Some(found) = found[i]
                && let Some(svc) = t.services.get(found)
            {
                flow_hashes[i] = flow_hash(&key_of(p));
                let class = classify(t.services, svc, found.kind, &p.src);
                class.set.prefetch_pick(flow_hashes[i]);
                local |= u64::from(class.policy == TrafficPolicy::Local) << i;
            }
        }
        for i in bits(likely_new) {
            if let Some(svc) = found[i].and_then(|found| t.services.get(found)) {
                let set = if local & 1 << i != 0 { &svc.local } else { &svc.cluster };
                set.prefetch_endpoint(flow_hashes[i]);
            }
        }
        // Bit i: frame i starts a flow, planned in planned[i].
        let mut to_insert = 0u64;
        for (i, f) in frames.iter_mut().enumerate() {
            // The established flow's packet, the bulk of all traffic, is
            // handled here; everything else is out of line, so that this
            // loop keeps its values in registers.
            //
            // A key whose chain ended without its tag when the second pass
            // read its hints (`ABSENT`) is not looked up again: a flow is
            // stored before its first packet is forwarded, so a later
            // packet of it (either direction) finds it hinted. Only a flow
            // that another worker is storing at this very moment is
            // missed, and the insert-if-absent finds it then (as when two
            // workers take the same new flow at once). Walking the chain
            // again cost every new flow about 70 instructions.
            let look = match &parsed[i] {
                Ok(p) if hashed & 1 << i != 0 => match t.conntrack.lookup_unless_absent(&hashes[i], candidates[i]) {
                    Some(view) => {
                        let v = tracked(f, p, &view, t, counters, now);
                        verdicts[i] = counters.account(v);
                        continue;
                    }
                    None => {
                        let looked_up = (candidates[i] == Candidate::ABSENT).then_some(found[i]);
                        untracked(f, p, looked_up, t, counters, now, &mut planned[i])
                    }
                },
                p => first_look(f, p, t, counters, now, &mut planned[i]),
            };
            match look {
                Some(v) => verdicts[i] = counters.account(v),
                None => {
                    if planned[i].is_some() {
                        to_insert |= 1 << i;
                    }
                }
            }
        }
        // The reply tuples are hashed after the loop above, not as each
        // plan is written: read straight after the out-of-line decision
        // stored it, the tuple's ports (stored as two halves, loaded as one
        // word) waited for those stores to reach the cache, which behind
        // the batch's misses took long (new flows 1.09x faster with 1M
        // flows this way, 1.10x with 10,000 Services).
        for i in bits(to_insert) {
            if let Some(plan) = &planned[i] {
                reply_hashes[i] = t.conntrack.hash(&plan.flow.reply);
                t.conntrack.prefetch_insert(&reply_hashes[i]);
            }
        }
        // Read the reply tuples' hints and prefetch the free slots their
        // inserts will claim. A reply tuple whose tag is hinted already is
        // most likely another flow's (its SNAT port is taken): such a flow
        // moves to the allocator's next port here, while that tuple's
        // memory can still be prefetched, instead of finding out in the
        // insert with nothing prefetched (with half an endpoint's SNAT
        // ports in use that was most of a new flow's cost). The insert
        // still checks for real.
        let mut check = to_insert;
        for round in 0..=SNAT_PRECHECK_ROUNDS {
            let mut moved = 0u64;
            for i in bits(check) {
                let likely_taken = t.conntrack.prefetch_slot(&reply_hashes[i]).has_slot();
                if !likely_taken || round == SNAT_PRECHECK_ROUNDS {
                    continue;
                }
                if let (Ok(p), Some(plan)) = (&parsed[i], &mut planned[i])
                    && let Some(port) = plan.next_port(p.sport)
                {
                    reply_hashes[i] = t.conntrack.hash_with_dport(&reply_hashes[i], port);
                    t.conntrack.prefetch_insert(&reply_hashes[i]);
                    counters.snat_port_retries += 1;
                    moved |= 1 << i;
                }
            }
            check = moved;
            if check == 0 {
                break;
            }
        }
        for i in bits(to_insert) {
            if let (Some(f), Ok(p), Some(plan)) = (frames.get_mut(i), &parsed[i], &planned[i]) {
                // A planned flow's original tuple is its frame's key, hashed
                // in the first pass if the frame was hashed there.
                let orig = if hashed & 1 << i != 0 { hashes[i] } else { t.conntrack.hash(&plan.flow.orig) };
                let v = insert_planned(f, p, plan, [&orig, &reply_hashes[i]], t, counters, now);
                verdicts[i] = counters.account(v);
            }
        }
    }
}

/// The indices of the set bits of `mask`, lowest first (a batch's passes
/// visit only the frames they concern).
#[inline(always)]
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let i = mask.trailing_zeros() as usize;
        mask &= mask.wrapping_sub(1);
        (i < 64).then_some(i)
    })
}

/// Processes one frame (what [`process_batch`] does per frame, without the
/// batch's prefetching).
pub fn process(f: &mut Frame<'_>, t: &Tables<'_>, w: &mut WorkerState, now: u32) -> Verdict {
    let p = wire::parse(&f.buf[..f.len.min(f.buf.len())]);
    let c = &mut w.counters;
    let mut plan = None;
    let v = match (first_look(f, &p, t, c, now, &mut plan), &p, &plan) {
        (Some(v), _, _) => v,
        (None, Ok(p), Some(plan)) => {
            let hashes = [plan.flow.orig, plan.flow.reply].map(|k| t.conntrack.hash(&k));
            insert_planned(f, p, plan, [&hashes[0], &hashes[1]], t, c, now)
        }
        // No verdict means a plan, and a plan comes only from a parsed frame.
        (None, _, _) => Verdict::Pass,
    };
    c.account(v)
}

#[inline]
fn key_of(p: &Parsed) -> FlowKey {
    FlowKey { src: p.src, dst: p.dst, sport: p.sport, dport: p.dport, proto: p.proto }
}

/// The first look at a frame: its verdict, or (`None`) a new flow planned
/// into `plan` for the caller to store. A batch stores its new flows after
/// it has looked at every frame, so that their reply tuples' memory is on
/// its way. (The plan is written in place: returning it would make every
/// tracked packet's result as large as a plan.)
#[inline(never)]
fn first_look(
    f: &mut Frame<'_>,
    p: &Result<Parsed, Unparsed>,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    plan: &mut Option<Planned>,
) -> Option<Verdict> {
    let v = match p {
        Ok(p) => match p.l4_kind {
            L4::Tcp | L4::Udp => return flow_packet(f, p, t, c, now, plan),
            L4::IcmpError => match wire::icmp_inner(f.buf, p) {
                Some(inner) => icmp_error(f, p, &inner, t, c),
                None => Verdict::Pass,
            },
            L4::Other => Verdict::Pass,
        },
        Err(Unparsed::NotIp) => Verdict::Pass,
        Err(Unparsed::Malformed) => c.drop(DropReason::Malformed),
        Err(Unparsed::Fragment) => c.drop(DropReason::Fragment),
    };
    Some(v)
}

/// A TCP or UDP packet outside a batch's fast loop (which looks up its
/// hashed frames itself): its flow's translation, or a new flow's plan.
#[inline]
fn flow_packet(
    f: &mut Frame<'_>,
    p: &Parsed,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    plan: &mut Option<Planned>,
) -> Option<Verdict> {
    match t.conntrack.lookup(&key_of(p)) {
        Some(view) => Some(tracked(f, p, &view, t, c, now)),
        None => untracked(f, p, None, t, c, now, plan),
    }
}

/// A packet of the tracked flow direction `view`.
#[inline(always)]
fn tracked(f: &mut Frame<'_>, p: &Parsed, view: &FlowView, t: &Tables<'_>, c: &mut Counters, now: u32) -> Verdict {
    if p.ttl <= 1 {
        return c.drop(DropReason::TtlExpired);
    }
    forward(f, p, view, t, c, now)
}

/// A TCP or UDP packet of no tracked flow: a new flow's plan (`None`,
/// written into `plan`), or its verdict. `looked_up` is the frame's
/// service port if the batch has looked it up already.
#[inline(never)]
fn untracked(
    f: &mut Frame<'_>,
    p: &Parsed,
    looked_up: Option<Option<Found>>,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    plan: &mut Option<Planned>,
) -> Option<Verdict> {
    let service = looked_up.unwrap_or_else(|| t.services.find(&p.dst, p.proto, p.dport));
    plan_new_flow(f, p, service, t, c, now, plan)
}

/// Applies a flow's translation to a packet of it and accounts for it.
#[inline(always)]
fn forward(f: &mut Frame<'_>, p: &Parsed, view: &FlowView, t: &Tables<'_>, c: &mut Counters, now: u32) -> Verdict {
    t.conntrack.touch(view, now, (p.end - p.l3) as u64, p.tcp_flags);
    rewrite(f, p, view, c)
}

/// Rewrites a packet of a flow that has recorded it already and counts it
/// for its service.
#[inline(always)]
fn rewrite(f: &mut Frame<'_>, p: &Parsed, view: &FlowView, c: &mut Counters) -> Verdict {
    nat::rewrite(f.buf, p, view);
    c.count_service(view.service, p.end - p.l3);
    Verdict::Forward { next_hop: view.rewrite_dst() }
}

/// A new flow's traffic class and the endpoint set its policy allows.
struct Class<'a> {
    /// The client is in one of the cluster's pod CIDRs.
    from_pod: bool,
    external: bool,
    policy: TrafficPolicy,
    set: &'a EndpointSet,
}

/// Traffic class: a ClusterIP is internal; an external address reached
/// from a pod is internal too (kube-proxy: "Redirect pods trying to reach
/// external loadbalancer VIP to clusterIP"). The class's policy picks the
/// endpoint set.
#[inline]
fn classify<'a>(services: &ServiceTable, svc: &'a ServicePort, kind: FrontendKind, src: &Addr) -> Class<'a> {
    let from_pod = services.is_pod(src);
    let external = kind != FrontendKind::ClusterIp && !from_pod;
    let policy = if external { svc.external_policy } else { svc.internal_policy };
    let set = match policy {
        TrafficPolicy::Cluster => &svc.cluster,
        TrafficPolicy::Local => &svc.local,
    };
    Class { from_pod, external, policy, set }
}

/// Decides a new flow: its plan, written into `plan` (and `None`
/// returned), or the packet's verdict.
fn plan_new_flow(
    f: &mut Frame<'_>,
    p: &Parsed,
    service: Option<Found>,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    plan: &mut Option<Planned>,
) -> Option<Verdict> {
    let services = t.services;
    let Some((svc, kind)) = service.and_then(|found| Some((services.get(found)?, found.kind))) else {
        return Some(Verdict::Pass);
    };
    let key = &key_of(p);
    if kind == FrontendKind::LoadBalancer
        && !svc.source_ranges.is_empty()
        && !svc.source_ranges.iter().any(|c| c.contains(&p.src))
    {
        return Some(c.drop(DropReason::SourceRange));
    }
    let Class { from_pod, external, policy, set } = classify(services, svc, kind, &p.src);
    if set.is_empty() {
        if !svc.cluster.is_empty() || !svc.local.is_empty() {
            return Some(c.drop(DropReason::NoLocalEndpoints));
        }
        return Some(reject(f, p, c));
    }
    if p.ttl <= 1 {
        return Some(c.drop(DropReason::TtlExpired));
    }
    let fh = flow_hash(key);
    let picked = match svc.affinity_timeout {
        Some(timeout) => {
            let sticky = t.affinity.get(svc.id, &p.src, now, timeout).and_then(|id| set.by_id(id));
            let ep = sticky.or_else(|| set.pick(fh));
            if let Some(ep) = ep {
                t.affinity.record(svc.id, &p.src, ep.id, now);
            }
            ep
        }
        None => set.pick(fh),
    };
    let Some(ep) = picked.copied() else {
        return Some(reject(f, p, c));
    };
    if ep.addr.is_v4() == p.v6 {
        return Some(c.drop(DropReason::InvalidTuple));
    }
    // Masquerade: Cluster policy for external traffic, hairpin (a pod
    // reaching itself), and a ClusterIP reached from outside the pod CIDRs
    // (kube-proxy's `! -s clusterCIDR -j KUBE-MARK-MASQ`).
    let node = services.node();
    let hairpin = p.src == ep.addr;
    let masquerade = hairpin
        || (external && policy == TrafficPolicy::Cluster)
        || (kind == FrontendKind::ClusterIp && !from_pod && !node.pod_cidrs.is_empty());
    let (reply_dst, keep_port) = if masquerade {
        match node.snat_for(&ep.addr) {
            Some(a) => (a, false),
            None => return Some(c.drop(DropReason::NoSnatAddress)),
        }
    } else {
        (p.src, true)
    };
    let state = match p.proto {
        Proto::TCP if p.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN => {
            FlowState::Tcp(TcpState::SynSent)
        }
        // A mid-stream segment (e.g. after a gateway restart) is picked up
        // as established, as Linux's nf_conntrack_tcp_loose does.
        Proto::TCP => FlowState::Tcp(TcpState::Established),
        _ => FlowState::Udp { replied: false },
    };
    let (lo, hi) = node.snat_ports;
    let span = u32::from(hi.saturating_sub(lo)) + 1;
    let search = PortSearch {
        keep_port,
        lo,
        span,
        start: (fh % u64::from(span)) as u32,
        // Not reduced here (see `SNAT_STRIDES`): one division fewer on the
        // way from a new flow's decision to its reply tuple's prefetch.
        stride: SNAT_STRIDES[(fh >> 60) as usize],
    };
    let reply =
        FlowKey { proto: p.proto, src: ep.addr, sport: ep.port, dst: reply_dst, dport: search.port(p.sport, 0) };
    *plan = Some(Planned {
        flow: NewFlow { orig: *key, reply, backend: ep.id, service: svc.id, state },
        search,
        attempt: 0,
    });
    None
}

/// Stores a planned flow and forwards its first packet. The SNAT port
/// allocator: the reply tuple must be unique, so while it is taken the
/// table moves it to the search's next port, up to [`SNAT_TRIES`] ports in
/// all (counting those the batch skipped before the insert).
fn insert_planned(
    f: &mut Frame<'_>,
    p: &Parsed,
    plan: &Planned,
    hashes: [&KeyHash; 2],
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
) -> Verdict {
    // The table records the packet on the flow it stores or finds.
    let first = FirstPacket { bytes: (p.end - p.l3) as u64, tcp_flags: p.tcp_flags };
    let (search, mut attempt) = (plan.search, plan.attempt);
    let mut taken = 0;
    let next_port = || {
        taken += 1;
        next_attempt(&mut attempt).map(|a| search.port(p.sport, a))
    };
    let inserted = t.conntrack.insert_missed_hashed(&plan.flow, hashes, now, first, next_port);
    c.snat_port_retries += taken;
    let view = match inserted {
        Ok(Inserted::New(v)) => {
            c.flows_created += 1;
            v
        }
        Ok(Inserted::Existing(v)) => v,
        Err(InsertError::ReplyTaken) => return c.drop(DropReason::SnatExhausted),
        Err(InsertError::Full | InsertError::ProbeLimit) => return c.drop(DropReason::ConntrackFull),
        Err(InsertError::Contended) => return c.drop(DropReason::ConntrackContended),
        Err(InsertError::InvalidTuple) => return c.drop(DropReason::InvalidTuple),
    };
    rewrite(f, p, &view, c)
}

/// A new flow decided (service, traffic class, endpoint, NAT) but not yet
/// stored. Its reply tuple's destination is the SNAT search's port of
/// attempt `attempt`.
#[derive(Clone, Copy, Debug)]
struct Planned {
    flow: NewFlow,
    search: PortSearch,
    attempt: u16,
}

impl Planned {
    /// Moves the reply tuple to the search's next port and returns it;
    /// `None` (unchanged) after [`SNAT_TRIES`] ports.
    #[inline]
    fn next_port(&mut self, sport: u16) -> Option<u16> {
        let attempt = next_attempt(&mut self.attempt)?;
        let port = self.search.port(sport, attempt);
        self.flow.reply.dport = port;
        Some(port)
    }
}

/// The SNAT search's attempt after `attempt`, counted in it; `None`
/// (unchanged) after [`SNAT_TRIES`] ports.
#[inline]
fn next_attempt(attempt: &mut u16) -> Option<u16> {
    if *attempt + 1 >= SNAT_TRIES {
        return None;
    }
    *attempt += 1;
    Some(*attempt)
}

/// Where the SNAT port allocator looks: the client's own port first when
/// there is no masquerade, then the range `lo..lo + span` from `start` in
/// steps of `stride`, wrapping; both come from the flow's hash.
///
/// The stride is one of [`SNAT_STRIDES`], primes above any span, so it is
/// coprime with the span and the tries visit distinct ports. Stepping by 1
/// instead, taken ports gather in runs that a search of [`SNAT_TRIES`]
/// ports cannot cross: simulated on one endpoint's 64,512 ports, 2 % of new
/// flows were dropped as `snat_exhausted` with 80 % of the ports in use and
/// 16 % with 90 %; with these strides, none and 0.1 %.
#[derive(Clone, Copy, Debug)]
struct PortSearch {
    keep_port: bool,
    lo: u16,
    span: u32,
    start: u32,
    stride: u32,
}

/// The SNAT search's strides: primes above 65,536, so that each is
/// coprime with every span of ports. They are not reduced modulo the span
/// (the port is: `start + attempt × stride`, below 2³² for the
/// [`SNAT_TRIES`] attempts, is taken modulo the span).
const SNAT_STRIDES: [u32; 16] = [
    65_537, 65_539, 65_543, 65_551, 65_557, 65_563, 65_579, 65_581, 65_587, 65_599, 65_609, 65_617, 65_629, 65_633,
    65_647, 65_651,
];

impl PortSearch {
    /// The port of attempt `attempt` for a client port `sport`.
    #[inline]
    fn port(&self, sport: u16, attempt: u16) -> u16 {
        // Without masquerade the client's port is kept unless its reply
        // tuple clashes (then it is remapped, as Linux's NAT does).
        match attempt {
            0 if self.keep_port => sport,
            0 => self.lo.wrapping_add(self.start as u16),
            // At most 65,535 + 63 × 65,651: no overflow.
            _ => self.lo.wrapping_add(((self.start + u32::from(attempt) * self.stride) % self.span) as u16),
        }
    }
}

/// kube-proxy's REJECT for a Service without endpoints: TCP RST or ICMP
/// port unreachable, generated in place.
fn reject(f: &mut Frame<'_>, p: &Parsed, c: &mut Counters) -> Verdict {
    let len = match p.proto {
        Proto::TCP => nat::tcp_reset(f.buf, p),
        _ => nat::port_unreachable(f.buf, p),
    };
    match len {
        Some(len) => {
            f.len = len;
            Verdict::Reply
        }
        None => c.drop(DropReason::NoEndpoints),
    }
}

/// An ICMP error about a packet of a tracked flow: translate it for the
/// other side (outer destination and the embedded packet).
fn icmp_error(f: &mut Frame<'_>, p: &Parsed, inner: &Inner, t: &Tables<'_>, c: &mut Counters) -> Verdict {
    // The embedded packet went out after our NAT; the tuple of packets going
    // the other way is its reverse, and that is what conntrack knows.
    let about = FlowKey { proto: inner.proto, src: inner.dst, dst: inner.src, sport: inner.dport, dport: inner.sport };
    let Some(view) = t.conntrack.lookup(&about) else {
        return Verdict::Pass;
    };
    if p.ttl <= 1 {
        return c.drop(DropReason::TtlExpired);
    }
    let embedded = view.rewrite().reversed();
    if embedded.src.is_v4() == p.v6 {
        return c.drop(DropReason::InvalidTuple);
    }
    nat::rewrite_icmp_error(f.buf, p, inner, &embedded);
    c.icmp_errors_translated += 1;
    Verdict::Forward { next_hop: embedded.src }
}

/// Removes the UDP flows whose endpoint is `endpoint` (its address and
/// port), so that their next datagrams choose a live endpoint instead of
/// vanishing into a removed one (the classic stale-UDP-conntrack outage).
/// TCP flows are left to end by themselves, as kube-proxy does. Returns how
/// many flows were removed. Scans the table: control-plane use only.
pub fn flush_udp_flows_to(conntrack: &FlowTable, endpoint: &crate::service::Endpoint) -> usize {
    conntrack.flush(|f| f.orig.proto == Proto::UDP && f.reply.src == endpoint.addr && f.reply.sport == endpoint.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stride is coprime with every span: a search's tries are
    /// distinct ports of the range (all of it when it is smaller).
    #[test]
    fn snat_search_tries_distinct_ports_of_the_range() {
        for span in [1u32, 2, 3, 64, 1000, 28_976, 64_512, 65_536] {
            let lo = 1024u16;
            for (k, &stride) in SNAT_STRIDES.iter().enumerate() {
                let start = (k as u32 * 7919) % span;
                let search = PortSearch { keep_port: false, lo, span, start, stride: stride % span };
                let tries = SNAT_TRIES.min(span as u16);
                let ports: std::collections::HashSet<u16> = (0..tries).map(|a| search.port(9, a)).collect();
                assert_eq!(ports.len(), usize::from(tries), "span {span}, stride {stride}");
                assert!(ports.iter().all(|&p| u32::from(p - lo) < span), "span {span}");
            }
        }
        let kept = PortSearch { keep_port: true, lo: 2000, span: 10, start: 3, stride: 7 };
        assert_eq!((kept.port(40_000, 0), kept.port(40_000, 1), kept.port(40_000, 2)), (40_000, 2000, 2007));
    }

    #[test]
    fn bits_visits_each_set_bit_once_lowest_first() {
        assert_eq!(bits(0).count(), 0);
        assert_eq!(bits(1 << 63 | 0b101).collect::<Vec<_>>(), [0, 2, 63]);
        assert_eq!(bits(u64::MAX).collect::<Vec<_>>(), (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn copies_and_sums_stop_at_the_services_in_use_and_lose_nothing() {
        let mut w = WorkerState::new();
        w.counters.count_service(3, 100);
        w.counters.count_service(7, 50);
        w.counters.count_service(7, 50);
        w.counters.forwarded = 3;
        assert_eq!(w.counters.services_used, 8);

        let mut snapshot = Counters::default();
        snapshot.copy_from(&w.counters);
        assert_eq!(snapshot.service(3), ServiceCounters { packets: 1, bytes: 100 });
        assert_eq!(snapshot.service(7), ServiceCounters { packets: 2, bytes: 100 });
        assert_eq!(snapshot.forwarded, 3);
        assert_eq!(snapshot.services_used, 8);

        // A snapshot that held more services than the new source (a worker
        // restarted) keeps nothing stale.
        let fresh = WorkerState::new();
        snapshot.copy_from(&fresh.counters);
        assert_eq!(snapshot.service(7), ServiceCounters::default());
        assert_eq!(snapshot.services_used, 0);

        let mut sum = Counters::default();
        sum.add(&w.counters);
        sum.add(&w.counters);
        assert_eq!(sum.service(7), ServiceCounters { packets: 4, bytes: 200 });
        assert_eq!(sum.services_used, 8);
        // Ids past the shared last entry count there.
        w.counters.count_service(u32::MAX, 1);
        assert_eq!(w.counters.services_used, MAX_SERVICE_IDS);
        assert_eq!(w.counters.service(u32::MAX).packets, 1);
    }
}
