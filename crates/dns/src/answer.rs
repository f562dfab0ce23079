//! From a query's bytes to its answer's bytes, against an [`Index`]:
//! no I/O, no waiting, nothing kept between queries.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::index::{self, Index};
use crate::metrics::{self, Drop, Proto};
use crate::names::{self, Interior, Lookup};

/// The largest UDP answer to a query without EDNS (RFC 1035).
const CLASSIC_UDP: usize = 512;

/// One encoded answer, and what the metrics need of it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) bytes: Vec<u8>,
    /// Row of the question type (see [`metrics::type_index`]).
    pub(crate) qtype: usize,
    pub(crate) rcode: ResponseCode,
    pub(crate) truncated: bool,
}

/// Answers queries for one domain.
#[derive(Debug, Clone)]
pub(crate) struct Responder {
    /// Lowercase, fully qualified.
    domain: Name,
    /// The domain's labels, lowercase, leftmost first.
    domain_labels: Vec<Vec<u8>>,
    ttl: u32,
    /// The EDNS payload size this server offers and honours at most.
    max_udp_payload: u16,
    /// `ns.{domain}` and `hostmaster.{domain}`, for the SOA.
    mname: Name,
    rname: Name,
}

/// What a lookup found.
enum Found {
    Records {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// The name exists, but has no record of the asked type.
    NoData,
    /// No such name.
    NxDomain,
}

impl Responder {
    /// A responder for `domain` (fully qualified, lowercase).
    pub(crate) fn new(domain: Name, ttl: u32, max_udp_payload: u16) -> Responder {
        let domain_labels = domain.iter().map(<[u8]>::to_vec).collect();
        let prepend = |label: &[u8]| {
            domain
                .prepend_label(label)
                .unwrap_or_else(|_| domain.clone())
        };
        Responder {
            mname: prepend(b"ns"),
            rname: prepend(b"hostmaster"),
            domain,
            domain_labels,
            ttl,
            max_udp_payload: max_udp_payload.max(CLASSIC_UDP as u16),
        }
    }

    /// The domain answered for.
    pub(crate) fn domain(&self) -> &Name {
        &self.domain
    }

