// Re-embed the migrations whenever the folder changes.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
