//! The per-packet pipeline, a pure function of (frame bytes, tables, clock):
//! [`process_batch`] takes up to [`BATCH`] frames, rewrites each in place and
//! returns a [`Verdict`] per frame. The AF_XDP loop only moves descriptors
//! around it; tests and benchmarks call it directly.
//!
//! # A packet's path
//!
//! Each stage is a function below, named as `explain` names it:
//! 1. **parse** ([`wire`]): malformed → `Drop(malformed)`, a fragment →
//!    `Drop(fragment)`, not IP → `Pass`;
//! 2. **conntrack**: a packet of a tracked flow (either direction) is
//!    rewritten by its entry and forwarded ([`tracked`]); an ICMP error
//!    about a tracked flow is translated for the other side ([`icmp_error`]);
//! 3. **frontend**: the Service port of (destination, protocol, port), or
//!    `Pass` when there is none;
//! 4. **source ranges** ([`source_allowed`]): `loadBalancerSourceRanges`;
//! 5. **traffic class and policy** ([`classify`]): external or internal,
//!    and the policy's endpoint set (Cluster or Local);
//! 6. **endpoint set**: empty → `Drop(no_local_endpoints)` if endpoints
//!    exist elsewhere, else a reject ([`no_endpoint`]);
//! 7. **endpoint choice** ([`pick_endpoint`]): ClientIP affinity, then Maglev;
//! 8. **masquerade** ([`masquerade_rule`]): whether the source is rewritten
//!    to the node's SNAT address, and which kube-proxy rule says so;
//! 9. **store** ([`insert_planned`]): the flow's two tuples, its reply tuple
//!    moved over SNAT ports until one is free;
//! 10. **rewrite** ([`nat`]): DNAT/SNAT in place → `Forward { next_hop }`;
//!     a packet whose TTL would reach zero is `Drop(ttl_expired)` and,
//!     within the worker's ICMP budget, answered with time exceeded
//!     ([`ttl_expired`]).
//!
//! # A batch's passes
//!
//! A batch runs these stages in passes over all of its frames, so that the
//! memory misses of its frames overlap instead of following one another
//! (with 1M flows and 10,000 Services nearly every link below is a cache
//! miss). Each pass is a method of [`BatchScratch`] that says which of the
//! batch's arrays it reads and writes; a `u64` mask (bit i = frame i) says
//! which frames a pass concerns:
//! 1. [`BatchScratch::parse`]: frames → `parsed`, `hashes`; mask `hashed`;
//! 2. [`BatchScratch::probe_conntrack`]: → `candidates`; mask `absent`;
//! 3. [`BatchScratch::find_frontends`]: → `found`; mask `likely_new`;
//! 4. [`BatchScratch::prefetch_endpoints`]: → `flow_hashes`;
//! 5. [`BatchScratch::decide`]: verdicts of tracked and finished frames,
//!    `planned` for new flows; mask `to_insert`;
//! 6. [`BatchScratch::prefetch_replies`]: → `reply_hashes`;
//! 7. [`BatchScratch::store`]: the new flows' verdicts.
//!
//! Passes 1–4 only load memory early, and pass 6 may also move a new flow
//! past an SNAT port whose reply tuple looks taken: none changes a table
//! or a verdict, so a frame's verdict is what [`process`] (the stages
//! above, one frame at a time) gives it, though a new flow's SNAT port may
//! differ. No allocation, no lock, no system call:
//! counters live in the caller's [`WorkerState`], tables are read-only or
//! lock-free.

use crate::affinity::AffinityTable;
use crate::nat;
use crate::service::{
    Endpoint, EndpointSet, Found, FrontendKind, NodeConfig, ServicePort, ServiceTable, TrafficPolicy,
};
use crate::trace::{NoTrace, Step, Trace};
use crate::verdict::{Counters, DropReason, Verdict};
use crate::wire::{self, Inner, L4, Parsed, Unparsed};
use xskgate_conntrack::{
    Addr, Candidate, FirstPacket, FlowKey, FlowState, FlowTable, FlowView, InsertError, Inserted, KeyHash, NewFlow,
    Proto, TcpState, tcp_flags,
};

/// Frames per batch (the AF_XDP ring batch).
pub const BATCH: usize = 64;

/// The most SNAT ports a new flow tries before giving up: all of a range
/// that is smaller. Linux's NAT tries up to about 240 ports of a range
/// (128, then halves at random offsets); with 64 a range of 200 ports could
/// not be filled: the last free ports were out of reach of most searches.
pub const SNAT_TRIES: u16 = 256;
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

/// Everything a worker owns: its counters and the scratch space of a
/// batch. Allocated once.
#[derive(Clone, Debug, Default)]
pub struct WorkerState {
    pub counters: Counters,
    scratch: Box<BatchScratch>,
}

impl WorkerState {
    pub fn new() -> WorkerState {
        WorkerState::default()
    }
}

