//! Human sizes ("64KiB", "1MiB", "100G", "4096") for the command line and the config.

/// Parses a size: a number with an optional unit K/KiB/M/MiB/G/GiB/T/TiB (powers of
/// 1024; a bare "B" suffix is allowed). Errors name the offending text.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        u => {
            return Err(SizeError::UnknownUnit {
                text: text.to_string(),
                unit: u.to_string(),
            })
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

/// Why a size does not parse; each names the text given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number where one belongs.
    #[error("{0:?} is not a size (e.g. 4096, 64KiB, 1MiB, 100GiB)")]
    NotASize(String),
    /// A unit that is not one of K/M/G/T (with or without "iB").
    #[error("{text:?}: unknown unit {unit:?} (use KiB, MiB, GiB, TiB)")]
    UnknownUnit {
        /// The text given.
        text: String,
        /// The unit in it.
        unit: String,
    },
    /// More than 2^64 - 1 bytes.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Formats a byte count with a binary unit, e.g. "1.0 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_errors_name_the_text() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size(" 2 G ").unwrap(), 2 << 30);
        assert_eq!(
            parse_size("MiB").unwrap_err(),
            SizeError::NotASize("MiB".into())
        );
        assert!(parse_size("1.5MiB")
            .unwrap_err()
            .to_string()
            .contains("1.5MiB"));
        assert!(matches!(
            parse_size("12 parsecs"),
            Err(SizeError::UnknownUnit { unit, .. }) if unit == "parsecs"
        ));
        assert_eq!(
            parse_size("99999999999TiB").unwrap_err(),
            SizeError::TooLarge("99999999999TiB".into())
        );
        assert_eq!(human(1 << 30), "1.0 GiB");
        assert_eq!(human(512), "512 B");
    }
}
