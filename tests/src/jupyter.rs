//! The Jupyter front-end side of the kernel tests: the virtual environment
//! tests/run fills from tests/python/requirements-kernel.txt
//! (jupyter_client, nbclient, jupyter_kernel_test, ipykernel), and the
//! driver script that starts kernels through their kernelspec.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Jupyter venv's Python: `$BRIDGE_JUPYTER_VENV`, else the newest
/// `~/.cache/bridge/jupyter-*-venv` that imports the stack.
pub fn python() -> PathBuf {
    let works = |venv: &Path| {
        let py = venv.join("bin/python3");
        Command::new(&py)
            .args(["-c", "import jupyter_client, jupyter_kernel_test"])
            .status()
            .is_ok_and(|s| s.success())
            .then_some(py)
    };
    if let Some(v) = std::env::var_os("BRIDGE_JUPYTER_VENV")
        && let Some(py) = works(Path::new(&v))
    {
        return py;
    }
    let cache = PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/bridge");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("jupyter-") && n.ends_with("-venv")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found
        .into_iter()
        .rev()
        .find_map(|(_, p)| works(&p))
        .expect("no Jupyter venv: run tests/run (it installs tests/python/requirements-kernel.txt)")
}

/// tests/python/kernel_client.py.
pub fn driver() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/kernel_client.py")
}
