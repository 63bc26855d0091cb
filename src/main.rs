fn main() {
    std::process::exit(opsloop::cli::main());
}
