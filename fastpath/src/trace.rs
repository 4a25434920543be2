//! What the pipeline decided for a frame, stage by stage, as it decided it.
//!
//! [`crate::pipeline::process_batch_traced`] reports each stage of a
//! packet's path (the stages of the pipeline's module doc) to a [`Trace`];
//! `xskgate explain` records them with [`Recorder`] and prints them. The
//! fast path uses [`NoTrace`], whose methods are empty and inlined, so the
//! calls compile away: the decisions and their explanation come from the
//! same code. A [`Step`] holds plain values (ids, addresses, enums), so
//! recording allocates only in the recorder.

use crate::pipeline::MasqueradeRule;
use crate::service::{FrontendKind, TrafficPolicy};
use crate::verdict::Verdict;
use xskgate_conntrack::{Addr, FlowKey};

/// One stage's decision for a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The frame's tuple, as parsed (TCP and UDP).
    Parsed { key: FlowKey },
    /// A packet of the tracked flow of service port `service`, rewritten by
    /// its conntrack entry.
    Tracked { service: u32 },
    /// The frontend (destination, protocol, port) matched service port
    /// `service`, reached as `kind`; `None`: no Service has this frontend.
    Frontend { service: Option<(u32, FrontendKind)> },
    /// `loadBalancerSourceRanges`: whether the client may reach the Service.
    SourceRanges { allowed: bool },
    /// The traffic class and the policy in force for it.
    Class { external: bool, from_pod: bool, policy: TrafficPolicy, endpoints: usize },
    /// ClientIP affinity: the client's recorded endpoint was still usable.
    Affinity { hit: bool },
    /// The endpoint chosen (by affinity or Maglev).
    Endpoint { id: u32, addr: Addr, port: u16 },
    /// Masquerade: the rule that asks for it (`None`: the client's address
    /// is kept) and the SNAT address used.
    Masquerade { rule: Option<MasqueradeRule>, snat: Option<Addr> },
    /// Direct server return: the client's packet, unchanged, encapsulated
    /// from `outer_src` to the endpoint (`outer_dst`).
    Encapsulated { outer_src: Addr, outer_dst: Addr },
    /// An echo request to a VIP: answered for service port `service`, or
    /// (`None`) not, since none of its Services would be served here.
    Echo { service: Option<u32> },
    /// The tuple before and after the rewrite.
    Rewrite { before: FlowKey, after: FlowKey },
    /// The frame's final verdict.
    Verdict(Verdict),
}

/// Receives the pipeline's steps.
pub trait Trace {
    /// The steps that follow are frame `frame`'s (an index into the frames
    /// given to `process_batch_traced`).
    fn frame(&mut self, frame: usize);
    /// The current frame passed a stage.
    fn step(&mut self, step: Step);
}

/// No trace: what the fast path uses. Compiles to nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTrace;

impl Trace for NoTrace {
    #[inline(always)]
    fn frame(&mut self, _frame: usize) {}
    #[inline(always)]
    fn step(&mut self, _step: Step) {}
}

/// Records every step, per frame, in order.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    pub steps: Vec<(usize, Step)>,
    current: usize,
}

impl Recorder {
    /// The steps of frame `frame`, in order.
    pub fn of(&self, frame: usize) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |(f, _)| *f == frame).map(|(_, s)| s)
    }
}

impl Trace for Recorder {
    fn frame(&mut self, frame: usize) {
        self.current = frame;
    }
    fn step(&mut self, step: Step) {
        self.steps.push((self.current, step));
    }
}
