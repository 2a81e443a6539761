//! `kiwispray-hosts`: the operator's CLI (being written).
fn main() {
    eprintln!("kiwispray-hosts: not built yet");
    std::process::exit(2);
}
