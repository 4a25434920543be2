//! What the pipeline decides for a frame, and what it counts.
//!
//! A [`Verdict`] per frame tells the I/O layer what to do with it; a
//! dropped frame carries its [`DropReason`], whose stable snake_case name is
//! the `reason` label of `xskgate_drops_total` and what `explain` prints.
//! [`Counters`] are one worker's: plain integers the worker alone writes,
//! summed by a reader over workers. Nothing here allocates after
//! [`Counters::default`] or panics.

use xskgate_conntrack::Addr;

/// Service ids at or above this share the last per-service counter.
pub const MAX_SERVICE_IDS: usize = 1 << 16;

/// What the I/O layer does with a frame after the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on towards `next_hop` (the IP destination after NAT); the I/O
    /// layer resolves the route and neighbour and rewrites the L2 header.
    Forward { next_hop: Addr },
    /// Not a Service's packet (nor a reply or an ICMP error of a tracked
    /// flow): the pipeline leaves it unchanged and decides nothing about it.
    /// It is the kernel's: the I/O layer treats it as the kernel's IP
    /// forwarding would (see `io::xsk`), since a frame that reached a socket
    /// cannot be handed back to the kernel's stack.
    Pass,
    /// Dropped, for a reason an operator can see.
    Drop(DropReason),
    /// An answer was generated in place (a reject, or the reply to an echo
    /// request for a served VIP; MACs swapped): send it back out of the
    /// interface it came in on.
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
    EchoNotServed => "echo_not_served", "An echo request to a LoadBalancer IP or externalIP of Services none of which would be served here (no usable endpoint for its policy): not answered.";
}

/// Packets and bytes of one service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// ICMP errors a worker originates per second at most (the kernel's
/// `net.ipv4.icmp_msgs_per_sec` default); past it the packet is only dropped.
pub const ICMP_ERRORS_PER_SECOND: u32 = 1000;

/// A worker's budget of the ICMP errors it originates, so that a flood of
/// expiring packets is not reflected at line rate (the kernel rate-limits
/// its ICMP errors for the same reason).
#[derive(Clone, Copy, Debug, Default)]
pub struct IcmpBudget {
    second: u32,
    sent: u32,
}

impl IcmpBudget {
    /// Whether one more error may be sent at `now` (seconds), and if so,
    /// counts it.
    #[inline]
    pub fn take(&mut self, now: u32) -> bool {
        if self.second != now {
            *self = IcmpBudget { second: now, sent: 0 };
        }
        let ok = self.sent < ICMP_ERRORS_PER_SECOND;
        self.sent += u32::from(ok);
        ok
    }
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
    /// Echo requests to a served VIP answered by the gateway.
    pub echo_replies: u64,
    /// ICMP time exceeded sent for packets whose TTL (hop limit) ran out
    /// here (each is also a `ttl_expired` drop).
    pub time_exceeded_sent: u64,
    /// Not a counter: this worker's budget of ICMP errors it originates.
    pub icmp_budget: IcmpBudget,
    /// Indexed by service port id (ids ≥ [`MAX_SERVICE_IDS`] share the last).
    pub per_service: Box<[ServiceCounters; MAX_SERVICE_IDS]>,
    /// Every entry of `per_service` from this index on is zero (the
    /// pipeline raises it as it counts), so copies and sums stop there.
    pub services_used: usize,
    /// Drops of a known Service port by reason, indexed like `per_service`
    /// (only written on the drop path; its pages stay untouched until then).
    pub service_drops: Box<[[u64; DropReason::COUNT]; MAX_SERVICE_IDS]>,
    /// Like `services_used`, for `service_drops`.
    pub service_drops_used: usize,
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
            echo_replies: 0,
            time_exceeded_sent: 0,
            icmp_budget: IcmpBudget::default(),
            per_service: vec![ServiceCounters::default(); MAX_SERVICE_IDS]
                .into_boxed_slice()
                .try_into()
                .expect("MAX_SERVICE_IDS entries"),
            services_used: 0,
            // Zeroed memory straight from the allocator (calloc): untouched
            // pages cost nothing.
            service_drops: vec![[0u64; DropReason::COUNT]; MAX_SERVICE_IDS]
                .into_boxed_slice()
                .try_into()
                .expect("MAX_SERVICE_IDS entries"),
            service_drops_used: 0,
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

    /// Drops of service port `id` by reason (indexed as [`DropReason::ALL`]).
    pub fn service_drops(&self, id: u32) -> &[u64; DropReason::COUNT] {
        &self.service_drops[(id as usize).min(MAX_SERVICE_IDS - 1)]
    }

