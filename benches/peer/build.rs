// Records the resolved graphile_worker version (from Cargo.lock) so the JSON output
// reports exactly which peer was measured.
fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut version = String::from("unknown");
    let mut in_pkg = false;
    for line in lock.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            in_pkg = false;
        } else if line == "name = \"graphile_worker\"" {
            in_pkg = true;
        } else if in_pkg && line.starts_with("version = ") {
            version = line.trim_start_matches("version = ").trim_matches('"').to_string();
            break;
        }
    }
    println!("cargo:rustc-env=GRAPHILE_WORKER_VERSION={version}");
}
