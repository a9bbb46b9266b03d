//! The Unix-socket vsock backend (Firecracker's convention):
//!
//! - guest to host: a guest connection to host port `P` becomes a connection to the host Unix
//!   socket `<uds>_<P>`; nothing listening there means a reset for the guest.
//! - host to guest: a host client connects to the listening socket `<uds>`, writes
//!   `CONNECT <port>\n`, and once the guest accepts on vsock port `<port>` it reads
//!   `OK <local_port>\n` (`local_port` being the host-side vsock port chosen for it) and the
//!   stream is connected. A refusal closes the client's socket. The client may write its first
//!   bytes right after the line, without waiting for the `OK`: they go to the guest as soon as it
//!   has accepted, with the device's answer to its accept.
//!
//! Everything (listener, clients in their handshake, connections, a timer) sits behind one epoll
//! fd of the backend's own, so the VMM's event loop polls a single fd. Connections are limited in
//! number; each one's buffering is bounded by the credit it advertises (`connection.rs`). A guest
//! that neither accepts nor refuses a host client's request within [`REQUEST_TIMEOUT`] gets a
//! reset, and the client's socket is closed.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::EventSet;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::{TYPE_STREAM, VsockHeader, op};
use super::{HOST_CID, VsockBackend};
use crate::guest_warn;

pub mod connection;

use connection::{ConnKey, ConnState, Connection, pending};

/// Most connections open at once (guest- and host-initiated together).
pub const MAX_CONNECTIONS: usize = 256;
/// Most host clients in the middle of their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE_LINE: usize = 32;
/// Most resets queued for packets that match no connection.
const MAX_ORPHAN_RSTS: usize = 256;
/// Host-side ports given to host-initiated connections lie in `FIRST_LOCAL_PORT..` and wrap
/// back to it.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Each backend starts its host-side ports at a random point of this many after
/// [`FIRST_LOCAL_PORT`]. A guest restored from a snapshot can still hold sockets of the snapshot
/// VMM's connections (a transport reset closes them, but the guest keeps a closed socket in its
/// connected table until its owner releases it, or for a close timeout of seconds); a new
/// connection from the same host port would match that dead socket and be refused with a reset.
/// Starting where the snapshot's VMM started made exactly that happen to the first host
/// connection after a restore.
const LOCAL_PORT_SPREAD: u32 = 1 << 30;

/// How long a host client's request may wait for the guest's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = u64::MAX;

/// Errors setting the backend up.
#[derive(Debug, thiserror::Error)]
pub enum VsockUnixError {
    /// The listening socket could not be bound (does the path exist already?).
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The epoll fd could not be created or set up.
    #[error("epoll set-up failed")]
    Epoll(#[source] io::Error),
    /// The request timer could not be created.
    #[error("cannot create the request timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// A host client that has not finished its `CONNECT <port>\n` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Handshake,
    Conn(ConnKey),
}

#[derive(Debug)]
enum RxItem {
    Conn(ConnKey),
    Rst(VsockHeader),
}

/// The Unix-socket backend.
#[derive(Debug)]
pub struct VsockUnixBackend {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    targets: HashMap<u64, Target>,
    next_token: u64,
    next_local_port: u32,
    rxq: VecDeque<RxItem>,
    timer: TimerFd,
    request_timeout: Duration,
}

impl VsockUnixBackend {
    /// Listen on `path` for host clients; guest connections to port P go to `<path>_<P>`.
    /// `path` must not exist (a stale socket from a dead VMM must be removed by the caller).
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, VsockUnixError> {
        let bind_err = |source| VsockUnixError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockUnixError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockUnixError::Epoll)?;
        let timer = TimerFd::new().map_err(VsockUnixError::Timer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(VsockUnixError::Epoll)?;
        Ok(Self {
            guest_cid,
            path: path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            targets: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: random_first_port(),
            rxq: VecDeque::new(),
            timer,
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    /// Change how long host clients' requests wait for the guest (default [`REQUEST_TIMEOUT`]).
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// Arm the timer for the earliest pending host request, or disarm it.
    fn arm_timer(&mut self) {
        let earliest = self.conns.values().filter_map(|c| c.deadline).min();
        let result = match earliest {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                self.timer.reset(wait.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "vsock: cannot arm the request timer");
        }
    }

    /// Reset host requests the guest left unanswered past their deadline.
    fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| c.key)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                guest_warn!(
                    port = key.peer_port,
                    "vsock: guest did not answer a host request in time"
                );
                conn.deadline = None;
                conn.pending = pending::RST;
            }
            self.refresh(key);
        }
        self.arm_timer();
    }

