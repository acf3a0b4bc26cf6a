//! `foreman-sim`: runs scenarios, fuzzes, checks determinism. It works in
//! the simulation build only (`cargo xtask sim ...` builds and runs it so).

#[cfg(madsim)]
mod cli;

#[cfg(madsim)]
fn main() {
    std::process::exit(cli::main());
}

#[cfg(not(madsim))]
fn main() {
    eprintln!(
        "foreman-sim runs only in the simulation build: use `cargo xtask sim ...` \
         (RUSTFLAGS=\"--cfg madsim\", target dir target/sim)"
    );
    std::process::exit(64);
}
