//! Flow state, the transitions packets cause, and the timeouts per state.
//!
//! The state of a flow is one `u32` word (see [`StateWord`]) so that it can be
//! advanced with a single compare-and-swap from any worker. [`advance`] is the
//! pure transition function; it follows the TCP transitions of Linux's
//! `nf_conntrack_proto_tcp` that decide timeouts (SYN_SENT → SYN_RECV →
//! ESTABLISHED → FIN_WAIT → CLOSE_WAIT → LAST_ACK → TIME_WAIT, RST → CLOSE).
//! It does no window tracking: the gateway sees one side of the path only
//! when routing is asymmetric, and kube-proxy's rules do not depend on it.

/// Which way a packet travels relative to the first packet of its flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Same direction as the packet that created the flow (client → service).
    Original,
    /// The other way (endpoint → client).
    Reply,
}

impl Dir {
    pub fn other(self) -> Dir {
        match self {
            Dir::Original => Dir::Reply,
            Dir::Reply => Dir::Original,
        }
    }
}

/// TCP connection-tracking states, as Linux names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    SynSent = 0,
    SynRecv = 1,
    Established = 2,
    FinWait = 3,
    CloseWait = 4,
    LastAck = 5,
    TimeWait = 6,
    Close = 7,
}

impl TcpState {
    pub const ALL: [TcpState; 8] = [
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
    ];

    /// Stable snake_case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::SynSent => "syn_sent",
            TcpState::SynRecv => "syn_recv",
            TcpState::Established => "established",
            TcpState::FinWait => "fin_wait",
            TcpState::CloseWait => "close_wait",
            TcpState::LastAck => "last_ack",
            TcpState::TimeWait => "time_wait",
            TcpState::Close => "close",
        }
    }
}

/// The state of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowState {
    Tcp(TcpState),
    /// UDP: `replied` once a packet was seen in the reply direction.
    Udp {
        replied: bool,
    },
    /// ICMP / ICMPv6 echo and anything else without a state machine.
    Other {
        replied: bool,
    },
}

impl FlowState {
    /// Linux's "assured": a flow that early drop must never evict
    /// (TCP from ESTABLISHED on, other protocols once replied).
    pub fn is_assured(self) -> bool {
        match self {
            FlowState::Tcp(s) => !matches!(s, TcpState::SynSent | TcpState::SynRecv | TcpState::Close),
            FlowState::Udp { replied } | FlowState::Other { replied } => replied,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FlowState::Tcp(s) => s.name(),
            FlowState::Udp { replied: false } | FlowState::Other { replied: false } => "unreplied",
            FlowState::Udp { replied: true } | FlowState::Other { replied: true } => "replied",
        }
    }
}

/// TCP header flags as they appear in the 13th byte of the TCP header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The packed state word: bits 0–7 the state code, bit 8 "replied",
/// bit 9 "the first FIN came from the reply side".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateWord(pub u32);

const CODE_UDP: u32 = 16;
const CODE_OTHER: u32 = 17;
const REPLIED: u32 = 1 << 8;
const FIN_FROM_REPLY: u32 = 1 << 9;

impl StateWord {
    pub fn new(state: FlowState) -> StateWord {
        StateWord(match state {
            FlowState::Tcp(s) => s as u32,
            FlowState::Udp { replied } => CODE_UDP | if replied { REPLIED } else { 0 },
            FlowState::Other { replied } => CODE_OTHER | if replied { REPLIED } else { 0 },
        })
    }

    pub fn state(self) -> FlowState {
        let replied = self.0 & REPLIED != 0;
        match self.0 & 0xff {
            CODE_UDP => FlowState::Udp { replied },
            CODE_OTHER => FlowState::Other { replied },
            code => FlowState::Tcp(TcpState::ALL[(code & 7) as usize]),
        }
    }

    fn fin_dir(self) -> Dir {
        if self.0 & FIN_FROM_REPLY != 0 { Dir::Reply } else { Dir::Original }
    }

