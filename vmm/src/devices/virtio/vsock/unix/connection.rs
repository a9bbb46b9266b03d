//! One vsock stream between the guest and a host Unix socket: its state, the packets it owes the
//! guest, credit-based flow control both ways, and the bounded buffer of guest bytes the host
//! socket has not taken yet.
//!
//! Credit (virtio spec 5.10.6.3): each side advertises `buf_alloc` (its receive buffer) and
//! `fwd_cnt` (bytes it consumed). We advertise [`TX_BUF_SIZE`] and count as consumed what reached
//! the host socket; a guest that sends beyond that credit gets its connection reset. Towards the
//! guest we send no more than `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::super::HOST_CID;
use super::super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, VsockHeader, op};

/// Receive buffer we advertise per connection: the most guest bytes we hold for a slow host peer.
pub const TX_BUF_SIZE: u32 = 128 * 1024;
/// Send a credit update once the host consumed this much since the guest last heard our count.
pub const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 4;

/// Identifies a connection: our (host) port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host-side vsock port.
    pub local_port: u32,
    /// The guest-side vsock port.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// A host client asked for it; REQUEST sent or due, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
}

/// Packets a connection owes the guest (bit set).
pub mod pending {
    /// Reset the connection (then forget it).
    pub const RST: u8 = 1;
    /// Ask the guest to connect.
    pub const REQUEST: u8 = 2;
    /// Accept the guest's request.
    pub const RESPONSE: u8 = 4;
    /// The host sent all it will send.
    pub const SHUTDOWN: u8 = 8;
    /// Ask for the guest's credit.
    pub const CREDIT_REQUEST: u8 = 16;
    /// Tell the guest our credit.
    pub const CREDIT_UPDATE: u8 = 32;
    /// Data from the host socket (read when the packet is built).
    pub const RW: u8 = 64;
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than its credit allows.
    #[error("the guest overran its credit")]
    CreditOverrun,
    /// The host socket failed.
    #[error("host socket error")]
    Io(#[source] io::Error),
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The epoll token of `stream`.
    pub token: u64,
    /// Ports.
    pub key: ConnKey,
    /// Life stage.
    pub state: ConnState,
    /// Packets owed to the guest (`pending::*` bits).
    pub pending: u8,
    /// Whether the key is in the backend's rx queue.
    pub in_rxq: bool,
    /// Interest currently registered in the backend's epoll (None: not registered).
    pub registered: Option<EventSet>,
    /// The host socket reached end of file.
    pub host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    pub peer_shut: u32,
    /// We already shut down the host socket's write side.
    pub host_write_shut: bool,
    /// When a host request must have been answered by the guest (LocalInit only).
    pub deadline: Option<std::time::Instant>,
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
}

impl Connection {
    /// A connection over `stream` (non-blocking).
    pub fn new(stream: UnixStream, token: u64, key: ConnKey, state: ConnState) -> Self {
        Self {
            stream,
            token,
            key,
            state,
            pending: 0,
            in_rxq: false,
            registered: None,
            host_eof: false,
            peer_shut: 0,
            host_write_shut: false,
            deadline: None,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// Take the guest's credit from any packet it sent.
    pub fn update_peer_credit(&mut self, header: &VsockHeader) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host socket.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// The epoll interest this connection needs now (empty: do not poll it).
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        let may_read = self.state == ConnState::Established
            && !self.host_eof
            && self.pending & (pending::RW | pending::RST) == 0
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0;
        if may_read {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() && self.pending & pending::RST == 0 {
            set |= EventSet::OUT;
        }
        set
    }

    /// Guest data for the host socket: written now as far as the socket takes it, the rest kept
    /// (within the credit we gave).
    pub fn push_tx(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let mut data = data;
        if self.tx_buf.is_empty() {
            let n = write_some(&mut self.stream, data)?;
            self.fwd_cnt += Wrapping(n as u32);
            data = &data[n..];
        }
        if data.is_empty() {
            return Ok(());
        }
        if self.tx_buf.len() + data.len() > TX_BUF_SIZE as usize {
            return Err(ConnError::CreditOverrun);
        }
        self.tx_buf.extend(data);
        Ok(())
    }

    /// Write buffered guest data to the host socket until it would block.
    pub fn flush_tx(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            self.tx_buf.drain(..n);
            self.fwd_cnt += Wrapping(n as u32);
        }
        Ok(())
    }

    /// Whether the guest should hear our consumed count now.
    pub fn wants_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Read host data for the guest into `buf` (already capped by the caller to the guest's
    /// credit). `Ok(0)` is end of file.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Count `n` bytes sent to the guest.
    pub fn count_rx(&mut self, n: u32) {
        self.rx_cnt += Wrapping(n);
    }

    /// A header from us to the guest on this connection; carries our credit.
    pub fn header(&mut self, guest_cid: u64, op: u16, len: u32, flags: u32) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// After the guest's SHUTDOWN and once its data is all out: close the host write side, and
    /// when the guest closed both ways, owe it the final RST.
    pub fn settle_shutdown(&mut self) {
        if !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            // The peer may already be gone; nothing to do about it here.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_shut = true;
        }
        if self.peer_shut & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
            self.pending |= pending::RST;
        }
    }

