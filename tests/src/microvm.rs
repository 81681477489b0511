//! A micro-VM for what this machine's kernel cannot do: ipvlan and dummy links (and a clean
//! kernel for macvlan and bridge beside them). A stock Debian kernel boots under qemu (TCG:
//! software emulation, no KVM needed) from an initramfs this module writes: busybox for the
//! shell and init, iproute2's `ip`, the workspace's binaries (stripped), Debian's reference CNI
//! plugins, the kernel's own modules, and one scenario script. The guest has no network device
//! (`-nic none`): every packet stays inside it. It prints what it ran between markers on the
//! serial console and powers off; the test then asserts on those outputs (CNI results, `ip -j`
//! listings, exit codes), not on a verdict of the guest.
//!
//! Why an initramfs and not a disk image: nothing to partition, no root needed to build it
//! (the cpio archive is written here, device nodes included), and the guest runs from RAM.
//! The archive is uncompressed: the kernel unpacks it faster than it would gunzip it under
//! emulation.
//!
//! The kernel is found in `$RUST_IPAM_VM_KERNEL_DIR` (default [`DEFAULT_KERNEL_DIR`]): a
//! Debian `linux-image-*` package unpacked with `dpkg-deb -x` (`boot/vmlinuz-*` and
//! `lib/modules/<release>/`), as `.ci/run` does; a `PACKAGE` file there names the package and
//! version for the log. Without qemu, busybox or the kernel the tests print `SKIP` (and fail
//! when `CI` is set), as every other test of a missing tool.
//!
//! The protocol on the console, written by `tests/vm/lib.sh`'s `rec`:
//! ```text
//! @@rec NAME rc=CODE
//! ...stdout...
//! @@stderr NAME
//! ...stderr...
//! @@end NAME
//! ```
//! and `@@vm done rc=CODE` when the scenario has ended.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::netns::CNI_DIR;

/// Where the unpacked kernel package is looked for without `RUST_IPAM_VM_KERNEL_DIR`.
pub const DEFAULT_KERNEL_DIR: &str = "/usr/local/lib/rust-ipam-vm/kernel";
/// The environment variable naming the unpacked kernel package.
pub const KERNEL_DIR_ENV: &str = "RUST_IPAM_VM_KERNEL_DIR";
/// The workspace's binaries in the guest: `/opt/cni/bin` holds the plugins, the others are
/// on `PATH` too (it includes that directory).
pub const WORKSPACE_BINS: &[&str] =
    &["rust-ipam", "rust-ipvlan", "rust-macvlan", "rust-multus", "rust-ipam-server", "rust-ipam-ctl"];
/// Debian's reference plugins copied into the guest, to compare with.
pub const REFERENCE_PLUGINS: &[&str] = &["ipvlan", "macvlan", "bridge", "host-local", "loopback"];
/// Kernel modules loaded at boot, with their parameters (dependencies are found and loaded
/// first). `numdummies=0`: no `dummy0` unless a scenario makes one.
const MODULES: &[(&str, &str)] =
    &[("dummy", "numdummies=0"), ("ipvlan", ""), ("macvlan", ""), ("veth", ""), ("bridge", "")];

const INIT: &str = include_str!("../vm/init");
const LIB: &str = include_str!("../vm/lib.sh");

/// The unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
    pub release: String,
    /// The `PACKAGE` file's line (`linux-image-... 6.1.123-1`), or `unknown package`.
    pub package: String,
}

impl Kernel {
    /// The kernel in `$RUST_IPAM_VM_KERNEL_DIR` or [`DEFAULT_KERNEL_DIR`].
    pub fn find() -> Result<Kernel, String> {
        let dir =
            std::env::var_os(KERNEL_DIR_ENV).map_or_else(|| PathBuf::from(DEFAULT_KERNEL_DIR), PathBuf::from);
        let how = format!(
            "unpack a Debian kernel there (apt-get download linux-image-<release>-cloud-amd64-unsigned; dpkg-deb -x <deb> {}), or set {KERNEL_DIR_ENV}; .ci/run does it",
            dir.display()
        );
        let vmlinuz = std::fs::read_dir(dir.join("boot"))
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
            .ok_or_else(|| format!("no boot/vmlinuz-* in {}: {how}", dir.display()))?;
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_string();
        let modules = dir.join("lib/modules").join(&release);
        if !modules.join("kernel").is_dir() {
            return Err(format!("no {} for {}: {how}", modules.join("kernel").display(), vmlinuz.display()));
        }
        let package = std::fs::read_to_string(dir.join("PACKAGE"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown package".into());
        Ok(Kernel { vmlinuz, modules, release, package })
    }
}

/// The qemu binary.
const QEMU: &str = "qemu-system-x86_64";

/// Why this machine cannot boot the micro-VM, if it cannot.
pub fn missing() -> Option<String> {
    if Command::new(QEMU).arg("--version").output().is_err() {
        return Some(format!("{QEMU} is not installed (apt-get install qemu-system-x86)"));
    }
    if let Err(e) = Kernel::find() {
        return Some(e);
    }
    if busybox().is_none() {
        return Some("busybox is not installed (apt-get install busybox-static)".into());
    }
    for tool in ["ip", "objcopy", "ldd"] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not installed (iproute2, binutils, libc-bin)"));
        }
    }
    for p in REFERENCE_PLUGINS {
        if !Path::new(CNI_DIR).join(p).exists() {
            return Some(format!("{CNI_DIR}/{p} is missing (apt-get install containernetworking-plugins)"));
        }
    }
    None
}

