//! `cargo xtask systems`: the named systems, one line each.

pub fn run() -> i32 {
    let systems = os_configs::all();
    let width = systems.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in systems {
        let default = if s.name == os_configs::DEFAULT_SYSTEM { " (default)" } else { "" };
        println!("{:width$}  {}{default}", s.name, s.description);
    }
    0
}
