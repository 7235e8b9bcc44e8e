//! The `blocksync` command: everything lives in the library; this only sets the exit code.

fn main() {
    std::process::exit(blocksync::main_entry());
}