    /// Answers `query` (its bytes as received over `proto`); `Err` for
    /// what deserves no answer at all (too short to hold a header, or a
    /// response rather than a query).
    pub(crate) fn answer(&self, index: &Index, query: &[u8], proto: Proto) -> Result<Answer, Drop> {
        let mut decoder = BinDecoder::new(query);
        let header = Header::read(&mut decoder).map_err(|_| Drop::Malformed)?;
        if header.metadata.message_type != MessageType::Query {
            return Err(Drop::Malformed);
        }
        let Ok(request) = Message::from_vec(query) else {
            let mut metadata = Metadata::response_from_request(&header.metadata);
            metadata.response_code = ResponseCode::FormErr;
            return Ok(self.encode(empty(metadata), None, proto, metrics::type_index(None)));
        };
        let mut response = empty(Metadata::response_from_request(&request.metadata));
        let client_payload = request.edns.as_ref().map(Edns::max_payload);
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(self.max_udp_payload);
            response.set_edns(edns);
        }
        let qtype = request.queries.first().map(|q| q.query_type());
        let row = metrics::type_index(qtype);
        if let Some(q) = request.queries.first() {
            response.add_query(q.clone());
        }
        let rcode = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            // RFC 6891 6.1.3: only version 0 is known.
            Some(ResponseCode::BADVERS)
        } else if request.metadata.op_code != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else if request.queries.len() != 1 {
            Some(ResponseCode::FormErr)
        } else {
            None
        };
        if let Some(rcode) = rcode {
            response.metadata.response_code = rcode;
            return Ok(self.encode(response, client_payload, proto, row));
        }
        let q = &request.queries[0];
        let Some(relative) = self.relative_labels(q.name()) else {
            response.metadata.response_code = ResponseCode::Refused;
            return Ok(self.encode(response, client_payload, proto, row));
        };
        if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
            response.metadata.response_code = ResponseCode::Refused;
            return Ok(self.encode(response, client_payload, proto, row));
        }
        response.metadata.authoritative = true;
        let found = match relative {
            Some(labels) => {
                let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                self.lookup(index, &names::parse(&labels), q.name(), q.query_type())
            }
            None => Found::NxDomain,
        };
        match found {
            Found::Records {
                answers,
                additionals,
            } => {
                response.answers = answers;
                response.additionals = additionals;
            }
            Found::NoData => response.authorities.push(self.soa(index)),
            Found::NxDomain => {
                response.metadata.response_code = ResponseCode::NXDomain;
                response.authorities.push(self.soa(index));
            }
        }
        Ok(self.encode(response, client_payload, proto, row))
    }

    /// The labels of `name` before the domain, lowercase: `None` when
    /// `name` is not under the domain; `Some(None)` when it is but holds
    /// labels that cannot name anything (not UTF-8).
    fn relative_labels(&self, name: &Name) -> Option<Option<Vec<String>>> {
        let labels: Vec<&[u8]> = name.iter().collect();
        let d = self.domain_labels.len();
        if labels.len() < d {
            return None;
        }
        let (rest, tail) = labels.split_at(labels.len() - d);
        let under = tail
            .iter()
            .zip(&self.domain_labels)
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
        if !under {
            return None;
        }
        Some(
            rest.iter()
                .map(|l| std::str::from_utf8(l).ok().map(str::to_ascii_lowercase))
                .collect(),
        )
    }

    fn lookup(&self, index: &Index, lookup: &Lookup, qname: &Name, qtype: RecordType) -> Found {
        match lookup {
            Lookup::Apex => match qtype {
                RecordType::SOA | RecordType::ANY => Found::Records {
                    answers: vec![self.soa(index)],
                    additionals: Vec::new(),
                },
                _ => Found::NoData,
            },
            Lookup::Interior(interior) => {
                let exists = match interior {
                    Interior::Any => index.has_services(),
                    Interior::Zone(zone) => index.has_zone(zone),
                    Interior::Service(service) => index.service(service).is_some(),
                };
                if exists {
                    Found::NoData
                } else {
                    Found::NxDomain
                }
            }
            Lookup::Unknown => Found::NxDomain,
            Lookup::Service { service, tag, zone } => {
                let Some(records) = index.service(service) else {
                    return Found::NxDomain;
                };
                let mut matching: Vec<&index::Record> = records
                    .records
                    .iter()
                    .filter(|r| r.serving && r.matches(tag.as_deref(), zone.as_deref()))
                    .collect();
                if matching.is_empty() {
                    return Found::NxDomain;
                }
                fastrand::shuffle(&mut matching);
                self.records(&matching, qname, qtype)
            }
            Lookup::Instance { service, id } => {
                let Some(record) = index.service(service).and_then(|s| s.instance(id)) else {
                    return Found::NxDomain;
                };
                match (&record.host_name, qtype) {
                    // A name: its only record is a CNAME to the host, for
                    // the client's resolver to follow.
                    (
                        Some(host),
                        RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::ANY,
                    ) => Found::Records {
                        answers: vec![self.record(qname, RData::CNAME(CNAME(host.clone())))],
                        additionals: Vec::new(),
                    },
                    _ => self.records(&[record], qname, qtype),
                }
            }
        }
    }

    /// The records of type `qtype` of `matching` at `qname`.
    fn records(&self, matching: &[&index::Record], qname: &Name, qtype: RecordType) -> Found {
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        match qtype {
            RecordType::A | RecordType::AAAA | RecordType::ANY => {
                for r in matching {
                    if let Some(rdata) = address(r.ip(), qtype) {
                        answers.push(self.record(qname, rdata));
                    }
                }
            }
            RecordType::SRV => {
                for r in matching {
                    let Some(port) = r.port else { continue };
                    // IP instances are named under the domain, their
                    // address given alongside; host names are the target
                    // themselves, for the client to resolve (as Consul).
                    let target = r.host_name.as_ref().unwrap_or(&r.name);
                    answers.push(self.record(
                        qname,
                        RData::SRV(SRV::new(1, r.weight, port, target.clone())),
                    ));
                    if let Some(rdata) = address(r.ip(), RecordType::ANY) {
                        additionals.push(self.record(&r.name, rdata));
                    }
                }
            }
            _ => {}
        }
        if answers.is_empty() {
            Found::NoData
        } else {
            Found::Records {
                answers,
                additionals,
            }
        }
    }

    fn record(&self, name: &Name, rdata: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, rdata)
    }

    /// The domain's SOA: its serial the catalog's revision (mod 2^32), its
    /// minimum (the negative-caching TTL) the configured TTL.
    fn soa(&self, index: &Index) -> Record {
        let serial = index.source.revision() as u32;
        let soa = SOA::new(
            self.mname.clone(),
            self.rname.clone(),
            serial,
            3600,
            600,
            86400,
            self.ttl,
        );
        self.record(&self.domain, RData::SOA(soa))
    }

    /// Encodes `response`; over UDP cut to the size the client takes (512
    /// bytes without EDNS, else its payload size up to ours), with the TC
    /// bit set, dropping the additional section first, then answers from
    /// the end.
    fn encode(
        &self,
        mut response: Message,
        client_payload: Option<u16>,
        proto: Proto,
        qtype: usize,
    ) -> Answer {
        let limit = match (proto, client_payload) {
            (Proto::Tcp, _) => usize::from(u16::MAX),
            (Proto::Udp, None) => CLASSIC_UDP,
            (Proto::Udp, Some(p)) => usize::from(p.min(self.max_udp_payload)).max(CLASSIC_UDP),
        };
        let rcode = response.metadata.response_code;
        let mut bytes = to_bytes(&response);
        let mut truncated = false;
        if bytes.len() > limit {
            truncated = true;
            response.metadata.truncation = true;
            response.additionals.clear();
            // The most answers that fit: a binary search over the count.
            let answers = std::mem::take(&mut response.answers);
            let (mut lo, mut hi) = (0, answers.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                response.answers = answers[..mid].to_vec();
                if to_bytes(&response).len() <= limit {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            response.answers = answers[..lo].to_vec();
            bytes = to_bytes(&response);
            if bytes.len() > limit {
                response.authorities.clear();
                bytes = to_bytes(&response);
            }
        }
        Answer {
            bytes,
            qtype,
            rcode,
            truncated,
        }
    }
}

/// A response with `metadata` and nothing else yet.
fn empty(metadata: Metadata) -> Message {
    let mut m = Message::response(metadata.id, metadata.op_code);
    m.metadata = metadata;
    m
}

/// `ip` as an A or AAAA record's data, if `qtype` asks for its family.
fn address(ip: Option<IpAddr>, qtype: RecordType) -> Option<RData> {
    match (ip?, qtype) {
        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(v4))),
        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(v6))),
        _ => None,
    }
}