    fn with_tcp(self, s: TcpState) -> StateWord {
        StateWord((self.0 & !0xff) | s as u32)
    }
}

/// The state after a packet going `dir` with TCP `flags` (ignored for
/// non-TCP flows). Pure; returns `word` unchanged when nothing changes.
#[inline]
pub fn advance(word: StateWord, dir: Dir, flags: u8) -> StateWord {
    use tcp_flags::*;
    let mut w = word;
    if dir == Dir::Reply {
        w.0 |= REPLIED;
    }
    let FlowState::Tcp(s) = w.state() else {
        return w;
    };
    let syn = flags & SYN != 0;
    let ack = flags & ACK != 0;
    let next = if flags & RST != 0 {
        TcpState::Close
    } else if syn && !ack {
        match (s, dir) {
            (TcpState::TimeWait | TcpState::Close, Dir::Original) => {
                // A new connection reusing the tuple (Linux reopens it).
                return StateWord(TcpState::SynSent as u32);
            }
            _ => s,
        }
    } else if syn && ack {
        match (s, dir) {
            (TcpState::SynSent, Dir::Reply) => TcpState::SynRecv,
            _ => s,
        }
    } else if flags & FIN != 0 {
        match s {
            TcpState::Established | TcpState::SynRecv => {
                w.0 = match dir {
                    Dir::Reply => w.0 | FIN_FROM_REPLY,
                    Dir::Original => w.0 & !FIN_FROM_REPLY,
                };
                TcpState::FinWait
            }
            TcpState::FinWait | TcpState::CloseWait if dir != w.fin_dir() => TcpState::LastAck,
            _ => s,
        }
    } else if ack {
        match s {
            TcpState::SynRecv if dir == Dir::Original => TcpState::Established,
            TcpState::FinWait if dir != w.fin_dir() => TcpState::CloseWait,
            TcpState::LastAck if dir == w.fin_dir() => TcpState::TimeWait,
            _ => s,
        }
    } else {
        s
    };
    w.with_tcp(next)
}

/// Idle timeouts in seconds. Defaults are Linux's with kube-proxy's settings
/// (`--conntrack-tcp-timeout-established=24h`, `--conntrack-tcp-timeout-close-wait=1h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_close_wait: u32,
    pub tcp_last_ack: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub udp_unreplied: u32,
    pub udp_replied: u32,
    pub icmp: u32,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts::LINUX
    }
}

impl Timeouts {
    /// Linux's `nf_conntrack` defaults (the `Default`).
    pub const LINUX: Timeouts = Timeouts {
        tcp_syn: 60,
        tcp_established: 24 * 3600,
        tcp_fin_wait: 120,
        tcp_close_wait: 3600,
        tcp_last_ack: 30,
        tcp_time_wait: 120,
        tcp_close: 10,
        udp_unreplied: 30,
        udp_replied: 120,
        icmp: 30,
    };