/// What one pass of a batch computes for the next, per frame. Kept between
/// batches so that a batch does not initialise 7 KB of stack. An entry is
/// meaningful only for the frames of the mask its writer returned.
#[derive(Clone, Debug)]
struct BatchScratch {
    /// Each frame's parse (every frame).
    parsed: [Result<Parsed, Unparsed>; BATCH],
    /// The conntrack hash of each TCP or UDP frame's key (`hashed`).
    hashes: [KeyHash; BATCH],
    /// Where each hashed frame's lookup reads first (`hashed`).
    candidates: [Candidate; BATCH],
    /// The service port of each frame whose key was absent (`absent`).
    found: [Option<Found>; BATCH],
    /// The [`flow_hash`] of each frame that likely starts a flow (`likely_new`).
    flow_hashes: [u64; BATCH],
    /// Each new flow's plan (`to_insert`).
    planned: [Option<Planned>; BATCH],
    /// The hash of each planned flow's reply tuple (`to_insert`).
    reply_hashes: [KeyHash; BATCH],
}

impl Default for BatchScratch {
    fn default() -> BatchScratch {
        BatchScratch {
            parsed: [Err(Unparsed::NotIp); BATCH],
            hashes: [KeyHash::default(); BATCH],
            candidates: [Candidate::NONE; BATCH],
            found: [None; BATCH],
            flow_hashes: [0; BATCH],
            planned: [None; BATCH],
            reply_hashes: [KeyHash::default(); BATCH],
        }
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
    process_batch_traced(frames, t, w, now, verdicts, &mut NoTrace);
}

/// [`process_batch`], reporting each frame's stages to `trace` (frame
/// indices are into `frames`).
///
/// # Panics
/// If `verdicts` is shorter than `frames` (a caller bug, not packet data).
pub fn process_batch_traced<T: Trace>(
    frames: &mut [Frame<'_>],
    t: &Tables<'_>,
    w: &mut WorkerState,
    now: u32,
    verdicts: &mut [Verdict],
    trace: &mut T,
) {
    assert!(verdicts.len() >= frames.len(), "one verdict per frame");
    for (chunk, (frames, verdicts)) in frames.chunks_mut(BATCH).zip(verdicts.chunks_mut(BATCH)).enumerate() {
        let WorkerState { counters, scratch } = &mut *w;
        let first = chunk * BATCH;
        let hashed = scratch.parse(frames, t);
        let absent = scratch.probe_conntrack(hashed, t);
        let likely_new = scratch.find_frontends(absent, t);
        scratch.prefetch_endpoints(likely_new, t);
        let to_insert = scratch.decide(frames, hashed, t, counters, now, verdicts, trace, first);
        scratch.prefetch_replies(to_insert, t, counters);
        scratch.store(frames, to_insert, hashed, t, counters, now, verdicts, trace, first);
    }
}

/// Counts a frame's final verdict and reports it.
#[inline(always)]
fn finish<T: Trace>(c: &mut Counters, v: Verdict, tr: &mut T) -> Verdict {
    tr.step(Step::Verdict(v));
    c.account(v)
}

impl BatchScratch {
    /// Pass 1, **parse**. Reads: every frame. Writes: `parsed[i]` of every
    /// frame; `hashes[i]` of each TCP or UDP frame, whose conntrack hint is
    /// prefetched. Returns those frames (`hashed`).
    #[inline(always)]
    fn parse(&mut self, frames: &[Frame<'_>], t: &Tables<'_>) -> u64 {
        let mut hashed = 0u64;
        for (i, f) in frames.iter().enumerate() {
            let frame = &f.buf[..f.len.min(f.buf.len())];
            // The key is taken from the parse while it is in registers: read
            // back from `parsed`, its two ports (stored as two halves) would
            // be loaded as one word, which waits for the stores to retire.
            let key = match wire::parse_common(frame) {
                Some(p) => {
                    let key = key_of(&p);
                    self.parsed[i] = Ok(p);
                    Some(key)
                }
                None => {
                    self.parsed[i] = wire::parse_general(frame);
                    match &self.parsed[i] {
                        Ok(p) if matches!(p.l4_kind, L4::Tcp | L4::Udp) => Some(key_of(p)),
                        _ => None,
                    }
                }
            };
            if let Some(key) = key {
                self.hashes[i] = t.conntrack.hash(&key);
                t.conntrack.prefetch(&self.hashes[i]);
                hashed |= 1 << i;
            }
        }
        hashed
    }

    /// Pass 2, **conntrack probe**. Reads: `hashes` (`hashed`), the hints
    /// pass 1 prefetched. Writes: `candidates[i]`, whose slot is
    /// prefetched. For a key whose chain ended without its tag
    /// (`Candidate::ABSENT`: it starts a flow) the frontend index entry is
    /// prefetched. Returns those frames (`absent`).
    #[inline(always)]
    fn probe_conntrack(&mut self, hashed: u64, t: &Tables<'_>) -> u64 {
        let mut absent = 0u64;
        for i in bits(hashed) {
            self.candidates[i] = t.conntrack.prefetch_slot(&self.hashes[i]);
            if self.candidates[i] == Candidate::ABSENT
                && let Ok(p) = &self.parsed[i]
            {
                t.services.prefetch_frontend(&p.dst, p.proto, p.dport);
                absent |= 1 << i;
            }
        }
        absent
    }

    /// Pass 3, **frontend**. Reads: `parsed` (`absent`). Writes: `found[i]`
    /// of every absent frame (pass 5 reads it); the service port of each
    /// one to a Service is prefetched. Returns those (`likely_new`). A key
    /// whose probe was too long to tell is looked up as usual in pass 5:
    /// prefetching a decision for it would cost established flows memory
    /// traffic.
    #[inline(always)]
    fn find_frontends(&mut self, absent: u64, t: &Tables<'_>) -> u64 {
        let mut likely_new = 0u64;
        for i in bits(absent) {
            if let Ok(p) = &self.parsed[i] {
                self.found[i] = t.services.find(&p.dst, p.proto, p.dport);
                if let Some(service) = self.found[i] {
                    t.services.prefetch(service);
                    likely_new |= 1 << i;
                }
            }
        }
        likely_new
    }

    /// Pass 4, **endpoint prefetch**. Reads: `parsed`, `found`
    /// (`likely_new`). Writes: `flow_hashes[i]`. Prefetches the Maglev entry
    /// the flow's hash picks in its class's endpoint set, then, once that
    /// entry is on its way, the endpoint it names.
    #[inline(always)]
    fn prefetch_endpoints(&mut self, likely_new: u64, t: &Tables<'_>) {
        // Bit i: frame i's class uses the Local endpoint set.
        let mut local = 0u64;
        for i in bits(likely_new) {
            if let Ok(p) = &self.parsed[i]
                && let Some(found) = self.found[i]
                && let Some(svc) = t.services.get(found)
            {
                self.flow_hashes[i] = flow_hash(&key_of(p));
                let class = classify(t.services, svc, found.kind, &p.src);
                class.set.prefetch_pick(self.flow_hashes[i]);
                local |= u64::from(class.policy == TrafficPolicy::Local) << i;
            }
        }
        for i in bits(likely_new) {
            if let Some(svc) = self.found[i].and_then(|found| t.services.get(found)) {
                let set = if local & 1 << i != 0 { &svc.local } else { &svc.cluster };
                set.prefetch_endpoint(self.flow_hashes[i]);
            }
        }
    }

    /// Pass 5, **decide**. Reads: every frame, `parsed`, and for `hashed`
    /// frames `hashes`, `candidates` and `found`. Writes: the verdict of
    /// every frame that does not start a flow (a tracked flow's packet is
    /// rewritten and forwarded here), and `planned[i]` of each that does.
    /// Returns those (`to_insert`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn decide<T: Trace>(
        &mut self,
        frames: &mut [Frame<'_>],
        hashed: u64,
        t: &Tables<'_>,
        counters: &mut Counters,
        now: u32,
        verdicts: &mut [Verdict],
        tr: &mut T,
        first: usize,
    ) -> u64 {
        let mut to_insert = 0u64;
        for (i, f) in frames.iter_mut().enumerate() {
            tr.frame(first + i);
            // The established flow's packet, the bulk of all traffic, is
            // handled here; everything else is out of line, so that this
            // loop keeps its values in registers.
            //
            // A key found `ABSENT` by pass 2 is not looked up again: a flow
            // is stored before its first packet is forwarded, so a later
            // packet of it (either direction) finds it hinted. Only a flow
            // that another worker is storing at this very moment is
            // missed, and the insert-if-absent finds it then (as when two
            // workers take the same new flow at once).
            let look = match &self.parsed[i] {
                Ok(p) if hashed & 1 << i != 0 => {
                    match t.conntrack.lookup_unless_absent(&self.hashes[i], self.candidates[i]) {
                        Some(view) => {
                            let v = tracked(f, p, &view, t, counters, now, tr);
                            verdicts[i] = finish(counters, v, tr);
                            continue;
                        }
                        None => {
                            let looked_up = (self.candidates[i] == Candidate::ABSENT).then_some(self.found[i]);
                            untracked(f, p, looked_up, t, counters, now, &mut self.planned[i], tr)
                        }
                    }
                }
                p => first_look(f, p, t, counters, now, &mut self.planned[i], tr),
            };
            match look {
                Some(v) => verdicts[i] = finish(counters, v, tr),
                None => {
                    if self.planned[i].is_some() {
                        to_insert |= 1 << i;
                    }
                }
            }
        }
        to_insert
    }

    /// Pass 6, **reply prefetch**. Reads: `planned` (`to_insert`). Writes:
    /// `reply_hashes[i]`, whose hint and insert slots are prefetched. A
    /// reply tuple whose tag is hinted already is most likely another
    /// flow's (its SNAT port is taken): such a flow moves to the search's
    /// next port here (`planned[i]` changes), while that tuple's memory can
    /// still be prefetched, instead of finding out in the insert with
    /// nothing prefetched (with half an endpoint's SNAT ports in use that
    /// was most of a new flow's cost). The insert still checks for real.
    #[inline(always)]
    fn prefetch_replies(&mut self, to_insert: u64, t: &Tables<'_>, counters: &mut Counters) {
        // Hashed here, not as pass 5 writes each plan: read straight after
        // the out-of-line decision stored it, the tuple's ports (stored as
        // two halves, loaded as one word) wait for those stores to reach
        // the cache, which behind the batch's misses takes long.
        for i in bits(to_insert) {
            if let Some(plan) = &self.planned[i] {
                self.reply_hashes[i] = t.conntrack.hash(&plan.flow.reply);
                t.conntrack.prefetch_insert(&self.reply_hashes[i]);
            }
        }
        let mut check = to_insert;
        for round in 0..=SNAT_PRECHECK_ROUNDS {
            let mut moved = 0u64;
            for i in bits(check) {
                let likely_taken = t.conntrack.prefetch_slot(&self.reply_hashes[i]).has_slot();
                if !likely_taken || round == SNAT_PRECHECK_ROUNDS {
                    continue;
                }
                if let (Ok(p), Some(plan)) = (&self.parsed[i], &mut self.planned[i])
                    && let Some(port) = plan.next_port(p.sport)
                {
                    self.reply_hashes[i] = t.conntrack.hash_with_dport(&self.reply_hashes[i], port);
                    t.conntrack.prefetch_insert(&self.reply_hashes[i]);
                    counters.snat_port_retries += 1;
                    moved |= 1 << i;
                }
            }
            check = moved;
            if check == 0 {
                break;
            }
        }
    }

    /// Pass 7, **store**. Reads: `parsed`, `planned`, `reply_hashes`
    /// (`to_insert`), `hashes` (`hashed`). Stores each planned flow and
    /// forwards its first packet; writes its verdict.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn store<T: Trace>(
        &self,
        frames: &mut [Frame<'_>],
        to_insert: u64,
        hashed: u64,
        t: &Tables<'_>,
        counters: &mut Counters,
        now: u32,
        verdicts: &mut [Verdict],
        tr: &mut T,
        first: usize,
    ) {
        for i in bits(to_insert) {
            if let (Some(f), Ok(p), Some(plan)) = (frames.get_mut(i), &self.parsed[i], &self.planned[i]) {
                tr.frame(first + i);
                // A planned flow's original tuple is its frame's key, hashed
                // in pass 1 if the frame was hashed there.
                let orig = if hashed & 1 << i != 0 { self.hashes[i] } else { t.conntrack.hash(&plan.flow.orig) };
                let v = insert_planned(f, p, plan, [&orig, &self.reply_hashes[i]], t, counters, now, tr);
                verdicts[i] = finish(counters, v, tr);
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

/// Processes one frame: the stages of the module doc, without the batch's
/// prefetching (the same verdict as [`process_batch`]).
pub fn process(f: &mut Frame<'_>, t: &Tables<'_>, w: &mut WorkerState, now: u32) -> Verdict {
    let p = wire::parse(&f.buf[..f.len.min(f.buf.len())]);
    let (c, tr) = (&mut w.counters, &mut NoTrace);
    let mut plan = None;
    let v = match (first_look(f, &p, t, c, now, &mut plan, tr), &p, &plan) {
        (Some(v), _, _) => v,
        (None, Ok(p), Some(plan)) => {
            let hashes = [plan.flow.orig, plan.flow.reply].map(|k| t.conntrack.hash(&k));
            insert_planned(f, p, plan, [&hashes[0], &hashes[1]], t, c, now, tr)
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

/// Stages 1–2 for a frame the batch did not look up: its verdict, or
/// (`None`) a new flow planned into `plan` for the caller to store. A batch
/// stores its new flows after it has looked at every frame, so that their
/// reply tuples' memory is on its way. (The plan is written in place:
/// returning it would make every tracked packet's result as large as a
/// plan.)
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn first_look<T: Trace>(
    f: &mut Frame<'_>,
    p: &Result<Parsed, Unparsed>,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    plan: &mut Option<Planned>,
    tr: &mut T,
) -> Option<Verdict> {
    let v = match p {
        Ok(p) => match p.l4_kind {
            L4::Tcp | L4::Udp => {
                return match t.conntrack.lookup(&key_of(p)) {
                    Some(view) => Some(tracked(f, p, &view, t, c, now, tr)),
                    None => untracked(f, p, None, t, c, now, plan, tr),
                };
            }
            L4::IcmpError => match wire::icmp_inner(f.buf, p) {
                Some(inner) => icmp_error(f, p, &inner, t, c),
                None => Verdict::Pass,
            },
            L4::EchoRequest => echo(f, p, t, c, tr),
            L4::Other => Verdict::Pass,
        },
        Err(Unparsed::NotIp) => Verdict::Pass,
        Err(Unparsed::Malformed) => c.drop(DropReason::Malformed),
        Err(Unparsed::Fragment) => c.drop(DropReason::Fragment),
    };
    Some(v)
}

/// Stage 2, a packet of the tracked flow direction `view`: rewritten by
/// its entry, which records it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tracked<T: Trace>(
    f: &mut Frame<'_>,
    p: &Parsed,
    view: &FlowView,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    tr: &mut T,
) -> Verdict {
    tr.step(Step::Parsed { key: key_of(p) });
    tr.step(Step::Tracked { service: view.service });
    if p.ttl <= 1 {
        return ttl_expired(f, p, t.services, view.service, c, now);
    }
    t.conntrack.touch(view, now, (p.end - p.l3) as u64, p.tcp_flags);
    rewrite(f, p, view, c, tr)
}

/// A TCP or UDP packet of no tracked flow: stage 3 (its frontend, unless
/// the batch has looked it up already: `looked_up`), then the new flow's
/// decision.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn untracked<T: Trace>(
    f: &mut Frame<'_>,
    p: &Parsed,
    looked_up: Option<Option<Found>>,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    plan: &mut Option<Planned>,
    tr: &mut T,
) -> Option<Verdict> {
    tr.step(Step::Parsed { key: key_of(p) });
    let service = looked_up.unwrap_or_else(|| t.services.find(&p.dst, p.proto, p.dport));
    plan_new_flow(f, p, service, t, c, now, plan, tr)
}

/// Stage 10: rewrites a packet of a flow that has recorded it already and
/// counts it for its service.
#[inline(always)]
fn rewrite<T: Trace>(f: &mut Frame<'_>, p: &Parsed, view: &FlowView, c: &mut Counters, tr: &mut T) -> Verdict {
    tr.step(Step::Rewrite { before: key_of(p), after: view.rewrite() });
    nat::rewrite(f.buf, p, view);
    c.count_service(view.service, p.end - p.l3);
    Verdict::Forward { next_hop: view.rewrite_dst() }
}

/// Stage 4: whether `loadBalancerSourceRanges` lets the client in. They
/// apply to the LoadBalancer frontends only, as kube-proxy's
/// KUBE-FW chain does; none means everyone.
#[inline]
fn source_allowed(svc: &ServicePort, kind: FrontendKind, src: &Addr) -> bool {
    kind != FrontendKind::LoadBalancer
        || svc.source_ranges.is_empty()
        || svc.source_ranges.iter().any(|c| c.contains(src))
}

/// A new flow's traffic class and the endpoint set its policy allows.
struct Class<'a> {
    /// The client is in one of the cluster's pod CIDRs.
    from_pod: bool,
    external: bool,
    policy: TrafficPolicy,
    set: &'a EndpointSet,
}

/// Stage 5, traffic class: a ClusterIP is internal; an external address
/// reached from a pod is internal too (kube-proxy: "Redirect pods trying to
/// reach external loadbalancer VIP to clusterIP"). The class's policy picks
/// the endpoint set.
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

/// Stage 6, an empty endpoint set: kube-proxy's KUBE-MARK-DROP when the
/// Service has endpoints the policy excludes (Local, none on this node),
/// else its REJECT (no endpoint anywhere).
fn no_endpoint(f: &mut Frame<'_>, p: &Parsed, svc: &ServicePort, c: &mut Counters) -> Verdict {
    if !svc.cluster.is_empty() || !svc.local.is_empty() {
        return c.drop_for(svc.id, DropReason::NoLocalEndpoints);
    }
    reject(f, p, svc.id, c)
}

/// Stage 7, the endpoint: with `sessionAffinity: ClientIP` the client's
/// recorded endpoint while it is still in the set, else Maglev's pick for
/// the flow's hash (recorded for the client). `None` if the set has none.
#[inline]
#[allow(clippy::too_many_arguments)]
fn pick_endpoint<T: Trace>(
    svc: &ServicePort,
    set: &EndpointSet,
    src: &Addr,
    flow_hash: u64,
    affinity: &AffinityTable,
    now: u32,
    tr: &mut T,
) -> Option<Endpoint> {
    let Some(timeout) = svc.affinity_timeout else {
        return set.pick(flow_hash).copied();
    };
    let sticky = affinity.get(svc.id, src, now, timeout).and_then(|id| set.by_id(id));
    tr.step(Step::Affinity { hit: sticky.is_some() });
    let ep = sticky.or_else(|| set.pick(flow_hash))?;
    affinity.record(svc.id, src, ep.id, now);
    Some(*ep)
}

/// Why a new flow's source is rewritten to the node's SNAT address
/// (kube-proxy's KUBE-MARK-MASQ rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasqueradeRule {
    /// The client is the endpoint itself (hairpin).
    Hairpin,
    /// External traffic under policy Cluster (the second hop must return
    /// through this node).
    ExternalCluster,
    /// A ClusterIP reached from outside the pod CIDRs (`! -s clusterCIDR`).
    ClusterIpFromOutside,
}

/// Stage 8: the rule that masquerades this flow, or `None` (the client's
/// address is kept).
#[inline]
fn masquerade_rule(
    node: &NodeConfig,
    kind: FrontendKind,
    class: &Class<'_>,
    src: &Addr,
    endpoint: &Addr,
) -> Option<MasqueradeRule> {
    if src == endpoint {
        Some(MasqueradeRule::Hairpin)
    } else if class.external && class.policy == TrafficPolicy::Cluster {
        Some(MasqueradeRule::ExternalCluster)
    } else if kind == FrontendKind::ClusterIp && !class.from_pod && !node.pod_cidrs.is_empty() {
        Some(MasqueradeRule::ClusterIpFromOutside)
    } else {
        None
    }
}

/// The conntrack state a flow starts in.
#[inline]
fn initial_state(p: &Parsed) -> FlowState {
    match p.proto {
        Proto::TCP if p.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN => {
            FlowState::Tcp(TcpState::SynSent)
        }
        // A mid-stream segment (e.g. after a gateway restart) is picked up
        // as established, as Linux's nf_conntrack_tcp_loose does.
        Proto::TCP => FlowState::Tcp(TcpState::Established),
        _ => FlowState::Udp { replied: false },
    }
}

/// Stages 4–8 for a new flow: its plan, written into `plan` (and `None`
/// returned), or the packet's verdict.
#[allow(clippy::too_many_arguments)]
fn plan_new_flow<T: Trace>(
    f: &mut Frame<'_>,
    p: &Parsed,
    service: Option<Found>,
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    plan: &mut Option<Planned>,
    tr: &mut T,
) -> Option<Verdict> {
    let services = t.services;
    let found = service.and_then(|found| Some((services.get(found)?, found.kind)));
    tr.step(Step::Frontend { service: found.map(|(svc, kind)| (svc.id, kind)) });
    let Some((svc, kind)) = found else {
        return Some(Verdict::Pass);
    };
    let allowed = source_allowed(svc, kind, &p.src);
    tr.step(Step::SourceRanges { allowed });
    if !allowed {
        return Some(c.drop_for(svc.id, DropReason::SourceRange));
    }
    let class = classify(services, svc, kind, &p.src);
    let endpoints = class.set.endpoints().len();
    tr.step(Step::Class { external: class.external, from_pod: class.from_pod, policy: class.policy, endpoints });
    if class.set.is_empty() {
        return Some(no_endpoint(f, p, svc, c));
    }
    if p.ttl <= 1 {
        return Some(ttl_expired(f, p, services, svc.id, c, now));
    }
    let key = key_of(p);
    let fh = flow_hash(&key);
    let Some(ep) = pick_endpoint(svc, class.set, &p.src, fh, t.affinity, now, tr) else {
        return Some(reject(f, p, svc.id, c));
    };
    tr.step(Step::Endpoint { id: ep.id, addr: ep.addr, port: ep.port });
    if ep.addr.is_v4() == p.v6 {
        return Some(c.drop_for(svc.id, DropReason::InvalidTuple));
    }
    let node = services.node();
    if svc.dsr && dsr_applies(kind, &class) {
        return Some(direct_server_return(f, p, svc.id, &ep.addr, node, c, tr));
    }
    let rule = masquerade_rule(node, kind, &class, &p.src, &ep.addr);
    let snat = rule.and_then(|_| node.snat_for(&ep.addr));
    tr.step(Step::Masquerade { rule, snat });
    let (reply_dst, keep_port) = match (rule, snat) {
        (Some(_), Some(a)) => (a, false),
        (Some(_), None) => return Some(c.drop_for(svc.id, DropReason::NoSnatAddress)),
        (None, _) => (p.src, true),
    };
    let search = PortSearch::new(node.snat_ports, keep_port, fh);
    let reply =
        FlowKey { proto: p.proto, src: ep.addr, sport: ep.port, dst: reply_dst, dport: search.port(p.sport, 0) };
    *plan = Some(Planned {
        flow: NewFlow { orig: key, reply, backend: ep.id, service: svc.id, state: initial_state(p) },
        search,
        attempt: 0,
    });
    None
}

/// Whether a DSR Service's packet goes by direct server return: external
/// traffic to a LoadBalancer IP or externalIP under policy Cluster (the
/// endpoint answers from that address, which it holds; a NodePort's
/// address it does not, and Local keeps the client's address already).
#[inline]
fn dsr_applies(kind: FrontendKind, class: &Class<'_>) -> bool {
    class.external
        && class.policy == TrafficPolicy::Cluster
        && matches!(kind, FrontendKind::LoadBalancer | FrontendKind::ExternalIp)
}

/// Stage 8–10 for direct server return: no masquerade and no flow stored;
/// the packet, its TTL decremented, is encapsulated (IPIP / IP6IP6) from
/// this gateway's address toward the endpoint to `endpoint`, whose node's
/// tunnel device hands it to the pod unchanged.
fn direct_server_return<T: Trace>(
    f: &mut Frame<'_>,
    p: &Parsed,
    service: u32,
    endpoint: &Addr,
    node: &NodeConfig,
    c: &mut Counters,
    tr: &mut T,
) -> Verdict {
    let Some(outer_src) = node.snat_for(endpoint) else {
        return c.drop_for(service, DropReason::NoSnatAddress);
    };
    tr.step(Step::Encapsulated { outer_src, outer_dst: *endpoint });
    match nat::encapsulate(f.buf, f.len, p, &outer_src, endpoint) {
        Some(len) => {
            f.len = len;
            c.count_service(service, p.end - p.l3);
            Verdict::Forward { next_hop: *endpoint }
        }
        None => c.drop_for(service, DropReason::Malformed),
    }
}

/// Stage 9, store: a planned flow's two tuples, and stage 10 for its
/// first packet. The SNAT port allocator: the reply tuple must be unique, so while it is taken the
/// table moves it to the search's next port, up to [`SNAT_TRIES`] ports in
/// all (counting those the batch skipped before the insert).
#[allow(clippy::too_many_arguments)]
fn insert_planned<T: Trace>(
    f: &mut Frame<'_>,
    p: &Parsed,
    plan: &Planned,
    hashes: [&KeyHash; 2],
    t: &Tables<'_>,
    c: &mut Counters,
    now: u32,
    tr: &mut T,
) -> Verdict {
    // The table records the packet on the flow it stores or finds.
    let first = FirstPacket { bytes: (p.end - p.l3) as u64, tcp_flags: p.tcp_flags };
    let (search, mut attempt) = (plan.search, plan.attempt);
    let mut taken = 0;
    let next_port = || {
        taken += 1;
        next_attempt(&mut attempt, search.tries).map(|a| search.port(p.sport, a))
    };
    let inserted = t.conntrack.insert_missed_hashed(&plan.flow, hashes, now, first, next_port);
    c.snat_port_retries += taken;
    let id = plan.flow.service;
    let view = match inserted {
        Ok(Inserted::New(v)) => {
            c.flows_created += 1;
            v
        }
        Ok(Inserted::Existing(v)) => v,
        Err(InsertError::ReplyTaken) => return c.drop_for(id, DropReason::SnatExhausted),
        Err(InsertError::Full | InsertError::ProbeLimit) => return c.drop_for(id, DropReason::ConntrackFull),
        Err(InsertError::Contended) => return c.drop_for(id, DropReason::ConntrackContended),
        Err(InsertError::InvalidTuple) => return c.drop_for(id, DropReason::InvalidTuple),
    };
    rewrite(f, p, &view, c, tr)
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
        let attempt = next_attempt(&mut self.attempt, self.search.tries)?;
        let port = self.search.port(sport, attempt);
        self.flow.reply.dport = port;
        Some(port)
    }
}

/// The SNAT search's attempt after `attempt`, counted in it; `None`
/// (unchanged) after `tries` ports ([`PortSearch::tries`]).
#[inline]
fn next_attempt(attempt: &mut u16, tries: u16) -> Option<u16> {
    if *attempt + 1 >= tries {
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
    /// How many ports the search tries: [`SNAT_TRIES`], or the whole range
    /// when that is smaller (and the client's own port first).
    tries: u16,
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
    /// The search of a flow with hash `flow_hash` over the SNAT `ports`
    /// (`(lo, hi)`, inclusive); `keep_port` tries the client's own first.
    #[inline]
    fn new((lo, hi): (u16, u16), keep_port: bool, flow_hash: u64) -> PortSearch {
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        PortSearch {
            keep_port,
            lo,
            span,
            start: (flow_hash % u64::from(span)) as u32,
            // Not reduced here (see `SNAT_STRIDES`).
            stride: SNAT_STRIDES[(flow_hash >> 60) as usize],
            tries: (span + u32::from(keep_port)).min(u32::from(SNAT_TRIES)) as u16,
        }
    }

    /// The port of attempt `attempt` for a client port `sport`.
    #[inline]
    fn port(&self, sport: u16, attempt: u16) -> u16 {
        // Without masquerade the client's port is kept unless its reply
        // tuple clashes (then it is remapped, as Linux's NAT does).
        match attempt {
            0 if self.keep_port => sport,
            0 => self.lo.wrapping_add(self.start as u16),
            // At most 65,535 + 255 × 65,651: no overflow.
            _ => self.lo.wrapping_add(((self.start + u32::from(attempt) * self.stride) % self.span) as u16),
        }
    }
}

/// Stage 6's kube-proxy REJECT for a Service without endpoints: TCP RST or ICMP
/// port unreachable, generated in place.
fn reject(f: &mut Frame<'_>, p: &Parsed, service: u32, c: &mut Counters) -> Verdict {
    let len = match p.proto {
        Proto::TCP => nat::tcp_reset(f.buf, p),
        _ => nat::port_unreachable(f.buf, p),
    };
    match len {
        Some(len) => {
            f.len = len;
            c.rejected += 1;
            Verdict::Reply
        }
        None => c.drop_for(service, DropReason::NoEndpoints),
    }
}

/// A Service's packet whose TTL (hop limit) would reach zero here: counted
/// as a `ttl_expired` drop of its Service port and, within the worker's
/// ICMP budget, answered with time exceeded from this gateway's address
/// toward the sender (the masquerade address of the sender's route), as a
/// router answers it: traceroute's hop. Without an address of the sender's
/// family the packet is only dropped.
fn ttl_expired(
    f: &mut Frame<'_>,
    p: &Parsed,
    services: &ServiceTable,
    service: u32,
    c: &mut Counters,
    now: u32,
) -> Verdict {
    let dropped = c.drop_for(service, DropReason::TtlExpired);
    // No ICMP error to a source that is not one host (RFC 1812 §4.3.2.7).
    let one_host = match p.src.to_ip() {
        std::net::IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
        std::net::IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    };
    let Some(from) = services.node().snat_for(&p.src).filter(|_| one_host) else { return dropped };
    if !c.icmp_budget.take(now) {
        return dropped;
    }
    match nat::icmp_error_reply(f.buf, p, &from, nat::IcmpErrorKind::TimeExceeded) {
        Some(len) => {
            f.len = len;
            c.time_exceeded_sent += 1;
            Verdict::Reply
        }
        None => dropped,
    }
}

/// Stage 3 for an echo request: to a LoadBalancer IP or externalIP, the
/// gateway answers it only where the Service would be served
/// ([`ServiceTable::echo`]); to any other address it is the kernel's.
fn echo<T: Trace>(f: &mut Frame<'_>, p: &Parsed, t: &Tables<'_>, c: &mut Counters, tr: &mut T) -> Verdict {
    match t.services.echo(&p.dst) {
        crate::service::Echo::NotVip => Verdict::Pass,
        crate::service::Echo::NotServed => {
            tr.step(Step::Echo { service: None });
            c.drop(DropReason::EchoNotServed)
        }
        crate::service::Echo::Answer(id) => {
            tr.step(Step::Echo { service: Some(id) });
            match nat::echo_reply(f.buf, p) {
                Some(len) => {
                    f.len = len;
                    c.echo_replies += 1;
                    Verdict::Reply
                }
                None => c.drop(DropReason::Malformed),
            }
        }
    }
}

/// Stage 2 for an ICMP error about a packet of a tracked flow: translate
/// it for the other side (outer destination and the embedded packet).
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
            let lo = if span > 64_512 { 0 } else { 1024u16 };
            for (k, &stride) in SNAT_STRIDES.iter().enumerate() {
                let start = (k as u32 * 7919) % span;
                let search = PortSearch::new((lo, lo + (span - 1) as u16), false, 0);
                let search = PortSearch { start, stride, ..search };
                let tries = search.tries;
                assert_eq!(u32::from(tries), span.min(u32::from(SNAT_TRIES)), "a small range is tried whole");
                let ports: std::collections::HashSet<u16> = (0..tries).map(|a| search.port(9, a)).collect();
                assert_eq!(ports.len(), usize::from(tries), "span {span}, stride {stride}");
                assert!(ports.iter().all(|&p| u32::from(p - lo) < span), "span {span}");
            }
        }
        let kept = PortSearch { start: 3, stride: 7, ..PortSearch::new((2000, 2009), true, 0) };
        assert_eq!((kept.port(40_000, 0), kept.port(40_000, 1), kept.port(40_000, 2)), (40_000, 2000, 2007));
        assert_eq!(kept.tries, 11, "the client's port, then all ten of the range");
        let ports: std::collections::HashSet<u16> = (1..kept.tries).map(|a| kept.port(40_000, a)).collect();
        assert_eq!(ports.len(), 10);
    }

    #[test]
    fn bits_visits_each_set_bit_once_lowest_first() {
        assert_eq!(bits(0).count(), 0);
        assert_eq!(bits(1 << 63 | 0b101).collect::<Vec<_>>(), [0, 2, 63]);
        assert_eq!(bits(u64::MAX).collect::<Vec<_>>(), (0..64).collect::<Vec<_>>());
    }
}
