//! The `foreman` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("config") => {
            let config = foreman::core::CoreConfig::default();
            match serde_json::to_string_pretty(&config) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("foreman: cannot print the configuration: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("--version") | Some("-V") => {
            println!("foreman {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: foreman config | --version");
            eprintln!("(the server, agent and client commands are not built yet)");
            ExitCode::from(2)
        }
    }
}
