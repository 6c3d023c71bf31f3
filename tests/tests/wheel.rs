use std::path::{Path, PathBuf};
use std::process::Command;

use bridge_tests::*;

/// The ELF program interpreter (dynamic loader) a binary asks for: `None`
/// for a static one.
fn interpreter(path: &Path) -> Option<String> {
    let b = std::fs::read(path).expect("read binary");
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).find_map(|i| {
        let h = phoff + i * phentsize;
        let kind = u32::from_le_bytes(b[h..h + 4].try_into().unwrap());
        // PT_INTERP: the path of the loader, NUL-terminated.
        (kind == 3).then(|| {
            let (off, size) = (u64_at(h + 8), u64_at(h + 32));
            String::from_utf8_lossy(&b[off..off + size])
                .trim_end_matches('\0')
                .to_string()
        })
    })
}

fn run(c: &mut Command) -> String {
    let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        o.status.success(),
        "{c:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The wheel: the one tests/run built before the tests (`BRIDGE_TEST_WHEEL`,
/// in the workspace's target directory, sharing every dependency compiled
/// there), else one built here by the same script (tests/build-wheel) in a
/// target directory of its own, since `cargo test` holds the workspace's
/// while tests run: `~/.cache/bridge/wheel-target`, kept between runs so only
/// the first compiles everything.
fn wheel(workspace: &Path, out: &Path) -> PathBuf {
    if let Some(w) = std::env::var_os("BRIDGE_TEST_WHEEL") {
        let w = PathBuf::from(w);
        assert!(
            w.is_file(),
            "BRIDGE_TEST_WHEEL: no wheel at {}",
            w.display()
        );
        return w;
    }
    let target = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/bridge/wheel-target"))
        .expect("HOME");
    // The script finds maturin (BRIDGE_MATURIN_VENV or its default) and says
    // so when it is missing.
    let printed = run(Command::new(workspace.join("tests/build-wheel"))
        .arg(out)
        .env("CARGO_TARGET_DIR", &target));
    PathBuf::from(printed.lines().last().expect("a wheel").trim())
}

/// The repository's pyproject.toml builds a wheel (maturin) holding `bridge`
/// and `bridge-agent`; installed into a fresh venv, `bridge` finds its agent
/// next to itself and runs a job on the local provider with no cargo (and
/// no build tree) on PATH.
#[test]
fn the_wheel_installs_both_binaries_and_runs_a_job_without_cargo() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let r = Repo::new();
    let wheel = wheel(workspace, &r.scratch("wheels"));
    let listing = run(Command::new("python3")
        .args(["-m", "zipfile", "-l"])
        .arg(&wheel));
    assert!(
        listing.contains(".data/scripts/bridge ")
            && listing.contains(".data/scripts/bridge-agent "),
        "{listing}"
    );

    let venv = r.scratch("venv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--no-index"])
        .arg(&wheel));
    let bin = venv.join("bin");
    // Both static: the agent runs on any x86-64 Linux, whatever its glibc.
    for b in ["bridge", "bridge-agent"] {
        assert_eq!(interpreter(&bin.join(b)), None, "{b} is dynamically linked");
    }
    // No cargo, no target/ directory: the venv, then the system's tools.
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display());
    let which = Command::new("sh")
        .args(["-c", "command -v cargo || true"])
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(which.stdout.is_empty(), "cargo on the test PATH");
    let version = run(Command::new(bin.join("bridge"))
        .arg("--version")
        .env("PATH", &path)
        .env_remove("BRIDGE_AGENT_BIN"));
    assert_eq!(
        version.trim(),
        format!("bridge {}", env!("CARGO_PKG_VERSION"))
    );

    r.write("hello.py", "print('hello from the wheel')\n");
    let o = Command::new(bin.join("bridge"))
        .args(["-C"])
        .arg(&r.root)
        .args(["exec", "--", "python3", "hello.py"])
        .env("PATH", &path)
        .env_remove("BRIDGE_AGENT_BIN")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("hello from the wheel"),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The agent that ran it is the wheel's.
    let pid = r
        .agent_pid()
        .unwrap_or_else(|| panic!("no local agent pid: {}", r.daemon_log()));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, bin.join("bridge-agent"));
    let o = Command::new(bin.join("bridge"))
        .args(["-C"])
        .arg(&r.root)
        .arg("down")
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(o.status.success());
}

/// The check above tells a dynamic binary from a static one.
#[test]
fn the_interpreter_check_sees_a_dynamic_binary() {
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    let interp = interpreter(&sh).expect("/bin/sh is dynamically linked");
    assert!(interp.contains("ld-linux"), "{interp}");
}
