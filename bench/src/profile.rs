//! `bpfnat-bench profile --only PATH`: where one path's time goes, by line of the eBPF
//! source. `perf record` samples the benchmark CPU while `paths` runs the path through
//! BPF_PROG_TEST_RUN; each sample inside a program is mapped through the program's
//! `jited_line_info` (the JIT address of every line-info record) to its `line_info` record
//! and the file and line its BTF names, and each sample outside to its kernel symbol (the
//! map helpers). A sample lands on the instruction after a slow one (skid).

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::ProgramInfo;
use aya_obj::generated::{bpf_cmd, bpf_line_info, bpf_prog_info, btf_header};

/// One program's JIT image as the profile needs it.
struct Prog {
    name: &'static str,
    /// Start and length of each subprogram's JIT code, and its kernel symbol.
    funcs: Vec<(u64, u64, String)>,
    /// Every line-info record: its JIT address, file and line; sorted by address.
    lines: Vec<(u64, String, u32)>,
}

impl Prog {
    /// The subprogram and source line `ip` is in, if it is in this program.
    fn locate(&self, ip: u64) -> Option<(&str, Option<(&str, u32)>)> {
        let (start, _, func) = self
            .funcs
            .iter()
            .find(|(s, len, _)| (*s..s + len).contains(&ip))?;
        let i = self.lines.partition_point(|(a, _, _)| *a <= ip);
        let line = i
            .checked_sub(1)
            .map(|i| &self.lines[i])
            .filter(|(a, _, _)| a >= start)
            .map(|(_, f, l)| (f.as_str(), *l));
        Some((func.as_str(), line))
    }
}

/// The `bpf(2)` system call with an attribute block.
fn bpf(cmd: bpf_cmd, attr: &mut [u64; 16]) -> io::Result<i32> {
    // SAFETY: `attr` is a zero-filled `union bpf_attr` image larger than any command reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.as_mut_ptr(),
            size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(|_| io::Error::other("bpf(2) returned more than an int"))
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (its pointers set by the caller).
fn obj_info<T>(fd: i32, info: &mut T) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // struct { __u32 bpf_fd; __u32 info_len; __u64 info; }
    attr[0] = u64::from(fd as u32) | (u64::try_from(size_of::<T>()).unwrap_or(0) << 32);
    attr[1] = std::ptr::from_mut(info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// The string section of BTF object `id`.
fn btf_strings(id: u32) -> Result<Vec<u8>> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr).context("BPF_BTF_GET_FD_BY_ID")?;
    // SAFETY: a new descriptor the kernel just returned, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct bpf_btf_info { __u64 btf; __u32 btf_size; __u32 id; __u64 name; __u32 name_len;
    // __u32 kernel_btf; }: the size first, then the data.
    let mut info = [0u64; 4];
    obj_info(fd.as_raw_fd(), &mut info).context("BTF info")?;
    let size = (info[1] & 0xffff_ffff) as usize;
    let mut raw = vec![0u8; size];
    info = [raw.as_mut_ptr() as u64, size as u64, 0, 0];
    obj_info(fd.as_raw_fd(), &mut info).context("BTF data")?;
    if raw.len() < size_of::<btf_header>() {
        bail!("BTF of {size} bytes");
    }
    // SAFETY: at least a header's bytes; read unaligned.
    let h: btf_header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let start = h.hdr_len as usize + h.str_off as usize;
    raw.get(start..start + h.str_len as usize)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("BTF strings out of bounds"))
}

