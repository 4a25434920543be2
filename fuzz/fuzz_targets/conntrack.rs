//! An operation sequence on a small flow table (8 flows: probe chains
//! collide, wrap and fill) against a `HashMap` model of the same flows:
//! insert (with the SNAT search's next ports, and a closed TCP flow giving
//! up its reply tuple), lookup, touch (TCP flags move the state), remove,
//! sweep, flush. Every result equals the model's, the table's invariants
//! hold after each operation, and at the end every stored flow equals the
//! model's. Each operation is 4 input bytes: kind, then three arguments; an
//! input is at most [`MAX_OPS`] operations.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use xskgate_conntrack::state::{StateWord, advance};
use xskgate_conntrack::{
    Config, Dir, FirstPacket, FlowKey, FlowState, FlowTable, InsertError, Inserted, NewFlow, Proto, TcpState, Timeouts,
};

const CAPACITY: usize = 8;
/// Operations per input: enough to fill, wrap and drain the table several
/// times over; longer inputs only slow the search down.
const MAX_OPS: usize = 64;

/// A pool of 48 tuples: TCP and UDP, IPv4 and IPv6; `dport` 80 to 83 so
/// that a SNAT search finds its next ports among them.
fn tuple(i: u8) -> FlowKey {
    let i = i % 48;
    let proto = if i % 6 == 5 { Proto::UDP } else { Proto::TCP };
    let (sport, dport) = (1000 + u16::from(i % 3), 80 + u16::from((i / 3) % 4));
    if i % 4 == 3 {
        let a: Ipv6Addr = format!("2001:db8::{}", i / 12).parse().expect("literal");
        FlowKey::new(proto, a, sport, Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1), dport)
    } else {
        FlowKey::new(proto, Ipv4Addr::new(198, 18, 0, i / 12), sport, Ipv4Addr::new(198, 18, 1, 1), dport)
    }
}

/// Linux's timeouts with established and CLOSE_WAIT shortened, so that a
/// sweep within an input's clock (it moves by up to 255 s an operation)
/// expires them too.
const TIMEOUTS: Timeouts = Timeouts { tcp_established: 300, tcp_close_wait: 200, ..Timeouts::LINUX };

#[derive(Clone, Copy)]
struct ModelFlow {
    orig: FlowKey,
    reply: FlowKey,
    backend: u32,
    state: StateWord,
    last_seen: u32,
}

#[derive(Default)]
struct Model {
    /// tuple → (its flow's original tuple, direction)
    index: HashMap<FlowKey, (FlowKey, Dir)>,
    flows: HashMap<FlowKey, ModelFlow>,
}

impl Model {
    fn remove(&mut self, orig: FlowKey) -> bool {
        let Some(f) = self.flows.remove(&orig) else { return false };
        self.index.remove(&f.orig);
        self.index.remove(&f.reply);
        true
    }

    /// Whether a new flow could store `reply`: free, or held by a closed
    /// TCP flow (which the insert removes).
    fn holder(&self, reply: &FlowKey) -> Option<(FlowKey, bool)> {
        let &(holder, _) = self.index.get(reply)?;
        let closed = matches!(self.flows[&holder].state.state(), FlowState::Tcp(TcpState::TimeWait | TcpState::Close));
        Some((holder, closed))
    }
}

fn with_port(k: FlowKey, dport: u16) -> FlowKey {
    FlowKey { dport, ..k }
}