/// True, after [`crate::skip`], when the machine cannot boot the micro-VM.
pub fn skip(test: &str) -> bool {
    let Some(why) = missing() else { return false };
    crate::skip(test, &why);
    true
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// busybox, preferring the static one of busybox-static.
fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| which("busybox"))
}

/// A `newc` cpio archive, written in memory: entries owned by root, parents made first.
#[derive(Debug, Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent);
        }
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            u32::try_from(data.len()).expect("a file under 4 GiB"),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, path: &str) {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100000 | mode, data, (0, 0));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, 0o120777, target.as_bytes(), (0, 0));
    }

    fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020600, &[], (major, minor));
    }

    /// The archive with its trailer. Archives concatenate: the kernel unpacks them in turn.
    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

/// The shared libraries and the loader `ldd` lists for `bin` (none for a static binary).
fn libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// `bin` without symbols or debug info, read back from a scratch file.
fn stripped(bin: &Path, scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let out = scratch.join(bin.file_name().context("binary without a name")?);
    let status =
        Command::new("objcopy").arg("--strip-all").arg(bin).arg(&out).status().context("running objcopy")?;
    if !status.success() {
        bail!("objcopy --strip-all {} failed ({status})", bin.display());
    }
    let data = std::fs::read(&out)?;
    std::fs::remove_file(&out)?;
    Ok(data)
}

