//! UDP answers from the address a request was sent to.
//!
//! A UDP socket bound to `[::]` answers, by default, from whatever address
//! the route to the client picks. A server reached on an address that is
//! not its route's (a VIP on its loopback, as direct server return needs)
//! must answer from the address the client sent to, as multi-homed UDP
//! servers do: it asks for each datagram's destination (`IPV6_RECVPKTINFO`,
//! IPv4-mapped for IPv4 on a dual-stack socket) and sends its answer with
//! that address as the source (`IPV6_PKTINFO`).

use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// Asks the kernel for each datagram's destination address.
///
/// # Errors
/// The kernel refused the option.
pub fn enable(socket: &UdpSocket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is open; `on` outlives the call and `len` is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVPKTINFO,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// A message header over one address, one buffer and a control buffer
/// (the pointers stay valid while the borrowed values live).
fn message(name: &mut libc::sockaddr_in6, iov: &mut libc::iovec, control: &mut [u64]) -> libc::msghdr {
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::from_mut(name).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(control);
    msg
}

/// One received datagram: its length, sender and the address it was sent to.
pub struct Received {
    pub len: usize,
    pub peer: SocketAddr,
    pub to: Option<libc::in6_addr>,
}

/// Receives a datagram into `buf` (on a socket [`enable`]d, bound to `[::]`).
///
/// # Errors
/// As `recvmsg(2)` (a timeout among them).
pub fn recv(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 16];
    let mut msg = message(&mut from, &mut iov, &mut control);
    // SAFETY: every pointer in `msg` points at a live buffer of the stated size.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, 0) };
    let len = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    let mut to = None;
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in,
    // within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IPV6 && (*c).cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                to = Some(info.ipi6_addr);
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    let ip = std::net::Ipv6Addr::from(from.sin6_addr.s6_addr);
    let peer = SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(from.sin6_port), 0, from.sin6_scope_id));
    Ok(Received { len, peer, to })
}

/// Sends `data` to `peer` from address `from` (when known).
///
/// # Errors
/// As `sendmsg(2)`.
pub fn send_from(
    socket: &UdpSocket,
    data: &[u8],
    peer: SocketAddr,
    from: Option<libc::in6_addr>,
) -> std::io::Result<()> {
    let Some(from) = from else {
        return socket.send_to(data, peer).map(|_| ());
    };
    let SocketAddr::V6(p) = peer else {
        return socket.send_to(data, peer).map(|_| ());
    };
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    to.sin6_port = p.port().to_be();
    to.sin6_addr.s6_addr = p.ip().octets();
    to.sin6_scope_id = p.scope_id();
    let mut iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    let mut control = [0u64; 8];
    let mut msg = message(&mut to, &mut iov, &mut control);
    // SAFETY: CMSG_SPACE is a size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) } as usize;
    // SAFETY: the control buffer holds one in6_pktinfo cmsg (CMSG_SPACE
    // bytes, fewer than its 64); CMSG_FIRSTHDR points into it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::IPPROTO_IPV6;
        (*c).cmsg_type = libc::IPV6_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
        let info = libc::in6_pktinfo { ipi6_addr: from, ipi6_ifindex: 0 };
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
    }
    // SAFETY: every pointer in `msg` points at a live buffer of the stated size.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const msg, 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
