//! Handing an invoke from one core to another and its result back, as `hearth_agent::cores` does:
//! two threads, each a tokio `current_thread` runtime; the sender hands a job to the owner, which
//! answers on a oneshot. Two channels for the hand-over: tokio's unbounded mpsc (what the cores
//! use) and a crossbeam `SegQueue` with a tokio `Notify` to wake the owner. Round-trip latency
//! with one job in flight (median, p99) and jobs per second with 64 in flight.
//!
//! `cargo bench -p hearth-agent --bench handover`

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use tokio::sync::{Notify, mpsc, oneshot};

type Job = (u64, oneshot::Sender<u64>);

const MEASURE: Duration = Duration::from_secs(2);

/// A hand-over channel: a sender half and the owner's loop.
trait Channel: Send + Sync + 'static {
    fn send(&self, job: Job);
}

struct Tokio(mpsc::UnboundedSender<Job>);

impl Channel for Tokio {
    fn send(&self, job: Job) {
        let _ = self.0.send(job);
    }
}

struct Crossbeam {
    queue: Arc<SegQueue<Job>>,
    wake: Arc<Notify>,
}

impl Channel for Crossbeam {
    fn send(&self, job: Job) {
        self.queue.push(job);
        self.wake.notify_one();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Starts the owner thread for a channel kind; returns the sender half.
fn owner(kind: &str) -> Arc<dyn Channel> {
    if kind == "tokio mpsc" {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                while let Some((n, reply)) = rx.recv().await {
                    let _ = reply.send(n + 1);
                }
            })
        });
        Arc::new(Tokio(tx))
    } else {
        let queue = Arc::new(SegQueue::<Job>::new());
        let wake = Arc::new(Notify::new());
        let (q, w) = (queue.clone(), wake.clone());
        std::thread::spawn(move || {
            runtime().block_on(async move {
                loop {
                    while let Some((n, reply)) = q.pop() {
                        let _ = reply.send(n + 1);
                    }
                    w.notified().await;
                }
            })
        });
        Arc::new(Crossbeam { queue, wake })
    }
}

async fn round_trip(channel: &dyn Channel, n: u64) {
    let (tx, rx) = oneshot::channel();
    channel.send((n, tx));
    assert_eq!(rx.await.expect("answered"), n + 1);
}

fn main() {
    for kind in ["tokio mpsc", "crossbeam SegQueue + Notify"] {
        let channel = owner(kind);
        let rt = runtime();
        let (mut latencies, rate) = rt.block_on(async {
            for n in 0..10_000 {
                round_trip(&*channel, n).await;
            }
            let mut latencies = Vec::new();
            let until = Instant::now() + MEASURE;
            let mut n = 0;
            while Instant::now() < until {
                let start = Instant::now();
                round_trip(&*channel, n).await;
                latencies.push(start.elapsed().as_secs_f64() * 1e9);
                n += 1;
            }
            let until = Instant::now() + MEASURE;
            let loops: Vec<_> = (0..64)
                .map(|_| {
                    let channel = channel.clone();
                    tokio::spawn(async move {
                        let mut done = 0u64;
                        while Instant::now() < until {
                            round_trip(&*channel, done).await;
                            done += 1;
                        }
                        done
                    })
                })
                .collect();
            let mut total = 0;
            for l in loops {
                total += l.await.expect("loop");
            }
            (latencies, total as f64 / MEASURE.as_secs_f64())
        });
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        println!(
            "{kind:>28}: round trip p50 {:>7.0} ns, p99 {:>7.0} ns; 64 in flight: {:>9.0} jobs/s",
            at(0.5),
            at(0.99),
            rate
        );
    }
}