/// The `depends=` of a kernel module, from its `.modinfo` strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.split(|b| *b == 0)
        .find(|s| s.starts_with(key))
        .map(|s| {
            String::from_utf8_lossy(&s[key.len()..])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Every `NAME.ko` under the kernel's `modules` tree, by name (`-` and `_` are one to the
/// kernel, as in `depends=`).
fn module_files(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            module_files(&p, out);
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko"))
        {
            out.insert(name.replace('-', "_"), p);
        }
    }
}

/// Adds `name` after its dependencies to `order`.
fn resolve(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    order: &mut Vec<(String, Vec<u8>)>,
    seen: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    let key = name.replace('-', "_");
    if !seen.insert(key.clone()) {
        return Ok(());
    }
    let path = files.get(&key).with_context(|| {
        format!("kernel module {name}.ko is not in the kernel's tree (compressed modules are not supported)")
    })?;
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    for dep in module_depends(&data) {
        resolve(&dep, files, order, seen)?;
    }
    order.push((key, data));
    Ok(())
}

/// The base initramfs (everything but the scenario), built once per test process.
fn base_image() -> anyhow::Result<Arc<Vec<u8>>> {
    static IMAGE: OnceLock<Result<Arc<Vec<u8>>, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_base().map(Arc::new).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_base() -> anyhow::Result<Vec<u8>> {
    let kernel = Kernel::find().map_err(anyhow::Error::msg)?;
    let scratch = tempfile::tempdir()?;
    let mut cpio = Cpio::default();
    for d in
        ["dev", "proc", "sys", "run", "tmp", "etc", "root", "var/lib", "usr/bin", "usr/sbin", "opt/cni/bin"]
    {
        cpio.dir(d);
    }
    // The kernel opens /dev/console before it runs /init, before devtmpfs is mounted.
    cpio.char_dev("dev/console", 5, 1);
    cpio.symlink("var/run", "/run");
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("etc/rust-ipam-vm/lib.sh", 0o644, LIB.as_bytes());
    cpio.file(
        "etc/rust-ipam-vm/kernel",
        0o644,
        format!("{} ({})\n", kernel.release, kernel.package).as_bytes(),
    );
    // /etc/passwd and group: the reference plugins and iproute2 look names up.
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    cpio.file("etc/group", 0o644, b"root:x:0:\n");

    let mut libs = BTreeSet::new();
    let bb = busybox().context("busybox not found")?;
    cpio.file("bin/busybox", 0o755, &std::fs::read(&bb)?);
    libs.extend(libraries(&bb)?);
    let ip = which("ip").context("ip not found")?;
    cpio.file("usr/sbin/ip", 0o755, &std::fs::read(&ip)?);
    libs.extend(libraries(&ip)?);
    for name in WORKSPACE_BINS {
        let bin = crate::workspace_bin(name)?;
        cpio.file(&format!("opt/cni/bin/{name}"), 0o755, &stripped(&bin, scratch.path())?);
        libs.extend(libraries(&bin)?);
    }
    for name in REFERENCE_PLUGINS {
        let bin = Path::new(CNI_DIR).join(name);
        cpio.file(&format!("usr/lib/cni/{name}"), 0o755, &std::fs::read(&bin)?);
        libs.extend(libraries(&bin)?);
    }
    for lib in libs {
        let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
        cpio.file(&lib.display().to_string(), 0o755, &data);
    }

    let mut files = BTreeMap::new();
    module_files(&kernel.modules.join("kernel"), &mut files);
    let (mut order, mut seen) = (Vec::new(), BTreeSet::new());
    for (name, _) in MODULES {
        resolve(name, &files, &mut order, &mut seen)?;
    }
    let mut load = String::new();
    for (i, (name, data)) in order.iter().enumerate() {
        let path = format!("lib/modules/{i:02}-{name}.ko");
        cpio.file(&path, 0o644, data);
        let params = MODULES.iter().find(|(m, _)| m == name).map_or("", |(_, p)| p);
        load.push_str(&format!("/{path} {params}\n"));
    }
    cpio.file("lib/modules/load", 0o644, load.as_bytes());
    Ok(cpio.finish())
}

/// One command the scenario ran (`rec NAME ...`): its exit code and output.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub rc: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A finished boot: the console and the records in it.
#[derive(Debug)]
pub struct Boot {
    /// The whole serial console.
    pub console: String,
    /// By name, in the order the guest ran them.
    pub records: Vec<(String, Record)>,
    /// The scenario's exit code (`@@vm done rc=`); `None` when it never ended.
    pub done: Option<i32>,
    /// From start to the qemu process's exit.
    pub elapsed: Duration,
}

impl Boot {
    /// The record `name`; panics (with the console) when the guest has none.
    pub fn rec(&self, name: &str) -> &Record {
        match self.records.iter().find(|(n, _)| n == name) {
            Some((_, r)) => r,
            None => panic!("the guest recorded no {name:?}"),
        }
    }

    /// The stdout of `name` as JSON, after asserting it exited 0.
    pub fn ok_json(&self, name: &str) -> serde_json::Value {
        let r = self.rec(name);
        assert_eq!(r.rc, 0, "{name} failed: stdout {:?} stderr {:?}", r.stdout, r.stderr);
        self.json(name)
    }

    /// The stdout of `name` as JSON (`Null` when empty), whatever its exit code.
    pub fn json(&self, name: &str) -> serde_json::Value {
        let r = self.rec(name);
        if r.stdout.trim().is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{name} printed no JSON ({e}): {:?}", r.stdout))
    }

    /// Runs the test's assertions; when one fails, prints the whole console first.
    pub fn verify(&self, f: impl FnOnce(&Boot)) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            eprintln!("==== the guest's console ====\n{}\n==== end of the console ====", self.console);
            std::panic::resume_unwind(panic);
        }
    }

    fn parse(console: String, elapsed: Duration) -> Boot {
        let mut records = Vec::new();
        let mut done = None;
        // (name, record, in stderr?)
        let mut open: Option<(String, Record, bool)> = None;
        for line in console.lines() {
            if let Some(rest) = line.strip_prefix("@@rec ") {
                let (name, rc) = rest.rsplit_once(" rc=").unwrap_or((rest, "-1"));
                open = Some((
                    name.to_string(),
                    Record { rc: rc.parse().unwrap_or(-1), ..Record::default() },
                    false,
                ));
            } else if line.starts_with("@@stderr ") {
                if let Some(o) = open.as_mut() {
                    o.2 = true;
                }
            } else if line.starts_with("@@end ") {
                if let Some((name, r, _)) = open.take() {
                    records.push((name, r));
                }
            } else if let Some(rc) = line.strip_prefix("@@vm done rc=") {
                done = rc.trim().parse().ok();
            } else if let Some((_, r, in_err)) = open.as_mut() {
                let s = if *in_err { &mut r.stderr } else { &mut r.stdout };
                s.push_str(line);
                s.push('\n');
            }
        }
        Boot { console, records, done, elapsed }
    }
}

