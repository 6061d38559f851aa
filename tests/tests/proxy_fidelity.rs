//! cutover's proxy changes nothing a client can see: the same requests, sent directly to
//! a backend and through a real agent's proxy to the same backend deployed as a release,
//! get the same answers — status, the fields that describe the content, and the bodies,
//! byte for byte — in every HTTP/1.1 framing: content-length and chunked bodies, HEAD,
//! 204 and 304, `Expect: 100-continue`, bodies of several MB both ways, pipelined
//! requests (also mixing requests the proxy's own HTTP/1.1 path takes with one it
//! hands to hyper), and a WebSocket echo after the upgrade. A slot that never answers
//! gets 504 after the plan's `upstream_timeout`. No timing is asserted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tests::fidelity::{content, frame};
use tests::{Cluster, Proc, free_port, wait_until};

/// The fields that describe an answer's content; `date` and connection management may
/// differ between a direct answer and a proxied one.
const FIELDS: [&str; 10] = [
    "content-length",
    "transfer-encoding",
    "content-type",
    "etag",
    "upgrade",
    "sec-websocket-accept",
    "x-fidelity",
    "x-release",
    "x-expect",
    "x-length",
];

/// One answer as a client sees it.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    /// Interim (1xx) statuses before the final one.
    interim: Vec<u16>,
    status: u16,
    fields: BTreeMap<String, String>,
    /// The body, de-chunked.
    body: Vec<u8>,
}

/// A connection to `addr` with a generous read timeout (so a broken proxy fails the
/// test rather than hanging it).
fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    BufReader::new(s)
}

fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).expect("read a line");
    l.trim_end_matches(['\r', '\n']).to_string()
}

/// A status line and its fields.
fn head(r: &mut BufReader<TcpStream>) -> (u16, BTreeMap<String, String>) {
    let status_line = line(r);
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
    let mut fields = BTreeMap::new();
    loop {
        let l = line(r);
        if l.is_empty() {
            return (status, fields);
        }
        let (k, v) = l.split_once(':').expect("a field");
        let k = k.to_ascii_lowercase();
        if FIELDS.contains(&k.as_str()) {
            fields.insert(k, v.trim().to_string());
        }
    }
}

/// Reads one answer to a request; `head_request`: the request was HEAD (no body).
fn answer(r: &mut BufReader<TcpStream>, head_request: bool) -> Answer {
    let mut interim = Vec::new();
    loop {
        let (status, fields) = head(r);
        if (100..200).contains(&status) && status != 101 {
            interim.push(status);
            continue;
        }
        let body = if head_request || status == 101 || status == 204 || status == 304 {
            Vec::new()
        } else if fields
            .get("transfer-encoding")
            .is_some_and(|t| t == "chunked")
        {
            chunked(r)
        } else if let Some(n) = fields.get("content-length") {
            let mut b = vec![0u8; n.parse().expect("a length")];
            r.read_exact(&mut b).expect("the body");
            b
        } else {
            let mut b = Vec::new();
            r.read_to_end(&mut b).expect("the body to the end");
            b
        };
        return Answer {
            interim,
            status,
            fields,
            body,
        };
    }
}

fn chunked(r: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let size = line(r);
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            // Trailers, up to the blank line.
            while !line(r).is_empty() {}
            return body;
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk).expect("a chunk");
        body.extend_from_slice(&chunk[..size]);
    }
}

/// Sends `requests` in one write on one connection (pipelined when more than one) and
/// reads an answer to each.
fn exchange(addr: SocketAddr, requests: &[&[u8]]) -> Vec<Answer> {
    let mut r = connect(addr);
    r.get_mut().write_all(&requests.concat()).expect("send");
    requests
        .iter()
        .map(|q| answer(&mut r, q.starts_with(b"HEAD ")))
        .collect()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: fidelity\r\n\r\n").into_bytes()
}

