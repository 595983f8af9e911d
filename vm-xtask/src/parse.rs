//! Parsers of the command line's values (architectures, sizes, durations, timeouts, memory, `KEY=VALUE`)
//! and their bounds: the bottom of the tree, so that options structs anywhere can use them.

use std::time::Duration;

/// `--timeout`: a duration, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    After(Duration),
    Never,
}

/// The smallest and largest `--memory`, in MiB.
pub const MEMORY_MIB: (u32, u32) = (64, 65536);
/// The shortest and longest `--timeout`, in seconds (7 days).
pub const TIMEOUT_SECS: (u64, u64) = (1, 7 * 24 * 3600);
/// The smallest and largest disk or image size (`--disk-size`, `--size`) and output cap
/// (`--max-output`), in bytes: 1 MiB to 16 TiB.
pub const SIZE_BYTES: (u64, u64) = (1 << 20, 16 << 40);
pub const TIMEOUT_RANGE: &str = "give 1s to 7d (e.g. 90, 90s, 5m, 1h, 2d)";
pub const SIZE_RANGE: &str = "give 1MiB to 16TiB";

/// `--arch`: an architecture by the kernel's name or Debian's (`aarch64`, `arm64`).
pub fn parse_arch(s: &str) -> std::result::Result<os_configs::Arch, String> {
    os_configs::Arch::parse(s).ok_or_else(|| {
        let names: Vec<&str> = os_configs::Arch::ALL.iter().map(|a| a.name()).collect();
        format!("`{s}` is not a supported guest architecture; supported: {}", names.join(", "))
    })
}

pub fn parse_memory(s: &str) -> std::result::Result<u32, String> {
    let range = format!("give {} to {} (MiB)", MEMORY_MIB.0, MEMORY_MIB.1);
    let mib: u64 = match s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() && s.len() <= 10 {
        true => s.parse().map_err(|_| format!("`{s}` is not a number of MiB; {range}"))?,
        false => return Err(format!("`{s}` is not a number of MiB; {range}")),
    };
    if mib < u64::from(MEMORY_MIB.0) {
        return Err(format!("{mib} MiB is too little for the guest kernel; {range}"));
    }
    if mib > u64::from(MEMORY_MIB.1) {
        return Err(format!("{mib} MiB is too much; {range}"));
    }
    Ok(mib as u32)
}

/// Parses `90`, `90s`, `5m`, `1h` or `2d` (a decimal number, fractions allowed), from 1
/// second to 7 days.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b's') => (&s[..s.len() - 1], 1.0),
        Some(b'm') => (&s[..s.len() - 1], 60.0),
        Some(b'h') => (&s[..s.len() - 1], 3600.0),
        Some(b'd') => (&s[..s.len() - 1], 86400.0),
        _ => (s, 1.0),
    };
    let plain = !num.is_empty()
        && num.len() <= 20
        && num.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && num.bytes().filter(|&b| b == b'.').count() <= 1;
    let n: f64 = match plain {
        true => num.parse().map_err(|_| format!("`{s}` is not a duration; {TIMEOUT_RANGE}"))?,
        false => return Err(format!("`{s}` is not a duration; {TIMEOUT_RANGE}")),
    };
    let secs = n * mult;
    if !(secs >= TIMEOUT_SECS.0 as f64 && secs <= TIMEOUT_SECS.1 as f64) {
        return Err(format!("`{s}` is out of range; {TIMEOUT_RANGE}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `--timeout`: `none`, or a duration as [`parse_duration`] reads it.
pub fn parse_timeout(s: &str) -> std::result::Result<Timeout, String> {
    match s {
        "none" => Ok(Timeout::Never),
        _ => parse_duration(s).map(Timeout::After).map_err(|e| format!("{e}, or `none`")),
    }
}

/// Parses a size: bytes, or with a binary unit (`100MiB`, `2GiB`, also `M`, `G`, `K`).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 100MiB, 2GiB)"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown size unit `{unit}` (use KiB, MiB, GiB or TiB)")),
    };
    let size = n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))?;
    if size == 0 {
        return Err(format!("`{s}`: the size must be positive"));
    }
    Ok(size)
}

/// A size (as [`parse_size`]) from 1 MiB to 16 TiB ([`SIZE_BYTES`]): `--disk-size`,
/// `--size`, `--max-output`.
pub fn parse_bounded_size(s: &str) -> std::result::Result<u64, String> {
    let size = parse_size(s).map_err(|e| format!("{e}; {SIZE_RANGE}"))?;
    if !(SIZE_BYTES.0..=SIZE_BYTES.1).contains(&size) {
        return Err(format!("`{s}` is out of range; {SIZE_RANGE}"));
    }
    Ok(size)
}

/// Parses `KEY=VALUE`.
pub fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not of the form NAME=VALUE")),
    }
}

/// Whether `name` can be an environment variable's name.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12XB").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("168h"), Ok(Duration::from_secs(7 * 86400)));
        for bad in
            ["soon", "0", "0.5", "-1", "1e30", "1e19", "18446744073709551616", "", "1.5.3", "inf", "NaN", "s", "8d"]
        {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("give 1s to 7d"), "{bad}: {err}");
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("none"), Ok(Timeout::Never));
        assert_eq!(parse_timeout("20s"), Ok(Timeout::After(Duration::from_secs(20))));
        for bad in ["None", "never", "0", ""] {
            let err = parse_timeout(bad).expect_err(bad);
            assert!(err.contains("give 1s to 7d") && err.ends_with("or `none`"), "{bad}: {err}");
        }
    }

    #[test]
    fn bounded_sizes() {
        assert_eq!(parse_bounded_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bounded_size("16TiB"), Ok(16 << 40));
        for bad in ["0", "-1", "1e30", "1e19", "18446744073709551616", "", "1.5.3", "1048575", "17T", "16385G"] {
            let err = parse_bounded_size(bad).expect_err(bad);
            assert!(err.contains("give 1MiB to 16TiB"), "{bad}: {err}");
        }
    }

    #[test]
    fn key_values_and_names() {
        assert_eq!(parse_key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=x").is_err());
        assert!(is_env_name("_x1"));
        assert!(!is_env_name("1x"));
        assert!(!is_env_name("a-b"));
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("256"), Ok(256));
        assert_eq!(parse_memory("64"), Ok(64));
        assert_eq!(parse_memory("65536"), Ok(65536));
        assert!(parse_memory("0").unwrap_err().contains("too little"));
        for bad in ["lots", "0", "-1", "1e30", "1e19", "18446744073709551616", "", "1.5.3", "63", "65537", "+256"] {
            let err = parse_memory(bad).expect_err(bad);
            assert!(err.contains("give 64 to 65536"), "{bad}: {err}");
        }
    }
}