    /// The listening socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn queue_orphan_rst(&mut self, to: &VsockHeader) {
        if self
            .rxq
            .iter()
            .filter(|i| matches!(i, RxItem::Rst(_)))
            .count()
            >= MAX_ORPHAN_RSTS
        {
            guest_warn!("vsock: too many pending resets; one dropped");
            return;
        }
        self.rxq.push_back(RxItem::Rst(VsockHeader {
            src_cid: to.dst_cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }));
    }

    /// Queue `key` for the rx path if it owes packets, and bring its epoll interest up to date.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.pending != 0 && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        let want = conn.interest();
        let fd = conn.stream.as_raw_fd();
        let result = match conn.registered {
            _ if want.is_empty() && conn.registered.is_none() => Ok(()),
            Some(_) if want.is_empty() => {
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            }
            Some(have) if have == want => Ok(()),
            Some(_) => self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, conn.token),
            ),
            None => self
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(want, conn.token)),
        };
        match result {
            Ok(()) => conn.registered = (!want.is_empty()).then_some(want),
            Err(e) => {
                tracing::error!(error = %e, "vsock: epoll update failed; resetting the connection");
                conn.pending |= pending::RST;
                if !conn.in_rxq {
                    conn.in_rxq = true;
                    self.rxq.push_back(RxItem::Conn(key));
                }
            }
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.targets.remove(&conn.token);
            // Closing the stream drops it from the epoll set.
        }
    }

    fn add_conn(&mut self, stream: UnixStream, key: ConnKey, state: ConnState, owed: u8) {
        let token = self.token();
        let mut conn = Connection::new(stream, token, key, state);
        conn.pending = owed;
        self.conns.insert(key, conn);
        self.targets.insert(token, Target::Conn(key));
        self.refresh(key);
    }

    fn guest_connect(&mut self, header: &VsockHeader) {
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_warn!("vsock: connection limit reached; guest request refused");
            self.queue_orphan_rst(header);
            return;
        }
        let target = format!("{}_{}", self.path.display(), header.dst_port);
        let stream = match UnixStream::connect(&target) {
            Ok(s) => s,
            Err(e) => {
                guest_warn!(port = header.dst_port, error = %e, "vsock: guest connection refused on the host");
                self.queue_orphan_rst(header);
                return;
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::error!(error = %e, "vsock: cannot make a host stream non-blocking");
            self.queue_orphan_rst(header);
            return;
        }
        tracing::debug!(port = header.dst_port, "vsock: guest connected to the host");
        self.add_conn(stream, key, ConnState::Established, pending::RESPONSE);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.update_peer_credit(header);
        }
        self.refresh(key);
    }

    fn guest_packet(&mut self, header: &VsockHeader, payload: &[u8]) {
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match header.op {
                op::REQUEST => self.guest_connect(header),
                op::RST => {}
                _ => self.queue_orphan_rst(header),
            }
            return;
        };
        conn.update_peer_credit(header);
        match (header.op, conn.state) {
            (op::RST, _) => {
                self.remove(key);
                return;
            }
            (op::RESPONSE, ConnState::LocalInit) => {
                conn.state = ConnState::Established;
                conn.deadline = None;
                let ack = format!("OK {}\n", key.local_port);
                // The client waits for this line with an empty socket buffer: it fits at once.
                match std::io::Write::write(&mut conn.stream, ack.as_bytes()) {
                    // What the client sent with its `CONNECT` line is already waiting: it goes
                    // to the guest with this tx queue's answers, in the same interrupt (a read
                    // that would block sends nothing).
                    Ok(n) if n == ack.len() => conn.pending |= pending::RW,
                    _ => conn.pending |= pending::RST,
                }
            }
            (op::RW, ConnState::Established) => {
                if let Err(e) = conn.push_tx(payload) {
                    guest_warn!(error = %e, "vsock: connection reset");
                    conn.pending |= pending::RST;
                } else if conn.wants_credit_update() {
                    conn.pending |= pending::CREDIT_UPDATE;
                }
            }
            (op::SHUTDOWN, ConnState::Established) => {
                conn.peer_shut |=
                    header.flags & (super::packet::SHUTDOWN_RCV | super::packet::SHUTDOWN_SEND);
                conn.settle_shutdown();
            }
            (op::CREDIT_UPDATE, ConnState::Established) => {}
            (op::CREDIT_REQUEST, ConnState::Established) => conn.pending |= pending::CREDIT_UPDATE,
            _ => {
                guest_warn!(op = header.op, state = ?conn.state, "vsock: unexpected packet; connection reset");
                conn.pending |= pending::RST;
            }
        }
        self.refresh(key);
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || self.conns.len() >= MAX_CONNECTIONS
                    {
                        tracing::warn!("vsock: too many host clients; one refused");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(error = %e, "vsock: host client dropped");
                        continue;
                    }
                    let token = self.token();
                    let event = EpollEvent::new(EventSet::IN, token);
                    if let Err(e) = self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), event)
                    {
                        tracing::warn!(error = %e, "vsock: host client dropped");
                        continue;
                    }
                    self.handshakes.insert(
                        token,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.targets.insert(token, Target::Handshake);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        self.targets.remove(&token);
        let hs = self.handshakes.remove(&token)?;
        // The stream may stay open (it becomes a connection): take it out of the set by hand.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            hs.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(hs)
    }

    fn handshake_ready(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        // One byte at a time: nothing past the newline may be consumed (it is stream data).
        let mut byte = [0u8; 1];
        let done = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed before the CONNECT line ended"),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) if hs.line.len() >= MAX_HANDSHAKE_LINE => break Err("CONNECT line too long"),
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read failed"),
            }
        };
        match done {
            Ok(false) => {}
            Err(why) => {
                tracing::debug!(why, "vsock: host client dropped");
                self.drop_handshake(token);
            }
            Ok(true) => {
                let Some(hs) = self.drop_handshake(token) else {
                    return;
                };
                let Some(port) = parse_connect(&hs.line) else {
                    tracing::debug!("vsock: host client sent a bad CONNECT line");
                    return;
                };
                if self.conns.len() >= MAX_CONNECTIONS {
                    tracing::warn!("vsock: connection limit reached; host client refused");
                    return;
                }
                let key = self.free_local_key(port);
                self.add_conn(hs.stream, key, ConnState::LocalInit, pending::REQUEST);
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.deadline = Some(Instant::now() + self.request_timeout);
                }
                self.arm_timer();
            }
        }
    }

    fn free_local_key(&mut self, peer_port: u32) -> ConnKey {
        loop {
            let key = ConnKey {
                local_port: self.next_local_port,
                peer_port,
            };
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&key) {
                return key;
            }
        }
    }

    fn conn_ready(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
            && conn.tx_buffered() > 0
        {
            match conn.flush_tx() {
                Ok(()) => {
                    if conn.wants_credit_update() {
                        conn.pending |= pending::CREDIT_UPDATE;
                    }
                    conn.settle_shutdown();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host peer gone; connection reset");
                    conn.pending |= pending::RST;
                }
            }
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
            && conn.state == ConnState::Established
            && !conn.host_eof
        {
            conn.pending |= pending::RW;
        }
        self.refresh(key);
    }

    /// Build the next packet `key` owes the guest, if any. `None` also when a read would block.
    fn conn_packet(&mut self, key: ConnKey, buf: &mut [u8]) -> Option<VsockHeader> {
        let guest_cid = self.guest_cid;
        let conn = self.conns.get_mut(&key)?;
        conn.in_rxq = false;
        let (op, flags) = conn.next_op()?;
        let header = match op {
            op::RST => {
                let h = conn.header(guest_cid, op::RST, 0, 0);
                self.remove(key);
                return Some(h);
            }
            op::RW => {
                conn.pending &= !pending::RW;
                let cap = buf.len().min(conn.peer_credit() as usize);
                if cap == 0 {
                    // The guest's buffer is full: ask it to tell us when it has room.
                    let h = conn.header(guest_cid, op::CREDIT_REQUEST, 0, 0);
                    self.refresh(key);
                    return Some(h);
                }
                match conn.read_host(&mut buf[..cap]) {
                    Ok(0) => {
                        conn.host_eof = true;
                        conn.header(guest_cid, op::SHUTDOWN, 0, super::packet::SHUTDOWN_SEND)
                    }
                    Ok(n) => {
                        conn.count_rx(n as u32);
                        conn.header(guest_cid, op::RW, n as u32, 0)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.refresh(key);
                        return None;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "vsock: host read failed; connection reset");
                        let h = conn.header(guest_cid, op::RST, 0, 0);
                        self.remove(key);
                        return Some(h);
                    }
                }
            }
            op::SHUTDOWN => {
                conn.host_eof = true;
                conn.header(guest_cid, op, 0, flags)
            }
            _ => conn.header(guest_cid, op, 0, flags),
        };
        self.refresh(key);
        Some(header)
    }
}

