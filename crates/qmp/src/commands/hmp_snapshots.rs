//! HMP `savevm`, `loadvm`, `delvm` and `info snapshots`, printed like
//! QEMU 10.0.
//!
//! `info snapshots` follows `hmp_info_snapshots()`
//! (block/monitor/block-hmp-cmds.c) and `bdrv_snapshot_dump()`
//! (block/qapi.c):
//!
//! ```text
//! List of snapshots present on all disks:
//! ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT
//! --      snap0             30.3 MiB 2026-11-25 20:15:30  0000:00:12.345         --
//! ```
//!
//! Header and rows are `"%-7s %-16s %8s %19s %15s %10s"`; the id of a
//! snapshot present on all disks is always `--` (ids may differ between
//! images); the size is `size_to_str()` (`"%0.3g %sB"` with IEC
//! prefixes); the date is local time, `%Y-%m-%d %H:%M:%S`; the VM clock
//! is `%04d:%02d:%02d.%03d`; a missing icount prints `--`. With no
//! snapshot QEMU prints `There is no snapshot available.`.

use crate::error::CommandError;
use crate::machine::{Machine, Request, SnapshotEntry};

/// C's `isspace()` in the "C" locale, as QEMU's HMP parser uses it.
pub(crate) fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// QEMU's `get_str()`: one word, or a double-quoted string with the
/// escapes `\n`, `\r`, `\\`, `\'` and `\"`. Returns the string and the
/// rest of the line, or `None` (QEMU then prints "string expected").
pub(crate) fn get_str(line: &str) -> Option<(String, &str)> {
    let p = line.trim_start_matches(is_space);
    let mut chars = p.char_indices();
    match chars.next() {
        None => None,
        Some((_, '"')) => {
            let mut out = String::new();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => return Some((out, &p[i + 1..])),
                    '\\' => match chars.next()?.1 {
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        c @ ('\\' | '\'' | '"') => out.push(c),
                        _ => return None,
                    },
                    c => out.push(c),
                }
            }
            None
        }
        Some(_) => {
            let end = p.find(is_space).unwrap_or(p.len());
            Some((p[..end].to_string(), &p[end..]))
        }
    }
}

extern "C" {
    /// POSIX `tzset()` (not exported by the libc crate).
    fn tzset();
}

/// Broken-down local time: (year, month 1-12, day, hour, minute, second).
pub(crate) fn localtime(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain old data, fully written by localtime_r.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: tzset() only (re)reads TZ; localtime_r is the thread-safe
    // variant, given valid pointers to a time_t and a tm we own.
    let ok = unsafe {
        tzset();
        !libc::localtime_r(&t, &mut tm).is_null()
    };
    if !ok {
        return (1970, 1, 1, 0, 0, 0);
    }
    (
        i64::from(tm.tm_year) + 1900,
        (tm.tm_mon + 1) as u32,
        tm.tm_mday as u32,
        tm.tm_hour as u32,
        tm.tm_min as u32,
        tm.tm_sec as u32,
    )
}

/// The tag QEMU's `save_snapshot()` makes up for a bare `savevm`:
/// `vm-%Y%m%d%H%M%S` in local time.
pub(crate) fn default_tag(now_secs: i64) -> String {
    let (y, mo, d, h, mi, s) = localtime(now_secs);
    format!("vm-{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}")
}

/// C's `printf("%.3g", v)` for finite, non-negative `v`.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    // Round to 3 significant digits first: the exponent decides the style.
    let sci = format!("{v:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", strip(mantissa), exp.abs());
    }
    strip(&format!("{v:.*}", (2 - exp) as usize))
}

/// QEMU's `size_to_str()`: e.g. `0 B`, `512 B`, `1 KiB`, `30.3 MiB`.
pub(crate) fn size_to_str(val: u64) -> String {
    const PREFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000.0 / 1024.0)) exponent: the switch to the next
    // unit happens once the integer part would reach 1000.
    let x = val as f64 / (1000.0 / 1024.0);
    let frexp_exp = if x == 0.0 {
        0
    } else {
        // x >= 1.024 is a normal double: frexp's exponent is the biased
        // exponent minus 1022.
        ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022
    };
    // C integer division truncates toward zero: (0 - 1) / 10 == 0.
    let i = ((frexp_exp - 1) / 10).clamp(0, 6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), PREFIXES[i])
}

/// `bdrv_snapshot_dump()`: the header (`None`) or one row, without newline.
pub(crate) fn snapshot_dump(sn: Option<&SnapshotEntry>) -> String {
    let Some(sn) = sn else {
        return format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
    };
    let (y, mo, d, h, mi, s) = localtime(sn.date_sec as i64);
    let date = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}");
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        (secs / 3600) as i32,
        ((secs / 60) % 60) as i32,
        (secs % 60) as i32,
        ((sn.vm_clock_nsec / 1_000_000) % 1000) as i32
    );
    let icount = sn
        .icount
        .map_or_else(|| "--".to_string(), |i| i.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.id,
        sn.name,
        size_to_str(sn.vm_state_size),
        date,
        clock,
        icount
    )
}

/// `info snapshots`.
pub(crate) fn info_snapshots(machine: &dyn Machine) -> Result<String, CommandError> {
    let v = machine.request(Request::ListSnapshots)?;
    let list: Vec<SnapshotEntry> =
        serde_json::from_value(v).map_err(|e| CommandError::generic(e.to_string()))?;
    if list.is_empty() {
        return Ok("There is no snapshot available.\r\n".to_string());
    }
    let mut out = String::from("List of snapshots present on all disks:\r\n");
    out.push_str(&snapshot_dump(None));
    out.push_str("\r\n");
    for sn in list {
        // QEMU overwrites the id: it is not guaranteed to be the same on all images.
        let sn = SnapshotEntry {
            id: "--".to_string(),
            ..sn
        };
        out.push_str(&snapshot_dump(Some(&sn)));
        out.push_str("\r\n");
    }
    Ok(out)
}

/// `savevm [tag]`: a bare `savevm` uses [`default_tag`] for now.
pub(crate) fn savevm(machine: &dyn Machine, tag: Option<&str>) -> Result<(), CommandError> {
    match tag {
        Some(t) => machine.request(Request::SaveVm(t.to_string())).map(drop),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            machine.request(Request::SaveVm(default_tag(now))).map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_size_to_str() {
        // Expected values: C's printf("%0.3g %sB") as util/cutils.c does.
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1), "1 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(31_768_576), "30.3 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1_023_999), "1e+03 KiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }

    #[test]
    fn g3_formatting() {
        assert_eq!(fmt_g3(0.5), "0.5");
        assert_eq!(fmt_g3(0.0001234), "0.000123");
        assert_eq!(fmt_g3(0.00001234), "1.23e-05");
        assert_eq!(fmt_g3(12.345), "12.3");
        assert_eq!(fmt_g3(100.0), "100");
    }

    #[test]
    fn hmp_strings() {
        assert_eq!(get_str("  a b"), Some(("a".to_string(), " b")));
        assert_eq!(
            get_str(r#" "x y\"z" rest"#),
            Some(("x y\"z".to_string(), " rest"))
        );
        assert_eq!(get_str("   "), None);
        assert_eq!(get_str(r#""open"#), None);
        assert_eq!(get_str(r#""bad\q""#), None);
    }
}
