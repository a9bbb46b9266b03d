//! A guest vsock driver in ordinary memory, for tests and benches: it sets the device up through
//! the real virtio-mmio transport registers, lays its queues out like Linux's driver does (rx
//! buffers as a 44-byte header descriptor plus a 4 KiB data descriptor), sends packets on the tx
//! queue and collects what the device writes into the rx queue.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::device::{Vsock, VsockError};
use super::event_handler::VsockEvent;
use super::packet::{HDR_SIZE, TYPE_STREAM, VsockHeader};
use super::{EVQ, HOST_CID, QUEUE_SIZE, RXQ, TXQ, VsockBackend};
use crate::devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::devices::virtio::test_utils::{DescSpec, TestQueue, test_memory};
use crate::devices::virtio::{GuestMemory, MmioTransport};

/// Size of each rx data buffer (Linux 6.1 uses 4 KiB).
pub const RX_DATA_LEN: u32 = 4096;
const RX_BUFFERS: u16 = 64;
const RX_AREA: u64 = 0x10_0000;
const TX_AREA: u64 = 0x80_0000;
const EV_AREA: u64 = 0x7f_0000;
const SLOT: u64 = 0x1_1000;
const MEM_SIZE: usize = 0x200_0000;

/// The guest side of a vsock device under test.
pub struct GuestVsock<B: VsockBackend + 'static> {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The device.
    pub dev: Arc<Mutex<Vsock<B>>>,
    /// The transport in front of it.
    pub transport: MmioTransport,
    queues: [TestQueue; 3],
    tx_slot: u64,
    /// The guest's cid.
    pub cid: u64,
}

fn write_reg(t: &mut MmioTransport, offset: u64, v: u32) {
    t.bus_write(offset, &v.to_le_bytes());
}

