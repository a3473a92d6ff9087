//! A snapvmm process running a Linux guest: its console lines are kept (for the
//! report when a scenario fails) and can be waited for.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Everything every VM of a scenario printed, in order, tagged with the VM's name.
#[derive(Clone, Default)]
pub struct Console(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Console {
    /// The lines; a panic elsewhere (a failed wait) does not make them unreadable.
    fn lines(&self) -> MutexGuard<'_, Vec<String>> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: String) {
        self.lines().push(line);
        self.0 .1.notify_all();
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    fn len(&self) -> usize {
        self.lines().len()
    }
}

pub struct Vm {
    pub name: String,
    pub child: Child,
    stdin: Option<ChildStdin>,
    console: Console,
    /// Index in the console of the first line of this VM not yet consumed by `wait`.
    cursor: usize,
    pub qmp_path: PathBuf,
}

pub fn bin() -> PathBuf {
    crate::common::bin()
}

impl Vm {
    /// Starts `snapvmm run ARGS --qmp unix:DIR/NAME.sock`.
    pub fn start(name: &str, dir: &Path, console: &Console, args: &[&str]) -> Vm {
        Vm::start_bin(&bin(), name, dir, console, args)
    }

    /// As [`Vm::start`], with the snapvmm build at `snapvmm`.
    pub fn start_bin(
        snapvmm: &Path,
        name: &str,
        dir: &Path,
        console: &Console,
        args: &[&str],
    ) -> Vm {
        let qmp_path = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(snapvmm);
        cmd.arg("run")
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", qmp_path.display()));
        Vm::spawn(name, cmd, qmp_path, console)
    }

    /// Starts `cmd` (snapvmm, or QEMU for a side-by-side figure) with its
    /// console on stdin/stdout.
    pub fn spawn(name: &str, mut cmd: Command, qmp_path: PathBuf, console: &Console) -> Vm {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let stdin = child.stdin.take();
        for (stream, tag) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                "",
            ),
            (Box::new(child.stderr.take().unwrap()), "stderr: "),
        ] {
            let c = console.clone();
            let prefix = format!("[{name}] {tag}");
            std::thread::spawn(move || {
                for l in BufReader::new(stream).lines() {
                    let Ok(l) = l else { break };
                    c.push(format!("{prefix}{}", l.trim_end_matches('\r')));
                }
            });
        }
        Vm {
            name: name.into(),
            child,
            stdin,
            cursor: console.len(),
            console: console.clone(),
            qmp_path,
        }
    }

    /// Waits for a console line of this VM (after the last one waited for) that
    /// contains `needle`; returns it without the VM tag.
    pub fn wait(&mut self, needle: &str, limit: Duration) -> String {
        self.wait_any(&[needle], limit)
    }

    pub fn wait_any(&mut self, needles: &[&str], limit: Duration) -> String {
        self.poll(needles, limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Vm::wait_any`], but says why it found nothing instead of panicking.
    pub fn poll(&mut self, needles: &[&str], limit: Duration) -> Result<String, String> {
        let end = Instant::now() + limit;
        let tag = format!("[{}] ", self.name);
        let mut exited = None;
        loop {
            {
                let lines = self.console.lines();
                while self.cursor < lines.len() {
                    let l = &lines[self.cursor];
                    self.cursor += 1;
                    if let Some(own) = l.strip_prefix(&tag) {
                        if needles.iter().any(|n| own.contains(n)) {
                            return Ok(own.to_string());
                        }
                    }
                }
                let left = end.saturating_duration_since(Instant::now());
                if exited.is_none() && !left.is_zero() {
                    let _ = self
                        .console
                        .0
                         .1
                        .wait_timeout(lines, left.min(Duration::from_millis(200)));
                }
            }
            if let Some(st) = exited {
                return Err(format!(
                    "{} exited ({st}) before printing {needles:?}",
                    self.name
                ));
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Output may still be on its way: read once more, then give up.
                std::thread::sleep(Duration::from_millis(300));
                exited = Some(st);
                continue;
            }
            if Instant::now() >= end {
                return Err(format!(
                    "{}: no line with {needles:?} within {limit:?}",
                    self.name
                ));
            }
        }
    }

    /// Types `text` on the serial console.
    pub fn type_line(&mut self, text: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(format!("{text}\n").as_bytes()).unwrap();
        s.flush().unwrap();
    }

    /// Waits for the process to end; returns its exit code.
    pub fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    /// Kills the process and reaps it, but never waits for it more than
    /// 10 s: a process that does not die (stuck in the kernel) must not
    /// block the scenarios after this one.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{}: the process did not die within 10 s of SIGKILL; left behind",
            self.name
        );
    }
}