/// One table for every input, emptied by a flush before each, so that
/// inputs also meet slots (generations, hints) that earlier flows used.
static TABLE: std::sync::OnceLock<FlowTable> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let table = TABLE.get_or_init(|| {
        FlowTable::new(Config {
            capacity: CAPACITY,
            timeouts: TIMEOUTS,
            early_drop: false,
            seed: Some(7),
            accounting: false,
        })
        .expect("a small table")
    });
    table.flush(|_| true);
    assert!(table.is_empty());
    let mut model = Model::default();
    let mut now = 0u32;
    for op in data.chunks_exact(4).take(MAX_OPS) {
        let [kind, a, b, c] = [op[0], op[1], op[2], op[3]];
        match kind % 7 {
            0 | 1 => {
                // Insert flow a → reply b, the search trying up to (c % 4)
                // more destination ports, the first packet's flags c.
                let (o, r) = (tuple(a), tuple(b));
                let r = FlowKey { proto: o.proto, ..r };
                let state = if o.proto == Proto::TCP {
                    FlowState::Tcp(TcpState::SynSent)
                } else {
                    FlowState::Udp { replied: false }
                };
                let flow = NewFlow { orig: o, reply: r, backend: u32::from(c), service: u32::from(c % 3), state };
                let flags = if o.proto == Proto::TCP { xskgate_conntrack::tcp_flags::SYN } else { 0 };
                let extra = c % 4;
                let mut tried = Vec::new();
                let mut ports = (1..=u16::from(extra)).map(|k| 80 + (r.dport - 80 + k) % 4);
                let got = table.insert_missed(&flow, now, FirstPacket { bytes: 60, tcp_flags: flags }, || {
                    let p = ports.next();
                    tried.extend(p);
                    p
                });
                // The model: the same search, port by port.
                // Room is reserved first: a full table says so even for a
                // flow it holds (which is then not touched).
                let want = if o == r {
                    Err(InsertError::InvalidTuple)
                } else if model.flows.len() == CAPACITY {
                    Err(InsertError::Full)
                } else if let Some(&(fo, dir)) = model.index.get(&o) {
                    let f = model.flows.get_mut(&fo).expect("indexed");
                    f.last_seen = now;
                    f.state = advance(f.state, dir, flags);
                    Ok((true, if dir == Dir::Original { f.reply } else { f.orig }))
                } else {
                    let candidates = std::iter::once(r.dport).chain(tried.iter().copied());
                    let mut stored = None;
                    for port in candidates {
                        let reply = with_port(r, port);
                        if reply == o {
                            continue;
                        }
                        match model.holder(&reply) {
                            None => {
                                stored = Some(reply);
                                break;
                            }
                            Some((holder, true)) => {
                                model.remove(holder);
                                stored = Some(reply);
                                break;
                            }
                            Some((_, false)) => {}
                        }
                    }
                    match stored {
                        Some(reply) => {
                            model.index.insert(o, (o, Dir::Original));
                            model.index.insert(reply, (o, Dir::Reply));
                            let state = advance(StateWord::new(state), Dir::Original, flags);
                            model
                                .flows
                                .insert(o, ModelFlow { orig: o, reply, backend: flow.backend, state, last_seen: now });
                            Ok((false, reply))
                        }
                        None => Err(InsertError::ReplyTaken),
                    }
                };
                let got = got.map(|ins| (matches!(ins, Inserted::Existing(_)), ins.view().peer()));
                assert_eq!(got, want, "insert {o:?} → {r:?}, ports tried {tried:?}");
            }
            2 => {
                let key = tuple(a);
                let got = table.lookup(&key).map(|v| (v.dir, v.peer(), v.backend));
                let want = model.index.get(&key).map(|&(fo, dir)| {
                    let f = &model.flows[&fo];
                    (dir, if dir == Dir::Original { f.reply } else { f.orig }, f.backend)
                });
                assert_eq!(got, want, "lookup {key:?}");
            }
            3 => {
                // A packet of flow direction a at now + b, TCP flags c.
                now += u32::from(b % 16);
                let key = tuple(a);
                let flags = [0x02u8, 0x12, 0x10, 0x11, 0x04, 0x00][usize::from(c % 6)];
                let got = table.lookup(&key).and_then(|v| table.touch(&v, now, 40, flags));
                let want = model.index.get(&key).copied().map(|(fo, dir)| {
                    let f = model.flows.get_mut(&fo).expect("indexed");
                    f.last_seen = now;
                    f.state = advance(f.state, dir, flags);
                    f.state.state()
                });
                assert_eq!(got, want, "touch {key:?} with {flags:#x}");
            }
            4 => {
                let key = tuple(a);
                let want = model.index.get(&key).map(|&(fo, _)| fo).is_some_and(|fo| model.remove(fo));
                assert_eq!(table.remove(&key), want, "remove {key:?}");
            }
            5 => {
                now += u32::from(b);
                let expired: Vec<FlowKey> = model
                    .flows
                    .values()
                    .filter(|f| now.saturating_sub(f.last_seen) >= TIMEOUTS.for_state(f.state.state()))
                    .map(|f| f.orig)
                    .collect();
                for o in &expired {
                    model.remove(*o);
                }
                assert_eq!(table.sweep_all(now), expired.len(), "sweep at {now}");
            }
            _ => {
                let service = u32::from(a % 3);
                let doomed: Vec<FlowKey> =
                    model.flows.values().filter(|f| f.backend % 3 == service).map(|f| f.orig).collect();
                for o in &doomed {
                    model.remove(*o);
                }
                assert_eq!(table.flush(|f| f.service == service), doomed.len(), "flush service {service}");
            }
        }
        assert_eq!(table.len(), model.flows.len());
        if let Err(e) = table.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
    let mut got: Vec<_> =
        table.flows().into_iter().map(|f| (f.orig, f.reply, f.backend, f.state, f.last_seen)).collect();
    let mut want: Vec<_> =
        model.flows.values().map(|f| (f.orig, f.reply, f.backend, f.state.state(), f.last_seen)).collect();
    got.sort_by_key(|f| f.0);
    want.sort_by_key(|f| f.0);
    assert_eq!(got, want, "the stored flows");
});
