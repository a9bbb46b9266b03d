//! Vsock packets on the virtqueues: the 44-byte header (virtio spec 5.10.6), parsed from a
//! checked descriptor chain the guest sent (tx), or written into a chain the guest gave for
//! receiving (rx). Every length comes from the guest and is checked against the chain and the
//! payload cap before anything is copied. Parsing never panics: it returns a header or an error.

use super::super::GuestMemory;
use super::super::queue::{ChainBuffers, QueueError};

/// Size of the packet header.
pub const HDR_SIZE: usize = 44;
/// The largest payload accepted from or sent to the guest (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// The only socket type supported: stream.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset.
    pub const RST: u16 = 3;
    /// Half or full close; `flags` says which directions.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Here is my credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Tell me your credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// What is wrong with a packet the guest sent or a buffer it gave.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain's readable part is shorter than a header.
    #[error("the chain holds {len} readable bytes, less than a header")]
    HeaderTooShort {
        /// Readable bytes in the chain.
        len: u32,
    },
    /// The header's payload length is over the cap.
    #[error("payload length {len} is over the {MAX_PAYLOAD}-byte cap")]
    PayloadTooLong {
        /// The length claimed.
        len: u32,
    },
    /// The header's payload length is more than the chain carries.
    #[error("payload length {len} but the chain carries {available} bytes after the header")]
    PayloadMissing {
        /// The length claimed.
        len: u32,
        /// Bytes after the header.
        available: u32,
    },
    /// An operation that does not exist.
    #[error("unknown operation {op}")]
    UnknownOp {
        /// The op field.
        op: u16,
    },
    /// A socket type other than stream; the device answers with a reset.
    #[error("unsupported socket type {}", header.type_)]
    UnsupportedType {
        /// The header, to answer it.
        header: VsockHeader,
    },
    /// A receive buffer too small to hold a header and the payload.
    #[error("receive buffer of {len} bytes is too small for {needed}")]
    RxBufferTooSmall {
        /// Writable bytes in the chain.
        len: u32,
        /// Bytes needed.
        needed: usize,
    },
    /// Guest memory refused the copy.
    #[error("guest memory access failed")]
    Memory(#[source] QueueError),
}

/// A vsock packet header (little-endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn le_u32(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u16(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl VsockHeader {
    /// Decode a header.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Self {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encode a header.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Check the fields that do not depend on a connection: op known, type stream, payload length
    /// within the cap, and payload only on RW.
    pub fn validate(&self) -> Result<(), PacketError> {
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&self.op) {
            return Err(PacketError::UnknownOp { op: self.op });
        }
        if self.len > MAX_PAYLOAD {
            return Err(PacketError::PayloadTooLong { len: self.len });
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::UnsupportedType { header: *self });
        }
        Ok(())
    }
}

/// Parse a packet the guest sent: read and validate the header from the chain's readable buffers,
/// copy the payload (RW only; other ops carry none) into `payload`. Returns the header; the
/// payload is `payload[..header.len]` for RW, empty otherwise.
pub fn parse_tx(
    mem: &GuestMemory,
    chain: &ChainBuffers,
    payload: &mut Vec<u8>,
) -> Result<VsockHeader, PacketError> {
    payload.clear();
    if (chain.readable_len as usize) < HDR_SIZE {
        return Err(PacketError::HeaderTooShort {
            len: chain.readable_len,
        });
    }
    let mut raw = [0u8; HDR_SIZE];
    chain
        .read_at(mem, 0, &mut raw)
        .map_err(PacketError::Memory)?;
    let mut header = VsockHeader::from_bytes(&raw);
    header.validate()?;
    if header.op != op::RW {
        // Only data packets carry a payload; ignore whatever else follows.
        header.len = 0;
        return Ok(header);
    }
    let available = chain.readable_len - HDR_SIZE as u32;
    if header.len > available {
        return Err(PacketError::PayloadMissing {
            len: header.len,
            available,
        });
    }
    payload.resize(header.len as usize, 0);
    chain
        .read_at(mem, HDR_SIZE as u32, payload)
        .map_err(PacketError::Memory)?;
    Ok(header)
}

/// How many payload bytes a receive chain can take (0 when it cannot hold a header).
pub fn rx_capacity(chain: &ChainBuffers) -> usize {
    (chain.writable_len as usize)
        .saturating_sub(HDR_SIZE)
        .min(MAX_PAYLOAD as usize)
}

