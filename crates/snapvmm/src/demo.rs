//! `snapvmm demo`: the whole live-snapshot story on the built-in guest, driven
//! over QMP exactly as a user would drive it.
//!
//! 1. boot the reference guest writing memory at full speed (memwrite);
//! 2. take a live snapshot (`background-snapshot` + `migrate file:`) while it writes;
//! 3. restore the image in a second VM (`run --incoming`);
//! 4. check the restored guest resumed where it was and found no corruption, and
//!    print the pause, the pause the guest felt, the throughput and the restore time.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::qmp_client::QmpClient;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// vCPUs (each writes its own slice of the region).
    #[arg(long, default_value = "2")]
    pub cpus: u8,
    /// Directory for the image and sockets (default: a new directory under $TMPDIR, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the image and sockets afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// One `refguest: cpu=I t=S pages=N maxgap_us=G gap_ago_us=A stalls=… passes=P` line.
#[derive(Debug, Clone, Copy)]
struct Report {
    at: Instant,
    cpu: u32,
    pages: u64,
    maxgap_us: u64,
    passes: u64,
}

fn parse_report(line: &str, at: Instant) -> Option<Report> {
    let rest = line.strip_prefix("refguest: cpu=")?;
    let field = |key: &str| -> Option<u64> {
        let i = rest.find(key)? + key.len();
        rest[i..].split_whitespace().next()?.parse().ok()
    };
    Some(Report {
        at,
        cpu: rest.split_whitespace().next()?.parse().ok()?,
        pages: field("pages=")?,
        maxgap_us: field("maxgap_us=")?,
        passes: field("passes=")?,
    })
}

/// A child `snapvmm run` whose guest output lines arrive time-stamped.
struct Vm {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    reports: Vec<Report>,
    corrupt: Vec<String>,
    qmp: Option<QmpClient>,
}

impl Vm {
    fn spawn(name: &'static str, args: &[String]) -> Result<Vm> {
        let exe = std::env::current_exe().context("cannot find the snapvmm executable")?;
        let mut child = Command::new(exe)
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start snapvmm run")?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        Ok(Vm {
            name,
            child,
            lines,
            reports: Vec::new(),
            corrupt: Vec::new(),
            qmp: None,
        })
    }

    /// Collects guest lines until `until` returns true or `limit` passes.
    fn pump(&mut self, limit: Duration, mut until: impl FnMut(&Vm) -> bool) -> Result<()> {
        let end = Instant::now() + limit;
        while !until(self) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.lines.recv_timeout(left) {
                Ok((at, l)) => self.take_line(at, &l),
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!("the {} VM ended unexpectedly ({status})", self.name)
                }
            }
        }
        Ok(())
    }

    fn take_line(&mut self, at: Instant, l: &str) {
        if let Some(r) = parse_report(l, at) {
            self.reports.push(r);
        } else if l.contains("CORRUPT") {
            self.corrupt.push(l.to_string());
        } else if l.starts_with("refguest: ready") {
            println!("  {:>8} | {l}", self.name);
        }
    }

    fn reports_after(&self, t: Instant) -> impl Iterator<Item = &Report> {
        self.reports.iter().filter(move |r| r.at > t)
    }

    fn qmp(&mut self) -> Result<&mut QmpClient> {
        self.qmp.as_mut().context("not connected")
    }

    fn quit(mut self) -> Result<()> {
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.execute("quit", json!({}));
        }
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("the {} VM exited with {st}", self.name);
                }
                return Ok(());
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                bail!("the {} VM did not quit", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn run(args: DemoArgs) -> Result<u8> {
    let mem = crate::cli::parse_mem(&args.mem)?;
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("snapvmm-demo-{}", std::process::id())),
            !args.keep,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = story(&args, mem, &dir);
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("files kept in {}", dir.display());
    }
    result
}

