//! Text for people: tables whose columns fit their widest cell, and durations in
//! seconds written as `4.2s`, `3m05s` or `2h10m`.

use crate::outln;

/// Prints `rows` (the first one is the header) as a table; see [`table_lines`].
pub fn print_table<const N: usize>(rows: &[[String; N]], right: &[usize]) {
    for line in table_lines(rows, right) {
        outln!("{line}");
    }
}

/// Rows in columns as wide as their widest cell, two spaces apart; columns in `right`
/// are right-aligned, and the last column is not padded.
pub fn table_lines<const N: usize>(rows: &[[String; N]], right: &[usize]) -> Vec<String> {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = " ".repeat(widths[c] - cell.chars().count());
                if c > 0 {
                    line.push_str("  ");
                }
                if right.contains(&c) {
                    line.push_str(&pad);
                }
                line.push_str(cell);
                if !right.contains(&c) {
                    line.push_str(&pad);
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

/// `s` seconds for people: tenths under a minute, then minutes and seconds, then hours
/// and minutes.
pub fn human_s(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// `s`, or `-` when it is empty: a table cell that says "nothing".
pub fn or_dash(s: String) -> String {
    if s.is_empty() { "-".to_string() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_their_widest_cells() {
        let rows = [
            ["ID", "STATE", "DURATION", "REASON"].map(String::from),
            ["d-000012", "succeeded (rollback)", "1.2s", ""].map(String::from),
            ["d-000011", "rolled_back", "1m05s", "host web-2: disk full"].map(String::from),
        ];
        let lines = table_lines(&rows, &[2]);
        assert_eq!(
            lines,
            [
                "ID        STATE                 DURATION  REASON",
                "d-000012  succeeded (rollback)      1.2s",
                "d-000011  rolled_back              1m05s  host web-2: disk full",
            ]
        );
    }

    #[test]
    fn durations_read_in_the_largest_sensible_unit() {
        assert_eq!(human_s(4.24), "4.2s");
        assert_eq!(human_s(185.0), "3m05s");
        assert_eq!(human_s(7830.0), "2h10m");
    }
}
