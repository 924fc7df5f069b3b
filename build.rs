//! Generates `sys/` bindings: bindgen over the kernel's TCMU UAPI header
//! (`linux/target_core_user.h`, Debian package linux-libc-dev; override the path with
//! `LC_TCMU_HEADER`). Needs libclang (Debian: libclang-dev).

fn main() {
    let header = std::env::var("LC_TCMU_HEADER")
        .unwrap_or_else(|_| "/usr/include/linux/target_core_user.h".to_string());
    println!("cargo:rerun-if-changed={header}");
    println!("cargo:rerun-if-env-changed=LC_TCMU_HEADER");
    println!("cargo:rerun-if-changed=build.rs");
    let bindings = bindgen::Builder::default()
        .header(&header)
        .allowlist_type("tcmu_.*")
        .allowlist_var("TCMU_.*")
        .allowlist_type("tcmu_genl_cmd|tcmu_genl_attr")
        // `struct tcmu_mailbox` is `__packed` with an `__aligned(64)` member, which Rust
        // cannot express (`repr(packed)` forbids `align`); sys/mod.rs defines it.
        .blocklist_type("tcmu_mailbox")
        .derive_debug(true)
        .derive_default(true)
        .layout_tests(true)
        .generate()
        .unwrap_or_else(|e| {
            panic!("bindgen over {header} failed ({e}); install linux-libc-dev and libclang-dev")
        });
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    bindings
        .write_to_file(out.join("tcmu.rs"))
        .expect("write bindings");
}
