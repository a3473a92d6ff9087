//! HMP `savevm`, `loadvm`, `delvm` and `info snapshots`, byte for byte as
//! QEMU 10.0 prints them.

mod common;

use std::sync::Once;

use common::{hmp, unix_server, unix_server_for, Call, Client, JobMock, Mock};
use qmp::SnapshotEntry;

/// `info snapshots` prints dates in local time (QEMU:
/// g_date_time_new_from_unix_local); pin the zone so the expected strings
/// below hold anywhere. Every test calls this before any server exists, so
/// no thread reads the environment while it is being changed.
fn utc() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var("TZ", "UTC0"));
}

fn arg(name: &'static str, v: &str) -> Call {
    Call::Arg(name, v.to_string())
}

#[test]
fn savevm_loadvm_delvm() {
    utc();
    let mock = JobMock::new();
    let (server, _dir) = unix_server_for(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    assert_eq!(hmp(&mut c, "savevm snap0"), "");
    assert_eq!(hmp(&mut c, "loadvm snap0"), "");
    assert_eq!(hmp(&mut c, "  delvm\tsnap0  "), "");
    // QEMU's get_str(): a double-quoted tag may hold spaces and escapes.
    assert_eq!(hmp(&mut c, r#"savevm "my snap \"1\"""#), "");
    assert_eq!(
        mock.calls(),
        vec![
            arg("savevm", "snap0"),
            arg("loadvm", "snap0"),
            arg("delvm", "snap0"),
            arg("savevm", "my snap \"1\""),
        ]
    );
    mock.fail_with(Some(
        "Device 'none0' is writable but does not support snapshots",
    ));
    for cmd in ["savevm", "loadvm", "delvm"] {
        assert_eq!(
            hmp(&mut c, &format!("{cmd} s")),
            "Error: Device 'none0' is writable but does not support snapshots\r\n"
        );
    }
    mock.fail_with(Some(
        "Snapshot 'nope' does not exist in one or more devices",
    ));
    assert_eq!(
        hmp(&mut c, "loadvm nope"),
        "Error: Snapshot 'nope' does not exist in one or more devices\r\n"
    );
}

#[test]
fn argument_errors_run_nothing() {
    utc();
    let mock = JobMock::new();
    let (server, _dir) = unix_server_for(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    // monitor_parse_arguments() + handle_hmp_command() (monitor/hmp.c).
    assert_eq!(
        hmp(&mut c, "loadvm"),
        "loadvm: string expected\r\nTry \"help loadvm\" for more information\r\n"
    );
    assert_eq!(
        hmp(&mut c, "delvm   "),
        "delvm: string expected\r\nTry \"help delvm\" for more information\r\n"
    );
    assert_eq!(
        hmp(&mut c, "savevm a b"),
        "savevm: extraneous characters at the end of line\r\n\
         Try \"help savevm\" for more information\r\n"
    );
    assert_eq!(
        hmp(&mut c, r#"loadvm "unterminated"#),
        "loadvm: string expected\r\nTry \"help loadvm\" for more information\r\n"
    );
    assert_eq!(
        hmp(&mut c, "info snapshots all"),
        "snapshots: extraneous characters at the end of line\r\n\
         Try \"help info snapshots\" for more information\r\n"
    );
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

/// `vm-%Y%m%d%H%M%S` of a Unix time, in UTC.
fn utc_tag(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "vm-{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[test]
fn bare_savevm_makes_up_a_tag() {
    utc();
    assert_eq!(utc_tag(1_795_637_730), "vm-20261125201530");
    let mock = JobMock::new();
    let (server, _dir) = unix_server_for(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let before = utc_tag(now());
    assert_eq!(hmp(&mut c, "savevm"), "");
    assert_eq!(hmp(&mut c, "savevm   "), "");
    let after = utc_tag(now());
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    for call in calls {
        let Call::Arg("savevm", tag) = call else {
            panic!("{call:?}")
        };
        // save_snapshot() (migration/savevm.c): "vm-%Y%m%d%H%M%S", local time.
        assert_eq!(tag.len(), "vm-20261125201530".len(), "{tag}");
        assert!(
            before <= tag && tag <= after,
            "{before} <= {tag} <= {after}"
        );
    }
}

fn entry(name: &str, size: u64, date: u64, clock_ns: u64, icount: Option<u64>) -> SnapshotEntry {
    SnapshotEntry {
        id: "7".into(),
        name: name.into(),
        vm_state_size: size,
        date_sec: date,
        date_nsec: 123,
        vm_clock_nsec: clock_ns,
        icount,
    }
}

// Expected `info snapshots` output, from QEMU 10.0's hmp_info_snapshots()
// (block/monitor/block-hmp-cmds.c) and bdrv_snapshot_dump() (block/qapi.c):
// "List of snapshots present on all disks:", then header and rows printed
// with "%-7s %-16s %8s %19s %15s %10s" (header: ID TAG VM_SIZE DATE
// VM_CLOCK ICOUNT, identical to tests/qemu-iotests/267.out), the id forced
// to "--", size_to_str() sizes ("%0.3g %sB", IEC prefixes), local date
// "%Y-%m-%d %H:%M:%S", VM clock "%04d:%02d:%02d.%03d", icount or "--".
// HMP turns every "\n" into "\r\n".
const HEADER: &str =
    "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\r\n";

#[test]
fn info_snapshots_layout() {
    utc();
    let mock = JobMock::new();
    let (server, _dir) = unix_server_for(mock.clone());
    let mut c = Client::connect(&server).negotiate();

    assert_eq!(
        hmp(&mut c, "info snapshots"),
        "There is no snapshot available.\r\n"
    );

    *mock.snapshots.lock().unwrap() = vec![entry(
        "snap0",
        31_768_576,
        1_795_637_730,
        12_345_678_901,
        None,
    )];
    assert_eq!(
        hmp(&mut c, "info snapshots"),
        format!(
            "List of snapshots present on all disks:\r\n{HEADER}\
             --      snap0            30.3 MiB 2026-11-25 20:15:30  0000:00:12.345         --\r\n"
        )
    );

    *mock.snapshots.lock().unwrap() = vec![
        entry("snap0", 31_768_576, 1_795_637_730, 12_345_678_901, None),
        // A tag longer than its column pushes the rest of the row right.
        entry("before-upgrade-2026", 0, 0, 0, Some(123_456)),
        entry(
            "vm-20261125201530",
            1 << 30,
            1_795_637_730 + 86_399,
            360_000_500_000_000,
            None,
        ),
        entry("x", 1536, 1_700_000_000, 59_999_000_000, Some(0)),
    ];
    assert_eq!(
        hmp(&mut c, "info snapshots"),
        format!(
            "List of snapshots present on all disks:\r\n{HEADER}\
             --      snap0            30.3 MiB 2026-11-25 20:15:30  0000:00:12.345         --\r\n\
             --      before-upgrade-2026      0 B 1970-01-01 00:00:00  0000:00:00.000     123456\r\n\
             --      vm-20261125201530    1 GiB 2026-11-26 20:15:29  0100:00:00.500         --\r\n\
             --      x                 1.5 KiB 2023-11-14 22:13:20  0000:00:59.999          0\r\n"
        )
    );

    // tests/qemu-iotests/267.out: no snapshot-capable disk at all.
    mock.fail_with(Some("no block device can store vmstate for snapshot"));
    assert_eq!(
        hmp(&mut c, "info snapshots"),
        "Error: no block device can store vmstate for snapshot\r\n"
    );
}

#[test]
fn defaults_and_help() {
    utc();
    let mock = Mock::new();
    let (server, _dir) = unix_server(mock.clone());
    let mut c = Client::connect(&server).negotiate();
    for (line, cmd) in [
        ("savevm", "savevm"),
        ("savevm t", "savevm"),
        ("loadvm t", "loadvm"),
        ("delvm t", "delvm"),
        ("info snapshots", "info snapshots"),
    ] {
        assert_eq!(
            hmp(&mut c, line),
            format!("Error: {cmd} is not supported by this machine\r\n")
        );
    }
    // Help strings from hmp-commands.hx / hmp-commands-info.hx.
    assert_eq!(
        hmp(&mut c, "help savevm"),
        "savevm tag -- save a VM snapshot. If no tag is provided, a new snapshot is created\r\n"
    );
    assert_eq!(
        hmp(&mut c, "help loadvm"),
        "loadvm tag -- restore a VM snapshot from its tag\r\n"
    );
    assert_eq!(
        hmp(&mut c, "help delvm"),
        "delvm tag -- delete a VM snapshot from its tag\r\n"
    );
    let help = hmp(&mut c, "help");
    let names: Vec<&str> = help.lines().map(|l| l.split(' ').next().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "help is sorted like QEMU's");
    for n in ["savevm", "loadvm", "delvm"] {
        assert!(names.contains(&n), "{n} not in {help:?}");
    }
    assert!(hmp(&mut c, "help info")
        .contains("info snapshots  -- show the currently saved VM snapshots\r\n"));
}
