//! A DNS server the test controls, on 127.0.0.1 (UDP and TCP on one free port): it answers A
//! queries for the names it is given, fails them on demand, and counts them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// How the server answers for one name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// These addresses, with this TTL in seconds.
    Addresses(Vec<Ipv4Addr>, u32),
    /// SERVFAIL.
    Fail,
}

#[derive(Default)]
struct State {
    answers: HashMap<String, Answer>,
    queries: HashMap<String, usize>,
}

pub struct DnsServer {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl DnsServer {
    pub fn start() -> DnsServer {
        // One port for both transports: bind TCP first, then UDP on its port.
        let (tcp, udp) = loop {
            let tcp = TcpListener::bind("127.0.0.1:0").expect("bind the DNS TCP listener");
            let port = tcp.local_addr().unwrap().port();
            if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) {
                break (tcp, udp);
            }
        };
        let address = udp.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let udp_state = state.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 512];
            while let Ok((length, from)) = udp.recv_from(&mut buffer) {
                if let Some(reply) = answer(&udp_state, &buffer[..length]) {
                    let _ = udp.send_to(&reply, from);
                }
            }
        });
        let tcp_state = state.clone();
        std::thread::spawn(move || {
            for stream in tcp.incoming() {
                let Ok(mut stream) = stream else { continue };
                let state = tcp_state.clone();
                std::thread::spawn(move || loop {
                    let mut length = [0u8; 2];
                    if stream.read_exact(&mut length).is_err() {
                        return;
                    }
                    let mut query = vec![0u8; u16::from_be_bytes(length) as usize];
                    if stream.read_exact(&mut query).is_err() {
                        return;
                    }
                    let Some(reply) = answer(&state, &query) else {
                        return;
                    };
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if stream.write_all(&framed).is_err() {
                        return;
                    }
                });
            }
        });
        DnsServer { address, state }
    }

    /// From now on, answer `host` so.
    pub fn set(&self, host: &str, answer: Answer) {
        self.state
            .lock()
            .unwrap()
            .answers
            .insert(normalize(host), answer);
    }

    /// A queries for `host` received so far.
    pub fn queries(&self, host: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .queries
            .get(&normalize(host))
            .copied()
            .unwrap_or(0)
    }
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn answer(state: &Mutex<State>, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries().first()?.clone();
    let host = normalize(&question.name().to_ascii());
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .add_query(question.clone());
    let mut state = state.lock().unwrap();
    if question.query_type() == RecordType::A {
        *state.queries.entry(host.clone()).or_default() += 1;
    }
    match state.answers.get(&host) {
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        Some(Answer::Fail) => {
            reply.set_response_code(ResponseCode::ServFail);
        }
        Some(Answer::Addresses(addresses, ttl)) => {
            reply.set_response_code(ResponseCode::NoError);
            if question.query_type() == RecordType::A {
                for address in addresses {
                    reply.add_answer(Record::from_rdata(
                        question.name().clone(),
                        *ttl,
                        RData::A(A(*address)),
                    ));
                }
            }
        }
    }
    reply.to_vec().ok()
}
