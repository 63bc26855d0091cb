fn main() {
    std::process::exit(opsloop::interfaces::cli::main());
}