    /// Idle seconds after which a flow in `state` expires.
    pub fn for_state(&self, state: FlowState) -> u32 {
        match state {
            FlowState::Tcp(TcpState::SynSent | TcpState::SynRecv) => self.tcp_syn,
            FlowState::Tcp(TcpState::Established) => self.tcp_established,
            FlowState::Tcp(TcpState::FinWait) => self.tcp_fin_wait,
            FlowState::Tcp(TcpState::CloseWait) => self.tcp_close_wait,
            FlowState::Tcp(TcpState::LastAck) => self.tcp_last_ack,
            FlowState::Tcp(TcpState::TimeWait) => self.tcp_time_wait,
            FlowState::Tcp(TcpState::Close) => self.tcp_close,
            FlowState::Udp { replied: false } => self.udp_unreplied,
            FlowState::Udp { replied: true } => self.udp_replied,
            FlowState::Other { .. } => self.icmp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tcp_flags::*;
    use super::*;

    fn run(start: FlowState, packets: &[(Dir, u8)]) -> FlowState {
        let mut w = StateWord::new(start);
        for &(d, f) in packets {
            w = advance(w, d, f);
        }
        w.state()
    }

    #[test]
    fn handshake_data_and_orderly_close() {
        use Dir::*;
        let s = FlowState::Tcp(TcpState::SynSent);
        assert_eq!(run(s, &[(Reply, SYN | ACK)]), FlowState::Tcp(TcpState::SynRecv));
        assert_eq!(run(s, &[(Reply, SYN | ACK), (Original, ACK)]), FlowState::Tcp(TcpState::Established));
        let open = [(Reply, SYN | ACK), (Original, ACK), (Reply, ACK), (Original, ACK)];
        assert_eq!(run(s, &open), FlowState::Tcp(TcpState::Established));
        // Client closes first.
        let mut p = open.to_vec();
        p.push((Original, FIN | ACK));
        assert_eq!(run(s, &p), FlowState::Tcp(TcpState::FinWait));
        p.push((Reply, ACK));
        assert_eq!(run(s, &p), FlowState::Tcp(TcpState::CloseWait));
        p.push((Reply, FIN | ACK));
        assert_eq!(run(s, &p), FlowState::Tcp(TcpState::LastAck));
        p.push((Original, ACK));
        assert_eq!(run(s, &p), FlowState::Tcp(TcpState::TimeWait));
        // A new SYN on the same tuple reopens.
        p.push((Original, SYN));
        assert_eq!(run(s, &p), FlowState::Tcp(TcpState::SynSent));
    }

    #[test]
    fn server_closes_first_and_rst() {
        use Dir::*;
        let est = FlowState::Tcp(TcpState::Established);
        let p = [(Reply, FIN | ACK), (Original, ACK), (Original, FIN | ACK), (Reply, ACK)];
        assert_eq!(run(est, &p[..1]), FlowState::Tcp(TcpState::FinWait));
        // The same side's ACK does not move FIN_WAIT on.
        assert_eq!(run(est, &[(Reply, FIN | ACK), (Reply, ACK)]), FlowState::Tcp(TcpState::FinWait));
        assert_eq!(run(est, &p[..2]), FlowState::Tcp(TcpState::CloseWait));
        assert_eq!(run(est, &p[..3]), FlowState::Tcp(TcpState::LastAck));
        assert_eq!(run(est, &p), FlowState::Tcp(TcpState::TimeWait));
        assert_eq!(run(est, &[(Original, RST)]), FlowState::Tcp(TcpState::Close));
    }

    #[test]
    fn udp_becomes_replied_and_assured() {
        let s = FlowState::Udp { replied: false };
        assert!(!s.is_assured());
        assert_eq!(run(s, &[(Dir::Original, 0)]), s);
        let r = run(s, &[(Dir::Reply, 0)]);
        assert_eq!(r, FlowState::Udp { replied: true });
        assert!(r.is_assured());
    }

    #[test]
    fn state_word_round_trips_and_timeouts_match_linux() {
        let t = Timeouts::default();
        for s in TcpState::ALL {
            assert_eq!(StateWord::new(FlowState::Tcp(s)).state(), FlowState::Tcp(s));
        }
        for replied in [false, true] {
            for s in [FlowState::Udp { replied }, FlowState::Other { replied }] {
                assert_eq!(StateWord::new(s).state(), s);
            }
        }
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::Established)), 86_400);
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::CloseWait)), 3_600);
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::SynRecv)), 60);
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::TimeWait)), 120);
        assert_eq!(t.for_state(FlowState::Tcp(TcpState::Close)), 10);
        assert_eq!(t.for_state(FlowState::Udp { replied: false }), 30);
        assert_eq!(t.for_state(FlowState::Udp { replied: true }), 120);
        assert_eq!(t.for_state(FlowState::Other { replied: false }), 30);
    }
}
