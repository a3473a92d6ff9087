//! Unix socket handling, address parsing and server shutdown.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;

use common::{unix_server, Client, Mock, TempDir};
use qmp::{ListenAddr, QmpError, Server};

#[test]
fn socket_mode_is_0600_and_removed_on_drop() {
    let dir = TempDir::new();
    let path = dir.path("qmp.sock");
    let server = Server::start(&ListenAddr::Unix(path.clone()), Mock::new()).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(server.local_addr(), format!("unix:{}", path.display()));
    // No temporary entries left beside it.
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    drop(server);
    assert!(!path.exists());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = TempDir::new();
    let path = dir.path("qmp.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves a dead socket file
    assert!(path.exists());
    let server = Server::start(&ListenAddr::Unix(path.clone()), Mock::new()).unwrap();
    let mut c = Client::connect(&server);
    assert!(c.json()["QMP"].is_object());
}

#[test]
fn live_socket_is_refused() {
    let dir = TempDir::new();
    let path = dir.path("qmp.sock");
    let first = Server::start(&ListenAddr::Unix(path.clone()), Mock::new()).unwrap();
    let err = Server::start(&ListenAddr::Unix(path.clone()), Mock::new()).unwrap_err();
    assert!(matches!(err, QmpError::SocketInUse { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("QMP socket {} is in use by another process", path.display())
    );
    // The first server still works.
    let mut c = Client::connect(&first);
    assert!(c.json()["QMP"].is_object());
}

#[test]
fn regular_file_is_not_touched() {
    let dir = TempDir::new();
    let path = dir.path("important.txt");
    std::fs::write(&path, b"keep me").unwrap();
    let err = Server::start(&ListenAddr::Unix(path.clone()), Mock::new()).unwrap_err();
    assert!(matches!(err, QmpError::NotASocket { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn address_parsing() {
    let a = ListenAddr::parse("unix:/tmp/x.sock,server=on,wait=off").unwrap();
    assert_eq!(a, ListenAddr::Unix("/tmp/x.sock".into()));
    let t = ListenAddr::parse("tcp::4444,server,nowait").unwrap();
    assert_eq!(
        t,
        ListenAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 4444
        }
    );
    let e = ListenAddr::parse("unix:/tmp/x.sock,server=on,wait=on").unwrap_err();
    assert!(matches!(e, QmpError::InvalidAddress { .. }));
    assert!(e.to_string().contains("wait=on"), "{e}");
}

#[test]
fn tcp_bind_error_is_reported() {
    let first = Server::start(&ListenAddr::parse("tcp:127.0.0.1:0").unwrap(), Mock::new()).unwrap();
    let again = ListenAddr::parse(&first.local_addr()).unwrap();
    let err = Server::start(&again, Mock::new()).unwrap_err();
    assert!(matches!(err, QmpError::Bind { .. }), "{err:?}");
}

#[test]
fn shutdown_disconnects_clients() {
    let dir = TempDir::new();
    let server = Server::start(&ListenAddr::Unix(dir.path("q.sock")), Mock::new()).unwrap();
    let mut c = Client::connect(&server).negotiate();
    let events = server.events();
    assert_eq!(events.client_count(), 1);
    server.shutdown();
    assert!(c.at_eof());
    assert!(common::wait_for(|| events.client_count() == 0));
    // Emitting on a bus whose server is gone is harmless.
    events.emit("STOP", None);
}

#[test]
fn many_sequential_clients() {
    let server = common::tcp_server(Mock::new());
    for _ in 0..20 {
        let mut c = Client::connect(&server).negotiate();
        assert_eq!(
            c.cmd(r#"{"execute":"query-kvm"}"#)["return"]["present"],
            true
        );
    }
    assert!(common::wait_for(|| server.events().client_count() == 0));
}

#[test]
fn hundreds_of_idle_connections_do_not_lock_out_management() {
    let (server, dir) = unix_server(Mock::new());
    let path = dir.path("qmp.sock");
    // Connections that never negotiate (nor even read the greeting).
    let idle: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
        .collect();
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":1}"#)["id"], 1);
    // A negotiated client keeps its place however many idle ones come after it.
    let more: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
        .collect();
    let mut d = Client::connect(&server).negotiate();
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":2}"#)["id"], 2);
    assert_eq!(d.cmd(r#"{"execute":"query-status","id":3}"#)["id"], 3);
    drop((idle, more));
}