/// How long a boot may take before it is killed: `$RUST_IPAM_VM_TIMEOUT` seconds, else 180
/// (emulation on a loaded two-core machine is slow).
fn time_limit() -> Duration {
    let secs = std::env::var("RUST_IPAM_VM_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(180);
    Duration::from_secs(secs)
}

/// Boots the micro-VM with `files` (path in the guest, contents) added to the image and
/// `/etc/rust-ipam-vm/scenario.sh` as the scenario, and returns when the guest has powered
/// off. Fails, with the console so far, when the guest hangs past the time limit or never
/// says it is done. Boots run one at a time in a process: emulation wants a core of its own.
pub fn boot(scenario: &str, files: &[(&str, &str)]) -> anyhow::Result<Boot> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let kernel = Kernel::find().map_err(anyhow::Error::msg)?;
    let base = base_image()?;
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("initramfs.cpio");
    {
        let mut extra = Cpio::default();
        extra.dirs.extend(["etc".to_string(), "etc/rust-ipam-vm".to_string()]);
        extra.file("etc/rust-ipam-vm/scenario.sh", 0o755, scenario.as_bytes());
        for (path, text) in files {
            extra.file(path, 0o644, text.as_bytes());
        }
        let mut f = std::fs::File::create(&initrd)?;
        f.write_all(&base)?;
        f.write_all(&extra.finish())?;
    }
    let accel = std::env::var("RUST_IPAM_VM_ACCEL").unwrap_or_else(|_| "tcg".into());
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args(["-accel", &accel, "-m", "1536M", "-smp", "1", "-nographic", "-no-reboot", "-nic", "none"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        // quiet and loglevel: kernel messages would land between the records.
        .args(["-append", "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {QEMU}"))?;
    let console = Arc::new(Mutex::new(String::new()));
    let reader = {
        let console = console.clone();
        let stdout = child.stdout.take().context("qemu stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line);
                let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
                c.push_str(line.trim_end_matches('\r'));
                c.push('\n');
            }
        })
    };
    let limit = time_limit();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            let c = console.lock().unwrap_or_else(|e| e.into_inner()).clone();
            bail!("the micro-VM did not power off within {limit:?}; its console:\n{c}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = start.elapsed();
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut stderr);
    }
    let console = std::mem::take(&mut *console.lock().unwrap_or_else(|e| e.into_inner()));
    if !status.success() {
        bail!("{QEMU} exited with {status}: {stderr}\nthe console:\n{console}");
    }
    let boot = Boot::parse(console, elapsed);
    if boot.done.is_none() {
        bail!("the guest powered off before its scenario ended; its console:\n{}", boot.console);
    }
    for line in boot.console.lines().filter(|l| l.starts_with("@@vm ")) {
        println!("micro-VM: {}", &line[5..]);
    }
    println!("micro-VM: {:.1} s from qemu's start to power-off", elapsed.as_secs_f64());
    Ok(boot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.file("a/b", 0o644, b"xyz");
        let out = c.finish();
        // a (dir), a/b, trailer; each header starts on a 4-byte boundary.
        let starts: Vec<usize> =
            out.windows(6).enumerate().filter(|(_, w)| *w == b"070701").map(|(i, _)| i).collect();
        assert_eq!(starts.len(), 3);
        assert!(starts.iter().all(|s| s % 4 == 0), "{starts:?}");
        assert_eq!(&out[starts[1] + 14..starts[1] + 22], b"000081a4", "mode of a regular file 0644");
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn module_depends_are_read_from_modinfo() {
        assert_eq!(module_depends(b"\x7fELF\0license=GPL\0depends=llc,stp\0intree=Y\0"), ["llc", "stp"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn records_are_parsed_from_the_console() {
        let console = "SeaBIOS\n@@rec add rc=0\n{\"a\":1}\n@@stderr add\nwarn\n@@end add\nnoise\n@@rec del rc=1\n@@stderr del\n@@end del\n@@vm done rc=0\n";
        let b = Boot::parse(console.into(), Duration::ZERO);
        assert_eq!(b.done, Some(0));
        assert_eq!(b.rec("add").rc, 0);
        assert_eq!(b.json("add"), serde_json::json!({"a": 1}));
        assert_eq!(b.rec("add").stderr, "warn\n");
        assert_eq!((b.rec("del").rc, b.rec("del").stdout.as_str()), (1, ""));
    }
}