fn story(args: &DemoArgs, mem: u64, dir: &Path) -> Result<u8> {
    let cpus = args.cpus.max(1);
    let region_mib = (mem >> 20) * 3 / 4;
    let image = dir.join("vm.snap");
    let _ = std::fs::remove_file(&image);
    let src_sock = dir.join("source.qmp");
    println!(
        "1. booting the reference guest: {} MiB RAM, {cpus} vCPU(s), writing {region_mib} MiB at full speed",
        mem >> 20
    );
    let mut src = Vm::spawn(
        "source",
        &[
            format!("--mem={}M", mem >> 20),
            format!("--cpus={cpus}"),
            format!("--qmp=unix:{}", src_sock.display()),
            format!("--cmdline=workload=memwrite region={region_mib}M"),
            "--name=demo-source".into(),
        ],
    )?;
    src.qmp = Some(QmpClient::connect(&src_sock, Duration::from_secs(10))?);
    // Warm up: every page touched once, then a few steady seconds.
    let want = cpus as usize * 3;
    src.pump(Duration::from_secs(30), |v| v.reports.len() >= want)?;
    if src.reports.len() < want {
        bail!("the guest did not start writing memory");
    }
    let rate: u64 = src.reports[src.reports.len() - cpus as usize..]
        .iter()
        .map(|r| r.pages)
        .sum();
    let before_gap = src.reports.iter().map(|r| r.maxgap_us).max().unwrap_or(0);
    println!(
        "   the guest writes {:.1} million pages/s; its longest stall so far: {before_gap} us",
        rate as f64 / 1e6
    );

    println!(
        "2. live snapshot to {} (QMP: background-snapshot + migrate)",
        image.display()
    );
    let q = src.qmp()?;
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "background-snapshot", "state": true},
            {"capability": "events", "state": true}]}),
    )?;
    let t_snap = Instant::now();
    q.execute(
        "migrate",
        json!({"uri": format!("file:{}", image.display())}),
    )?;
    let running = q.execute("query-status", json!({}))?;
    let done = q.wait_migration(Duration::from_secs(120))?;
    if done["status"] != "completed" {
        bail!(
            "the snapshot did not complete: {}",
            done["error-desc"].as_str().unwrap_or("unknown error")
        );
    }
    // Keep the source running a little: it must not notice more than the pause.
    src.pump(Duration::from_secs(2), |_| false)?;
    let felt = src
        .reports_after(t_snap)
        .take(cpus as usize)
        .map(|r| r.maxgap_us)
        .max()
        .unwrap_or(0);
    let pause_us = done["x-downtime-us"].as_u64().unwrap_or(0);
    let total_ms = done["total-time"].as_u64().unwrap_or(0);
    let bytes = done["ram"]["transferred"].as_u64().unwrap_or(0);
    let meta = std::fs::metadata(&image)?;
    println!(
        "   status {} right after `migrate` (the guest never stopped); completed in {total_ms} ms",
        running["status"]
    );
    let method = done["x-snapshot-method"].as_str().unwrap_or("?");
    let start = if method == "uffd" {
        "write-protecting the chunks written since it was protected ahead"
    } else {
        "fork"
    };
    println!(
        "   capture method {method} (the default: {})",
        if method == "uffd" {
            "RAM write-protected through a userfaultfd, copied 2 MiB at a time"
        } else {
            "a copy-on-write child process streams RAM"
        }
    );
    println!(
        "   pause measured by the VMM: {pause_us} us (pausing the vCPUs {} us, saving their state {} us, {start} {} us)",
        done["x-vcpu-pause-us"], done["x-state-save-us"], done["x-fork-us"]
    );
    println!("   longest stall the guest itself felt around the snapshot: {felt} us");
    let w = &done["x-write-protect"]["fault-waits"];
    if w.is_object() {
        println!(
            "   the guest's writes that faulted during the copy: {} held for {} us median, {} us p99, {} us at most ({} waited for a copy buffer)",
            w["all"]["count"], w["all"]["p50-us"], w["all"]["p99-us"], w["all"]["max-us"], w["buffer"]["count"]
        );
    }
    println!(
        "   {} MiB of RAM written at {:.0} MB/s; image {} MiB on disk ({} MiB of {} MiB RAM were zero: holes)",
        bytes >> 20,
        bytes as f64 / 1e6 / (total_ms.max(1) as f64 / 1e3),
        (meta.blocks() * 512) >> 20,
        (done["ram"]["duplicate"].as_u64().unwrap_or(0)
            * done["ram"]["page-size"].as_u64().unwrap_or(4096))
            >> 20,
        mem >> 20
    );
    let before: Vec<Report> = (0..cpus as u32)
        .filter_map(|c| {
            src.reports
                .iter()
                .rfind(|r| r.cpu == c && r.at <= t_snap)
                .copied()
        })
        .collect();
    let after: Vec<Report> = (0..cpus as u32)
        .filter_map(|c| src.reports_after(t_snap).find(|r| r.cpu == c).copied())
        .collect();
    let src_last_passes = src.reports.last().map(|r| r.passes).unwrap_or(0);
    src.quit()?;
    println!("   the source VM kept running (to pass {src_last_passes}), then quit");

    println!(
        "3. restoring the image in a new VM (run --incoming: RAM filled while the guest runs)"
    );
    let dst_sock = dir.join("restored.qmp");
    let t_spawn = Instant::now();
    let mut dst = Vm::spawn(
        "restored",
        &[
            format!("--incoming=file:{}", image.display()),
            format!("--qmp=unix:{}", dst_sock.display()),
            "--name=demo-restored".into(),
        ],
    )?;
    dst.qmp = Some(QmpClient::connect(&dst_sock, Duration::from_secs(10))?);
    let restore_time = loop {
        let st = dst.qmp()?.execute("query-status", json!({}))?;
        if st["status"] == "running" {
            break t_spawn.elapsed();
        }
        if t_spawn.elapsed() > Duration::from_secs(30) {
            bail!("the restored VM is not running: {st}");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    println!(
        "   running {:.1} ms after the process started",
        restore_time.as_secs_f64() * 1e3
    );
    dst.pump(Duration::from_secs(3), |_| false)?;
    let dst_reports: Vec<Report> = dst.reports.clone();
    let corrupt = dst.corrupt.clone();
    let first: Vec<Report> = (0..cpus as u32)
        .filter_map(|c| dst_reports.iter().find(|r| r.cpu == c).copied())
        .collect();
    let last_passes = dst_reports.last().map(|r| r.passes).unwrap_or(0);
    dst.quit()?;

    println!("4. did the guest resume exactly where it was?");
    let mut ok = true;
    for c in 0..cpus as u32 {
        let (b, a, f) = (
            before.iter().find(|r| r.cpu == c),
            after.iter().find(|r| r.cpu == c),
            first.iter().find(|r| r.cpu == c),
        );
        match (b, a, f) {
            (Some(b), Some(a), Some(f)) => {
                let within = b.passes <= f.passes && f.passes <= a.passes;
                ok &= within;
                println!(
                    "   cpu {c}: the source had done {}..{} passes around the snapshot; the restored guest continued from pass {} {}",
                    b.passes,
                    a.passes,
                    f.passes,
                    if within { "(yes)" } else { "(NO: not the snapshot instant)" }
                );
            }
            _ => {
                ok = false;
                println!("   cpu {c}: no report from the guest");
            }
        }
    }
    if !corrupt.is_empty() {
        for l in &corrupt {
            println!("   {l}");
        }
    }
    println!(
        "   the restored guest verified every page of its region on each pass up to pass {last_passes}: {} corrupt page(s)",
        corrupt.len()
    );
    println!();
    println!(
        "summary: pause {pause_us} us (guest felt {felt} us), snapshot {total_ms} ms for {} MiB, restore {:.1} ms, corruption: {}",
        mem >> 20,
        restore_time.as_secs_f64() * 1e3,
        if corrupt.is_empty() { "none" } else { "FOUND" }
    );
    if !corrupt.is_empty() {
        return Ok(2);
    }
    Ok(if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reports() {
        let now = Instant::now();
        let r = parse_report(
            "refguest: cpu=1 t=3.004 pages=1234567 maxgap_us=88 passes=42",
            now,
        )
        .unwrap();
        assert_eq!(
            (r.cpu, r.pages, r.maxgap_us, r.passes),
            (1, 1234567, 88, 42)
        );
        assert!(parse_report("refguest: ready cpus=2", now).is_none());
        assert!(parse_report("refguest: cpu=x t=1 pages=1 maxgap_us=1 passes=1", now).is_none());
    }
}
