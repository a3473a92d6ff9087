//! Linux guests (Debian's stock kernel, its own drivers) under snapvmm: see
//! `tests/linux_guests.rs` for what runs and `docs/LINUX.md` for how to run it by hand.

pub mod host_check;
pub mod inputs;
pub mod network;
pub mod outer;
pub mod scenarios;
pub mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The scenarios' results, wherever they ran.
#[derive(Default)]
pub struct Report {
    pub results: BTreeMap<String, Result<(), String>>,
    /// Console output of failed scenarios.
    pub logs: BTreeMap<String, String>,
    /// Disk images for the host-side checks (`None`: checked where they ran).
    pub export: Option<PathBuf>,
    /// What to show when a scenario has no result at all (the end of the console).
    pub missing_hint: String,
    /// Benchmark figures that came back on the TCG VM's console (`LINUX-FIGURE
    /// <scenario> <text>` lines, [`scenarios::figure`]), without the prefix.
    pub figures: Vec<String>,
}

/// Longest the TCG VMs of one lane together may take (CI must finish within
/// 30 minutes; the lanes run side by side).
const TCG_BUDGET: std::time::Duration = std::time::Duration::from_secs(20 * 60);
/// Most TCG VMs one test run boots.
const TCG_ATTEMPTS: usize = 4;

/// Every scenario, in the order they run.
pub fn all() -> Vec<&'static str> {
    scenarios::ALL.iter().chain(network::ALL).copied().collect()
}

/// True where `/dev/kvm` can run Linux: the CPU has hardware virtualization.
pub fn kvm_runs_linux() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && Path::new("/dev/kvm").exists()
}

/// Runs every scenario here, against this machine's /dev/kvm.
fn run_here(kernel: PathBuf, initrd: PathBuf) -> Report {
    let deferred = std::env::var_os("SNAPVMM_LINUX_EXPORT").map(PathBuf::from);
    let scratch = std::env::temp_dir().join(format!("snapvmm-linux-{}", std::process::id()));
    let export = deferred.clone().unwrap_or_else(|| scratch.join("export"));
    let mut report = Report::default();
    for name in selected() {
        let dir = scratch.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ctx = scenarios::Ctx {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            dir: dir.clone(),
            export: export.clone(),
            console: vm::Console::default(),
        };
        let t0 = std::time::Instant::now();
        let mut r = if network::ALL.contains(&name) {
            network::run(name, &ctx)
        } else {
            scenarios::run(name, &ctx)
        };
        if r.is_ok() && deferred.is_none() && host_check::applies(name) {
            r = host_check::run(name, &export);
        }
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "{} ({:.1} s)",
            scenarios::report_line(name, &r),
            t0.elapsed().as_secs_f64()
        );
        if r.is_err() {
            let text = ctx.console.text();
            for l in text.lines() {
                println!("LINUX-CONSOLE {name} {l}");
            }
            report.logs.insert(name.to_string(), text);
        }
        report.results.insert(name.to_string(), r);
    }
    report
}

/// `SNAPVMM_LINUX_SCENARIOS=a,b` runs only those (while working on one); the
/// tests of the others then fail as "reported nothing".
pub fn selected() -> Vec<&'static str> {
    let only = std::env::var("SNAPVMM_LINUX_SCENARIOS").unwrap_or_default();
    all()
        .iter()
        .copied()
        .filter(|n| {
            if only.is_empty() {
                !scenarios::BY_NAME_ONLY.contains(n)
            } else {
                only.split(',').any(|o| o == *n)
            }
        })
        .collect()
}

/// Checks `scenario` if it was selected; one run only by name
/// ([`scenarios::BY_NAME_ONLY`]) says how to run it otherwise.
pub fn check_if_selected(scenario: &str) {
    if selected().contains(&scenario) {
        for f in &report().figures {
            if let Some(text) = f.strip_prefix(scenario).and_then(|t| t.strip_prefix(' ')) {
                println!("{scenario}: {text}");
            }
        }
        check(scenario);
    } else {
        eprintln!("not run: {scenario} runs only when named (SNAPVMM_LINUX_SCENARIOS={scenario})");
    }
}

/// Every scenario failed for `why`.
fn failed(why: String) -> Report {
    Report {
        results: all()
            .iter()
            .map(|n| (n.to_string(), Err(why.clone())))
            .collect(),
        ..Report::default()
    }
}

impl Report {
    /// Takes in the results, logs and figures of another run (its images stay
    /// where they are).
    fn merge(&mut self, other: Report) {
        self.results.extend(other.results);
        self.logs.extend(other.logs);
        self.figures.extend(other.figures);
        if !other.missing_hint.is_empty() {
            self.missing_hint = other.missing_hint;
        }
    }
}

