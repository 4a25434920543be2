// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// xskgate's XDP steering program. It sends to the AF_XDP sockets only the
// frames the user-space pipeline owns and passes everything else to the
// kernel (ARP, neighbour discovery, ping of the node, SSH, the health-check
// and metrics ports, routing of other traffic).
//
// A frame is ours when it is TCP or UDP and
//   1. its destination (address, protocol, port) is a Service frontend
//      (map `frontends`), or
//   2. it is addressed to a SNAT address (map `local_addrs`, flag SNAT) on a
//      port of the SNAT range (map `config`): a reply of a masqueraded flow,
//   3. or its source (address, protocol, port) is an endpoint (map
//      `endpoints`) and its destination is not an address of this node: a
//      reply of a flow that kept the client's address (Local policy, pod
//      traffic);
// or it is an ICMP/ICMPv6 error whose embedded packet matches 1–3 in the
// reverse direction (the error is about a packet the pipeline translated),
// or an echo request to a VIP (map `frontends`, protocol ICMP or ICMPv6,
// port 0), which the pipeline answers only where the Service is served.
// Owned frames go to the socket of (interface slot + rx queue) in `xsks`;
// without a socket there, they fall to the kernel, unless `config` says
// HOLD: then they are dropped and counted (stats[3]). A gateway whose
// process restarts sets HOLD, so that in the gap between two processes the
// kernel never answers a flow's packets (with a TCP reset to a SNAT port)
// and the peers retransmit instead.
//
// The maps are written by the control plane; the program keeps no state.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_XSKS 1024
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define LOCAL_SNAT 1

// A frontend or an endpoint: the address is IPv6 or IPv4-mapped
// (::ffff:a.b.c.d); the port is in network byte order.
struct svc_key {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct addr_key {
	__u8 addr[16];
};

struct config {
	__u16 snat_lo; // host byte order
	__u16 snat_hi;
	__u32 flags; // CONFIG_HOLD
};

#define CONFIG_HOLD 1

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_XSKS);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

// ifindex -> first key in `xsks` of this interface (slot * 64).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} if_base SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	// Allocated as keys are added (by the control plane, never per
	// packet): a preallocated map this size takes 0.1-0.3 s to create,
	// which a restarting gateway would spend holding its flows' frames.
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, __u8);
} frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__uint(map_flags, BPF_F_NO_PREALLOC); // as `frontends`
	__type(key, struct svc_key);
	__type(value, __u8);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct addr_key);
	__type(value, __u8);
} local_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

// Per-verdict counters: 0 = steered, 1 = passed, 2 = steered but no socket.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 i)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &i);
	if (c)
		*c += 1;
}

static __always_inline void set_v4(__u8 *a, __be32 v4)
{
	__builtin_memset(a, 0, 10);
	a[10] = 0xff;
	a[11] = 0xff;
	__builtin_memcpy(a + 12, &v4, 4);
}

// The addresses, protocol and ports of one IP packet (outer or embedded).
struct tuple {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
};

static __always_inline int is_frontend(const __u8 *addr, __be16 port, __u8 proto)
{
	struct svc_key k = { .port = port, .proto = proto };
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&frontends, &k) != 0;
}

static __always_inline int is_endpoint(const __u8 *addr, __be16 port, __u8 proto)
{
	struct svc_key k = { .port = port, .proto = proto };
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&endpoints, &k) != 0;
}

// 0: not local, 1: local, 1|LOCAL_SNAT<<1: local and a SNAT address.
static __always_inline int local_flags(const __u8 *addr)
{
	struct addr_key k;
	__builtin_memcpy(k.addr, addr, 16);
	__u8 *v = bpf_map_lookup_elem(&local_addrs, &k);
	return v ? (1 | (*v << 1)) : 0;
}

static __always_inline int in_snat_range(__be16 port)
{
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&config, &zero);
	if (!c)
		return 0;
	__u16 p = bpf_ntohs(port);
	return c->snat_lo != 0 && p >= c->snat_lo && p <= c->snat_hi;
}

// Rules 1-3 for a TCP/UDP tuple travelling in its own direction.
static __always_inline int owned(const struct tuple *t)
{
	if (is_frontend(t->dst, t->dport, t->proto))
		return 1;
	int local = local_flags(t->dst);
	if ((local & (LOCAL_SNAT << 1)) && in_snat_range(t->dport))
		return 1;
	return !local && is_endpoint(t->src, t->sport, t->proto);
}