/// Write a packet for the guest into a receive chain. Returns the bytes written.
pub fn write_rx(
    mem: &GuestMemory,
    chain: &ChainBuffers,
    header: &VsockHeader,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let needed = HDR_SIZE + payload.len();
    if (chain.writable_len as usize) < needed || payload.len() > MAX_PAYLOAD as usize {
        return Err(PacketError::RxBufferTooSmall {
            len: chain.writable_len,
            needed,
        });
    }
    chain
        .write_at(mem, 0, &header.to_bytes())
        .map_err(PacketError::Memory)?;
    chain
        .write_at(mem, HDR_SIZE as u32, payload)
        .map_err(PacketError::Memory)?;
    Ok(needed as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::Segment;
    use crate::devices::virtio::test_utils::test_memory;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    fn rw_header(len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn chain_of(readable: &[(u64, u32)], writable: &[(u64, u32)]) -> ChainBuffers {
        let seg = |&(a, l): &(u64, u32)| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        ChainBuffers {
            head: 0,
            readable: readable.iter().map(seg).collect(),
            writable: writable.iter().map(seg).collect(),
            readable_len: readable.iter().map(|s| s.1).sum(),
            writable_len: writable.iter().map(|s| s.1).sum(),
        }
    }

    #[test]
    fn header_round_trips() {
        let h = rw_header(7);
        assert_eq!(VsockHeader::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn parses_header_and_payload_split_across_buffers() {
        let mem = test_memory(0x10_0000);
        let h = rw_header(5);
        let raw = h.to_bytes();
        // Header split 10 + 34, payload in a third buffer.
        mem.write_slice(&raw[..10], GuestAddress(0x1000))
            .expect("w");
        mem.write_slice(&raw[10..], GuestAddress(0x2000))
            .expect("w");
        mem.write_slice(b"hello", GuestAddress(0x3000)).expect("w");
        let chain = chain_of(&[(0x1000, 10), (0x2000, 34), (0x3000, 5)], &[]);
        let mut payload = Vec::new();
        let got = parse_tx(&mem, &chain, &mut payload).expect("valid");
        assert_eq!(got, h);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn rejects_bad_lengths_ops_and_types() {
        let mem = test_memory(0x10_0000);
        let mut payload = Vec::new();
        let short = chain_of(&[(0x1000, 43)], &[]);
        assert!(matches!(
            parse_tx(&mem, &short, &mut payload),
            Err(PacketError::HeaderTooShort { len: 43 })
        ));

        let put = |h: VsockHeader| {
            mem.write_slice(&h.to_bytes(), GuestAddress(0x1000))
                .expect("w")
        };
        let chain = chain_of(&[(0x1000, 44 + 16)], &[]);
        put(rw_header(17));
        assert!(matches!(
            parse_tx(&mem, &chain, &mut payload),
            Err(PacketError::PayloadMissing {
                len: 17,
                available: 16
            })
        ));
        put(rw_header(MAX_PAYLOAD + 1));
        assert!(matches!(
            parse_tx(&mem, &chain, &mut payload),
            Err(PacketError::PayloadTooLong { .. })
        ));
        put(VsockHeader {
            op: 0,
            ..rw_header(0)
        });
        assert!(matches!(
            parse_tx(&mem, &chain, &mut payload),
            Err(PacketError::UnknownOp { op: 0 })
        ));
        put(VsockHeader {
            type_: 2,
            ..rw_header(0)
        });
        assert!(matches!(
            parse_tx(&mem, &chain, &mut payload),
            Err(PacketError::UnsupportedType { .. })
        ));
        // A REQUEST claiming a payload carries none.
        put(VsockHeader {
            op: op::REQUEST,
            ..rw_header(1000)
        });
        let h = parse_tx(&mem, &chain, &mut payload).expect("valid request");
        assert_eq!(h.len, 0);
        assert!(payload.is_empty());
    }

    #[test]
    fn writes_rx_packets_and_checks_room() {
        let mem = test_memory(0x10_0000);
        let chain = chain_of(&[], &[(0x1000, 44), (0x2000, 8)]);
        assert_eq!(rx_capacity(&chain), 8);
        let h = rw_header(3);
        assert_eq!(write_rx(&mem, &chain, &h, b"abc").expect("fits"), 47);
        let mut raw = [0u8; HDR_SIZE];
        mem.read_slice(&mut raw, GuestAddress(0x1000)).expect("r");
        assert_eq!(VsockHeader::from_bytes(&raw), h);
        let mut data = [0u8; 3];
        mem.read_slice(&mut data, GuestAddress(0x2000)).expect("r");
        assert_eq!(&data, b"abc");
        assert!(matches!(
            write_rx(&mem, &chain, &h, &[0; 9]),
            Err(PacketError::RxBufferTooSmall { .. })
        ));
        assert_eq!(rx_capacity(&chain_of(&[], &[(0x1000, 10)])), 0);
    }

    proptest! {
        /// Any header bytes and any chain shape: a valid packet whose payload fits, or an error.
        #[test]
        fn parse_tx_never_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..128),
            splits in proptest::collection::vec(0u32..64, 1..6),
            claimed_len in any::<u32>(),
            op in 0u16..10,
            type_ in 0u16..4,
        ) {
            let mem = test_memory(0x10_0000);
            let mut bytes = raw.clone();
            if bytes.len() >= HDR_SIZE {
                bytes[24..28].copy_from_slice(&claimed_len.to_le_bytes());
                bytes[28..30].copy_from_slice(&type_.to_le_bytes());
                bytes[30..32].copy_from_slice(&op.to_le_bytes());
            }
            // Spread the bytes over buffers of the given sizes, far apart.
            let mut segs = Vec::new();
            let mut at = 0usize;
            for (i, &s) in splits.iter().enumerate() {
                let end = (at + s as usize).min(bytes.len());
                let addr = 0x1000 * (i as u64 + 1);
                mem.write_slice(&bytes[at..end], GuestAddress(addr)).expect("w");
                segs.push((addr, (end - at) as u32));
                at = end;
            }
            let chain = chain_of(&segs, &[]);
            let mut payload = Vec::new();
            if let Ok(h) = parse_tx(&mem, &chain, &mut payload) {
                prop_assert!(h.len <= MAX_PAYLOAD);
                prop_assert_eq!(payload.len(), h.len as usize);
                prop_assert!(HDR_SIZE + payload.len() <= chain.readable_len as usize);
                prop_assert_eq!(h.type_, TYPE_STREAM);
                prop_assert!((op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op));
            }
        }
    }
}
