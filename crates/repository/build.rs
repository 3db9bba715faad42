fn main() {
    // Re-embed the migrations whenever the folder changes.
    println!("cargo:rerun-if-changed=../../migrations");
    // The checked macros read `.sqlx/` offline (the default, see .cargo/config.toml): a change
    // there recompiles the crate. Switching offline mode or the directory the macros write to
    // (what `cargo sqlx-prepare` does) recompiles it too, so that every macro runs again.
    println!("cargo:rerun-if-changed=../../.sqlx");
    println!("cargo:rerun-if-env-changed=SQLX_OFFLINE");
    println!("cargo:rerun-if-env-changed=SQLX_OFFLINE_DIR");
}