fn post(path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: fidelity\r\ncontent-length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn post_chunked(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r =
        format!("POST {path} HTTP/1.1\r\nhost: fidelity\r\ntransfer-encoding: chunked\r\n\r\n")
            .into_bytes();
    for c in body.chunks(100_000) {
        r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        r.extend_from_slice(c);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

/// `Expect: 100-continue`: the head, then the body only once `100 Continue` came.
fn expect_continue(addr: SocketAddr, body: &[u8]) -> Answer {
    let mut r = connect(addr);
    let head_only = format!(
        "POST /fidelity/echo HTTP/1.1\r\nhost: fidelity\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    r.get_mut().write_all(head_only.as_bytes()).expect("send");
    let (interim, _) = head(&mut r);
    assert_eq!(interim, 100, "the body is asked for before it is sent");
    r.get_mut().write_all(body).expect("send the body");
    let mut a = answer(&mut r, false);
    a.interim.insert(0, interim);
    a
}

/// A WebSocket handshake, a few frames each way, and the close; returns the 101 answer
/// and every byte the server sent after it.
fn websocket(addr: SocketAddr) -> (Answer, Vec<u8>) {
    let mut r = connect(addr);
    r.get_mut()
        .write_all(
            b"GET /fidelity/ws HTTP/1.1\r\nhost: fidelity\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .expect("handshake");
    let a = answer(&mut r, false);
    assert_eq!(a.status, 101, "{a:?}");
    let mask = Some([1, 2, 3, 4]);
    let frames = [
        frame(0x1, b"hello", mask),
        frame(0x2, &content(70_000), mask),
        frame(0x1, b"bye", mask),
        frame(0x8, &[0x03, 0xe8], mask),
    ];
    let mut echoed = Vec::new();
    for f in &frames {
        r.get_mut().write_all(f).expect("a frame");
    }
    let expected: usize = [5usize, 70_000, 3, 2]
        .iter()
        .map(|n| n + if *n < 126 { 2 } else { 10 })
        .sum();
    let mut buf = vec![0u8; 65536];
    while echoed.len() < expected {
        let n = r.read(&mut buf).expect("echoed frames");
        assert!(n > 0, "closed after {} of {expected} bytes", echoed.len());
        echoed.extend_from_slice(&buf[..n]);
    }
    (a, echoed)
}

/// Every case, against `addr`.
fn every_case(addr: SocketAddr) -> Vec<(String, Answer)> {
    let big = content(4_000_000);
    let mut out: Vec<(String, Answer)> = Vec::new();
    let mut one = |name: &str, request: Vec<u8>| {
        let mut a = exchange(addr, &[&request]);
        out.push((name.to_string(), a.remove(0)));
    };
    one("content-length", get("/fidelity/length/5000"));
    one("chunked", get("/fidelity/chunked/5000"));
    one(
        "HEAD",
        b"HEAD /fidelity/length/5000 HTTP/1.1\r\nhost: fidelity\r\n\r\n".to_vec(),
    );
    one("204", get("/fidelity/status/204"));
    one("304", get("/fidelity/status/304"));
    one("the sample's own answer", get("/"));
    one("a large download", get("/fidelity/length/8000000"));
    one("a large chunked download", get("/fidelity/chunked/3000000"));
    one(
        "a small chunked upload, echoed",
        post_chunked("/fidelity/echo", &content(5000)),
    );
    one("a large upload, echoed", post("/fidelity/echo", "", &big));
    one(
        "a large chunked upload, echoed",
        post_chunked("/fidelity/echo", &big),
    );
    out.push((
        "expect 100-continue".into(),
        expect_continue(addr, &content(300_000)),
    ));
    let pipelined = exchange(
        addr,
        &[
            &get("/fidelity/length/10"),
            &post("/fidelity/echo", "", b"pipelined body"),
            &get("/fidelity/chunked/3000"),
            b"HEAD / HTTP/1.1\r\nhost: fidelity\r\n\r\n",
            &get("/fidelity/status/204"),
        ],
    );
    for (i, a) in pipelined.into_iter().enumerate() {
        out.push((format!("pipelined {i}"), a));
    }
    // Plain requests, then one too large to be held back whole (the proxy's own path
    // hands the connection to hyper's there), then plain ones again, on one connection.
    let mixed = exchange(
        addr,
        &[
            &get("/fidelity/length/10"),
            &post("/fidelity/echo", "", &content(200_000)),
            &get("/fidelity/chunked/3000"),
            &get("/fidelity/status/204"),
        ],
    );
    for (i, a) in mixed.into_iter().enumerate() {
        out.push((format!("mixed {i}"), a));
    }
    out
}

#[test]
fn the_proxy_answers_byte_for_byte_like_the_backend() {
    let c = Cluster::start(120, 1);
    let plan = c.plan("1.0.0").upstream_timeout("1s").write("v1");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "deploy: {err}");
    let proxied = c.addrs()[0];

    // The same sample, version and behaviour, started directly.
    let dir = c.dir.join("direct");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("behaviour.env"), "version=1.0.0\n").expect("behaviour");
    let port = free_port();
    let _direct = Proc::spawn(
        "direct sample",
        std::process::Command::new(c.bin.join("cutover-sample"))
            .args(["serve", "--port", &port.to_string()])
            .current_dir(&dir),
        c.dir.join("direct.log"),
    );
    let direct: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_until(Duration::from_secs(10), "the direct sample", || {
        TcpStream::connect(direct).is_ok()
    });

    let want = every_case(direct);
    let got = every_case(proxied);
    assert_eq!(want.len(), got.len());
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert_eq!(
            (w.status, &w.interim, &w.fields),
            (g.status, &g.interim, &g.fields),
            "{name}: direct, then proxied"
        );
        assert!(
            w.body == g.body,
            "{name}: bodies differ ({} direct, {} proxied bytes)",
            w.body.len(),
            g.body.len()
        );
    }
    // The cases answered what they were meant to (the comparison alone would pass if
    // both failed alike).
    let by_name: BTreeMap<&str, &Answer> = got.iter().map(|(n, a)| (n.as_str(), a)).collect();
    assert_eq!(by_name["content-length"].body, content(5000));
    assert_eq!(by_name["chunked"].fields["transfer-encoding"], "chunked");
    assert_eq!(by_name["chunked"].body, content(5000));
    assert_eq!(by_name["HEAD"].fields["content-length"], "5000");
    assert_eq!(by_name["204"].status, 204);
    assert_eq!(by_name["304"].status, 304);
    assert_eq!(by_name["the sample's own answer"].body, b"release 1.0.0\n");
    assert_eq!(by_name["a large download"].body.len(), 8_000_000);
    assert_eq!(by_name["a large upload, echoed"].body, content(4_000_000));
    assert_eq!(
        by_name["a large chunked upload, echoed"].body,
        content(4_000_000)
    );
    assert_eq!(by_name["expect 100-continue"].interim, vec![100]);
    assert_eq!(by_name["expect 100-continue"].body, content(300_000));
    assert_eq!(by_name["pipelined 1"].body, b"pipelined body");

    // A WebSocket: the same handshake and the same frames back.
    let (w101, w_frames) = websocket(direct);
    let (g101, g_frames) = websocket(proxied);
    assert_eq!(w101.fields, g101.fields);
    assert_eq!(
        g101.fields["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert!(w_frames == g_frames, "echoed frames differ");
    assert_eq!(&g_frames[..7], &frame(0x1, b"hello", None)[..]);

    // A slot that never answers: 504 once the plan's upstream timeout has passed.
    let mut a = exchange(proxied, &[&get("/fidelity/hang")]);
    assert_eq!(a.remove(0).status, 504);
    // The proxy still serves on.
    let mut a = exchange(proxied, &[&get("/")]);
    assert_eq!(a.remove(0).body, b"release 1.0.0\n");
}
