//! A test double of a DNS server (UDP on loopback) whose answer for every A query is a list the
//! test changes, or NXDOMAIN, or silence: the records a Kubernetes headless service or Consul
//! would publish as pods come and go, and an outage.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// What the double answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Records {
    /// These A records (an empty list answers with no records).
    A(Vec<Ipv4Addr>),
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// No answer at all (a server down).
    Silent,
}

/// The DNS double; it stops when dropped.
pub struct DnsDouble {
    /// Where it listens.
    pub addr: SocketAddr,
    records: Arc<Mutex<Records>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsDouble {
    /// Starts answering `records` on a free loopback port.
    pub fn start(records: Records) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the DNS double");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local address");
        let records = Arc::new(Mutex::new(records));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (records.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve(&socket, &r, &s));
        Self {
            addr,
            records,
            stop,
            thread: Some(thread),
        }
    }

    /// Answers `records` from now on.
    pub fn set(&self, records: Records) {
        *self.records.lock().unwrap_or_else(|e| e.into_inner()) = records;
    }
}

impl Drop for DnsDouble {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, records: &Mutex<Records>, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let now = records.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut reply = Message::new();
        reply
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true)
            .set_authoritative(true)
            .add_queries(query.queries().to_vec());
        match &now {
            Records::Silent => continue,
            Records::NxDomain => {
                reply.set_response_code(ResponseCode::NXDomain);
            }
            Records::A(ips) => {
                for q in query.queries() {
                    if q.query_type() == RecordType::A {
                        for ip in ips {
                            reply.add_answer(Record::from_rdata(
                                q.name().clone(),
                                0,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
            }
        }
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}