fn string_at(strings: &[u8], off: u32) -> String {
    let s = strings.get(off as usize..).unwrap_or_default();
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

/// The JIT layout and line table of the program pinned at `pin`; `ksyms` names its
/// subprograms.
fn prog(name: &'static str, pin: &Path, ksyms: &HashMap<u64, String>) -> Result<Prog> {
    let fd = ProgramInfo::from_pin(pin)
        .and_then(|i| i.fd())
        .with_context(|| format!("open {}", pin.display()))?;
    let fd = std::os::fd::AsFd::as_fd(&fd).as_raw_fd();
    // SAFETY: all-zero is a valid `bpf_prog_info` (plain integers).
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    obj_info(fd, &mut info).context("program info")?;
    let (nf, nl) = (info.nr_jited_ksyms as usize, info.nr_line_info as usize);
    if info.nr_jited_line_info as usize != nl
        || info.line_info_rec_size as usize != size_of::<bpf_line_info>()
    {
        bail!("{name}: no JIT line info (is bpf_jit_enable on, and the object built with BTF?)");
    }
    let mut ksyms_v = vec![0u64; nf];
    let mut lens = vec![0u32; nf];
    // SAFETY: all-zero is a valid `bpf_line_info` (plain integers).
    let mut lines = vec![unsafe { std::mem::zeroed::<bpf_line_info>() }; nl];
    let mut jited = vec![0u64; nl];
    let btf_id = info.btf_id;
    // SAFETY: as above.
    info = unsafe { std::mem::zeroed() };
    info.nr_jited_ksyms = nf as u32;
    info.jited_ksyms = ksyms_v.as_mut_ptr() as u64;
    info.nr_jited_func_lens = nf as u32;
    info.jited_func_lens = lens.as_mut_ptr() as u64;
    info.nr_line_info = nl as u32;
    info.line_info_rec_size = size_of::<bpf_line_info>() as u32;
    info.line_info = lines.as_mut_ptr() as u64;
    info.nr_jited_line_info = nl as u32;
    info.jited_line_info_rec_size = size_of::<u64>() as u32;
    info.jited_line_info = jited.as_mut_ptr() as u64;
    obj_info(fd, &mut info).context("program line info")?;
    let strings = btf_strings(btf_id)?;
    let funcs = ksyms_v
        .iter()
        .zip(&lens)
        .map(|(&s, &l)| {
            let sym = ksyms.get(&s).cloned().unwrap_or_else(|| format!("{s:#x}"));
            (s, u64::from(l), sym)
        })
        .collect();
    let mut lines: Vec<(u64, String, u32)> = jited
        .iter()
        .zip(&lines)
        .map(|(&a, l)| (a, string_at(&strings, l.file_name_off), l.line_col >> 10))
        .collect();
    lines.sort_by_key(|(a, _, _)| *a);
    Ok(Prog { name, funcs, lines })
}

/// `/proc/kallsyms`' addresses of BPF programs.
fn bpf_ksyms() -> Result<HashMap<u64, String>> {
    let text = std::fs::read_to_string("/proc/kallsyms").context("read /proc/kallsyms")?;
    Ok(text
        .lines()
        .filter(|l| l.ends_with("[bpf]"))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let name = f.nth(1)?;
            Some((addr, name.to_owned()))
        })
        .collect())
}

/// Profile the paths whose names contain `only` (run by `run_paths` on `cpu`), the
/// programs pinned under `pins`; print the report.
pub fn profile(
    pins: &bpfnat::datapath::Pins,
    cpu: usize,
    run_paths: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let ksyms = bpf_ksyms()?;
    let progs: Vec<Prog> = ["tc_container", "tc_uplink", "xdp_uplink"]
        .into_iter()
        .map(|n| prog(n, &pins.prog(n), &ksyms))
        .collect::<Result<_>>()?;
    let data = std::env::temp_dir().join(format!("bpfnat-profile-{}.data", std::process::id()));
    let mut perf = Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "20000",
            "-C",
            &cpu.to_string(),
            "-o",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .spawn()
        .context("run perf (Debian's linux-perf)")?;
    // perf needs a moment before it samples.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ran = run_paths();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    perf.wait().context("wait for perf")?;
    ran?;
    let script = Command::new("perf")
        .args(["script", "-F", "ip,sym", "-i"])
        .arg(&data)
        .output()
        .context("perf script")?;
    let _ = std::fs::remove_file(&data);
    if !script.status.success() {
        bail!("perf script: {}", String::from_utf8_lossy(&script.stderr));
    }
    report(&progs, &String::from_utf8_lossy(&script.stdout));
    Ok(())
}

