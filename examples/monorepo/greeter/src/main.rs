//! A tiny TCP service: `greeter [ADDRESS:PORT]` (127.0.0.1:7070 unless given) answers
//! every connection with one line, `hello from greeter`, and closes it.

use std::io::Write;
use std::net::TcpListener;

fn main() {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7070".to_string());
    let listener = TcpListener::bind(&address).unwrap_or_else(|e| {
        eprintln!("greeter: cannot listen on {address}: {e}");
        std::process::exit(1);
    });
    eprintln!("greeter: listening on {address}");
    for mut stream in listener.incoming().flatten() {
        let _ = writeln!(stream, "hello from greeter");
    }
}
