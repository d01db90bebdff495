//! Copy the Triton kernels from the top-level `kernels/` into OUT_DIR/kernels, from where
//! maturin puts them in the wheel as `prefops.kernels` (see pyproject.toml `include`).
//!
//! `kernels/` has no `__init__.py`; the package's is written here. A regular package named
//! `kernels` at the top of a checkout would shadow PyPI's `kernels` (a transformers dependency)
//! for anything run from there: transformers' `from kernels import CUDAProperties` failed on
//! ours. A directory without one is at most a namespace package, which a real install beats.

use std::fs;
use std::path::{Path, PathBuf};

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create OUT_DIR/kernels");
    for entry in fs::read_dir(from).expect("read kernels/") {
        let entry = entry.expect("kernels/ entry");
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "__pycache__" {
                copy_tree(&path, &to.join(&name));
            }
        } else if path.extension().is_some_and(|e| e == "py") {
            fs::copy(&path, to.join(&name)).expect("copy kernel file");
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernels = manifest.join("../../kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    let _ = fs::remove_dir_all(&out);
    copy_tree(&kernels, &out);
    fs::write(out.join("__init__.py"), PACKAGE_INIT).expect("write OUT_DIR/kernels/__init__.py");
}

const PACKAGE_INIT: &str = r#""""Triton kernels of prefops (from the repository's `kernels/`).

Nothing here is imported by ``import prefops``: triton is loaded only when a fused op is
first called on a GPU tensor (or under ``TRITON_INTERPRET=1``). The torch reference of
every kernel lives in ``prefops.ops``.
"""
"#;