fn report(progs: &[Prog], script: &str) {
    let (mut total, mut inside) = (0u64, 0u64);
    let mut by_line: HashMap<(&str, String), u64> = HashMap::new();
    let mut by_func: HashMap<String, u64> = HashMap::new();
    for l in script.lines() {
        let mut f = l.split_whitespace();
        let Some(ip) = f.next().and_then(|a| u64::from_str_radix(a, 16).ok()) else {
            continue;
        };
        total += 1;
        match progs.iter().find_map(|p| p.locate(ip).map(|x| (p.name, x))) {
            Some((prog, (func, line))) => {
                inside += 1;
                *by_func.entry(func.to_owned()).or_default() += 1;
                let at = line.map_or_else(|| "?".to_owned(), |(file, n)| format!("{file}:{n}"));
                *by_line.entry((prog, at)).or_default() += 1;
            }
            None => {
                let sym = f.next().unwrap_or("[unknown]").to_owned();
                *by_func.entry(sym).or_default() += 1;
            }
        }
    }
    let pct = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
    println!(
        "{total} samples on the benchmark CPU, {inside} ({:.1} %) in the programs; the rest is \
         the test-run harness, the helpers and the bench's own loop",
        pct(inside, total)
    );
    println!("\nby function, % of all samples (BPF subprograms, kernel and user symbols):");
    let mut funcs: Vec<_> = by_func.into_iter().collect();
    funcs.sort_by_key(|f| std::cmp::Reverse(f.1));
    for (f, n) in funcs.iter().take(40) {
        println!("{:>6.2} %  {n:>7}  {f}", pct(*n, total));
    }
    println!(
        "\nby source line, % of the samples in the programs (a sample lands after a slow instruction):"
    );
    let mut lines: Vec<_> = by_line.into_iter().collect();
    lines.sort_by_key(|l| std::cmp::Reverse(l.1));
    for ((prog, at), n) in lines.iter().take(40) {
        println!(
            "{:>6.2} %  {n:>7}  {prog:<12}  {}  {}",
            pct(*n, inside),
            short(at),
            source(at)
        );
    }
}

/// `file:line` for reading: from the crate directory on for this workspace's crates (as the
/// tree spells them), the last three components for the standard library and crates.io.
fn short(at: &str) -> String {
    for krate in ["nat-ebpf/", "nat-common/"] {
        if let Some(i) = at.find(krate) {
            return at[i..].to_owned();
        }
    }
    let parts: Vec<&str> = at.rsplitn(4, '/').collect();
    parts
        .iter()
        .take(3)
        .rev()
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// The text of `file:line`, when the file is there.
fn source(at: &str) -> String {
    let Some((file, line)) = at.rsplit_once(':') else {
        return String::new();
    };
    let Ok(n) = line.parse::<usize>() else {
        return String::new();
    };
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| {
            t.lines()
                .nth(n.saturating_sub(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_maps_to_its_subprogram_and_the_last_line_before_it() {
        let p = Prog {
            name: "tc_uplink",
            funcs: vec![(0x1000, 0x100, "main".into()), (0x2000, 0x80, "sub".into())],
            lines: vec![
                (0x1000, "/w/nat-ebpf/src/a.rs".into(), 10),
                (0x1040, "/w/nat-ebpf/src/a.rs".into(), 11),
                (0x2010, "/w/nat-ebpf/src/b.rs".into(), 5),
            ],
        };
        assert_eq!(
            p.locate(0x1044),
            Some(("main", Some(("/w/nat-ebpf/src/a.rs", 11))))
        );
        assert_eq!(
            p.locate(0x1000),
            Some(("main", Some(("/w/nat-ebpf/src/a.rs", 10))))
        );
        // Before the subprogram's first line record: no line of another subprogram.
        assert_eq!(p.locate(0x2004), Some(("sub", None)));
        assert_eq!(
            p.locate(0x2010),
            Some(("sub", Some(("/w/nat-ebpf/src/b.rs", 5))))
        );
        assert_eq!(p.locate(0x1100), None, "past main's end");
        assert_eq!(p.locate(0x0fff), None);
    }

    #[test]
    fn source_paths_are_shortened_for_reading() {
        assert_eq!(
            short("/work/main/nat-ebpf/src/parse.rs:33"),
            "nat-ebpf/src/parse.rs:33"
        );
        assert_eq!(
            short(
                "/root/.rustup/toolchains/x/lib/rustlib/src/rust/library/core/src/ptr/mod.rs:551"
            ),
            "src/ptr/mod.rs:551"
        );
    }
}
