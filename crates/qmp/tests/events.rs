//! Event delivery: fan-out, timestamps, negotiation gating, slow clients.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{unix_server, wait_for, Client, Mock};
use qmp::CLIENT_QUEUE_CAPACITY;
use serde_json::json;

#[test]
fn two_clients_receive_events() {
    let (server, _dir) = unix_server(Mock::new());
    let mut a = Client::connect(&server).negotiate();
    let mut b = Client::connect(&server).negotiate();
    let bus = server.events();
    assert!(wait_for(|| bus.client_count() == 2));
    bus.emit(
        "RESET",
        Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
    );
    for c in [&mut a, &mut b] {
        let line = c.line();
        assert!(line.starts_with("{\"timestamp\": {\"seconds\": "), "{line}");
        let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ev["event"], "RESET");
        assert_eq!(
            ev["data"],
            json!({"guest": false, "reason": "host-qmp-system-reset"})
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let secs = ev["timestamp"]["seconds"].as_i64().unwrap();
        assert!((now - secs).abs() <= 5, "{secs} vs {now}");
        assert!(ev["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
    }
    bus.emit("STOP", None);
    let line = a.line();
    assert!(
        line.ends_with(", \"event\": \"STOP\"}\r\n") && !line.contains("data"),
        "{line}"
    );
}

#[test]
fn events_only_after_negotiation() {
    let (server, _dir) = unix_server(Mock::new());
    let mut early = Client::connect(&server);
    early.json();
    let bus = server.events();
    assert!(wait_for(|| bus.client_count() == 0));
    bus.emit("STOP", None);
    // The first line after the greeting is the reply, not the event.
    assert_eq!(early.cmd(r#"{"execute":"query-kvm","id":7}"#)["id"], 7);
    let mut early = early;
    assert_eq!(
        early.cmd(r#"{"execute":"qmp_capabilities"}"#),
        json!({"return": {}})
    );
    bus.emit("RESUME", None);
    assert_eq!(early.json()["event"], "RESUME");
}

#[test]
fn stuck_client_does_not_block_emit_or_others() {
    let (server, _dir) = unix_server(Mock::new());
    let _stuck = Client::connect(&server).negotiate(); // never reads again
    let mut good = Client::connect(&server).negotiate();
    let bus = server.events();
    assert!(wait_for(|| bus.client_count() == 2));
    let total = 2 * CLIENT_QUEUE_CAPACITY;
    let received = Arc::new(AtomicUsize::new(0));
    let reader = std::thread::spawn({
        let received = received.clone();
        move || {
            while received.load(Ordering::SeqCst) < total {
                assert_eq!(good.json()["event"], "FLOOD");
                received.fetch_add(1, Ordering::SeqCst);
            }
            good
        }
    });
    // Large events fill the stuck client's socket buffer, then its queue.
    let data = json!({"pad": "x".repeat(16 * 1024)});
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 1..=total {
        let t = Instant::now();
        bus.emit("FLOOD", Some(data.clone()));
        assert!(t.elapsed() < Duration::from_secs(1), "emit blocked");
        // Pace on the good client only, so that its queue never overflows.
        while i - received.load(Ordering::SeqCst) > CLIENT_QUEUE_CAPACITY / 4 {
            assert!(Instant::now() < deadline, "good client starved");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // The stuck client was dropped, the good one got everything.
    assert!(wait_for(|| bus.client_count() == 1));
    let mut good = reader.join().unwrap();
    assert_eq!(good.cmd(r#"{"execute":"query-kvm","id":1}"#)["id"], 1);
}

#[test]
fn flush_waits_for_delivery() {
    let (server, _dir) = unix_server(Mock::new());
    let mut c = Client::connect(&server).negotiate();
    let bus = server.events();
    bus.emit(
        "SHUTDOWN",
        Some(json!({"guest": true, "reason": "guest-shutdown"})),
    );
    assert!(bus.flush(Duration::from_secs(5)));
    drop(server);
    let ev = c.json();
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(ev["data"]["reason"], "guest-shutdown");
}