/// `CONNECT <port>` (the newline already stripped), port in decimal.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl Drop for VsockUnixBackend {
    fn drop(&mut self) {
        // We created the socket file; leave no stale one behind.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VsockBackend for VsockUnixBackend {
    fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    fn send_pkt(&mut self, header: &VsockHeader, payload: &[u8]) {
        if header.dst_cid != HOST_CID {
            guest_warn!(
                dst_cid = header.dst_cid,
                "vsock: packet for a cid other than the host"
            );
            if header.op != op::RST {
                self.queue_orphan_rst(header);
            }
            return;
        }
        self.guest_packet(header, payload);
    }

    fn reply_rst(&mut self, header: &VsockHeader) {
        if header.op != op::RST {
            self.queue_orphan_rst(header);
        }
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<VsockHeader> {
        while let Some(item) = self.rxq.pop_front() {
            let produced = match item {
                RxItem::Rst(h) => Some(h),
                RxItem::Conn(key) => self.conn_packet(key, buf),
            };
            if produced.is_some() {
                return produced;
            }
        }
        None
    }

    fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    fn polled_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn notify(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "vsock: epoll_wait failed");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER_TOKEN {
                self.accept_clients();
                continue;
            }
            if token == TIMER_TOKEN {
                // Readable means expired: read it to rearm.
                if let Err(e) = self.timer.wait() {
                    tracing::error!(error = %e, "vsock: request timer read failed");
                }
                self.expire_requests();
                continue;
            }
            match self.targets.get(&token).copied() {
                Some(Target::Handshake) => self.handshake_ready(token),
                Some(Target::Conn(key)) => self.conn_ready(key, ev.event_set()),
                None => {}
            }
        }
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rxq.clear();
        self.arm_timer();
    }
}

/// A random host-side port to start from (see [`LOCAL_PORT_SPREAD`]). The randomness is std's
/// per-process hash keys, which come from the OS's random source.
fn random_first_port() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    FIRST_LOCAL_PORT + (hasher.finish() % u64::from(LOCAL_PORT_SPREAD)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1025"), Some(1025));
        assert_eq!(parse_connect(b"CONNECT 1025\r"), Some(1025));
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn each_backend_starts_its_host_ports_somewhere_else() {
        let dir = tempfile::tempdir().unwrap();
        let starts: Vec<u32> = (0..4)
            .map(|i| {
                let b = VsockUnixBackend::new(3, &dir.path().join(format!("v{i}.sock"))).unwrap();
                assert!(b.next_local_port >= FIRST_LOCAL_PORT);
                b.next_local_port
            })
            .collect();
        let mut distinct = starts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), starts.len(), "{starts:?}");
    }
}
