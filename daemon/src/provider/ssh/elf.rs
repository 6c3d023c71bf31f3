//! Just enough ELF to tell whether the agent binary will run on the remote:
//! its machine, and whether it needs a dynamic loader (a `PT_INTERP` program
//! header). A binary linked with `-C target-feature=+crt-static` (static-pie
//! included) has none, so it runs whatever the remote's glibc is.

use std::path::Path;

/// What the ELF headers say about a binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine` is x86-64 and the file is 64-bit little-endian.
    pub x86_64: bool,
    /// The requested program interpreter (dynamic loader), if any.
    pub interpreter: Option<String>,
}

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;

/// Parses the headers of an ELF file in memory; `Err` says why it is not one
/// we can read.
pub fn inspect(bytes: &[u8]) -> Result<ElfInfo, String> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".into());
    }
    let class64 = match bytes.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err("unknown ELF class".into()),
    };
    let le = match bytes.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err("unknown ELF byte order".into()),
    };
    let r = Reader { bytes, le };
    let machine = r.u16(18)?;
    let (phoff, phentsize, phnum) = if class64 {
        (r.u64(32)?, r.u16(54)?, r.u16(56)?)
    } else {
        (u64::from(r.u32(28)?), r.u16(42)?, r.u16(44)?)
    };
    let mut interpreter = None;
    for i in 0..u64::from(phnum) {
        let at = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|a| usize::try_from(a).ok())
            .ok_or("program header table out of range")?;
        if r.u32(at)? != PT_INTERP {
            continue;
        }
        let (offset, size) = if class64 {
            (r.u64(at + 8)?, r.u64(at + 32)?)
        } else {
            (u64::from(r.u32(at + 4)?), u64::from(r.u32(at + 16)?))
        };
        let path = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| bytes.get(o..o.checked_add(s)?))
            .ok_or("PT_INTERP out of range")?;
        let path = path.split(|b| *b == 0).next().unwrap_or_default();
        interpreter = Some(String::from_utf8_lossy(path).into_owned());
    }
    Ok(ElfInfo {
        x86_64: class64 && le && machine == EM_X86_64,
        interpreter,
    })
}

/// [`inspect`] on a file.
pub fn inspect_file(path: &Path) -> Result<ElfInfo, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    inspect(&bytes)
}

struct Reader<'a> {
    bytes: &'a [u8],
    le: bool,
}

impl Reader<'_> {
    fn take<const N: usize>(&self, at: usize) -> Result<[u8; N], String> {
        at.checked_add(N)
            .and_then(|end| self.bytes.get(at..end))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| "truncated ELF header".to_string())
    }

    fn u16(&self, at: usize) -> Result<u16, String> {
        let b = self.take::<2>(at)?;
        Ok(if self.le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    }

    fn u32(&self, at: usize) -> Result<u32, String> {
        let b = self.take::<4>(at)?;
        Ok(if self.le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    fn u64(&self, at: usize) -> Result<u64, String> {
        let b = self.take::<8>(at)?;
        Ok(if self.le {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit little-endian x86-64 ELF with the given program
    /// header types (an interpreter path follows the table).
    fn synthetic(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(types.len() as u16).to_le_bytes());
        let interp_at = 64 + 56 * types.len();
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&(interp_at as u64).to_le_bytes());
            ph[32..40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
            b.extend(ph);
        }
        b.extend(interp);
        b
    }

    #[test]
    fn synthetic_static_and_dynamic() {
        let st = inspect(&synthetic(&[1, 1, 2])).unwrap();
        assert_eq!(
            st,
            ElfInfo {
                x86_64: true,
                interpreter: None
            }
        );
        let dy = inspect(&synthetic(&[6, PT_INTERP, 1])).unwrap();
        assert_eq!(
            dy.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn this_test_binary_is_dynamic() {
        // Test binaries are linked the default way: against glibc's loader.
        let exe = std::env::current_exe().unwrap();
        let info = inspect_file(&exe).unwrap();
        assert!(info.interpreter.is_some(), "{info:?}");
        assert_eq!(info.x86_64, cfg!(target_arch = "x86_64"));
    }

    #[test]
    fn glibc_ldconfig_is_static() {
        // glibc ships ldconfig static-pie; skip where it is not an ELF (a
        // script on musl systems) or absent.
        if let Ok(info) = inspect_file(Path::new("/sbin/ldconfig")) {
            assert_eq!(info.interpreter, None);
        }
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert!(inspect(b"#!/bin/sh\n").is_err());
        assert!(inspect(b"\x7fELF\x02\x01").is_err());
        let mut b = synthetic(&[PT_INTERP]);
        b.truncate(100);
        assert!(inspect(&b).is_err());
    }
}
