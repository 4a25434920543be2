//! Arbitrary bytes into the frame parsers: no panic, and the direct reading
//! of the common shape (`wire::parse`) gives what the general parser
//! (`wire::parse_general`, etherparse) gives: the same view, or both refuse
//! for the same reason. Once a frame parses, every offset lies in it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xskgate_fastpath::wire;

fuzz_target!(|frame: &[u8]| {
    let fast = wire::parse(frame);
    let general = wire::parse_general(frame);
    assert_eq!(fast, general, "the two parsers disagree on {frame:02x?}");
    if let Ok(p) = fast {
        assert!(p.l3 <= p.l4 && p.l4 <= p.end && p.end <= frame.len(), "{p:?} outside a {}-byte frame", frame.len());
        if p.l4_kind == wire::L4::IcmpError {
            let _ = wire::icmp_inner(frame, &p);
        }
    }
});