// The embedded packet of an ICMP error was sent by us (after translation)
// or towards us; the error is ours if the reverse of that packet is.
static __always_inline int embedded_owned(const struct tuple *t)
{
	struct tuple r;
	__builtin_memcpy(r.src, t->dst, 16);
	__builtin_memcpy(r.dst, t->src, 16);
	r.sport = t->dport;
	r.dport = t->sport;
	r.proto = t->proto;
	// About a packet we sent towards an endpoint or a client: its reverse is
	// a reply, owned by rule 2 or 3. About a packet towards a frontend
	// (from a client that then got an error on the way back): rule 1.
	return owned(&r) || is_frontend(t->dst, t->dport, t->proto);
}

// Parses an IPv4 header at `off` into `t` (addresses, protocol); returns
// the L4 offset or -1.
static __always_inline int parse_v4(void *data, void *end, int off, struct tuple *t, int *frag)
{
	struct iphdr *ip = data + off;
	if ((void *)(ip + 1) > end)
		return -1;
	int ihl = ip->ihl * 4;
	if (ihl < 20)
		return -1;
	set_v4(t->src, ip->saddr);
	set_v4(t->dst, ip->daddr);
	t->proto = ip->protocol;
	*frag = (ip->frag_off & bpf_htons(0x3fff)) != 0;
	return off + ihl;
}

// IPv6 without extension headers only (others are passed to the kernel or,
// when embedded, not matched); returns the L4 offset or -1.
static __always_inline int parse_v6(void *data, void *end, int off, struct tuple *t)
{
	struct ipv6hdr *ip = data + off;
	if ((void *)(ip + 1) > end)
		return -1;
	__builtin_memcpy(t->src, &ip->saddr, 16);
	__builtin_memcpy(t->dst, &ip->daddr, 16);
	t->proto = ip->nexthdr;
	return off + sizeof(*ip);
}

static __always_inline int ports(void *data, void *end, int off, struct tuple *t)
{
	__be16 *p = data + off;
	if ((void *)(p + 2) > end)
		return -1;
	t->sport = p[0];
	t->dport = p[1];
	return 0;
}

static __always_inline int classify(void *data, void *end)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return 0;
	int off = sizeof(*eth);
	__be16 type = eth->h_proto;
	if (type == bpf_htons(ETH_P_8021Q)) {
		__be16 *inner = data + off + 2;
		if ((void *)(inner + 1) > end)
			return 0;
		type = *inner;
		off += 4;
	}
	struct tuple t = {};
	int frag = 0;
	int v6 = type == bpf_htons(ETH_P_IPV6);
	if (type == bpf_htons(ETH_P_IP))
		off = parse_v4(data, end, off & 0xff, &t, &frag);
	else if (v6)
		off = parse_v6(data, end, off & 0xff, &t);
	else
		return 0;
	if (off < 0 || frag)
		return 0;
	off &= 0xff; // bounded for the verifier (IPv4 options < 60 bytes)
	if (t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP) {
		if (ports(data, end, off, &t) < 0)
			return 0;
		return owned(&t);
	}
	// ICMP errors: type then the embedded packet after 8 bytes.
	__u8 *icmp = data + off;
	if ((void *)(icmp + 8) > end)
		return 0;
	if ((!v6 && t.proto == IPPROTO_ICMP && icmp[0] == ICMP_ECHO) ||
	    (v6 && t.proto == IPPROTO_ICMPV6 && icmp[0] == ICMPV6_ECHO_REQUEST))
		return is_frontend(t.dst, 0, t.proto);
	int error;
	if (!v6 && t.proto == IPPROTO_ICMP)
		error = icmp[0] == ICMP_DEST_UNREACH || icmp[0] == ICMP_TIME_EXCEEDED || icmp[0] == ICMP_PARAMETERPROB;
	else if (v6 && t.proto == IPPROTO_ICMPV6)
		error = icmp[0] >= 1 && icmp[0] <= 4;
	else
		return 0;
	if (!error)
		return 0;
	struct tuple in = {};
	int inner = off + 8;
	if (v6)
		inner = parse_v6(data, end, inner & 0x1ff, &in);
	else
		inner = parse_v4(data, end, inner & 0x1ff, &in, &frag);
	if (inner < 0 || (in.proto != IPPROTO_TCP && in.proto != IPPROTO_UDP))
		return 0;
	if (ports(data, end, inner & 0x1ff, &in) < 0)
		return 0;
	return embedded_owned(&in);
}

SEC("xdp")
int xskgate_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (!classify(data, end)) {
		count(1);
		return XDP_PASS;
	}
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *base = bpf_map_lookup_elem(&if_base, &ifindex);
	if (!base) {
		count(2);
		return XDP_PASS;
	}
	__u32 key = *base + ctx->rx_queue_index;
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&config, &zero);
	if (c && (c->flags & CONFIG_HOLD) && !bpf_map_lookup_elem(&xsks, &key)) {
		count(3);
		return XDP_DROP;
	}
	count(0);
	// Without a socket at `key`, the frame falls to the kernel.
	return bpf_redirect_map(&xsks, key, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
