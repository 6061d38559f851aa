//! Byte sizes as operators write them on the command line: `"512MiB"`, `"4GiB"`, `"64k"`,
//! `"1000"`. Suffixes are powers of 1024 (`K`/`KB`/`KiB` alike); no suffix means bytes.

/// Parses a size into bytes.
pub fn parse(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a size: write it like \"512MiB\", \"4GiB\" or \"1000\" (bytes)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: number too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// Formats bytes in the largest unit that keeps it whole, or with one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("1000"), Ok(1000));
        assert_eq!(parse("64k"), Ok(65536));
        assert_eq!(parse("512MiB"), Ok(512 << 20));
        assert_eq!(parse("4 GB"), Ok(4 << 30));
        assert!(parse("").is_err());
        assert!(parse("MiB").is_err());
        assert!(parse("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse("99999999999T").unwrap_err().contains("too large"));
        assert_eq!(human(1 << 20), "1 MiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 B");
    }
}