    /// The next packet op owed, most urgent first, with its flags; clears its bit (RW excepted:
    /// the caller clears it once it has read).
    pub fn next_op(&mut self) -> Option<(u16, u32)> {
        const ORDER: [(u8, u16, u32); 6] = [
            (pending::RST, op::RST, 0),
            (pending::REQUEST, op::REQUEST, 0),
            (pending::RESPONSE, op::RESPONSE, 0),
            (pending::SHUTDOWN, op::SHUTDOWN, SHUTDOWN_SEND),
            (pending::CREDIT_REQUEST, op::CREDIT_REQUEST, 0),
            (pending::CREDIT_UPDATE, op::CREDIT_UPDATE, 0),
        ];
        for (bit, op, flags) in ORDER {
            if self.pending & bit != 0 {
                self.pending &= !bit;
                return Some((op, flags));
            }
        }
        if self.pending & pending::RW != 0 {
            return Some((op::RW, 0));
        }
        None
    }
}

/// Write as much of `data` as the non-blocking socket takes now.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> Result<usize, ConnError> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(ConnError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let key = ConnKey {
            local_port: 1024,
            peer_port: 5000,
        };
        (Connection::new(a, 1, key, ConnState::Established), b)
    }

    #[test]
    fn credit_follows_guest_counters() {
        let (mut c, _peer) = pair();
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.interest().contains(EventSet::IN));
        c.update_peer_credit(&VsockHeader {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..VsockHeader::default()
        });
        assert_eq!(c.peer_credit(), 1000);
        assert!(c.interest().contains(EventSet::IN));
        c.count_rx(600);
        assert_eq!(c.peer_credit(), 400);
        c.count_rx(400);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(&VsockHeader {
            buf_alloc: 1000,
            fwd_cnt: 1000,
            ..VsockHeader::default()
        });
        assert_eq!(c.peer_credit(), 1000);
        // A nonsense fwd_cnt ahead of what we sent cannot grant more than buf_alloc.
        c.update_peer_credit(&VsockHeader {
            buf_alloc: 1000,
            fwd_cnt: 5000,
            ..VsockHeader::default()
        });
        assert!(c.peer_credit() <= 1000);
    }

    #[test]
    fn tx_buffer_is_bounded_by_the_credit_given() {
        let (mut c, mut peer) = pair();
        // Fill the socket and our buffer without the peer reading.
        let chunk = vec![7u8; 64 * 1024];
        let mut overran = false;
        for _ in 0..64 {
            match c.push_tx(&chunk) {
                Ok(()) => {}
                Err(ConnError::CreditOverrun) => {
                    overran = true;
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(overran);
        assert!(c.tx_buffered() <= TX_BUF_SIZE as usize);
        assert!(c.interest().contains(EventSet::OUT));
        // Drain the peer and flush: the consumed count grows and asks for a credit update.
        peer.set_nonblocking(true).expect("nonblocking");
        let mut sink = vec![0u8; 1 << 20];
        loop {
            let _ = peer.read(&mut sink);
            c.flush_tx().expect("flush");
            if c.tx_buffered() == 0 {
                break;
            }
        }
        assert!(c.wants_credit_update());
        let h = c.header(3, op::CREDIT_UPDATE, 0, 0);
        assert_eq!(h.buf_alloc, TX_BUF_SIZE);
        assert!(!c.wants_credit_update());
    }

    #[test]
    fn ops_come_out_most_urgent_first() {
        let (mut c, _peer) = pair();
        c.pending = pending::RW | pending::CREDIT_UPDATE | pending::RESPONSE;
        assert_eq!(c.next_op(), Some((op::RESPONSE, 0)));
        assert_eq!(c.next_op(), Some((op::CREDIT_UPDATE, 0)));
        assert_eq!(c.next_op(), Some((op::RW, 0)));
        c.pending = 0;
        assert_eq!(c.next_op(), None);
    }
}
