//! A tiny service for the `hello` system: listens on ADDRESS:PORT (`hello-service PORT
//! [ADDRESS]`, 127.0.0.1 unless given) and answers every
//! connection with one line, `hello-service v1: GREETING`, where the greeting comes from
//! the file named by `HELLO_GREETING_FILE` (or a default).

use std::io::Write;
use std::net::TcpListener;

const VERSION: &str = "v1";

fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "7878".to_string());
    let address = std::env::args().nth(2).unwrap_or_else(|| "127.0.0.1".to_string());
    let greeting = std::env::var("HELLO_GREETING_FILE")
        .ok()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .unwrap_or_else(|| "hello".to_string());
    let listener = match TcpListener::bind(format!("{address}:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello-service: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("hello-service {VERSION}: listening on port {port}");
    for stream in listener.incoming().flatten() {
        let mut stream = stream;
        let _ = writeln!(stream, "hello-service {VERSION}: {}", greeting.trim_end());
    }
}