impl<B: VsockBackend + 'static> GuestVsock<B> {
    /// Put `backend` behind a vsock device and a transport, and drive the transport the way the
    /// Linux driver does until DRIVER_OK; `RX_BUFFERS` receive buffers and one event buffer are
    /// made available.
    ///
    /// # Panics
    /// When the device refuses the set-up (test helper).
    pub fn new(backend: B) -> Self {
        let mem = test_memory(MEM_SIZE);
        let cid = backend.guest_cid();
        let dev = Arc::new(Mutex::new(Vsock::new(backend).expect("vsock device")));
        let transport = MmioTransport::new(mem.clone(), dev.clone()).expect("transport");
        let queues = [
            TestQueue::new(&mem, GuestAddress(0x1_0000), QUEUE_SIZE),
            TestQueue::new(&mem, GuestAddress(0x2_0000), QUEUE_SIZE),
            TestQueue::new(&mem, GuestAddress(0x3_0000), QUEUE_SIZE),
        ];
        let mut g = Self {
            mem,
            dev,
            transport,
            queues,
            tx_slot: 0,
            cid,
        };
        g.driver_init();
        g
    }

    /// Negotiate and activate through the registers (also after a reset).
    ///
    /// # Panics
    /// When the device does not come up (test helper).
    pub fn driver_init(&mut self) {
        let t = &mut self.transport;
        write_reg(t, 0x70, 0);
        write_reg(t, 0x70, ACKNOWLEDGE);
        write_reg(t, 0x70, ACKNOWLEDGE | DRIVER);
        write_reg(t, 0x24, 1);
        write_reg(t, 0x20, 1);
        write_reg(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for (i, q) in self.queues.iter_mut().enumerate() {
            *q = TestQueue::new(&self.mem, q.addresses().0, QUEUE_SIZE);
            let (d, a, u) = q.addresses();
            write_reg(t, 0x30, i as u32);
            write_reg(t, 0x38, u32::from(QUEUE_SIZE));
            for (reg, addr) in [(0x80u64, d), (0x90, a), (0xa0, u)] {
                write_reg(t, reg, addr.0 as u32);
                write_reg(t, reg + 4, (addr.0 >> 32) as u32);
            }
            write_reg(t, 0x44, 1);
        }
        write_reg(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            t.status(),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            "device did not activate"
        );
        for _ in 0..RX_BUFFERS {
            self.add_rx_buffer();
        }
        self.queues[EVQ].add_chain(&self.mem, &[DescSpec::writable(EV_AREA, 4)]);
    }

    /// Lock the device.
    pub fn device(&self) -> MutexGuard<'_, Vsock<B>> {
        self.dev.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The rx, tx or event queue's driver side.
    pub fn queue(&mut self, index: usize) -> &mut TestQueue {
        &mut self.queues[index]
    }

    fn add_rx_buffer(&mut self) {
        // Descriptor pairs are handed out in order, so the head index says where its slot is.
        let next = self.queues[RXQ].avail_idx(&self.mem);
        let slot = u64::from(next % RX_BUFFERS);
        let base = RX_AREA + slot * SLOT;
        self.queues[RXQ].add_chain(
            &self.mem,
            &[
                DescSpec::writable(base, HDR_SIZE as u32),
                DescSpec::writable(base + 0x100, RX_DATA_LEN),
            ],
        );
    }

    /// A header from this guest to the host.
    pub fn header(&self, src_port: u32, dst_port: u32, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Queue a packet on the tx queue (header and payload in separate descriptors) without
    /// notifying the device.
    pub fn post(&mut self, header: &VsockHeader, payload: &[u8]) {
        let mut h = *header;
        h.len = payload.len() as u32;
        self.post_raw(&h, payload);
    }

    /// Like [`post`](Self::post), but the header goes out as given, even if its `len` lies.
    ///
    /// # Panics
    /// When the payload is over 64 KiB (test helper).
    pub fn post_raw(&mut self, header: &VsockHeader, payload: &[u8]) {
        let base = TX_AREA + (self.tx_slot % u64::from(QUEUE_SIZE / 2)) * SLOT;
        self.tx_slot += 1;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(base))
            .expect("tx area in memory");
        let mut descs = vec![DescSpec::readable(base, HDR_SIZE as u32)];
        if !payload.is_empty() {
            self.mem
                .write_slice(payload, GuestAddress(base + 0x100))
                .expect("tx area in memory");
            descs.push(DescSpec::readable(base + 0x100, payload.len() as u32));
        }
        self.queues[TXQ].add_chain(&self.mem, &descs);
    }

    /// Send a packet and let the device process its tx queue.
    pub fn send(&mut self, header: &VsockHeader, payload: &[u8]) -> Result<(), VsockError> {
        self.post(header, payload);
        self.device().handle_event(VsockEvent::TxQueue)
    }

    /// Let the device handle backend events and fill rx buffers; returns the packets it wrote
    /// (header, payload) and gives the buffers back.
    pub fn poll(&mut self) -> Result<Vec<(VsockHeader, Vec<u8>)>, VsockError> {
        self.device().handle_event(VsockEvent::Backend)?;
        Ok(self.take_rx())
    }

    /// Packets the device wrote into rx buffers since the last call; the buffers are refilled.
    ///
    /// # Panics
    /// When the device wrote nonsense (test helper).
    pub fn take_rx(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        let used = self.queues[RXQ].take_used(&self.mem);
        let mut out = Vec::new();
        for (head, len) in used {
            // Heads come in pairs from 0: head / 2 is the chain's order, modulo the slots.
            let slot = u64::from((head / 2) % RX_BUFFERS);
            let base = RX_AREA + slot * SLOT;
            assert!(len as usize >= HDR_SIZE, "rx packet shorter than a header");
            let mut raw = [0u8; HDR_SIZE];
            self.mem
                .read_slice(&mut raw, GuestAddress(base))
                .expect("rx area");
            let h = VsockHeader::from_bytes(&raw);
            assert_eq!(
                h.len as usize + HDR_SIZE,
                len as usize,
                "used length disagrees with header"
            );
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(base + 0x100))
                .expect("rx area");
            out.push((h, data));
            self.add_rx_buffer();
        }
        if !out.is_empty() {
            // Tell the device about the new buffers.
            if let Err(e) = self.device().handle_event(VsockEvent::RxQueue) {
                tracing::debug!(error = %e, "rx refill");
            }
        }
        out
    }

    /// Poll until `want` says the packets gathered so far are enough, or `timeout` passes.
    pub fn poll_until(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&[(VsockHeader, Vec<u8>)]) -> bool,
    ) -> Vec<(VsockHeader, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut got = self.take_rx();
        while !want(&got) && Instant::now() < deadline {
            match self.poll() {
                Ok(more) if more.is_empty() => std::thread::sleep(Duration::from_millis(1)),
                Ok(more) => got.extend(more),
                Err(_) => break,
            }
        }
        got
    }

    /// Event-queue entries the device used since the last call, with the event id written.
    pub fn take_events(&mut self) -> Vec<u32> {
        let used = self.queues[EVQ].take_used(&self.mem);
        used.into_iter()
            .filter(|&(_, len)| len >= 4)
            .map(|_| {
                self.mem
                    .read_obj::<u32>(GuestAddress(EV_AREA))
                    .unwrap_or(u32::MAX)
            })
            .collect()
    }
}