    /// Adds another worker's counters into these.
    pub fn add(&mut self, o: &Counters) {
        self.forwarded += o.forwarded;
        self.passed += o.passed;
        self.rejected += o.rejected;
        self.flows_created += o.flows_created;
        self.snat_port_retries += o.snat_port_retries;
        self.icmp_errors_translated += o.icmp_errors_translated;
        self.echo_replies += o.echo_replies;
        self.time_exceeded_sent += o.time_exceeded_sent;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
        let used = o.service_drops_used.min(o.service_drops.len());
        for (a, b) in self.service_drops.iter_mut().zip(&o.service_drops[..used]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.service_drops_used = self.service_drops_used.max(used);
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
        self.echo_replies = o.echo_replies;
        self.time_exceeded_sent = o.time_exceeded_sent;
        self.drops = o.drops;
        let used = o.service_drops_used.min(o.service_drops.len()).min(self.service_drops.len());
        self.service_drops[..used].copy_from_slice(&o.service_drops[..used]);
        let stale = self.service_drops_used.min(self.service_drops.len());
        if stale > used {
            self.service_drops[used..stale].fill([0; DropReason::COUNT]);
        }
        self.service_drops_used = used;
        let used = o.services_used.min(o.per_service.len()).min(self.per_service.len());
        self.per_service[..used].copy_from_slice(&o.per_service[..used]);
        let stale = self.services_used.min(self.per_service.len());
        if stale > used {
            self.per_service[used..stale].fill(ServiceCounters::default());
        }
        self.services_used = used;
    }

    /// Counts a forwarded packet of `bytes` (IP) bytes for service port `id`.
    #[inline]
    pub(crate) fn count_service(&mut self, id: u32, bytes: usize) {
        let i = (id as usize).min(MAX_SERVICE_IDS - 1);
        let c = &mut self.per_service[i];
        c.packets += 1;
        c.bytes += bytes as u64;
        if i >= self.services_used {
            self.services_used = i + 1;
        }
    }

    /// Counts a drop and returns its verdict.
    #[inline]
    pub(crate) fn drop(&mut self, r: DropReason) -> Verdict {
        self.drops[r as usize] += 1;
        Verdict::Drop(r)
    }

    /// Counts a drop of a packet of service port `id` (overall and for the
    /// Service) and returns its verdict.
    #[inline]
    pub(crate) fn drop_for(&mut self, id: u32, r: DropReason) -> Verdict {
        let i = (id as usize).min(MAX_SERVICE_IDS - 1);
        self.service_drops[i][r as usize] += 1;
        if i >= self.service_drops_used {
            self.service_drops_used = i + 1;
        }
        self.drop(r)
    }

    /// Counts a final verdict (drops were counted with their reason).
    #[inline]
    pub(crate) fn account(&mut self, v: Verdict) -> Verdict {
        match v {
            Verdict::Forward { .. } => self.forwarded += 1,
            Verdict::Pass => self.passed += 1,
            // Counted where the answer is made (a reject or an echo reply).
            Verdict::Reply => {}
            Verdict::Drop(_) => {}
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_sums_stop_at_the_services_in_use_and_lose_nothing() {
        let mut counters = Counters::default();
        counters.count_service(3, 100);
        counters.count_service(7, 50);
        counters.count_service(7, 50);
        counters.forwarded = 3;
        assert_eq!(counters.services_used, 8);

        let mut snapshot = Counters::default();
        snapshot.copy_from(&counters);
        assert_eq!(snapshot.service(3), ServiceCounters { packets: 1, bytes: 100 });
        assert_eq!(snapshot.service(7), ServiceCounters { packets: 2, bytes: 100 });
        assert_eq!(snapshot.forwarded, 3);
        assert_eq!(snapshot.services_used, 8);

        // A snapshot that held more services than the new source (a worker
        // restarted) keeps nothing stale.
        snapshot.copy_from(&Counters::default());
        assert_eq!(snapshot.service(7), ServiceCounters::default());
        assert_eq!(snapshot.services_used, 0);

        let mut sum = Counters::default();
        sum.add(&counters);
        sum.add(&counters);
        assert_eq!(sum.service(7), ServiceCounters { packets: 4, bytes: 200 });
        assert_eq!(sum.services_used, 8);
        // Drops of a Service are counted overall and for it, and copied.
        counters.drop_for(5, DropReason::NoLocalEndpoints);
        counters.drop_for(5, DropReason::NoLocalEndpoints);
        assert_eq!(counters.drop_count(DropReason::NoLocalEndpoints), 2);
        assert_eq!(counters.service_drops(5)[DropReason::NoLocalEndpoints as usize], 2);
        assert_eq!(counters.service_drops_used, 6);
        snapshot.copy_from(&counters);
        assert_eq!(snapshot.service_drops(5)[DropReason::NoLocalEndpoints as usize], 2);
        sum.add(&snapshot);
        assert_eq!(sum.service_drops(5)[DropReason::NoLocalEndpoints as usize], 2);
        snapshot.copy_from(&Counters::default());
        assert_eq!(snapshot.service_drops(5)[DropReason::NoLocalEndpoints as usize], 0);
        // Ids past the shared last entry count there.
        counters.count_service(u32::MAX, 1);
        assert_eq!(counters.services_used, MAX_SERVICE_IDS);
        assert_eq!(counters.service(u32::MAX).packets, 1);
    }

    #[test]
    fn every_reason_has_a_distinct_snake_case_name() {
        let names: std::collections::HashSet<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DropReason::COUNT);
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')), "{names:?}");
    }
}