fn run_all() -> Report {
    // Inside the TCG VM: the host prepared everything.
    if let Some(dir) = std::env::var_os("SNAPVMM_LINUX_INPUTS").map(PathBuf::from) {
        return run_here(dir.join("vmlinuz"), dir.join("guest-initrd.cpio"));
    }
    let inputs = match inputs::prepare() {
        Ok(i) => i,
        Err(e) => return failed(format!("preparing the Linux guest failed: {e}")),
    };
    if kvm_runs_linux() {
        return run_here(inputs.kernel, inputs.initrd);
    }
    let dir = inputs::cache_dir().join(format!("run-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let lanes = lanes(&selected());
    // Each lane in its own TCG VM, side by side: one TCG VM keeps one host
    // CPU busy, and the test process waits.
    let reports: Vec<Report> = std::thread::scope(|s| {
        let running: Vec<_> = lanes
            .iter()
            .enumerate()
            .map(|(i, lane)| {
                let (inputs, dir) = (&inputs, dir.join(format!("lane-{i}")));
                s.spawn(move || run_lane(inputs, &dir, lane))
            })
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| failed("a TCG VM's runner panicked".into()))
            })
            .collect()
    });
    let mut report = Report::default();
    for r in reports {
        report.merge(r);
    }
    if report.results.values().all(Result::is_ok) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    report
}

/// How the scenarios split between TCG VMs running side by side: two lanes of
/// about equal length (longest scenario first into the shorter lane), or one
/// when a benchmark is among them (its figures need the host to itself) or
/// `SNAPVMM_LINUX_LANES=1`.
fn lanes(wanted: &[&'static str]) -> Vec<Vec<&'static str>> {
    let one = std::env::var("SNAPVMM_LINUX_LANES").as_deref() == Ok("1")
        || wanted.iter().any(|n| scenarios::needs_qemu(n))
        || wanted.len() < 2;
    if one {
        return vec![wanted.to_vec()];
    }
    let mut by_cost = wanted.to_vec();
    by_cost.sort_by_key(|n| std::cmp::Reverse(scenarios::cost(n)));
    let mut lanes: [(u32, Vec<&'static str>); 2] = Default::default();
    for n in by_cost {
        let lane = if lanes[0].0 <= lanes[1].0 { 0 } else { 1 };
        lanes[lane].0 += scenarios::cost(n);
        lanes[lane].1.push(n);
    }
    // Each lane runs its scenarios in the usual order.
    lanes
        .into_iter()
        .map(|(_, l)| wanted.iter().copied().filter(|n| l.contains(n)).collect())
        .collect()
}

/// Runs `wanted` in a TCG VM under `dir`, within [`TCG_BUDGET`]; the
/// scenarios a VM did not finish run again in a fresh one; then the
/// host-side checks of their images.
fn run_lane(inputs: &inputs::Inputs, dir: &Path, wanted: &[&str]) -> Report {
    let _ = std::fs::create_dir_all(dir);
    let t0 = std::time::Instant::now();
    let mut report = match outer::run(inputs, dir, wanted, TCG_BUDGET) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    // The emulator itself can stop (a TCG VM that hangs reports nothing more):
    // the scenarios it did not finish run again in a fresh one, as long as the
    // last one got somewhere and time is left. A scenario that ran and failed
    // is never run again.
    for attempt in 2..=TCG_ATTEMPTS {
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|n| !report.results.contains_key(*n))
            .collect();
        let left = TCG_BUDGET.saturating_sub(t0.elapsed());
        if missing.is_empty() || left < std::time::Duration::from_secs(120) {
            break;
        }
        eprintln!("the TCG VM reported nothing for {missing:?}; running them in a fresh one");
        let again = dir.join(format!("attempt-{attempt}"));
        let _ = std::fs::create_dir_all(&again);
        let Ok(next) = outer::run(inputs, &again, &missing, left) else {
            break;
        };
        let progressed = missing.iter().any(|n| next.results.contains_key(*n));
        let next_export = next.export.clone();
        report.merge(next);
        // Each scenario's images sit in its own folder: bring the new ones over.
        if let (Some(to), Some(from)) = (&report.export, &next_export) {
            for n in &missing {
                if from.join(n).exists() {
                    let _ = std::fs::remove_dir_all(to.join(n));
                    let _ = std::fs::rename(from.join(n), to.join(n));
                }
            }
        }
        if !progressed {
            break;
        }
    }
    if let Some(export) = report.export.clone() {
        for (name, r) in report.results.iter_mut() {
            if r.is_ok() && host_check::applies(name) {
                *r = host_check::run(name, &export);
            }
        }
    }
    let complete = wanted.iter().all(|n| report.results.contains_key(*n));
    if !(complete && report.results.values().all(Result::is_ok)) {
        eprintln!(
            "kept for inspection: {} (the TCG VM's console and the exported images)",
            dir.display()
        );
    }
    report
}

/// Runs the scenarios once per test process; every test reads its own result.
pub fn report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(run_all)
}

/// Fails the calling test unless `scenario` passed, with the guest's console.
pub fn check(scenario: &str) {
    let r = report();
    match r.results.get(scenario) {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!(
            "Linux scenario {scenario} failed: {e}\n--- console ---\n{}",
            r.logs.get(scenario).map(String::as_str).unwrap_or("(none)")
        ),
        None => panic!(
            "Linux scenario {scenario} reported nothing; the end of the TCG VM's console:\n{}",
            r.missing_hint
        ),
    }
}