/// The wire form of `message`. Encoding what this module builds cannot
/// fail (names are valid, counts small); should it, the answer is a bare
/// SERVFAIL header.
fn to_bytes(message: &Message) -> Vec<u8> {
    message.to_vec().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot encode a DNS answer");
        let mut fail = empty(message.metadata);
        fail.metadata.response_code = ResponseCode::ServFail;
        fail.to_vec().unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use muster::Instance;

    fn domain() -> Name {
        Name::from_ascii("muster.").unwrap()
    }

    fn index(instances: &[Instance]) -> Index {
        Index::from_instances(instances, &domain())
    }

    fn ask(
        index: &Index,
        name: &str,
        qtype: RecordType,
        proto: Proto,
        edns: Option<u16>,
    ) -> Message {
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            query.set_edns(e);
        }
        let bytes = query.to_vec().unwrap();
        let responder = Responder::new(domain(), 0, 1232);
        let answer = responder.answer(index, &bytes, proto).unwrap();
        let message = Message::from_vec(&answer.bytes).unwrap();
        assert_eq!(message.metadata.id, query.metadata.id);
        assert_eq!(answer.rcode, message.metadata.response_code);
        assert_eq!(answer.truncated, message.metadata.truncation);
        message
    }

    fn users() -> Vec<Instance> {
        vec![
            Instance::new("user", "u-1", "http://10.0.0.1:8080")
                .with_tag("canary")
                .with_zone("eu-1"),
            Instance::new("user", "u-2", "10.0.0.2:8081").with_zone("us-1"),
            Instance::new("user", "u-3", "[2001:db8::3]:8082"),
            Instance::new("user", "u-4", "api.internal:9000"),
            {
                let mut d = Instance::new("user", "u-5", "10.0.0.5:80");
                d.status = muster::Status::Draining;
                d
            },
        ]
    }

    fn ips(m: &Message) -> Vec<String> {
        let mut v: Vec<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                RData::AAAA(a) => a.0.to_string(),
                RData::CNAME(c) => c.0.to_ascii(),
                other => format!("{other:?}"),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_and_aaaa_of_serving_ip_instances() {
        let idx = index(&users());
        let m = ask(
            &idx,
            "user.service.muster.",
            RecordType::A,
            Proto::Udp,
            None,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(ips(&m), ["10.0.0.1", "10.0.0.2"]);
        let m = ask(
            &idx,
            "USER.Service.MUSTER.",
            RecordType::AAAA,
            Proto::Udp,
            None,
        );
        assert_eq!(ips(&m), ["2001:db8::3"]);
        assert_eq!(m.answers[0].name.to_ascii(), "USER.Service.MUSTER.");
        let m = ask(
            &idx,
            "canary.user.service.muster.",
            RecordType::A,
            Proto::Udp,
            None,
        );
        assert_eq!(ips(&m), ["10.0.0.1"]);
        let m = ask(
            &idx,
            "user.service.us-1.muster.",
            RecordType::A,
            Proto::Udp,
            None,
        );
        assert_eq!(ips(&m), ["10.0.0.2"]);
        let m = ask(
            &idx,
            "canary.user.service.us-1.muster.",
            RecordType::A,
            Proto::Udp,
            None,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn srv_with_addresses_alongside() {
        let idx = index(&users());
        let m = ask(
            &idx,
            "_user._tcp.service.muster.",
            RecordType::SRV,
            Proto::Udp,
            Some(1232),
        );
        let mut srv: Vec<(u16, String)> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.port, s.target.to_ascii()),
                other => panic!("{other:?}"),
            })
            .collect();
        srv.sort();
        assert_eq!(
            srv,
            [
                (8080, "u-1.user.instance.muster.".to_string()),
                (8081, "u-2.user.instance.muster.".to_string()),
                (8082, "u-3.user.instance.muster.".to_string()),
                (9000, "api.internal.".to_string()),
            ]
        );
        assert_eq!(m.additionals.len(), 3, "{:?}", m.additionals);
        assert!(m.edns.is_some());
    }

    #[test]
    fn instance_names() {
        let idx = index(&users());
        let m = ask(
            &idx,
            "u-2.user.instance.muster.",
            RecordType::A,
            Proto::Udp,
            None,
        );
        assert_eq!(ips(&m), ["10.0.0.2"]);
        let m = ask(
            &idx,
            "u-4.user.instance.muster.",
            RecordType::A,
            Proto::Udp,
            None,
        );
        assert_eq!(ips(&m), ["api.internal."]);
        // Draining instances keep their own name.
        let m = ask(
            &idx,
            "u-5.user.instance.muster.",
            RecordType::A,
            Proto::Udp,
            None,
        );
        assert_eq!(ips(&m), ["10.0.0.5"]);
    }

    #[test]
    fn negative_answers_carry_the_soa() {
        let idx = index(&users());
        for (name, qtype, rcode) in [
            (
                "nope.service.muster.",
                RecordType::A,
                ResponseCode::NXDomain,
            ),
            (
                "u-9.user.instance.muster.",
                RecordType::A,
                ResponseCode::NXDomain,
            ),
            ("a.b.c.d.muster.", RecordType::A, ResponseCode::NXDomain),
            (
                "user.service.muster.",
                RecordType::TXT,
                ResponseCode::NoError,
            ),
            (
                "u-2.user.instance.muster.",
                RecordType::AAAA,
                ResponseCode::NoError,
            ),
            ("service.muster.", RecordType::A, ResponseCode::NoError),
            ("eu-1.muster.", RecordType::A, ResponseCode::NoError),
            ("mars.muster.", RecordType::A, ResponseCode::NXDomain),
        ] {
            let m = ask(&idx, name, qtype, Proto::Udp, None);
            assert_eq!(m.metadata.response_code, rcode, "{name} {qtype}");
            assert!(m.answers.is_empty(), "{name}");
            assert_eq!(m.authorities.len(), 1, "{name}");
            assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        }
        let m = ask(&idx, "muster.", RecordType::SOA, Proto::Udp, None);
        assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn outside_the_domain_is_refused() {
        let idx = index(&users());
        for name in ["example.com.", "user.service.consul.", "."] {
            let m = ask(&idx, name, RecordType::A, Proto::Udp, None);
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(!m.metadata.authoritative);
        }
    }

    #[test]
    fn large_udp_answers_are_truncated() {
        let many: Vec<Instance> = (0..60)
            .map(|i| Instance::new("big", format!("b-{i}"), format!("10.1.0.{i}:80")))
            .collect();
        let idx = index(&many);
        let m = ask(&idx, "big.service.muster.", RecordType::A, Proto::Udp, None);
        assert!(m.metadata.truncation);
        assert!(
            !m.answers.is_empty() && m.answers.len() < 60,
            "{}",
            m.answers.len()
        );
        assert!(m.to_vec().unwrap().len() <= 512);
        let m = ask(
            &idx,
            "big.service.muster.",
            RecordType::A,
            Proto::Udp,
            Some(4096),
        );
        assert!(!m.metadata.truncation, "60 A records fit in 1232 bytes");
        assert_eq!(m.answers.len(), 60);
        let m = ask(
            &idx,
            "big.service.muster.",
            RecordType::SRV,
            Proto::Udp,
            Some(4096),
        );
        assert!(m.metadata.truncation);
        assert!(m.to_vec().unwrap().len() <= 1232);
        let m = ask(
            &idx,
            "big.service.muster.",
            RecordType::SRV,
            Proto::Tcp,
            None,
        );
        assert!(!m.metadata.truncation);
        assert_eq!((m.answers.len(), m.additionals.len()), (60, 60));
    }

    #[test]
    fn malformed_queries() {
        let idx = index(&users());
        let r = Responder::new(domain(), 0, 1232);
        assert!(r.answer(&idx, &[1, 2, 3], Proto::Udp).is_err());
        // A header claiming a question that is not there.
        let bad = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'x'];
        let a = r.answer(&idx, &bad, Proto::Udp).unwrap();
        assert_eq!(a.rcode, ResponseCode::FormErr);
        let m = Message::from_vec(&a.bytes).unwrap();
        assert_eq!(m.metadata.id, 0xabcd);
        // A response is never answered (no reflection loops).
        let mut resp = Message::response(7, OpCode::Query);
        resp.add_query(Query::query(domain(), RecordType::A));
        assert!(r.answer(&idx, &resp.to_vec().unwrap(), Proto::Udp).is_err());
        // Random bytes: an answer or a drop, never a panic.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..80);
            let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let _ = r.answer(&idx, &bytes, Proto::Udp);
        }
    }
}
