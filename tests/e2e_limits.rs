//! Slow clients cannot hold the server: the real binary with a small connection cap, against clients that send
//! their headers or body a byte at a time, or nothing at all.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{SHOP, Server, examples_dir, post_form};

const LIMITS: [&str; 8] =
    ["--max-connections", "16", "--header-read-timeout", "2s", "--idle-timeout", "3s", "--body-read-timeout", "2s"];

/// How long until the server closed `stream` (EOF or a reset), writing `trickle` a byte every 300 ms meanwhile.
fn until_closed(mut stream: TcpStream, trickle: bool) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(30) {
        if trickle && stream.write_all(b"a").is_err() {
            return Some(started.elapsed());
        }
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {} // an error response before the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn slow_and_idle_connections_are_closed_and_token_requests_still_succeed() {
    let state = tempfile::tempdir().expect("state");
    let s = Server::start(&examples_dir(), state.path(), &LIMITS);
    let addr = s.base.trim_start_matches("http://").to_string();

    // 24 clients sending their headers a byte at a time and 24 sending nothing: three times the 16 slots.
    let mut attackers = Vec::new();
    for i in 0..48 {
        let addr = addr.clone();
        attackers.push(std::thread::spawn(move || {
            let mut stream = TcpStream::connect(&addr).expect("connect");
            let slowloris = i % 2 == 0;
            if slowloris {
                stream.write_all(b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\nX-Slow: ").expect("write");
            }
            until_closed(stream, slowloris)
        }));
    }
    std::thread::sleep(Duration::from_millis(500));

    // Meanwhile, ordinary clients: every request succeeds, at worst once the slow ones are cut off.
    let started = Instant::now();
    for i in 0..10 {
        let device = format!("device_d{i}");
        let r = post_form(
            &s.url("/oauth2/token"),
            Some(SHOP),
            &[("grant_type", "client_credentials"), ("scope", device.as_str())],
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let served_in = started.elapsed();
    assert!(served_in < Duration::from_secs(20), "ordinary requests took {served_in:?}");

    let closed: Vec<Option<Duration>> = attackers.into_iter().map(|t| t.join().expect("thread")).collect();
    for (i, c) in closed.iter().enumerate() {
        let kind = if i % 2 == 0 { "slow headers" } else { "idle" };
        let after = c.unwrap_or_else(|| panic!("connection {i} ({kind}) was never closed"));
        // Header deadline 2 s, idle 3 s, and a connection waiting in the accept queue starts its clock late.
        assert!(after < Duration::from_secs(15), "connection {i} ({kind}) closed only after {after:?}");
    }
    eprintln!("ordinary requests served in {served_in:?}; slow connections closed after {:?}", closed.iter().max());
}

#[test]
fn a_body_that_trickles_in_gets_408_after_the_body_timeout() {
    let state = tempfile::tempdir().expect("state");
    let s = Server::start(&examples_dir(), state.path(), &LIMITS);
    let mut stream = TcpStream::connect(s.base.trim_start_matches("http://")).expect("connect");
    stream
        .write_all(
            b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Content-Length: 1000\r\n\r\ngrant_type=",
        )
        .expect("head");
    stream.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // A byte every 300 ms keeps the connection from being idle; the body deadline still applies.
    while started.elapsed() < Duration::from_secs(20) {
        let _ = stream.write_all(b"x");
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\":\"invalid_request\"") && text.contains("did not arrive within 2 s"), "{text}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_secs(10), "answered after {took:?}");
}
