use which::which;

/// The object also depends on the `bpf-linker` binary, which cargo cannot see:
/// rebuild when the one on PATH changes.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
